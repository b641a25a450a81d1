//! `ember control`: the control-plane server.

use crate::cmd::cluster::stop_signal;
use crate::cmd::serving::ServerLimits;
use crate::util::parse_size;
use anyhow::Context;
use ember_control::postgres::PostgresStore;
use ember_control::sqlite::SqliteStore;
use ember_control::store::SystemClock;
use ember_control::{LogRetention, StateStore};
use ember_controld::server::{ServerConfig, serve};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Run the control plane: the HTTP/JSON API, the durable queue and the
/// dispatcher that pushes runs to nodes.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070", value_name = "ADDR")]
    pub listen: String,
    /// The state store: a SQLite file (created if missing), or a
    /// PostgreSQL URL `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (schema
    /// created if missing; several replicas may share one database).
    #[arg(
        long,
        default_value = "/var/lib/ember-control/control.db",
        value_name = "PATH|URL"
    )]
    pub db: String,
    /// Ignored: run logs are kept in the state store now (so every replica
    /// serves every run's logs). Accepted so old command lines still start.
    #[arg(long, value_name = "DIR", hide = true)]
    pub logs: Option<PathBuf>,
    /// Bearer token clients must send (none: clients are not checked).
    #[arg(
        long,
        env = "EMBER_CLIENT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub client_token: Option<String>,
    /// A bearer token every node may send, for any node id (one shared
    /// secret; prefer per-node credentials, `ember nodes token issue`).
    #[arg(
        long,
        env = "EMBER_NODE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub node_token: Option<String>,
    /// Nodes must send a credential issued to them (`ember nodes token
    /// issue ID`), or the shared --node-token if one is given. Without this
    /// and without --node-token nodes are not checked. An issued credential
    /// opens only its own node's endpoints either way.
    #[arg(long)]
    pub require_node_credentials: bool,
    /// Seconds without a heartbeat after which a node and its runs are lost.
    #[arg(long, default_value_t = 15, value_name = "SECONDS")]
    pub heartbeat_timeout: u64,
    /// Seconds of silence on a node's work stream after which the server
    /// sends a keepalive line (nodes reconnect after three silent intervals).
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub keepalive: u64,
    /// The cluster cache's URL (`ember cache`): the dashboard (`/ui`)
    /// shows its hit ratio and upstream bytes, read from its `/metrics`.
    #[arg(long, value_name = "URL")]
    pub cache: Option<String>,
    #[command(flatten)]
    pub connections: ServerLimits,
    /// What one run may store in the control plane, and how long logs stay.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Pre-pulls: how often pull plans go out, and the planner's knobs.
    #[command(flatten)]
    pub prepull: PrepullArgs,
}

/// `ember control`'s pre-pull settings.
#[derive(clap::Args, Debug, Clone)]
pub struct PrepullArgs {
    /// How often each node is sent its pull plan (also at once when a node
    /// connects); `0` switches pre-pulls off.
    #[arg(long, default_value = "60s", value_name = "AGE")]
    pub prepull_interval: String,
    /// Replicas per unit of launch share and node: an image with a share
    /// p of recent launches is planned on ceil(R × nodes × p) nodes.
    #[arg(long, default_value_t = 0.5, value_name = "R")]
    pub prepull_replication: f64,
    /// Images with fewer (decayed) launches than this are not pre-pulled.
    #[arg(long, default_value_t = 2.0, value_name = "LAUNCHES")]
    pub prepull_min_score: f64,
}

impl Default for PrepullArgs {
    fn default() -> Self {
        PrepullArgs {
            prepull_interval: "60s".into(),
            prepull_replication: 0.5,
            prepull_min_score: 2.0,
        }
    }
}

impl PrepullArgs {
    /// Applies the settings to `config`.
    fn apply(&self, config: &mut ServerConfig) -> anyhow::Result<()> {
        let every = parse_age(&self.prepull_interval).context("--prepull-interval")?;
        config.prepull_interval = (!every.is_zero()).then_some(every);
        config.prepull.replication = self.prepull_replication.max(0.0);
        config.prepull.min_score = self.prepull_min_score.max(0.0);
        Ok(())
    }
}

/// `ember control`'s limits on what runs store (sizes: `64k`, `16M`, `8G`;
/// ages: `90s`, `30m`, `12h`, `7d`; `0` switches a retention limit off).
#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// The most bytes of environment and command line (keys, values and
    /// arguments together) one run or deployment may carry; bigger submits
    /// are answered 413.
    #[arg(long, default_value = "64k", value_name = "SIZE")]
    pub max_env_bytes: String,
    /// The most output kept per run; the log then ends with a truncation
    /// notice and later output is dropped.
    #[arg(long, default_value = "64M", value_name = "SIZE")]
    pub max_log_bytes: String,
    /// Logs of finished runs are pruned this long after their last output.
    #[arg(long, default_value = "7d", value_name = "AGE")]
    pub log_max_age: String,
    /// Logs of finished runs are pruned, least recently written first, to
    /// keep all runs' logs under this size.
    #[arg(long, default_value = "8G", value_name = "SIZE")]
    pub log_max_total: String,
    /// How often logs are pruned.
    #[arg(long, default_value = "60s", value_name = "AGE")]
    pub prune_interval: String,
}

impl Default for LimitArgs {
    fn default() -> Self {
        LimitArgs {
            max_env_bytes: "64k".into(),
            max_log_bytes: "64M".into(),
            log_max_age: "7d".into(),
            log_max_total: "8G".into(),
            prune_interval: "60s".into(),
        }
    }
}

