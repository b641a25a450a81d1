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

    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open_in_memory(Arc::new(SystemClock)).expect("store"));
    let mut config = ServerConfig::new(tmp.path().join("logs"));
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
    let _ = ember_controld::client::ControlClient::new(&base, None).expect("client");
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
    assert_eq!(operations, 12, "every route is documented once");
    let _ = tx.send(());
}
