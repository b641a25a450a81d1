//! `ember store ...`.

use anyhow::Context;
use ember_store::Store;
use std::path::Path;
use std::process::ExitCode;

/// Store subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Re-check the store: blob and snapshot artifact digests, and every layer directory against
    /// the record of its tree written when it was pulled (so a file
    /// changed, added or deleted later, or a layer torn by a crash, is
    /// found). With --repair, remove what is bad, together with the index
    /// entries of images that lose a blob or a layer, so the next pull
    /// fetches them again. Objects used by a running container are
    /// reported but left alone.
    ///
    /// Exit status: 0 if the store is consistent (nothing found, or all of
    /// it repaired); 1 if problems remain (found without --repair, or in
    /// use); 125 if the check itself failed.
    Verify {
        /// Remove bad blobs, layers and leftovers, and the images that use them.
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `ember store ...`.
pub fn run(root: &Path, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Verify { repair, json } => {
            let store =
                Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
            let report = store.verify(repair).context("verifying the store")?;
            let snapshots = store
                .verify_snapshots(repair)
                .context("verifying snapshot artifacts")?;
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["snapshot_problems"] = serde_json::to_value(&snapshots)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for p in &snapshots {
                    let state = if p.repaired { "removed" } else { "found" };
                    println!("{}: {} ({state})", p.object, p.detail);
                }
                for p in &report.problems {
                    let state = if p.repaired {
                        "removed"
                    } else if let Some(why) = &p.not_repaired {
                        why.as_str()
                    } else {
                        "found"
                    };
                    println!("{}: {} ({state})", p.kind, p.object);
                    if !p.images.is_empty() {
                        println!("  used by: {}", p.images.join(", "));
                    }
                    for d in &p.detail {
                        println!("  {d}");
                    }
                }
                for i in &report.images_removed {
                    println!("removed image {i}; pull it again");
                }
                println!(
                    "{} blobs and {} layers checked: {}",
                    report.blobs_checked,
                    report.layers_checked,
                    if report.problems.is_empty() {
                        "no problems".to_string()
                    } else if report.consistent() {
                        format!("{} problems, all repaired", report.problems.len())
                    } else {
                        format!(
                            "{} problems, {} left",
                            report.problems.len(),
                            report.problems.iter().filter(|p| !p.repaired).count()
                        )
                    }
                );
            }
            Ok(
                if report.consistent() && snapshots.iter().all(|p| p.repaired) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                },
            )
        }
    }
}
