//! Ember's benchmarks, as a library the `ember bench` commands call.
//!
//! - [`warm`]: no-op actions through recycled warm runners, next to
//!   `runc exec` and `podman exec` loops on the same image, in one run.
//! - [`burst`]: N runs submitted at once to a running control plane, next
//!   to the node's raw warm-pool throughput measured in the same run.
//! - [`pool`]: the raw warm-pool loop both use.
//! - [`stats`]: percentiles, and the one definition of each phase of a
//!   run's start (queue, placement, image, runner, process), which
//!   `ember runs --stats` uses too.
//!
//! Every benchmark takes the command to run (default [`DEFAULT_COMMAND`]),
//! because an image whose Entrypoint is a shell cannot run `true` through
//! the run path. Reports are plain structs: `serde::Serialize` for
//! `--json`, `Display` for text.

pub mod burst;
pub mod pool;
pub mod stats;
pub mod warm;

use std::sync::Arc;

/// The command a benchmark runs unless told otherwise: a no-op, so what is
/// measured is the path, not the work.
pub const DEFAULT_COMMAND: &str = "true";

/// Where a benchmark's progress lines go (stderr in the CLI); shared with
/// the threads it starts.
pub type Say = Arc<dyn Fn(&str) + Send + Sync>;

/// `argv`, or the default command when it is empty.
pub fn command_or_default(argv: Vec<String>) -> Vec<String> {
    if argv.is_empty() {
        vec![DEFAULT_COMMAND.to_owned()]
    } else {
        argv
    }
}

/// A command for messages: its words joined by spaces.
pub fn show_command(argv: &[String]) -> String {
    argv.join(" ")
}

/// An error and its causes on one line (`a: b: c`), for reports that keep
/// why a part was skipped.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    ember_error::chain(e).to_string()
}
