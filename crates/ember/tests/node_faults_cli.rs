//! Faults of the node agent, with the real binaries (`ember control`,
//! `ember node`, real runc, the static agent, a real registry): a node
//! killed with `kill -9` and restarted at once, a node killed and left
//! dead, and one node's credential used on another node's endpoints
//! (issue 10, "Runs and nodes").

mod common;

use common::cluster::*;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// One raw HTTP/1.1 request; returns the status and the body.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut resp = Vec::new();
    // A work stream never ends by itself: read what came within a while.
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {resp:?}"));
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// Polls run `id` until `done` says so; the deadline only stops a hung
/// test, the machine being slow cannot fail it.
fn wait_run(
    url: &str,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = run_json(url, id);
        if done(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "{id} never {what}: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The control plane with the test tokens and a heartbeat timeout far
/// longer than any test step, so nothing here can be the reaper's doing.
fn control(tmp: &Path, extra: &[&str]) -> (Proc, String) {
    let db = tmp.join("control.db").to_string_lossy().into_owned();
    let mut args = vec!["--heartbeat-timeout", "600"];
    args.extend_from_slice(extra);
    start_control(tmp, &db, &args)
}

/// Processes whose command line is exactly `argv`.
fn processes(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            (cmdline == want).then_some(pid)
        })
        .collect()
}

/// Regression (issue 10): a node killed with `kill -9` and started again
/// within a second failed its runs ("the node restarted while the run was
/// active", attempts 1/3). Now a run the restarted node no longer has is
/// lost and queued again at once: with attempts left it runs again on the
/// restarted node and succeeds (attempt 2 of 3); with none left it stays
/// lost (1 of 1), not failed.
#[test]
fn a_node_restarted_at_once_retries_its_runs() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut control, url) = control(tmp.path(), &[]);
    let node_root = tmp.path().join("node");
    let mut node = start_node(&node_root, &url, "n1", 2, &agent, &[]);

    let retried = client_ok(
        &url,
        &["submit", "--attempts", "3", &image, "--", "sleep", "15"],
    );
    let once = client_ok(&url, &["submit", &image, "--", "sleep", "1236"]);
    for id in [&retried, &once] {
        wait_run(&url, id, "ran", |r| r["state"] == "running");
    }

    node.0.kill().expect("kill -9 the node");
    node.0.wait().expect("reap the node");
    let killed = Instant::now();
    let mut node = start_node(&node_root, &url, "n1", 2, &agent, &[]);
    eprintln!(
        "node restarted {} ms after kill -9",
        killed.elapsed().as_millis()
    );

    let r = wait_run(&url, &retried, "finished", |r| {
        matches!(
            r["state"].as_str(),
            Some("succeeded" | "failed" | "lost" | "cancelled")
        )
    });
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(r["max_attempts"], 3, "{r}");
    assert_eq!(r["node"], "n1", "{r}");
    assert_eq!(r["exit_code"], 0, "{r}");

    let r = wait_run(&url, &once, "ended", |r| r["state"] != "running");
    assert_eq!(r["state"], "lost", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    assert_eq!(
        r["error"], "the node restarted while the run was active",
        "{r}"
    );

    // The first node process's containers are gone, the second's idle
    // runner aside.
    assert!(processes(&["sleep", "1236"]).is_empty());
    node.stop();
    control.stop();
}

