//! Framing: `u32` little-endian payload length, `u8` kind, payload.
//!
//! Control frames carry JSON, output frames raw bytes. A payload is at most
//! [`MAX_PAYLOAD`] bytes; a reader refuses a longer one before reading it.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::message::{
    Cancel, ErrorMsg, ExecRequest, ExecResult, Hello, Pong, Ready, Resume, Started,
};

/// The largest payload a frame may carry: 1 MiB.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Bytes before the payload: the length (4) and the kind (1).
pub const HEADER_LEN: usize = 5;

/// Frame kind numbers, as they appear on the wire.
pub mod kind {
    /// [`Frame::Hello`](super::Frame::Hello), JSON.
    pub const HELLO: u8 = 1;
    /// [`Frame::Ping`](super::Frame::Ping), empty.
    pub const PING: u8 = 2;
    /// [`Frame::Pong`](super::Frame::Pong), JSON.
    pub const PONG: u8 = 3;
    /// [`Frame::Exec`](super::Frame::Exec), JSON.
    pub const EXEC: u8 = 4;
    /// [`Frame::Started`](super::Frame::Started), JSON.
    pub const STARTED: u8 = 5;
    /// [`Frame::Stdout`](super::Frame::Stdout), raw bytes.
    pub const STDOUT: u8 = 6;
    /// [`Frame::Stderr`](super::Frame::Stderr), raw bytes.
    pub const STDERR: u8 = 7;
    /// [`Frame::Exit`](super::Frame::Exit), JSON.
    pub const EXIT: u8 = 8;
    /// [`Frame::Cancel`](super::Frame::Cancel), JSON.
    pub const CANCEL: u8 = 9;
    /// [`Frame::Error`](super::Frame::Error), JSON.
    pub const ERROR: u8 = 10;
    /// [`Frame::Cancelled`](super::Frame::Cancelled), JSON.
    pub const CANCELLED: u8 = 11;
    /// [`Frame::Ready`](super::Frame::Ready), JSON.
    pub const READY: u8 = 12;
    /// [`Frame::Resume`](super::Frame::Resume), JSON.
    pub const RESUME: u8 = 13;
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Both directions, first on a connection.
    Hello(Hello),
    /// Client → agent: health check.
    Ping,
    /// Agent → client: answer to [`Frame::Ping`].
    Pong(Pong),
    /// Client → agent: run a command.
    Exec(ExecRequest),
    /// Agent → client: the command is running.
    Started(Started),
    /// Agent → client: a chunk of the command's stdout.
    Stdout(Vec<u8>),
    /// Agent → client: a chunk of the command's stderr.
    Stderr(Vec<u8>),
    /// Agent → client: the command ended; last frame of an exec.
    Exit(ExecResult),
    /// Client → agent: signal a running exec.
    Cancel(Cancel),
    /// Agent → client: a request failed.
    Error(ErrorMsg),
    /// Agent → client: a [`Frame::Cancel`] was delivered (echoes it).
    Cancelled(Cancel),
    /// Agent → client: an exec with `ready` set signalled readiness and is
    /// parked.
    Ready(Ready),
    /// Client → agent: wake a parked exec and take it over.
    Resume(Resume),
}

impl Frame {
    /// The frame's kind number.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::Hello(_) => kind::HELLO,
            Frame::Ping => kind::PING,
            Frame::Pong(_) => kind::PONG,
            Frame::Exec(_) => kind::EXEC,
            Frame::Started(_) => kind::STARTED,
            Frame::Stdout(_) => kind::STDOUT,
            Frame::Stderr(_) => kind::STDERR,
            Frame::Exit(_) => kind::EXIT,
            Frame::Cancel(_) => kind::CANCEL,
            Frame::Error(_) => kind::ERROR,
            Frame::Cancelled(_) => kind::CANCELLED,
            Frame::Ready(_) => kind::READY,
            Frame::Resume(_) => kind::RESUME,
        }
    }

    /// The frame kind's name, for messages.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }
}

