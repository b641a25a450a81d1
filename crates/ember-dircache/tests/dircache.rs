//! Save and restore against the real cache server (`ember_cache::spawn`,
//! what `ember cache` runs) on a loopback port.

// Helpers outside #[test] functions panic on surprises too.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ember_cache::dircache::DircacheConfig;
use ember_dircache::manifest::{MANIFEST_VERSION, Node, NodeKind};
use ember_dircache::wire::EntryInfo;
use ember_dircache::{
    CacheClient, DircacheError, Manifest, RestoreOptions, SaveOptions, restore, restore_manifest,
    save,
};
use std::collections::HashSet;
use std::time::Duration;

fn ropts(scopes: &[&str], key: &str, restore_keys: &[&str]) -> RestoreOptions {
    let mut o = RestoreOptions::new(scopes.iter().map(|s| s.to_string()).collect(), key);
    o.restore_keys = restore_keys.iter().map(|s| s.to_string()).collect();
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_then_restore_elsewhere_is_the_same_tree() {
    let cache = start(DircacheConfig::default()).await;
    let client = cache.client();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("checkout-a/cache");
    rich_tree(&src);

    let saved = save(&client, &src, &SaveOptions::new("main", "cargo-1"))
        .await
        .unwrap();
    assert!(saved.created);
    assert_eq!(saved.bytes_chunked, (3 << 20) + 5000 + 10 + 18 + 3);
    assert_eq!(saved.chunks_uploaded, saved.unique_chunks);
    assert!(saved.unique_chunks >= 3, "3 MiB in 64 KiB-average chunks");

    // Another checkout path: entries are relative.
    let dst = work.path().join("checkout-b/cache");
    let r = restore(&client, &dst, &ropts(&["main"], "cargo-1", &[]))
        .await
        .unwrap()
        .expect("hit");
    assert!(r.exact);
    assert_eq!(r.entry.key, "cargo-1");
    assert_same_tree(&src, &dst);

    // Into an existing tree: replaced whole, nothing of the old one left,
    // nothing left beside it.
    let old = work.path().join("checkout-c/cache");
    write(&old.join("stale/file"), b"old");
    restore(&client, &old, &ropts(&["main"], "cargo-1", &[]))
        .await
        .unwrap()
        .expect("hit");
    assert_same_tree(&src, &old);
    assert_eq!(names(&work.path().join("checkout-c")), vec!["cache"]);

    // Saving the same key again is a no-op: entries are immutable.
    write(&src.join("new-file"), b"new");
    let again = save(&client, &src, &SaveOptions::new("main", "cargo-1"))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.chunks_uploaded, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_file_change_reuploads_only_a_few_chunks() {
    let cache = start(DircacheConfig::default()).await;
    let client = cache.client();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("cache");
    // 200 files, 8 MiB: a dependency cache in small.
    for i in 0..200u64 {
        let len = 4096 + (i as usize * 7919) % 80_000;
        write(
            &src.join(format!("pkg-{:03}/data.bin", i)),
            &noise(i + 10, len),
        );
    }
    let first = save(&client, &src, &SaveOptions::new("main", "v1"))
        .await
        .unwrap();
    assert_eq!(first.chunks_uploaded, first.unique_chunks);

    // Change 100 bytes in the middle of one file, add one small file.
    let p = src.join("pkg-100/data.bin");
    let mut data = std::fs::read(&p).unwrap();
    let mid = data.len() / 2;
    data[mid..mid + 100].copy_from_slice(&noise(999, 100));
    std::fs::write(&p, data).unwrap();
    write(&src.join("pkg-100/added.txt"), b"one more dependency");

    let second = save(&client, &src, &SaveOptions::new("main", "v2"))
        .await
        .unwrap();
    eprintln!("second save: {second:?}");
    assert!(second.created);
    assert!(
        second.chunks_uploaded <= 4 && second.chunks_uploaded * 10 < second.unique_chunks,
        "uploaded {} of {} chunks",
        second.chunks_uploaded,
        second.unique_chunks
    );
    assert!(
        second.data_bytes_uploaded * 20 <= second.bytes_chunked,
        "uploaded {} of {} bytes (more than 5 %)",
        second.data_bytes_uploaded,
        second.bytes_chunked
    );
    assert_eq!(
        second.chunks_reused + second.chunks_uploaded,
        second.unique_chunks
    );

    let dst = work.path().join("restored");
    restore(&client, &dst, &ropts(&["main"], "v2", &[]))
        .await
        .unwrap()
        .expect("hit");
    assert_same_tree(&src, &dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_and_restore_key_fallbacks_across_scopes() {
    let cache = start(DircacheConfig::default()).await;
    let client = cache.client();
    let work = tempfile::tempdir().unwrap();
    let mk = |name: &str| {
        let d = work.path().join("src").join(name);
        write(&d.join("marker"), name.as_bytes());
        d
    };
    for (scope, key) in [
        ("main", "deps-linux-aaa"),
        ("main", "deps-linux-bbb"),
        ("main", "other-1"),
        ("feature", "deps-mac-1"),
    ] {
        // Distinct creation times for "newest".
        tokio::time::sleep(Duration::from_millis(5)).await;
        save(&client, &mk(key), &SaveOptions::new(scope, key))
            .await
            .unwrap();
    }
    let got = |r: Option<ember_dircache::RestoreReport>, dst: &std::path::Path| {
        let r = r.expect("hit");
        let marker = std::fs::read_to_string(dst.join("marker")).unwrap();
        assert_eq!(marker, r.entry.key);
        (r.entry.scope, r.entry.key, r.exact)
    };
    let dst = work.path().join("dst");
    let scopes = ["feature", "main"];

    // Exact key, in the fallback scope.
    let r = restore(&client, &dst, &ropts(&scopes, "deps-linux-aaa", &[]))
        .await
        .unwrap();
    assert_eq!(got(r, &dst), ("main".into(), "deps-linux-aaa".into(), true));
    // The key as a prefix: the newest match.
    let r = restore(&client, &dst, &ropts(&scopes, "deps-linux-", &[]))
        .await
        .unwrap();
    assert_eq!(
        got(r, &dst),
        ("main".into(), "deps-linux-bbb".into(), false)
    );
    // No match for the key: restore keys in order; the first scope wins.
    let r = restore(
        &client,
        &dst,
        &ropts(&scopes, "deps-linux-ccc", &["nothing-", "deps-"]),
    )
    .await
    .unwrap();
    assert_eq!(got(r, &dst), ("feature".into(), "deps-mac-1".into(), false));
    // Restore keys within one scope, in order.
    let r = restore(
        &client,
        &dst,
        &ropts(&["main"], "x", &["deps-linux-a", "other-"]),
    )
    .await
    .unwrap();
    assert_eq!(
        got(r, &dst),
        ("main".into(), "deps-linux-aaa".into(), false)
    );
    // A miss leaves the target alone.
    let before = std::fs::read(dst.join("marker")).unwrap();
    let r = restore(&client, &dst, &ropts(&scopes, "zzz", &["yyy"]))
        .await
        .unwrap();
    assert!(r.is_none());
    assert_eq!(std::fs::read(dst.join("marker")).unwrap(), before);

    let listed = client.list("main").await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["other-1", "deps-linux-bbb", "deps-linux-aaa"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_scope_refuses_saves() {
    let cache = start(DircacheConfig {
        protected_scopes: vec!["main".into()],
        write_token: Some("s3cret".into()),
        ..Default::default()
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    write(&src.join("f"), b"data");

    // An untrusted run: no token.
    let anon = cache.client();
    let e = save(&anon, &src, &SaveOptions::new("main", "k"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, DircacheError::ReadOnly(ref s) if s == "main"),
        "{e}"
    );
    // Its own scope is writable.
    save(&anon, &src, &SaveOptions::new("pr-17", "k"))
        .await
        .unwrap();
    // A read-only client refuses before reading anything.
    let mut ro = SaveOptions::new("pr-17", "k2");
    ro.read_only = true;
    assert!(matches!(
        save(&anon, &src, &ro).await.unwrap_err(),
        DircacheError::ReadOnly(_)
    ));
    // The default branch's run, with the token.
    let trusted = CacheClient::new(&cache.url(), Some("s3cret".into())).unwrap();
    assert!(
        save(&trusted, &src, &SaveOptions::new("main", "k"))
            .await
            .unwrap()
            .created
    );
    let wrong = CacheClient::new(&cache.url(), Some("guess".into())).unwrap();
    assert!(matches!(
        wrong.remove("main", "k").await.unwrap_err(),
        DircacheError::ReadOnly(_)
    ));
    // Everyone may read it.
    let dst = work.path().join("dst");
    let r = restore(&anon, &dst, &ropts(&["pr-18", "main"], "k", &[]))
        .await
        .unwrap();
    assert_eq!(r.expect("hit").entry.scope, "main");
    assert!(
        anon.list("pr-17")
            .await
            .unwrap()
            .iter()
            .all(|e| e.key != "k2")
    );
}

/// A cache server with one tree saved in scope `main` under `key`.
struct Saved {
    cache: TestCache,
    client: CacheClient,
    work: tempfile::TempDir,
    src: std::path::PathBuf,
}

async fn saved(tree: fn(&std::path::Path), key: &str) -> Saved {
    let cache = start(DircacheConfig::default()).await;
    let client = cache.client();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    tree(&src);
    save(&client, &src, &SaveOptions::new("main", key))
        .await
        .unwrap();
    Saved {
        cache,
        client,
        work,
        src,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_chunk_fails_the_restore_and_writes_nothing() {
    let Saved {
        cache,
        client,
        work,
        src: _src,
    } = saved(rich_tree, "k").await;
    let found = client.get_entry("main", "k").await.unwrap().unwrap();

    // Flip a byte in the last chunk on the cache's disk (the last, so the
    // restore has already written files when it meets it).
    let last = &found.manifest.chunks.last().unwrap().digest;
    let f = cache.chunk_file(last);
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(&f, bytes).unwrap();

    let parent = work.path().join("ws");
    let dst = parent.join("target");
    write(&dst.join("mine"), b"keep me");
    let e = restore(&client, &dst, &ropts(&["main"], "k", &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, DircacheError::CorruptChunk { ref digest, .. } if digest == last),
        "{e}"
    );
    // The target is as it was and nothing half-restored is left beside it.
    assert_eq!(names(&dst), vec!["mine"]);
    assert_eq!(std::fs::read(dst.join("mine")).unwrap(), b"keep me");
    assert_eq!(names(&parent), vec!["target"]);

    // A missing chunk (collected behind the entry's back) fails the same way.
    std::fs::remove_file(&f).unwrap();
    let e = restore(&client, &parent.join("fresh"), &ropts(&["main"], "k", &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            DircacheError::CorruptChunk { .. } | DircacheError::ChunkMissing(_)
        ),
        "{e}"
    );
    assert_eq!(names(&parent), vec!["target"]);
}

/// A tool cache's shape: thousands of small files over many directories,
/// files larger than a chunk, empty files, hardlinks to files in other
/// directories, read-only files and directories. The files are written by
/// several threads; the tree must come out the same.
fn wide_tree(root: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    for d in 0..40u64 {
        for f in 0..60u64 {
            let len = match (d * 60 + f) % 40 {
                0 | 20 => 0,
                1 => 200 << 10, // several chunks
                _ => ((d * 131 + f * 17) % 9000) as usize,
            };
            write(
                &root.join(format!("crate-{d}/src/m{f}.rs")),
                &noise(d * 1000 + f, len),
            );
        }
    }
    for d in (0..40u64).step_by(5) {
        std::fs::hard_link(
            root.join(format!("crate-{d}/src/m3.rs")),
            root.join(format!("crate-{}/link-{d}", (d + 1) % 40)),
        )
        .unwrap();
    }
    let ro = root.join("crate-7/src/m5.rs");
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let rodir = root.join("crate-9/src");
    std::fs::set_permissions(&rodir, std::fs::Permissions::from_mode(0o555)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_files_written_in_parallel_come_out_the_same() {
    let Saved {
        cache: _cache,
        client,
        work,
        src,
    } = saved(wide_tree, "wide").await;
    for round in 0..3 {
        let dst = work.path().join(format!("dst-{round}"));
        let r = restore(&client, &dst, &ropts(&["main"], "wide", &[]))
            .await
            .unwrap()
            .expect("hit");
        assert_eq!(
            r.nodes,
            40 + 40 + 40 * 60 + 8,
            "dirs, src dirs, files, links"
        );
        assert_same_tree(&src, &dst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_restore_cleanly() {
    if !ember_testkit::require::root() {
        return;
    }
    let Saved {
        cache: _cache,
        client,
        work,
        src,
    } = saved(wide_tree, "wide").await;

    // A 2 MiB filesystem for a tree of about 22 MiB: a writer thread meets
    // ENOSPC part-way, with other files in flight.
    let tmpfs = ember_testkit::tmpfs::Tmpfs::mount("2m").unwrap();
    let small = tmpfs.path().to_path_buf();

    let dst = small.join("target");
    write(&dst.join("mine"), b"keep me");
    let e = restore(&client, &dst, &ropts(&["main"], "wide", &[]))
        .await
        .unwrap_err();
    let chain = ember_error::chain(&e).to_string();
    assert!(
        matches!(e, DircacheError::Io { ref source, .. }
            if source.raw_os_error() == Some(28)),
        "{chain}"
    );
    assert!(chain.contains("No space left on device"), "{chain}");
    // Nothing half-restored: the target as it was, nothing beside it, and
    // the space given back.
    assert_eq!(names(&dst), vec!["mine"]);
    assert_eq!(std::fs::read(dst.join("mine")).unwrap(), b"keep me");
    assert_eq!(names(&small), vec!["target"]);

    // With room again, the same restore succeeds.
    let big = work.path().join("big/target");
    restore(&client, &big, &ropts(&["main"], "wide", &[]))
        .await
        .unwrap()
        .expect("hit");
    assert_same_tree(&src, &big);
}

fn node(path: &str, kind: NodeKind) -> Node {
    Node {
        path: path.into(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_manifest_is_refused_by_cache_and_client() {
    let cache = start(DircacheConfig::default()).await;
    let client = cache.client();
    let work = tempfile::tempdir().unwrap();
    // A real chunk, so only the paths are wrong.
    let src = work.path().join("src");
    write(&src.join("f"), b"payload");
    save(&client, &src, &SaveOptions::new("main", "good"))
        .await
        .unwrap();
    let good = client
        .get_entry("main", "good")
        .await
        .unwrap()
        .unwrap()
        .manifest;

    let hostile = [
        vec![node("../escape", NodeKind::File { offset: 0, size: 7 })],
        vec![node("/tmp/escape", NodeKind::File { offset: 0, size: 7 })],
        vec![
            node("d", NodeKind::Dir),
            node("d/../../escape", NodeKind::File { offset: 0, size: 7 }),
        ],
        // Write through a symlink that leads out.
        vec![
            node(
                "l",
                NodeKind::Symlink {
                    target: "../..".into(),
                },
            ),
            node("l/escape", NodeKind::File { offset: 0, size: 7 }),
        ],
        vec![
            node(
                "l",
                NodeKind::Symlink {
                    target: "/tmp".into(),
                },
            ),
            node("l/escape", NodeKind::File { offset: 0, size: 7 }),
        ],
    ];
    let parent = work.path().join("ws");
    std::fs::create_dir_all(&parent).unwrap();
    for (i, nodes) in hostile.into_iter().enumerate() {
        let m = Manifest {
            version: MANIFEST_VERSION,
            nodes,
            chunks: good.chunks.clone(),
        };
        // The cache will not store it...
        match client.put_entry("main", &format!("evil-{i}"), &m).await {
            Err(DircacheError::Refused { status: 400, .. }) => {}
            r => panic!("cache accepted manifest {i}: {r:?}"),
        }
        // ...and a client handed one will not write it.
        let e = restore_manifest(&client, &m, &parent.join("t"), &ropts(&["main"], "x", &[]))
            .await
            .unwrap_err();
        assert!(matches!(e, DircacheError::InvalidManifest(_)), "{i}: {e}");
        assert!(names(&parent).is_empty(), "{i}: wrote {:?}", names(&parent));
    }
    assert!(!work.path().join("escape").exists());
    assert!(!std::path::Path::new("/tmp/escape").exists());

    // Absolute symlinks are stored, and restored only when allowed.
    let abs = work.path().join("abs");
    write(&abs.join("f"), b"payload");
    std::os::unix::fs::symlink("/usr/bin/env", abs.join("python")).unwrap();
    save(&client, &abs, &SaveOptions::new("main", "venv"))
        .await
        .unwrap();
    let e = restore(&client, &parent.join("v"), &ropts(&["main"], "venv", &[]))
        .await
        .unwrap_err();
    assert!(matches!(e, DircacheError::InvalidManifest(_)), "{e}");
    let mut allow = ropts(&["main"], "venv", &[]);
    allow.policy.allow_absolute_symlinks = true;
    restore(&client, &parent.join("v"), &allow)
        .await
        .unwrap()
        .expect("hit");
    assert_eq!(
        std::fs::read_link(parent.join("v/python")).unwrap(),
        std::path::Path::new("/usr/bin/env")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_evicts_the_least_recently_used_entry_and_gc_removes_its_chunks() {
    // Three entries of ~1.5 MiB in a 3.2 MiB scope; chunks collected at
    // once when unreferenced.
    let cache = start(DircacheConfig {
        scope_bytes: 3_200_000,
        gc_grace: Duration::ZERO,
        ..Default::default()
    })
    .await;
    let client = cache.client();
    let work = tempfile::tempdir().unwrap();
    let shared = noise(7, 500_000);
    let tree = |name: &str, seed: u64| {
        let d = work.path().join(name);
        write(&d.join("a-own.bin"), &noise(seed, 1_000_000));
        write(&d.join("z-shared.bin"), &shared);
        d
    };
    let digests =
        |m: &Manifest| -> HashSet<String> { m.chunks.iter().map(|c| c.digest.clone()).collect() };
    save(&client, &tree("e1", 1), &SaveOptions::new("main", "e1"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    save(&client, &tree("e2", 2), &SaveOptions::new("main", "e2"))
        .await
        .unwrap();
    // Another scope's entry is not charged to main's budget.
    save(&client, &tree("o1", 4), &SaveOptions::new("other", "o1"))
        .await
        .unwrap();
    let m2 = client
        .get_entry("main", "e2")
        .await
        .unwrap()
        .unwrap()
        .manifest;
    // e1 used after e2: e2 is now the least recently used.
    tokio::time::sleep(Duration::from_millis(5)).await;
    restore(
        &client,
        &work.path().join("r1"),
        &ropts(&["main"], "e1", &[]),
    )
    .await
    .unwrap()
    .expect("hit");
    tokio::time::sleep(Duration::from_millis(5)).await;
    save(&client, &tree("e3", 3), &SaveOptions::new("main", "e3"))
        .await
        .unwrap();

    let keys: Vec<String> = client
        .list("main")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["e3", "e1"], "e2 evicted");
    assert!(client.get_entry("other", "o1").await.unwrap().is_some());
    let m1 = client
        .get_entry("main", "e1")
        .await
        .unwrap()
        .unwrap()
        .manifest;
    let m3 = client
        .get_entry("main", "e3")
        .await
        .unwrap()
        .unwrap()
        .manifest;
    let mo = client
        .get_entry("other", "o1")
        .await
        .unwrap()
        .unwrap()
        .manifest;
    let live: HashSet<String> = digests(&m1)
        .into_iter()
        .chain(digests(&m3))
        .chain(digests(&mo))
        .collect();
    let only_e2: Vec<String> = digests(&m2).difference(&live).cloned().collect();
    let shared_with_e2: Vec<String> = digests(&m2).intersection(&live).cloned().collect();
    assert!(only_e2.len() >= 10, "e2 had its own chunks");
    assert!(
        !shared_with_e2.is_empty(),
        "e2 shared chunks with the others"
    );
    // Its own chunks are gone from the cache's disk; the shared ones stay.
    let mut missing = client.missing(&only_e2).await.unwrap();
    missing.sort();
    let mut want = only_e2.clone();
    want.sort();
    assert_eq!(missing, want);
    for d in &only_e2 {
        assert!(!cache.chunk_file(d).exists());
    }
    assert!(client.missing(&shared_with_e2).await.unwrap().is_empty());
    // Survivors restore whole.
    let r3 = work.path().join("r3");
    restore(&client, &r3, &ropts(&["main"], "e3", &[]))
        .await
        .unwrap()
        .expect("hit");
    assert_same_tree(&work.path().join("e3"), &r3);

    // rm, then GC: the last entry's own chunks go too.
    assert!(client.remove("main", "e3").await.unwrap());
    assert!(!client.remove("main", "e3").await.unwrap());
    let e3_own: Vec<String> = digests(&m3)
        .difference(&digests(&m1).union(&digests(&mo)).cloned().collect())
        .cloned()
        .collect();
    assert_eq!(client.missing(&e3_own).await.unwrap().len(), e3_own.len());
}

/// Stops the cache server, keeping its directory for another start.
async fn stop(cache: TestCache) -> tempfile::TempDir {
    let TestCache { server, dir } = cache;
    server.shutdown().await.unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_entries_expire_and_entries_survive_a_restart() {
    let Saved {
        cache,
        client: _client,
        work,
        src,
    } = saved(rich_tree, "k").await;
    let dir = stop(cache).await;

    // Same directory, new process: the index is rebuilt from disk.
    let cache = start_in(
        dir,
        DircacheConfig {
            max_unused: Duration::from_secs(3600),
            gc_grace: Duration::ZERO,
            ..Default::default()
        },
    )
    .await;
    let client = cache.client();
    let dst = work.path().join("dst");
    restore(&client, &dst, &ropts(&["main"], "k", &[]))
        .await
        .unwrap()
        .expect("hit");
    assert_same_tree(&src, &dst);
    let gc = client.gc().await.unwrap();
    assert_eq!(gc.expired_entries, 0, "used just now");
    let dir = stop(cache).await;

    let cache = start_in(
        dir,
        DircacheConfig {
            max_unused: Duration::ZERO,
            gc_grace: Duration::ZERO,
            ..Default::default()
        },
    )
    .await;
    let client = cache.client();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let gc = client.gc().await.unwrap();
    assert_eq!(gc.expired_entries, 1);
    assert!(gc.removed_chunks >= 3);
    assert!(client.list("main").await.unwrap().is_empty());
}

/// The files under `dircache/entries` with extension `ext`.
fn entry_files(cache_dir: &std::path::Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(cache_dir.join("dircache/entries"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_stored_by_an_earlier_build_are_rewritten_and_still_restore() {
    let Saved {
        cache,
        client: _client,
        work,
        src,
    } = saved(rich_tree, "k").await;
    let before = cache.client().list("main").await.unwrap();
    let dir = stop(cache).await;

    // Turn the entry back into the one-document form earlier builds
    // wrote: {"info": ..., "manifest": ...} in <id>.json.
    let [new] = entry_files(dir.path(), "entry").try_into().unwrap();
    let bytes = std::fs::read(&new).unwrap();
    let nl = bytes.iter().position(|&b| b == b'\n').expect("head line");
    let head: serde_json::Value = serde_json::from_slice(&bytes[..nl]).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&bytes[nl + 1..]).unwrap();
    let legacy = serde_json::json!({"info": head["info"], "manifest": manifest});
    let old = new.with_extension("json");
    std::fs::write(&old, serde_json::to_vec(&legacy).unwrap()).unwrap();
    // Its mtime is the entry's last use, which the rewrite carries over.
    let used = std::fs::metadata(&new).unwrap().modified().unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(used)
        .unwrap();
    std::fs::remove_file(&new).unwrap();

    let cache = start_in(dir, DircacheConfig::default()).await;
    assert_eq!(
        entry_files(cache.dir.path(), "entry"),
        vec![new.clone()],
        "rewritten under the current name"
    );
    assert!(
        entry_files(cache.dir.path(), "json").is_empty(),
        "old file gone"
    );
    let client = cache.client();
    // The same entry; its last use now comes from the file's mtime.
    let after = client.list("main").await.unwrap();
    assert_eq!(after.len(), 1);
    assert!(after[0].last_used_ms >= after[0].created_ms, "{after:?}");
    assert_eq!(
        EntryInfo {
            last_used_ms: before[0].last_used_ms,
            ..after[0].clone()
        },
        before[0]
    );
    let dst = work.path().join("dst");
    let report = restore(&client, &dst, &ropts(&["main"], "k", &[]))
        .await
        .unwrap()
        .expect("hit");
    assert!(report.exact);
    assert_same_tree(&src, &dst);
    // Both answers carry the manifest as stored.
    let got = client.get_entry("main", "k").await.unwrap().unwrap();
    assert!(got.exact);
    assert_eq!(serde_json::to_value(&got.manifest).unwrap(), manifest);
    let by_prefix = client
        .lookup(&ember_dircache::wire::LookupRequest {
            scopes: vec!["main".into()],
            key: "nope".into(),
            restore_keys: vec!["k".into()],
        })
        .await
        .unwrap()
        .unwrap();
    assert!(!by_prefix.exact);
    assert_eq!(by_prefix.info.key, "k");
    assert_eq!(by_prefix.manifest, got.manifest);
}

/// How the proxy in front of the cache misbehaves on `chunks/fetch`.
#[derive(Clone, Copy)]
enum Proxy {
    /// Answers 404 without a registry code: an older cache without it.
    Old,
    /// Cuts the framed answer short (a well-formed, shorter HTTP body).
    Cut,
}

/// A one-request-per-connection HTTP proxy to `upstream` on a free port;
/// returns its URL and a count of per-chunk GETs it forwarded.
async fn proxy(
    upstream: String,
    mode: Proxy,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let gets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let g = gets.clone();
    let http = reqwest::Client::new();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let (upstream, http, g) = (upstream.clone(), http.clone(), g.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 8192];
                let head_end = loop {
                    let n = s.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let mut lines = head.lines();
                let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
                let (method, path) = (first[0].to_string(), first[1].to_string());
                let len: usize = lines
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, v)| v.trim().parse().unwrap());
                while buf.len() < head_end + len {
                    let n = s.read(&mut tmp).await.unwrap();
                    buf.extend_from_slice(&tmp[..n]);
                }
                let body = buf[head_end..head_end + len].to_vec();
                let fetch = path.ends_with("/chunks/fetch");
                if fetch && matches!(mode, Proxy::Old) {
                    let _ = s
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                if method == "GET" && path.contains("/chunks/") {
                    g.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
                let r = http
                    .request(m, format!("{upstream}{path}"))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let mut out = r.bytes().await.unwrap().to_vec();
                if fetch && status == 200 {
                    out.truncate(out.len() - 10);
                }
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            out.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = s.write_all(&out).await;
            });
        }
    });
    (url, gets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_from_an_older_cache_and_refuses_a_cut_off_chunk_fetch() {
    let cache = start(DircacheConfig::default()).await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    rich_tree(&src);
    save(&cache.client(), &src, &SaveOptions::new("main", "k"))
        .await
        .unwrap();

    // A cache without `chunks/fetch`: one GET per chunk, same tree.
    let (url, gets) = proxy(cache.url(), Proxy::Old).await;
    let old = CacheClient::new(&url, None).unwrap();
    let dst = work.path().join("old");
    let r = restore(&old, &dst, &ropts(&["main"], "k", &[]))
        .await
        .unwrap()
        .unwrap();
    assert_same_tree(&src, &dst);
    assert!(r.chunks > 1);
    assert_eq!(
        gets.load(std::sync::atomic::Ordering::Relaxed) as u64,
        r.chunks,
        "not one GET per chunk"
    );

    // A framed answer cut short fails the restore; the target is as it was.
    let (url, _) = proxy(cache.url(), Proxy::Cut).await;
    let cut = CacheClient::new(&url, None).unwrap();
    let parent = work.path().join("ws");
    let dst = parent.join("target");
    write(&dst.join("mine"), b"keep me");
    let e = restore(&cut, &dst, &ropts(&["main"], "k", &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, DircacheError::Transport { ref detail, .. } if detail.contains("ends after")),
        "{e}"
    );
    assert_eq!(names(&dst), vec!["mine"]);
    assert_eq!(names(&parent), vec!["target"]);
}
