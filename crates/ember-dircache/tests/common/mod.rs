//! Shared test support: a real cache server on a free loopback port,
//! trees to save, and a tree comparison.
#![allow(dead_code)]
// Test support: a panic is the right answer to any surprise here.
#![allow(clippy::unwrap_used)]

use ember_cache::dircache::DircacheConfig;
use ember_cache::{CacheConfig, RunningCache, UpstreamSpec};
use ember_dircache::CacheClient;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A cache server and its directory.
pub struct TestCache {
    pub server: RunningCache,
    pub dir: tempfile::TempDir,
}

impl TestCache {
    pub fn url(&self) -> String {
        self.server.url()
    }
    pub fn client(&self) -> CacheClient {
        CacheClient::new(&self.url(), None).unwrap()
    }
    pub fn chunk_file(&self, hex: &str) -> PathBuf {
        self.dir
            .path()
            .join("dircache/chunks")
            .join(&hex[..2])
            .join(hex)
    }
}

/// Starts `ember cache` (the library the binary runs) on 127.0.0.1:0. The
/// registry upstream is required by the config and never contacted here.
pub async fn start(dc: DircacheConfig) -> TestCache {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, dc).await
}

pub async fn start_in(dir: tempfile::TempDir, dc: DircacheConfig) -> TestCache {
    let mut cfg = CacheConfig::new(
        dir.path().to_path_buf(),
        1 << 30,
        vec![UpstreamSpec::parse("http://127.0.0.1:9").unwrap()],
    );
    cfg.dircache = dc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = ember_cache::spawn(cfg, listener).unwrap();
    TestCache { server, dir }
}

/// Deterministic incompressible bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, data).unwrap();
}

/// A tree with every kind of node a tool cache has: nested and empty
/// directories, large and small and empty files, modes, a relative
/// symlink, a hardlink pair, set mtimes.
pub fn rich_tree(root: &Path) {
    write(&root.join("registry/index/config.json"), b"{\"dl\":\"x\"}");
    write(&root.join("registry/cache/big.crate"), &noise(1, 3 << 20));
    write(&root.join("registry/cache/small.crate"), &noise(2, 5000));
    write(&root.join("registry/src/empty.rs"), b"");
    std::fs::create_dir_all(root.join("empty/dir")).unwrap();
    let exe = root.join("bin/tool");
    write(&exe, b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = root.join("registry/token");
    write(&secret, b"tok");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("../registry/cache/big.crate", root.join("bin/link")).unwrap();
    std::fs::hard_link(
        root.join("registry/cache/small.crate"),
        root.join("bin/hard"),
    )
    .unwrap();
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    std::fs::File::options()
        .write(true)
        .open(root.join("registry/index/config.json"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let d = std::fs::File::open(root.join("empty")).unwrap();
    d.set_modified(old).unwrap();
}

/// Kind, mode, owner, content hash or link target, and mtime (except
/// symlinks') of every path, and the hardlink groups.
pub fn snapshot(root: &Path) -> (BTreeMap<String, String>, Vec<Vec<String>>) {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let desc = if ft.is_dir() {
                stack.push(p.clone());
                format!(
                    "dir {:o} {}:{} {}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    m.mtime()
                )
            } else if ft.is_symlink() {
                format!("symlink -> {}", std::fs::read_link(&p).unwrap().display())
            } else {
                if m.nlink() > 1 {
                    inodes.entry(m.ino()).or_default().push(rel.clone());
                }
                format!(
                    "file {:o} {}:{} {}.{} {}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    m.mtime(),
                    m.mtime_nsec(),
                    hex::encode(Sha256::digest(std::fs::read(&p).unwrap()))
                )
            };
            out.insert(rel, desc);
        }
    }
    let mut groups: Vec<Vec<String>> = inodes
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    groups.sort();
    (out, groups)
}

pub fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, ga) = snapshot(a);
    let (sb, gb) = snapshot(b);
    assert!(!sa.is_empty());
    for k in sa.keys().chain(sb.keys()) {
        assert_eq!(sa.get(k), sb.get(k), "{k} differs");
    }
    assert_eq!(ga, gb, "hardlink groups differ");
}

/// Names in `dir` (to check nothing was left beside a target).
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
