//! The `/ui` dashboard's files and its `GET /v1/overview`, in process:
//! the files are served without a token, the data only with the client
//! token, the overview's phases and warm counts are right, and every
//! field it sends is in the OpenAPI document. (The page itself is tested
//! in a real browser by `crates/ember/tests/observe_cli.rs`.)

use std::sync::Arc;

use ember_api::client::ControlClient;
use ember_api::wire::NodeEvents;
use ember_control::model::{DeploymentSpec, Inventory, NodeReport, NodeSpec, PinnedImage, RunSpec};
use ember_control::sqlite::SqliteStore;
use ember_control::store::SystemClock;
use ember_controld::server::{ServerConfig, serve};

/// Every key of `value` is a property of the schema at `pointer`.
fn documented(doc: &serde_json::Value, pointer: &str, value: &serde_json::Value) {
    let props = doc
        .pointer(pointer)
        .and_then(|s| s["properties"].as_object())
        .unwrap_or_else(|| panic!("no schema at {pointer}"));
    for k in value.as_object().expect("an object").keys() {
        assert!(
            props.contains_key(k),
            "{pointer}: {k:?} is sent but not documented"
        );
    }
}

#[tokio::test]
async fn dashboard_files_are_public_and_its_overview_is_not() {
    let store = Arc::new(SqliteStore::open_in_memory(Arc::new(SystemClock)).expect("store"));
    let mut config = ServerConfig::new();
    config.client_token = Some("c".into());
    config.node_token = Some("n".into());
    // Nothing listens there: the overview says why the figures are missing.
    config.cache_url = Some("http://127.0.0.1:1".into());
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

    for (path, kind, needle) in [
        ("/ui", "text/html", "/ui/app.js"),
        ("/ui/app.js", "text/javascript", "/v1/overview"),
        ("/ui/style.css", "text/css", ".histogram"),
    ] {
        let resp = http.get(format!("{url}{path}")).send().await.expect("get");
        assert_eq!(resp.status(), 200, "{path}");
        let ct = resp.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        assert!(resp.text().await.expect("body").contains(needle), "{path}");
    }
    let refused = http
        .get(format!("{url}/v1/overview"))
        .send()
        .await
        .expect("get");
    assert_eq!(refused.status(), 401);

    let image = PinnedImage::new("busybox", format!("sha256:{}", "ab".repeat(32))).expect("pin");
    let deployment: DeploymentSpec = serde_json::from_value(serde_json::json!({
        "name": "web", "image": image, "command": ["true"], "warm_runners": 2
    }))
    .expect("a deployment");
    c.deploy(&deployment).await.expect("deploy");
    // The node has one idle runner of the deployment's warm key.
    let mut inventory = Inventory::default();
    inventory.idle_runners.insert(deployment.warm_key(), 1);
    n.put_node(&NodeSpec {
        id: "n1".into(),
        slots: 1,
        labels: Default::default(),
        inventory,
    })
    .await
    .expect("register");
    let mut work = n.work("n1").await.expect("work stream");
    let first = c
        .submit(
            &RunSpec {
                image: Some(image),
                command: vec!["true".into()],
                ..RunSpec::default()
            },
            None,
        )
        .await
        .expect("submit");
    // Wait for the assignment, then start it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while c.run(first.run.id).await.expect("run").node.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never assigned");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    n.report_events(
        "n1",
        first.run.id,
        &NodeEvents::Many(vec![
            NodeReport::ImageReady,
            NodeReport::RunnerReady,
            NodeReport::Started,
        ]),
    )
    .await
    .expect("reports");
    drop(work.chunk().await);

    let get = |q: &'static str| {
        http.get(format!("{url}/v1/overview{q}"))
            .bearer_auth("c")
            .send()
    };
    let v: serde_json::Value = get("")
        .await
        .expect("get")
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).expect("JSON"))
        .expect("body");
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json");
    documented(&doc, "/components/schemas/Overview", &v);
    let run = &v["runs"][0];
    documented(
        &doc,
        "/components/schemas/Overview/properties/runs/items",
        run,
    );
    assert_eq!(run["id"], first.run.id.0);
    assert_eq!(run["state"], "running");
    let names: Vec<&str> = run["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| p[0].as_str().expect("a name"))
        .collect();
    assert_eq!(
        names,
        [
            "queue",
            "placement",
            "image",
            "restore",
            "runner",
            "cache_restore",
            "process",
            "total"
        ]
    );
    assert!(run["phases"][7][1].is_u64(), "total known: {run}");
    let d = &v["deployments"][0];
    documented(
        &doc,
        "/components/schemas/Overview/properties/deployments/items",
        d,
    );
    assert_eq!(
        (&d["name"], &d["warm_runners"], &d["idle_runners"]),
        (&"web".into(), &2.into(), &1.into())
    );
    documented(
        &doc,
        "/components/schemas/Overview/properties/cache",
        &v["cache"],
    );
    assert!(
        v["cache"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("metrics")),
        "{v}"
    );
    // Filters.
    let none: serde_json::Value = get("?state=failed")
        .await
        .expect("get")
        .bytes()
        .await
        .map(|b| serde_json::from_slice(&b).expect("JSON"))
        .expect("body");
    assert_eq!(none["runs"].as_array().map(Vec::len), Some(0));
    let bad = get("?state=nope").await.expect("get");
    assert_eq!(bad.status(), 400);
    let _ = stop.send(());
}
