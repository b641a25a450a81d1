//! The agent's event loop: one thread, one `poll(2)` over the listening
//! socket, the signalfd, every client connection and every exec's pipes.
//!
//! Nothing blocks the loop except `spawn` (which waits for the child's
//! `execve`, about a hundred microseconds). Writes to clients are
//! buffered per connection and flushed without blocking; when a client
//! reads slowly its buffer grows to [`HIGH_WATER`] and the agent stops
//! reading that exec's pipes (and that client's requests), so a slow
//! reader slows its own command down instead of growing the agent.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_agent_proto::frame::{encode_raw, kind};
use ember_agent_proto::{
    Cancel, ErrorMsg, ExecRequest, ExecResult, Frame, Hello, MAX_RESUME_MESSAGE, PROTOCOL_VERSION,
    Pong, ProtoError, Ready, Resume, Started, decode_frame, encode_frame,
};

use crate::spawn::{self, Spawned};
use crate::{sys, tree};

/// Pending output per connection above which the agent stops reading that
/// connection's exec pipes and requests.
const HIGH_WATER: usize = 1 << 20;
/// Size of one read from a pipe or socket, and so the largest output frame.
const CHUNK: usize = 64 * 1024;
/// After an exec's main process is reaped and its tree killed, how long
/// its pipes may stay silent without reaching EOF before the agent closes
/// them (a process that escaped the kill still holds them).
const DRAIN_GRACE: Duration = Duration::from_millis(250);
/// Most client connections at once; more are closed on accept.
const MAX_CONNS: usize = 256;
/// Most execs at once (each holds two or three pipes).
const MAX_EXECS: usize = 128;

/// What the agent needs to start.
pub struct Config {
    /// Where to listen.
    pub socket: PathBuf,
}

/// Vec-backed slab: stable indices, slots reused.
struct Slab<T>(Vec<Option<T>>);

impl<T> Slab<T> {
    fn insert(&mut self, v: T) -> usize {
        if let Some(i) = self.0.iter().position(Option::is_none) {
            self.0[i] = Some(v);
            i
        } else {
            self.0.push(Some(v));
            self.0.len() - 1
        }
    }
    fn get(&self, i: usize) -> Option<&T> {
        self.0.get(i).and_then(Option::as_ref)
    }
    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.0.get_mut(i).and_then(Option::as_mut)
    }
    fn remove(&mut self, i: usize) -> Option<T> {
        self.0.get_mut(i).and_then(Option::take)
    }
    fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (i, v)))
    }
    fn iter_mut(&mut self) -> impl Iterator<Item = (usize, &mut T)> {
        self.0
            .iter_mut()
            .enumerate()
            .filter_map(|(i, v)| v.as_mut().map(|v| (i, v)))
    }
    fn len(&self) -> usize {
        self.0.iter().filter(|v| v.is_some()).count()
    }
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    /// Bytes received and not yet decoded.
    rbuf: Vec<u8>,
    /// Encoded frames not yet written, from `wpos` on.
    wbuf: Vec<u8>,
    wpos: usize,
    /// The client's hello has been accepted.
    greeted: bool,
    /// The exec this connection is running (one at a time).
    exec: Option<usize>,
    /// Close once `wbuf` is flushed (after a fatal error frame).
    close_after_flush: bool,
    /// The peer is gone or the socket failed: drop at the end of the turn.
    dead: bool,
}

impl Conn {
    fn pending(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    fn send(&mut self, f: &Frame) {
        // Only an over-limit payload can fail to encode, and the agent
        // never builds one (output chunks are CHUNK bytes at most).
        if let Err(e) = encode_frame(&mut self.wbuf, f) {
            eprintln!("ember-agent: dropping {} frame: {e}", f.name());
        }
    }

    fn error(&mut self, message: impl Into<String>) {
        self.send(&Frame::Error(ErrorMsg {
            message: message.into(),
        }));
    }

    /// Sends an error frame and closes the connection after it.
    fn fatal(&mut self, message: impl Into<String>) {
        self.error(message);
        self.close_after_flush = true;
    }
}

/// Bytes still to be written to a child's stdin.
struct StdinFeed {
    file: File,
    data: Vec<u8>,
    pos: usize,
}

/// Longest line a program may write before `ready` (or instead of it)
/// before the agent stops listening.
const READY_LINE_MAX: usize = 4096;

/// Where a `ready` exec is in the readiness protocol.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadyState {
    /// Waiting for the program's `ready` line.
    Waiting,
    /// It wrote `ready`: survives its client, waits for a `Resume`.
    Parked,
    /// Resumed and running a request: a `ready` line (optionally with an
    /// exit code) ends the request and parks the exec again, so one copy
    /// serves request after request.
    Serving,
    /// The program closed its end, or wrote something else or too much:
    /// an ordinary exec from now on.
    Done,
}

