//! `ember pull`.

use crate::progress::Progress;
use crate::util::{RegistryArgs, human_bytes};
use anyhow::Context;
use ember_node::images::Pull;
use ember_oci::{Platform, Reference};
use ember_store::{PullOptions, PullReport, SilentProgress, Store};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

/// Pull an image into the store, verifying every blob.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "REF is any Docker reference: name, name:tag, name@sha256:..., \
host:port/a/b:tag (docker.io/library is the default).\n\
Plain HTTP is used for loopback registries and hosts given with --insecure-registry."
)]
pub struct Args {
    /// Image reference.
    #[arg(value_name = "REF")]
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print only the manifest digest.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print timings as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// syncfs the store before committing the layers. Without it layers
    /// are committed at once and re-fetched if the machine reboots before
    /// the kernel wrote them back (a power cut could have lost them).
    #[arg(long)]
    pub sync: bool,
    /// Skip recording the layers' trees (for measuring what the record
    /// costs a pull; `ember store verify` then reports those layers as
    /// having no record).
    #[arg(long, hide = true)]
    pub no_tree_record: bool,
}

/// What pulling `reference` with the given registry flags takes, silently
/// (the caller sets `progress`); shared with `ember run`, which sets it up
/// only when the image is not here.
pub fn pull_for(reference: &str, registry: &RegistryArgs, durable: bool) -> anyhow::Result<Pull> {
    let reference: Reference = reference.parse()?;
    let platform: Platform = registry.platform.parse()?;
    Ok(Pull {
        reference,
        registry: registry.client()?,
        options: PullOptions {
            platform,
            durable,
            ..Default::default()
        },
        progress: Arc::new(SilentProgress),
    })
}

/// Pulls `reference` with the given registry flags.
pub async fn pull_image(
    store: &Store,
    reference: &str,
    registry: &RegistryArgs,
    quiet: bool,
    durable: bool,
) -> anyhow::Result<PullReport> {
    pull_image_recording(store, reference, registry, quiet, durable, true).await
}

/// [`pull_image`], saying whether the layers' trees are recorded.
async fn pull_image_recording(
    store: &Store,
    reference: &str,
    registry: &RegistryArgs,
    quiet: bool,
    durable: bool,
    record_trees: bool,
) -> anyhow::Result<PullReport> {
    let mut pull = pull_for(reference, registry, durable)?;
    pull.options.record_trees = record_trees;
    let progress = Arc::new(Progress::new(quiet));
    pull.progress = progress.clone();
    let result = ember_store::pull(
        store,
        &pull.registry,
        &pull.reference,
        &pull.options,
        pull.progress,
    )
    .await;
    progress.finish();
    Ok(result?)
}

/// Runs `ember pull`.
pub async fn run(root: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    let report = pull_image_recording(
        &store,
        &args.reference,
        &args.registry,
        args.quiet || args.json,
        args.sync,
        !args.no_tree_record,
    )
    .await?;
    let t = &report.timings;
    if args.json {
        let v = serde_json::json!({
            "reference": args.reference,
            "manifest": report.image.manifest.to_string(),
            "layers_fetched": report.layers_fetched,
            "layers_present": report.layers_present,
            "bytes_downloaded": report.bytes_downloaded,
            "resolve_ms": t.resolve.as_secs_f64() * 1e3,
            "fetch_ms": t.fetch.as_secs_f64() * 1e3,
            "unpack_ms": t.unpack.as_secs_f64() * 1e3,
            "commit_ms": t.commit.as_secs_f64() * 1e3,
            "total_ms": t.total.as_secs_f64() * 1e3,
        });
        println!("{v}");
    } else if args.quiet {
        println!("{}", report.image.manifest);
    } else {
        eprintln!(
            "pulled {} ({} layers fetched, {} present, {} downloaded) in {:.2}s \
             [resolve {:.0} ms, fetch {:.0} ms, unpack tail {:.0} ms, commit {:.0} ms]",
            args.reference,
            report.layers_fetched,
            report.layers_present,
            human_bytes(report.bytes_downloaded),
            t.total.as_secs_f64(),
            t.resolve.as_secs_f64() * 1e3,
            t.fetch.as_secs_f64() * 1e3,
            t.unpack.as_secs_f64() * 1e3,
            t.commit.as_secs_f64() * 1e3,
        );
        println!("{}", report.image.manifest);
    }
    Ok(ExitCode::SUCCESS)
}