/// The name of a frame kind, or `"unknown"`.
pub fn kind_name(k: u8) -> &'static str {
    match k {
        kind::HELLO => "hello",
        kind::PING => "ping",
        kind::PONG => "pong",
        kind::EXEC => "exec",
        kind::STARTED => "started",
        kind::STDOUT => "stdout",
        kind::STDERR => "stderr",
        kind::EXIT => "exit",
        kind::CANCEL => "cancel",
        kind::ERROR => "error",
        kind::CANCELLED => "cancelled",
        kind::READY => "ready",
        kind::RESUME => "resume",
        _ => "unknown",
    }
}

/// Reading or decoding a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The connection failed (including read/write timeouts).
    #[error("agent connection I/O failed")]
    Io(#[from] io::Error),
    /// The peer closed the connection cleanly between frames.
    #[error("agent connection closed")]
    Closed,
    /// A frame header announced a payload over [`MAX_PAYLOAD`].
    #[error("frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge {
        /// The announced payload length.
        len: u64,
    },
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A control frame's payload was not the JSON its kind requires.
    #[error("malformed {kind} frame")]
    BadJson {
        /// The frame kind's name.
        kind: &'static str,
        /// What serde_json objected to.
        #[source]
        source: serde_json::Error,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: ours is {ours}, the peer's is {theirs}")]
    VersionMismatch {
        /// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
        ours: u32,
        /// The version in the peer's [`Hello`].
        theirs: u32,
    },
}

fn json<T: DeserializeOwned>(k: u8, payload: &[u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(payload).map_err(|source| ProtoError::BadJson {
        kind: kind_name(k),
        source,
    })
}

/// Decodes a payload of kind `k`. Output payloads are moved, not copied.
pub fn decode_payload(k: u8, payload: Vec<u8>) -> Result<Frame, ProtoError> {
    Ok(match k {
        kind::HELLO => Frame::Hello(json(k, &payload)?),
        // A ping's payload is reserved; ignore whatever is there.
        kind::PING => Frame::Ping,
        kind::PONG => Frame::Pong(json(k, &payload)?),
        kind::EXEC => Frame::Exec(json(k, &payload)?),
        kind::STARTED => Frame::Started(json(k, &payload)?),
        kind::STDOUT => Frame::Stdout(payload),
        kind::STDERR => Frame::Stderr(payload),
        kind::EXIT => Frame::Exit(json(k, &payload)?),
        kind::CANCEL => Frame::Cancel(json(k, &payload)?),
        kind::ERROR => Frame::Error(json(k, &payload)?),
        kind::CANCELLED => Frame::Cancelled(json(k, &payload)?),
        kind::READY => Frame::Ready(json(k, &payload)?),
        kind::RESUME => Frame::Resume(json(k, &payload)?),
        other => return Err(ProtoError::UnknownKind(other)),
    })
}

/// Decodes the first frame in `buf`, if it is complete.
///
/// Returns the frame and how many bytes of `buf` it used, or `None` when
/// more bytes are needed. A header announcing more than [`MAX_PAYLOAD`]
/// bytes is an error as soon as the header is complete, so a reader never
/// buffers an oversized frame.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtoError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge { len: len as u64 });
    }
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let frame = decode_payload(header[4], payload.to_vec())?;
    Ok(Some((frame, HEADER_LEN + len)))
}

fn too_large(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}"),
    )
}

/// Appends a frame of kind `k` with a raw `payload` to `buf`.
pub fn encode_raw(buf: &mut Vec<u8>, k: u8, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_PAYLOAD {
        return Err(too_large(payload.len()));
    }
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.push(k);
    buf.extend_from_slice(payload);
    Ok(())
}

pub(crate) fn encode_json<T: Serialize>(buf: &mut Vec<u8>, k: u8, v: &T) -> io::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(e) = serde_json::to_writer(&mut *buf, v) {
        buf.truncate(start);
        return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
    }
    let len = buf.len() - start - HEADER_LEN;
    if len > MAX_PAYLOAD {
        buf.truncate(start);
        return Err(too_large(len));
    }
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[start + 4] = k;
    Ok(())
}

