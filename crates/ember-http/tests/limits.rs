//! The bounded server against hostile and slow clients, over real sockets:
//! silent and one-byte connections, idle keep-alive connections, clients
//! that stop reading or stop sending, and a full connection table, while
//! long responses that progress (or wait for the server) are left alone.
//!
//! Timeouts here are short so the tests are quick, but no assertion
//! depends on how fast the machine is: "closed" waits up to a minute, and
//! "still open" is only checked long before the deadline.

// Test code: a panic is the right answer to any surprise.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::{get, post};
use ember_http::{Limits, Server, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, oneshot};

const PATIENCE: Duration = Duration::from_secs(60);

struct Running {
    addr: std::net::SocketAddr,
    stats: Arc<Stats>,
    gate: Arc<Semaphore>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    /// Waits (up to a minute) until a counter reaches `n`.
    async fn wait_stat(&self, pick: fn(&Stats) -> &AtomicU64, n: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let v = Stats::get(pick(&self.stats));
            if v >= n || tokio::time::Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("server stops")
            .unwrap();
    }
}

fn app(gate: Arc<Semaphore>) -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        // Two chunks with three seconds of silence between them.
        .route(
            "/slow-stream",
            get(|| async {
                let parts = vec![(0u64, "first "), (3000, "second")];
                Body::from_stream(futures_util::stream::unfold(
                    parts.into_iter(),
                    |mut it| async move {
                        let (delay, s) = it.next()?;
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        Some((
                            Ok::<_, std::io::Error>(Bytes::from_static(s.as_bytes())),
                            it,
                        ))
                    },
                ))
            }),
        )
        // A handler that takes three seconds before it answers.
        .route(
            "/slow-answer",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "late"
            }),
        )
        .route("/big", get(|| async { Body::from(vec![7u8; 64 << 20]) }))
        .route(
            "/upload",
            post(|b: Bytes| async move { b.len().to_string() }),
        )
        // Answers once the test adds a permit.
        .route(
            "/gate",
            get(move || {
                let gate = gate.clone();
                async move {
                    gate.acquire().await.unwrap().forget();
                    "released"
                }
            }),
        )
}

async fn start(limits: Limits, drain: Option<Duration>) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let server = Server::new(limits)
        .drain(drain)
        .refusal("text/plain", "full\n");
    let stats = server.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let router = app(gate.clone());
    let task = tokio::spawn(async move {
        server
            .serve(listener, router, async move {
                let _ = stopped.await;
            })
            .await;
    });
    Running {
        addr,
        stats,
        gate,
        stop: Some(stop),
        task,
    }
}

fn limits(header: u64, idle: u64, max: usize) -> Limits {
    Limits {
        header_timeout: Duration::from_millis(header),
        idle_timeout: Duration::from_millis(idle),
        max_connections: max,
    }
}

/// Reads and discards until the server closes the connection (true) or
/// `within` passes (false).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends a request and reads its whole (Content-Length) response, leaving
/// the connection open for the next one.
async fn request(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if body.len() >= len {
                return text;
            }
        }
    }
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap()
}

/// Connections that send one byte (or nothing) are closed after the header
/// timeout, and a normal client is answered while they are held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_one_byte_connections_are_closed_after_the_header_timeout() {
    let srv = start(limits(1500, 60_000, 1000), None).await;
    let mut held = Vec::new();
    for i in 0..100 {
        let mut s = srv.connect().await;
        if i % 2 == 0 {
            s.write_all(b"G").await.unwrap();
        }
        held.push(s);
    }
    let body = client()
        .get(srv.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "hello");
    for s in &mut held {
        assert!(
            closed_within(s, PATIENCE).await,
            "a silent connection stayed open"
        );
    }
    assert_eq!(srv.wait_stat(|s| &s.header_timeouts, 100).await, 100);
    assert_eq!(Stats::get(&srv.stats.open), 0);
    srv.stop().await;
}

/// A keep-alive connection between requests has the idle timeout, not the
/// much shorter header timeout; once a byte of the next request arrives,
/// the header timeout applies again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_connections_get_the_idle_timeout_between_requests() {
    let srv = start(limits(1000, 20_000, 1000), None).await;
    let mut s = srv.connect().await;
    assert!(request(&mut s, "/").await.ends_with("hello"));
    // Five header timeouts later it is still open and usable...
    assert!(!closed_within(&mut s, Duration::from_secs(5)).await);
    assert!(request(&mut s, "/").await.ends_with("hello"));
    // ...and then closed by the idle timeout.
    assert!(closed_within(&mut s, PATIENCE).await);
    assert_eq!(srv.wait_stat(|s| &s.idle_timeouts, 1).await, 1);
    assert_eq!(Stats::get(&srv.stats.header_timeouts), 0);

    // A partial head on a used connection gets the header timeout.
    let mut s = srv.connect().await;
    assert!(request(&mut s, "/").await.ends_with("hello"));
    s.write_all(b"GET / HT").await.unwrap();
    assert!(closed_within(&mut s, PATIENCE).await);
    assert_eq!(srv.wait_stat(|s| &s.header_timeouts, 1).await, 1);
    srv.stop().await;
}

