//! `ember cancel`: cancel a queued, starting or running run.

use crate::cmd::cluster::ControlArgs;
use anyhow::Context;
use ember_api::wire::parse_run_id;
use std::process::ExitCode;

/// Cancel a run; a running process is killed.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The run (`run-7` or `7`).
    #[arg(value_name = "RUN")]
    pub run: String,
}

/// Runs `ember cancel`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let id = parse_run_id(&args.run)
        .with_context(|| format!("invalid run id {:?}: expected run-N or N", args.run))?;
    let run = args.control.client()?.cancel(id).await?;
    println!("{} {}", run.id, run.state);
    Ok(ExitCode::SUCCESS)
}
