//! End to end: the static agent as PID 1 of a real runc container, driven
//! through its socket from the host.
//!
//! Needs root and `runc`, and the static binary, which this test builds
//! with `crates/ember-agent/build-static.sh` (a no-op when it is up to
//! date) unless `EMBER_AGENT_STATIC` names one already built. Fails, saying
//! what is missing, without them, unless `EMBER_TEST_SKIP_PRIVILEGED=1`
//! (see `ember_testkit::require`).

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{pct, run};
use ember_agent_proto::{AgentClient, ExecRequest};
use serde_json::{Value, json};

const APPLETS: &[&str] = &[
    "sh", "true", "sleep", "cat", "ls", "echo", "setsid", "cut", "grep", "wc", "id",
];

/// A running container; `runc delete -f` on drop.
struct Container {
    id: String,
    state: PathBuf,
    socket: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Container {
    fn runc(&self, args: &[&str]) -> std::process::Output {
        Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn status(&self) -> String {
        let out = self.runc(&["state", &self.id]);
        if !out.status.success() {
            return "gone".into();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["status"].as_str().unwrap().to_owned()
    }

    fn start(agent: &Path) -> Container {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path().join("bundle");
        let rootfs = bundle.join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        for a in APPLETS {
            symlink("busybox", rootfs.join("bin").join(a)).unwrap();
        }
        for d in ["proc", "dev", "sys", "tmp", "run/ember", ".ember"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        fs::write(rootfs.join(".ember/agent"), "").unwrap();
        let sockdir = tmp.path().join("sock");
        fs::create_dir(&sockdir).unwrap();
        fs::set_permissions(&sockdir, fs::Permissions::from_mode(0o700)).unwrap();

        let st = Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(&bundle)
            .status()
            .unwrap();
        assert!(st.success());
        let cfg_path = bundle.join("config.json");
        let mut cfg: Value = serde_json::from_slice(&fs::read(&cfg_path).unwrap()).unwrap();
        let id = format!("ember-agent-e2e-{}", std::process::id());
        cfg["process"]["terminal"] = json!(false);
        cfg["process"]["args"] = json!(["/.ember/agent", "--socket", "/run/ember/agent.sock"]);
        cfg["process"]["env"] = json!(["PATH=/bin"]);
        // The sandbox refuses rlimits above the current hard limit.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        let nofile = lim.rlim_max.min(1024);
        cfg["process"]["rlimits"] =
            json!([{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}]);
        cfg["linux"]["cgroupsPath"] = json!(format!("/{id}"));
        let mounts = cfg["mounts"].as_array_mut().unwrap();
        mounts.push(json!({
            "destination": "/.ember/agent", "type": "bind",
            "source": agent, "options": ["bind", "ro"]
        }));
        mounts.push(json!({
            "destination": "/run/ember", "type": "bind",
            "source": sockdir, "options": ["bind", "rw"]
        }));
        fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();

        let c = Container {
            id,
            state: tmp.path().join("runc"),
            socket: sockdir.join("agent.sock"),
            _tmp: tmp,
        };
        // Detached, so runc must not hold pipes we wait on: the agent's
        // stdout and stderr go to a log file.
        let log = fs::File::create(c._tmp.path().join("agent.log")).unwrap();
        let st = Command::new("runc")
            .arg("--root")
            .arg(&c.state)
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg(&c.id)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .unwrap();
        assert!(st.success(), "runc run failed: {}", c.log());
        c
    }

    fn log(&self) -> String {
        fs::read_to_string(self._tmp.path().join("agent.log")).unwrap_or_default()
    }

    fn client(&self) -> AgentClient {
        AgentClient::connect_timeout(&self.socket, Duration::from_secs(10)).unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.runc(&["delete", "-f", &self.id]);
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        ..ExecRequest::default()
    }
}

/// (pid, state) of every process in the container but the ones of the
/// exec that looks, read from inside.
fn processes(c: &mut AgentClient) -> Vec<(i32, char)> {
    let mut me = 0;
    let mut out = Vec::new();
    c.exec_with(
        &sh("cat /proc/[0-9]*/stat 2>/dev/null"),
        &mut |s| me = s.pid,
        &mut |_, b| out.extend_from_slice(b),
    )
    .unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let pid = l.split(' ').next()?.parse().ok()?;
            // state ppid pgrp session
            let f: Vec<&str> = l[l.rfind(')')? + 2..].split(' ').collect();
            let session: i32 = f[3].parse().ok()?;
            (session != me).then(|| (pid, f[0].chars().next().unwrap_or('?')))
        })
        .collect()
}

#[test]
fn agent_as_pid1_of_a_runc_container() {
    if !ember_testkit::require::root() || ember_testkit::require::runc().is_none() {
        return;
    }
    let Some(agent) = ember_testkit::require::agent_binary_rebuilt() else {
        return;
    };
    let c = Container::start(&agent);
    let mut c1 = c.client();
    assert_eq!(c1.ping().unwrap().running, 0);
    // The socket the host sees is private.
    let mode = fs::metadata(&c.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // It is PID 1, and an exec sees only the agent and itself.
    let out = run(&mut c1, &sh("cat /proc/1/cmdline"));
    assert_eq!(
        out.stdout(),
        "/.ember/agent\0--socket\0/run/ember/agent.sock\0"
    );

    // Orphans reparented to PID 1 while an exec still runs are reaped.
    let mut c2 = c.client();
    let t = thread::spawn(move || {
        let r = run(
            &mut c2,
            &sh("i=0; while [ $i -lt 20 ]; do (sleep 0.01 &); i=$((i+1)); done; sleep 1"),
        );
        (c2, r.result)
    });
    thread::sleep(Duration::from_millis(600));
    let procs = processes(&mut c1);
    let zombies: Vec<_> = procs.iter().filter(|(_, s)| *s == 'Z').collect();
    assert!(zombies.is_empty(), "zombies: {procs:?}");
    let (mut c2, r) = t.join().unwrap();
    assert!(r.success());

    // Orphans left by finished execs do not accumulate.
    for _ in 0..20 {
        assert!(run(&mut c1, &sh("sleep 0.05 & exec true")).result.success());
    }
    thread::sleep(Duration::from_millis(200));
    let procs = processes(&mut c1);
    assert!(procs.iter().all(|(_, s)| *s != 'Z'), "{procs:?}");
    assert_eq!(
        procs.iter().map(|p| p.0).collect::<Vec<_>>(),
        [1],
        "{procs:?}"
    );

    // The daemon rule as PID 1: a setsid'd daemon with its output closed
    // is gone after its exec, as is everything else but the agent.
    let out = run(
        &mut c1,
        &sh("setsid sh -c 'sleep 100 & sleep 100' >/dev/null 2>&1 </dev/null & echo $!"),
    );
    assert!(out.result.success());
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let procs = processes(&mut c1);
        if procs.iter().all(|p| p.0 == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "daemon left behind: {procs:?}");
        thread::sleep(Duration::from_millis(20));
    }

    // Signals sent to the container's init reach running execs.
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        let mut out = Vec::new();
        let r = c2
            .exec(
                &sh("trap 'echo got; exit 7' USR1; echo ready; while :; do sleep 0.05; done"),
                &mut |_, b| {
                    out.extend_from_slice(b);
                    if out.ends_with(b"ready\n") {
                        let _ = tx.send(());
                    }
                },
            )
            .unwrap();
        (r, String::from_utf8(out).unwrap())
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(c.runc(&["kill", &c.id, "USR1"]).status.success());
    let (r, out) = t.join().unwrap();
    assert_eq!(r.exit_code, Some(7), "{r:?} {out}");

    // Throughput through the agent inside the container (busybox `true`).
    let r = ExecRequest {
        argv: vec!["/bin/true".into()],
        ..ExecRequest::default()
    };
    const N: usize = 2000;
    let (mut spawn, mut rtt) = (Vec::with_capacity(N), Vec::with_capacity(N));
    let t = Instant::now();
    for _ in 0..N {
        let t0 = Instant::now();
        let res = c1.exec(&r, &mut |_, _| {}).unwrap();
        rtt.push(t0.elapsed().as_micros() as u64);
        assert_eq!(res.exit_code, Some(0));
        spawn.push(res.spawn_us);
    }
    let secs = t.elapsed().as_secs_f64();
    spawn.sort();
    rtt.sort();
    println!(
        "in a runc container: {N} sequential busybox true execs: {:.0}/s; \
         spawn_us p50 {} p99 {}; round trip us p50 {} p99 {}",
        N as f64 / secs,
        pct(&spawn, 0.5),
        pct(&spawn, 0.99),
        pct(&rtt, 0.5),
        pct(&rtt, 0.99),
    );

    // SIGTERM to the container: the idle agent exits, the container stops.
    assert_eq!(c.status(), "running");
    assert!(c.runc(&["kill", &c.id, "TERM"]).status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.status() == "running" {
        assert!(
            Instant::now() < deadline,
            "agent ignored SIGTERM: {}",
            c.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!c.socket.exists(), "socket left behind");
    drop(c1);
    assert_eq!(c.status(), "stopped");
    let del = c.runc(&["delete", &c.id]);
    assert!(del.status.success());
    assert_eq!(c.status(), "gone");
}