/// The agent's end of a `ready` exec's readiness socket.
struct ReadyChan {
    sock: UnixStream,
    line: Vec<u8>,
    state: ReadyState,
    /// When the request now served was resumed.
    resumed: Option<Instant>,
}

/// How the main process ended.
struct Exited {
    status: libc::c_int,
    rusage: libc::rusage,
    at: Instant,
}

/// One running (or draining) exec.
struct Exec {
    id: u64,
    /// The connection to report to; `None` once it went away.
    conn: Option<usize>,
    /// Main process; also the pgid and sid of the exec's processes.
    pid: libc::pid_t,
    stdout: Option<File>,
    stderr: Option<File>,
    stdin: Option<StdinFeed>,
    spawned: Instant,
    spawn_us: u64,
    deadline: Option<Instant>,
    timed_out: bool,
    cancelled: bool,
    /// Set when the main process has been reaped; the exec is finished
    /// once its pipes are closed too.
    exited: Option<Exited>,
    /// While draining: close the pipes if nothing arrives before this.
    drain_until: Option<Instant>,
    /// The readiness protocol, for execs that asked for it.
    ready: Option<ReadyChan>,
}

impl Exec {
    fn running(&self) -> bool {
        self.exited.is_none()
    }

    fn parked(&self) -> bool {
        self.ready
            .as_ref()
            .is_some_and(|r| r.state == ReadyState::Parked)
    }
}

/// What a pollfd entry stands for.
#[derive(Clone, Copy)]
enum Tag {
    Listener,
    Signals,
    Conn(usize),
    Out(usize, bool),
    Stdin(usize),
    Ready(usize),
}

struct Agent {
    listener: UnixListener,
    socket: PathBuf,
    sigfd: OwnedFd,
    devnull: OwnedFd,
    /// The agent is its pid namespace's init.
    pid1: bool,
    me: libc::pid_t,
    started: Instant,
    conns: Slab<Conn>,
    execs: Slab<Exec>,
    next_exec_id: u64,
    /// SIGTERM/SIGINT arrived: refuse new execs, exit when none is left.
    shutting_down: bool,
    /// Out of descriptors: stop polling the listener until then, rather
    /// than spin on a socket that stays readable.
    accept_paused_until: Option<Instant>,
    /// One reusable read buffer for every pipe and socket.
    scratch: Vec<u8>,
    /// The stack spawned children run on until their execve.
    child_stack: Vec<u8>,
    pollfds: Vec<libc::pollfd>,
    tags: Vec<Tag>,
}

/// Binds `path` as a socket only its owner can use, replacing a stale one.
fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new().recursive(true).create(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The socket file gets mode 0600 from the umask at bind time; there is
    // no window in which it is more open. Execs inherit the old umask.
    let old = sys::umask(0o177);
    let l = UnixListener::bind(path);
    sys::umask(old);
    let l = l?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Runs the agent until it is told to stop (SIGTERM or SIGINT once no exec
/// is left).
pub fn run(cfg: Config) -> io::Result<()> {
    sys::ensure_stdio()?;
    // SAFETY: getpid takes nothing and cannot fail.
    let me = unsafe { libc::getpid() };
    let pid1 = me == 1;
    if !pid1 {
        sys::set_child_subreaper()?;
    }
    // Before anything else, so no child exit or signal is missed.
    let sigfd = sys::signalfd()?;
    let listener = bind(&cfg.socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("listening on {}: {e}", cfg.socket.display()),
        )
    })?;
    let mut agent = Agent {
        listener,
        socket: cfg.socket,
        sigfd,
        devnull: sys::open_devnull()?,
        pid1,
        me,
        started: Instant::now(),
        conns: Slab(Vec::new()),
        execs: Slab(Vec::new()),
        next_exec_id: 1,
        shutting_down: false,
        accept_paused_until: None,
        scratch: vec![0; CHUNK],
        child_stack: vec![0; spawn::CHILD_STACK],
        pollfds: Vec::with_capacity(16),
        tags: Vec::with_capacity(16),
    };
    let r = agent.run();
    let _ = std::fs::remove_file(&agent.socket);
    r
}

