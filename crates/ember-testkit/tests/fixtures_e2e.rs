//! End-to-end checks of the testkit against the real tools: distribution's
//! registry, skopeo and umoci. Fixtures come from the shared cache, so only
//! the first run builds `big` and `multi`.

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ember_testkit::fixtures::{self, BlobKind};
use ember_testkit::registry::Registry;
use serde_json::Value;

/// Runs `cmd`, fails the test with its stderr if it fails, returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("command output is UTF-8")
}

fn skopeo_inspect(registry: &Registry, image: &str, raw: bool) -> Value {
    let mut cmd = Command::new("skopeo");
    cmd.args(["inspect", "--tls-verify=false"]);
    if raw {
        cmd.arg("--raw");
    }
    cmd.arg(format!("docker://{}/{image}", registry.addr()));
    serde_json::from_str(&run(&mut cmd)).expect("skopeo prints JSON")
}

#[test]
fn registry_answers_and_logs_requests() {
    let registry = Registry::start().expect("registry starts");
    assert!(registry.url().starts_with("http://127.0.0.1:"));
    assert_eq!(registry.url(), format!("http://{}", registry.addr()));
    // wait_ready already sent one GET /v2/; the access log must show it.
    assert!(
        registry.count_requests("GET", "/v2/") >= 1,
        "access log: {}",
        registry.access_log()
    );
    let port = registry.port();
    drop(registry);
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "registry still listening after drop"
    );
}

