//! The wire protocol of Ember's in-container exec agent, and a blocking
//! client for it.
//!
//! The agent (`ember-agent`) is PID 1 of every runner container and listens
//! on a Unix socket in a directory bind-mounted from the host. A client
//! sends [`Frame::Hello`], then any sequence of pings and execs; an exec's
//! answer is [`Frame::Started`], output chunks as they arrive
//! ([`Frame::Stdout`], [`Frame::Stderr`]) and finally [`Frame::Exit`].
//! `docs/agent-protocol.md` in the repository is the full description.
//!
//! * [`frame`]: the framing (`u32` LE length, `u8` kind, payload) and
//!   [`read_frame`] / [`write_frame`], plus the incremental
//!   [`decode_frame`] / [`encode_frame`] the agent's event loop uses.
//! * [`message`]: the JSON bodies of control frames.
//! * [`AgentClient`]: one connection, many sequential execs; no threads, no
//!   async runtime.
//!
//! ```no_run
//! use std::time::Duration;
//! use ember_agent_proto::{AgentClient, ExecRequest};
//!
//! let mut c = AgentClient::connect_timeout("/run/ember/agent.sock".as_ref(), Duration::from_secs(5))?;
//! c.set_timeout(Some(Duration::from_millis(200)))?;
//! assert_eq!(c.ping()?.running, 0);
//! c.set_timeout(None)?;
//! let req = ExecRequest { argv: vec!["/bin/true".into()], ..ExecRequest::default() };
//! let r = c.exec(&req, &mut |_, _| {})?;
//! assert!(r.success());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod b64;
mod client;
pub mod frame;
pub mod message;

pub use client::Readiness;
pub use client::{AgentClient, ClientError};
pub use frame::{
    Frame, HEADER_LEN, MAX_PAYLOAD, ProtoError, decode_frame, encode_frame, read_frame, write_frame,
};
pub use message::{
    Cancel, ErrorMsg, ExecRequest, ExecResult, Hello, MAX_RESUME_MESSAGE, Pong, Ready, Resume,
    Started,
};

/// The protocol version both sides put in their [`Hello`]. Peers with
/// different versions do not talk: the agent answers a mismatching hello
/// with an error frame and closes the connection.
pub const PROTOCOL_VERSION: u32 = 1;