/// Responses that take longer than both timeouts (silent between chunks,
/// or slow to begin) are not cut: a request in flight is never idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_responses_outlive_both_timeouts() {
    let srv = start(limits(500, 500, 1000), None).await;
    let c = client();
    let body = c
        .get(srv.url("/slow-stream"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "first second");
    let body = c
        .get(srv.url("/slow-answer"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "late");
    let big = c
        .get(srv.url("/big"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(big.len(), 64 << 20);
    assert_eq!(Stats::get(&srv.stats.stalled), 0);
    srv.stop().await;
}

/// A client that stops reading a large response, or stops sending a
/// request body it announced, is closed after the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_a_request_are_closed() {
    let srv = start(limits(60_000, 1500, 1000), None).await;
    // Asks for 64 MiB and reads none of it.
    let mut reader = srv.connect().await;
    reader
        .write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // Announces 1000 bytes and sends ten.
    let mut sender = srv.connect().await;
    sender
        .write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    assert_eq!(srv.wait_stat(|s| &s.stalled, 2).await, 2);
    assert!(closed_within(&mut sender, PATIENCE).await);
    assert!(closed_within(&mut reader, PATIENCE).await);
    // The same upload sent in full is answered.
    let n = client()
        .post(srv.url("/upload"))
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(n, "1000");
    srv.stop().await;
}

/// At the cap, each new connection closes the one that has waited longest
/// without a request in flight: a client holding many silent connections
/// cannot keep a normal client out, and the server never holds more than
/// the cap (plus the few being closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_the_longest_idle_connection_makes_room() {
    let srv = start(limits(60_000, 60_000, 20), None).await;
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut s = srv.connect().await;
        s.write_all(b"G").await.unwrap();
        held.push(s);
    }
    let body = client()
        .get(srv.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "hello");
    // The first 180 or so were closed to make room; the newest are open.
    assert!(srv.wait_stat(|s| &s.evicted, 180).await >= 180);
    assert!(closed_within(&mut held[0], PATIENCE).await);
    let mut newest = held.pop().unwrap();
    assert!(!closed_within(&mut newest, Duration::from_millis(500)).await);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while Stats::get(&srv.stats.open) > 20 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(Stats::get(&srv.stats.open) <= 20);
    drop(held);
    drop(newest);
    srv.stop().await;
}

/// When every connection has a request in flight, a new one is answered
/// 503 at once (not left waiting), and busy connections are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_with_every_connection_busy_new_ones_get_503() {
    let srv = start(limits(60_000, 60_000, 2), None).await;
    let c = client();
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (c, url) = (c.clone(), srv.url("/gate"));
        waiting.push(tokio::spawn(async move {
            c.get(url).send().await.unwrap().text().await.unwrap()
        }));
    }
    // Both connections are accepted, and a moment later both requests are
    // in their handler (a connection still sending its head could be
    // closed for the probe instead).
    srv.wait_stat(|s| &s.accepted, 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut refused = None;
    for _ in 0..100 {
        let mut s = srv.connect().await;
        let _ = s
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut got)).await;
        let text = String::from_utf8_lossy(&got).into_owned();
        if text.starts_with("HTTP/1.1 503") {
            refused = Some(text);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = refused.expect("a 503 at the cap");
    assert!(refused.ends_with("full\n"), "{refused}");
    assert!(refused.contains("retry-after: 1"), "{refused}");
    srv.gate.add_permits(2);
    for w in waiting {
        assert_eq!(w.await.unwrap(), "released");
    }
    assert_eq!(Stats::get(&srv.stats.evicted), 0);
    srv.stop().await;
}

/// Stopping lets a request in flight finish; an endless one is cut when
/// the drain time is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_drains_requests_in_flight() {
    let srv = start(limits(60_000, 60_000, 100), None).await;
    let c = client();
    let url = srv.url("/slow-answer");
    let pending = tokio::spawn(async move { c.get(url).send().await.unwrap().text().await });
    let mut idle = srv.connect().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    srv.stop().await;
    assert_eq!(pending.await.unwrap().unwrap(), "late");
    assert!(closed_within(&mut idle, PATIENCE).await);

    let srv = start(
        limits(60_000, 60_000, 100),
        Some(Duration::from_millis(300)),
    )
    .await;
    let c = client();
    let url = srv.url("/gate");
    let pending = tokio::spawn(async move { c.get(url).send().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    srv.stop().await;
    assert!(
        pending.await.unwrap().is_err(),
        "the endless request was cut"
    );
}
