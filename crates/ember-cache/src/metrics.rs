//! Counters and gauges, rendered in the Prometheus text format by hand:
//! a dozen atomics do not justify an exporter crate and its dependencies.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The cache's metrics. Every field is updated lock-free on the request
/// path; `/metrics` reads them all without stopping anyone.
#[derive(Default)]
pub struct Metrics {
    /// Blob requests answered from disk.
    pub blob_hits: AtomicU64,
    /// Blob requests that needed (or joined) an upstream fetch.
    pub blob_misses: AtomicU64,
    /// Manifest requests answered without an upstream GET (fresh tags,
    /// digests on disk, tags revalidated by HEAD).
    pub manifest_hits: AtomicU64,
    /// Manifest requests that needed an upstream GET.
    pub manifest_misses: AtomicU64,
    /// Manifests served stale because the upstream was down.
    pub stale_served: AtomicU64,
    /// Upstream blob fetches started (one per single-flight).
    pub upstream_fetches: AtomicU64,
    /// Upstream blob fetches that failed (transport, truncation, digest).
    pub upstream_failures: AtomicU64,
    /// Body bytes received from upstreams.
    pub upstream_bytes: AtomicU64,
    /// Body bytes sent to clients.
    pub served_bytes: AtomicU64,
    /// Blobs evicted.
    pub evictions: AtomicU64,
    /// Bytes evicted.
    pub evicted_bytes: AtomicU64,
    /// Upstream blob fetches running now.
    pub inflight: AtomicI64,
    /// Bytes of committed blobs on disk.
    pub stored_bytes: AtomicU64,
    /// Committed blobs on disk.
    pub stored_blobs: AtomicU64,
    /// Requests forwarded to the owning peer.
    pub peer_forwards: AtomicU64,
    /// Requests served locally because the owning peer failed.
    pub peer_fallbacks: AtomicU64,
    /// Blob responses streamed straight from the upstream, not kept,
    /// because the disk had no room even after eviction.
    pub passthrough: AtomicU64,
    /// Requests answered "unknown" from a remembered upstream 404.
    pub negative_hits: AtomicU64,
    /// Snapshot artifact downloads answered from disk.
    pub snapshot_blob_hits: AtomicU64,
    /// Snapshot manifests served.
    pub snapshot_manifest_hits: AtomicU64,
    /// Snapshot requests (artifact or manifest) for something not held.
    pub snapshot_misses: AtomicU64,
    /// Of those, answered by a peer (`--peer`) instead.
    pub snapshot_peer_hits: AtomicU64,
    /// Snapshot artifacts uploaded and committed.
    pub snapshot_uploads: AtomicU64,
    /// Bytes of snapshot artifacts uploaded and committed.
    pub snapshot_uploaded_bytes: AtomicU64,
    /// Snapshot uploads refused (digest mismatch, too large, denied).
    pub snapshot_refused: AtomicU64,
    /// Body bytes of snapshot artifacts sent to clients.
    pub snapshot_served_bytes: AtomicU64,
    /// The HTTP server's connection counters, once it serves.
    pub http: OnceLock<Arc<ember_http::Stats>>,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(&str, u64)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        metric(
            "ember_cache_hits_total",
            "counter",
            "Requests answered from the cache.",
            &[
                ("{kind=\"blob\"}", g(&self.blob_hits)),
                ("{kind=\"manifest\"}", g(&self.manifest_hits)),
            ],
        );
        metric(
            "ember_cache_misses_total",
            "counter",
            "Requests that needed the upstream.",
            &[
                ("{kind=\"blob\"}", g(&self.blob_misses)),
                ("{kind=\"manifest\"}", g(&self.manifest_misses)),
            ],
        );
        metric(
            "ember_cache_stale_served_total",
            "counter",
            "Tag requests served stale while the upstream was down.",
            &[("", g(&self.stale_served))],
        );
        metric(
            "ember_cache_upstream_fetches_total",
            "counter",
            "Blob downloads from upstreams (one per single-flight).",
            &[("", g(&self.upstream_fetches))],
        );
        metric(
            "ember_cache_upstream_failures_total",
            "counter",
            "Blob downloads from upstreams that failed.",
            &[("", g(&self.upstream_failures))],
        );
        metric(
            "ember_cache_upstream_bytes_total",
            "counter",
            "Bytes received from upstreams.",
            &[("", g(&self.upstream_bytes))],
        );
        metric(
            "ember_cache_served_bytes_total",
            "counter",
            "Body bytes sent to clients.",
            &[("", g(&self.served_bytes))],
        );
        metric(
            "ember_cache_evictions_total",
            "counter",
            "Blobs evicted to stay under the byte budget.",
            &[("", g(&self.evictions))],
        );
        metric(
            "ember_cache_evicted_bytes_total",
            "counter",
            "Bytes evicted.",
            &[("", g(&self.evicted_bytes))],
        );
        metric(
            "ember_cache_inflight_fetches",
            "gauge",
            "Blob downloads from upstreams in progress.",
            &[("", self.inflight.load(Ordering::Relaxed).max(0) as u64)],
        );
        metric(
            "ember_cache_stored_bytes",
            "gauge",
            "Bytes of verified blobs on disk.",
            &[("", g(&self.stored_bytes))],
        );
        metric(
            "ember_cache_stored_blobs",
            "gauge",
            "Verified blobs on disk.",
            &[("", g(&self.stored_blobs))],
        );
        metric(
            "ember_cache_peer_forwards_total",
            "counter",
            "Blob requests forwarded to the owning peer.",
            &[("", g(&self.peer_forwards))],
        );
        metric(
            "ember_cache_peer_fallbacks_total",
            "counter",
            "Blob requests served locally because the owning peer failed.",
            &[("", g(&self.peer_fallbacks))],
        );
        metric(
            "ember_cache_passthrough_total",
            "counter",
            "Blob responses streamed from the upstream without keeping them (disk full).",
            &[("", g(&self.passthrough))],
        );
        metric(
            "ember_cache_negative_hits_total",
            "counter",
            "Requests answered from a remembered upstream \"not found\".",
            &[("", g(&self.negative_hits))],
        );
        metric(
            "ember_cache_snapshot_hits_total",
            "counter",
            "Snapshot requests answered from the cache.",
            &[
                ("{kind=\"artifact\"}", g(&self.snapshot_blob_hits)),
                ("{kind=\"manifest\"}", g(&self.snapshot_manifest_hits)),
            ],
        );
        metric(
            "ember_cache_snapshot_misses_total",
            "counter",
            "Snapshot requests for an artifact or manifest the cache does not hold.",
            &[("", g(&self.snapshot_misses))],
        );
        metric(
            "ember_cache_snapshot_peer_hits_total",
            "counter",
            "Snapshot requests not held here that a peer cache answered.",
            &[("", g(&self.snapshot_peer_hits))],
        );
        metric(
            "ember_cache_snapshot_uploads_total",
            "counter",
            "Snapshot artifact uploads, by outcome.",
            &[
                ("{outcome=\"stored\"}", g(&self.snapshot_uploads)),
                ("{outcome=\"refused\"}", g(&self.snapshot_refused)),
            ],
        );
        metric(
            "ember_cache_snapshot_uploaded_bytes_total",
            "counter",
            "Bytes of snapshot artifacts uploaded and stored.",
            &[("", g(&self.snapshot_uploaded_bytes))],
        );
        metric(
            "ember_cache_snapshot_served_bytes_total",
            "counter",
            "Bytes of snapshot artifacts sent to clients.",
            &[("", g(&self.snapshot_served_bytes))],
        );
        if let Some(h) = self.http.get() {
            use ember_http::Stats;
            metric(
                "ember_cache_connections",
                "gauge",
                "Client connections open.",
                &[("", Stats::get(&h.open))],
            );
            metric(
                "ember_cache_connections_closed_total",
                "counter",
                "Client connections the server closed or refused, by reason.",
                &[
                    (
                        "{reason=\"header_timeout\"}",
                        Stats::get(&h.header_timeouts),
                    ),
                    ("{reason=\"idle_timeout\"}", Stats::get(&h.idle_timeouts)),
                    ("{reason=\"stalled\"}", Stats::get(&h.stalled)),
                    ("{reason=\"evicted\"}", Stats::get(&h.evicted)),
                    ("{reason=\"refused\"}", Stats::get(&h.refused)),
                ],
            );
        }
        s
    }
}
