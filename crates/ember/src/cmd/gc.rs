//! `ember gc`.

use crate::util::{human_bytes, parse_size};
use anyhow::{Context, bail};
use ember_store::Store;
use std::path::Path;
use std::process::ExitCode;

/// Evict least-recently-used images when the store is over budget.
///
/// First, containers left behind by `ember run` processes that were killed
/// (`kill -9`) are deleted and their mounts removed, so their images stop
/// counting as in use.
///
/// When unpacked layers and snapshots (artifacts and their unpacked
/// copies) take more than --max-bytes (the high watermark), whole images
/// and snapshots are removed, least recently pulled, run or restored
/// first, until usage is at or below --low (default 80% of --max-bytes).
/// Images used by a running container and snapshots a restore is reading
/// are never removed. Without --max-bytes only unreferenced layers and
/// blobs are removed.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Byte budget (high watermark), e.g. 20G.
    #[arg(long, value_name = "SIZE")]
    pub max_bytes: Option<String>,
    /// Low watermark to evict down to (default: 80% of --max-bytes).
    #[arg(long, value_name = "SIZE")]
    pub low: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ember gc`.
pub fn run(root: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let high = match &args.max_bytes {
        Some(s) => parse_size(s)?,
        None => u64::MAX,
    };
    let low = match &args.low {
        Some(s) => parse_size(s)?,
        None if high == u64::MAX => u64::MAX,
        None => high / 10 * 8,
    };
    if low > high {
        bail!("--low ({low} bytes) must not exceed --max-bytes ({high} bytes)");
    }
    let containers = root.join("containers");
    if containers.is_dir() {
        let runc = ember_runtime::Runc::new(root.join("runc"));
        match ember_runtime::recover(&containers, &runc) {
            Ok(r) => {
                for id in &r.deleted {
                    eprintln!("removed leftover container {id}");
                }
                for e in &r.errors {
                    eprintln!("ember: gc: could not clean up: {}", ember_error::chain(e));
                }
            }
            Err(e) => eprintln!(
                "ember: gc: recovering leftover containers: {}",
                ember_error::chain(&e)
            ),
        }
    }
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    let report = store.gc(high, low)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for i in &report.removed_images {
            println!("evicted {i}");
        }
        for n in &report.snapshots.evicted_snapshots {
            println!("evicted snapshot {n}");
        }
        for n in &report.snapshots.removed_snapshots {
            println!("removed snapshot {n} (its image is gone)");
        }
        if report.snapshots.removed_artifacts > 0 {
            println!(
                "removed {} unreferenced snapshot artifacts ({})",
                report.snapshots.removed_artifacts,
                human_bytes(report.snapshots.bytes_freed)
            );
        }
        println!(
            "{} -> {} ({} of snapshots; {} images, {} layers and {} snapshots removed, {} images and {} snapshots kept in use)",
            human_bytes(report.bytes_before),
            human_bytes(report.bytes_after),
            human_bytes(report.snapshot_bytes_after),
            report.removed_images.len(),
            report.removed_layers,
            report.snapshots.evicted_snapshots.len(),
            report.kept_in_use,
            report.snapshots.kept_in_use
        );
    }
    Ok(ExitCode::SUCCESS)
}
