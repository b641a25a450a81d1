//! The registry client against a real `docker-registry`: the bearer flow
//! through a token service whose realm carries its own query string, and a
//! mirror that breaks a blob body half-way (the rest must come from the
//! origin).
//!
//! Skips (passing, with a message) only when `docker-registry`, `openssl`
//! or `python3` is not installed.

// Test code: a panic is the right answer to any surprise.
#![allow(clippy::unwrap_used)]

use ember_oci::{Digest, Reference};
use ember_registry::{RegistryClient, RegistryOptions};
use ember_testkit::fixtures::{self, BlobKind};
use ember_testkit::proxy::CuttingMirror;
use ember_testkit::registry::Registry;
use ember_testkit::token::{SERVICE, TokenServer};
use std::process::{Command, Stdio};
use std::time::Duration;

fn installed(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A registry with the busybox fixture as `ember/busybox:latest`, and the
/// fixture's layer (digest, size).
async fn origin() -> (Registry, Digest, u64) {
    let reg = Registry::start().unwrap();
    let fx = fixtures::build_cached("busybox").unwrap();
    fixtures::push(&fx, &reg.url(), "ember/busybox", "latest")
        .await
        .unwrap();
    let layer = fx.blobs.iter().find(|b| b.kind == BlobKind::Layer).unwrap();
    (reg, layer.digest.parse().unwrap(), layer.size)
}

/// Reads a whole blob stream and returns (bytes read, digest matched).
async fn read_blob(c: &RegistryClient, r: &Reference, d: &Digest) -> (u64, bool) {
    let mut s = c.blob(r, d).await.unwrap();
    let mut v = d.verifier();
    while let Some(chunk) = s.next_chunk().await.unwrap() {
        v.update(&chunk);
    }
    let n = v.len();
    (n, v.finish().is_ok())
}

/// Regression: the client built `{realm}?scope=...` even when the realm
/// already had a query string, so the token service got no scope (a token
/// for nothing) and every pull from such a registry failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_realm_with_its_own_query_string() {
    if !installed("docker-registry", "--version")
        || !installed("openssl", "version")
        || !installed("python3", "--version")
    {
        eprintln!("SKIP: needs docker-registry, openssl and python3");
        return;
    }
    let (open, layer, size) = origin().await;
    let token = TokenServer::start().unwrap();
    let realm = format!("{}/token?service={SERVICE}&foo=bar", token.url());
    let reg = Registry::start_token_auth(&open.storage_dir(), &token, &realm).unwrap();
    let r: Reference = format!("{}/ember/busybox:latest", reg.addr())
        .parse()
        .unwrap();

    let c = RegistryClient::new(RegistryOptions::default()).unwrap();
    let m = c.manifest(&r, "latest").await.unwrap();
    assert_eq!(
        m.media_type,
        ember_oci::media::OCI_MANIFEST,
        "{:?}",
        m.media_type
    );
    let (n, ok) = read_blob(&c, &r, &layer).await;
    assert_eq!((n, ok), (size, true));

    let reqs = token.requests();
    assert!(!reqs.is_empty(), "no token request");
    for e in &reqs {
        assert_eq!(e["path"], "/token", "{e}");
        // The realm's own parameters arrive intact, next to ours.
        assert_eq!(e["foo"], serde_json::json!(["bar"]), "{e}");
        assert!(
            e["scope"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == "repository:ember/busybox:pull"),
            "{e}"
        );
        assert_eq!(e["status"], 200, "{e}");
    }
    // One token for the repository, reused for the manifest and the blob.
    assert_eq!(reqs.len(), 1, "{reqs:?}");
}

