//! The checked-in OpenAPI document (`openapi.json`) against the server:
//! every operation it lists is served (neither an unknown path nor a
//! wrong method), with the token its security scheme names, and every
//! error it can return has the documented `{error, message}` shape.

use std::sync::Arc;

use ember_control::sqlite::SqliteStore;
use ember_control::store::SystemClock;
use ember_controld::server::{ServerConfig, serve};

#[tokio::test]
async fn every_documented_operation_is_served() {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json is JSON");
    assert_eq!(doc["openapi"], "3.0.3");

    let store = Arc::new(SqliteStore::open_in_memory(Arc::new(SystemClock)).expect("store"));
    let mut config = ServerConfig::new();
    config.client_token = Some("c".into());
    config.node_token = Some("n".into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        store,
        Arc::new(SystemClock),
        config,
        async {
            let _ = rx.await;
        },
    ));

    // Installs the process's TLS crypto provider, which a bare
    // `reqwest::Client::new()` needs (reqwest is built without a default).
    let _ = ember_api::client::ControlClient::new(&base, None).expect("client");
    let http = reqwest::Client::new();
    let mut operations = 0;
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("operations") {
            operations += 1;
            let scheme = op["security"][0]
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .expect("a security scheme");
            let token = if scheme == "client" { "c" } else { "n" };
            let url = format!(
                "{base}{}",
                path.replace("{id}", "1")
                    .replace("{node}", "n1")
                    .replace("{run}", "1")
                    .replace("{name}", "web")
            );
            let method =
                reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            // Streaming endpoints stay open: only the head matters here.
            let resp = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                http.request(method.clone(), &url)
                    .bearer_auth(token)
                    .body("{}")
                    .send(),
            )
            .await
            .expect("an answer")
            .expect("send");
            let status = resp.status().as_u16();
            assert_ne!(status, 405, "{method} {path}: not served");
            assert_ne!(
                status, 401,
                "{method} {path}: token of scheme {scheme} refused"
            );
            if status >= 400 {
                let body: serde_json::Value =
                    serde_json::from_slice(&resp.bytes().await.expect("body"))
                        .unwrap_or_else(|e| panic!("{method} {path}: error body not JSON: {e}"));
                let message = body["message"].as_str().expect("message");
                assert!(
                    !message.starts_with("no such endpoint"),
                    "{method} {path}: not served"
                );
                assert!(body["error"].is_string(), "{method} {path}: {body}");
                let documented = op["responses"]
                    .as_object()
                    .expect("responses")
                    .contains_key(&status.to_string());
                assert!(documented, "{method} {path}: {status} is not documented");
            }
        }
    }
    assert_eq!(operations, 18, "every route is documented once");
    let _ = tx.send(());
}

async fn json(resp: reqwest::Response) -> serde_json::Value {
    serde_json::from_slice(&resp.bytes().await.expect("body")).expect("a JSON body")
}

/// The property names a schema documents (through `$ref` and `allOf`).
fn documented(doc: &serde_json::Value, schema: &serde_json::Value) -> Vec<String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return documented(doc, &doc["components"]["schemas"][name]);
    }
    let mut names: Vec<String> = schema["properties"]
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        names.extend(documented(doc, part));
    }
    names
}

/// Every field of `value` is a documented property of `schema`.
fn assert_documented(
    doc: &serde_json::Value,
    what: &str,
    schema: &serde_json::Value,
    value: &serde_json::Value,
) {
    let names = documented(doc, schema);
    for key in value.as_object().expect("an object").keys() {
        assert!(
            names.contains(key),
            "{what}: field {key:?} is sent but not documented (documented: {names:?}); value {value}"
        );
    }
}