/// A node agent killed with `kill -9` and not restarted: its watchdog
/// destroys the run's container (and the runner's cgroup, mounts and
/// directory) at once, instead of leaving `sleep` running until the node
/// comes back.
#[test]
fn a_dead_nodes_containers_are_destroyed_by_its_watchdog() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut control, url) = control(tmp.path(), &[]);
    let node_root = tmp.path().join("node");
    let mut node = start_node(&node_root, &url, "n1", 2, &agent, &[]);

    // A duration no other test uses, to find the process by.
    let argv = ["sleep", "1237"];
    // With a recycling key: a plain run's node would also make a
    // never-used spare runner, and this test counts runners.
    let id = client_ok(
        &url,
        &[
            "submit",
            "--recycle-key",
            "faults",
            &image,
            "--",
            argv[0],
            argv[1],
        ],
    );
    wait_run(&url, &id, "ran", |r| r["state"] == "running");
    assert_eq!(processes(&argv).len(), 1, "the run's process");
    assert_eq!(runners(&node_root), 1);
    assert_eq!(runc_list(&node_root.join("runc")).len(), 1);

    node.0.kill().expect("kill -9 the node");
    node.0.wait().expect("reap the node");
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(60);
    while !processes(&argv).is_empty() || runners(&node_root) > 0 {
        assert!(
            Instant::now() < deadline,
            "a minute after kill -9: processes {:?}, {} runner(s)",
            processes(&argv),
            runners(&node_root)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "the container was gone {} ms after kill -9 of its node",
        killed.elapsed().as_millis()
    );
    assert_eq!(runc_list(&node_root.join("runc")), Vec::<String>::new());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*node_root.to_string_lossy()),
        "mounts left under the node's root"
    );
    // The root's lock is free again: a new node starts on it at once.
    let mut node = start_node(&node_root, &url, "n1", 2, &agent, &[]);
    let out = client_ok(&url, &["submit", "--wait", &image, "--", "echo", "back"]);
    assert_eq!(out, "back\n");
    node.stop();
    control.stop();
}

/// Regression (issue 10): the node token opened any node's work stream,
/// and with it every assignment's environment. A credential issued to a
/// node opens that node's endpoints only: node B's is refused (403) on
/// node A's work stream, registration, reports and logs; a real node runs
/// with its own; revoking one refuses it (401) and closes the work stream
/// it opened.
#[test]
fn node_credentials_open_only_their_own_node() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = tmp.path().join("control.db").to_string_lossy().into_owned();
    let (mut control, line) = start(
        tmp.path(),
        &[
            "control",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--client-token",
            CLIENT_TOKEN,
            "--require-node-credentials",
        ],
    );
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    let addr = url.trim_start_matches("http://").to_owned();
    let a = client_ok(&url, &["nodes", "token", "issue", "a"])
        .trim()
        .to_owned();
    let b = client_ok(&url, &["nodes", "token", "issue", "b"])
        .trim()
        .to_owned();
    assert_eq!(a.len(), 64);
    assert_ne!(a, b);

    let spec = |id: &str| format!(r#"{{"id":"{id}","slots":1}}"#);
    assert_eq!(
        http(&addr, "PUT", "/v1/nodes/a", Some(&a), &spec("a")).0,
        200
    );
    assert_eq!(
        http(&addr, "PUT", "/v1/nodes/b", Some(&b), &spec("b")).0,
        200
    );
    let report = r#"[{"run":1,"reports":[{"event":"started"}]}]"#;
    for (method, path, body) in [
        ("GET", "/v1/nodes/a/work", ""),
        ("PUT", "/v1/nodes/a", spec("a").as_str()),
        ("POST", "/v1/nodes/a/events", report),
        (
            "POST",
            "/v1/nodes/a/runs/1/events",
            r#"{"event":"started"}"#,
        ),
        ("POST", "/v1/nodes/a/runs/1/logs", "output"),
    ] {
        let (status, body) = http(&addr, method, path, Some(&b), body);
        assert_eq!(
            status, 403,
            "{method} {path} with node b's credential: {body}"
        );
        for token in [None, Some("not-a-credential"), Some(CLIENT_TOKEN)] {
            let (status, _) = http(&addr, method, path, token, "");
            assert_eq!(status, 401, "{method} {path} with {token:?}");
        }
    }
    // Issuing needs the client token.
    assert_eq!(
        http(&addr, "POST", "/v1/nodes/a/credentials", Some(&a), "").0,
        401
    );

    // Node b's own stream opens; revoking b's credential closes it.
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
    write!(
        stream,
        "GET /v1/nodes/b/work HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {b}\r\n\
         Connection: close\r\n\r\n"
    )
    .expect("write");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    assert!(status.contains(" 200 "), "{status}");
    let revoked = client_ok(&url, &["nodes", "token", "revoke", "b"]);
    assert!(revoked.contains("revoked 1"), "{revoked}");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    // The chunked body's last chunk (or the connection's end), not a
    // read timeout.
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .expect("the stream ends (not times out) after the revocation");
        if n == 0 || line == "0\r\n" {
            break;
        }
    }
    assert_eq!(
        http(&addr, "PUT", "/v1/nodes/b", Some(&b), &spec("b")).0,
        401
    );
    assert_eq!(
        http(&addr, "PUT", "/v1/nodes/a", Some(&a), &spec("a")).0,
        200
    );

    // A real node with its own credential runs runs.
    if let Some(agent) = static_agent() {
        let registry = registry_with(&["busybox"]);
        let image = format!("{}/ember/busybox:latest", registry.addr());
        let agent_s = agent.to_string_lossy().into_owned();
        let (mut node, _) = start(
            &tmp.path().join("node"),
            &[
                "node",
                "--control",
                &url,
                "--token",
                &a,
                "--id",
                "a",
                "--agent",
                &agent_s,
            ],
        );
        let out = client_ok(&url, &["submit", "--wait", &image, "--", "echo", "mine"]);
        assert_eq!(out, "mine\n");
        node.stop();
    } else {
        eprintln!("the real node part skipped: the static ember-agent could not be built");
    }
    control.stop();
}

