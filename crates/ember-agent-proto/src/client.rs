//! A blocking client: one Unix socket connection, many sequential execs.

use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::PROTOCOL_VERSION;
use crate::frame::{Frame, ProtoError, encode_frame, encode_json, kind, read_frame};
use crate::message::{Cancel, ExecRequest, ExecResult, Hello, Pong, Ready, Resume, Started};

/// A client call failed.
///
/// After [`ClientError::Io`] or [`ClientError::Proto`] the connection's
/// framing can no longer be trusted, and every later call on the same
/// client fails with [`ClientError::Broken`]: drop it and connect again.
/// After [`ClientError::Agent`] the connection is still usable (unless the
/// agent closed it, as it does after a version mismatch).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the agent's socket failed.
    #[error("connecting to agent socket {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why the connection failed.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the connection failed (timeouts included).
    #[error("agent connection I/O failed")]
    Io(#[source] io::Error),
    /// The agent sent something that is not a valid frame, or closed the
    /// connection, or speaks another version.
    #[error(transparent)]
    Proto(ProtoError),
    /// The agent answered with an error frame.
    #[error("agent refused: {0}")]
    Agent(String),
    /// The agent sent a valid frame that makes no sense at this point.
    #[error("unexpected frame from agent: {0}")]
    Unexpected(&'static str),
    /// An earlier I/O or protocol error left the connection unusable.
    #[error("agent connection unusable after an earlier error")]
    Broken,
}

impl From<ProtoError> for ClientError {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::Io(e) => ClientError::Io(e),
            other => ClientError::Proto(other),
        }
    }
}

impl ClientError {
    /// True for errors that mean the agent (or the connection to it) is
    /// gone or unhealthy, as opposed to a refused request.
    pub fn is_connection_error(&self) -> bool {
        !matches!(self, ClientError::Agent(_))
    }
}

/// How [`AgentClient::exec_until_ready`] came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The program wrote `ready` and is parked.
    Ready(Ready),
    /// It ended without doing so.
    Exited(ExecResult),
}

