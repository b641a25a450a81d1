//! `ember nodes`: the cluster's nodes.

use crate::cmd::cluster::ControlArgs;
use std::process::ExitCode;

/// List nodes: slots, last heartbeat, images and idle warm runners.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ember nodes`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let nodes = args.control.client()?.nodes().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = ember_store::now_ms();
    println!(
        "{:<20} {:>5} {:>10} {:>7} {:>12}",
        "NODE", "SLOTS", "HEARTBEAT", "IMAGES", "IDLE RUNNERS"
    );
    for n in nodes {
        let idle: u32 = n.spec.inventory.idle_runners.values().sum();
        println!(
            "{:<20} {:>5} {:>9}s {:>7} {:>12}",
            n.spec.id,
            n.spec.slots,
            now.saturating_sub(n.last_heartbeat) / 1000,
            n.spec.inventory.images.len(),
            idle
        );
    }
    Ok(ExitCode::SUCCESS)
}
