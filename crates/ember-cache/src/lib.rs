//! Ember's cluster image cache: a pull-through OCI registry mirror.
//!
//! Any registry client (Ember nodes, containerd, podman, skopeo, Docker) can
//! use it as a mirror. It serves the read side of the distribution API and
//! fetches what it does not have from its upstream registries:
//!
//! * **Single-flight, fan-out** ([`flight`]): however many clients ask for
//!   an uncached blob at once, the upstream sees one download; every client
//!   streams from the file being written, as the bytes arrive.
//! * **Verified before commit**: a blob becomes a cache hit only after its
//!   digest matched; a client never receives the last byte of a blob before
//!   that, so a bad download reaches clients as an aborted connection, never
//!   as a complete wrong body. A broken-off download is resumed with `Range`.
//! * **LRU under a byte budget** ([`storage`]): eviction between high and
//!   low watermarks; blobs being read are never evicted; blobs over the
//!   budget are streamed through, not kept; the index is rebuilt from disk
//!   at start.
//! * **Several upstreams**, chosen by containerd's `?ns=` or by a first path
//!   component naming one; credentials per upstream, never sent elsewhere;
//!   a private upstream's content only for clients with its credentials.
//! * **Tags** resolve through the upstream after a TTL (`HEAD` first) and
//!   are served stale, with a `Warning`, while it is down.
//! * **Peers** ([`peers`]): blobs are spread over cache servers by
//!   rendezvous hashing; a server forwards to the owner and falls back to
//!   the upstream when the owner is down.
//! * `POST /ember/v1/warm` pre-fetches images; `/metrics` is Prometheus.
//! * **Directory cache** ([`dircache`]): `/dircache/v1` stores the
//!   deduplicated chunks and entries of `ember dircache save|restore`;
//!   the same store serves the Turborepo remote-cache API ([`turbo`]).
//! * **Snapshots** ([`snapshots`]): `/ember/v1/snapshots` stores CRIU
//!   checkpoint artifacts (verified while they upload) and their
//!   manifests, under the blob store's byte budget, so a node restores a
//!   start-up another node captured.
//! * **Bounded connections**: served by [`ember_http`] (header and idle
//!   timeouts, a connection cap that closes the longest-idle connection).
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use ember_cache::{CacheConfig, UpstreamSpec};
//! let config = CacheConfig::new(
//!     "/var/lib/ember-cache".into(),
//!     100 << 30,
//!     vec![UpstreamSpec::parse("https://registry-1.docker.io")?],
//! );
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:5000").await?;
//! let server = ember_cache::spawn(config, listener)?;
//! println!("serving on {}", server.addr());
//! server.wait().await?;
//! # Ok(())
//! # }
//! ```

pub mod cache;
pub mod config;
pub mod dircache;
pub mod error;
pub mod flight;
pub mod metrics;
pub mod negative;
pub mod peers;
pub mod route;
pub mod server;
pub mod snapshots;
pub mod storage;
pub mod tags;
pub mod turbo;
pub mod upstream;
mod warm;

pub use cache::Cache;
pub use config::{CacheConfig, ConfigError, UpstreamSpec};
pub use error::CacheError;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A cache server running on a tokio task.
pub struct RunningCache {
    addr: SocketAddr,
    cache: Arc<Cache>,
    dircache: Arc<dircache::DirStore>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningCache {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The cache behind the server (metrics, store), for tests and tools.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The directory cache's store, for tests and tools.
    pub fn dircache(&self) -> &Arc<dircache::DirStore> {
        &self.dircache
    }

    /// Stops accepting connections, waits for open ones to finish and for
    /// downloads in progress to end.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let r = self.task.await.map_err(std::io::Error::other)?;
        while !self.cache.flights.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        r
    }

    /// Serves until the task ends (it does not, unless serving fails).
    pub async fn wait(self) -> std::io::Result<()> {
        self.task.await.map_err(std::io::Error::other)?
    }
}

/// What the registry routes answer on a cache started without upstreams.
async fn no_registry() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::NOT_FOUND,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        r#"{"errors":[{"code":"UNSUPPORTED","message":"this ember cache has no registry upstream (started without --upstream): it serves only the directory cache (/dircache/v1) and the Turborepo API (/v8/artifacts)"}]}"#,
    )
        .into_response()
}

/// Opens the cache described by `config` and serves it on `listener`;
/// with no upstreams configured, only as a build cache.
pub fn spawn(
    config: CacheConfig,
    listener: tokio::net::TcpListener,
) -> Result<RunningCache, CacheError> {
    let addr = listener
        .local_addr()
        .map_err(|e| CacheError::io("reading the listen address", e))?;
    let cache = Cache::new(config)?;
    cache.set_self_url(&format!("http://{addr}"));
    let dir = dircache::DirStore::open(
        &cache.config.dir.join("dircache"),
        cache.config.dircache.clone(),
    )?;
    dircache::spawn_gc(&dir);
    // Directory cache entries and chunks missing here are asked from the
    // peers (all of them, in order: they are not placed by the ring).
    if let Some(ring) = cache.ring() {
        dir.set_peers(ring.others())?;
    }
    let mut registry = server::router(cache.clone());
    if cache.config.upstreams.is_empty() {
        // A pure build cache: say so on the registry API instead of each
        // request failing on an "unknown upstream" named by its path.
        registry = axum::Router::new()
            .route("/v2", axum::routing::any(no_registry))
            .route("/v2/", axum::routing::any(no_registry))
            .route("/v2/{*rest}", axum::routing::any(no_registry))
            .route("/ember/v1/warm", axum::routing::any(no_registry))
            .merge(registry);
    }
    let router = registry
        .nest("/dircache/v1", dircache::router(dir.clone()))
        .merge(turbo::router(dir.clone()))
        .merge(snapshots::router(cache.clone())?);
    let http = ember_http::Server::new(cache.config.http.clone()).refusal(
        "application/json",
        r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"the cache is at its connection limit"}]}"#,
    );
    let _ = cache.metrics.http.set(http.stats());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        http.serve(listener, router, async move {
            let _ = stopped.await;
        })
        .await;
        Ok(())
    });
    tracing::info!(%addr, "ember cache serving");
    Ok(RunningCache {
        addr,
        cache,
        dircache: dir,
        stop: Some(stop),
        task,
    })
}