impl Agent {
    fn run(&mut self) -> io::Result<()> {
        loop {
            if self.shutting_down && self.execs.len() == 0 {
                self.final_flush();
                return Ok(());
            }
            self.build_poll();
            let timeout = self.poll_timeout();
            sys::poll(&mut self.pollfds, timeout)?;
            for i in 0..self.pollfds.len() {
                let (revents, tag) = (self.pollfds[i].revents, self.tags[i]);
                if revents == 0 {
                    continue;
                }
                match tag {
                    Tag::Listener => self.accept(),
                    Tag::Signals => self.signals()?,
                    Tag::Conn(c) => {
                        if revents & libc::POLLOUT != 0 {
                            self.flush(c);
                        }
                        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                            self.conn_readable(c);
                        }
                    }
                    Tag::Out(e, is_stderr) => self.out_readable(e, is_stderr),
                    Tag::Stdin(e) => self.feed_stdin(e),
                    Tag::Ready(e) => self.ready_readable(e),
                }
            }
            // A child closes its pipes a moment before it becomes a zombie
            // and SIGCHLD is sent; when an exec's pipes are both at EOF, try
            // to reap right away instead of sleeping until the signal.
            if self
                .execs
                .iter()
                .any(|(_, e)| e.running() && e.stdout.is_none() && e.stderr.is_none())
            {
                self.reap();
            }
            self.check_deadlines();
            self.finish_execs();
            self.flush_and_close();
        }
    }

    fn build_poll(&mut self) {
        let pfd = |fd: i32, events: i16| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        self.pollfds.clear();
        self.tags.clear();
        if self
            .accept_paused_until
            .is_some_and(|t| t <= Instant::now())
        {
            self.accept_paused_until = None;
        }
        if self.accept_paused_until.is_none() {
            self.pollfds
                .push(pfd(self.listener.as_raw_fd(), libc::POLLIN));
            self.tags.push(Tag::Listener);
        }
        self.pollfds.push(pfd(self.sigfd.as_raw_fd(), libc::POLLIN));
        self.tags.push(Tag::Signals);
        for (i, c) in self.conns.iter() {
            let mut ev = 0;
            if c.pending() < HIGH_WATER && !c.close_after_flush {
                ev |= libc::POLLIN;
            }
            if c.pending() > 0 {
                ev |= libc::POLLOUT;
            }
            self.pollfds.push(pfd(c.stream.as_raw_fd(), ev));
            self.tags.push(Tag::Conn(i));
        }
        for (i, e) in self.execs.iter() {
            let backlogged = e
                .conn
                .and_then(|c| self.conns.get(c))
                .is_some_and(|c| c.pending() >= HIGH_WATER);
            if !backlogged {
                for (f, is_stderr) in [(&e.stdout, false), (&e.stderr, true)] {
                    if let Some(f) = f {
                        self.pollfds.push(pfd(f.as_raw_fd(), libc::POLLIN));
                        self.tags.push(Tag::Out(i, is_stderr));
                    }
                }
            }
            if let Some(s) = &e.stdin {
                self.pollfds.push(pfd(s.file.as_raw_fd(), libc::POLLOUT));
                self.tags.push(Tag::Stdin(i));
            }
            if let Some(r) = &e.ready
                && matches!(r.state, ReadyState::Waiting | ReadyState::Serving)
                && e.running()
            {
                self.pollfds.push(pfd(r.sock.as_raw_fd(), libc::POLLIN));
                self.tags.push(Tag::Ready(i));
            }
        }
    }

    /// Milliseconds until the nearest timeout or drain deadline, or -1.
    fn poll_timeout(&self) -> libc::c_int {
        let next = self
            .execs
            .iter()
            .filter_map(|(_, e)| {
                if e.running() {
                    e.deadline
                } else {
                    e.drain_until
                }
            })
            .chain(self.accept_paused_until)
            .min();
        match next {
            None => -1,
            Some(t) => {
                let d = t.saturating_duration_since(Instant::now());
                // Round up, so we never wake a hair early and spin.
                d.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNS || stream.set_nonblocking(true).is_err() {
                        continue; // dropped: closed
                    }
                    self.conns.insert(Conn {
                        stream,
                        rbuf: Vec::new(),
                        wbuf: Vec::new(),
                        wpos: 0,
                        greeted: false,
                        exec: None,
                        close_after_flush: false,
                        dead: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and friends: the pending connection stays
                    // queued; try again a little later.
                    eprintln!("ember-agent: accept: {e}");
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    fn signals(&mut self) -> io::Result<()> {
        while let Some(sig) = sys::read_signal(&self.sigfd)? {
            if sig == libc::SIGCHLD {
                self.reap();
                continue;
            }
            // Forward to every running exec's process group, as tini
            // forwards to its child.
            for (_, e) in self.execs.iter().filter(|(_, e)| e.running()) {
                let _ = sys::kill(-e.pid, sig);
            }
            if sig == libc::SIGTERM || sig == libc::SIGINT {
                self.shutting_down = true;
            }
        }
        Ok(())
    }

    /// Reaps every exited child: execs' main processes, and orphans that
    /// were reparented to the agent.
    fn reap(&mut self) {
        while let Some(r) = sys::reap_one() {
            let Some((i, e)) = self
                .execs
                .iter_mut()
                .find(|(_, e)| e.pid == r.pid && e.running())
            else {
                continue;
            };
            let now = Instant::now();
            e.exited = Some(Exited {
                status: r.status,
                rusage: r.rusage,
                at: now,
            });
            e.drain_until = Some(now + DRAIN_GRACE);
            e.stdin = None;
            self.kill_leftovers(i);
        }
    }

    /// The process-tree rule, applied when exec `i`'s main process ended.
    /// See `tree.rs`.
    fn kill_leftovers(&mut self, i: usize) {
        let Some(pid) = self.execs.get(i).map(|e| e.pid) else {
            return;
        };
        tree::kill_group(pid);
        let others: Vec<libc::pid_t> = self
            .execs
            .iter()
            .filter(|(_, e)| e.running())
            .map(|(_, e)| e.pid)
            .collect();
        if !others.is_empty() {
            tree::kill_session(pid, self.me);
        } else if self.pid1 {
            tree::kill_namespace();
        } else {
            tree::kill_descendants(self.me, &others);
        }
    }

    fn conn_readable(&mut self, ci: usize) {
        let Some(c) = self.conns.get_mut(ci) else {
            return;
        };
        loop {
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    c.dead = true;
                    break;
                }
                Ok(n) => {
                    c.rbuf.extend_from_slice(&self.scratch[..n]);
                    if n < self.scratch.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    c.dead = true;
                    break;
                }
            }
        }
        let received = Instant::now();
        let mut rbuf = std::mem::take(&mut c.rbuf);
        let mut used = 0;
        loop {
            if self
                .conns
                .get(ci)
                .is_none_or(|c| c.close_after_flush || c.dead)
            {
                break;
            }
            match decode_frame(&rbuf[used..]) {
                Ok(Some((f, n))) => {
                    used += n;
                    self.handle(ci, f, received);
                }
                Ok(None) => break,
                Err(e) => {
                    if let Some(c) = self.conns.get_mut(ci) {
                        c.fatal(bad_frame_message(&e));
                    }
                    break;
                }
            }
        }
        rbuf.drain(..used);
        if rbuf.is_empty() && rbuf.capacity() > 4 * CHUNK {
            rbuf = Vec::new();
        }
        if let Some(c) = self.conns.get_mut(ci) {
            c.rbuf = rbuf;
        }
    }

    fn handle(&mut self, ci: usize, f: Frame, received: Instant) {
        let running = self.execs.iter().filter(|(_, e)| e.running()).count();
        let uptime_ms = self.started.elapsed().as_millis() as u64;
        let Some(c) = self.conns.get_mut(ci) else {
            return;
        };
        if !c.greeted {
            match f {
                Frame::Hello(h) if h.version == PROTOCOL_VERSION => {
                    c.greeted = true;
                    c.send(&Frame::Hello(Hello {
                        version: PROTOCOL_VERSION,
                        agent: concat!("ember-agent/", env!("CARGO_PKG_VERSION")).into(),
                    }));
                }
                Frame::Hello(h) => c.fatal(format!(
                    "protocol version mismatch: the agent speaks {PROTOCOL_VERSION}, the client {}",
                    h.version
                )),
                other => c.fatal(format!("expected hello, got {}", other.name())),
            }
            return;
        }
        match f {
            Frame::Ping => c.send(&Frame::Pong(Pong {
                version: PROTOCOL_VERSION,
                uptime_ms,
                running: running as u32,
            })),
            Frame::Exec(req) => self.start_exec(ci, req, received),
            Frame::Cancel(cancel) => self.cancel(ci, cancel),
            Frame::Resume(r) => self.resume(ci, r),
            other => c.fatal(format!("unexpected {} frame from a client", other.name())),
        }
    }

    fn start_exec(&mut self, ci: usize, req: ExecRequest, received: Instant) {
        let refusal = if self.shutting_down {
            Some("the agent is shutting down".to_owned())
        } else if self.conns.get(ci).is_some_and(|c| c.exec.is_some()) {
            Some("an exec is already running on this connection".to_owned())
        } else if self.execs.len() >= MAX_EXECS {
            Some(format!("too many execs at once (limit {MAX_EXECS})"))
        } else {
            None
        };
        let prepared = match refusal {
            Some(r) => Err(r),
            None => spawn::prepare(&req),
        };
        let Some(c) = self.conns.get_mut(ci) else {
            return;
        };
        let p = match prepared {
            Ok(p) => p,
            Err(msg) => return c.error(format!("exec refused: {msg}")),
        };
        let id = self.next_exec_id;
        self.next_exec_id += 1;
        let child = match spawn::spawn(
            &p,
            req.stdin.is_some(),
            &self.devnull,
            &mut self.child_stack,
        ) {
            Ok(Spawned::Running(child)) => child,
            Ok(Spawned::Failed { message, exit_code }) => {
                return c.send(&Frame::Exit(ExecResult {
                    exec_id: id,
                    exit_code: Some(exit_code),
                    spawn_us: micros(received.elapsed()),
                    spawn_error: Some(message),
                    ..ExecResult::default()
                }));
            }
            Err(e) => return c.error(format!("exec failed: spawning a process: {e}")),
        };
        let spawned = Instant::now();
        let spawn_us = micros(spawned - received);
        c.send(&Frame::Started(Started {
            exec_id: id,
            pid: child.pid,
        }));
        let stdin = match (child.stdin, req.stdin) {
            (Some(file), Some(data)) => Some(StdinFeed { file, data, pos: 0 }),
            _ => None,
        };
        let ei = self.execs.insert(Exec {
            id,
            conn: Some(ci),
            pid: child.pid,
            stdout: Some(child.stdout),
            stderr: Some(child.stderr),
            stdin,
            spawned,
            spawn_us,
            deadline: req
                .timeout_ms
                .map(|ms| received + Duration::from_millis(ms)),
            timed_out: false,
            cancelled: false,
            exited: None,
            drain_until: None,
            ready: child.ready.map(|sock| ReadyChan {
                sock,
                line: Vec::new(),
                state: ReadyState::Waiting,
                resumed: None,
            }),
        });
        c.exec = Some(ei);
        // Most stdin fits the pipe: write it now rather than after a poll.
        self.feed_stdin(ei);
    }

    fn cancel(&mut self, ci: usize, cancel: Cancel) {
        let target = self
            .execs
            .iter_mut()
            .find(|(_, e)| e.id == cancel.exec_id && e.running());
        let reply = match target {
            None => Err(format!("no running exec {}", cancel.exec_id)),
            Some(_) if !(1..=libc::SIGRTMAX()).contains(&cancel.signal) => {
                Err(format!("invalid signal {}", cancel.signal))
            }
            Some((_, e)) => {
                e.cancelled = true;
                match sys::kill(-e.pid, cancel.signal) {
                    Ok(_) => Ok(()),
                    Err(err) => Err(format!("signalling exec {}: {err}", cancel.exec_id)),
                }
            }
        };
        if let Some(c) = self.conns.get_mut(ci) {
            match reply {
                Ok(()) => c.send(&Frame::Cancelled(cancel)),
                Err(m) => c.error(m),
            }
        }
    }

    /// Reads a `ready` exec's readiness socket until its next line. The
    /// first line `ready` parks the exec and tells its client with
    /// `Ready`; after a resume, `ready` or `ready CODE` ends the request
    /// with an `Exit` marked `parked` and parks the exec again. Anything
    /// else (another line, EOF, an overlong line) ends the protocol for
    /// this exec, which then runs on as an ordinary one.
    fn ready_readable(&mut self, ei: usize) {
        let Some(e) = self.execs.get_mut(ei) else {
            return;
        };
        let Some(r) = e.ready.as_mut() else { return };
        let mut buf = [0u8; 512];
        let line = loop {
            match r.sock.read(&mut buf) {
                Ok(0) => {
                    r.state = ReadyState::Done;
                    return;
                }
                Ok(n) => {
                    r.line.extend_from_slice(&buf[..n]);
                    if let Some(end) = r.line.iter().position(|&b| b == b'\n') {
                        break r.line[..end].to_vec();
                    }
                    if r.line.len() > READY_LINE_MAX {
                        r.state = ReadyState::Done;
                        return;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    r.state = ReadyState::Done;
                    return;
                }
            }
        };
        r.line = Vec::new();
        let served = r.state == ReadyState::Serving;
        let Some(code) = ready_line(&line, served) else {
            r.state = ReadyState::Done;
            return;
        };
        if served {
            // What the request printed before its `ready` line is its
            // output: take it from the pipes while the exec still serves
            // (a parked exec's output is dropped), before its end goes out.
            self.out_readable(ei, false);
            self.out_readable(ei, true);
        }
        let Some(e) = self.execs.get_mut(ei) else {
            return;
        };
        let Some(r) = e.ready.as_mut() else { return };
        r.state = ReadyState::Parked;
        let resumed = r.resumed.take();
        // The start-up's timeout ends with the start-up (a request's with
        // the request); a resume brings its own.
        e.deadline = None;
        let exec_id = e.id;
        if !served {
            if let Some(c) = e.conn.and_then(|c| self.conns.get_mut(c)) {
                c.send(&Frame::Ready(Ready { exec_id }));
            }
            return;
        }
        let (timed_out, cancelled) = (e.timed_out, e.cancelled);
        if let Some(c) = e.conn.and_then(|c| self.conns.get_mut(c)) {
            c.send(&Frame::Exit(ExecResult {
                exec_id,
                exit_code: Some(code),
                timed_out,
                cancelled,
                wall_us: resumed.map_or(0, |t| micros(t.elapsed())),
                parked: true,
                ..ExecResult::default()
            }));
        }
    }

    /// Wakes a parked exec and hands it to connection `ci`.
    fn resume(&mut self, ci: usize, r: Resume) {
        let own = self.conns.get(ci).and_then(|c| c.exec);
        let found = self
            .execs
            .iter()
            .find(|(_, e)| e.id == r.exec_id && e.running() && e.parked())
            .map(|(i, e)| (i, e.conn));
        // Any connection may take a parked exec over, also from a client
        // that is still connected (it may be closing right now): that one
        // then has no exec any more.
        let previous = found.and_then(|(_, owner)| owner).filter(|&o| o != ci);
        let check = match found {
            None => Err(format!("no parked exec {}", r.exec_id)),
            Some((i, _)) if own.is_some_and(|o| o != i) => {
                Err("an exec is already running on this connection".to_owned())
            }
            Some(_) if r.message.len() > MAX_RESUME_MESSAGE => Err(format!(
                "resume message of {} bytes exceeds {MAX_RESUME_MESSAGE}",
                r.message.len()
            )),
            Some(_) if r.message.contains('\n') => {
                Err("resume message contains a newline".to_owned())
            }
            Some((i, _)) => Ok(i),
        };
        let ei = match check {
            Ok(i) => i,
            Err(m) => {
                if let Some(c) = self.conns.get_mut(ci) {
                    c.error(m);
                }
                return;
            }
        };
        let Some(e) = self.execs.get_mut(ei) else {
            return;
        };
        let mut line = r.message.into_bytes();
        line.push(b'\n');
        let written = e
            .ready
            .as_mut()
            .map(|ch| (&ch.sock).write(&line))
            .unwrap_or(Ok(0));
        if !matches!(written, Ok(n) if n == line.len()) {
            // The program no longer reads its socket (or its buffer is
            // full): it cannot be resumed, and stays parked.
            let msg = format!(
                "exec {}: cannot write the resume message to its readiness socket",
                e.id
            );
            if let Some(c) = self.conns.get_mut(ci) {
                c.error(msg);
            }
            return;
        }
        if let Some(c) = previous.and_then(|o| self.conns.get_mut(o)) {
            c.exec = None;
        }
        let Some(c) = self.conns.get_mut(ci) else {
            return;
        };
        if let Some(ch) = e.ready.as_mut() {
            ch.state = ReadyState::Serving;
            ch.resumed = Some(Instant::now());
        }
        // A cancel of the request before (a signal the program survived
        // and parked itself after) is not this request's.
        e.cancelled = false;
        e.conn = Some(ci);
        e.deadline = r
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        c.exec = Some(ei);
        c.send(&Frame::Started(Started {
            exec_id: e.id,
            pid: e.pid,
        }));
    }

    fn out_readable(&mut self, ei: usize, is_stderr: bool) {
        let Some(e) = self.execs.get_mut(ei) else {
            return;
        };
        let mut conn = e.conn.and_then(|c| self.conns.get_mut(c));
        let pipe = if is_stderr {
            &mut e.stderr
        } else {
            &mut e.stdout
        };
        let k = if is_stderr {
            kind::STDERR
        } else {
            kind::STDOUT
        };
        // A parked exec's output belongs to no request: read and dropped.
        if e.ready
            .as_ref()
            .is_some_and(|r| r.state == ReadyState::Parked)
        {
            conn = None;
        }
        loop {
            let Some(f) = pipe.as_mut() else { return };
            if conn.as_ref().is_some_and(|c| c.pending() >= HIGH_WATER) {
                return;
            }
            match f.read(&mut self.scratch) {
                Ok(0) => *pipe = None,
                Ok(n) => {
                    if let Some(c) = conn.as_mut() {
                        let _ = encode_raw(&mut c.wbuf, k, &self.scratch[..n]);
                    }
                    if e.exited.is_some() {
                        e.drain_until = Some(Instant::now() + DRAIN_GRACE);
                    }
                    continue;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => *pipe = None,
            }
            return;
        }
    }

    fn feed_stdin(&mut self, ei: usize) {
        let Some(e) = self.execs.get_mut(ei) else {
            return;
        };
        let Some(s) = e.stdin.as_mut() else { return };
        while s.pos < s.data.len() {
            match s.file.write(&s.data[s.pos..]) {
                Ok(n) => s.pos += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                // EPIPE: the child closed its stdin; the rest is dropped.
                Err(_) => break,
            }
        }
        e.stdin = None;
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let me = self.me;
        let conns = &self.conns;
        for (_, e) in self.execs.iter_mut() {
            // A client that is not reading holds the pipes back on
            // purpose; that is not silence.
            let backlogged = e
                .conn
                .and_then(|c| conns.get(c))
                .is_some_and(|c| c.pending() >= HIGH_WATER);
            if backlogged {
                e.drain_until = e.drain_until.map(|_| now + DRAIN_GRACE);
            }
            if e.running() {
                if e.deadline.is_some_and(|d| d <= now) && !e.timed_out {
                    e.timed_out = true;
                    tree::kill_group(e.pid);
                    tree::kill_session(e.pid, me);
                }
            } else if e.drain_until.is_some_and(|d| d <= now) {
                e.stdout = None;
                e.stderr = None;
            }
        }
    }

    /// Sends `Exit` for every exec whose main process is reaped and whose
    /// pipes are closed, and forgets it.
    fn finish_execs(&mut self) {
        let done: Vec<usize> = self
            .execs
            .iter()
            .filter(|(_, e)| !e.running() && e.stdout.is_none() && e.stderr.is_none())
            .map(|(i, _)| i)
            .collect();
        for i in done {
            let Some(e) = self.execs.remove(i) else {
                continue;
            };
            let Some(x) = e.exited else { continue };
            let Some(c) = e.conn.and_then(|c| self.conns.get_mut(c)) else {
                continue;
            };
            c.exec = None;
            let (exit_code, signal) = if libc::WIFEXITED(x.status) {
                (Some(libc::WEXITSTATUS(x.status)), None)
            } else if libc::WIFSIGNALED(x.status) {
                (None, Some(libc::WTERMSIG(x.status)))
            } else {
                (None, None)
            };
            let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
            c.send(&Frame::Exit(ExecResult {
                exec_id: e.id,
                exit_code,
                signal,
                timed_out: e.timed_out,
                cancelled: e.cancelled,
                spawn_us: e.spawn_us,
                wall_us: micros(x.at - e.spawned),
                user_us: tv(x.rusage.ru_utime),
                sys_us: tv(x.rusage.ru_stime),
                max_rss_kb: x.rusage.ru_maxrss.max(0) as u64,
                spawn_error: None,
                parked: false,
            }));
        }
    }

    /// Writes what can be written without blocking.
    fn flush(&mut self, ci: usize) {
        let Some(c) = self.conns.get_mut(ci) else {
            return;
        };
        while c.pending() > 0 {
            match c.stream.write(&c.wbuf[c.wpos..]) {
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A client that keeps up only partly never empties the
                    // buffer: drop the written prefix now and then, so the
                    // buffer stays near HIGH_WATER instead of growing with
                    // everything ever sent.
                    if c.wpos >= HIGH_WATER / 4 {
                        c.wbuf.drain(..c.wpos);
                        c.wpos = 0;
                    }
                    return;
                }
                Err(_) => {
                    c.dead = true;
                    return;
                }
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
        if c.wbuf.capacity() > 4 * CHUNK {
            c.wbuf = Vec::new();
        }
    }

    /// Flushes every connection and drops the ones that are done. An exec
    /// whose connection goes away is killed (its result has nowhere to go).
    fn flush_and_close(&mut self) {
        let ids: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for ci in ids {
            self.flush(ci);
            let Some(c) = self.conns.get(ci) else {
                continue;
            };
            if !(c.dead || (c.close_after_flush && c.pending() == 0)) {
                continue;
            }
            let exec = c.exec;
            self.conns.remove(ci);
            if let Some(e) = exec.and_then(|ei| self.execs.get_mut(ei)) {
                e.conn = None;
                // A parked exec waits for a resume from a later connection
                // (its output meanwhile is read and dropped).
                if e.running() && !e.parked() {
                    e.cancelled = true;
                    tree::kill_group(e.pid);
                }
            }
        }
    }

    /// Before exiting: give clients up to a second to take their last
    /// frames.
    fn final_flush(&mut self) {
        for (_, c) in self.conns.iter_mut() {
            if c.pending() > 0 && !c.dead {
                let _ = c.stream.set_nonblocking(false);
                let _ = c.stream.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = c.stream.write_all(&c.wbuf[c.wpos..]);
            }
        }
    }
}

/// The exit code a readiness line stands for, if it is one: `ready`
/// (code 0) and, once the exec has been resumed (`served`), `ready CODE`
/// with CODE 0–255. Surrounding whitespace is ignored.
fn ready_line(line: &[u8], served: bool) -> Option<i32> {
    let line = std::str::from_utf8(line).ok()?.trim();
    let rest = line.strip_prefix("ready")?;
    if rest.is_empty() {
        return Some(0);
    }
    if !served || !rest.starts_with(char::is_whitespace) {
        return None;
    }
    rest.trim().parse::<u8>().ok().map(i32::from)
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

fn bad_frame_message(e: &ProtoError) -> String {
    format!("bad frame: {}", ember_error::chain(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lines() {
        assert_eq!(ready_line(b"ready", false), Some(0));
        assert_eq!(ready_line(b" ready \r", false), Some(0));
        // A code only ends a request, never a start-up.
        assert_eq!(ready_line(b"ready 3", false), None);
        assert_eq!(ready_line(b"ready 3", true), Some(3));
        assert_eq!(ready_line(b"ready\t255", true), Some(255));
        for bad in [
            "ready 256",
            "ready -1",
            "ready x",
            "readyy",
            "ready3",
            "done",
            "",
        ] {
            assert_eq!(ready_line(bad.as_bytes(), true), None, "{bad}");
        }
    }

    /// The fatal frame's text says why the JSON was refused, once.
    #[test]
    fn bad_frame_message_prints_the_chain_once() {
        let source = serde_json::from_slice::<u32>(b"{").expect_err("not a number");
        let why = source.to_string();
        let e = ProtoError::BadJson {
            kind: "exec",
            source,
        };
        assert_eq!(ember_error::repeated_source(&e), None);
        assert_eq!(
            bad_frame_message(&e),
            format!("bad frame: malformed exec frame: {why}")
        );
    }
}
