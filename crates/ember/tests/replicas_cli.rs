//! Two `ember control` replicas on one PostgreSQL database (a private
//! server from Debian's package), each with its own `ember node`: a run
//! submitted through one replica is dispatched by the other when only the
//! other has a node (LISTEN/NOTIFY, no polling), its output is served by
//! either, and a burst submitted through both at once runs every run
//! exactly once.

mod common;

use common::cluster::*;
use common::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Polls (the test waiting, not the system) until every run listed by
/// `url` is final; returns them.
fn wait_final(url: &str, want: usize, within: Duration) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + within;
    loop {
        let runs = runs_json(url);
        let done = runs
            .iter()
            .filter(|r| {
                matches!(
                    r["state"].as_str(),
                    Some("succeeded" | "failed" | "cancelled" | "lost")
                )
            })
            .count();
        if runs.len() == want && done == want {
            return runs;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {want} runs final ({} listed) after {within:?}",
            runs.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_replicas_share_one_postgres_without_double_dispatch() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let pg = ember_testkit::postgres::Postgres::shared().expect("start postgres");
    let db = pg.create_database().expect("database");
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");

    // Heartbeats also wake a dispatcher; with one a minute (and a timeout
    // long enough for that), only the database notification can make A
    // start B's run within the deadline below.
    let (_a, url_a) = start_control(&tmp.path().join("a"), &db, &["--heartbeat-timeout", "600"]);
    let (_b, url_b) = start_control(&tmp.path().join("b"), &db, &["--heartbeat-timeout", "600"]);
    let slow_heartbeat = ["--heartbeat", "120"];
    let _n1 = start_node(
        &tmp.path().join("n1"),
        &url_a,
        "n1",
        2,
        &agent,
        &slow_heartbeat,
    );

    // Only replica A has a node. A run submitted through B must still
    // start: B cannot place it, and A hears of it through the database.
    let sub: serde_json::Value = serde_json::from_str(&client_ok(
        &url_b,
        &["submit", "--json", &image, "--", "sh", "-c", "echo from-n1"],
    ))
    .expect("submit JSON");
    let first = sub["id"].as_u64().or_else(|| sub["run"]["id"].as_u64());
    let runs = wait_final(&url_b, 1, Duration::from_secs(45));
    assert_eq!(runs[0]["state"], "succeeded", "{}", runs[0]);
    assert_eq!(runs[0]["node"], "n1");
    if let Some(id) = first {
        assert_eq!(runs[0]["id"].as_u64(), Some(id));
    }
    // n1 posted the output to A; B serves it (logs live in the database).
    let id = runs[0]["id"].as_u64().expect("run id").to_string();
    assert_eq!(client_ok(&url_b, &["logs", &id]), "from-n1\n");

    // Both replicas with a node; 40 runs submitted through both at once.
    let _n2 = start_node(
        &tmp.path().join("n2"),
        &url_b,
        "n2",
        2,
        &agent,
        &slow_heartbeat,
    );
    std::thread::scope(|s| {
        for t in 0..8 {
            let url = if t % 2 == 0 { &url_a } else { &url_b };
            let image = &image;
            s.spawn(move || {
                for _ in 0..5 {
                    client_ok(url, &["submit", "--json", image, "--", "true"]);
                }
            });
        }
    });
    let runs = wait_final(&url_a, 41, Duration::from_secs(300));
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for r in &runs {
        assert_eq!(r["state"], "succeeded", "{r}");
        // A run dispatched twice would show a second attempt (or fail the
        // store's compare-and-set and never finish).
        assert_eq!(r["attempts"], 1, "{r}");
        *per_node
            .entry(r["node"].as_str().unwrap_or("-").to_owned())
            .or_default() += 1;
    }
    eprintln!("runs per node: {per_node:?}");
    assert_eq!(per_node.values().sum::<usize>(), 41);
    // Both replicas list the same runs: one database.
    assert_eq!(runs_json(&url_b).len(), 41);
}
