//! `ember bench`: argument parsing for the benchmarks in `ember-bench`,
//! and fetching the image they run.

use crate::cmd::cluster::{ControlArgs, find_agent};
use crate::cmd::pull::pull_image;
use crate::cmd::submit::pin;
use crate::util::RegistryArgs;
use anyhow::Context;
use ember_bench::{Say, burst, command_or_default, warm};
use ember_oci::{Digest, Reference};
use ember_pool::RunnerImage;
use ember_store::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// No-op actions through recycled warm runners, against `runc exec`
    /// and `podman exec` loops on the same image.
    ///
    /// Each action is acquire + exec of the command (`true` unless given
    /// after `--`) through the runner's agent + release (workspace reset
    /// included). Reported: actions per second, per-action latency
    /// (p50/p99), and dispatch latency: from the start of acquire until
    /// the agent reports the process started (its `execve` succeeded), as
    /// the client sees it. The peers run their loops sequentially into one
    /// running container of the same image. Runners live in
    /// `<root>/bench/`, apart from a node's pool.
    Warm(WarmArgs),
    /// N no-op runs submitted at once to a running control plane, against
    /// the node's raw warm-pool throughput measured in the same run.
    ///
    /// The runs (the command, `true` unless given after `--`, in the
    /// image; one deployment with a recycling key so runners are reused)
    /// are submitted concurrently; once all are final their stored records
    /// give runs/s (first submit → last final state), the time to the
    /// first start and submit → started percentiles. Then the same command
    /// goes through a local warm pool (under `<root>/bench/`, as in `bench
    /// warm`) with as many threads as the cluster has slots, and the
    /// control plane's overhead is 1 − burst runs/s ÷ raw runs/s.
    Burst(BurstArgs),
    /// A run's pull of an image alone, and while the node's pre-pulls of
    /// other images are in flight (the same pre-pull code as `ember node`,
    /// yielding to the run's pull), repeated; prints the medians and their
    /// ratio. The target is that pre-pulls never delay a run's pull by more
    /// than 10 %. Stores live in `<root>/bench/prepull/`, emptied as it goes.
    Prepull(PrepullArgs),
}

