//! Network namespaces made outside runc, for containers that are
//! checkpointed.
//!
//! A container whose network namespace runc creates is checkpointed with
//! it: CRIU saves and restores the namespace, and for that locks it with
//! iptables rules at dump time that it saves with the namespace's rules,
//! recreates on restore and removes before the tasks resume — five to
//! seven `iptables`/`ip6tables-restore` runs (nf_tables here), ≈60–75 ms
//! of every restore. A namespace the container *joins* (`path` in its
//! configuration) is external to CRIU instead: runc passes it as
//! `--external net[inode]` on dump and hands the restore a descriptor of
//! the configured one, so nothing is locked, saved or recreated.
//!
//! [`NetnsHolder`] makes such a namespace, with only `lo` (up, like the one
//! runc makes), and keeps it reachable at `/proc/<pid>/task/<tid>/ns/net`
//! through a parked thread of the calling process that unshared it: no
//! bind mount to leak if the caller dies (the thread dies with it), and no
//! process to fork and exec (a fork of a large node process, plus an exec,
//! is milliseconds on every restore). The container keeps the namespace
//! alive on its own once it has joined it, so the holder only has to live
//! until `runc create` (and, for a checkpoint, `runc checkpoint`, which
//! looks at the path) or `runc restore` has returned.

use std::io;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Errors of [`NetnsHolder::spawn`].
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The holder thread could not be started.
    #[error("cannot start a network namespace holder thread")]
    Spawn(#[source] io::Error),
    /// The holder thread could not make the namespace or bring `lo` up.
    #[error("cannot make a network namespace")]
    Unshare(#[source] io::Error),
}

/// A new network namespace with only `lo`, up, held by a parked thread;
/// dropping it ends the thread (the namespace lives on while anything
/// else, such as a container, is in it).
#[derive(Debug)]
pub struct NetnsHolder {
    path: PathBuf,
    /// Dropping it wakes the thread, which then exits.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl NetnsHolder {
    /// Starts the holder thread in a new network namespace with its `lo`
    /// up, and returns once the namespace exists.
    pub fn spawn() -> Result<NetnsHolder, NetnsError> {
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<libc::pid_t>>(1);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("netns-holder".into())
            .spawn(move || {
                // SAFETY: unshare affects only this thread's own network
                // namespace; no memory is shared.
                let made = if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    Err(io::Error::last_os_error())
                } else {
                    loopback_up().map(|()| {
                        // SAFETY: gettid has no preconditions.
                        unsafe { libc::gettid() }
                    })
                };
                let ok = made.is_ok();
                let _ = ready_tx.send(made);
                if ok {
                    // Parked until the holder is dropped (the sender goes).
                    let _ = stopped.recv();
                }
            })
            .map_err(NetnsError::Spawn)?;
        let tid = match ready_rx.recv() {
            Ok(Ok(tid)) => tid,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(NetnsError::Unshare(e));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(NetnsError::Spawn(io::Error::other(
                    "the holder thread ended before making the namespace",
                )));
            }
        };
        Ok(NetnsHolder {
            path: PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id())),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `/proc/<pid>/task/<tid>/ns/net`: the path a container configuration
    /// joins.
    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `ip link set lo up` in the calling thread's network namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain system calls on a zeroed, correctly sized ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_makes_its_own_namespace_with_lo_up() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let h = NetnsHolder::spawn().expect("holder");
        let mine = std::fs::read_link("/proc/self/ns/net").expect("own netns");
        let theirs = std::fs::read_link(h.path()).expect("holder netns");
        assert_ne!(mine, theirs, "the holder is in a new network namespace");
        // Only lo, and up: the task's net/dev lists its namespace's devices.
        let task = h
            .path()
            .parent()
            .and_then(|p| p.parent())
            .unwrap()
            .to_path_buf();
        let dev = std::fs::read_to_string(task.join("net/dev")).unwrap();
        let ifaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(ifaces, ["lo"], "{dev}");
        // An up lo has ::1 (when IPv6 is on); a down one has no address.
        if std::path::Path::new("/proc/sys/net/ipv6").exists() {
            let v6 = std::fs::read_to_string(task.join("net/if_inet6")).unwrap_or_default();
            assert!(v6.contains(" lo"), "lo is not up: {v6:?}");
        }
        // This thread's namespace did not change.
        assert_eq!(
            std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
            mine
        );
        let path = h.path();
        drop(h);
        assert!(!path.exists(), "holder thread ended");
    }
}
