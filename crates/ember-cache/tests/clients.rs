//! Real clients pulling through the cache as a mirror of a real
//! `docker-registry`: skopeo, podman, containerd's ctr, and Ember's own
//! pull pipeline (`ember pull --mirror`). Each pull must succeed, its
//! content must match the fixture, and the bytes must have come through
//! the cache.

// Helpers outside #[test] functions panic on surprises too.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ember_testkit::fixtures::{self, BlobKind};
use ember_testkit::registry::Registry;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e} (run scripts/install-deps.sh)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn setup(fixture: &str) -> (Registry, fixtures::Fixture, TestCache, String) {
    let reg = Registry::start().expect("registry");
    let f = fixtures::build_cached(fixture).expect("fixture");
    let repo = format!("ember/{fixture}");
    fixtures::push(&f, &reg.url(), &repo, "latest")
        .await
        .expect("push");
    let cache = start_cache(&[&reg.url()], 1 << 30).await;
    let image = format!("{}/{repo}:latest", reg.addr());
    (reg, f, cache, image)
}

fn registries_conf(dir: &Path, origin: &str, cache: &str) -> std::path::PathBuf {
    let p = dir.join("registries.conf");
    std::fs::write(
        &p,
        format!(
            "unqualified-search-registries = []\n\
             [[registry]]\nlocation = \"{origin}\"\ninsecure = true\n\
             [[registry.mirror]]\nlocation = \"{cache}\"\ninsecure = true\n"
        ),
    )
    .unwrap();
    p
}

/// Every layer and config of the fixture went through the cache exactly
/// once from the origin, and the cache served them.
fn assert_through_cache(reg: &Registry, f: &fixtures::Fixture, cache: &TestCache) {
    let reachable = f.reachable(&f.root).unwrap();
    for b in reachable
        .iter()
        .filter(|b| matches!(b.kind, BlobKind::Layer | BlobKind::Config))
    {
        assert_eq!(
            reg.count_requests("GET", &format!("/blobs/{}", b.digest)),
            1,
            "{} not fetched exactly once by the cache",
            b.digest
        );
    }
    assert!(cache.metric("ember_cache_served_bytes_total") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_copies_through_the_mirror() {
    let (reg, f, cache, image) = setup("multi").await;
    let tmp = tempfile::tempdir().unwrap();
    let conf = registries_conf(tmp.path(), &reg.addr(), &cache.addr());
    let out = tmp.path().join("out");
    let mut cmd = Command::new("skopeo");
    cmd.arg("--registries-conf")
        .arg(&conf)
        .args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
        ])
        .arg(format!("oci:{}:latest", out.display()));
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .unwrap();
    // skopeo verified digests; check the layout holds the fixture's blobs.
    for b in f.blobs_of(BlobKind::Layer) {
        let hex = b.digest.strip_prefix("sha256:").unwrap();
        let p = out.join("blobs/sha256").join(hex);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), b.size);
    }
    assert_through_cache(&reg, &f, &cache);
    // A second copy is served from the cache alone.
    let before = reg.count_requests("GET", "/blobs/");
    let out2 = tmp.path().join("out2");
    let mut cmd = Command::new("skopeo");
    cmd.arg("--registries-conf")
        .arg(&conf)
        .args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
        ])
        .arg(format!("oci:{}:latest", out2.display()));
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .unwrap();
    assert_eq!(reg.count_requests("GET", "/blobs/"), before);
    cache.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn podman_pulls_through_the_mirror() {
    let (reg, f, cache, image) = setup("busybox").await;
    let tmp = tempfile::tempdir().unwrap();
    let conf = registries_conf(tmp.path(), &reg.addr(), &cache.addr());
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_REGISTRIES_CONF", &conf)
            .arg("--root")
            .arg(tmp.path().join("root"))
            .arg("--runroot")
            .arg(tmp.path().join("runroot"))
            .args([
                "--storage-driver",
                "vfs",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args);
        c
    };
    let mut pull = podman(&["pull", "--quiet", &image]);
    tokio::task::spawn_blocking(move || run(&mut pull))
        .await
        .unwrap();
    let mut inspect = podman(&["image", "inspect", "--format", "{{.Digest}}", &image]);
    let digest = tokio::task::spawn_blocking(move || run(&mut inspect))
        .await
        .unwrap();
    assert_eq!(digest.trim(), f.root.digest);
    assert_through_cache(&reg, &f, &cache);
    // Run something from it, to be sure the layers are intact.
    let mut r = podman(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        &image,
        "/bin/sh",
        "-c",
        "echo through-the-cache",
    ]);
    let out = tokio::task::spawn_blocking(move || {
        r.stderr(Stdio::piped());
        r.output().unwrap()
    })
    .await
    .unwrap();
    if out.status.success() {
        assert!(String::from_utf8_lossy(&out.stdout).contains("through-the-cache"));
    } else {
        // Running is podman's business, not the cache's; the pull and
        // digest checks above are what this test is about.
        eprintln!(
            "podman run failed (not a cache failure): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut rm = podman(&["rmi", "-a", "-f"]);
    let _ = tokio::task::spawn_blocking(move || rm.output()).await;
    cache.stop().await;
}

/// A containerd of our own, on a temporary socket; killed on drop.
struct Containerd {
    child: std::process::Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{sock}.ttrpc\"\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning containerd (run scripts/install-deps.sh)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                std::fs::read_to_string(dir.path().join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Containerd {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_ctr_pulls_through_the_mirror() {
    let (reg, f, cache, image) = setup("layers").await;
    let containerd = tokio::task::spawn_blocking(Containerd::start)
        .await
        .unwrap();
    let hosts = tempfile::tempdir().unwrap();
    let hd = hosts.path().join(reg.addr());
    std::fs::create_dir_all(&hd).unwrap();
    std::fs::write(
        hd.join("hosts.toml"),
        format!(
            "server = \"{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.url(),
            cache.url()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("ctr");
    cmd.arg("--address")
        .arg(&containerd.socket)
        .args(["images", "pull", "--plain-http", "--hosts-dir"])
        .arg(hosts.path())
        .arg(&image);
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .unwrap();
    let mut ls = Command::new("ctr");
    ls.arg("--address")
        .arg(&containerd.socket)
        .args(["images", "ls"]);
    let listing = tokio::task::spawn_blocking(move || run(&mut ls))
        .await
        .unwrap();
    assert!(listing.contains(&f.root.digest), "{listing}");
    assert_through_cache(&reg, &f, &cache);
    drop(containerd);
    cache.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ember_pull_through_the_mirror() {
    let (reg, f, cache, image) = setup("multi").await;
    let root = tempfile::tempdir().unwrap();
    let store = ember_store::Store::open(root.path()).unwrap();
    let client = std::sync::Arc::new(
        ember_registry::RegistryClient::new(ember_registry::RegistryOptions {
            mirrors: vec![cache.url()],
            ..Default::default()
        })
        .unwrap(),
    );
    let r: ember_oci::Reference = image.parse().unwrap();
    let report = ember_store::pull(
        &store,
        &client,
        &r,
        &ember_store::PullOptions::default(),
        std::sync::Arc::new(ember_store::SilentProgress),
    )
    .await
    .unwrap();
    assert_eq!(report.image.manifest.to_string(), f.root.digest);
    assert_through_cache(&reg, &f, &cache);
    cache.stop().await;
}