/// Blocking client over a Unix socket; one connection, many sequential
/// execs.
///
/// ```no_run
/// use ember_agent_proto::{AgentClient, ExecRequest};
/// let mut c = AgentClient::connect("/run/ember/agent.sock".as_ref())?;
/// let req = ExecRequest {
///     argv: vec!["/bin/echo".into(), "hi".into()],
///     env: vec!["PATH=/bin".into()],
///     ..ExecRequest::default()
/// };
/// let mut out = Vec::new();
/// let r = c.exec(&req, &mut |_stderr, bytes| out.extend_from_slice(bytes))?;
/// assert_eq!(r.exit_code, Some(0));
/// # Ok::<(), ember_agent_proto::ClientError>(())
/// ```
pub struct AgentClient {
    /// Reads go through the buffer; writes go to the inner stream directly,
    /// always as one whole frame.
    conn: BufReader<UnixStream>,
    wbuf: Vec<u8>,
    agent: Hello,
    broken: bool,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent", &self.agent)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Connects and exchanges [`Hello`]s; fails with
    /// [`ProtoError::VersionMismatch`] when the agent's version differs.
    pub fn connect(socket: &Path) -> Result<AgentClient, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?;
        Self::handshake(stream)
    }

    /// Like [`AgentClient::connect`], but retries while the socket is
    /// missing or refuses connections (the agent is still starting), for up
    /// to `timeout`, which also bounds the hello exchange.
    pub fn connect_timeout(socket: &Path, timeout: Duration) -> Result<AgentClient, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(500);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) => {
                    let now = Instant::now();
                    let retry = matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    );
                    if !retry || now >= deadline {
                        return Err(ClientError::Connect {
                            path: socket.to_owned(),
                            source: e,
                        });
                    }
                    std::thread::sleep(pause.min(deadline - now));
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        stream
            .set_read_timeout(Some(left))
            .map_err(ClientError::Io)?;
        stream
            .set_write_timeout(Some(left))
            .map_err(ClientError::Io)?;
        let mut c = Self::handshake(stream)?;
        c.set_timeout(None).map_err(ClientError::Io)?;
        Ok(c)
    }

    fn handshake(stream: UnixStream) -> Result<AgentClient, ClientError> {
        let mut c = AgentClient {
            conn: BufReader::with_capacity(64 * 1024, stream),
            wbuf: Vec::with_capacity(4096),
            agent: Hello::default(),
            broken: false,
        };
        c.send(&Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            agent: concat!("ember-agent-proto/", env!("CARGO_PKG_VERSION")).into(),
        }))?;
        match c.recv()? {
            Frame::Hello(h) if h.version == PROTOCOL_VERSION => {
                c.agent = h;
                Ok(c)
            }
            Frame::Hello(h) => Err(ClientError::Proto(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: h.version,
            })),
            Frame::Error(e) => Err(ClientError::Agent(e.message)),
            _ => Err(ClientError::Unexpected("expected hello")),
        }
    }

    /// The agent's [`Hello`].
    pub fn agent(&self) -> &Hello {
        &self.agent
    }

    /// Sets the read and write timeout of the connection (for health
    /// checks); `None` blocks forever. A call that times out fails with
    /// [`ClientError::Io`] and breaks the client.
    pub fn set_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        let s = self.conn.get_ref();
        s.set_read_timeout(t)?;
        s.set_write_timeout(t)
    }

    /// Health check: answered by the agent immediately, even while execs
    /// run.
    pub fn ping(&mut self) -> Result<Pong, ClientError> {
        self.send(&Frame::Ping)?;
        match self.recv()? {
            Frame::Pong(p) => Ok(p),
            Frame::Error(e) => Err(ClientError::Agent(e.message)),
            f => Err(self.unexpected(&f)),
        }
    }

    /// Runs one exec to completion, calling `on_output(is_stderr, bytes)`
    /// for each output chunk as it arrives.
    ///
    /// A command that cannot be spawned (missing program, bad `cwd`, failed
    /// `setuid`) is not an error here: it returns an [`ExecResult`] with
    /// exit code 127 (126 for permission errors) and `spawn_error` set. An
    /// invalid request (empty `argv`, `env` entry without `=`) is
    /// [`ClientError::Agent`].
    pub fn exec(
        &mut self,
        req: &ExecRequest,
        on_output: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<ExecResult, ClientError> {
        self.exec_with(req, &mut |_| {}, on_output)
    }

    /// Like [`AgentClient::exec`], and also calls `on_started` once the
    /// child runs, with its exec id (for [`AgentClient::cancel`] from
    /// another connection) and pid.
    pub fn exec_with(
        &mut self,
        req: &ExecRequest,
        on_started: &mut dyn FnMut(&Started),
        on_output: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<ExecResult, ClientError> {
        self.send_with(|buf| encode_json(buf, kind::EXEC, req))?;
        loop {
            match self.recv()? {
                Frame::Started(s) => on_started(&s),
                Frame::Stdout(b) => on_output(false, &b),
                Frame::Stderr(b) => on_output(true, &b),
                Frame::Exit(r) => return Ok(r),
                Frame::Error(e) => return Err(ClientError::Agent(e.message)),
                // Acks of cancels some other user of this protocol sent on
                // this connection; nothing to do.
                Frame::Cancelled(_) => {}
                f => return Err(self.unexpected(&f)),
            }
        }
    }

    /// Starts an exec with [`ExecRequest::ready`] set and waits until it
    /// signals readiness (it is then parked: this client may disconnect,
    /// and [`AgentClient::resume`] on any connection takes it over) or
    /// ends first.
    pub fn exec_until_ready(
        &mut self,
        req: &ExecRequest,
        on_started: &mut dyn FnMut(&Started),
        on_output: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<Readiness, ClientError> {
        let mut req = req.clone();
        req.ready = true;
        self.send_with(|buf| encode_json(buf, kind::EXEC, &req))?;
        loop {
            match self.recv()? {
                Frame::Started(s) => on_started(&s),
                Frame::Stdout(b) => on_output(false, &b),
                Frame::Stderr(b) => on_output(true, &b),
                Frame::Ready(r) => return Ok(Readiness::Ready(r)),
                Frame::Exit(r) => return Ok(Readiness::Exited(r)),
                Frame::Error(e) => return Err(ClientError::Agent(e.message)),
                Frame::Cancelled(_) => {}
                f => return Err(self.unexpected(&f)),
            }
        }
    }

    /// Wakes parked exec `exec_id` with `message` (one line, by convention
    /// JSON) and runs it to completion on this connection, like
    /// [`AgentClient::exec`]. Fails with [`ClientError::Agent`] when no such
    /// exec is parked.
    pub fn resume(
        &mut self,
        exec_id: u64,
        message: &str,
        timeout_ms: Option<u64>,
        on_output: &mut dyn FnMut(bool, &[u8]),
    ) -> Result<ExecResult, ClientError> {
        self.send(&Frame::Resume(Resume {
            exec_id,
            message: message.to_owned(),
            timeout_ms,
        }))?;
        loop {
            match self.recv()? {
                Frame::Started(_) | Frame::Cancelled(_) => {}
                Frame::Stdout(b) => on_output(false, &b),
                Frame::Stderr(b) => on_output(true, &b),
                Frame::Exit(r) => return Ok(r),
                Frame::Error(e) => return Err(ClientError::Agent(e.message)),
                f => return Err(self.unexpected(&f)),
            }
        }
    }

    /// Sends `signal` to the process group of running exec `exec_id`, which
    /// may belong to another connection. Fails with [`ClientError::Agent`]
    /// when no such exec is running (it may just have ended).
    pub fn cancel(&mut self, exec_id: u64, signal: i32) -> Result<(), ClientError> {
        self.send(&Frame::Cancel(Cancel { exec_id, signal }))?;
        match self.recv()? {
            Frame::Cancelled(c) if c.exec_id == exec_id => Ok(()),
            Frame::Error(e) => Err(ClientError::Agent(e.message)),
            f => Err(self.unexpected(&f)),
        }
    }

    fn unexpected(&mut self, f: &Frame) -> ClientError {
        self.broken = true;
        ClientError::Unexpected(f.name())
    }

    fn send(&mut self, f: &Frame) -> Result<(), ClientError> {
        self.send_with(|buf| encode_frame(buf, f))
    }

    /// Encodes one frame with `encode` and writes it.
    fn send_with(
        &mut self,
        encode: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
    ) -> Result<(), ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        self.wbuf.clear();
        // Nothing was written yet, so a frame that cannot be encoded (too
        // large) leaves the connection usable.
        encode(&mut self.wbuf).map_err(ClientError::Io)?;
        let r = self.conn.get_mut().write_all(&self.wbuf);
        if self.wbuf.capacity() > 1 << 16 {
            // Don't keep a large stdin's buffer around for every later exec.
            self.wbuf = Vec::with_capacity(4096);
        }
        r.map_err(|e| {
            self.broken = true;
            ClientError::Io(e)
        })
    }

    fn recv(&mut self) -> Result<Frame, ClientError> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        read_frame(&mut self.conn).map_err(|e| {
            self.broken = true;
            e.into()
        })
    }
}