/// Parses an age: a number with `s`, `m`, `h` or `d` (no unit: seconds).
fn parse_age(s: &str) -> anyhow::Result<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid age {s:?}: expected a number and s, m, h or d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        u => anyhow::bail!("invalid age {s:?}: unknown unit {u:?} (use s, m, h or d)"),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

impl LimitArgs {
    /// Applies the limits to `config`.
    fn apply(&self, config: &mut ServerConfig) -> anyhow::Result<()> {
        config.max_env_bytes = usize::try_from(parse_size(&self.max_env_bytes)?)
            .context("--max-env-bytes is too large")?;
        // The request body holds the environment JSON-encoded, plus the rest
        // of the spec: leave room for both.
        config.max_request_bytes = config
            .max_env_bytes
            .saturating_mul(2)
            .saturating_add(64 << 10)
            .max(1 << 20);
        config.max_log_bytes = parse_size(&self.max_log_bytes)?;
        let age = parse_age(&self.log_max_age)?;
        let total = parse_size(&self.log_max_total)?;
        config.log_retention = LogRetention {
            max_age_ms: (!age.is_zero())
                .then(|| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
            max_total_bytes: (total > 0).then_some(total),
        };
        config.prune_interval = parse_age(&self.prune_interval)?.max(Duration::from_secs(1));
        Ok(())
    }
}

/// Whether `--db` names a PostgreSQL database rather than a SQLite file.
fn is_postgres(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// `--db` for messages: a PostgreSQL URL without its password.
fn redacted(db: &str) -> String {
    match (db.find("://"), db.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &db[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &db[..scheme + 3], &db[at..]),
                None => db.to_owned(),
            }
        }
        _ => db.to_owned(),
    }
}

/// Builds the server configuration and opens the store; shared with `ember up`.
pub async fn open(args: &Args) -> anyhow::Result<(Arc<dyn StateStore>, ServerConfig)> {
    let db = args.db.clone();
    if args.logs.is_some() {
        tracing::warn!("--logs is ignored: run logs are kept in the state store");
    }
    let store: Arc<dyn StateStore> = if is_postgres(&db) {
        // The PostgreSQL client runs its own runtime per connection and
        // must not be started on an async worker.
        let store = tokio::task::spawn_blocking(move || {
            PostgresStore::open(&db, Arc::new(SystemClock))
                .with_context(|| format!("opening {}", redacted(&db)))
        })
        .await
        .context("opening the PostgreSQL store")??;
        Arc::new(store)
    } else {
        let path = PathBuf::from(&db);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let store = SqliteStore::open(&path, Arc::new(SystemClock))
            .with_context(|| format!("opening {}", path.display()))?;
        Arc::new(store)
    };
    let mut config = ServerConfig::new();
    config.client_token = args.client_token.clone().filter(|t| !t.is_empty());
    config.node_token = args.node_token.clone().filter(|t| !t.is_empty());
    config.require_node_credentials = args.require_node_credentials;
    config.heartbeat_timeout = Duration::from_secs(args.heartbeat_timeout.max(1));
    config.keepalive = Duration::from_secs(args.keepalive.max(1));
    config.http = args.connections.limits();
    config.cache_url = args.cache.clone();
    args.limits.apply(&mut config)?;
    args.prepull.apply(&mut config)?;
    Ok((store, config))
}

/// Runs `ember control` until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (store, config) = open(&args).await?;
    if config.client_token.is_none()
        || (config.node_token.is_none() && !config.require_node_credentials)
    {
        tracing::warn!(
            "running without a client or node token: anyone who can connect may use the API"
        );
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!(
        "ember control: serving on http://{}",
        listener
            .local_addr()
            .context("reading the listen address")?
    );
    let stop = async {
        if let Err(e) = stop_signal().await {
            tracing::error!(error = %ember_error::chain(e.as_ref()), "signal handling");
        }
    };
    serve(listener, store, Arc::new(SystemClock), config, stop).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redacted("postgres://ember:s3cret@db:5432/ember"),
            "postgres://ember:***@db:5432/ember"
        );
        assert_eq!(
            redacted("postgres://ember@db/ember"),
            "postgres://ember@db/ember"
        );
        assert_eq!(redacted("/var/lib/x.db"), "/var/lib/x.db");
        assert!(is_postgres("postgresql://h/d") && !is_postgres("/tmp/postgres.db"));
    }

    #[test]
    fn limits_parse_and_zero_switches_retention_off() {
        let mut config = ServerConfig::new();
        LimitArgs {
            max_env_bytes: "1M".into(),
            max_log_bytes: "16M".into(),
            log_max_age: "0".into(),
            log_max_total: "2G".into(),
            prune_interval: "5m".into(),
        }
        .apply(&mut config)
        .expect("limits");
        assert_eq!(config.max_env_bytes, 1 << 20);
        assert_eq!(config.max_log_bytes, 16 << 20);
        assert_eq!(config.log_retention.max_age_ms, None);
        assert_eq!(config.log_retention.max_total_bytes, Some(2 << 30));
        assert_eq!(config.prune_interval, Duration::from_secs(300));
        assert_eq!(
            parse_age("7d").expect("age"),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_age("7w").is_err());
        LimitArgs::default().apply(&mut config).expect("defaults");
        assert_eq!(config.log_retention, ServerConfig::new().log_retention);
        assert_eq!(config.max_env_bytes, ServerConfig::new().max_env_bytes);
    }
}
