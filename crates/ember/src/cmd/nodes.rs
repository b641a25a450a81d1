//! `ember nodes`: the cluster's nodes, and their credentials.

use crate::cmd::cluster::ControlArgs;
use std::process::ExitCode;

/// List nodes: slots, last heartbeat, images and idle warm runners; or
/// issue and revoke a node's credentials.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Option<Action>,
}

/// What to do instead of listing.
#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// A node's credentials: bearer tokens that open that node's endpoints
    /// (and no other node's), for `ember node --token`.
    #[command(subcommand)]
    Token(TokenAction),
}

/// `ember nodes token ...`.
#[derive(clap::Subcommand, Debug)]
pub enum TokenAction {
    /// Issue a new credential for node ID and print it (it is shown only
    /// this once; the control plane keeps its hash).
    Issue {
        /// The node's id (`ember node --id`).
        id: String,
    },
    /// Revoke every credential of node ID: its requests are refused and
    /// its work stream closed within a second, on every replica.
    Revoke {
        /// The node's id.
        id: String,
    },
}

/// Runs `ember nodes`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.control.client()?;
    match args.action {
        Some(Action::Token(TokenAction::Issue { id })) => {
            let c = client.issue_node_credential(&id).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                println!("{}", c.token);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(Action::Token(TokenAction::Revoke { id })) => {
            let r = client.revoke_node_credentials(&id).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("revoked {} credential(s) of node {}", r.revoked, r.node);
            }
            return Ok(ExitCode::SUCCESS);
        }
        None => {}
    }
    let nodes = client.nodes().await?;
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
