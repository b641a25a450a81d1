//! One connection: its state, the wrappers that keep it current (socket,
//! service, request and response bodies) and the watchdog that closes it.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use crate::{Limits, Registered, Stats};

/// Accepted; its first request's head has not arrived (header timeout from
/// the accept).
const FRESH: u8 = 0;
/// No request in flight, nothing of the next one received (idle timeout).
const IDLE: u8 = 1;
/// Part of a later request's head received (header timeout from its first
/// byte).
const HEAD: u8 = 2;
/// A request in flight (no deadline unless the client stalls it).
const BUSY: u8 = 3;
/// The response is complete but hyper may still be writing it out (a body
/// given as one buffer is "done" before its bytes are sent): like `BUSY`
/// until hyper flushes the socket with nothing left to write.
const FLUSHING: u8 = 4;

/// Why the server closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    HeaderTimeout = 1,
    Idle = 2,
    Stalled = 3,
    Evicted = 4,
    Drained = 5,
}

impl Closed {
    fn from_u8(v: u8) -> Option<Closed> {
        Some(match v {
            1 => Closed::HeaderTimeout,
            2 => Closed::Idle,
            3 => Closed::Stalled,
            4 => Closed::Evicted,
            5 => Closed::Drained,
            _ => return None,
        })
    }