#[test]
fn registries_get_distinct_ports() {
    let a = Registry::start().expect("registry starts");
    let b = Registry::start().expect("registry starts");
    assert_ne!(a.port(), b.port());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_is_served_by_the_registry() {
    let registry = Registry::start().expect("registry starts");
    let pushed = fixtures::push_all(&registry.url())
        .await
        .expect("push all fixtures");
    let names: Vec<String> = fixtures::all()
        .iter()
        .map(|f| format!("ember/{}:latest", f.name))
        .collect();
    assert_eq!(pushed, names);

    for info in fixtures::all() {
        let fixture = fixtures::build_cached(info.name).expect("cached fixture");
        let image = format!("ember/{}:latest", info.name);
        let raw = skopeo_inspect(&registry, &image, true);
        assert_eq!(
            raw["mediaType"].as_str(),
            Some(fixture.root.media_type.as_str()),
            "{image}: {raw}"
        );
        // skopeo resolves indexes to this machine's platform; every
        // fixture has an entry for it.
        let inspected = skopeo_inspect(&registry, &image, false);
        assert_eq!(inspected["Os"], "linux", "{image}: {inspected}");
        let layers = inspected["Layers"].as_array().expect("Layers array");
        assert!(!layers.is_empty(), "{image}: no layers");
        for layer in layers {
            let digest = layer.as_str().expect("layer digest");
            assert_eq!(
                fixture.blob(digest).map(|b| b.kind),
                Some(BlobKind::Layer),
                "{image}: unknown layer {digest}"
            );
        }
    }

    let index = skopeo_inspect(&registry, "ember/index:latest", true);
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .expect("manifests array")
        .iter()
        .map(|m| {
            let p = &m["platform"];
            match p["variant"].as_str() {
                Some(v) => format!("{}/{}/{v}", p["os"], p["architecture"]),
                None => format!("{}/{}", p["os"], p["architecture"]),
            }
            .replace('"', "")
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);

    let list = skopeo_inspect(&registry, "ember/docker-list:latest", true);
    assert_eq!(list["manifests"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        list["manifests"][0]["mediaType"],
        fixtures::DOCKER_MANIFEST,
        "{list}"
    );
    let docker = skopeo_inspect(&registry, "ember/docker:latest", true);
    assert_eq!(docker["config"]["mediaType"], fixtures::DOCKER_CONFIG);
    assert_eq!(
        docker["layers"][0]["mediaType"],
        fixtures::DOCKER_LAYER_GZIP
    );

    // The big layer went up intact: the registry stores it under its digest
    // with the right size.
    let big = fixtures::build_cached("big").expect("cached fixture");
    let largest = big
        .blobs_of(BlobKind::Layer)
        .max_by_key(|b| b.size)
        .expect("big has layers");
    let resp = ember_testkit::push::http_client()
        .expect("HTTP client")
        .head(format!(
            "{}/v2/ember/big/blobs/{}",
            registry.url(),
            largest.digest
        ))
        .send()
        .await
        .expect("HEAD the big layer");
    assert_eq!(resp.status(), 200);
    // reqwest reports a HEAD response's (empty) body length, so read the
    // header itself.
    let length = resp.headers()[reqwest::header::CONTENT_LENGTH]
        .to_str()
        .expect("Content-Length is text");
    assert_eq!(length, largest.size.to_string());
}

#[tokio::test]
async fn pushing_twice_is_harmless() {
    let registry = Registry::start().expect("registry starts");
    let fixture = fixtures::build_cached("layers").expect("build layers");
    for _ in 0..2 {
        fixtures::push(&fixture, &registry.addr(), "ember/again", "v1")
            .await
            .expect("push");
    }
    let uploads = registry.count_requests("POST", "/blobs/uploads/");
    let layers_and_config = fixture
        .reachable(&fixture.root)
        .expect("parse manifests")
        .iter()
        .filter(|b| matches!(b.kind, BlobKind::Layer | BlobKind::Config))
        .count();
    assert_eq!(layers_and_config, 5);
    assert_eq!(uploads, layers_and_config, "second push re-uploaded blobs");
}

#[tokio::test]
async fn proxy_registry_pulls_through_and_upstream_log_counts_it() {
    let upstream = Registry::start().expect("upstream starts");
    let fixture = fixtures::build_cached("busybox").expect("build busybox");
    fixtures::push(&fixture, &upstream.url(), "ember/busybox", "latest")
        .await
        .expect("push to upstream");
    let proxy = Registry::start_proxy(&upstream.url()).expect("proxy starts");

    let layer = fixture
        .blobs_of(BlobKind::Layer)
        .next()
        .expect("busybox has a layer");
    let blob_path = format!("/v2/ember/busybox/blobs/{}", layer.digest);
    assert_eq!(upstream.count_requests("GET", &blob_path), 0);
    let dest = tempfile::tempdir().expect("temp dir");
    run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/ember/busybox:latest", proxy.addr()),
        &format!("oci:{}:latest", dest.path().display()),
    ]));
    // The pull went through the proxy to the upstream. Distribution 2.8's
    // proxy fetches a cold blob twice even for a single client (one stream
    // to the client, one to its own storage), so only a lower bound holds.
    let fetched = upstream.wait_for_requests("GET", &blob_path, 1, Duration::from_secs(10));
    assert!(
        fetched >= 1,
        "upstream access log:\n{}",
        upstream.access_log()
    );
    assert!(proxy.count_requests("GET", &blob_path) >= 1);
}

#[test]
fn umoci_unpacks_layers_to_the_expected_tree() {
    let fixture = fixtures::build_cached("layers").expect("build layers");
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .args([
            "unpack",
            "--image",
            &fixture.layout_ref_for(fixtures::NO_ZSTD_TAG),
        ])
        .arg(&bundle));
    fixtures::verify_rootfs(&bundle.join("rootfs"), &fixtures::layers_expectations())
        .expect("unpacked tree matches");
}

#[test]
fn busybox_fixture_runs() {
    let fixture = fixtures::build_cached("busybox").expect("build busybox");
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &fixture.layout_ref()])
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    fixtures::verify_rootfs(&rootfs, &fixtures::busybox_expectations())
        .expect("unpacked tree matches");
    // The image's own Cmd, run in its root filesystem.
    let config: Value = serde_json::from_slice(
        &fixture
            .read_blob(
                &fixture
                    .blobs_of(BlobKind::Config)
                    .next()
                    .expect("has a config")
                    .digest,
            )
            .expect("read config"),
    )
    .expect("config is JSON");
    let cmd: Vec<String> = serde_json::from_value(config["config"]["Cmd"].clone()).expect("Cmd");
    let out = run(Command::new("chroot").arg(&rootfs).args(&cmd));
    assert_eq!(out, "hello from ember\n");
}

