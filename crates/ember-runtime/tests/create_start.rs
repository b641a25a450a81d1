//! `runc create` + `runc start` instead of `runc run`. In its own test
//! binary because it makes the process a child subreaper.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Fixture, assert_gone, unique_id};
use ember_runtime::{ContainerStdio, RunOptions, RunSpec, StartMode};

#[test]
fn create_then_start_passes_stdio_through_and_reports_exit_codes() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("cs");
    let p = f.prepare(
        &id,
        &["/bin/sh", "-c", "echo hi; echo err >&2; exit 3"],
        RunSpec::default(),
    );
    let dir = p.bundle().to_path_buf();
    let out = p
        .run_with(RunOptions {
            stdio: ContainerStdio::captured(),
            mode: StartMode::CreateStart,
            ..RunOptions::default()
        })
        .unwrap();
    assert_eq!(out.exit_code, 3);
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"err\n");
    assert!(out.timings.create.is_some() && out.timings.start.is_some());
    assert!(out.timings.delete.is_some());
    p.cleanup().unwrap();
    assert_gone(&f.runc, &id, &dir);
}

#[test]
fn create_then_start_honours_timeouts() {
    let Some(f) = Fixture::privileged() else {
        return;
    };
    let id = unique_id("cs-timeout");
    let p = f.prepare(&id, &["/bin/sleep", "1000"], RunSpec::default());
    let dir = p.bundle().to_path_buf();
    let out = p
        .run_with(RunOptions {
            stdio: ContainerStdio::null(),
            mode: StartMode::CreateStart,
            timeout: Some(Duration::from_millis(300)),
        })
        .unwrap();
    assert!(out.timed_out);
    assert_eq!(out.exit_code, 137);
    drop(p);
    assert_gone(&f.runc, &id, &dir);
}