    fn count(self, stats: &Stats) {
        match self {
            Closed::HeaderTimeout => Stats::add(&stats.header_timeouts),
            Closed::Idle => Stats::add(&stats.idle_timeouts),
            Closed::Stalled => Stats::add(&stats.stalled),
            // Counted by the accept loop when it decided.
            Closed::Evicted | Closed::Drained => {}
        }
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds since the first call, never 0 (0 means "not set" below).
fn now_ms() -> u64 {
    u64::try_from(base().elapsed().as_millis()).unwrap_or(u64::MAX / 2) + 1
}

/// The instant a [`now_ms`] value stands for.
fn instant_at(ms: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(base() + Duration::from_millis(ms.saturating_sub(1)))
}

/// What the watchdog needs to know about a connection. Written by the
/// connection's own task (socket, service, bodies) and, for `close`, by
/// the accept loop.
pub(crate) struct Conn {
    phase: AtomicU8,
    /// When the phase began (ms, [`now_ms`]).
    since: AtomicU64,
    /// Requests whose response has not been sent in full (one at a time
    /// in HTTP/1, but a count costs nothing and needs no reasoning).
    in_flight: AtomicUsize,
    /// Since when a write has been waiting for the client to read (0: no
    /// write waiting).
    write_stall: AtomicU64,
    /// Since when a handler has been waiting for request body bytes the
    /// client has not sent (0: none).
    body_wait: AtomicU64,
    /// A [`Closed`] the accept loop decided on (0: none).
    close: AtomicU8,
    wake: Notify,
}

impl Conn {
    pub(crate) fn new() -> Self {
        Conn {
            phase: AtomicU8::new(FRESH),
            since: AtomicU64::new(now_ms()),
            in_flight: AtomicUsize::new(0),
            write_stall: AtomicU64::new(0),
            body_wait: AtomicU64::new(0),
            close: AtomicU8::new(0),
            wake: Notify::new(),
        }
    }

    /// Since when it has been waiting without a request in flight; `None`
    /// when busy or already told to close.
    pub(crate) fn waiting_since(&self) -> Option<u64> {
        if matches!(self.phase.load(Ordering::Relaxed), BUSY | FLUSHING) || self.evicting() {
            return None;
        }
        Some(self.since.load(Ordering::Relaxed))
    }

    /// Whether it has been told to close.
    pub(crate) fn evicting(&self) -> bool {
        self.close.load(Ordering::Relaxed) != 0
    }

    /// Tells it to close; true if it had not been told already.
    pub(crate) fn close(&self, why: Closed) -> bool {
        let first = self
            .close
            .compare_exchange(0, why as u8, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if first {
            self.wake.notify_one();
        }
        first
    }

    /// Bytes arrived: on an idle connection, the next request has begun
    /// and its head now has the (usually shorter) header timeout.
    fn bytes_in(&self) {
        if self
            .phase
            .compare_exchange(IDLE, HEAD, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.since.store(now_ms(), Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    /// hyper flushed the socket, which it does only with its write buffer
    /// empty: a finished response is now entirely written.
    fn flushed(&self) {
        if self
            .phase
            .compare_exchange(FLUSHING, IDLE, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.since.store(now_ms(), Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    fn mark(slot: &AtomicU64, waiting: bool) {
        let cur = slot.load(Ordering::Relaxed);
        if waiting {
            if cur == 0 {
                slot.store(now_ms(), Ordering::Relaxed);
            }
        } else if cur != 0 {
            slot.store(0, Ordering::Relaxed);
        }
    }

    /// The next deadline (ms) and what passing it means; `None` while a
    /// request is in flight and progressing.
    fn deadline(&self, limits: &Limits) -> Option<(u64, Closed)> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4);
        let since = self.since.load(Ordering::Relaxed);
        match self.phase.load(Ordering::Relaxed) {
            FRESH | HEAD => Some((since + ms(limits.header_timeout), Closed::HeaderTimeout)),
            IDLE => Some((since + ms(limits.idle_timeout), Closed::Idle)),
            _ => {
                let stalls = [
                    self.write_stall.load(Ordering::Relaxed),
                    self.body_wait.load(Ordering::Relaxed),
                ];
                let stall = stalls.into_iter().filter(|t| *t != 0).min()?;
                Some((stall + ms(limits.idle_timeout), Closed::Stalled))
            }
        }
    }
}

/// Returns when the connection must be closed, and why.
async fn watchdog(conn: &Conn, limits: &Limits) -> Closed {
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    loop {
        if let Some(why) = Closed::from_u8(conn.close.load(Ordering::Relaxed)) {
            return why;
        }
        let now = now_ms();
        let wake_at = match conn.deadline(limits) {
            Some((at, why)) if now >= at => return why,
            Some((at, _)) => at,
            // Busy: look again in an idle timeout (a stall that begins in
            // between is caught then, at most one timeout late).
            None => now + u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(u64::MAX / 4),
        };
        sleep.as_mut().reset(instant_at(wake_at));
        tokio::select! {
            () = &mut sleep => {}
            () = conn.wake.notified() => {}
        }
    }
}

/// Serves one connection until it ends, the watchdog closes it, or the
/// server stops (then it finishes the request in flight and closes).
pub(crate) async fn serve_connection(
    tcp: TcpStream,
    app: Router,
    conn: Arc<Conn>,
    registered: Registered,
    limits: Arc<Limits>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<Stats>,
) {
    let io = TokioIo::new(Tracked {
        inner: tcp,
        conn: conn.clone(),
    });
    let svc = Svc {
        app,
        conn: conn.clone(),
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The watchdog replaces hyper's header timeout, which would also close
    // a keep-alive connection at the same deadline while it waits for its
    // next request (no separate idle timeout), and which hyper applies by
    // default only with a timer.
    builder.header_read_timeout(None);
    let http = builder.serve_connection(io, svc);
    tokio::pin!(http);
    let dog = watchdog(&conn, &limits);
    tokio::pin!(dog);
    let mut draining = false;
    loop {
        if !draining && *stop.borrow() {
            http.as_mut().graceful_shutdown();
            draining = true;
        }
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %ember_error::chain(&e), "connection ended with an error");
                }
                break;
            }
            why = &mut dog => {
                why.count(&stats);
                tracing::debug!(reason = ?why, "closing a connection");
                break;
            }
            r = stop.changed(), if !draining => {
                if r.is_err() {
                    http.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
        }
    }
    drop(registered);
}

/// The socket, telling the connection's state when bytes arrive and when
/// writes wait on the client.
struct Tracked {
    inner: TcpStream,
    conn: Arc<Conn>,
}

impl Tracked {
    fn wrote<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        Conn::mark(&self.conn.write_stall, r.is_pending());
        r
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.bytes_in();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.conn.flushed();
        }
        self.wrote(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Held from the moment hyper hands a request to the service until its
/// response body has ended (or was dropped): the connection is busy, then
/// flushing.
struct Busy(Arc<Conn>);

impl Busy {
    fn enter(conn: Arc<Conn>) -> Busy {
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        conn.phase.store(BUSY, Ordering::Relaxed);
        // The watchdog may be asleep until a header deadline later than
        // the stall deadline the request can now run into.
        conn.wake.notify_one();
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let c = &self.0;
        if c.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            c.since.store(now_ms(), Ordering::Relaxed);
            c.phase.store(FLUSHING, Ordering::Relaxed);
        }
    }
}

/// The router as a hyper service, marking the connection busy per request.
#[derive(Clone)]
struct Svc {
    app: Router,
    conn: Arc<Conn>,
}

type SvcFuture = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Svc {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = SvcFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let busy = Busy::enter(self.conn.clone());
        let conn = self.conn.clone();
        let req = req.map(|inner| RequestBody { inner, conn });
        let mut app = self.app.clone();
        Box::pin(async move {
            // A Router is always ready (axum documents poll_ready as a
            // no-op), so it is called without one.
            let resp = match tower_service::Service::call(&mut app, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok(resp.map(|inner| ResponseBody {
                inner,
                busy: Some(busy),
            }))
        })
    }
}

/// A request body that records when the handler waits on the client.
struct RequestBody {
    inner: Incoming,
    conn: Arc<Conn>,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        Conn::mark(&self.conn.body_wait, r.is_pending());
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        Conn::mark(&self.conn.body_wait, false);
    }
}

/// A response body that ends the connection's busy state when it is done.
pub(crate) struct ResponseBody {
    inner: Body,
    busy: Option<Busy>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) {
            self.busy = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
