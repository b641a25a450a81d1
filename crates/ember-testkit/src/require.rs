//! What privileged tests need, checked in one place: root, runc and the
//! statically linked exec agent.
//!
//! A test that needs one of them asks first, and returns when told to:
//!
//! ```no_run
//! use ember_testkit::require;
//!
//! #[test]
//! fn runs_in_a_container() {
//!     let Some(agent) = require::agent_binary() else { return };
//!     if !require::root() || require::runc().is_none() {
//!         return;
//!     }
//!     // ... use `agent`, runc and root ...
//! }
//! ```
//!
//! When the thing is missing the call **panics**, saying what is missing
//! and how to get it: a privileged test that passes without checking
//! anything hides a broken machine or build. Only when the environment
//! says `EMBER_TEST_SKIP_PRIVILEGED=1` does it print `SKIPPED <test>: <why>`
//! to stderr and return `false` / `None`, so the test returns early. CI
//! never sets it; it is for a developer's unprivileged checkout.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The environment variable that turns a missing prerequisite from a
/// failure into a skip: `EMBER_TEST_SKIP_PRIVILEGED=1`.
pub const SKIP_ENV: &str = "EMBER_TEST_SKIP_PRIVILEGED";

/// Whether the environment asks to skip privileged tests.
pub fn skipping() -> bool {
    std::env::var(SKIP_ENV).is_ok_and(|v| v == "1")
}

/// Fails the test saying `why` (or, with [`SKIP_ENV`] set, prints that it
/// skips and returns).
fn missing(what: &str, why: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    if skipping() {
        eprintln!("SKIPPED {test}: needs {what}: {why} ({SKIP_ENV}=1)");
        return;
    }
    panic!(
        "{test} needs {what}: {why}. CI has it (scripts/test.sh); \
         set {SKIP_ENV}=1 to skip such tests instead"
    );
}

/// Whether the effective user is root; else the test fails (or skips).
#[must_use = "return from the test when this is false"]
pub fn root() -> bool {
    match effective_uid() {
        Some(0) => true,
        Some(uid) => {
            missing("root", &format!("running as uid {uid}"));
            false
        }
        None => {
            missing(
                "root",
                "cannot read the effective uid from /proc/self/status",
            );
            false
        }
    }
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective ...`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `runc` on `PATH`, answering `runc --version`; else the test fails (or
/// skips). Installed by `scripts/install-deps.sh`.
#[must_use = "return from the test when this is None"]
pub fn runc() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("runc"))
            .find(|p| p.is_file())
    });
    let Some(runc) = found else {
        missing(
            "runc",
            "no runc on PATH (scripts/install-deps.sh installs it)",
        );
        return None;
    };
    match Command::new(&runc)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Some(runc),
        Ok(s) => {
            missing("runc", &format!("{} --version: {s}", runc.display()));
            None
        }
        Err(e) => {
            missing("runc", &format!("cannot run {}: {e}", runc.display()));
            None
        }
    }
}

/// A binary of another crate that a test drives (`target/debug/ember`),
/// as the test found it; `None` fails the test (or skips it), saying
/// `how` to build it. CI builds the workspace before testing it.
#[must_use = "return from the test when this is None"]
pub fn built_binary(name: &str, found: Option<PathBuf>, how: &str) -> Option<PathBuf> {
    if found.is_none() {
        missing(name, &format!("it is not built ({how})"));
    }
    found
}

/// The workspace root (this crate is `crates/ember-testkit` in it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The statically linked `ember-agent`: `EMBER_AGENT` (or
/// `EMBER_AGENT_STATIC`) when set, else the one
/// `crates/ember-agent/build-static.sh` builds, built now (once per test
/// process) when missing. Else the test fails (or skips), with the
/// build's error.
#[must_use = "return from the test when this is None"]
pub fn agent_binary() -> Option<PathBuf> {
    static AGENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    agent_or_missing(AGENT.get_or_init(|| find_or_build_agent(false)))
}

/// Like [`agent_binary`], but runs `build-static.sh` (a no-op when the
/// binary is up to date) even when one is built, unless `EMBER_AGENT` or
/// `EMBER_AGENT_STATIC` names one: for the agent's own tests, which must
/// test the agent as the checkout has it.
#[must_use = "return from the test when this is None"]
pub fn agent_binary_rebuilt() -> Option<PathBuf> {
    static AGENT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    agent_or_missing(AGENT.get_or_init(|| find_or_build_agent(true)))
}

fn agent_or_missing(found: &Result<PathBuf, String>) -> Option<PathBuf> {
    match found {
        Ok(p) => Some(p.clone()),
        Err(why) => {
            missing(
                "the static ember-agent (crates/ember-agent/build-static.sh, or EMBER_AGENT=PATH)",
                why,
            );
            None
        }
    }
}

fn find_or_build_agent(rebuild: bool) -> Result<PathBuf, String> {
    for var in ["EMBER_AGENT", "EMBER_AGENT_STATIC"] {
        if let Some(p) = std::env::var_os(var) {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(p)
            } else {
                Err(format!("{var}={} does not exist", p.display()))
            };
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let path = target.join("x86_64-unknown-linux-gnu/release/ember-agent");
    if path.is_file() && !rebuild {
        return Ok(path);
    }
    eprintln!("building the static agent with build-static.sh (once)");
    let script = workspace_root().join("crates/ember-agent/build-static.sh");
    match Command::new(&script).stderr(Stdio::inherit()).output() {
        Ok(out) if out.status.success() => {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!(
                    "build-static.sh printed {}, which does not exist",
                    p.display()
                ))
            }
        }
        Ok(out) => Err(format!("{} failed: {}", script.display(), out.status)),
        Err(e) => Err(format!("cannot run {}: {e}", script.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_uid_is_read() {
        // Whoever runs the tests has one.
        assert!(effective_uid().is_some());
    }
}
