//! The readiness protocol (snapshots): an exec with `ready` gets a socket at
//! `EMBER_READY_FD`, writes `ready`, is parked (surviving its client and
//! its start-up timeout), and is resumed with one line from any connection.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Agent, req, run};
use ember_agent_proto::{ClientError, ExecRequest, Readiness};

fn sh(script: &str) -> ExecRequest {
    req(&["/bin/sh", "-c", script])
}

/// Starts a `ready` exec on a fresh connection, returns its exec id and
/// what it printed before it was parked.
fn park(a: &Agent, r: &ExecRequest) -> (u64, String) {
    let mut c = a.client();
    let mut out = Vec::new();
    let ready = c
        .exec_until_ready(r, &mut |_| {}, &mut |_, b| out.extend_from_slice(b))
        .unwrap();
    let Readiness::Ready(ready) = ready else {
        panic!("expected ready, got {ready:?}");
    };
    // Dropping the client disconnects: a parked exec must survive it.
    (ready.exec_id, String::from_utf8(out).unwrap())
}

#[test]
fn a_parked_exec_survives_its_client_and_timeout_and_resumes_elsewhere() {
    let a = Agent::start();
    let script = "echo starting fd=$EMBER_READY_FD; echo ready >&3; \
                  read line <&3; echo \"got $line\"; echo done >&2";
    let mut r = sh(script);
    // The start-up's timeout must not reach the parked exec.
    r.timeout_ms = Some(300);
    let (id, before) = park(&a, &r);
    assert_eq!(before, "starting fd=3\n");

    std::thread::sleep(Duration::from_millis(800));
    let mut c = a.client();
    assert_eq!(c.ping().unwrap().running, 1, "the parked exec is gone");

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let res = c
        .resume(
            id,
            r#"{"restored":true,"seed":"00ff"}"#,
            None,
            &mut |e, b| {
                if e {
                    err.extend_from_slice(b)
                } else {
                    out.extend_from_slice(b)
                }
            },
        )
        .unwrap();
    assert!(res.success(), "{res:?}");
    assert!(!res.timed_out);
    assert_eq!(res.exec_id, id);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "got {\"restored\":true,\"seed\":\"00ff\"}\n"
    );
    assert_eq!(String::from_utf8_lossy(&err), "done\n");
    // The connection is usable afterwards, and nothing is left running.
    assert_eq!(c.ping().unwrap().running, 0);
    assert!(run(&mut c, &sh("echo again")).stdout().contains("again"));
}

#[test]
fn a_resumed_exec_that_writes_ready_again_ends_its_request_and_parks_again() {
    let a = Agent::start();
    // Counts its requests in its own memory; `ready CODE` ends one with
    // that code.
    let script = "n=0; echo ready >&3; while read -r line <&3; do n=$((n+1)); \
                  echo \"req $n: $line\"; echo err >&2; \
                  case $line in quit) exit 7;; fail) echo 'ready 3' >&3;; *) echo ready >&3;; esac; done";
    let (id, _) = park(&a, &sh(script));
    let mut c = a.client();
    let resume = |c: &mut ember_agent_proto::AgentClient, msg: &str| {
        let mut out = Vec::new();
        let res = c
            .resume(id, msg, Some(10_000), &mut |e, b| {
                if !e {
                    out.extend_from_slice(b)
                }
            })
            .unwrap();
        (res, String::from_utf8(out).unwrap())
    };
    let (res, out) = resume(&mut c, "one");
    assert!(res.parked && res.success(), "{res:?}");
    assert_eq!(res.exec_id, id);
    assert_eq!(out, "req 1: one\n");
    // Parked again: its request's timeout is over, and any connection,
    // this one too, resumes it.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(c.ping().unwrap().running, 1);
    let (res, out) = resume(&mut a.client(), "fail");
    assert!(res.parked, "{res:?}");
    assert_eq!(res.exit_code, Some(3));
    assert_eq!(out, "req 2: fail\n");
    // A request that ends the process ends the exec for good.
    let (res, out) = resume(&mut c, "quit");
    assert!(!res.parked, "{res:?}");
    assert_eq!(res.exit_code, Some(7));
    assert_eq!(out, "req 3: quit\n");
    assert_eq!(c.ping().unwrap().running, 0);
}

#[test]
fn resume_is_refused_for_what_is_not_parked_and_for_bad_messages() {
    let a = Agent::start();
    let mut c = a.client();
    let refused = |c: &mut ember_agent_proto::AgentClient, id: u64, msg: &str| -> String {
        match c.resume(id, msg, None, &mut |_, _| {}) {
            Err(ClientError::Agent(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    assert!(refused(&mut c, 999, "{}").contains("no parked exec 999"));

    let (id, _) = park(&a, &sh("echo ready >&3; read line <&3; echo \"$line\""));
    let m = refused(&mut c, id, "two\nlines");
    assert!(m.contains("newline"), "{m}");
    let m = refused(
        &mut c,
        id,
        &"x".repeat(ember_agent_proto::MAX_RESUME_MESSAGE + 1),
    );
    assert!(m.contains("exceeds"), "{m}");
    // Still parked after the refusals: a proper resume works, once.
    let mut out = Vec::new();
    let res = c
        .resume(id, "hello", None, &mut |_, b| out.extend_from_slice(b))
        .unwrap();
    assert!(res.success());
    assert_eq!(out, b"hello\n");
    assert!(refused(&mut c, id, "again").contains("no parked exec"));
}

#[test]
fn without_ready_or_without_the_line_an_exec_is_ordinary() {
    let a = Agent::start();
    let mut c = a.client();
    // No readiness socket unless asked for, whatever the environment says.
    let mut plain =
        sh("test -e /dev/fd/3 && echo open || echo closed; echo ${EMBER_READY_FD:-unset}");
    plain.env.push("EMBER_READY_FD=9".into());
    assert_eq!(run(&mut c, &plain).stdout(), "closed\n9\n");

    // The agent's own value replaces the request's.
    let mut r = sh("echo $EMBER_READY_FD; exit 4");
    r.env.push("EMBER_READY_FD=9".into());
    match c.exec_until_ready(&r, &mut |_| {}, &mut |_, _| {}).unwrap() {
        Readiness::Exited(res) => assert_eq!(res.exit_code, Some(4)),
        other => panic!("{other:?}"),
    }

    // A first line other than `ready` ends the protocol: the exec runs on
    // as an ordinary one and ends with its Exit.
    let mut out = Vec::new();
    let r = sh("echo busy >&3; sleep 0.2; echo finished");
    match c
        .exec_until_ready(&r, &mut |_| {}, &mut |_, b| out.extend_from_slice(b))
        .unwrap()
    {
        Readiness::Exited(res) => assert!(res.success()),
        other => panic!("{other:?}"),
    }
    assert_eq!(out, b"finished\n");
}
