//! Start-time benchmark against bare `runc run` on the same machine, in the
//! same run. Ignored by default; run it with
//!
//! ```text
//! cargo test -p ember-runtime --release --test bench -- --ignored --nocapture
//! ```

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fixture, unique_id};
use ember_runtime::{Container, ContainerStdio, RunOptions, RunSpec, StartMode, Timings};

const ROUNDS: usize = 41;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn true_spec() -> RunSpec {
    RunSpec {
        args: Some(vec!["/bin/true".into()]),
        ..RunSpec::default()
    }
}

fn ember_once(f: &Fixture, mode: StartMode) -> (Duration, Timings, Duration) {
    ember_once_with(f, mode, &true_spec())
}

fn ember_once_with(f: &Fixture, mode: StartMode, spec: &RunSpec) -> (Duration, Timings, Duration) {
    let id = unique_id("bench");
    let t = Instant::now();
    let p = Container::new(f.runc.clone(), &id, f.base.join(&id))
        .prepare(&f.layers, &common::image(), spec)
        .unwrap();
    let out = p
        .run_with(RunOptions {
            stdio: ContainerStdio::null(),
            mode,
            ..RunOptions::default()
        })
        .unwrap();
    let c = Instant::now();
    p.cleanup().unwrap();
    let cleanup = c.elapsed();
    assert_eq!(out.exit_code, 0);
    (t.elapsed(), out.timings, cleanup)
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
fn bench_hot_start_against_bare_runc() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    // The bare baseline runs a bundle Ember prepared (overlay mounted,
    // config.json written), exactly as `runc run --bundle B ID` would.
    let bare_id = unique_id("bare");
    let bundle = Container::new(f.runc.clone(), &bare_id, f.base.join(&bare_id))
        .prepare(&f.layers, &common::image(), &true_spec())
        .unwrap();
    let bare_once = |id: &str| {
        let t = Instant::now();
        let st = Command::new("runc")
            .arg("--root")
            .arg(f.runc.root())
            .args(["run", "--bundle"])
            .arg(bundle.bundle())
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        t.elapsed()
    };

    // A fresh id per run, as real use has; reusing one id (and so one
    // cgroup path) right after its removal is measurably slower.
    let fresh = || unique_id("bare");
    for _ in 0..3 {
        bare_once(&fresh());
        ember_once(&f, StartMode::Run);
    }
    let mut no_cg = vec![];
    let (mut same_id, mut mount, mut user, mut config) = (vec![], vec![], vec![], vec![]);
    let (mut bare, mut ember, mut cleanup, mut run, mut prep) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut cs_total, mut create, mut start, mut cs_run, mut delete) =
        (vec![], vec![], vec![], vec![], vec![]);
    // Interleaved, so drift in machine load hits all alike.
    for _ in 0..ROUNDS {
        bare.push(bare_once(&fresh()));
        same_id.push(bare_once(&bare_id));
        let (total, t, c) = ember_once(&f, StartMode::Run);
        ember.push(total);
        cleanup.push(c);
        run.push(t.run);
        prep.push(t.prepare());
        mount.push(t.mount);
        user.push(t.resolve_user);
        config.push(t.config);
        let no_cgroupfs = RunSpec {
            mount_cgroupfs: false,
            ..true_spec()
        };
        no_cg.push(ember_once_with(&f, StartMode::Run, &no_cgroupfs).0);
        let (total, t, _) = ember_once(&f, StartMode::CreateStart);
        cs_total.push(total);
        create.push(t.create.unwrap());
        start.push(t.start.unwrap());
        cs_run.push(t.run);
        delete.push(t.delete.unwrap());
    }
    let (b, e) = (median(bare), median(ember));
    println!("median of {ROUNDS} runs of /bin/true:");
    println!("  bare `runc run` of a prepared bundle:     {}", ms(b));
    println!(
        "  (same, reusing one id each time:         {})",
        ms(median(same_id))
    );
    println!(
        "  ember prepare+run+cleanup (runc run):     {}  ({:.2}x bare)",
        ms(e),
        e.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "    prepare (mount+user+config):            {}",
        ms(median(prep))
    );
    println!(
        "      mount {} / user {} / config {}",
        ms(median(mount)),
        ms(median(user)),
        ms(median(config))
    );
    println!(
        "    runc run (spawn to exit):               {}",
        ms(median(run))
    );
    println!(
        "    cleanup (umount, rm):                   {}",
        ms(median(cleanup))
    );
    println!(
        "  ember, without /sys/fs/cgroup mounted:     {}",
        ms(median(no_cg))
    );
    let cs = median(cs_total);
    println!(
        "  ember prepare+create+start+delete+cleanup: {}  ({:.2}x bare)",
        ms(cs),
        cs.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "    runc create:                            {}",
        ms(median(create))
    );
    println!(
        "    runc start:                             {}",
        ms(median(start))
    );
    println!(
        "    start to exit:                          {}",
        ms(median(cs_run))
    );
    println!(
        "    runc delete:                            {}",
        ms(median(delete))
    );
}
