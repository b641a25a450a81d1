//! `ember`: fast container starts. One binary, a subcommand per role.
//!
//! This crate only parses arguments and wires the library crates together;
//! the work happens in `ember-registry`, `ember-store` and `ember-runtime`.

mod cmd;
mod logging;
mod progress;
mod util;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Ember starts OCI containers fast: a verified content-addressed store,
/// overlayfs root filesystems and runc.
#[derive(Parser, Debug)]
#[command(name = "ember", version, about, long_about = None)]
struct Cli {
    /// Store and state directory.
    #[arg(
        long,
        global = true,
        env = "EMBER_ROOT",
        default_value = "/var/lib/ember"
    )]
    root: PathBuf,

    /// Log filter (error, warn, info, debug, trace or a tracing directive).
    #[arg(long, global = true, env = "EMBER_LOG", default_value = "warn")]
    log: String,

    /// Log format: text, or json (one object per line, with run and node
    /// ids as fields where they apply).
    #[arg(
        long,
        global = true,
        env = "EMBER_LOG_FORMAT",
        value_enum,
        default_value_t = logging::LogFormat::Text
    )]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pull an image from a registry into the store.
    Pull(cmd::pull::Args),
    /// Run a command in a new container from an image (pulled if missing).
    Run(cmd::run::Args),
    /// List images in the store.
    Images(cmd::images::Args),
    /// Remove an image name; the image goes when no name is left.
    Rmi(cmd::rmi::Args),
    /// Evict least-recently-used images to fit a byte budget.
    Gc(cmd::gc::Args),
    /// Image operations.
    #[command(subcommand)]
    Image(cmd::image::Command),
    /// Snapshots of start-ups (CRIU checkpoints): create, ls, rm; run one
    /// with `ember run --snapshot NAME`.
    #[command(subcommand)]
    Snapshot(cmd::snapshot::Command),
    /// Store maintenance (verify, repair).
    #[command(subcommand)]
    Store(cmd::store::Command),
    /// Run the cluster image cache: a pull-through registry mirror.
    Cache(cmd::cache::Args),
    /// Benchmarks against the reference tools, measured in the same run.
    #[command(subcommand)]
    Bench(cmd::bench::Command),
    /// Save and restore directories (tool caches) through the cluster cache.
    #[command(subcommand)]
    Dircache(cmd::dircache::Command),
    /// Run the control plane (HTTP/JSON API, durable queue, dispatcher).
    Control(cmd::control::Args),
    /// Run a node agent that executes the control plane's runs.
    Node(cmd::node::Args),
    /// Submit a run to the control plane.
    Submit(cmd::submit::Args),
    /// List runs, or their start-latency percentiles.
    Runs(cmd::runs::Args),
    /// List the cluster's nodes.
    Nodes(cmd::nodes::Args),
    /// Print a run's output.
    Logs(cmd::logs::Args),
    /// Create a deployment, or list them.
    Deploy(cmd::deploy::Args),
    /// Cancel a run.
    Cancel(cmd::cancel::Args),
    /// Control plane, cache and node agents on this machine.
    Up(cmd::up::Args),
    /// The pre-pull simulator: generate a launch trace, or replay one
    /// through Ember's planner, scheduler and GC beside two baselines.
    #[command(subcommand)]
    Sim(cmd::sim::Command),
    /// Started by `ember node`: cleans up after it if it dies.
    #[command(hide = true)]
    NodeWatchdog(cmd::node::WatchdogArgs),
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    logging::init(&cli.log, cli.log_format);
    // Paths under the root are handed to runc and CRIU, which work in
    // other directories: a relative `--root` is made absolute once, here.
    match std::path::absolute(&cli.root) {
        Ok(p) => cli.root = p,
        Err(e) => {
            eprintln!("ember: --root {}: {e}", cli.root.display());
            return ExitCode::from(125);
        }
    }

    // `run` is latency-bound and mostly waits on runc: one thread starts
    // faster than a pool. The node agent's async side only relays (the
    // work stream, reports, output; runs execute on blocking threads), and
    // on one thread a run's wake-ups from its executor cost no hand-offs
    // and steals between workers: under a burst that was about a quarter
    // of its CPU. Servers and pulls get the multi-thread runtime.
    let mut builder = if matches!(cli.command, Command::Run(_) | Command::Node(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ember: starting the async runtime: {e}");
            return ExitCode::from(125);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Pull(a) => cmd::pull::run(&cli.root, a).await,
            Command::Run(a) => cmd::run::run(&cli.root, a).await,
            Command::Images(a) => cmd::images::run(&cli.root, a),
            Command::Rmi(a) => cmd::rmi::run(&cli.root, a),
            Command::Gc(a) => cmd::gc::run(&cli.root, a),
            Command::Image(c) => cmd::image::run(&cli.root, c).await,
            Command::Store(c) => cmd::store::run(&cli.root, c),
            Command::Snapshot(c) => cmd::snapshot::run(&cli.root, c).await,
            Command::Cache(a) => cmd::cache::run(a).await,
            Command::Bench(c) => cmd::bench::run(&cli.root, c).await,
            Command::Dircache(c) => cmd::dircache::run(c).await,
            Command::Control(a) => cmd::control::run(a).await,
            Command::Node(a) => cmd::node::run(&cli.root, a).await,
            Command::Submit(a) => cmd::submit::run(a).await,
            Command::Runs(a) => cmd::runs::run(a).await,
            Command::Nodes(a) => cmd::nodes::run(a).await,
            Command::Logs(a) => cmd::logs::run(a).await,
            Command::Deploy(a) => cmd::deploy::run(a).await,
            Command::Cancel(a) => cmd::cancel::run(a).await,
            Command::Up(a) => cmd::up::run(a).await,
            Command::Sim(c) => cmd::sim::run(c),
            Command::NodeWatchdog(a) => cmd::node::run_watchdog(&cli.root, a),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ember: {}", util::error_chain(&e));
            // 125 as docker/podman use for "the tool failed", so scripts can
            // tell Ember's failures from the container's exit codes.
            ExitCode::from(125)
        }
    }
}
