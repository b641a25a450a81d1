//! Killing what an exec leaves behind.
//!
//! The rule (also in `docs/agent-protocol.md`): every exec runs in its own
//! session whose id, and process-group id, is the pid of its main process.
//! When the main process ends:
//!
//! 1. its process group is killed (SIGKILL);
//! 2. if another exec is still running, every process in its session is
//!    killed (found by scanning `/proc`), and nothing else — the other
//!    exec's processes must survive;
//! 3. if no other exec is running, everything the agent did not start
//!    itself is killed: as PID 1, every process in the pid namespace except
//!    the agent (`kill(-1, SIGKILL)`); as an ordinary process (tests, a
//!    host), every descendant of the agent (orphans are reparented to it, as
//!    it is a child subreaper).
//!
//! Step 3 catches daemons that called `setsid` and so left the session.
//! A timeout kills the group and the session of the still-running exec.

use std::fs;

use crate::sys;

/// Fields of `/proc/<pid>/stat` after the command name.
struct Stat {
    session: libc::pid_t,
}

fn stat(pid: libc::pid_t) -> Option<Stat> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything,
    // including spaces and ')'; the fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    // state ppid pgrp session
    let session = f.nth(3)?.parse().ok()?;
    Some(Stat { session })
}

fn proc_pids() -> Vec<libc::pid_t> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// SIGKILLs the process group `pgid`.
pub fn kill_group(pgid: libc::pid_t) {
    if pgid > 1 {
        let _ = sys::kill(-pgid, libc::SIGKILL);
    }
}

/// SIGKILLs every process whose session id is `sid` (scans `/proc`).
pub fn kill_session(sid: libc::pid_t, me: libc::pid_t) {
    if sid <= 1 {
        return;
    }
    for pid in proc_pids() {
        if pid != me && stat(pid).is_some_and(|s| s.session == sid) {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
    }
}

/// SIGKILLs every process in the pid namespace but the caller. Only valid
/// for PID 1 of a namespace; anywhere else it would kill the host.
pub fn kill_namespace() {
    // SAFETY: getpid takes nothing and cannot fail.
    let me = unsafe { libc::getpid() };
    if me != 1 {
        // Never reached (the caller checks); kill(-1) here would take the
        // host down with it.
        eprintln!("ember-agent: refusing a namespace-wide kill as pid {me}");
        return;
    }
    // kill(-1) from a namespace's init signals every other process in it.
    let _ = sys::kill(-1, libc::SIGKILL);
}

/// The direct children of `pid` (all its threads), from
/// `/proc/<pid>/task/<tid>/children`.
fn children(pid: libc::pid_t, out: &mut Vec<libc::pid_t>) {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let mut p = t.path();
        p.push("children");
        if let Ok(s) = fs::read_to_string(&p) {
            out.extend(
                s.split_ascii_whitespace()
                    .filter_map(|c| c.parse::<libc::pid_t>().ok()),
            );
        }
    }
}

/// SIGKILLs every descendant of `me` except the subtrees rooted at
/// `keep`. Returns how many processes were signalled.
pub fn kill_descendants(me: libc::pid_t, keep: &[libc::pid_t]) -> usize {
    // Fast path: the agent's own children list (one small read) is
    // usually empty once an exec's main process is reaped.
    let mut todo = Vec::new();
    let Ok(s) = fs::read_to_string(format!("/proc/{me}/task/{me}/children")) else {
        return 0;
    };
    todo.extend(
        s.split_ascii_whitespace()
            .filter_map(|c| c.parse::<libc::pid_t>().ok())
            .filter(|p| !keep.contains(p)),
    );
    let mut killed = 0;
    // Stop each process before collecting its children, so it cannot fork
    // a child we would miss; SIGKILL then ends stopped processes too.
    while let Some(pid) = todo.pop() {
        if sys::kill(pid, libc::SIGSTOP).unwrap_or(false) {
            children(pid, &mut todo);
            let _ = sys::kill(pid, libc::SIGKILL);
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_our_own_session() {
        // SAFETY: getpid/getsid take plain integers.
        let (me, sid) = unsafe { (libc::getpid(), libc::getsid(0)) };
        assert_eq!(stat(me).unwrap().session, sid);
        assert!(proc_pids().contains(&me));
    }
}
