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

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `ember cache` as a pure build cache (no `--upstream`) on `port`,
/// sharing with `peers`.
fn build_cache(dir: &std::path::Path, port: u16, peers: &[String]) -> Killed {
    let mut cmd = Command::new(ember());
    cmd.args([
        "cache",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--max-bytes",
        "1G",
    ])
    .arg("--dir")
    .arg(dir)
    .stdout(Stdio::null());
    for p in peers {
        cmd.args(["--peer", p]);
    }
    let child = Killed(cmd.spawn().expect("spawn ember cache"));
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("ember cache on port {port} did not listen");
}

/// One HTTP/1.1 GET; the whole answer (status line, headers, body).
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Two `ember cache` processes started without `--upstream`, each the
/// other's `--peer`: the registry API says it is not configured; an entry
/// saved into one restores through the other, whose chunks it fetched
/// from its peer and verified; a chunk the peer serves corrupt fails the
/// restore cleanly.
#[test]
fn two_build_caches_without_upstreams_serve_each_others_entries() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (pa, pb) = (free_port(), free_port());
    let (ua, ub) = (
        format!("http://127.0.0.1:{pa}"),
        format!("http://127.0.0.1:{pb}"),
    );
    let _a = build_cache(&tmp.path().join("ca"), pa, std::slice::from_ref(&ub));
    let _b = build_cache(&tmp.path().join("cb"), pb, std::slice::from_ref(&ua));

    let v2 = http_get(pb, "/v2/");
    assert!(v2.starts_with("HTTP/1.1 404"), "{v2}");
    assert!(v2.contains("no registry upstream"), "{v2}");
    let tags = http_get(pb, "/v2/library/busybox/tags/list");
    assert!(tags.contains("no registry upstream"), "{tags}");
    assert!(http_get(pb, "/healthz").contains("ok"));

    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).expect("mkdir");
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(src.join("d/big"), &big).expect("write");
    std::fs::write(src.join("small"), b"hello").expect("write");
    let root = tmp.path().join("root");
    let srcs = src.to_str().expect("utf-8");
    ember_ok(
        &root,
        &[
            "dircache", "save", srcs, "--cache", &ua, "--scope", "main", "--key", "k-1",
        ],
    );
    let b_chunks = tmp.path().join("cb/dircache/chunks");
    let count = |d: &std::path::Path| -> usize {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|s| std::fs::read_dir(s.path()).map_or(0, |r| r.count()))
                    .sum()
            })
            .unwrap_or(0)
    };
    assert_eq!(count(&b_chunks), 0, "B holds chunks before any restore");

    // Through B, by prefix: the lookup and every chunk come from A.
    let dst = tmp.path().join("dst");
    let out = ember_ok(
        &root,
        &[
            "dircache",
            "restore",
            dst.to_str().expect("utf-8"),
            "--cache",
            &ub,
            "--scope",
            "main",
            "--key",
            "k-",
        ],
    );
    assert!(out.contains("restored main/k-1"), "{out}");
    assert_same_tree(&dst, &src, "restored through the peer");
    let a_chunks = tmp.path().join("ca/dircache/chunks");
    assert!(count(&b_chunks) > 0, "B kept no verified copies");
    assert_eq!(count(&b_chunks), count(&a_chunks));

    // A second entry whose chunks B lacks; A's copy of one is corrupted.
    std::fs::write(
        src.join("d/big"),
        big.iter().rev().copied().collect::<Vec<u8>>(),
    )
    .expect("write");
    ember_ok(
        &root,
        &[
            "dircache", "save", srcs, "--cache", &ua, "--scope", "main", "--key", "k-2",
        ],
    );
    let mut corrupted = 0;
    for sub in std::fs::read_dir(&a_chunks).expect("chunks").flatten() {
        for f in std::fs::read_dir(sub.path()).expect("chunks").flatten() {
            let name = f.file_name();
            if !b_chunks.join(sub.file_name()).join(&name).exists() && corrupted == 0 {
                let mut bytes = std::fs::read(f.path()).expect("read");
                let n = bytes.len();
                bytes[n / 2] ^= 0x55;
                std::fs::write(f.path(), bytes).expect("write");
                corrupted += 1;
            }
        }
    }
    assert_eq!(corrupted, 1, "no chunk of k-2 is new");
    let dst2 = tmp.path().join("dst2");
    let out = dircache(
        &root,
        &[
            "restore",
            dst2.to_str().expect("utf-8"),
            "--cache",
            &ub,
            "--scope",
            "main",
            "--key",
            "k-2",
        ],
    );
    assert!(!out.status.success(), "restored a corrupt chunk: {out:?}");
    assert!(!dst2.exists(), "a failed restore left {}", dst2.display());
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("incomplete"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
