//! `ember cache`: the cluster image cache server.

use crate::cmd::serving::ServerLimits;
use crate::util::parse_size;
use anyhow::Context;
use ember_cache::{CacheConfig, UpstreamSpec};
use ember_registry::Credentials;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Run a pull-through OCI registry mirror with LRU under a byte budget.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Clients use it as a registry mirror: containerd hosts.toml, \
podman/skopeo registries.conf [[registry.mirror]], `ember pull --mirror URL`.\n\
Upstream selection: containerd's ?ns=HOST, else a first path component naming \
an upstream alias (/v2/docker.io/library/busybox/...), else the default upstream."
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:5000", value_name = "ADDR")]
    pub listen: String,
    /// Cache directory (blobs, metadata, partial downloads).
    #[arg(long, default_value = "/var/lib/ember-cache", value_name = "DIR")]
    pub dir: PathBuf,
    /// Byte budget for cached blobs (`500G`, `2T`, `1048576`).
    #[arg(long, value_name = "SIZE")]
    pub max_bytes: String,
    /// Upstream registry: `URL` for the default one, `HOST=URL` for one
    /// selected by `?ns=HOST` or a `HOST/` path prefix (repeatable). None:
    /// the cache serves only `ember dircache` and the Turborepo API.
    #[arg(long = "upstream", value_name = "[HOST=]URL")]
    pub upstreams: Vec<String>,
    /// Another cache server sharing the load (repeatable; give every
    /// server the same list).
    #[arg(long = "peer", value_name = "URL")]
    pub peers: Vec<String>,
    /// This server's URL as its peers know it [default: http://LISTEN].
    #[arg(long, value_name = "URL")]
    pub advertise: Option<String>,
    /// Seconds a tag resolution is trusted before asking the upstream again.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub tag_ttl: u64,
    /// Docker-style credentials file with the cache's own credentials per
    /// upstream (`{"auths":{"HOST":{"auth":"base64(user:pass)"}}}`).
    #[arg(long, value_name = "FILE")]
    pub auth_file: Option<PathBuf>,
    /// Serve content of this upstream (which has credentials) to clients
    /// without credentials (repeatable; by upstream name).
    #[arg(long = "public-upstream", value_name = "HOST")]
    pub public: Vec<String>,
    /// Eviction starts above this percentage of --max-bytes.
    #[arg(long, default_value_t = 95, value_name = "PERCENT")]
    pub high_watermark: u8,
    /// Eviction stops at this percentage of --max-bytes.
    #[arg(long, default_value_t = 80, value_name = "PERCENT")]
    pub low_watermark: u8,
    /// Seconds an upstream's "not found" for a blob or manifest is
    /// remembered (0: not remembered); concurrent GETs of one missing blob
    /// or manifest share one upstream request either way.
    #[arg(long, default_value_t = 5, value_name = "SECONDS")]
    pub negative_ttl: u64,
    /// Directory cache: bytes each scope may hold before its least
    /// recently used entries are evicted.
    #[arg(long, default_value = "10G", value_name = "SIZE")]
    pub dircache_scope_bytes: String,
    /// Directory cache: seconds an entry may go unrestored before it is
    /// removed [default: 7 days].
    #[arg(long, default_value_t = 7 * 24 * 3600, value_name = "SECONDS")]
    pub dircache_max_unused: u64,
    /// Directory cache: a scope (e.g. the default branch) every client may
    /// read but only clients with the write token may save into or remove
    /// from (repeatable).
    #[arg(long = "dircache-protected-scope", value_name = "S")]
    pub dircache_protected: Vec<String>,
    /// Directory cache: the bearer token that may write protected scopes.
    #[arg(
        long,
        env = "EMBER_DIRCACHE_WRITE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub dircache_write_token: Option<String>,
    /// Directory cache: seconds an unreferenced chunk is kept after its
    /// last use (covers a save between its upload and its manifest).
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    pub dircache_gc_grace: u64,
    /// Turborepo remote-cache API (`/v8/artifacts`): a bearer token it
    /// accepts (repeatable, or comma-separated in the environment); the API
    /// is off without one.
    #[arg(
        long = "turbo-token",
        env = "EMBER_TURBO_TOKENS",
        value_delimiter = ',',
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub turbo_tokens: Vec<String>,
    /// Snapshots (`/ember/v1/snapshots`): the bearer token that may upload
    /// and delete them; without one the cache serves snapshots but takes
    /// none.
    #[arg(
        long,
        env = "EMBER_SNAPSHOT_WRITE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub snapshot_write_token: Option<String>,
    #[command(flatten)]
    pub connections: ServerLimits,
}

/// Runs `ember cache` until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let upstreams = args
        .upstreams
        .iter()
        .map(|s| UpstreamSpec::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut config = CacheConfig::new(args.dir.clone(), parse_size(&args.max_bytes)?, upstreams);
    config.peers = args.peers;
    config.advertise = args.advertise;
    config.tag_ttl = Duration::from_secs(args.tag_ttl);
    config.public = args.public;
    config.high_watermark = args.high_watermark;
    config.low_watermark = args.low_watermark;
    config.negative_ttl = Duration::from_secs(args.negative_ttl);
    config.http = args.connections.limits();
    config.dircache.scope_bytes = parse_size(&args.dircache_scope_bytes)?;
    config.dircache.max_unused = Duration::from_secs(args.dircache_max_unused);
    config.dircache.protected_scopes = args.dircache_protected;
    config.dircache.write_token = args.dircache_write_token;
    config.dircache.gc_grace = Duration::from_secs(args.dircache_gc_grace);
    config.dircache.turbo_tokens = args.turbo_tokens;
    config.snapshot_write_token = args.snapshot_write_token;
    if let Some(f) = &args.auth_file {
        let mut c = Credentials::none();
        c.load_docker_config(f).map_err(anyhow::Error::msg)?;
        config.credentials = c;
    }
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let server = ember_cache::spawn(config, listener)
        .with_context(|| format!("opening the cache in {}", args.dir.display()))?;
    eprintln!("ember cache: serving on {}", server.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.shutdown().await.context("shutting down")?;
    Ok(ExitCode::SUCCESS)
}
