//! The node agent's settings and the errors that stop it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use ember_api::client::ClientError;

/// Settings of a node agent.
#[derive(Debug, Clone)]
pub struct NodeAgentConfig {
    /// The control plane's URL.
    pub control: String,
    /// The node bearer token.
    pub token: Option<String>,
    /// This node's id.
    pub id: String,
    /// Runs executed at once.
    pub slots: u32,
    /// The node store (images) and the pool's and runc's state under it.
    pub root: PathBuf,
    /// A registry mirror (`ember cache`) to pull through.
    pub cache: Option<String>,
    /// The cluster cache's URL for directory caches (`/dircache/v1`) runs
    /// declare; `None`: declared caches are skipped (with a note on the
    /// run), never failing it.
    pub dircache: Option<String>,
    /// Bearer token for saves into the cache's protected scopes.
    pub dircache_token: Option<String>,
    /// The static `ember-agent` binary.
    pub agent: PathBuf,
    /// Labels for node selectors.
    pub labels: BTreeMap<String, String>,
    /// Interval of the liveness heartbeat (inventory changes are sent at
    /// once regardless).
    pub heartbeat: Duration,
    /// How to start this node's watchdog ([`watch_node`](crate::watch_node) in a process of
    /// its own), which destroys the runners if this process dies without
    /// shutting down; `None`: no watchdog (runners of a killed node then
    /// stay until the next node process starts on the root).
    pub watchdog: Option<WatchdogCommand>,
    /// How this node pre-pulls and collects images.
    pub prepull: PrepullConfig,
    /// Where to serve the node's Prometheus `/metrics` (no token: use a
    /// loopback or private address); `None`: not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The CRIU binary snapshot deployments capture and restore with;
    /// `None`: `$EMBER_CRIU`, else `criu` on the `PATH`.
    pub criu: Option<PathBuf>,
    /// Restored copies of each snapshot deployment's checkpoint kept
    /// prepared ahead of its runs (agent connected, start-up parked before
    /// `Resume`); 0: every run restores on demand.
    pub snapshot_spares: usize,
}

/// How a node pre-pulls the images its pull plan names and keeps its
/// store within budget.
#[derive(Debug, Clone, Default)]
pub struct PrepullConfig {
    /// Bytes per second one pre-pull may read (`None`: no cap). Runs'
    /// own pulls are never capped.
    pub bandwidth: Option<u64>,
    /// The most bytes of images the store holds: above it, the node's GC
    /// evicts (down to it) what its plan does not keep, and the
    /// control plane plans within it. `None`: no GC, and the planner's
    /// budget is what the node holds plus its free disk.
    pub image_budget: Option<u64>,
}

/// The command line that runs [`watch_node`](crate::watch_node) for a node's root (the
/// `ember` binary knows its own subcommand for it). It is started with
/// its standard input the read end of a pipe whose write end only the
/// node process holds.
#[derive(Debug, Clone)]
pub struct WatchdogCommand {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<std::ffi::OsString>,
}

/// Errors that stop the node agent.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store could not be opened.
    #[error("opening the store")]
    Store(#[from] ember_store::StoreError),
    /// The pool could not be started.
    #[error("starting the warm pool")]
    Pool(#[from] ember_pool::PoolError),
    /// The registry client could not be built.
    #[error("registry client")]
    Registry(#[from] ember_registry::RegistryError),
    /// The control plane refused us.
    #[error(transparent)]
    Control(#[from] ClientError),
    /// The node's root could not be locked, or the watchdog started.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The dircache URL is not usable.
    #[error("dircache client")]
    Dircache(#[from] ember_dircache::DircacheError),
    /// Another node agent is running on this root.
    #[error("another node agent holds {}", .0.display())]
    RootInUse(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_errors_say_their_source_once_in_the_chain() {
        let registry = NodeError::Registry(ember_registry::RegistryError::Config(
            "bad mirror URL".into(),
        ));
        let io = NodeError::Io {
            what: "locking",
            path: "/var/lib/ember/node.lock".into(),
            source: std::io::Error::other("EROFS"),
        };
        for (e, want) in [
            (&registry, "registry client: bad mirror URL"),
            (&io, "locking /var/lib/ember/node.lock: EROFS"),
        ] {
            assert_eq!(ember_error::repeated_source(e), None, "{want}");
            assert_eq!(ember_error::chain(e).to_string(), want);
        }
    }
}
