//! Upstream auth: the bearer-token flow with the cache's own credentials,
//! credentials never sent to another upstream, and a private upstream's
//! content only for clients presenting its credentials.

// Helpers outside #[test] functions panic on surprises too.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ember_registry::{Credential, Credentials};

fn creds(host: &str) -> Credentials {
    let mut c = Credentials::none();
    c.insert(
        host,
        Credential {
            username: "alice".into(),
            password: "secret".into(),
        },
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_upstream_needs_client_credentials_and_keeps_its_content() {
    let private = Fake::start().await;
    private.state.lock().unwrap().token_auth = Some(("alice".into(), "secret".into()));
    let data = blob(9, 200_000);
    let d = private.add_blob(data.clone(), Mode::Normal);
    let m = manifest(&(d.clone(), data.len()), &[]);
    private.add_manifest("v", m.clone(), "application/vnd.oci.image.manifest.v1+json");
    let public = Fake::start().await;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        dir.path(),
        1 << 30,
        &[&private.url(), &format!("pub.io={}", public.url())],
    );
    cfg.credentials = creds(&private.host());
    let cache = start_cache_with(cfg, dir).await;
    let c = cache.url();
    let good = format!("Basic {}", base64(b"alice:secret"));
    let bad = format!("Basic {}", base64(b"alice:wrong"));

    // No or wrong credentials: 401 with a Basic challenge, before anything
    // goes upstream.
    for auth in [None, Some(bad.as_str())] {
        for url in [
            format!("{c}/v2/"),
            format!("{c}/v2/team/app/manifests/v"),
            format!("{c}/v2/team/app/blobs/{d}"),
        ] {
            let h: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
            let (s, hdrs, body) = get_with(&url, &h).await;
            assert_eq!(s, 401, "{url}");
            assert!(
                hdrs["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Basic")
            );
            if !url.ends_with("/v2/") {
                assert_eq!(oci_code(&body.unwrap()), "UNAUTHORIZED");
            }
        }
    }
    assert_eq!(private.requests("GET", "/v2/team"), 0);

    // With them: the cache does the token flow with its own credential.
    let auth = [("authorization", good.as_str())];
    let (s, _, body) = get_with(&format!("{c}/v2/team/app/manifests/v"), &auth).await;
    assert_eq!(s, 200);
    assert_eq!(body.unwrap(), m);
    let (s, _, body) = get_with(&format!("{c}/v2/team/app/blobs/{d}"), &auth).await;
    assert_eq!(s, 200);
    assert_eq!(body.unwrap(), data);
    let log = private.log();
    let token_req = log
        .iter()
        .find(|(_, p, _, _)| p == "/token")
        .expect("token request");
    assert_eq!(token_req.3.as_deref(), Some(good.as_str()));
    assert!(
        log.iter()
            .any(|(_, p, _, a)| p.contains("/blobs/") && a.as_deref() == Some("Bearer good-token"))
    );

    // The public upstream never sees a credential, and the private blob is
    // not served through it (it does not have it).
    let (s, _, _) = get(&format!("{c}/v2/pub.io/team/app/blobs/{d}")).await;
    assert_eq!(s, 404);
    let (s, _, _) = get(&format!("{c}/v2/team/app/blobs/{d}?ns=pub.io")).await;
    assert_eq!(s, 404);
    assert!(
        public.log().iter().all(|(_, _, _, a)| a.is_none()),
        "{:?}",
        public.log()
    );
    assert!(!public.log().is_empty());
    // Once the public upstream has it too, its clients get it.
    public.add_blob(data.clone(), Mode::Normal);
    let (s, _, body) = get(&format!("{c}/v2/pub.io/team/app/blobs/{d}")).await;
    assert_eq!(s, 200);
    assert_eq!(body.unwrap(), data);
    cache.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_can_mark_an_authenticated_upstream_public() {
    let private = Fake::start().await;
    private.state.lock().unwrap().token_auth = Some(("alice".into(), "secret".into()));
    let data = blob(10, 50_000);
    let d = private.add_blob(data.clone(), Mode::Normal);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 30, &[&private.url()]);
    cfg.credentials = creds(&private.host());
    cfg.public = vec![private.host()];
    let cache = start_cache_with(cfg, dir).await;
    let (s, _, body) = get(&format!("{}/v2/team/app/blobs/{d}", cache.url())).await;
    assert_eq!(s, 200);
    assert_eq!(body.unwrap(), data);
    cache.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_cache_credentials_are_reported_as_denied() {
    let private = Fake::start().await;
    private.state.lock().unwrap().token_auth = Some(("alice".into(), "secret".into()));
    let d = private.add_blob(blob(11, 1000), Mode::Normal);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 30, &[&private.url()]);
    let mut c = Credentials::none();
    c.insert(
        &private.host(),
        Credential {
            username: "alice".into(),
            password: "nope".into(),
        },
    );
    cfg.credentials = c;
    cfg.public = vec![private.host()];
    let cache = start_cache_with(cfg, dir).await;
    let (s, _, body) = get(&format!("{}/v2/team/app/blobs/{d}", cache.url())).await;
    assert_eq!(s, 502);
    assert_eq!(oci_code(&body.unwrap()), "DENIED");
    cache.stop().await;
}

/// The cache's upstream is the node's registry client, so the realm fix
/// holds here too: a real `docker-registry` with token auth whose realm
/// carries a query string, the cache's own credential sent to the token
/// service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_realm_with_a_query_string() {
    use ember_testkit::registry::Registry;
    use ember_testkit::token::{SERVICE, TokenServer};
    let open = Registry::start().unwrap();
    let fx = ember_testkit::fixtures::build_cached("busybox").unwrap();
    ember_testkit::fixtures::push(&fx, &open.url(), "ember/busybox", "latest")
        .await
        .unwrap();
    let token = TokenServer::start().unwrap();
    let realm = format!("{}/token?service={SERVICE}&foo=bar", token.url());
    let reg = Registry::start_token_auth(&open.storage_dir(), &token, &realm).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 30, &[&reg.url()]);
    let mut c = Credentials::none();
    c.insert(
        &reg.addr(),
        Credential {
            username: "alice".into(),
            password: "s3cret".into(),
        },
    );
    cfg.credentials = c;
    cfg.public = vec![reg.addr()];
    let cache = start_cache_with(cfg, dir).await;
    let (s, _, body) = get(&format!(
        "{}/v2/ember/busybox/manifests/latest",
        cache.url()
    ))
    .await;
    assert_eq!(s, 200);
    let m: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    let (s, _, body) = get(&format!("{}/v2/ember/busybox/blobs/{layer}", cache.url())).await;
    assert_eq!(s, 200);
    assert_eq!(sha256(&body.unwrap()), layer);

    let reqs = token.requests();
    assert!(!reqs.is_empty());
    for e in &reqs {
        assert_eq!(e["foo"], serde_json::json!(["bar"]), "{e}");
        assert_eq!(
            e["scope"],
            serde_json::json!(["repository:ember/busybox:pull"]),
            "{e}"
        );
        assert_eq!(e["user"], "alice", "{e}");
        assert_eq!(e["status"], 200, "{e}");
    }
    cache.stop().await;
}
