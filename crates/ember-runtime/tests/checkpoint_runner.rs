//! A runner as the warm pool makes them (the static ember-agent as PID 1,
//! its binary and `/run/ember` bind-mounted) checkpointed while a start-up
//! exec is parked by the readiness protocol, and restored twice, each copy
//! with its own socket directory, each resumed with its own request.
//!
//! Needs root, runc, CRIU (fails with a pointer to scripts/install-criu.sh
//! without it, unless EMBER_TEST_SKIP_PRIVILEGED=1) and the static agent,
//! built with crates/ember-agent/build-static.sh unless EMBER_AGENT_STATIC
//! names one.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Fixture, unique_id};
use ember_agent_proto::{AgentClient, ExecRequest, Readiness};
use ember_runtime::checkpoint;
use ember_runtime::{
    BindMount, CheckpointOptions, ContainerStdio, Criu, ImageIdentity, RestoreTarget, RunSpec,
};

fn criu() -> Option<Criu> {
    let criu = Criu::default();
    match criu.probe() {
        Ok(_) => Some(criu),
        Err(e) if std::env::var("EMBER_TEST_SKIP_PRIVILEGED").as_deref() == Ok("1") => {
            eprintln!("skipping (EMBER_TEST_SKIP_PRIVILEGED=1): {e}");
            None
        }
        Err(e) => panic!(
            "this test needs a working CRIU: {e}\n\
             install it with `scripts/install-criu.sh` (as root), or set \
             EMBER_TEST_SKIP_PRIVILEGED=1 to skip"
        ),
    }
}

fn static_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("EMBER_AGENT_STATIC") {
        return p.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ember-agent/build-static.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{} failed", script.display());
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A private socket directory, as the pool makes them.
fn sock_dir(f: &Fixture, name: &str) -> PathBuf {
    let d = f.tmp.path().join(name);
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
    d
}

/// Sockets the process `pid` holds.
fn sockets(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_runner_with_a_parked_start_up_restores_twice_and_each_copy_takes_its_own_request() {
    let Some(criu) = criu() else { return };
    let agent = static_agent();
    let f = Fixture::new();
    let id = unique_id("runner");
    let sock = sock_dir(&f, "sock-src");
    let run = RunSpec {
        env: vec![("PATH".into(), "/bin".into())],
        mounts: vec![
            BindMount {
                source: agent,
                destination: "/.ember/agent".into(),
                readonly: true,
            },
            BindMount {
                source: sock.clone(),
                destination: "/run/ember".into(),
                readonly: false,
            },
        ],
        ..RunSpec::default()
    };
    let p = f.prepare(
        &id,
        &["/.ember/agent", "--socket", "/run/ember/agent.sock"],
        run,
    );
    let created = f
        .runc
        .create(&id, p.bundle(), ContainerStdio::null())
        .unwrap();
    f.runc.start(&id).unwrap();

    // The start-up: state in memory (a token), a file, then ready; the
    // request arrives only in restored copies.
    let script = "tok=$(cat /proc/sys/kernel/random/uuid); echo warm > /warm; \
                  echo ready >&\"$EMBER_READY_FD\"; read -r req <&\"$EMBER_READY_FD\"; \
                  echo \"$tok $req $(cat /proc/sys/kernel/random/uuid)\"";
    let req = ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        timeout_ms: Some(60_000),
        ..ExecRequest::default()
    };
    let mut c =
        AgentClient::connect_timeout(&sock.join("agent.sock"), Duration::from_secs(30)).unwrap();
    let exec_id = match c
        .exec_until_ready(&req, &mut |_| {}, &mut |_, _| {})
        .unwrap()
    {
        Readiness::Ready(r) => r.exec_id,
        other => panic!("start-up ended before ready: {other:?}"),
    };
    // CRIU refuses sockets whose peer is outside the container: wait until
    // the agent has closed its end of this connection, leaving its listener
    // and its end of the readiness socket.
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sockets(created.pid) > 2 {
        assert!(Instant::now() < deadline, "the agent kept the connection");
        std::thread::sleep(Duration::from_millis(10));
    }

    let dest = f.tmp.path().join("runner-ckpt");
    let image = ImageIdentity {
        digest: "sha256:runner".into(),
        layers: vec!["sha256:base".into(), "sha256:top".into()],
    };
    checkpoint::checkpoint(
        &f.runc,
        &criu,
        &id,
        p.bundle(),
        &dest,
        &image,
        CheckpointOptions::default(),
    )
    .unwrap();
    p.cleanup().unwrap();

    let mut lines = Vec::new();
    for n in 0..2 {
        let rid = unique_id(&format!("runner-copy{n}"));
        let dir = f.base.join(&rid);
        let own_sock = sock_dir(&f, &format!("sock{n}"));
        let rebind = [BindMount {
            source: own_sock.clone(),
            destination: "/run/ember".into(),
            readonly: false,
        }];
        let r = checkpoint::restore(
            &f.runc,
            &criu,
            &dest,
            &RestoreTarget {
                id: &rid,
                dir: &dir,
                layers: &f.layers,
                image: &image,
                rebind: &rebind,
            },
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(r.rootfs().join("warm")).unwrap(),
            "warm\n"
        );
        let mut c =
            AgentClient::connect_timeout(&own_sock.join("agent.sock"), Duration::from_secs(30))
                .unwrap();
        let mut out = Vec::new();
        let res = c
            .resume(
                exec_id,
                &format!(r#"{{"restored":true,"copy":{n}}}"#),
                Some(60_000),
                &mut |_, b| out.extend_from_slice(b),
            )
            .unwrap();
        assert!(res.success(), "{res:?}");
        assert_eq!(c.ping().unwrap().running, 0);
        lines.push(String::from_utf8(out).unwrap());
        drop(r);
    }
    let parse = |l: &str| -> (String, String, String) {
        let mut w = l.split_whitespace().map(str::to_owned);
        (w.next().unwrap(), w.next().unwrap(), w.next().unwrap())
    };
    let (tok0, req0, fresh0) = parse(&lines[0]);
    let (tok1, req1, fresh1) = parse(&lines[1]);
    // Memory came back in both: the token drawn before the checkpoint.
    assert_eq!(tok0, tok1, "{lines:?}");
    // Each copy got its own request, and fresh randomness after the restore.
    assert_eq!(req0, r#"{"restored":true,"copy":0}"#);
    assert_eq!(req1, r#"{"restored":true,"copy":1}"#);
    assert_ne!(fresh0, fresh1, "{lines:?}");
}