/// What the server really sends, field by field, against the document: a
/// field added to the model (or a new work message) without documenting it
/// fails here.
#[tokio::test]
async fn documented_schemas_cover_what_the_server_sends() {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json is JSON");
    let schema = |name: &str| doc["components"]["schemas"][name].clone();

    let store = Arc::new(SqliteStore::open_in_memory(Arc::new(SystemClock)).expect("store"));
    let mut config = ServerConfig::new();
    config.keepalive = std::time::Duration::from_millis(100);
    // A plan keeping the image the node holds follows its run's submit.
    config.prepull_interval = Some(std::time::Duration::from_millis(100));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        store,
        Arc::new(SystemClock),
        config,
        async {
            let _ = rx.await;
        },
    ));
    let _ = ember_api::client::ControlClient::new(&base, None).expect("client");
    let http = reqwest::Client::new();
    let digest = format!("sha256:{}", "ab".repeat(32));
    let send = |method: reqwest::Method, path: &str, body: serde_json::Value| {
        http.request(method, format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    let get = |path: &str| http.get(format!("{base}{path}")).send();

    // It holds the image its run uses, so its pull plan keeps it.
    let node = serde_json::json!({
        "id": "n1", "slots": 2, "labels": {"zone": "a"},
        "inventory": {"images": {digest.clone(): 10}, "idle_runners": {}, "free_disk_bytes": 1,
                      "image_layers": {digest.clone(): [{"diff_id": "sha256:layer", "bytes": 10}]}}
    });
    let resp = send(reqwest::Method::PUT, "/v1/nodes/n1", node)
        .await
        .expect("put");
    assert!(resp.status().is_success());
    let mut work = get("/v1/nodes/n1/work").await.expect("work");
    let mut buf = Vec::new();
    let mut next_line = async || -> serde_json::Value {
        loop {
            if let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                return serde_json::from_slice(&line).expect("a JSON line");
            }
            let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), work.chunk())
                .await
                .expect("a line within 10 s")
                .expect("chunk")
                .expect("open");
            buf.extend_from_slice(&chunk);
        }
    };
    let types = doc["components"]["schemas"]["WorkMessage"]["properties"]["type"]["enum"].clone();
    let mut seen = std::collections::BTreeSet::new();
    let check_line = |line: &serde_json::Value| -> String {
        assert!(
            types.as_array().expect("enum").contains(&line["type"]),
            "work message type {} is not documented",
            line["type"]
        );
        assert_documented(&doc, "WorkMessage", &schema("WorkMessage"), line);
        line["type"].as_str().expect("type").to_owned()
    };

    let deployment = serde_json::json!({
        "name": "web", "image": {"reference": "app", "digest": digest},
        "command": ["true"], "env": {"K": "V"},
        "resources": {"cpu_millis": 500, "memory_bytes": 1048576},
        "recycle_key": "k", "warm_runners": 1, "node_selector": {"zone": "a"}
    });
    let resp = send(reqwest::Method::POST, "/v1/deployments", deployment)
        .await
        .expect("deploy");
    assert_eq!(resp.status().as_u16(), 201);
    let d = json(resp).await;
    assert_documented(&doc, "Deployment", &schema("Deployment"), &d);
    assert_documented(
        &doc,
        "Resources",
        &schema("DeploymentSpec")["properties"]["resources"],
        &d["resources"],
    );

    let resp = send(
        reqwest::Method::POST,
        "/v1/runs",
        serde_json::json!({"deployment": "web", "timeout_ms": 1000, "max_attempts": 2}),
    )
    .await
    .expect("submit");
    let submitted = json(resp).await;
    assert_documented(
        &doc,
        "SubmitResponse",
        &schema("SubmitResponse"),
        &submitted,
    );
    let id = submitted["run"]["id"].as_i64().expect("id");

    // active, prewarm (the node has room, the deployment wants one),
    // assign, pull_plan (keeping the image the node holds), then
    // keepalives while nothing happens.
    while seen.len() < 5 {
        let line = next_line().await;
        seen.insert(check_line(&line));
    }
    for t in ["active", "pull_plan", "prewarm", "assign", "keepalive"] {
        assert!(seen.contains(t), "no {t} line among {seen:?}");
    }
    for event in [r#"{"event":"accepted"}"#, r#"{"event":"started"}"#] {
        let resp = http
            .post(format!("{base}/v1/nodes/n1/runs/{id}/events"))
            .body(event)
            .send()
            .await
            .expect("report");
        assert!(resp.status().is_success());
    }
    let resp = http
        .post(format!("{base}/v1/nodes/n1/runs/{id}/logs?stream=stderr"))
        .body(vec![0u8, 0xff])
        .send()
        .await
        .expect("log");
    assert_eq!(resp.status().as_u16(), 204);
    let resp = send(
        reqwest::Method::POST,
        &format!("/v1/runs/{id}/cancel"),
        serde_json::json!({}),
    )
    .await
    .expect("cancel");
    assert!(resp.status().is_success());
    loop {
        let line = next_line().await;
        check_line(&line);
        if line["type"] == "cancel" {
            break;
        }
    }

    // The batch endpoint: the cancelled run's report is refused, in its
    // result.
    let resp = send(
        reqwest::Method::POST,
        "/v1/nodes/n1/events",
        serde_json::json!([{"run": id, "reports": [{"event": "started"}]}]),
    )
    .await
    .expect("batch");
    assert!(resp.status().is_success());
    let results = json(resp).await;
    assert_documented(&doc, "EventResults", &schema("EventResults"), &results);
    assert_documented(
        &doc,
        "EventResult",
        &schema("EventResult"),
        &results["results"][0],
    );
    assert_eq!(results["results"][0]["error"]["error"], "conflict");

    let run = json(get(&format!("/v1/runs/{id}")).await.expect("run")).await;
    assert_documented(&doc, "Run", &schema("Run"), &run);
    assert_documented(
        &doc,
        "Run.times",
        &schema("Run")["properties"]["times"],
        &run["times"],
    );
    let page = json(get("/v1/runs?limit=1").await.expect("runs")).await;
    assert_documented(&doc, "RunPage", &schema("RunPage"), &page);
    assert!(
        page["next_cursor"].is_string(),
        "a full page has a cursor: {page}"
    );
    assert_documented(&doc, "Run", &schema("Run"), &page["runs"][0]);
    let nodes = json(get("/v1/nodes").await.expect("nodes")).await;
    assert_documented(&doc, "Node", &schema("Node"), &nodes[0]);
    assert_documented(
        &doc,
        "Inventory",
        &schema("Inventory"),
        &nodes[0]["inventory"],
    );
    let logs = get(&format!("/v1/runs/{id}/logs"))
        .await
        .expect("logs")
        .bytes()
        .await
        .expect("body");
    let record: serde_json::Value =
        serde_json::from_slice(logs.split(|&b| b == b'\n').next().expect("a line")).expect("JSON");
    assert_documented(&doc, "LogRecord", &schema("LogRecord"), &record);
    assert_eq!(record["data"], "AP8=", "raw bytes, base64");

    // A node holding a checkpoint of a deployment that is not there (and
    // of one that is, "web", but without snapshots) is told to drop both;
    // once "snap" is a live snapshot deployment, its checkpoint is kept.
    let snap = serde_json::json!({
        "name": "snap", "image": {"reference": "app", "digest": digest},
        "command": ["true"], "snapshot": true
    });
    let resp = send(reqwest::Method::POST, "/v1/deployments", snap)
        .await
        .expect("deploy");
    assert_eq!(resp.status().as_u16(), 201);
    let holder = serde_json::json!({
        "id": "n9", "slots": 0,
        "inventory": {"snapshots": ["d.gone.0123456789abcdef", "d.web.0123456789abcdef",
                                    "d.snap.0123456789abcdef"]}
    });
    let answer = json(
        send(reqwest::Method::PUT, "/v1/nodes/n9", holder.clone())
            .await
            .expect("put"),
    )
    .await;
    assert_documented(&doc, "NodeAnswer", &schema("NodeAnswer"), &answer);
    assert_eq!(
        answer["stale_snapshots"],
        serde_json::json!(["d.gone.0123456789abcdef", "d.web.0123456789abcdef"])
    );
    let resp = http
        .delete(format!("{base}/v1/deployments/snap"))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status().as_u16(), 200);
    assert_documented(&doc, "Deployment", &schema("Deployment"), &json(resp).await);
    let answer = json(
        send(reqwest::Method::PUT, "/v1/nodes/n9", holder)
            .await
            .expect("put"),
    )
    .await;
    assert_eq!(answer["stale_snapshots"].as_array().map(Vec::len), Some(3));
    let _ = tx.send(());
}

