//! Ember's HTTP/1 accept-and-serve loop, bounded against hostile clients;
//! `ember cache` and `ember control` both serve through it.
//!
//! A plain `axum::serve` keeps every accepted connection for as long as the
//! client likes: twenty thousand connections that each send one byte use
//! up the process's file descriptors, and new clients time out. This loop
//! bounds each connection by what it is doing (the rules follow Go's
//! `net/http` server, whose `ReadHeaderTimeout` and `IdleTimeout` these
//! are):
//!
//! * **Header timeout** ([`Limits::header_timeout`]): a request's head must
//!   arrive within this, counted from the accept for a connection's first
//!   request and from its first byte for later ones.
//! * **Idle timeout** ([`Limits::idle_timeout`]): a keep-alive connection
//!   with no request in flight is closed after this long. A request in
//!   flight is never idle, however long its response streams or waits (a
//!   node's work stream, `logs --follow`, a large blob), unless it makes no
//!   progress *because of the client*: a response write the client does
//!   not read, or a request body the client stopped sending, for this long.
//! * **Connection cap** ([`Limits::max_connections`]): at the cap, a new
//!   connection closes the one that has waited longest without a request
//!   in flight (an idle one, or one still sending its head), so a client
//!   holding many silent connections cannot keep a normal client out. Only
//!   when every connection has a request in flight is the new one answered
//!   `503` at once and closed. An `accept` that fails for lack of file
//!   descriptors also closes the oldest such connection. Evicted
//!   connections close on their own tasks; while more than a few are still
//!   closing the server stops accepting (new ones wait in the kernel's
//!   backlog), so descriptors in use never exceed the cap by more than a
//!   small constant however busy the machine is.
//!
//! Each connection is one task that drives hyper's HTTP/1 connection and a
//! watchdog together; the watchdog ends the task (dropping the socket) when
//! a deadline passes. The connection's state is a few atomics updated by
//! the socket wrapper, the service and the bodies, all on that task.
//!
//! ```no_run
//! # async fn example(app: axum::Router) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = ember_http::Server::new(ember_http::Limits::new());
//! let stats = server.stats();
//! server.serve(listener, app, std::future::pending()).await;
//! # let _ = stats;
//! # Ok(())
//! # }
//! ```

pub mod client;
mod conn;
pub mod prom;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

use conn::{Closed, Conn};

/// Default [`Limits::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`Limits::idle_timeout`]: longer than the 90 s reqwest (and so
/// every Ember client) keeps an idle pooled connection, so the server is
/// not the side that closes one a client is about to reuse.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default [`Limits::max_connections`], when the open-file limit allows.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// How long connections may take and how many there may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The most a request's head may take to arrive (see the crate docs
    /// for when it is counted from).
    pub header_timeout: Duration,
    /// The most a connection may spend with no request in flight, or with
    /// its request stalled by the client.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Limits {
    /// The defaults: a 10 s header timeout, a 120 s idle timeout and
    /// [`default_max_connections`].
    pub fn new() -> Self {
        Limits {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: default_max_connections(),
        }
    }

    fn clamped(mut self) -> Self {
        let min = Duration::from_millis(1);
        self.header_timeout = self.header_timeout.max(min);
        self.idle_timeout = self.idle_timeout.max(min);
        self.max_connections = self.max_connections.max(1);
        self
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new()
    }
}

/// [`DEFAULT_MAX_CONNECTIONS`], or half the process's open-file limit (less
/// 64 for files, databases and upstream sockets) if that is lower: a
/// connection can hold a second descriptor (a blob file, an upstream
/// socket) while it is served.
pub fn default_max_connections() -> usize {
    let soft = nofile_limit().map_or(1024, |(soft, _)| soft);
    let half = usize::try_from(soft.saturating_sub(64) / 2).unwrap_or(usize::MAX);
    DEFAULT_MAX_CONNECTIONS.min(half).max(16)
}

/// The soft and hard `RLIMIT_NOFILE`.
pub fn nofile_limit() -> std::io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (what Go does for
/// every server at start); returns the new soft limit. Servers call it
/// before sizing their connection cap.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, setrlimit};
    let (soft, hard) = nofile_limit()?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
    }
    Ok(hard.max(soft))
}

