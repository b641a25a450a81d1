//! `ember image ...`.

use anyhow::{Context, bail};
use ember_store::Store;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Image subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Write an image's flattened filesystem to a directory (whiteouts
    /// applied, ownership and modes kept, hardlinks kept). The image must
    /// be in the store (`ember pull` first).
    Unpack {
        /// Image name or digest.
        #[arg(value_name = "REF")]
        reference: String,
        /// Destination directory (must be empty or missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Runs `ember image ...`.
pub fn run(root: &Path, cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Unpack { reference, dir } => {
            if dir.exists()
                && std::fs::read_dir(&dir)
                    .with_context(|| format!("reading {}", dir.display()))?
                    .next()
                    .is_some()
            {
                bail!("{} is not empty", dir.display());
            }
            let store =
                Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
            let index = store.read_index()?;
            let image = store.resolve(&index, &reference)?;
            store
                .flatten(&image, &dir)
                .with_context(|| format!("unpacking {reference} into {}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
