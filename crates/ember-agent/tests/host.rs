//! The agent run directly as a host process (not PID 1): the protocol,
//! exec semantics, the process-tree rule within its own descendants,
//! concurrency, cancel, signals and throughput.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Agent, pct, req, run, wait_gone};
use ember_agent_proto::{
    ClientError, ExecRequest, Frame, Hello, PROTOCOL_VERSION, ProtoError, read_frame, write_frame,
};

#[test]
fn ping_answers_with_version_and_running_count() {
    let a = Agent::start();
    let mut c = a.client();
    assert_eq!(c.agent().version, PROTOCOL_VERSION);
    assert!(c.agent().agent.starts_with("ember-agent/"));
    let p = c.ping().unwrap();
    assert_eq!(p.version, PROTOCOL_VERSION);
    assert_eq!(p.running, 0);
    // The socket is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&a.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn exec_streams_each_stream_in_order_and_reports_exit_code() {
    let a = Agent::start();
    let mut c = a.client();
    let out = run(
        &mut c,
        &req(&["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]),
    );
    assert_eq!(out.stdout(), "out\n");
    assert_eq!(out.stderr(), "err\n");
    assert_eq!(out.result.exit_code, Some(3));
    assert_eq!(out.result.signal, None);
    assert!(!out.result.timed_out && !out.result.cancelled);
    assert!(out.result.exec_id > 0);

    let out = run(
        &mut c,
        &req(&[
            "/bin/sh",
            "-c",
            "for i in 1 2 3 4 5; do echo o$i; echo e$i >&2; sleep 0.01; done",
        ]),
    );
    assert_eq!(out.stdout(), "o1\no2\no3\no4\no5\n");
    assert_eq!(out.stderr(), "e1\ne2\ne3\ne4\ne5\n");
    assert!(out.result.success());
    assert!(out.result.wall_us >= 50_000, "{:?}", out.result);
}

#[test]
fn output_arrives_while_the_command_runs() {
    let a = Agent::start();
    let mut c = a.client();
    let t = Instant::now();
    let mut first = None;
    let r = c
        .exec(
            &req(&["/bin/sh", "-c", "echo early; sleep 3; echo late"]),
            &mut |_, _| {
                first.get_or_insert(t.elapsed());
            },
        )
        .unwrap();
    assert!(r.success());
    // Well before the command ends (3 s), with room for a loaded machine.
    assert!(first.unwrap() < Duration::from_millis(2500), "{first:?}");
}

#[test]
fn env_is_exactly_the_request_env() {
    let a = Agent::start();
    let mut c = a.client();
    let mut r = req(&["/usr/bin/env"]);
    r.env = vec!["A=1".into(), "B=two words".into(), "EMPTY=".into()];
    let out = run(&mut c, &r);
    assert_eq!(out.stdout(), "A=1\nB=two words\nEMPTY=\n");

    // No env at all: still runs (absolute path), with an empty environment.
    r.env = vec![];
    let out = run(&mut c, &r);
    assert_eq!(out.stdout(), "");
    assert!(out.result.success());

    // A bare name is looked up in the request's PATH, not the agent's.
    let mut r = req(&["env"]);
    r.env = vec!["PATH=/nonexistent:/usr/bin".into()];
    assert!(run(&mut c, &r).result.success());
    r.env = vec!["PATH=/nonexistent".into()];
    let out = run(&mut c, &r);
    assert_eq!(out.result.exit_code, Some(127));
    assert!(
        out.result
            .spawn_error
            .as_deref()
            .unwrap()
            .contains("No such file"),
        "{:?}",
        out.result
    );
}

#[test]
fn cwd_is_honoured_and_a_missing_one_is_a_spawn_error() {
    let a = Agent::start();
    let mut c = a.client();
    let mut r = req(&["/bin/pwd"]);
    let dir = a.dir.path().canonicalize().unwrap();
    r.cwd = Some(dir.to_str().unwrap().into());
    assert_eq!(run(&mut c, &r).stdout().trim(), dir.to_str().unwrap());

    r.cwd = Some("/no/such/dir".into());
    let out = run(&mut c, &r);
    assert_eq!(out.result.exit_code, Some(127));
    assert_eq!(
        out.result.spawn_error.as_deref(),
        Some("chdir /no/such/dir: No such file or directory")
    );
    // The connection is still good.
    assert!(run(&mut c, &req(&["/bin/true"])).result.success());
}

#[test]
fn stdin_is_fed_then_closed_and_defaults_to_dev_null() {
    let a = Agent::start();
    let mut c = a.client();
    let mut r = req(&["/bin/cat"]);
    r.stdin = Some(b"hello\nworld\n".to_vec());
    assert_eq!(run(&mut c, &r).stdout(), "hello\nworld\n");

    // Larger than a pipe buffer: fed from the event loop.
    let big: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    r.stdin = Some(big.clone());
    let out = run(&mut c, &r);
    assert!(out.result.success());
    assert_eq!(out.stdout.len(), big.len());
    assert!(out.stdout == big);

    // No stdin: /dev/null, so cat ends at once.
    r.stdin = None;
    let out = run(&mut c, &r);
    assert!(out.result.success());
    assert!(out.stdout.is_empty());

    // A child that never reads its stdin does not hang the agent.
    let mut r = req(&["/bin/true"]);
    r.stdin = Some(vec![b'x'; 500_000]);
    assert!(run(&mut c, &r).result.success());
}

#[test]
fn large_output_arrives_complete_in_bounded_frames() {
    let a = Agent::start();
    let mut c = a.client();
    let (mut total, mut largest, mut frames) = (0usize, 0usize, 0usize);
    let r = c
        .exec(
            &req(&["/usr/bin/head", "-c", "20000000", "/dev/zero"]),
            &mut |_, b| {
                total += b.len();
                largest = largest.max(b.len());
                frames += 1;
            },
        )
        .unwrap();
    assert!(r.success());
    assert_eq!(total, 20_000_000);
    assert!(largest <= 64 * 1024);
    println!("20 MB of output in {frames} frames");
}

#[test]
fn timeout_kills_the_whole_tree_and_is_reported() {
    let a = Agent::start();
    let mut c = a.client();
    let mut r = req(&["/bin/sh", "-c", "sleep 100 & echo $!; sleep 100"]);
    r.timeout_ms = Some(300);
    let t = Instant::now();
    let out = run(&mut c, &r);
    let took = t.elapsed();
    assert!(out.result.timed_out, "{:?}", out.result);
    assert_eq!(out.result.signal, Some(libc::SIGKILL));
    assert_eq!(out.result.exit_code, None);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let bg: i32 = out.stdout().trim().parse().unwrap();
    assert!(wait_gone(bg), "background sleep {bg} survived the timeout");
}

#[test]
fn cancel_from_a_second_connection() {
    let a = Agent::start();
    let mut c1 = a.client();
    let mut c2 = a.client();
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        let mut r = req(&["/bin/sh", "-c", "sleep 100 & sleep 100"]);
        r.timeout_ms = Some(30_000);
        c1.exec_with(&r, &mut |s| tx.send(s.exec_id).unwrap(), &mut |_, _| {})
            .unwrap()
    });
    let id = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(c2.ping().unwrap().running, 1);
    c2.cancel(id, libc::SIGTERM).unwrap();
    let r = t.join().unwrap();
    assert!(r.cancelled);
    assert!(!r.timed_out);
    assert_eq!(r.signal, Some(libc::SIGTERM));
    assert_eq!(c2.ping().unwrap().running, 0);

    // Unknown (or finished) exec: a refusal, and the connection stays good.
    match c2.cancel(id, libc::SIGKILL) {
        Err(ClientError::Agent(m)) => assert_eq!(m, format!("no running exec {id}")),
        other => panic!("{other:?}"),
    }
    assert_eq!(c2.ping().unwrap().running, 0);
}

