//! Helpers shared by the cluster commands (`control`, `node`, `submit`,
//! `runs`, `nodes`, `logs`, `up`): finding the control plane and the token,
//! the agent binary, and waiting for a stop signal.

use anyhow::Context;
use ember_api::client::ControlClient;
use std::path::{Path, PathBuf};

/// Where the control plane is and how to authenticate, for client commands.
#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// The control plane's URL.
    #[arg(long, env = "EMBER_CONTROL", value_name = "URL")]
    pub control: String,
    /// The client bearer token.
    #[arg(
        long,
        env = "EMBER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

impl ControlArgs {
    /// A client for the control plane.
    pub fn client(&self) -> anyhow::Result<ControlClient> {
        Ok(ControlClient::new(&self.control, self.token.clone())?)
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// The agent binary: the flag, else `$EMBER_AGENT`, else next to this
/// executable's build directory, else where
/// `crates/ember-agent/build-static.sh` puts it.
/// (The same search as `ember bench warm`'s, which is private to it.)
pub fn find_agent(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag.or_else(|| std::env::var_os("EMBER_AGENT").map(PathBuf::from)) {
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the ember binary")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    // The static build first: a dynamically linked agent next to a debug
    // `ember` cannot run inside a runner, whose root is the image's.
    let mut candidates = Vec::new();
    if let (Some(profile), Some(target)) = (dir.file_name(), dir.parent()) {
        candidates.push(
            target
                .join("x86_64-unknown-linux-gnu")
                .join(profile)
                .join("ember-agent"),
        );
        candidates.push(
            target
                .join("x86_64-unknown-linux-gnu/release")
                .join("ember-agent"),
        );
    }
    candidates.push(dir.join("ember-agent"));
    candidates.push("/usr/libexec/ember/ember-agent".into());
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no ember-agent found (looked at {}); build it with \
                 crates/ember-agent/build-static.sh and pass --agent",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// A random token: 32 hex digits from the kernel's generator.
pub fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// This machine's host name, the default node id.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}
