//! The API in process, against an in-memory SQLite store: submit and
//! idempotency, the pushed work stream, node reports, cancel, logs, auth
//! and error bodies. No runc needed: the test plays the node.

use std::sync::Arc;
use std::time::Duration;

use ember_api::client::ControlClient;
use ember_api::wire::{LogRecord, LogStream, NodeEvents, WorkMessage};
use ember_control::RunReports;
use ember_control::model::{NodeReport, NodeSpec, PinnedImage, RunId, RunSpec, RunState};
use ember_control::sqlite::SqliteStore;
use ember_control::store::SystemClock;
use ember_controld::server::{ServerConfig, serve};

struct Server {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn server() -> Server {
    server_with(Duration::from_secs(15)).await
}

async fn server_with(heartbeat_timeout: Duration) -> Server {
    server_config(|c| c.heartbeat_timeout = heartbeat_timeout).await
}

async fn server_config(tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    let store = Arc::new(SqliteStore::open_in_memory(Arc::new(SystemClock)).expect("store"));
    let mut config = ServerConfig::new();
    config.client_token = Some("c".into());
    config.node_token = Some("n".into());
    config.reap_interval = Duration::from_millis(100);
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(serve(
        listener,
        store,
        Arc::new(SystemClock),
        config,
        async {
            let _ = rx.await;
        },
    ));
    Server {
        url,
        stop: Some(tx),
    }
}

fn image() -> PinnedImage {
    PinnedImage::new("busybox", format!("sha256:{}", "ab".repeat(32))).expect("pin")
}

fn spec() -> RunSpec {
    RunSpec {
        image: Some(image()),
        command: vec!["true".into()],
        ..RunSpec::default()
    }
}

/// Registers node `n1` with `slots` slots through the node client `n`.
async fn register(n: &ControlClient, slots: u32) {
    n.put_node(&NodeSpec {
        id: "n1".into(),
        slots,
        labels: Default::default(),
        inventory: Default::default(),
    })
    .await
    .expect("register");
}

/// Reads one work message from an open work stream.
async fn next_msg(resp: &mut reqwest::Response, buf: &mut Vec<u8>) -> WorkMessage {
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return serde_json::from_slice(&line).expect("work message");
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .expect("a message within 10 s")
            .expect("chunk")
            .expect("stream open");
        buf.extend_from_slice(&chunk);
    }
}

#[tokio::test]
async fn submit_push_report_logs_cancel() {
    let s = server().await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let n = ControlClient::new(&s.url, Some("n".into())).expect("node client");

    register(&n, 1).await;
    let mut work = n.work("n1").await.expect("work stream");
    let mut buf = Vec::new();
    assert_eq!(
        next_msg(&mut work, &mut buf).await,
        WorkMessage::Active {
            runs: vec![],
            keepalive_ms: Some(10_000),
            scheduled: Some(vec![])
        }
    );

    // Submit: the run is pushed on the open stream, no polling.
    let first = c.submit(&spec(), Some("key-1")).await.expect("submit");
    assert!(first.created);
    let again = c.submit(&spec(), Some("key-1")).await.expect("resubmit");
    assert!(!again.created);
    assert_eq!(again.run.id, first.run.id);
    let WorkMessage::Assign { run } = next_msg(&mut work, &mut buf).await else {
        panic!("expected an assignment");
    };
    assert_eq!(run.id, first.run.id);
    assert_eq!(run.state, RunState::Scheduled);

    // The node's progress (one report, then several in one request),
    // output and exit.
    n.report("n1", run.id, &NodeReport::Accepted)
        .await
        .expect("report");
    let empty = n
        .report_events("n1", run.id, &NodeEvents::Many(Vec::new()))
        .await
        .expect_err("an empty list");
    assert_eq!(empty.status(), Some(400));
    let running = n
        .report_events(
            "n1",
            run.id,
            &NodeEvents::Many(vec![
                NodeReport::ImageReady,
                NodeReport::RunnerReady,
                NodeReport::Started,
            ]),
        )
        .await
        .expect("reports");
    assert_eq!(running.state, RunState::Running);
    assert!(running.times.image_ready.is_some() && running.times.runner_ready.is_some());
    // A reconnect (node or control-plane restart) first lists the node's
    // active runs, so a node that lost one can fail it.
    drop(work);
    work = n.work("n1").await.expect("work stream again");
    buf.clear();
    assert_eq!(
        next_msg(&mut work, &mut buf).await,
        WorkMessage::Active {
            runs: vec![run.id],
            keepalive_ms: Some(10_000),
            scheduled: Some(vec![])
        }
    );
    n.append_log("n1", run.id, LogStream::Stdout, "out\n".into())
        .await
        .expect("log");
    let done = n
        .report(
            "n1",
            run.id,
            &NodeReport::Exited {
                code: 0,
                runner_idle: false,
            },
        )
        .await
        .expect("exit");
    assert_eq!(done.state, RunState::Succeeded);
    let logs = c.logs(run.id, true).await.expect("logs");
    let body = logs.text().await.expect("log body");
    assert_eq!(body, "{\"stream\":\"stdout\",\"data\":\"b3V0Cg==\"}\n");
    // A late report and a late log are refused.
    let late = n.report("n1", run.id, &NodeReport::Started).await;
    assert_eq!(late.err().and_then(|e| e.status()), Some(409));
    let late = n
        .append_log("n1", run.id, LogStream::Stderr, "x".into())
        .await;
    assert_eq!(late.err().and_then(|e| e.status()), Some(409));

    // Slot free again: the next run is pushed too, and a cancel follows it.
    let second = c.submit(&spec(), None).await.expect("submit");
    let WorkMessage::Assign { run } = next_msg(&mut work, &mut buf).await else {
        panic!("expected an assignment");
    };
    assert_eq!(run.id, second.run.id);
    let cancelled = c.cancel(run.id).await.expect("cancel");
    assert_eq!(cancelled.state, RunState::Cancelled);
    assert_eq!(
        next_msg(&mut work, &mut buf).await,
        WorkMessage::Cancel {
            run: run.id,
            attempt: None
        }
    );
    let again = c.cancel(run.id).await;
    assert_eq!(again.err().and_then(|e| e.status()), Some(409));
}