#[test]
fn ping_is_answered_while_execs_run() {
    let a = Agent::start();
    let mut c1 = a.client();
    let mut c2 = a.client();
    let t = thread::spawn(move || run(&mut c1, &req(&["/bin/sleep", "1"])).result);
    thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let p = c2.ping().unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(p.running, 1);
    assert!(t.join().unwrap().success());
}

#[test]
fn daemonised_leftovers_are_killed_when_the_exec_ends() {
    let a = Agent::start();
    let mut c = a.client();
    // A daemon in a new session, still holding stdout: the exec ends once
    // it is killed (not after 100 s).
    let t = Instant::now();
    let out = run(
        &mut c,
        &req(&["/bin/sh", "-c", "setsid sleep 100 & echo $!"]),
    );
    assert!(out.result.success());
    assert!(t.elapsed() < Duration::from_secs(5));
    let pid: i32 = out.stdout().trim().parse().unwrap();
    assert!(wait_gone(pid), "daemon {pid} survived");

    // A classic double-fork daemon with its output closed, in a new
    // session, with children of its own; it writes its pids to a file.
    let mut r = req(&[
        "/bin/sh",
        "-c",
        "(setsid sh -c 'echo $$ >> pids; sleep 100 & echo $! >> pids; sleep 100 & echo $! >> pids; wait' \
          >/dev/null 2>&1 </dev/null &); sleep 0.3",
    ]);
    r.cwd = Some(a.dir.path().to_str().unwrap().into());
    assert!(run(&mut c, &r).result.success());
    let pids: Vec<i32> = std::fs::read_to_string(a.dir.path().join("pids"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3);
    for pid in pids {
        assert!(wait_gone(pid), "double-forked daemon {pid} survived");
    }
}

#[test]
fn with_another_exec_running_the_group_and_session_are_killed() {
    let a = Agent::start();
    let mut c1 = a.client();
    let mut c2 = a.client();
    let t = thread::spawn(move || run(&mut c1, &req(&["/bin/sleep", "2"])).result);
    thread::sleep(Duration::from_millis(100));
    // Same process group; and (with job control on) another group in the
    // same session.
    let out = run(
        &mut c2,
        &req(&[
            "/bin/sh",
            "-c",
            "sleep 100 & echo $!; set -m; sleep 100 & echo $!",
        ]),
    );
    let pids: Vec<i32> = out
        .stdout()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    for pid in &pids {
        assert!(wait_gone(*pid), "leftover {pid} survived");
    }
    // The other exec was not touched.
    assert!(t.join().unwrap().success());
}

#[test]
fn five_concurrent_execs() {
    let a = Agent::start();
    let t = Instant::now();
    let handles: Vec<_> = (0..5)
        .map(|i| {
            let mut c = a.client();
            thread::spawn(move || {
                let out = run(
                    &mut c,
                    &req(&["/bin/sh", "-c", "sleep 0.5; echo $0", &format!("n{i}")]),
                );
                assert!(out.result.success());
                assert_eq!(out.stdout(), format!("n{i}\n"));
                out.result.exec_id
            })
        })
        .collect();
    let mut ids: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5);
    assert!(
        t.elapsed() < Duration::from_millis(2400),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn sequential_no_op_execs_over_one_connection() {
    let bin = std::env::var_os("EMBER_AGENT_BIN");
    let a = match &bin {
        Some(b) => Agent::start_bin(b.as_ref()),
        None => Agent::start(),
    };
    let mut c = a.client();
    // EMBER_BENCH_PROGRAM picks another no-op (e.g. a static one).
    let program = std::env::var("EMBER_BENCH_PROGRAM").unwrap_or_else(|_| "/bin/true".into());
    let r = ExecRequest {
        argv: vec![program.clone()],
        ..ExecRequest::default()
    };
    for _ in 0..50 {
        c.exec(&r, &mut |_, _| {}).unwrap();
    }
    const N: usize = 2000;
    let (mut spawn, mut rtt) = (Vec::with_capacity(N), Vec::with_capacity(N));
    let t = Instant::now();
    for _ in 0..N {
        let t0 = Instant::now();
        let res = c.exec(&r, &mut |_, _| {}).unwrap();
        rtt.push(t0.elapsed().as_micros() as u64);
        assert_eq!(res.exit_code, Some(0));
        spawn.push(res.spawn_us);
    }
    let secs = t.elapsed().as_secs_f64();
    spawn.sort();
    rtt.sort();
    // The same machine, the same moment: spawning /bin/true directly from
    // this process (std uses posix_spawn), no agent, no socket.
    let t = Instant::now();
    for _ in 0..N {
        std::process::Command::new(&program)
            .env_clear()
            .status()
            .unwrap();
    }
    let direct = N as f64 / t.elapsed().as_secs_f64();
    let which = if bin.is_some() {
        "EMBER_AGENT_BIN"
    } else {
        "test build"
    };
    println!(
        "{N} sequential {program} execs over one connection ({which}): {:.0}/s; \
         spawn_us p50 {} p99 {}; round trip us p50 {} p99 {}; \
         direct posix_spawn+wait from the test: {direct:.0}/s",
        N as f64 / secs,
        pct(&spawn, 0.5),
        pct(&spawn, 0.99),
        pct(&rtt, 0.5),
        pct(&rtt, 0.99),
    );
}

#[test]
fn signals_are_forwarded_to_running_execs() {
    let a = Agent::start();
    let mut c = a.client();
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        run_with_ready(
            &mut c,
            &req(&[
                "/bin/sh",
                "-c",
                "trap 'echo got; exit 7' USR1; echo ready; while :; do sleep 0.05; done",
            ]),
            tx,
        )
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    a.signal(libc::SIGUSR1);
    let (r, out) = t.join().unwrap();
    assert_eq!(r.exit_code, Some(7), "{r:?}");
    assert!(out.ends_with("got\n"), "{out:?}");
}

fn run_with_ready(
    c: &mut ember_agent_proto::AgentClient,
    r: &ExecRequest,
    ready: mpsc::Sender<()>,
) -> (ember_agent_proto::ExecResult, String) {
    let mut out = Vec::new();
    let res = c
        .exec(r, &mut |is_stderr, b| {
            // stdout only: the shell reports children killed by a signal on
            // stderr.
            if !is_stderr {
                out.extend_from_slice(b);
            }
            if out.ends_with(b"ready\n") {
                let _ = ready.send(());
            }
        })
        .unwrap();
    (res, String::from_utf8(out).unwrap())
}

#[test]
fn sigterm_when_idle_exits_cleanly_and_removes_the_socket() {
    let mut a = Agent::start();
    let mut c = a.client();
    assert!(run(&mut c, &req(&["/bin/true"])).result.success());
    a.signal(libc::SIGTERM);
    let st = a
        .wait_exit(Duration::from_secs(5))
        .expect("agent did not exit");
    assert!(st.success(), "{st:?}");
    assert!(!a.socket.exists());
}

#[test]
fn sigterm_while_busy_is_forwarded_and_the_agent_exits_after() {
    let mut a = Agent::start();
    let mut c = a.client();
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        let r = run_with_ready(
            &mut c,
            &req(&["/bin/sh", "-c", "echo ready; exec sleep 100"]),
            tx,
        );
        // New execs are refused now; the connection gets an error frame or
        // is already closed.
        let again = c.exec(&req(&["/bin/true"]), &mut |_, _| {});
        (r, again.is_err())
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    a.signal(libc::SIGTERM);
    let ((r, _), refused) = t.join().unwrap();
    assert_eq!(r.signal, Some(libc::SIGTERM));
    assert!(refused);
    let st = a
        .wait_exit(Duration::from_secs(5))
        .expect("agent did not exit");
    assert!(st.success(), "{st:?}");
}

#[test]
fn a_vanished_client_gets_its_exec_killed() {
    let a = Agent::start();
    drop(a.client()); // wait for the socket
    let mut s = UnixStream::connect(&a.socket).unwrap();
    write_frame(
        &mut s,
        &Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            agent: "raw".into(),
        }),
    )
    .unwrap();
    write_frame(
        &mut s,
        &Frame::Exec(req(&["/bin/sh", "-c", "sleep 100 & sleep 100"])),
    )
    .unwrap();
    assert!(matches!(read_frame(&mut s).unwrap(), Frame::Hello(_)));
    let Frame::Started(st) = read_frame(&mut s).unwrap() else {
        panic!("expected started");
    };
    drop(s);
    assert!(wait_gone(st.pid));
    let mut c = a.client();
    let deadline = Instant::now() + Duration::from_secs(2);
    while c.ping().unwrap().running != 0 {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn bad_requests_are_refused_and_the_connection_survives() {
    let a = Agent::start();
    let mut c = a.client();
    for (r, want) in [
        (req(&[]), "exec refused: argv is empty"),
        (
            ExecRequest {
                env: vec!["NOEQUALS".into()],
                ..req(&["/bin/true"])
            },
            "exec refused: env entry \"NOEQUALS\" is not KEY=VALUE",
        ),
        (
            req(&["/bin/tr\0ue"]),
            "exec refused: an argv entry contains a NUL byte",
        ),
    ] {
        match c.exec(&r, &mut |_, _| {}) {
            Err(ClientError::Agent(m)) => assert_eq!(m, want),
            other => panic!("{other:?}"),
        }
    }
    let out = run(&mut c, &req(&["/no/such/program"]));
    assert_eq!(out.result.exit_code, Some(127));
    assert!(
        out.result
            .spawn_error
            .unwrap()
            .starts_with("exec /no/such/program: ")
    );
    let out = run(&mut c, &req(&["/etc/passwd"]));
    assert_eq!(out.result.exit_code, Some(126));
    assert!(run(&mut c, &req(&["/bin/true"])).result.success());
}

#[test]
fn uid_and_gid_are_applied() {
    if !ember_testkit::require::root() {
        return;
    }
    let a = Agent::start();
    let mut c = a.client();
    let mut r = req(&["/usr/bin/id"]);
    r.uid = Some(65534);
    r.gid = Some(65533);
    let out = run(&mut c, &r);
    assert_eq!(
        out.stdout().trim(),
        "uid=65534(nobody) gid=65533 groups=65533",
        "{}",
        out.stderr()
    );
}

#[test]
fn version_mismatch_gets_an_error_frame_and_a_closed_connection() {
    let a = Agent::start();
    drop(a.client());
    let mut s = UnixStream::connect(&a.socket).unwrap();
    write_frame(
        &mut s,
        &Frame::Hello(Hello {
            version: PROTOCOL_VERSION + 1,
            agent: "future".into(),
        }),
    )
    .unwrap();
    match read_frame(&mut s).unwrap() {
        Frame::Error(e) => assert!(e.message.contains("version mismatch"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    assert!(matches!(read_frame(&mut s), Err(ProtoError::Closed)));
}

#[test]
fn malformed_frames_get_an_error_and_a_closed_connection() {
    let a = Agent::start();
    drop(a.client());
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        agent: "raw".into(),
    });
    let cases: [(&[u8], &str); 4] = [
        (&[0, 0, 0, 0, 99], "unknown frame kind 99"),
        (&[2, 0, 0, 0, 4, b'{', b'x'], "malformed exec frame"),
        (&[0xff, 0xff, 0xff, 0x7f, 6], "exceeds the limit"),
        (&[0, 0, 0, 0, 2], "ping"), // a ping before hello
    ];
    for (i, (bytes, want)) in cases.into_iter().enumerate() {
        let mut s = UnixStream::connect(&a.socket).unwrap();
        let last = i == 3;
        if !last {
            write_frame(&mut s, &hello).unwrap();
            assert!(matches!(read_frame(&mut s).unwrap(), Frame::Hello(_)));
        }
        s.write_all(bytes).unwrap();
        match read_frame(&mut s).unwrap() {
            Frame::Error(e) => assert!(e.message.contains(want), "{}", e.message),
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_frame(&mut s), Err(ProtoError::Closed)));
    }
    // The agent is fine.
    assert_eq!(a.client().ping().unwrap().running, 0);
}

#[test]
fn orphans_are_reaped() {
    let a = Agent::start();
    let mut c1 = a.client();
    let mut c2 = a.client();
    // While exec 1 runs, it leaves 20 short-lived orphans, which are
    // reparented to the agent (a subreaper) and must be reaped by it.
    let t = thread::spawn(move || {
        run(
            &mut c1,
            &req(&[
                "/bin/sh",
                "-c",
                "i=0; while [ $i -lt 20 ]; do (sleep 0.01 &); i=$((i+1)); done; sleep 1",
            ]),
        )
        .result
    });
    thread::sleep(Duration::from_millis(600));
    // The state of each of the agent's children, seen from inside exec 2.
    let out = run(
        &mut c2,
        &req(&[
            "/bin/sh",
            "-c",
            &format!(
                "for p in $(cat /proc/{0}/task/{0}/children); do cut -d' ' -f1-3 /proc/$p/stat; done",
                a.pid()
            ),
        ]),
    );
    let states = out.stdout();
    let zombies = states.lines().filter(|l| l.ends_with(" Z")).count();
    assert_eq!(zombies, 0, "unreaped children of the agent:\n{states}");
    // Exec 1's sh, and exec 2's own sh; none of the 20 orphans is left.
    assert!(states.lines().count() <= 2, "{states}");
    assert!(t.join().unwrap().success());
}

#[test]
fn a_slow_reader_holds_its_command_back_without_stalling_the_agent() {
    let a = Agent::start();
    let mut c1 = a.client();
    let mut c2 = a.client();
    let (tx, rx) = mpsc::channel();
    let t = thread::spawn(move || {
        let mut total = 0usize;
        let mut first = true;
        let r = c1
            .exec(
                &req(&["/usr/bin/head", "-c", "30000000", "/dev/zero"]),
                &mut |_, b| {
                    if first {
                        first = false;
                        tx.send(()).unwrap();
                        // Stop reading for a while: the agent's buffer for
                        // this connection fills up, then the pipe, then
                        // `head` blocks.
                        thread::sleep(Duration::from_millis(700));
                    }
                    total += b.len();
                },
            )
            .unwrap();
        (r, total)
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    thread::sleep(Duration::from_millis(200));
    // The agent still answers others at once.
    let t0 = Instant::now();
    assert_eq!(c2.ping().unwrap().running, 1);
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "{:?}",
        t0.elapsed()
    );
    let out = run(&mut c2, &req(&["/bin/echo", "other"]));
    assert_eq!(out.stdout(), "other\n");
    let (r, total) = t.join().unwrap();
    assert!(r.success());
    assert_eq!(total, 30_000_000);
    // The agent buffered at most about a megabyte of it, not 30.
    let status = std::fs::read_to_string(format!("/proc/{}/status", a.pid())).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    println!("agent peak RSS after streaming 30 MB to a slow reader: {hwm_kb} kB");
    assert!(hwm_kb < 20_000, "agent peak RSS {hwm_kb} kB");
}