/// What the node endpoints' document says the server refuses, it refuses,
/// with the status the document gives: the rules a schema cannot state
/// (the body's node id is the path's) or that the fuzzer found loose.
#[tokio::test]
async fn node_endpoints_refuse_as_documented() {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json is JSON");
    let store = Arc::new(SqliteStore::open_in_memory(Arc::new(SystemClock)).expect("store"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        store,
        Arc::new(SystemClock),
        ServerConfig::new(),
        async {
            let _ = rx.await;
        },
    ));
    let _ = ember_api::client::ControlClient::new(&base, None).expect("client");
    let http = reqwest::Client::new();
    let send = async |method: reqwest::Method, path: &str, body: &str| {
        let resp = http
            .request(method, format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("send");
        let status = resp.status().as_u16();
        (status, json(resp).await)
    };

    // Another node's body on this node's path: 409 with the error object,
    // documented as such, and nothing stored.
    let (status, body) = send(
        reqwest::Method::PUT,
        "/v1/nodes/n1",
        r#"{"id":"n2","slots":1}"#,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "conflict");
    assert!(
        doc["paths"]["/v1/nodes/{id}"]["put"]["responses"]["409"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("not the path's")),
        "the 409 is documented as the id mismatch"
    );
    let (_, nodes) = send(reqwest::Method::GET, "/v1/nodes", "").await;
    assert_eq!(nodes, serde_json::json!([]), "a refused PUT stores nothing");

    // A batch entry the document refuses (no reports, a run id below 1)
    // refuses the whole request, not only its entry inside a 200.
    for batch in [
        r#"[{"run":1,"reports":[]}]"#,
        r#"[{"run":0,"reports":[{"event":"started"}]}]"#,
        r#"[{"run":1,"reports":[{"event":"started"}]},{"run":2,"reports":[]}]"#,
    ] {
        let (status, body) = send(reqwest::Method::POST, "/v1/nodes/n1/events", batch).await;
        assert_eq!(status, 400, "{batch}: {body}");
        assert_eq!(body["error"], "bad_request");
    }
    // A run path parameter outside the documented pattern is a 400.
    let pattern = doc["paths"]["/v1/nodes/{node}/runs/{run}/events"]["post"]["parameters"][1]
        ["schema"]["pattern"]
        .as_str()
        .expect("a pattern on {run}");
    assert_eq!(pattern, "^(run-)?[0-9]{1,18}$");
    let (status, _) = send(
        reqwest::Method::POST,
        "/v1/nodes/n1/runs/x7/events",
        r#"{"event":"started"}"#,
    )
    .await;
    assert_eq!(status, 400);
    // The connection cap's refusal code is one the document lists.
    let codes = &doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"];
    assert!(
        codes
            .as_array()
            .expect("enum")
            .contains(&serde_json::json!("unavailable")),
        "{codes}"
    );
    let _ = tx.send(());
}