/// Options of `ember bench prepull`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  ember bench prepull --image 127.0.0.1:5000/ember/big:latest \\\n    \
--prepull 127.0.0.1:5000/ember/multi:latest --reps 5 --unyielding"
)]
pub struct PrepullArgs {
    /// The run's image.
    #[arg(long, value_name = "REF")]
    pub image: String,
    /// An image pre-pulled meanwhile (repeatable; pulled one after another).
    #[arg(long = "prepull", value_name = "REF", required = true)]
    pub prepull: Vec<String>,
    /// Repetitions of each arm.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub reps: usize,
    /// The pre-pulls' cap per second (as `ember node --prepull-bandwidth`;
    /// 0 = uncapped, the hardest case for the yield).
    #[arg(long, value_name = "BYTES", default_value = "0")]
    pub bandwidth: String,
    /// Also measure the pull next to ungated pulls of the other images.
    #[arg(long)]
    pub unyielding: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Options of `ember bench warm`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The command after `--` runs as given, without the image's Entrypoint \
(pool and peers alike).\n\n\
Examples:\n  ember bench warm --image 127.0.0.1:5000/ember/busybox:latest\n  \
ember bench warm --image busybox --n 5000 --concurrency 2 --json\n  \
ember bench warm --image busybox --paused\n  \
ember bench warm --image python:3 -- python3 -c pass"
)]
pub struct WarmArgs {
    /// Image to run (pulled if it is not in the store). It needs the
    /// command (`true` by default) on its PATH, and `sleep` for the peers'
    /// long-running container.
    #[arg(long, value_name = "REF")]
    pub image: String,
    /// Actions through the pool.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub n: usize,
    /// Threads issuing actions at once (each with its own runner).
    #[arg(long, value_name = "C", default_value_t = 1)]
    pub concurrency: usize,
    /// Make every action find its runner frozen (delayed pause at 0, and
    /// an explicit freeze before each action), to show the cost of
    /// unfreezing. Latencies exclude the freeze; actions/s includes it.
    #[arg(long)]
    pub paused: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// `runc exec` iterations (0 skips the peer).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub runc_n: usize,
    /// `podman exec` iterations (0 skips the peer).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub podman_n: usize,
    /// Image reference podman pulls [default: --image]. Loopback
    /// registries are pulled with --tls-verify=false.
    #[arg(long, value_name = "REF")]
    pub podman_image: Option<String>,
    /// The static ember-agent binary [default: $EMBER_AGENT, or found next
    /// to this binary or in the cargo target directory].
    #[arg(long, value_name = "PATH", env = "EMBER_AGENT")]
    pub agent: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The command of every action [default: true].
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Options of `ember bench burst`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The image is pinned to its digest here (as `ember submit` \
does) and run through one deployment, `bench-burst-<digest prefix>` (with a \
suffix naming the command if it is not `true`), whose recycling key keeps its \
runners warm between bursts. The command after `--` is the deployment's (the \
image's Entrypoint applies, as for any run); the raw pool runs it as given.\n\
runs/s = succeeded runs / (first submit → last run final); first start = first \
submit → earliest process start; p50/p99 = submit → process started per run; \
queue = submit → claimed by the scheduler, placement = claimed → assigned to a \
node, node = assigned → process started (as in `ember runs --stats`); all from \
the control plane's records. overhead = 1 - runs/s ÷ raw runs/s.\n\n\
Examples:\n  ember bench burst --image 127.0.0.1:5000/ember/busybox:latest --runs 1000\n  \
ember bench burst --control http://10.0.0.2:7070 --token T --image busybox --json --no-raw\n  \
ember bench burst --image shell-entrypoint:v1 --runs 500 -- -c true"
)]
pub struct BurstArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Image to run; it needs the command (`true` by default) on its PATH.
    #[arg(long, value_name = "REF")]
    pub image: String,
    /// Runs in the burst.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub runs: usize,
    /// Submit requests in flight at once.
    #[arg(long, value_name = "C", default_value_t = 64)]
    pub submitters: usize,
    /// Runs submitted together and waited for before the burst, so that it
    /// finds warm runners [default: the cluster's slots; 0: none].
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
    /// Threads of the raw pool measurement [default: the slots of the
    /// cluster's live nodes, else 8].
    #[arg(long, value_name = "N")]
    pub slots: Option<usize>,
    /// Actions of the raw pool measurement [default: --runs].
    #[arg(long, value_name = "N")]
    pub raw_runs: Option<usize>,
    /// Skip the raw pool measurement (and so the overhead).
    #[arg(long)]
    pub no_raw: bool,
    /// CPUs the raw pool measurement may use (e.g. `0` or `0,1`), so it
    /// can be given the same CPUs as the node when the node is pinned
    /// (`taskset`) apart from the control plane [default: any].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub raw_cpus: Vec<usize>,
    /// Give up waiting for the runs after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub timeout: u64,
    /// Print one JSON object instead of text (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// The static ember-agent binary for the raw measurement [default:
    /// $EMBER_AGENT, or found next to this binary or in the cargo target
    /// directory].
    #[arg(long, value_name = "PATH", env = "EMBER_AGENT")]
    pub agent: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The command of every run [default: true].
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Runs `ember bench`.
pub async fn run(root: &Path, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Warm(args) => run_warm(root, args).await,
        Command::Burst(args) => run_burst(root, args).await,
        Command::Prepull(args) => run_prepull(root, args).await,
    }
}

