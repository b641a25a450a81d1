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
    // cut) and the client's own for the rest (a 206).
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
