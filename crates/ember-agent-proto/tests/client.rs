//! The client against a scripted fake agent on a real Unix socket.

#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use ember_agent_proto::{
    AgentClient, ClientError, ErrorMsg, ExecRequest, ExecResult, Frame, Hello, PROTOCOL_VERSION,
    ProtoError, Started, read_frame, write_frame,
};

/// Serves one connection: reads the client's hello, then answers each
/// request frame with the frames `script` returns.
fn fake_agent(
    version: u32,
    mut script: impl FnMut(Frame) -> Vec<Frame> + Send + 'static,
) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        assert!(
            matches!(read_frame(&mut s).unwrap(), Frame::Hello(h) if h.version == PROTOCOL_VERSION)
        );
        write_frame(
            &mut s,
            &Frame::Hello(Hello {
                version,
                agent: "fake".into(),
            }),
        )
        .unwrap();
        while let Ok(f) = read_frame(&mut s) {
            for out in script(f) {
                write_frame(&mut s, &out).unwrap();
            }
        }
    });
    (dir, path, h)
}

#[test]
fn exec_collects_output_and_returns_the_result() {
    let (_d, path, h) = fake_agent(PROTOCOL_VERSION, |f| match f {
        Frame::Exec(r) => {
            assert_eq!(r.argv, ["x"]);
            assert_eq!(r.stdin.as_deref(), Some(&b"in"[..]));
            vec![
                Frame::Started(Started { exec_id: 4, pid: 9 }),
                Frame::Stdout(b"a".to_vec()),
                Frame::Stderr(b"b".to_vec()),
                Frame::Stdout(b"c".to_vec()),
                Frame::Exit(ExecResult {
                    exec_id: 4,
                    exit_code: Some(0),
                    ..ExecResult::default()
                }),
            ]
        }
        Frame::Ping => vec![Frame::Error(ErrorMsg {
            message: "busy".into(),
        })],
        other => panic!("{other:?}"),
    });
    let mut c = AgentClient::connect(&path).unwrap();
    assert_eq!(c.agent().agent, "fake");
    let req = ExecRequest {
        argv: vec!["x".into()],
        stdin: Some(b"in".to_vec()),
        ..ExecRequest::default()
    };
    let mut seen = Vec::new();
    let mut started = None;
    let r = c
        .exec_with(&req, &mut |s| started = Some(s.exec_id), &mut |e, b| {
            seen.push((e, b.to_vec()))
        })
        .unwrap();
    assert!(r.success());
    assert_eq!(started, Some(4));
    assert_eq!(
        seen,
        [
            (false, b"a".to_vec()),
            (true, b"b".to_vec()),
            (false, b"c".to_vec())
        ]
    );
    // An error frame is a refusal; the connection stays usable.
    assert!(matches!(c.ping(), Err(ClientError::Agent(m)) if m == "busy"));
    assert!(matches!(c.ping(), Err(ClientError::Agent(_))));
    drop(c);
    h.join().unwrap();
}

#[test]
fn an_agent_of_another_version_is_refused() {
    let (_d, path, _h) = fake_agent(PROTOCOL_VERSION + 1, |_| vec![]);
    match AgentClient::connect(&path) {
        Err(ClientError::Proto(ProtoError::VersionMismatch { ours, theirs })) => {
            assert_eq!((ours, theirs), (PROTOCOL_VERSION, PROTOCOL_VERSION + 1));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unexpected_frames_and_closed_connections_break_the_client() {
    let (_d, path, _h) = fake_agent(PROTOCOL_VERSION, |f| match f {
        Frame::Ping => vec![Frame::Stdout(b"?".to_vec())],
        _ => vec![],
    });
    let mut c = AgentClient::connect(&path).unwrap();
    assert!(matches!(c.ping(), Err(ClientError::Unexpected("stdout"))));
    assert!(matches!(c.ping(), Err(ClientError::Broken)));

    let (_d, path, h) = fake_agent(PROTOCOL_VERSION, |_| vec![]);
    let mut c = AgentClient::connect(&path).unwrap();
    c.set_timeout(Some(Duration::from_millis(50))).unwrap();
    // The fake never answers a ping: a timeout, then the client is broken.
    let e = c.ping().unwrap_err();
    assert!(matches!(e, ClientError::Io(_)), "{e:?}");
    assert!(e.is_connection_error());
    assert!(matches!(c.ping(), Err(ClientError::Broken)));
    drop(c);
    h.join().unwrap();
}

#[test]
fn connect_timeout_waits_for_the_socket_to_appear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let p2 = path.clone();
    let h = thread::spawn(move || {
        thread::sleep(Duration::from_millis(150));
        let l = UnixListener::bind(&p2).unwrap();
        let (mut s, _) = l.accept().unwrap();
        read_frame(&mut s).unwrap();
        write_frame(
            &mut s,
            &Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                agent: "late".into(),
            }),
        )
        .unwrap();
    });
    let t = Instant::now();
    let c = AgentClient::connect_timeout(&path, Duration::from_secs(5)).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(150));
    assert_eq!(c.agent().agent, "late");
    h.join().unwrap();

    let missing = dir.path().join("never.sock");
    let t = Instant::now();
    match AgentClient::connect_timeout(&missing, Duration::from_millis(100)) {
        Err(ClientError::Connect { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(100));
    assert!(t.elapsed() < Duration::from_secs(2));
}