/// A TCP proxy in front of the control plane for one node that can cut
/// the node off: while cut, bytes on open connections are dropped (as on
/// a dead link, nothing is closed) and new connections are refused; when
/// the link comes back, the connections that lived through the cut are
/// closed (their bytes are lost) and new ones pass.
struct CutProxy {
    addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl CutProxy {
    fn start(upstream: &str) -> CutProxy {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, t, up) = (cut.clone(), conns.clone(), upstream.to_owned());
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                if c.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let Ok(upc) = std::net::TcpStream::connect(&up) else {
                    continue;
                };
                let mut table = t.lock().expect("table");
                table.push(down.try_clone().expect("clone"));
                table.push(upc.try_clone().expect("clone"));
                for (mut from, mut to) in [
                    (
                        down.try_clone().expect("clone"),
                        upc.try_clone().expect("clone"),
                    ),
                    (upc, down),
                ] {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            if !c.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        if !c.load(Ordering::SeqCst) {
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        }
                    });
                }
            }
        });
        CutProxy { addr, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn heal(&self) {
        let mut conns = self.conns.lock().expect("table");
        for c in conns.drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A partition (issue 10): node n1 is cut off from the control plane for
/// longer than the heartbeat timeout while it runs a run; the run is lost
/// and retried on node n2; when n1's link comes back, n1 stops its copy
/// (its runner is destroyed, which a finished run's would not be), and the
/// run's result is n2's alone (n1's late exit is refused).
#[test]
fn a_cut_off_node_stops_the_runs_retried_elsewhere() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = tmp.path().join("control.db").to_string_lossy().into_owned();
    let (mut control, url) = start_control(
        tmp.path(),
        &db,
        // Heartbeats every second (below) against a 5 s timeout.
        &["--heartbeat-timeout", "5", "--keepalive", "1"],
    );
    let proxy = CutProxy::start(url.trim_start_matches("http://"));
    let n1_root = tmp.path().join("n1");
    let mut n1 = start_node(
        &n1_root,
        &format!("http://{}", proxy.addr),
        "n1",
        1,
        &agent,
        &["--heartbeat", "1"],
    );
    // Long enough that n1's copy is still running when its link is back.
    let id = client_ok(
        &url,
        // A recycling key, so that n1 makes no spare runner (the test
        // counts runners).
        &[
            "submit",
            "--attempts",
            "2",
            "--recycle-key",
            "faults",
            &image,
            "--",
            "sleep",
            "40",
        ],
    );
    let r = wait_run(&url, &id, "ran", |r| r["state"] == "running");
    assert_eq!(r["node"], "n1", "{r}");
    assert_eq!(runners(&n1_root), 1);

    proxy.cut();
    let mut n2 = start_node(
        &tmp.path().join("n2"),
        &url,
        "n2",
        1,
        &agent,
        &["--heartbeat", "1"],
    );
    let r = wait_run(&url, &id, "was retried on n2", |r| {
        r["state"] == "running" && r["node"] == "n2"
    });
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(runners(&n1_root), 1, "n1 still runs its copy, cut off");

    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(120);
    while runners(&n1_root) > 0 {
        assert!(
            Instant::now() < deadline,
            "n1 never stopped the run it no longer owns"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = wait_run(&url, &id, "finished", |r| r["state"] != "running");
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["node"], "n2", "{r}");
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(r["exit_code"], 0, "{r}");
    n1.stop();
    n2.stop();
    control.stop();
}
