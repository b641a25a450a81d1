//! `ember dircache save|restore|ls|rm` against the `ember cache` binary,
//! as users run them.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dircache(root: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut full = vec!["dircache"];
    full.extend_from_slice(args);
    run_ember(root, &full)
}

#[test]
fn save_restore_ls_rm_through_the_cache_binary() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let _cache = Killed(
        Command::new(ember())
            .args([
                "cache",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--max-bytes",
                "1G",
            ])
            .arg("--dir")
            .arg(tmp.path().join("cache"))
            // Required by the registry side; never contacted here.
            .args(["--upstream", "http://127.0.0.1:9"])
            .args(["--dircache-protected-scope", "main"])
            .env("EMBER_DIRCACHE_WRITE_TOKEN", "tok")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn ember cache"),
    );
    let mut up = false;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(up, "ember cache did not listen");

    let src = tmp.path().join("a/.cargo/registry");
    std::fs::create_dir_all(src.join("cache/empty")).expect("mkdir");
    let big: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("cache/serde.crate"), &big).expect("write");
    std::fs::write(src.join("cache/tool"), b"#!/bin/sh\n").expect("write");
    std::fs::set_permissions(
        src.join("cache/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("serde.crate", src.join("cache/link")).expect("symlink");
    std::fs::hard_link(src.join("cache/tool"), src.join("tool-again")).expect("link");
    let root = tmp.path().join("root");
    let srcs = src.to_str().expect("utf-8");

    // No token: the protected scope refuses; the branch scope takes it.
    let out = dircache(
        &root,
        &[
            "save", srcs, "--cache", &url, "--scope", "main", "--key", "reg-1",
        ],
    );
    assert!(
        !out.status.success(),
        "saved into a protected scope without its token"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("read-only"),
        "{out:?}"
    );
    let out = ember_ok(
        &root,
        &[
            "dircache", "save", srcs, "--cache", &url, "--scope", "feature", "--key", "reg-1",
        ],
    );
    assert!(out.contains("saved feature/reg-1"), "{out}");
    let out = ember_ok(
        &root,
        &[
            "dircache", "save", srcs, "--cache", &url, "--scope", "main", "--key", "reg-1",
            "--token", "tok",
        ],
    );
    assert!(out.contains("reused"), "{out}");

    // Elsewhere, falling back from a new branch to main by prefix.
    let dst = tmp.path().join("b/.cargo/registry");
    let dsts = dst.to_str().expect("utf-8");
    let out = ember_ok(
        &root,
        &[
            "dircache",
            "restore",
            dsts,
            "--cache",
            &url,
            "--scope",
            "other-branch",
            "--fallback-scope",
            "main",
            "--key",
            "reg-2",
            "--restore-key",
            "reg-",
        ],
    );
    assert!(out.contains("restored main/reg-1 (prefix match)"), "{out}");
    assert_same_tree(&dst, &src, "restored registry");

    let out = ember_ok(
        &root,
        &["dircache", "ls", "--cache", &url, "--scope", "feature"],
    );
    assert!(out.contains("reg-1"), "{out}");
    ember_ok(
        &root,
        &[
            "dircache", "rm", "--cache", &url, "--scope", "feature", "--key", "reg-1",
        ],
    );
    let out = ember_ok(
        &root,
        &[
            "dircache", "ls", "--cache", &url, "--scope", "feature", "--json",
        ],
    );
    assert_eq!(out.trim(), "[]");

    // A miss: exit 1 with --fail-on-miss, the target left alone.
    let out = dircache(
        &root,
        &[
            "restore",
            dsts,
            "--cache",
            &url,
            "--scope",
            "feature",
            "--key",
            "nope",
            "--fail-on-miss",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_same_tree(&dst, &src, "after a miss");
}
