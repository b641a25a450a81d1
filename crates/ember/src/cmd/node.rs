//! `ember node`: the node agent.

use crate::cmd::cluster::{find_agent, hostname, stop_signal};
use anyhow::{Context, bail};
use ember_node::{NodeAgentConfig, WatchdogCommand, run_node, watch_node};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Run a node agent: register with the control plane and execute the runs
/// it assigns, through the warm pool. The store is --root.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The control plane's URL.
    #[arg(long, env = "EMBER_CONTROL", value_name = "URL")]
    pub control: String,
    /// The node bearer token.
    #[arg(
        long,
        env = "EMBER_NODE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// This node's id [default: the host name].
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// Runs executed at once.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub slots: u32,
    /// Registry mirror (`ember cache`) to pull through.
    #[arg(long, value_name = "URL")]
    pub cache: Option<String>,
    /// The cluster cache (`ember cache`) that runs' declared directory
    /// caches are restored from and saved to [default: --cache's URL;
    /// with neither, declared caches are skipped with a note on the run].
    #[arg(long, value_name = "URL")]
    pub dircache: Option<String>,
    /// Bearer token for saves into the directory cache's protected scopes.
    #[arg(
        long,
        env = "EMBER_DIRCACHE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub dircache_token: Option<String>,
    /// The static ember-agent binary [default: $EMBER_AGENT, or found next
    /// to this executable].
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// A node label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Seconds between liveness heartbeats.
    #[arg(long, default_value_t = 3, value_name = "SECONDS")]
    pub heartbeat: u64,
    /// Bytes per second one pre-pull may read (`10M`, `500k`; `0`: no
    /// cap). A run's own pull is never capped, and pauses pre-pulls.
    #[arg(long, default_value = "0", value_name = "SIZE")]
    pub prepull_bandwidth: String,
    /// The most bytes of images the store holds (`20G`); above it the
    /// node's GC evicts what its pull plan does not keep, least recently
    /// used first. `0`: no GC.
    #[arg(long, default_value = "0", value_name = "SIZE")]
    pub image_budget: String,
    /// Serve the node's Prometheus metrics at http://ADDR/metrics (no
    /// token: use a loopback or private address) [default: not served].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The CRIU binary that snapshot deployments' checkpoints are taken
    /// and restored with on this node [default: `criu` on the PATH].
    #[arg(long, env = "EMBER_CRIU", value_name = "PATH")]
    pub criu: Option<PathBuf>,
    /// Restored copies of each snapshot deployment's checkpoint to keep
    /// prepared ahead of its runs: a run then only resumes one (no restore
    /// on its path) and a replacement is restored in the background.
    /// Each parked copy holds its start-up's memory. `0`: every run
    /// restores on demand.
    #[arg(long, default_value_t = ember_node::DEFAULT_SNAPSHOT_SPARES, value_name = "N")]
    pub snapshot_spares: usize,
}

/// Builds the node configuration; shared with `ember up`.
pub fn config(root: &Path, args: Args) -> anyhow::Result<NodeAgentConfig> {
    if args.slots == 0 {
        bail!("--slots must be at least 1");
    }
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("invalid --label {l:?}: expected KEY=VALUE"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    let agent = find_agent(args.agent)?;
    Ok(NodeAgentConfig {
        control: args.control,
        token: args.token.filter(|t| !t.is_empty()),
        id: args.id.unwrap_or_else(hostname),
        slots: args.slots,
        root: root.to_path_buf(),
        dircache: args.dircache.or_else(|| args.cache.clone()),
        dircache_token: args.dircache_token.filter(|t| !t.is_empty()),
        cache: args.cache,
        agent: agent.clone(),
        labels,
        heartbeat: Duration::from_secs(args.heartbeat.max(1)),
        watchdog: Some(watchdog(root, &agent)?),
        prepull: ember_node::PrepullConfig {
            bandwidth: Some(
                crate::util::parse_size(&args.prepull_bandwidth).context("--prepull-bandwidth")?,
            )
            .filter(|&b| b > 0),
            image_budget: Some(
                crate::util::parse_size(&args.image_budget).context("--image-budget")?,
            )
            .filter(|&b| b > 0),
        },
        metrics_listen: args.metrics_listen,
        criu: args.criu,
        snapshot_spares: args.snapshot_spares,
    })
}

/// The node's watchdog: this executable's hidden `node-watchdog` on the
/// same root, which destroys the node's runners if the node dies without
/// cleaning up (see [`watch_node`]).
pub fn watchdog(root: &Path, agent: &Path) -> anyhow::Result<WatchdogCommand> {
    let program = std::env::current_exe().context("finding this executable")?;
    Ok(WatchdogCommand {
        program,
        args: vec![
            "--root".into(),
            root.as_os_str().to_owned(),
            "node-watchdog".into(),
            "--agent".into(),
            agent.as_os_str().to_owned(),
        ],
    })
}

/// `ember node-watchdog` (hidden; started by `ember node`): waits for the
/// node process that started it to end, then destroys what it left.
#[derive(clap::Args, Debug)]
pub struct WatchdogArgs {
    /// The static ember-agent binary the node uses.
    #[arg(long, value_name = "PATH")]
    pub agent: PathBuf,
}

/// Runs `ember node-watchdog` until its standard input closes.
pub fn run_watchdog(root: &Path, args: WatchdogArgs) -> anyhow::Result<ExitCode> {
    let report = watch_node(root, &args.agent, std::io::stdin().lock())?;
    if !report.runners.is_empty() {
        eprintln!(
            "ember node-watchdog: the node agent on {} died; destroyed its {} runner(s)",
            root.display(),
            report.runners.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `ember node` until SIGINT or SIGTERM; its runners are destroyed on
/// the way out.
pub async fn run(root: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let cfg = config(root, args)?;
    eprintln!("ember node {}: connecting to {}", cfg.id, cfg.control);
    let stop = async {
        if let Err(e) = stop_signal().await {
            tracing::error!(error = %ember_error::chain(e.as_ref()), "signal handling");
        }
    };
    run_node(cfg, stop).await?;
    Ok(ExitCode::SUCCESS)
}
