//! `ember images`.

use crate::util::human_bytes;
use anyhow::Context;
use ember_store::Store;
use std::path::Path;
use std::process::ExitCode;

/// List images in the store, most recently used first.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// One JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ember images`.
pub fn run(root: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    let images = store.images()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<60} {:<14} {:>10} {:>6}  IN USE",
        "NAME", "DIGEST", "SIZE", "LAYERS"
    );
    for i in images {
        let names = if i.names.is_empty() {
            vec!["<none>".to_string()]
        } else {
            i.names.clone()
        };
        for n in names {
            println!(
                "{:<60} {:<14} {:>10} {:>6}  {}",
                n,
                &i.manifest.hex()[..12],
                human_bytes(i.bytes),
                i.layers,
                if i.in_use { "yes" } else { "" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
