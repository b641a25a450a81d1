//! Basic auth against a real docker-registry with htpasswd: anonymous pulls
//! get a clear "unauthorized" and leave the store untouched; credentials
//! from a Docker-style auth file work.

mod common;

use common::*;
use ember_testkit::fixtures;
use std::process::{Child, Command, Stdio};

struct AuthRegistry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts docker-registry on `dir`'s storage, with htpasswd auth or not.
fn start_registry(dir: tempfile::TempDir, auth: bool) -> AuthRegistry {
    let htpasswd = sh_ok(Command::new("htpasswd").args(["-Bbn", "alice", "s3cret"]));
    std::fs::write(dir.path().join("htpasswd"), htpasswd).expect("write htpasswd");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let config = format!(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n\
         http:\n  addr: 127.0.0.1:{port}\n{auth}",
        d = dir.path().display(),
        auth = if auth {
            format!(
                "auth:\n  htpasswd:\n    realm: ember-test\n    path: {}/htpasswd\n",
                dir.path().display()
            )
        } else {
            String::new()
        }
    );
    std::fs::write(dir.path().join("config.yml"), config).expect("write config");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.path().join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn docker-registry");
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    AuthRegistry {
        child,
        addr,
        _dir: dir,
    }
}

#[test]
fn basic_auth_pull() {
    // Push to the registry without auth, then restart it on the same
    // storage with auth (the test pusher does not speak auth).
    let open = start_registry(tempfile::tempdir().expect("tempdir"), false);
    let fx = fixtures::build_cached("busybox").expect("fixture");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(fixtures::push(
        &fx,
        &format!("http://{}", open.addr),
        "ember/busybox",
        "latest",
    ))
    .expect("push");
    let mut open = open;
    let _ = open.child.kill();
    let _ = open.child.wait();
    let dir = std::mem::replace(&mut open._dir, tempfile::tempdir().expect("tempdir"));
    drop(open);
    let reg = start_registry(dir, true);

    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let image = format!("{}/ember/busybox:latest", reg.addr);
    let empty_auth = tmp.path().join("none.json");
    std::fs::write(&empty_auth, "{}").expect("write");
    let out = run_ember(
        &root,
        &[
            "pull",
            "--auth-file",
            empty_auth.to_str().expect("utf-8"),
            &image,
        ],
    );
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unauthorized") && err.contains("ember/busybox"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(root.join("layers"))
            .expect("layers")
            .count(),
        0
    );

    let auth = tmp.path().join("auth.json");
    std::fs::write(
        &auth,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#,
            reg.addr
        ),
    )
    .expect("write auth");
    ember_ok(
        &root,
        &[
            "pull",
            "-q",
            "--auth-file",
            auth.to_str().expect("utf-8"),
            &image,
        ],
    );
    let out = ember_ok(&root, &["run", &image]);
    assert_eq!(out, "hello from ember\n");
}
