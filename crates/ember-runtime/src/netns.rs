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
//! runc makes), and keeps it reachable at `/proc/<pid>/ns/net` through a
//! tiny holder process: no bind mount to leak if the caller dies (the
//! holder exits when its stdin, a pipe from the caller, closes). The
//! container keeps the namespace alive on its own once it has joined it,
//! so the holder only has to live until `runc create` (and, for a
//! checkpoint, `runc checkpoint`, which looks at the path) or `runc
//! restore` has returned.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Errors of [`NetnsHolder::spawn`].
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The holder process could not be started (or could not make the
    /// namespace: it reports that as its exec failing).
    #[error("cannot start a network namespace holder ({program})")]
    Spawn {
        /// The program the holder runs.
        program: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The program the holder runs once in its namespace: it reads its stdin
/// (a pipe from the caller) until end of file, then exits.
const HOLDER_PROGRAM: &str = "cat";

/// A new network namespace with only `lo`, up, held by a child process;
/// dropping it ends the child (the namespace lives on while anything else,
/// such as a container, is in it).
#[derive(Debug)]
pub struct NetnsHolder {
    child: Child,
}

impl NetnsHolder {
    /// Starts the holder in a new network namespace and brings its `lo` up.
    pub fn spawn() -> Result<NetnsHolder, NetnsError> {
        let mut cmd = Command::new(HOLDER_PROGRAM);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec this only makes raw system calls
        // (unshare, socket, ioctl, close) on stack data: async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                loopback_up()
            });
        }
        let child = cmd.spawn().map_err(|source| NetnsError::Spawn {
            program: HOLDER_PROGRAM,
            source,
        })?;
        Ok(NetnsHolder { child })
    }

    /// `/proc/<pid>/ns/net`: the path a container configuration joins.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.child.id()))
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        // Closing its stdin ends it; kill too in case it is stopped.
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ip link set lo up` in the calling thread's network namespace, with
/// system calls only (it runs between fork and exec).
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
        // The child may still be between fork and exec: wait for its exec.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let theirs = loop {
            let l = std::fs::read_link(h.path()).expect("holder netns");
            let comm =
                std::fs::read_to_string(format!("/proc/{}/comm", h.child.id())).unwrap_or_default();
            if comm.trim() == HOLDER_PROGRAM || std::time::Instant::now() > deadline {
                break l;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_ne!(mine, theirs, "the holder is in a new network namespace");
        // Only lo, and up: /proc/<pid>/net/dev lists the holder's devices.
        let dev = std::fs::read_to_string(format!("/proc/{}/net/dev", h.child.id())).unwrap();
        let ifaces: Vec<&str> = dev
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(ifaces, ["lo"], "{dev}");
        // An up lo has ::1 (when IPv6 is on); a down one has no address.
        if std::path::Path::new("/proc/sys/net/ipv6").exists() {
            let v6 = std::fs::read_to_string(format!("/proc/{}/net/if_inet6", h.child.id()))
                .unwrap_or_default();
            assert!(v6.contains(" lo"), "lo is not up: {v6:?}");
        }
        let pid = h.child.id();
        drop(h);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}/ns/net")).exists(),
            "holder ended"
        );
    }
}
