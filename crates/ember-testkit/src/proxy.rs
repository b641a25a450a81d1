//! A mirror that breaks blob bodies half-way, for fallback tests.
//!
//! [`CuttingMirror`] forwards every request to a real registry (one
//! connection per request, `Connection: close`), and answers each blob
//! `GET` of at least `min_body` bytes with the registry's status line and
//! headers (its full `Content-Length`) but only the first half of the body,
//! then closes the connection: what a cache that runs out of disk, or
//! crashes, mid-blob looks like to its clients. Everything else passes
//! through unchanged.

use anyhow::Context;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// A running cutting mirror on a free loopback port, stopped on drop.
pub struct CuttingMirror {
    port: u16,
    cuts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CuttingMirror {
    /// Starts a mirror of `origin` (`HOST:PORT`) that cuts blob bodies of
    /// at least `min_body` bytes.
    pub fn start(origin: &str, min_body: u64) -> anyhow::Result<CuttingMirror> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let cuts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (origin, c, s) = (origin.to_string(), cuts.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (origin, c) = (origin.clone(), c.clone());
                std::thread::spawn(move || {
                    // A failed connection only fails the request it carried.
                    let _ = serve(conn, &origin, min_body, &c);
                });
            }
        });
        Ok(CuttingMirror { port, cuts, stop })
    }

    /// `http://127.0.0.1:PORT`, for `--mirror`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many blob bodies it has cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for CuttingMirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads up to the end of an HTTP head; returns (head, bytes after it).
fn read_head(s: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((buf, rest));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed inside the head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn serve(
    mut client: TcpStream,
    origin: &str,
    min_body: u64,
    cuts: &AtomicUsize,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (head, _) = read_head(&mut client)?;
    let head = String::from_utf8_lossy(&head).into_owned();
    let request_line = head.lines().next().unwrap_or_default().to_string();
    let is_blob_get = request_line.starts_with("GET ") && request_line.contains("/blobs/");
    // One request per connection: drop the client's Connection header.
    let mut forwarded = String::new();
    for (i, line) in head.split("\r\n").enumerate() {
        if line.is_empty() {
            continue;
        }
        if i > 0 && line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        forwarded.push_str(line);
        forwarded.push_str("\r\n");
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(origin)?;
    up.set_read_timeout(Some(Duration::from_secs(30)))?;
    up.write_all(forwarded.as_bytes())?;
    let (resp_head, mut body) = read_head(&mut up)?;
    let text = String::from_utf8_lossy(&resp_head).to_ascii_lowercase();
    let ok = text.starts_with("http/1.1 200") || text.starts_with("http/1.0 200");
    let len: Option<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    client.write_all(&resp_head)?;
    let limit = match len {
        Some(n) if is_blob_get && ok && n >= min_body => Some(n / 2),
        _ => None,
    };
    let mut sent = 0u64;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if body.is_empty() {
            let n = up.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        let mut take = body.len();
        if let Some(l) = limit {
            take = take.min((l - sent) as usize);
        }
        client.write_all(&body[..take])?;
        sent += take as u64;
        body.drain(..take);
        if limit.is_some_and(|l| sent >= l) {
            cuts.fetch_add(1, Ordering::Relaxed);
            // Close with the body short of its Content-Length.
            let _ = client.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
    }
    Ok(())
}