#[test]
fn skopeo_reads_the_oci_layouts() {
    // skopeo only reads OCI-typed entries of a layout's index.json, so the
    // Docker-typed fixtures are left out.
    for name in ["busybox", "layers", "index"] {
        let fixture = fixtures::build_cached(name).expect("build fixture");
        let dest = tempfile::tempdir().expect("temp dir");
        run(Command::new("skopeo").args([
            "copy",
            "--all",
            &fixture.oci_ref(),
            &format!("oci:{}:copy", dest.path().display()),
        ]));
    }
}

#[test]
fn fixtures_are_byte_for_byte_reproducible() {
    let a = tempfile::tempdir().expect("temp dir");
    let b = tempfile::tempdir().expect("temp dir");
    for name in ["busybox", "layers", "index", "docker", "docker-list"] {
        let fa = fixtures::build(name, a.path()).expect("build");
        let fb = fixtures::build(name, b.path()).expect("build");
        assert_eq!(fa.root, fb.root, "{name}");
        let ids = |f: &fixtures::Fixture| {
            f.blobs
                .iter()
                .map(|b| (b.kind, b.media_type.clone(), b.digest.clone(), b.size))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&fa), ids(&fb), "{name}");
        fixtures::verify_blobs(&fa).expect("blobs match their digests");
        let index_a = std::fs::read(fa.layout.join("index.json")).expect("index.json");
        let index_b = std::fs::read(fb.layout.join("index.json")).expect("index.json");
        assert_eq!(index_a, index_b, "{name}");
    }
}

#[test]
fn cached_large_fixtures_are_intact() {
    for name in ["big", "multi"] {
        let fixture = fixtures::build_cached(name).expect("build fixture");
        fixtures::verify_blobs(&fixture).expect("blobs match their digests");
        assert!(Path::new(&fixture.layout).join("oci-layout").is_file());
    }
    let big = fixtures::build_cached("big").expect("build big");
    let largest = big
        .blobs_of(BlobKind::Layer)
        .map(|b| b.size)
        .max()
        .expect("big has layers");
    assert!(largest > 40 << 20, "big layer is only {largest} bytes");
}

#[tokio::test]
async fn push_client_round_trip() {
    use ember_testkit::digest::sha256_digest;
    use ember_testkit::push::{self, Pusher};

    let registry = Registry::start().expect("registry starts");
    let url = registry.url();
    let layer = b"not really a tar".to_vec();
    let layer_digest = sha256_digest(&layer);
    push::push_blob(&url, "t/raw", layer.clone(), &layer_digest)
        .await
        .expect("push blob");
    let err = push::push_blob(&url, "t/raw", layer.clone(), &sha256_digest(b"other"))
        .await
        .expect_err("a wrong digest is refused");
    assert!(err.to_string().contains("digest"), "{err:#}");

    let dir = tempfile::tempdir().expect("temp dir");
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_path = dir.path().join("config");
    std::fs::write(&config_path, config).expect("write config");
    let config_digest = sha256_digest(config);
    push::push_blob_file(&url, "t/raw", &config_path, &config_digest)
        .await
        .expect("push blob from file");

    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": fixtures::OCI_MANIFEST,
        "config": {"mediaType": fixtures::OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": fixtures::OCI_LAYER_TAR, "digest": layer_digest, "size": layer.len()}],
    }))
    .expect("manifest JSON");
    let digest = push::push_manifest(
        &url,
        "t/raw",
        "v1",
        fixtures::OCI_MANIFEST,
        manifest.clone(),
    )
    .await
    .expect("push manifest");
    assert_eq!(digest, sha256_digest(&manifest));

    let pusher = Pusher::new(&registry.addr()).expect("pusher");
    assert!(
        pusher
            .blob_exists("t/raw", &config_digest)
            .await
            .expect("HEAD")
    );
    assert!(
        !pusher
            .blob_exists("t/other", &config_digest)
            .await
            .expect("HEAD")
    );
    let resp = push::http_client()
        .expect("HTTP client")
        .get(format!("{url}/v2/t/raw/manifests/v1"))
        .header("Accept", fixtures::OCI_MANIFEST)
        .send()
        .await
        .expect("GET manifest");
    assert_eq!(resp.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(resp.bytes().await.expect("body"), manifest);
}
