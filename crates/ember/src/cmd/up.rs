//! `ember up`: a whole cluster on one machine — control plane (SQLite by
//! default),
//! an optional cache in front of a registry, and node agents — in one
//! process, for trying Ember and for the demo.

use crate::cmd::cluster::{find_agent, random_token, stop_signal};
use crate::cmd::control;
use anyhow::Context;
use ember_cache::{CacheConfig, UpstreamSpec};
use ember_control::store::SystemClock;
use ember_controld::server::serve;
use ember_node::{NodeAgentConfig, run_node};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Start a control plane, a cache and N node agents on this machine.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Prints `export EMBER_CONTROL=... EMBER_TOKEN=...` lines \
for the client commands and writes them to DATA/env. Stops on SIGINT/SIGTERM, \
destroying the nodes' runners."
)]
pub struct Args {
    /// Node agents to start.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nodes: u32,
    /// Slots per node.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub slots: u32,
    /// Directory for the database, the cache and the nodes' stores.
    #[arg(long, default_value = "/var/lib/ember-up", value_name = "DIR")]
    pub data: PathBuf,
    /// The control plane's address.
    #[arg(long, default_value = "127.0.0.1:7070", value_name = "ADDR")]
    pub listen: String,
    /// Registry the cache mirrors (`URL` or `HOST=URL`, repeatable); no
    /// cache without it.
    #[arg(long = "upstream", value_name = "[HOST=]URL")]
    pub upstreams: Vec<String>,
    /// The cache's address.
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub cache_listen: String,
    /// The static ember-agent binary.
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// The state store, as `ember control --db` [default: DATA/control.db].
    #[arg(long, value_name = "PATH|URL")]
    pub db: Option<String>,
}

/// Runs `ember up` until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let data = &args.data;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let agent = find_agent(args.agent.clone())?;
    let client_token = random_token()?;
    let node_token = random_token()?;

    let (store, mut config) = control::open(&control::Args {
        listen: args.listen.clone(),
        db: args
            .db
            .clone()
            .unwrap_or_else(|| data.join("control.db").to_string_lossy().into_owned()),
        logs: None,
        client_token: Some(client_token.clone()),
        // One shared secret for the nodes of this one process.
        node_token: Some(node_token.clone()),
        require_node_credentials: false,
        heartbeat_timeout: 15,
        keepalive: 10,
        limits: control::LimitArgs::default(),
        prepull: control::PrepullArgs::default(),
        connections: Default::default(),
        cache: None,
    })
    .await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let control_url = format!(
        "http://{}",
        listener
            .local_addr()
            .context("reading the listen address")?
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let cache = if args.upstreams.is_empty() {
        None
    } else {
        let upstreams = args
            .upstreams
            .iter()
            .map(|s| UpstreamSpec::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        let config = CacheConfig::new(data.join("cache"), 20 << 30, upstreams);
        config.validate()?;
        let l = tokio::net::TcpListener::bind(&args.cache_listen)
            .await
            .with_context(|| format!("listening on {}", args.cache_listen))?;
        Some(ember_cache::spawn(config, l).context("starting the cache")?)
    };
    let cache_url = cache.as_ref().map(|c| c.url());
    // The dashboard shows the cache's hit ratio.
    config.cache_url = cache_url.clone();
    let server = tokio::spawn(serve(
        listener,
        store,
        Arc::new(SystemClock),
        config,
        stopped(stop_rx.clone()),
    ));

    let mut nodes = tokio::task::JoinSet::new();
    for i in 0..args.nodes {
        let cfg = NodeAgentConfig {
            control: control_url.clone(),
            token: Some(node_token.clone()),
            id: format!("node-{i}"),
            slots: args.slots.max(1),
            root: data.join(format!("node-{i}")),
            cache: cache_url.clone(),
            // The cluster cache serves directory caches too.
            dircache: cache_url.clone(),
            dircache_token: None,
            agent: agent.clone(),
            labels: BTreeMap::new(),
            heartbeat: Duration::from_secs(3),
            watchdog: Some(crate::cmd::node::watchdog(
                &data.join(format!("node-{i}")),
                &agent,
            )?),
            prepull: Default::default(),
            metrics_listen: None,
            criu: None,
            snapshot_spares: ember_node::DEFAULT_SNAPSHOT_SPARES,
        };
        nodes.spawn(run_node(cfg, stopped(stop_rx.clone())));
    }

    let env = format!("export EMBER_CONTROL={control_url}\nexport EMBER_TOKEN={client_token}\n");
    let env_path = data.join("env");
    std::fs::write(&env_path, &env).with_context(|| format!("writing {}", env_path.display()))?;
    print!("{env}");
    eprintln!(
        "ember up: control plane {control_url}, {} node(s){}; dashboard {control_url}/ui; env in {}",
        args.nodes,
        cache_url
            .as_ref()
            .map(|u| format!(", cache {u}"))
            .unwrap_or_default(),
        env_path.display()
    );

    // A node that fails (e.g. cannot start its pool) stops the whole
    // cluster at once rather than leaving a control plane without nodes.
    let mut failed = false;
    let stop = tokio::select! {
        s = stop_signal() => s,
        Some(r) = nodes.join_next() => {
            failed = true;
            match r {
                Ok(Err(e)) => eprintln!("ember up: node: {}", ember_error::chain(&e)),
                Err(e) => eprintln!("ember up: node task: {e}"),
                Ok(Ok(())) => eprintln!("ember up: a node stopped"),
            }
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    while let Some(r) = nodes.join_next().await {
        match r {
            Ok(Err(e)) => eprintln!("ember up: node: {}", ember_error::chain(&e)),
            Err(e) => eprintln!("ember up: node task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(c) = cache {
        c.shutdown().await.context("stopping the cache")?;
    }
    server.await.context("control-plane task")??;
    stop?;
    if failed {
        anyhow::bail!("a node agent failed");
    }
    Ok(ExitCode::SUCCESS)
}