/// A mirror that sends the status line and full Content-Length of a blob
/// but closes after half the body: the client continues the same stream
/// from the origin with a Range request, so the caller sees one whole,
/// correct body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_cut_mid_blob_continues_from_the_origin() {
    if !installed("docker-registry", "--version") {
        eprintln!("SKIP: needs docker-registry");
        return;
    }
    let (reg, layer, size) = origin().await;
    let mirror = CuttingMirror::start(&reg.addr(), 4096).unwrap();
    let r: Reference = format!("{}/ember/busybox:latest", reg.addr())
        .parse()
        .unwrap();
    let c = RegistryClient::new(RegistryOptions {
        mirrors: vec![mirror.url()],
        ..Default::default()
    })
    .unwrap();
    let (n, ok) = read_blob(&c, &r, &layer).await;
    assert_eq!(mirror.cuts(), 1, "the mirror did not cut the blob");
    assert_eq!((n, ok), (size, true));
    // Two GETs of the layer reached the registry: the mirror's (a 200 it
    // cut) and the client's own for the rest (a 206). A request is logged
    // only once its response is complete, so the log may lag the client.
    reg.wait_for_requests("GET", &layer.to_string(), 2, Duration::from_secs(10));
    let gets: Vec<_> = reg
        .requests()
        .into_iter()
        .filter(|e| e.method == "GET" && e.path.contains(&layer.to_string()))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(gets.iter().any(|e| e.status == 206), "{gets:?}");

    // A mirror that is the only endpoint has nothing to fall back to: the
    // break reaches the caller as an error, never as a short success.
    let alone = RegistryClient::new(RegistryOptions::default()).unwrap();
    let mirror_ref: Reference = format!(
        "{}/ember/busybox:latest",
        mirror.url().trim_start_matches("http://")
    )
    .parse()
    .unwrap();
    let mut s = alone.blob(&mirror_ref, &layer).await.unwrap();
    let err = loop {
        match s.next_chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("a cut body ended as a success"),
            Err(e) => break e,
        }
    };
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
}

/// A push through the bearer flow: an anonymous token (pull only) is
/// refused, a credential with `pull,push` pushes blobs then the manifest,
/// a second push skips the blobs (HEAD), and a pull reads back the same
/// manifest digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_through_bearer_tokens_then_pull_back() {
    use ember_registry::{Credential, Credentials, PushBlob};
    use std::sync::Arc;
    if !installed("docker-registry", "--version")
        || !installed("openssl", "version")
        || !installed("python3", "--version")
    {
        eprintln!("SKIP: needs docker-registry, openssl and python3");
        return;
    }
    let plain = Registry::start().unwrap();
    let token = TokenServer::start().unwrap();
    let realm = format!("{}/token", token.url());
    let reg = Registry::start_token_auth(&plain.storage_dir(), &token, &realm).unwrap();
    let r: Reference = format!("{}/pushed/app:v1", reg.addr()).parse().unwrap();

    let layer = b"not really a tar, but the registry only checks the digest".to_vec();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let blob = |bytes: Vec<u8>| PushBlob {
        digest: Digest::sha256_of(&bytes),
        size: bytes.len() as u64,
        open: Arc::new(move || {
            Ok(Box::new(std::io::Cursor::new(bytes.clone())) as Box<dyn std::io::Read + Send>)
        }),
    };
    let blobs = [blob(layer.clone()), blob(config.clone())];
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": ember_oci::media::OCI_MANIFEST,
        "config": {"mediaType": ember_oci::media::OCI_CONFIG,
                   "digest": blobs[1].digest.to_string(), "size": blobs[1].size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": blobs[0].digest.to_string(), "size": blobs[0].size}],
    }))
    .unwrap();
    let media = ember_oci::media::OCI_MANIFEST;
    let quiet = |_: &Digest, _: bool| {};

    // Anonymous: the token service grants pull only.
    let anon = RegistryClient::new(RegistryOptions::default()).unwrap();
    let e = anon
        .push_image(&r, &blobs, media, manifest.clone().into(), &quiet)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unauthorized"), "{e}");

    let mut credentials = Credentials::none();
    credentials.insert(
        &reg.addr(),
        Credential {
            username: "alice".into(),
            password: "s3cret".into(),
        },
    );
    let alice = RegistryClient::new(RegistryOptions {
        credentials,
        ..RegistryOptions::default()
    })
    .unwrap();
    let report = alice
        .push_image(&r, &blobs, media, manifest.clone().into(), &quiet)
        .await
        .unwrap();
    assert_eq!((report.blobs_pushed, report.blobs_skipped), (2, 0));
    assert_eq!(report.bytes_pushed, (layer.len() + config.len()) as u64);
    let digest = Digest::sha256_of(&manifest);
    assert_eq!(report.manifest.as_ref(), Some(&digest));
    assert!(
        token
            .requests()
            .iter()
            .any(|e| e["scope"].as_array().is_some_and(|s| s
                .iter()
                .any(|s| s.as_str().is_some_and(|s| s.contains("push"))))),
        "no push scope asked for: {:?}",
        token.requests()
    );

    let again = alice
        .push_image(&r, &blobs, media, manifest.clone().into(), &quiet)
        .await
        .unwrap();
    assert_eq!((again.blobs_pushed, again.blobs_skipped), (0, 2));

    let m = anon.manifest(&r, "v1").await.unwrap();
    assert_eq!(m.digest, digest);
    let (n, ok) = read_blob(&anon, &r, &blobs[0].digest).await;
    assert_eq!((n, ok), (layer.len() as u64, true));
}