/// What the server has done with connections; all counters but `open`
/// only grow.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections accepted and served.
    pub accepted: AtomicU64,
    /// Closed because a request's head did not arrive in time.
    pub header_timeouts: AtomicU64,
    /// Closed after the idle timeout with no request in flight.
    pub idle_timeouts: AtomicU64,
    /// Closed because the client stopped reading a response or sending a
    /// request body for the idle timeout.
    pub stalled: AtomicU64,
    /// Closed at the cap to make room for a new connection.
    pub evicted: AtomicU64,
    /// Answered `503` at the cap because every connection was busy.
    pub refused: AtomicU64,
}

impl Stats {
    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A bounded HTTP/1 server for one [`Router`].
pub struct Server {
    limits: Limits,
    drain: Option<Duration>,
    refusal: Vec<u8>,
    stats: Arc<Stats>,
}

impl Server {
    /// A server with these limits that, when asked to stop, waits for
    /// requests in flight to finish however long they take.
    pub fn new(limits: Limits) -> Self {
        Server {
            limits: limits.clamped(),
            drain: None,
            refusal: refusal_bytes("text/plain", "server at its connection limit\n"),
            stats: Arc::new(Stats::default()),
        }
    }

    /// How long a stop waits for requests in flight before it closes their
    /// connections (`None`: as long as they take). Servers with endless
    /// streams give a bound.
    pub fn drain(mut self, drain: Option<Duration>) -> Self {
        self.drain = drain;
        self
    }

    /// The body (and its content type) of the `503` a connection gets when
    /// the cap is reached and nothing can be closed for it, so each server
    /// can answer in its own error format.
    pub fn refusal(mut self, content_type: &str, body: &str) -> Self {
        self.refusal = refusal_bytes(content_type, body);
        self
    }

    /// The connection counters, live.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Serves `app` on `listener` until `shutdown` completes, then stops
    /// accepting, lets each connection finish the request it is serving
    /// (within the drain time) and returns when all are closed.
    pub async fn serve(
        self,
        listener: TcpListener,
        app: Router,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let limits = Arc::new(self.limits);
        let stats = self.stats;
        let registry = Arc::new(Registry::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut warned_at: Option<tokio::time::Instant> = None;
        tokio::pin!(shutdown);
        loop {
            // Evicted connections close on their own tasks, which a busy
            // accept loop can outrun: without this wait the descriptors in
            // use could exceed the cap by however many are still closing.
            // Unaccepted connections wait in the kernel's backlog instead.
            if !registry
                .wait_room(limits.max_connections + CLOSING_SLACK, &mut shutdown)
                .await
            {
                break;
            }
            let accepted = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = listener.accept() => r,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    // Out of descriptors (or memory): make room the same
                    // way the cap does, and give the close a moment.
                    if once_in_a_while(&mut warned_at) {
                        tracing::warn!(error = %ember_error::chain(&e), open = registry.live(), "accept failed; closing the oldest idle connection");
                    }
                    if registry.evict_oldest() {
                        Stats::add(&stats.evicted);
                    }
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                    continue;
                }
            };
            // No Nagle: a response's head and a small body are separate
            // writes, and Nagle would hold the second until the client's
            // delayed ACK (~40 ms); an assignment on a long-lived stream is
            // one small write.
            let _ = tcp.set_nodelay(true);
            if registry.live() >= limits.max_connections {
                if registry.evict_oldest() {
                    Stats::add(&stats.evicted);
                } else {
                    Stats::add(&stats.refused);
                    refuse(&tcp, &self.refusal);
                    continue;
                }
                if once_in_a_while(&mut warned_at) {
                    tracing::warn!(
                        max = limits.max_connections,
                        evicted = Stats::get(&stats.evicted),
                        refused = Stats::get(&stats.refused),
                        "at the connection cap: closing the longest-idle connections"
                    );
                }
            }
            let (conn, guard) = registry.insert(stats.clone());
            Stats::add(&stats.accepted);
            tokio::spawn(conn::serve_connection(
                tcp,
                app.clone(),
                conn,
                guard,
                limits.clone(),
                stop_rx.clone(),
                stats.clone(),
            ));
        }
        // New connections are refused by the kernel from here on.
        drop(listener);
        let _ = stop_tx.send(true);
        let drained = match self.drain {
            None => {
                registry.wait_empty().await;
                true
            }
            Some(d) => tokio::time::timeout(d, registry.wait_empty()).await.is_ok(),
        };
        if !drained {
            registry.close_all();
            registry.wait_empty().await;
        }
    }
}

