//! Fault injection against the real `ember control` binary: a hostile (or
//! careless) client and a run that prints without end must not grow the
//! control plane's memory without bound. The process's resident set is
//! read from `/proc/PID/status` (`VmRSS`) while the load runs.

mod common;

use common::cluster::*;
use common::*;
use ember_api::client::{ClientError, ControlClient};
use ember_api::wire::LogRecord;
use ember_control::model::{PinnedImage, RunSpec};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// `VmRSS` of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The resident set's parts, for the test's log: heap and the database
/// file's mapped pages are told apart.
fn memory(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .filter(|l| {
            ["VmRSS", "RssAnon", "RssFile", "VmHWM"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Samples `VmRSS` of `pid` every 20 ms until dropped; `peak` is the
/// highest seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss(pid)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            // The process may be gone when a failing test tears down.
            while !s.load(Ordering::Relaxed)
                && std::path::Path::new(&format!("/proc/{pid}/status")).exists()
            {
                p.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

const MIB: u64 = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The numbers: 51 runs with a 1.9 MB environment and six
/// concurrent `GET /v1/runs` took the control plane from 14 MB to 1.48 GB.
/// Now such a run is refused with a 413 error object, and 800 runs just
/// under the 64 KiB limit (50 MB of environment) read by six concurrent
/// clients paging through all of them, three times each, keep the
/// resident set within a bound an unpaged list alone would exceed.
#[test]
fn big_environments_and_concurrent_lists_keep_the_control_plane_bounded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = tmp.path().join("control.db").to_string_lossy().into_owned();
    let (control, url) = start_control(tmp.path(), &db, &[]);
    let pid = control.0.id();
    let rt = runtime();
    let c = ControlClient::new(&url, Some(CLIENT_TOKEN.into())).expect("client");
    let image = PinnedImage::new("busybox", format!("sha256:{}", "ab".repeat(32))).expect("pin");
    let with_env = |bytes: usize| RunSpec {
        image: Some(image.clone()),
        command: vec!["true".into()],
        env: [("BIG".to_owned(), "x".repeat(bytes))].into(),
        ..RunSpec::default()
    };
    let start_rss = rss(pid);
    let mut sampler = Sampler::start(pid);

    rt.block_on(async {
        // Over the body limit (1.9 MB) and over the environment limit.
        for bytes in [1_900_000, 70_000] {
            for _ in 0..10 {
                // A fresh connection each time: the server answers a body
                // over the limit before reading it and then closes the
                // connection, which a pooled client might pick up again.
                let fresh = ControlClient::new(&url, Some(CLIENT_TOKEN.into())).expect("client");
                match fresh.submit(&with_env(bytes), None).await {
                    Err(ClientError::Api { status, error, .. }) => {
                        assert_eq!((status, error.as_str()), (413, "too_large"), "{bytes}");
                    }
                    other => panic!("{bytes} bytes of environment: {other:?}"),
                }
            }
        }
        // 800 runs just under the limit, 16 submits in flight.
        let runs = 800;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..runs {
            let (c, spec) = (c.clone(), with_env(60_000));
            tasks.spawn(async move { c.submit(&spec, None).await.map(|_| i) });
            if tasks.len() >= 16 {
                tasks
                    .join_next()
                    .await
                    .expect("task")
                    .expect("join")
                    .expect("submit");
            }
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("join").expect("submit");
        }
        eprintln!("after the submits: {}", memory(pid));
        // Six readers, each paging through every run three times, holding
        // one page at a time.
        let mut readers = tokio::task::JoinSet::new();
        // EMBER_BOUNDS_PAGE=1000 reads all runs in one page, as an unpaged
        // list did (for measuring what paging saves; the test's bound does
        // not hold then).
        let page_size: Option<usize> = std::env::var("EMBER_BOUNDS_PAGE")
            .ok()
            .and_then(|v| v.parse().ok());
        for _ in 0..6 {
            let c = c.clone();
            readers.spawn(async move {
                let mut seen = 0;
                for _ in 0..3 {
                    let mut cursor: Option<String> = None;
                    loop {
                        let page = c
                            .runs_page(page_size, cursor.as_deref())
                            .await
                            .expect("page");
                        seen += page.runs.len();
                        match page.next_cursor {
                            Some(next) => cursor = Some(next),
                            None => break,
                        }
                    }
                }
                seen
            });
        }
        while let Some(seen) = readers.join_next().await {
            assert_eq!(seen.expect("reader"), 3 * runs, "every run on every pass");
        }
    });
    let peak = sampler.peak();
    eprintln!("after the lists: {}", memory(pid));
    eprintln!(
        "control plane RSS: {} MiB at start, peak {} MiB, {} MiB after",
        start_rss / MIB,
        peak / MIB,
        rss(pid) / MIB
    );
    // Most of the peak is fixed cost: the store's 64 MiB page cache, the
    // database file's mapped pages and the binary's. One unpaged list of
    // these runs is 48 MB of JSON plus the parsed runs; six at once
    // (EMBER_BOUNDS_PAGE=1000) peaked far above this bound.
    assert!(
        peak < 400 * MIB,
        "control plane RSS peaked at {} MiB",
        peak / MIB
    );
}

/// A run that prints 100 MB while three clients read its log over and over
/// and a fourth follows it: the control plane keeps exactly 32 MiB of it
/// (`--max-log-bytes 32M`; the default is 64M), then the truncation
/// marker, and its resident set stays bounded (before streamed reads, a
/// 200 MB log and three readers took it to 1.59 GB). Scaled down from the
/// issue's 200 MB to keep the test short in a debug build.
#[test]
fn a_run_printing_100_mb_is_cut_at_the_limit_and_log_reads_stay_bounded() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let registry = registry_with(&["busybox"]);
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = tmp.path().join("control.db").to_string_lossy().into_owned();
    let (control, url) = start_control(tmp.path(), &db, &["--max-log-bytes", "32M"]);
    let pid = control.0.id();
    let _node = start_node(&tmp.path().join("node"), &url, "n1", 2, &agent, &[]);
    let start_rss = rss(pid);
    let mut sampler = Sampler::start(pid);

    // 17 bytes a line: the log's bytes say where they came from.
    let line = "0123456789abcdef\n";
    let id = client_ok(
        &url,
        &[
            "submit",
            &image,
            "--",
            "sh",
            "-c",
            "yes 0123456789abcdef | head -c 100000000",
        ],
    );
    let id = ember_api::wire::parse_run_id(id.trim()).expect("run id");
    let rt = runtime();
    let c = ControlClient::new(&url, Some(CLIENT_TOKEN.into())).expect("client");
    let (reads, output) = rt.block_on(async {
        let done = Arc::new(AtomicBool::new(false));
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let (c, done) = (c.clone(), done.clone());
            readers.spawn(async move {
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let mut resp = c.logs(id, false).await.expect("logs");
                    while resp.chunk().await.expect("chunk").is_some() {}
                    reads += 1;
                    // Back to back, the readers would mostly measure how
                    // they slow the node's appends down.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                reads
            });
        }
        // The follower reads to the end: output, the marker, nothing more.
        let mut resp = c.logs(id, true).await.expect("follow");
        let (mut out, mut markers, mut buf) = (0u64, Vec::new(), Vec::new());
        let mut ok = true;
        while let Some(b) = resp.chunk().await.expect("chunk") {
            buf.extend_from_slice(&b);
            let mut start = 0;
            while let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
                let rec: LogRecord =
                    serde_json::from_slice(&buf[start..start + i]).expect("record");
                start += i + 1;
                if rec.marker {
                    markers.push(String::from_utf8_lossy(&rec.data).into_owned());
                } else {
                    ok &= markers.is_empty();
                    // Each byte is the pattern's at its offset.
                    ok &= rec
                        .data
                        .iter()
                        .enumerate()
                        .all(|(k, &b)| b == line.as_bytes()[(out as usize + k) % line.len()]);
                    out += rec.data.len() as u64;
                }
            }
            buf.drain(..start);
        }
        done.store(true, Ordering::Relaxed);
        let mut reads = 0;
        while let Some(r) = readers.join_next().await {
            reads += r.expect("reader");
        }
        assert!(ok, "output out of order, or after the marker");
        ((reads, markers), out)
    });
    let peak = sampler.peak();
    let (reads, markers) = reads;
    eprintln!(
        "control plane RSS: {} MiB at start, peak {} MiB over {reads} full log reads",
        start_rss / MIB,
        peak / MIB
    );
    assert_eq!(output, 32 * MIB, "exactly the limit is kept");
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert!(markers[0].contains("truncated"), "{}", markers[0]);
    let run = rt.block_on(c.run(id)).expect("run");
    assert_eq!(run.exit_code, Some(0), "{run:?}");
    // The store's 64 MiB page cache, the log file's mapped pages and the
    // binary's count here too; three readers each building the 43 MB body
    // of the whole log, plus its chunks, were above this.
    assert!(
        peak < 256 * MIB,
        "control plane RSS peaked at {} MiB",
        peak / MIB
    );
}
