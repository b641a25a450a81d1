//! `GET /metrics` scraped and read with a Prometheus text-format parser
//! (`prometheus-parse`): the test plays the node, so the counts and
//! phases it checks are the ones it caused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ember_api::client::ControlClient;
use ember_api::wire::{NodeEvents, WorkMessage};
use ember_control::model::{NodeReport, NodeSpec, PinnedImage, RunSpec, RunState};
use ember_control::sqlite::SqliteStore;
use ember_control::store::SystemClock;
use ember_controld::server::{ServerConfig, serve};
use prometheus_parse::{Scrape, Value};

async fn next_msg(resp: &mut reqwest::Response, buf: &mut Vec<u8>) -> WorkMessage {
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return serde_json::from_slice(&line).expect("work message");
        }
        let chunk = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .expect("a message within 30 s")
            .expect("chunk")
            .expect("stream open");
        buf.extend_from_slice(&chunk);
    }
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
}

async fn scrape(http: &reqwest::Client, url: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = http.get(format!("{url}/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("scrape")
}

#[tokio::test]
async fn metrics_count_runs_phases_queue_and_nodes() {
    let store = Arc::new(SqliteStore::open_in_memory(Arc::new(SystemClock)).expect("store"));
    let mut config = ServerConfig::new();
    config.client_token = Some("c".into());
    config.node_token = Some("n".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        store,
        Arc::new(SystemClock),
        config,
        async {
            let _ = stopped.await;
        },
    ));
    let c = ControlClient::new(&url, Some("c".into())).expect("client");
    let n = ControlClient::new(&url, Some("n".into())).expect("node client");
    let http = reqwest::Client::new();

    // Behind the client token, like the rest of the client API.
    assert_eq!(scrape(&http, &url, None).await.status(), 401);
    assert_eq!(scrape(&http, &url, Some("n")).await.status(), 401);

    n.put_node(&NodeSpec {
        id: "n1".into(),
        slots: 1,
        labels: Default::default(),
        inventory: Default::default(),
    })
    .await
    .expect("register");
    let mut work = n.work("n1").await.expect("work stream");
    let mut buf = Vec::new();
    let _active = next_msg(&mut work, &mut buf).await;

    let spec = |deployment: Option<&str>| RunSpec {
        image: Some(
            PinnedImage::new("busybox", format!("sha256:{}", "ab".repeat(32))).expect("pin"),
        ),
        command: vec!["true".into()],
        deployment: deployment.map(str::to_owned),
        ..RunSpec::default()
    };
    // One run goes to the node (one slot), two wait in the queue.
    let first = c.submit(&spec(None), None).await.expect("submit");
    let WorkMessage::Assign { run } = next_msg(&mut work, &mut buf).await else {
        panic!("expected an assignment");
    };
    assert_eq!(run.id, first.run.id);
    c.submit(&spec(None), None).await.expect("submit");
    c.submit(&spec(None), None).await.expect("submit");
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
    let mid = scrape(&http, &url, Some("c")).await;
    assert_eq!(mid.status(), 200);
    assert!(
        mid.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain; version=0.0.4")
    );
    let text = mid.text().await.expect("body");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let s = Scrape::parse(lines).expect("a valid exposition");
    assert_eq!(
        value(&s, "ember_control_queue_depth", &[("deployment", "")]),
        Some(2.0)
    );

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
    // The freed slot takes the next queued run; it fails to start.
    let WorkMessage::Assign { run: second } = next_msg(&mut work, &mut buf).await else {
        panic!("expected an assignment");
    };
    n.report(
        "n1",
        second.id,
        &NodeReport::Failed {
            error: "no such image".into(),
        },
    )
    .await
    .expect("failed");
    let WorkMessage::Assign { run: third } = next_msg(&mut work, &mut buf).await else {
        panic!("expected an assignment");
    };
    c.cancel(third.id).await.expect("cancel");

    let text = scrape(&http, &url, Some("c"))
        .await
        .text()
        .await
        .expect("body");
    let s = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("a valid exposition");
    let docs: HashMap<_, _> = s.docs.clone().into_iter().collect();
    for name in [
        "ember_control_runs_submitted_total",
        "ember_control_run_start_seconds",
        "ember_control_nodes",
        "ember_control_queue_depth",
    ] {
        assert!(docs.contains_key(name), "no HELP for {name}");
    }
    assert_eq!(
        value(&s, "ember_control_runs_submitted_total", &[]),
        Some(3.0)
    );
    assert_eq!(
        value(&s, "ember_control_runs_started_total", &[]),
        Some(1.0)
    );
    for (outcome, n) in [
        ("succeeded", 1.0),
        ("failed", 1.0),
        ("cancelled", 1.0),
        ("lost", 0.0),
    ] {
        assert_eq!(
            value(
                &s,
                "ember_control_runs_finished_total",
                &[("outcome", outcome)]
            ),
            Some(n),
            "{outcome}"
        );
    }
    assert_eq!(
        value(&s, "ember_control_queue_depth", &[("deployment", "")]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "ember_control_nodes", &[("state", "ready")]),
        Some(1.0)
    );
    // The scrape's own connection, at least, is open.
    assert!(value(&s, "ember_control_connections", &[]).is_some_and(|n| n >= 1.0));
    assert_eq!(
        value(&s, "ember_control_node_slots", &[("node", "n1")]),
        Some(1.0)
    );
    // Every phase has the one started run, in some bucket up to +Inf.
    for phase in ["queue", "placement", "image", "runner", "process", "total"] {
        let h = s
            .samples
            .iter()
            .find(|x| {
                x.metric == "ember_control_run_start_seconds"
                    && x.labels.get("phase") == Some(phase)
            })
            .unwrap_or_else(|| panic!("no histogram for {phase}"));
        let Value::Histogram(buckets) = &h.value else {
            panic!("{phase} is not a histogram: {:?}", h.value);
        };
        assert!(buckets.len() >= 13, "{phase}: {} buckets", buckets.len());
        let inf = buckets.last().expect("a bucket");
        assert!(
            inf.less_than.is_infinite() && inf.count == 1.0,
            "{phase}: {inf:?}"
        );
    }
    assert_eq!(
        value(
            &s,
            "ember_control_run_start_seconds_count",
            &[("phase", "total")]
        ),
        Some(1.0)
    );
    let _ = stop.send(());
}