/// Appends `f`, framed, to `buf`. On error `buf` is left as it was.
pub fn encode_frame(buf: &mut Vec<u8>, f: &Frame) -> io::Result<()> {
    let k = f.kind();
    match f {
        Frame::Hello(m) => encode_json(buf, k, m),
        Frame::Ping => encode_raw(buf, k, &[]),
        Frame::Pong(m) => encode_json(buf, k, m),
        Frame::Exec(m) => encode_json(buf, k, m),
        Frame::Started(m) => encode_json(buf, k, m),
        Frame::Stdout(b) | Frame::Stderr(b) => encode_raw(buf, k, b),
        Frame::Exit(m) => encode_json(buf, k, m),
        Frame::Cancel(m) | Frame::Cancelled(m) => encode_json(buf, k, m),
        Frame::Error(m) => encode_json(buf, k, m),
        Frame::Ready(m) => encode_json(buf, k, m),
        Frame::Resume(m) => encode_json(buf, k, m),
    }
}

/// Writes one frame with a single `write_all`.
pub fn write_frame(w: &mut impl Write, f: &Frame) -> io::Result<()> {
    let mut buf = Vec::with_capacity(128);
    encode_frame(&mut buf, f)?;
    w.write_all(&buf)
}

/// Reads one frame.
///
/// A connection closed exactly between two frames is [`ProtoError::Closed`];
/// closed inside a frame, an [`io::ErrorKind::UnexpectedEof`].
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(ProtoError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge { len: len as u64 });
    }
    let mut payload = vec![0; len];
    r.read_exact(&mut payload)?;
    decode_payload(header[4], payload)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                version: 1,
                agent: "test".into(),
            }),
            Frame::Ping,
            Frame::Pong(Pong {
                version: 1,
                uptime_ms: 5,
                running: 2,
            }),
            Frame::Exec(ExecRequest {
                argv: vec!["/bin/sh".into(), "-c".into(), "echo é".into()],
                env: vec!["A=B".into()],
                cwd: Some("/tmp".into()),
                uid: Some(1000),
                gid: Some(100),
                stdin: Some(vec![0, 1, 2, 255]),
                timeout_ms: Some(5),
                ready: true,
            }),
            Frame::Exec(ExecRequest::default()),
            Frame::Ready(Ready { exec_id: 7 }),
            Frame::Resume(Resume {
                exec_id: 7,
                message: "{\"restored\":true}".into(),
                timeout_ms: Some(9),
            }),
            Frame::Started(Started {
                exec_id: 7,
                pid: 42,
            }),
            Frame::Stdout(b"out\n".to_vec()),
            Frame::Stderr(vec![0xff, 0, 0xfe]),
            Frame::Stdout(vec![]),
            Frame::Exit(ExecResult {
                exec_id: 7,
                exit_code: Some(3),
                signal: None,
                timed_out: true,
                cancelled: true,
                spawn_us: 1,
                wall_us: 2,
                user_us: 3,
                sys_us: 4,
                max_rss_kb: 5,
                spawn_error: Some("nope".into()),
                parked: true,
            }),
            Frame::Cancel(Cancel {
                exec_id: 7,
                signal: 9,
            }),
            Frame::Cancelled(Cancel {
                exec_id: 7,
                signal: 15,
            }),
            Frame::Error(ErrorMsg {
                message: "bad".into(),
            }),
        ]
    }

    #[test]
    fn every_frame_round_trips_through_read_and_decode() {
        let mut wire = Vec::new();
        for f in samples() {
            write_frame(&mut wire, &f).unwrap();
        }
        let mut r = &wire[..];
        for f in samples() {
            assert_eq!(read_frame(&mut r).unwrap(), f);
        }
        assert!(matches!(read_frame(&mut r), Err(ProtoError::Closed)));

        let mut rest = &wire[..];
        for f in samples() {
            let (got, used) = decode_frame(rest).unwrap().unwrap();
            assert_eq!(got, f);
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &samples()[3]).unwrap();
        for cut in 0..wire.len() {
            assert!(decode_frame(&wire[..cut]).unwrap().is_none(), "cut {cut}");
            let mut r = &wire[..cut];
            match read_frame(&mut r) {
                Err(ProtoError::Closed) => assert_eq!(cut, 0),
                Err(ProtoError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn wire_layout_is_length_kind_payload() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Frame::Stderr(b"ab".to_vec())).unwrap();
        assert_eq!(wire, [2, 0, 0, 0, kind::STDERR, b'a', b'b']);
        wire.clear();
        write_frame(&mut wire, &Frame::Ping).unwrap();
        assert_eq!(wire, [0, 0, 0, 0, kind::PING]);
        wire.clear();
        write_frame(
            &mut wire,
            &Frame::Exec(ExecRequest {
                argv: vec!["x".into()],
                stdin: Some(b"hi".to_vec()),
                ..ExecRequest::default()
            }),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&wire[HEADER_LEN..]).unwrap();
        assert_eq!(v["stdin"], "aGk=");
        assert_eq!(v["cwd"], serde_json::Value::Null);
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_them() {
        let header = [0x01, 0x00, 0x10, 0x00, kind::STDOUT]; // 1 MiB + 1
        assert!(matches!(
            decode_frame(&header),
            Err(ProtoError::TooLarge { len }) if len == (MAX_PAYLOAD + 1) as u64
        ));
        let mut r = &header[..];
        assert!(matches!(
            read_frame(&mut r),
            Err(ProtoError::TooLarge { .. })
        ));
        let huge = [0xff, 0xff, 0xff, 0xff, kind::EXEC];
        assert!(matches!(
            decode_frame(&huge),
            Err(ProtoError::TooLarge { .. })
        ));

        // Exactly the limit is fine.
        let mut wire = Vec::new();
        write_frame(&mut wire, &Frame::Stdout(vec![7; MAX_PAYLOAD])).unwrap();
        let (f, used) = decode_frame(&wire).unwrap().unwrap();
        assert_eq!(used, MAX_PAYLOAD + HEADER_LEN);
        assert!(matches!(f, Frame::Stdout(b) if b.len() == MAX_PAYLOAD));

        // Writers refuse too, and leave the buffer untouched.
        let mut buf = vec![1, 2];
        let e = encode_frame(&mut buf, &Frame::Stdout(vec![0; MAX_PAYLOAD + 1])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let big = ExecRequest {
            stdin: Some(vec![0; MAX_PAYLOAD]),
            ..ExecRequest::default()
        };
        encode_frame(&mut buf, &Frame::Exec(big)).unwrap_err();
        assert_eq!(buf, [1, 2]);
    }

    #[test]
    fn unknown_kinds_and_bad_json_are_errors() {
        assert!(matches!(
            decode_frame(&[0, 0, 0, 0, 0]),
            Err(ProtoError::UnknownKind(0))
        ));
        assert!(matches!(
            decode_frame(&[0, 0, 0, 0, 200]),
            Err(ProtoError::UnknownKind(200))
        ));
        for (k, body) in [
            (kind::EXEC, &b"{not json"[..]),
            (kind::EXEC, b"[1,2]"),
            (kind::EXEC, b"{\"argv\": \"sh\"}"),
            (kind::EXEC, b"{\"stdin\": \"***\"}"),
            (kind::HELLO, b""),
            (kind::EXIT, b"{\"exec_id\": -1}"),
            (kind::CANCEL, b"null"),
            (kind::READY, b"{\"exec_id\": \"x\"}"),
            (kind::RESUME, b"{\"message\": 7}"),
        ] {
            let mut wire = Vec::new();
            encode_raw(&mut wire, k, body).unwrap();
            match decode_frame(&wire) {
                Err(ProtoError::BadJson { kind: name, .. }) => assert_eq!(name, kind_name(k)),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_ones_default() {
        let mut wire = Vec::new();
        encode_raw(
            &mut wire,
            kind::EXEC,
            br#"{"argv":["/bin/true"],"future_field":{"x":1}}"#,
        )
        .unwrap();
        let (f, _) = decode_frame(&wire).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Exec(ExecRequest {
                argv: vec!["/bin/true".into()],
                ..ExecRequest::default()
            })
        );
    }
}
