//! `ember deploy`: create a deployment (a named run template), list them,
//! or delete one.

use crate::cmd::cluster::ControlArgs;
use crate::cmd::submit::pin;
use anyhow::{Context, bail};
use ember_control::model::{CacheDecl, DeploymentSpec, Resources};
use std::collections::BTreeMap;
use std::process::ExitCode;

/// Create a deployment pinned to the image's current digest; `ember submit
/// --deployment NAME` then runs it.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example (snapshot starts):\n  ember deploy --snapshot slow busybox -- \\\n    \
sh -c 'sleep 3; echo ready >&3; read -r req <&3; echo \"$req\"'\n  \
ember submit --deployment slow --wait -- hello"
)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// List the deployments instead.
    #[arg(long, conflicts_with_all = ["name", "image"])]
    pub list: bool,
    /// Delete deployment NAME instead: new runs of it are refused (runs
    /// already submitted keep running), and every node removes its
    /// checkpoints at its next heartbeat.
    #[arg(long, conflicts_with_all = ["list", "image"], requires = "name")]
    pub delete: bool,
    /// Its name.
    #[arg(value_name = "NAME", required_unless_present = "list")]
    pub name: Option<String>,
    /// Its image.
    #[arg(value_name = "IMAGE", required_unless_present_any = ["list", "delete"])]
    pub image: Option<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The recycling key its runs share runners under, with every run and
    /// deployment that names it [default: runs of this deployment share
    /// runners only with each other].
    #[arg(long, value_name = "KEY")]
    pub recycle_key: Option<String>,
    /// Its runners get a read-only root filesystem (/workspace, /tmp,
    /// /var/tmp, /run and /dev/shm stay writable), so nothing persists
    /// between its runs but what the image has.
    #[arg(long)]
    pub read_only: bool,
    /// Idle runners nodes should keep warm for it, created before any run
    /// of it arrives (the control plane orders them from the nodes).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub warm: u32,
    /// A directory cache its runs restore before their process starts and
    /// save after it exits 0 (repeatable; see `ember submit --cache`):
    /// PATH=KEY[,restore=PREFIX]...[,scope=S][,fallback=S]...[,read-only].
    #[arg(long = "cache", value_name = "PATH=KEY[,OPT]...", value_parser = crate::cmd::submit::parse_cache)]
    pub caches: Vec<CacheDecl>,
    /// Start its runs from a checkpoint: CMD is a start-up that signals
    /// readiness (writes `ready` to the descriptor in $EMBER_READY_FD,
    /// then reads one JSON line from it; see docs/agent-protocol.md). A
    /// node checkpoints it with CRIU the first time and restores a copy
    /// for each later run; `ember submit --deployment NAME -- ARGS` hands
    /// ARGS and its -e variables to the start-up as `argv` and `env` of
    /// that line (`restored` says whether the copy was restored).
    #[arg(long)]
    pub snapshot: bool,
    /// Command and arguments (default: the image's).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Runs `ember deploy`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.control.client()?;
    if args.list {
        println!(
            "{}",
            serde_json::to_string_pretty(&client.deployments().await?)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.delete {
        let name = args.name.context("NAME is required")?;
        let d = client.delete_deployment(&name).await?;
        println!("deleted {}", d.spec.name);
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(name), Some(image)) = (args.name, args.image) else {
        bail!("NAME and IMAGE are required");
    };
    let mut env = BTreeMap::new();
    for e in &args.env {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("invalid --env {e:?}: expected KEY=VALUE"))?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let d = client
        .deploy(&DeploymentSpec {
            caches: args.caches,
            name,
            image: pin(&image).await?,
            command: args.command,
            env,
            resources: Resources::default(),
            recycle_key: args.recycle_key,
            readonly_rootfs: args.read_only,
            warm_runners: args.warm,
            node_selector: BTreeMap::new(),
            snapshot: args.snapshot,
        })
        .await?;
    println!(
        "{} {}@{}",
        d.spec.name, d.spec.image.reference, d.spec.image.digest
    );
    Ok(ExitCode::SUCCESS)
}
