//! `ember control`: the control-plane server.

use crate::cmd::cluster::stop_signal;
use crate::cmd::serving::ServerLimits;
use anyhow::Context;
use ember_control::StateStore;
use ember_control::postgres::PostgresStore;
use ember_control::sqlite::SqliteStore;
use ember_control::store::SystemClock;
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
    /// Bearer token nodes must send (none: nodes are not checked).
    #[arg(
        long,
        env = "EMBER_NODE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub node_token: Option<String>,
    /// Seconds without a heartbeat after which a node and its runs are lost.
    #[arg(long, default_value_t = 15, value_name = "SECONDS")]
    pub heartbeat_timeout: u64,
    /// Seconds of silence on a node's work stream after which the server
    /// sends a keepalive line (nodes reconnect after three silent intervals).
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub keepalive: u64,
    #[command(flatten)]
    pub limits: ServerLimits,
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
    config.heartbeat_timeout = Duration::from_secs(args.heartbeat_timeout.max(1));
    config.keepalive = Duration::from_secs(args.keepalive.max(1));
    config.http = args.limits.limits();
    Ok((store, config))
}

/// Runs `ember control` until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (store, config) = open(&args).await?;
    if config.client_token.is_none() || config.node_token.is_none() {
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
            tracing::error!(error = %e, "signal handling");
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
}
