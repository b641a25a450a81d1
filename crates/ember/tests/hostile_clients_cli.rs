//! The `ember cache` and `ember control` binaries under hostile clients:
//! 2,500 connections that each send one byte, held open, against a cap of
//! 1,000. A normal client is answered while they are held, the server's
//! file descriptors stay under the cap, the silent connections are closed
//! after the header timeout, and the descriptor count returns to its
//! baseline. Long-lived control-plane streams (a node's work stream, a log
//! follow) outlive an idle timeout far shorter than their silences.

#![allow(clippy::unwrap_used)]

mod common;

use common::cluster::{CLIENT_TOKEN, NODE_TOKEN, Proc, start, start_control};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const ATTACK: usize = 2500;
const CAP: usize = 1000;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The test opens thousands of sockets: soft RLIMIT_NOFILE up to the hard
/// limit (never above it).
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    assert!(
        hard >= (ATTACK + 200) as u64,
        "the hard open-file limit ({hard}) is too low for this test"
    );
}

/// One plain HTTP/1 request on a new connection, with `connection: close`;
/// the status line, or an error.
fn request(addr: &str, path: &str, auth: Option<&str>) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = auth.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out.lines().next().unwrap_or_default().to_owned())
}

/// Holds `ATTACK` one-byte connections to `addr` while a normal request is
/// made, then checks the server's descriptors: under the cap while held,
/// back near `baseline` after the header timeout.
fn attack(what: &str, pid: u32, addr: &str, path: &str, auth: Option<&str>) {
    let baseline = fds(pid);
    let rss_before = rss_kb(pid);
    let mut held = Vec::with_capacity(ATTACK);
    for _ in 0..ATTACK {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                let _ = s.write_all(b"G");
                held.push(s);
            }
            Err(e) => panic!("{what}: connect failed during the attack: {e}"),
        }
    }
    let during = fds(pid);
    let rss_during = rss_kb(pid);
    let t = Instant::now();
    let status = request(addr, path, auth).unwrap_or_else(|e| panic!("{what}: {e}"));
    let answered_in = t.elapsed();
    assert!(status.starts_with("HTTP/1.1 200"), "{what}: {status}");
    assert!(
        during <= baseline + CAP + 50,
        "{what}: {during} descriptors with a cap of {CAP} (baseline {baseline})"
    );
    // The held connections are closed by the server (evicted at the cap,
    // or after the header timeout): each read ends.
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut b = [0u8; 64];
        let _ = s.read(&mut b);
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after = fds(pid);
    while after > baseline + 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = fds(pid);
    }
    assert!(
        after <= baseline + 5,
        "{what}: {after} descriptors after the attack (baseline {baseline})"
    );
    eprintln!(
        "{what}: {ATTACK} one-byte connections, cap {CAP}: fds {baseline} -> {during} -> {after}; \
         RSS {rss_before} -> {rss_during} -> {} kB; normal request answered in {answered_in:?}",
        rss_kb(pid)
    );
}

/// A JSON request on its own connection: the status line and the body.
fn call(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    json: &serde_json::Value,
) -> (String, String) {
    let body = json.to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

#[test]
fn cache_and_control_survive_one_byte_connections() {
    raise_nofile();
    let tmp = tempfile::tempdir().unwrap();
    let limits = [
        "--header-timeout",
        "3",
        "--max-connections",
        "1000",
        "--listen",
        "127.0.0.1:0",
    ];
    let dir = tmp.path().join("cache").to_string_lossy().into_owned();
    let mut args = vec![
        "cache",
        "--dir",
        &dir,
        "--max-bytes",
        "1G",
        "--upstream",
        "http://127.0.0.1:9",
    ];
    args.extend_from_slice(&limits);
    let (cache, line) = start(tmp.path(), &args);
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    attack(
        "ember cache",
        cache.0.id(),
        &addr_of(&url),
        "/healthz",
        None,
    );
    drop(cache);

    let db = tmp.path().join("control.db").to_string_lossy().into_owned();
    let (control, url) = start_control(
        tmp.path(),
        &db,
        &["--header-timeout", "3", "--max-connections", "1000"],
    );
    attack(
        "ember control",
        control.0.id(),
        &addr_of(&url),
        "/v1/nodes",
        Some(CLIENT_TOKEN),
    );
    drop(control);
}

/// With a 1 s idle timeout, a node's work stream silent for 4 s between
/// keepalives and a log follow silent for 5 s both stay open.
#[test]
fn control_streams_outlive_the_idle_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("control.db").to_string_lossy().into_owned();
    let (control, url): (Proc, String) = start_control(
        tmp.path(),
        &db,
        &[
            "--idle-timeout",
            "1",
            "--header-timeout",
            "1",
            "--keepalive",
            "4",
        ],
    );
    let addr = addr_of(&url);
    let (status, body) = call(
        &addr,
        "PUT",
        "/v1/nodes/n1",
        NODE_TOKEN,
        &serde_json::json!({"id": "n1", "slots": 1}),
    );
    assert!(status.contains(" 20"), "{status} {body}");

    // The work stream: a hello, then a keepalive line 4 s later.
    let mut work = TcpStream::connect(&addr).unwrap();
    write!(
        work,
        "GET /v1/nodes/n1/work HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {NODE_TOKEN}\r\n\r\n"
    )
    .unwrap();
    work.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut lines = BufReader::new(work);
    let mut seen = String::new();
    let t = Instant::now();
    while !seen.contains(r#""type":"keepalive""#) {
        let mut l = String::new();
        let n = lines.read_line(&mut l).unwrap();
        assert!(n > 0, "the work stream was closed: {seen}");
        seen.push_str(&l);
    }
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "the keepalive came before the silence it was meant to test"
    );

    // A log follow of a queued run (no node takes it: n1's stream is ours).
    let (status, body) = call(
        &addr,
        "POST",
        "/v1/runs",
        CLIENT_TOKEN,
        &serde_json::json!({
            "image": {"reference": "busybox", "digest": format!("sha256:{}", "ab".repeat(32))},
            "command": ["true"],
        }),
    );
    assert!(status.contains(" 20"), "{status} {body}");
    let run: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = &run["run"]["id"];
    let id = id.as_str().map_or_else(|| id.to_string(), str::to_owned);
    let mut follow = TcpStream::connect(&addr).unwrap();
    write!(
        follow,
        "GET /v1/runs/{id}/logs?follow=1 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_TOKEN}\r\n\r\n"
    )
    .unwrap();
    follow
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    loop {
        match follow.read(&mut buf) {
            Ok(0) => panic!(
                "the log follow was closed after {:?}: {}",
                start.elapsed(),
                String::from_utf8_lossy(&got)
            ),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // Five silent seconds with the connection open.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => panic!("log follow: {e}"),
        }
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    drop(control);
}
