//! `ember control`: the control-plane server.

use crate::cmd::cluster::stop_signal;
use anyhow::Context;
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
    /// The SQLite database file (created if missing).
    #[arg(
        long,
        default_value = "/var/lib/ember-control/control.db",
        value_name = "PATH"
    )]
    pub db: PathBuf,
    /// Where run logs are kept [default: DB.logs].
    #[arg(long, value_name = "DIR")]
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
}

/// Builds the server configuration and opens the store; shared with `ember up`.
pub fn open(args: &Args) -> anyhow::Result<(Arc<SqliteStore>, ServerConfig)> {
    if let Some(dir) = args.db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let store = SqliteStore::open(&args.db, Arc::new(SystemClock))
        .with_context(|| format!("opening {}", args.db.display()))?;
    let logs = args.logs.clone().unwrap_or_else(|| {
        let mut p = args.db.clone().into_os_string();
        p.push(".logs");
        PathBuf::from(p)
    });
    let mut config = ServerConfig::new(logs);
    config.client_token = args.client_token.clone().filter(|t| !t.is_empty());
    config.node_token = args.node_token.clone().filter(|t| !t.is_empty());
    config.heartbeat_timeout = Duration::from_secs(args.heartbeat_timeout.max(1));
    Ok((Arc::new(store), config))
}

/// Runs `ember control` until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (store, config) = open(&args)?;
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
