//! The Turborepo remote-cache API, driven by the real `turbo` client (from
//! npm, installed by scripts/install-turbo.sh into /opt/ember-turbo).

// Helpers outside #[test] functions panic on surprises too.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn turbo() -> PathBuf {
    std::env::var_os("EMBER_TURBO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/ember-turbo/node_modules/.bin/turbo"))
}

/// A one-package npm workspace whose build writes a random number, so a
/// re-run that executes the build instead of restoring it is visible.
fn monorepo(dir: &Path) {
    let w = |p: &str, s: &str| {
        let p = dir.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    };
    w(
        "package.json",
        r#"{"name":"mono","private":true,"packageManager":"npm@9.2.0","workspaces":["packages/*"]}"#,
    );
    w(
        "package-lock.json",
        r#"{"name":"mono","lockfileVersion":3,"requires":true,"packages":{"":{"name":"mono","workspaces":["packages/*"]},"node_modules/app":{"resolved":"packages/app","link":true},"packages/app":{"name":"app","version":"1.0.0"}}}"#,
    );
    w(
        "turbo.json",
        r#"{"$schema":"https://turborepo.com/schema.json","tasks":{"build":{"outputs":["dist/**"]}}}"#,
    );
    w(
        "packages/app/package.json",
        r#"{"name":"app","version":"1.0.0","scripts":{"build":"node build.js"}}"#,
    );
    w(
        "packages/app/build.js",
        "require('fs').mkdirSync('dist',{recursive:true});require('fs').writeFileSync('dist/out.txt',String(Math.random())+'x'.repeat(300000));",
    );
}

fn run_turbo(dir: &Path, api: &str, token: &str, cache: &str) -> std::process::Output {
    Command::new(turbo())
        .current_dir(dir)
        .args([
            "run", "build", "--api", api, "--token", token, "--team", "ember",
        ])
        .arg(format!("--cache={cache}"))
        .env("TURBO_TELEMETRY_DISABLED", "1")
        .env("DO_NOT_TRACK", "1")
        .env("TURBO_NO_UPDATE_NOTIFIER", "1")
        .env("HOME", dir)
        .output()
        .expect("spawn turbo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_turbo_client_shares_build_outputs_through_the_cache() {
    assert!(
        turbo().exists(),
        "turbo is not installed: run scripts/install-turbo.sh"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1 << 30, &["http://127.0.0.1:9"]);
    cfg.dircache.turbo_tokens = vec!["turbo-secret".into()];
    let cache = start_cache_with(cfg, dir).await;
    let api = cache.url();
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    monorepo(&a);
    monorepo(&b);

    // First machine: remote cache only; a miss, built and uploaded.
    let (a2, api2) = (a.clone(), api.clone());
    let out =
        tokio::task::spawn_blocking(move || run_turbo(&a2, &api2, "turbo-secret", "remote:rw"))
            .await
            .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    let built = std::fs::read(a.join("packages/app/dist/out.txt")).unwrap();
    assert!(
        !cache
            .server
            .dircache()
            .list("turbo/ember")
            .entries
            .is_empty(),
        "nothing uploaded: {log}"
    );

    // A wrong token is refused (turbo carries on without the cache).
    let c = reqwest::Client::new();
    let r = c
        .get(format!("{api}/v8/artifacts/status"))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Second machine, another checkout: restored from the cache, not built.
    let (b2, api2) = (b.clone(), api.clone());
    let out =
        tokio::task::spawn_blocking(move || run_turbo(&b2, &api2, "turbo-secret", "remote:r"))
            .await
            .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("FULL TURBO") || log.contains("cache hit"),
        "{log}"
    );
    let restored = std::fs::read(b.join("packages/app/dist/out.txt")).unwrap();
    assert_eq!(
        restored, built,
        "the build ran again instead of being restored"
    );
}