fn refusal_bytes(content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {content_type}\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers a connection the server has no room for, without a task: the
/// request already received is read (closing a socket with unread bytes
/// sends a reset, which could overtake the answer) and the `503` fits in
/// the empty send buffer.
fn refuse(tcp: &TcpStream, answer: &[u8]) {
    let mut buf = [0u8; 8192];
    let _ = tcp.try_read(&mut buf);
    let _ = tcp.try_write(answer);
}

/// Errors of one connection that `accept` reports, not of the listener.
fn transient(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    ) || e.raw_os_error().is_some_and(|n| {
        [Errno::EPROTO, Errno::EPERM, Errno::ENETDOWN]
            .iter()
            .any(|x| *x as i32 == n)
    })
}

/// True at most once every ten seconds (for warnings under an attack).
fn once_in_a_while(last: &mut Option<tokio::time::Instant>) -> bool {
    let now = tokio::time::Instant::now();
    if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
        return false;
    }
    *last = Some(now);
    true
}

/// How many connections beyond the cap may be open while evicted ones are
/// still closing: bounds the descriptors in use to the cap plus this.
const CLOSING_SLACK: usize = 16;

/// The open connections, for the cap, eviction and draining.
#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
    /// Connections told to close that have not gone yet: they no longer
    /// count against the cap, or one new connection could close several.
    closing: AtomicUsize,
    /// Notified whenever a connection goes.
    left: Notify,
}

/// Removes its connection from the registry when the connection's task
/// ends, however it ends.
struct Registered {
    registry: Arc<Registry>,
    conn: Arc<Conn>,
    id: u64,
    stats: Arc<Stats>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        // Under the lock: a connection is told to close only while it is
        // in the map, so `closing` counts exactly those still in it.
        let mut map = self.registry.lock();
        map.remove(&self.id);
        if self.conn.evicting() {
            self.registry.closing.fetch_sub(1, Ordering::Relaxed);
        }
        drop(map);
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        self.registry.left.notify_waiters();
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // Every update leaves the map consistent.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(self: &Arc<Self>, stats: Arc<Stats>) -> (Arc<Conn>, Registered) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new());
        self.lock().insert(id, conn.clone());
        stats.open.fetch_add(1, Ordering::Relaxed);
        let guard = Registered {
            registry: self.clone(),
            conn: conn.clone(),
            id,
            stats,
        };
        (conn, guard)
    }

    /// Connections open and not told to close.
    fn live(&self) -> usize {
        let n = self.lock().len();
        n.saturating_sub(self.closing.load(Ordering::Relaxed))
    }

    /// Tells the connection that has waited longest without a request in
    /// flight to close; false if every connection is busy.
    fn evict_oldest(&self) -> bool {
        let map = self.lock();
        let victim = map
            .values()
            .filter_map(|c| c.waiting_since().map(|t| (t, c)))
            .min_by_key(|(t, _)| *t)
            .map(|(_, c)| c);
        match victim {
            Some(c) => {
                if c.close(Closed::Evicted) {
                    self.closing.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            None => false,
        }
    }

    /// Tells every connection to close (the drain time is over).
    fn close_all(&self) {
        let map = self.lock();
        for c in map.values() {
            if c.close(Closed::Drained) {
                self.closing.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Waits until fewer than `bound` connections are open, counting
    /// those told to close that have not gone yet; false if `shutdown`
    /// completed first.
    async fn wait_room(
        &self,
        bound: usize,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> bool {
        // The usual case, without arming a notification.
        if self.lock().len() < bound {
            return true;
        }
        loop {
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            if self.lock().len() < bound {
                return true;
            }
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return false,
                () = left => {}
            }
        }
    }

    async fn wait_empty(&self) {
        loop {
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            if self.lock().is_empty() {
                return;
            }
            left.await;
        }
    }
}
