//! `ember rmi`.

use anyhow::Context;
use ember_store::Store;
use std::path::Path;
use std::process::ExitCode;

/// Remove image names. An image (and layers no other image shares) is
/// deleted once no name points at it; naming it by digest removes it with
/// all its names. An image a running container uses is never removed.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image names or digests.
    #[arg(value_name = "REF", required = true)]
    pub references: Vec<String>,
}

/// Runs `ember rmi`.
pub fn run(root: &Path, args: Args) -> anyhow::Result<ExitCode> {
    let store = Store::open(root).with_context(|| format!("opening store {}", root.display()))?;
    let mut failed = false;
    for r in &args.references {
        match store.remove(r) {
            Ok(Some(d)) => println!("deleted {d}"),
            Ok(None) => println!("untagged {r}"),
            Err(e) => {
                eprintln!("ember: rmi {r}: {}", ember_error::chain(&e));
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
