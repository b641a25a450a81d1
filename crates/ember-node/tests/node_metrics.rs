//! The node's own `/metrics` (`NodeAgentConfig::metrics_listen`), scraped
//! and read with a Prometheus text-format parser (`prometheus-parse`)
//! after the real node agent ran two runs of one recycling key, pulled
//! from a real registry, on real runc: one pull, one runner created (a
//! miss) and reused (a hit), the image's bytes in the store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ember_api::client::ControlClient;
use ember_control::model::{PinnedImage, RunId, RunSpec, RunState};
use ember_control::sqlite::SqliteStore;
use ember_control::store::SystemClock;
use ember_controld::server::{ServerConfig, serve};
use ember_node::{NodeAgentConfig, run_node};
use ember_testkit::{fixtures, registry::Registry};
use prometheus_parse::{Scrape, Value};

fn static_agent() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/x86_64-unknown-linux-gnu/release/ember-agent");
    p.exists().then_some(p)
}

/// The value of the sample `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = s
        .samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)));
    match found.map(|x| &x.value) {
        Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
        other => panic!("{name}{labels:?}: {other:?}"),
    }
}

async fn wait_final(c: &ControlClient, id: RunId) -> RunState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let run = c.run(id).await.expect("run");
        if run.state.is_final() {
            assert_eq!(run.state, RunState::Succeeded, "{run:?}");
            return run.state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run never ended: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn node_metrics_show_pulls_warm_hits_runners_and_store() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: build the static agent (crates/ember-agent/build-static.sh)");
        return;
    };
    let registry = Registry::start().expect("registry");
    let fixture = fixtures::build_cached("busybox").expect("fixture");
    fixtures::push(&fixture, &registry.url(), "ember/busybox", "latest")
        .await
        .expect("push");
    let image = PinnedImage::new(
        format!("{}/ember/busybox:latest", registry.addr()),
        fixture.root.digest.to_string(),
    )
    .expect("pin");

    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open_in_memory(Arc::new(SystemClock)).expect("store"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        store,
        Arc::new(SystemClock),
        ServerConfig::new(),
        async {
            let _ = server_stopped.await;
        },
    ));
    // A free port for the node's listener.
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let (stop_node, node_stopped) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(run_node(
        NodeAgentConfig {
            control: url.clone(),
            token: None,
            id: "m1".into(),
            slots: 1,
            root: tmp.path().join("node"),
            cache: None,
            dircache: None,
            dircache_token: None,
            agent,
            labels: Default::default(),
            heartbeat: Duration::from_secs(1),
            watchdog: None,
            metrics_listen: Some(metrics_addr),
            criu: None,
            snapshot_spares: 0,
            prepull: Default::default(),
        },
        async {
            let _ = node_stopped.await;
        },
    ));

    let c = ControlClient::new(&url, None).expect("client");
    let spec = RunSpec {
        image: Some(image),
        command: vec!["true".into()],
        recycle_key: Some("metrics-test".into()),
        ..RunSpec::default()
    };
    for _ in 0..2 {
        let id = c.submit(&spec, None).await.expect("submit").run.id;
        wait_final(&c, id).await;
    }

    let http = reqwest::Client::new();
    let resp = http
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain; version=0.0.4")
    );
    let text = resp.text().await.expect("body");
    let s = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("a valid exposition");
    let m1 = [("node", "m1")];
    assert_eq!(value(&s, "ember_node_slots", &m1), 1.0, "{text}");
    assert_eq!(value(&s, "ember_node_pulls_total", &m1), 1.0, "{text}");
    assert_eq!(value(&s, "ember_node_pulls_in_flight", &m1), 0.0, "{text}");
    assert_eq!(
        value(&s, "ember_node_warm_pool_misses_total", &m1),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(&s, "ember_node_warm_pool_hits_total", &m1),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &s,
            "ember_node_runners",
            &[("node", "m1"), ("state", "busy")]
        ),
        0.0,
        "{text}"
    );
    let idle = value(
        &s,
        "ember_node_runners",
        &[("node", "m1"), ("state", "idle")],
    ) + value(
        &s,
        "ember_node_runners",
        &[("node", "m1"), ("state", "frozen")],
    );
    assert_eq!(idle, 1.0, "the recycled runner is idle: {text}");
    assert!(value(&s, "ember_node_store_bytes", &m1) > 0.0, "{text}");
    assert!(
        value(&s, "ember_node_store_free_bytes", &m1) > 0.0,
        "{text}"
    );

    let _ = stop_node.send(());
    node.await.expect("node task").expect("node");
    let _ = stop_server.send(());
}
