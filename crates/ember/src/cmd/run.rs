//! `ember run` (being wired to the runtime).

use std::path::Path;
use std::process::ExitCode;

/// Run a command in a container.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image reference.
    pub image: String,
}

/// Runs `ember run`.
pub async fn run(_root: &Path, _args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