/// A node's reports on several runs in one request: per-run results in
/// order, a refusal confined to its run, and a runner freed by one of the
/// runs handed the next queued run of its key on the way.
#[tokio::test]
async fn reports_on_many_runs_in_one_request() {
    let s = server().await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let n = ControlClient::new(&s.url, Some("n".into())).expect("node client");
    register(&n, 2).await;
    let mut work = n.work("n1").await.expect("work stream");
    let mut buf = Vec::new();
    assert!(matches!(
        next_msg(&mut work, &mut buf).await,
        WorkMessage::Active { .. }
    ));
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(c.submit(&spec(), None).await.expect("submit").run.id);
    }
    let (a, b, third) = (ids[0], ids[1], ids[2]);
    for want in [a, b] {
        let WorkMessage::Assign { run } = next_msg(&mut work, &mut buf).await else {
            panic!("expected an assignment");
        };
        assert_eq!(run.id, want);
    }
    let batch = vec![
        RunReports {
            attempt: None,
            ages_ms: Vec::new(),
            run: a,
            reports: vec![
                NodeReport::ImageReady,
                NodeReport::RunnerReady,
                NodeReport::Started,
                NodeReport::Exited {
                    code: 0,
                    runner_idle: true,
                },
            ],
        },
        RunReports {
            attempt: None,
            ages_ms: Vec::new(),
            run: b,
            reports: vec![NodeReport::Started, NodeReport::Started],
        },
        RunReports {
            attempt: None,
            ages_ms: Vec::new(),
            run: RunId(999_999),
            reports: vec![NodeReport::Started],
        },
    ];
    let answer = n.report_batch("n1", &batch).await.expect("batch");
    let got: Vec<_> = answer
        .results
        .iter()
        .map(|r| (r.run, r.state, r.error.as_ref().map(|e| e.error.as_str())))
        .collect();
    assert_eq!(
        got,
        vec![
            (a, Some(RunState::Succeeded), None),
            (b, None, Some("conflict")),
            (RunId(999_999), None, Some("not_found")),
        ]
    );
    assert_eq!(
        c.run(b).await.expect("b").state,
        RunState::Running,
        "b's first report stands"
    );
    // a's runner is idle again: the queued run of its key goes to it.
    let WorkMessage::Assign { run } = next_msg(&mut work, &mut buf).await else {
        panic!("expected the warm hand-off");
    };
    assert_eq!((run.id, run.state), (third, RunState::Scheduled));

    // Bad batches are refused whole, and only nodes may post.
    let http = reqwest::Client::new();
    let post = |token: &str, body: &str| {
        http.post(format!("{}/v1/nodes/n1/events", s.url))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    for bad in ["[]", "{", r#"[{"run": 1}]"#, r#"{"run": 1, "reports": []}"#] {
        let resp = post("n", bad).await.expect("post");
        assert_eq!(resp.status(), 400, "{bad}");
        let body: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json error");
        assert_eq!(body["error"], "bad_request", "{bad}");
    }
    let resp = post("c", r#"[{"run": 1, "reports": [{"event": "started"}]}]"#)
        .await
        .expect("post");
    assert_eq!(resp.status(), 401);
    assert_eq!(
        c.run(third).await.expect("third").state,
        RunState::Scheduled
    );
}

#[tokio::test]
async fn errors_are_json_and_4xx() {
    let s = server().await;
    // Installs the process's TLS crypto provider, which a bare
    // `reqwest::Client::new()` needs (reqwest is built without a default).
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let http = reqwest::Client::new();
    let post = |body: &'static str, token: &'static str| {
        http.post(format!("{}/v1/runs", s.url))
            .bearer_auth(token)
            .body(body)
            .send()
    };
    for (body, status) in [
        ("", 400),
        ("{", 400),
        (
            "{\"image\":{\"reference\":\"x\",\"digest\":\"sha256:no\"}}",
            400,
        ),
        ("{}", 400),
    ] {
        let resp = post(body, "c").await.expect("send");
        assert_eq!(resp.status().as_u16(), status, "{body}");
        let v: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("body")).expect("JSON error body");
        assert_eq!(v["error"], "bad_request");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(post("{}", "n").await.expect("send").status().as_u16(), 401);
    assert!(
        c.runs().await.expect("runs").is_empty(),
        "nothing half-written"
    );
    let missing = c.run(ember_control::model::RunId(99)).await;
    assert_eq!(missing.err().and_then(|e| e.status()), Some(404));
    let unknown = http
        .get(format!("{}/v1/nope", s.url))
        .send()
        .await
        .expect("send");
    assert_eq!(unknown.status().as_u16(), 404);
}

#[tokio::test]
async fn a_silent_node_loses_its_runs_and_late_reports_are_refused() {
    let s = server_with(Duration::from_secs(1)).await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let n = ControlClient::new(&s.url, Some("n".into())).expect("node client");
    register(&n, 1).await;
    let mut work = n.work("n1").await.expect("work stream");
    let mut buf = Vec::new();
    let _ = next_msg(&mut work, &mut buf).await;
    let submitted = c
        .submit(
            &RunSpec {
                max_attempts: 2,
                ..spec()
            },
            None,
        )
        .await
        .expect("submit");
    let WorkMessage::Assign { run } = next_msg(&mut work, &mut buf).await else {
        panic!("expected an assignment");
    };
    assert_eq!(run.id, submitted.run.id);
    n.report("n1", run.id, &NodeReport::Accepted)
        .await
        .expect("accept");
    // No more heartbeats: the run is lost, then queued again (attempts left).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = c.run(run.id).await.expect("run");
        if r.state == RunState::Queued {
            assert_eq!(r.attempts, 1);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never requeued: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let late = n.report("n1", run.id, &NodeReport::Started).await;
    assert_eq!(late.err().and_then(|e| e.status()), Some(409));
}

#[tokio::test]
async fn an_idle_work_stream_gets_keepalives() {
    let s = server_config(|c| c.keepalive = Duration::from_millis(200)).await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let n = ControlClient::new(&s.url, Some("n".into())).expect("node client");
    register(&n, 1).await;
    let mut work = n.work("n1").await.expect("work stream");
    let mut buf = Vec::new();
    assert_eq!(
        next_msg(&mut work, &mut buf).await,
        WorkMessage::Active {
            runs: vec![],
            keepalive_ms: Some(200),
            scheduled: Some(vec![])
        },
        "the first line announces the interval"
    );
    for _ in 0..3 {
        assert_eq!(next_msg(&mut work, &mut buf).await, WorkMessage::Keepalive);
    }
    // Real messages still come through between keepalives.
    let submitted = c.submit(&spec(), None).await.expect("submit");
    loop {
        match next_msg(&mut work, &mut buf).await {
            WorkMessage::Keepalive => {}
            WorkMessage::Assign { run } => {
                assert_eq!(run.id, submitted.run.id);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(next_msg(&mut work, &mut buf).await, WorkMessage::Keepalive);
}

/// Output that is not text comes back byte for byte, streams apart, and a
/// character split between two appends is whole again when concatenated.
#[tokio::test]
async fn logs_are_binary_safe() {
    let s = server().await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let n = ControlClient::new(&s.url, Some("n".into())).expect("node client");
    register(&n, 1).await;
    let mut work = n.work("n1").await.expect("work stream");
    let mut buf = Vec::new();
    let _ = next_msg(&mut work, &mut buf).await;
    let submitted = c.submit(&spec(), None).await.expect("submit");
    let WorkMessage::Assign { run } = next_msg(&mut work, &mut buf).await else {
        panic!("expected an assignment");
    };
    assert_eq!(run.id, submitted.run.id);
    for r in [NodeReport::Accepted, NodeReport::Started] {
        n.report("n1", run.id, &r).await.expect("report");
    }
    let euro = "\u{20ac}".as_bytes(); // e2 82 ac
    let appends: [(LogStream, &[u8]); 5] = [
        (LogStream::Stdout, b"\xff\x00\xfe"),
        (LogStream::Stderr, b"\xc0\n"),
        (LogStream::Stdout, &euro[..2]),
        (LogStream::Stdout, &euro[2..]),
        (LogStream::Stderr, b"\x00"),
    ];
    for (stream, data) in appends {
        n.append_log("n1", run.id, stream, data.to_vec().into())
            .await
            .expect("log");
    }
    n.report(
        "n1",
        run.id,
        &NodeReport::Exited {
            code: 0,
            runner_idle: false,
        },
    )
    .await
    .expect("exit");
    let body = c
        .logs(run.id, false)
        .await
        .expect("logs")
        .bytes()
        .await
        .expect("log body");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let rec: LogRecord = serde_json::from_slice(line).expect("a JSON record");
        match rec.stream {
            LogStream::Stdout => out.extend_from_slice(&rec.data),
            LogStream::Stderr => err.extend_from_slice(&rec.data),
        }
    }
    assert_eq!(out, [b"\xff\x00\xfe".as_slice(), euro].concat());
    assert_eq!(err, b"\xc0\n\x00");
}

/// `GET /v1/runs` pages: the default page size, `limit`, a cursor that
/// walks every run exactly once, and the last page without a cursor; bad
/// values are 400s.
#[tokio::test]
async fn run_lists_are_paged() {
    let s = server().await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let total = ember_api::wire::DEFAULT_PAGE + 5;
    for _ in 0..total {
        c.submit(&spec(), None).await.expect("submit");
    }
    let first = c.runs_page(None, None).await.expect("page");
    assert_eq!(first.runs.len(), ember_api::wire::DEFAULT_PAGE);
    let cursor = first.next_cursor.clone().expect("a full page has a cursor");
    let second = c.runs_page(None, Some(&cursor)).await.expect("page");
    assert_eq!(second.runs.len(), 5);
    assert_eq!(second.next_cursor, None, "the last page has no cursor");
    let ids: Vec<i64> = first
        .runs
        .iter()
        .chain(&second.runs)
        .map(|r| r.id.0)
        .collect();
    let want: Vec<i64> = (1..=total as i64).rev().collect();
    assert_eq!(ids, want, "every run once, newest first");
    let small = c.runs_page(Some(3), None).await.expect("page");
    assert_eq!(small.runs.len(), 3);
    assert_eq!(c.runs().await.expect("all").len(), total);
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "cursor=-1",
        "cursor=run-x",
        "state=",
    ] {
        let err = c
            .send(
                "/v1/runs",
                reqwest::Client::new()
                    .get(format!("{}/v1/runs?{bad}", s.url))
                    .bearer_auth("c"),
            )
            .await
            .expect_err(bad);
        assert_eq!(err.status(), Some(400), "{bad}: {err}");
    }
}

/// Query values are percent-decoded: a deployment named `x y` is found
/// with `%20` (and `+`).
#[tokio::test]
async fn query_values_are_percent_decoded() {
    let s = server().await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    c.deploy(&ember_control::model::DeploymentSpec {
        caches: Vec::new(),
        name: "x y".into(),
        image: image(),
        command: vec![],
        env: Default::default(),
        resources: Default::default(),
        recycle_key: None,
        readonly_rootfs: false,
        warm_runners: 0,
        node_selector: Default::default(),
        snapshot: false,
    })
    .await
    .expect("deploy");
    let sub = c
        .submit(
            &RunSpec {
                deployment: Some("x y".into()),
                ..RunSpec::default()
            },
            None,
        )
        .await
        .expect("submit");
    c.submit(&spec(), None).await.expect("another");
    for q in [
        "deployment=x%20y",
        "deployment=x+y",
        "state=queued&deployment=x%20y",
    ] {
        let page: ember_api::wire::RunPage = reqwest::Client::new()
            .get(format!("{}/v1/runs?{q}", s.url))
            .bearer_auth("c")
            .send()
            .await
            .expect("send")
            .bytes()
            .await
            .map(|b| serde_json::from_slice(&b).expect("a page"))
            .expect("page");
        let ids: Vec<RunId> = page.runs.iter().map(|r| r.id).collect();
        assert_eq!(ids, [sub.run.id], "{q}");
    }
}

/// Limits answer 413 with the error object: a run or deployment whose
/// environment and command are over `max_env_bytes`, and a body over
/// `max_request_bytes` (refused by the framework, still JSON); nothing is
/// stored. A wrong method is JSON too.
#[tokio::test]
async fn oversized_submits_get_a_json_413() {
    let s = server_config(|c| {
        c.max_env_bytes = 1000;
        c.max_request_bytes = 64 << 10;
    })
    .await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let mut big = spec();
    big.env.insert("BIG".into(), "x".repeat(1000));
    let err = c.submit(&big, None).await.expect_err("over the env limit");
    let ember_api::client::ClientError::Api {
        status,
        error,
        message,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!((*status, error.as_str()), (413, "too_large"), "{err}");
    assert!(message.contains("1000"), "{message}");
    let mut long_argv = spec();
    long_argv.command = vec!["x".repeat(600), "y".repeat(600)];
    assert_eq!(
        c.submit(&long_argv, None).await.expect_err("argv").status(),
        Some(413)
    );
    let mut fits = spec();
    fits.env.insert("OK".into(), "x".repeat(900));
    c.submit(&fits, None).await.expect("under the limit");

    for path in ["/v1/runs", "/v1/deployments"] {
        let body = format!(r#"{{"junk":"{}"}}"#, "z".repeat(100 << 10));
        // A client of its own: the server closes a connection whose body it
        // refused unread, and a pooled one might be picked up again.
        let resp = reqwest::Client::new()
            .post(format!("{}{path}", s.url))
            .bearer_auth("c")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), 413, "{path}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/json",
            "{path}: the documented error object"
        );
        let v: serde_json::Value =
            serde_json::from_slice(&resp.bytes().await.expect("body")).expect("JSON");
        assert_eq!(v["error"], "too_large", "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let http = reqwest::Client::new();
    let resp = http
        .delete(format!("{}/v1/runs", s.url))
        .bearer_auth("c")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 405);
    let v: serde_json::Value =
        serde_json::from_slice(&resp.bytes().await.expect("body")).expect("JSON");
    assert_eq!(v["error"], "method_not_allowed");
    assert_eq!(
        c.runs().await.expect("runs").len(),
        1,
        "only the one that fitted"
    );
    // Run ids are digits, as the document's pattern says.
    for bad in ["+1", "-1", "run-", "1.0", "%201"] {
        let resp = http
            .get(format!("{}/v1/runs/{bad}", s.url))
            .bearer_auth("c")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), 400, "{bad}");
    }
}

/// A run's output past `max_log_bytes` is dropped: the log holds exactly
/// the limit, then one marker record; reads are streamed a page at a time
/// (a log larger than a page comes back whole, in order).
#[tokio::test]
async fn logs_stop_at_the_limit_with_a_marker() {
    let max = 3 << 20;
    let s = server_config(|c| c.max_log_bytes = max).await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let n = ControlClient::new(&s.url, Some("n".into())).expect("node client");
    register(&n, 1).await;
    let mut work = n.work("n1").await.expect("work stream");
    let mut buf = Vec::new();
    let _ = next_msg(&mut work, &mut buf).await;
    c.submit(&spec(), None).await.expect("submit");
    let WorkMessage::Assign { run } = next_msg(&mut work, &mut buf).await else {
        panic!("expected an assignment");
    };
    for r in [NodeReport::Accepted, NodeReport::Started] {
        n.report("n1", run.id, &r).await.expect("report");
    }
    // 5 MiB in 100 KiB appends, each byte its offset's low bits, so order
    // and completeness are checked, not only the length.
    let chunk = 100 << 10;
    let total: usize = 5 << 20;
    let all: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    for part in all.chunks(chunk) {
        n.append_log("n1", run.id, LogStream::Stdout, part.to_vec().into())
            .await
            .expect("append (dropped bytes are not an error)");
    }
    n.report(
        "n1",
        run.id,
        &NodeReport::Exited {
            code: 0,
            runner_idle: false,
        },
    )
    .await
    .expect("exit");
    for follow in [false, true] {
        let mut resp = c.logs(run.id, follow).await.expect("logs");
        let (mut out, mut markers, mut line) = (Vec::new(), Vec::new(), Vec::new());
        let mut chunks = 0;
        while let Some(b) = resp.chunk().await.expect("chunk") {
            chunks += 1;
            line.extend_from_slice(&b);
            while let Some(i) = line.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = line.drain(..=i).collect();
                let rec: LogRecord = serde_json::from_slice(&l).expect("record");
                if rec.marker {
                    markers.push(rec);
                } else {
                    assert!(markers.is_empty(), "output after the marker");
                    out.extend_from_slice(&rec.data);
                }
            }
        }
        assert_eq!(out.len() as u64, max, "follow={follow}");
        assert!(
            out == all[..max as usize],
            "follow={follow}: the first bytes, in order"
        );
        assert_eq!(markers.len(), 1, "follow={follow}");
        assert_eq!(markers[0].stream, LogStream::Stderr);
        let text = String::from_utf8_lossy(&markers[0].data).into_owned();
        assert!(text.contains("truncated"), "{text}");
        assert!(chunks > 1, "follow={follow}: streamed, not one body");
    }
}

/// The pruner: a finished run's log over the budget is replaced by one
/// marker record saying it was pruned; a running run's log stays.
#[tokio::test]
async fn finished_runs_logs_are_pruned_over_the_budget() {
    let s = server_config(|c| {
        c.log_retention = ember_control::LogRetention {
            max_age_ms: None,
            max_total_bytes: Some(10),
        };
        c.prune_interval = Duration::from_millis(50);
    })
    .await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let n = ControlClient::new(&s.url, Some("n".into())).expect("node client");
    register(&n, 2).await;
    let mut work = n.work("n1").await.expect("work stream");
    let mut buf = Vec::new();
    let _ = next_msg(&mut work, &mut buf).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        c.submit(&spec(), None).await.expect("submit");
        let WorkMessage::Assign { run } = next_msg(&mut work, &mut buf).await else {
            panic!("expected an assignment");
        };
        for r in [NodeReport::Accepted, NodeReport::Started] {
            n.report("n1", run.id, &r).await.expect("report");
        }
        n.append_log("n1", run.id, LogStream::Stdout, vec![b'x'; 100].into())
            .await
            .expect("append");
        ids.push(run.id);
    }
    n.report(
        "n1",
        ids[0],
        &NodeReport::Exited {
            code: 0,
            runner_idle: false,
        },
    )
    .await
    .expect("exit");
    let records = async |id| -> Vec<LogRecord> {
        let body = c
            .logs(id, false)
            .await
            .expect("logs")
            .bytes()
            .await
            .expect("body");
        body.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("record"))
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let recs = records(ids[0]).await;
        if recs.len() == 1 && recs[0].marker {
            assert!(String::from_utf8_lossy(&recs[0].data).contains("pruned"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never pruned: {recs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let running = records(ids[1]).await;
    assert_eq!(running.len(), 1);
    assert_eq!(
        running[0].data,
        vec![b'x'; 100],
        "a running run's log stays"
    );
}

/// Every route sits behind its auth layer: a client route refuses the
/// node token and no token, a node route refuses the client token and no
/// token, each with 401, the `WWW-Authenticate` header and the error
/// object, before anything else is looked at (no body is sent).
#[tokio::test]
async fn every_route_is_behind_its_auth_layer() {
    let s = server().await;
    // Installs the process's TLS crypto provider, which a bare
    // `reqwest::Client::new()` needs (reqwest is built without a default).
    let _ = ControlClient::new(&s.url, None).expect("client");
    let http = reqwest::Client::new();
    let client_routes = [
        ("POST", "/v1/runs"),
        ("GET", "/v1/runs"),
        ("GET", "/v1/runs/1"),
        ("POST", "/v1/runs/1/cancel"),
        ("GET", "/v1/runs/1/logs"),
        ("POST", "/v1/deployments"),
        ("GET", "/v1/deployments"),
        ("GET", "/v1/nodes"),
        ("POST", "/v1/nodes/n1/credentials"),
        ("DELETE", "/v1/nodes/n1/credentials"),
    ];
    let node_routes = [
        ("PUT", "/v1/nodes/n1"),
        ("GET", "/v1/nodes/n1/work"),
        ("POST", "/v1/nodes/n1/events"),
        ("POST", "/v1/nodes/n1/runs/1/events"),
        ("POST", "/v1/nodes/n1/runs/1/logs"),
    ];
    let routes = client_routes
        .iter()
        .map(|r| (r, "n"))
        .chain(node_routes.iter().map(|r| (r, "c")));
    for ((method, path), wrong) in routes {
        for token in [None, Some(wrong)] {
            let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
            let mut req = http.request(method.clone(), format!("{}{path}", s.url));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.expect("send");
            assert_eq!(
                resp.status().as_u16(),
                401,
                "{method} {path} with {token:?}"
            );
            assert_eq!(
                resp.headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok()),
                Some("Bearer"),
                "{method} {path}"
            );
            let v: serde_json::Value =
                serde_json::from_slice(&resp.bytes().await.expect("body")).expect("JSON error");
            assert_eq!(v["error"], "unauthorized", "{method} {path}");
        }
    }
    // Nothing was stored on the way.
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    assert!(c.runs().await.expect("runs").is_empty());
}

/// A deployment's caches reach its runs (a run's own replacing the one of
/// the same path), and bad declarations are refused with 400 and the
/// reason, on deploy and on submit.
#[tokio::test]
async fn cache_declarations_are_copied_to_runs_and_checked() {
    use ember_control::model::{CacheDecl, DeploymentSpec};
    let s = server().await;
    let c = ControlClient::new(&s.url, Some("c".into())).expect("client");
    let deployment = |caches: Vec<CacheDecl>| DeploymentSpec {
        caches,
        snapshot: false,
        name: "ci".into(),
        image: image(),
        command: vec![],
        env: Default::default(),
        resources: Default::default(),
        recycle_key: None,
        readonly_rootfs: false,
        warm_runners: 0,
        node_selector: Default::default(),
    };
    let err = c
        .deploy(&deployment(vec![CacheDecl::new("root/.npm", "npm")]))
        .await
        .expect_err("a relative path");
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("must be absolute"), "{err}");

    let mut pip = CacheDecl::new("/root/.cache/pip", r#"pip-{{ hash "requirements.txt" }}"#);
    pip.restore_keys = vec!["pip-".into()];
    c.deploy(&deployment(vec![
        pip.clone(),
        CacheDecl::new("/root/.npm", "npm"),
    ]))
    .await
    .expect("deploy");
    let mut mine = CacheDecl::new("/root/.npm", "npm-mine");
    mine.read_only = true;
    let run = c
        .submit(
            &RunSpec {
                deployment: Some("ci".into()),
                caches: vec![mine.clone()],
                ..RunSpec::default()
            },
            None,
        )
        .await
        .expect("submit")
        .run;
    assert_eq!(run.caches, vec![pip, mine]);
    assert_eq!(c.run(run.id).await.expect("run").caches, run.caches);

    for (bad, why) in [
        (CacheDecl::new("/c", r#"k-{{ hash "f""#), "unclosed"),
        (CacheDecl::new("/a/../b", "k"), "`..`"),
        (CacheDecl::new("/c", "k".repeat(97)), "at most 96"),
    ] {
        let err = c
            .submit(
                &RunSpec {
                    caches: vec![bad],
                    ..spec()
                },
                None,
            )
            .await
            .expect_err(why);
        assert_eq!(err.status(), Some(400), "{err}");
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
}
