//! The watchdog: a process of its own that destroys a node agent's
//! runners if the agent dies without shutting down.

use std::path::Path;
use std::time::{Duration, Instant};

use ember_pool::Pool;
use ember_store::Store;

use crate::root::{pool_config, try_lock_root};
use crate::{NodeError, WatchdogCommand};

/// How long a watchdog waits for a dead agent's root lock to be free.
const WATCHDOG_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Starts `cmd` with its stdin the read end of a new pipe; returns the
/// write end, which the node keeps (close-on-exec) until it returns.
pub(crate) fn spawn_watchdog(cmd: &WatchdogCommand) -> Result<std::io::PipeWriter, NodeError> {
    use std::os::unix::process::CommandExt;
    let err = |what| {
        let path = cmd.program.clone();
        move |source| NodeError::Io { what, path, source }
    };
    let (reader, writer) = std::io::pipe().map_err(err("making a pipe for"))?;
    let mut child = std::process::Command::new(&cmd.program)
        .args(&cmd.args)
        .stdin(reader)
        .stdout(std::process::Stdio::null())
        // Its own process group: a Ctrl-C meant for the node (which then
        // cleans up itself) or a signal to the node's group leaves it be.
        .process_group(0)
        .spawn()
        .map_err(err("starting the watchdog"))?;
    // Reaped when it ends (after this process's runners are gone).
    std::thread::spawn(move || child.wait());
    Ok(writer)
}

/// What [`watch_node`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchReport {
    /// A new node agent had the root already: it cleans up itself.
    pub taken_over: bool,
    /// Runners of the dead node destroyed.
    pub runners: Vec<String>,
}

/// The watchdog of a node agent: blocks until `stdin` reaches its end (the
/// node process has exited, however it exited: the kernel closes its end
/// of the pipe even after `kill -9`), then, unless a new node agent holds
/// the root already, destroys every runner the dead one left (thawing
/// frozen ones first: a frozen task ignores even SIGKILL) and removes its
/// store's temporary work, under the root's lock so a node starting
/// meanwhile waits for it. After a clean shutdown there is nothing left to
/// destroy. Runs in a process of its own (`ember node` starts it), never
/// inside the node.
///
/// There is no grace period: nothing adopts a dead node's runners (a
/// restarted node destroys them at start too), so a run whose node agent
/// died is over, and its container is stopped as soon as that is known;
/// the control plane retries the run.
pub fn watch_node(
    root: &Path,
    agent: &Path,
    mut stdin: impl std::io::Read,
) -> Result<WatchReport, NodeError> {
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A broken pipe is an ended one.
            Err(_) => break,
        }
    }
    // The dying agent closes its descriptors one by one: the pipe may end
    // a moment before its lock is let go. Still held after a while, the
    // lock is a new agent's, which recovers the leftovers itself.
    let deadline = Instant::now() + WATCHDOG_LOCK_WAIT;
    let lock = loop {
        if let Some(lock) = try_lock_root(root)? {
            break lock;
        }
        if Instant::now() >= deadline {
            return Ok(WatchReport {
                taken_over: true,
                runners: Vec::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let store = Store::open(root)?;
    let pool = Pool::new(pool_config(root, agent, store, 1))?;
    let recovered = pool.recover();
    pool.shutdown();
    drop(lock);
    Ok(WatchReport {
        taken_over: false,
        runners: recovered?.runners,
    })
}