async fn run_prepull(root: &Path, args: PrepullArgs) -> anyhow::Result<ExitCode> {
    let bandwidth = crate::util::parse_size(&args.bandwidth).context("--bandwidth")?;
    let cfg = ember_bench::prepull::PrepullConfig {
        image: args.image.parse().context("--image")?,
        others: args
            .prepull
            .iter()
            .map(|r| r.parse().with_context(|| format!("--prepull {r}")))
            .collect::<anyhow::Result<_>>()?,
        reps: args.reps,
        bandwidth: (bandwidth > 0).then_some(bandwidth),
        unyielding: args.unyielding,
        dir: root.join("bench").join("prepull"),
    };
    std::fs::create_dir_all(&cfg.dir).with_context(|| format!("creating {}", cfg.dir.display()))?;
    let registry = args.registry.client()?;
    let json = args.json;
    let say: Say = Arc::new(move |s: &str| {
        if !json {
            eprintln!("prepull: {s}");
        }
    });
    let report = ember_bench::prepull::run(&cfg, &registry, &say).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens the store under `root` and returns it with `reference`'s image,
/// pulled first if it is not complete in the store.
async fn local_image(
    root: &Path,
    reference: &str,
    registry: &RegistryArgs,
    quiet: bool,
) -> anyhow::Result<(Store, RunnerImage)> {
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    let local = {
        let index = store.read_index()?;
        store
            .resolve(&index, reference)
            .ok()
            .filter(|i| store.missing_layers(i).is_empty())
    };
    let record = match local {
        Some(r) => r,
        None => {
            pull_image(&store, reference, registry, quiet, false)
                .await
                .with_context(|| format!("pulling {reference}"))?
                .image
        }
    };
    let image = RunnerImage::from_store(&store, &record)?;
    Ok((store, image))
}

async fn run_warm(root: &Path, args: WarmArgs) -> anyhow::Result<ExitCode> {
    let agent = find_agent(args.agent.clone())?;
    let cfg = warm::WarmConfig {
        image: args.image.clone(),
        bench: root.join("bench"),
        agent,
        command: command_or_default(args.command),
        n: args.n,
        concurrency: args.concurrency,
        paused: args.paused,
        runc_n: args.runc_n,
        podman_n: args.podman_n,
        podman_image: args.podman_image,
    };
    cfg.validate()?;
    let (store, image) = local_image(root, &args.image, &args.registry, args.json).await?;
    let json = args.json;
    let say: Say = Arc::new(move |s: &str| {
        if !json {
            eprintln!("{s}");
        }
    });
    let report = tokio::task::spawn_blocking(move || warm::run(&cfg, store, &image, &say))
        .await
        .context("benchmark thread failed")??;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_burst(root: &Path, args: BurstArgs) -> anyhow::Result<ExitCode> {
    let cfg = burst::BurstConfig {
        runs: args.runs,
        submitters: args.submitters,
        warmup: args.warmup,
        slots: args.slots,
        raw_runs: args.raw_runs,
        raw_cpus: args.raw_cpus.clone(),
        timeout: Duration::from_secs(args.timeout),
        command: command_or_default(args.command.clone()),
        bench: root.join("bench"),
    };
    cfg.validate()?;
    let client = args.control.client()?;
    let say: Say = Arc::new(|s: &str| eprintln!("burst: {s}"));
    // The cluster first: with no node there is nothing to pin or pull for.
    let cluster = burst::cluster(&client).await?;
    let pinned = pin(&args.image).await?;
    let raw = if args.no_raw {
        None
    } else {
        let agent = find_agent(args.agent.clone())?;
        let r: Reference = pinned.reference.parse()?;
        let d: Digest = pinned.digest.parse()?;
        let by_digest = r.with_digest(d).to_string();
        let (store, image) = local_image(root, &by_digest, &args.registry, args.json).await?;
        Some(burst::RawInput {
            agent,
            store,
            image,
        })
    };
    let report = burst::run(&client, cluster, &pinned, raw, &cfg, &say).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    for f in &report.failures {
        eprintln!("burst: {f}");
    }
    if let Some(e) = &report.first_submit_error {
        eprintln!("burst: {} submits failed, first: {e}", report.submit_errors);
    }
    if report.all_ok() {
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(why) = report
        .raw
        .raw_skipped
        .as_deref()
        .filter(|_| report.raw.failed)
    {
        eprintln!("burst: raw pool measurement {why}");
    }
    Ok(ExitCode::from(1))
}
