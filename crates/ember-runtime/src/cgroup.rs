//! The cgroup v1 files of one container: freezer, memory and CPU counters,
//! and removing what runc left behind. The one place Ember touches cgroups
//! (the warm pool and [`recover`](mod@crate::recover) both come here).
//!
//! runc puts a container in the cgroup path of its `config.json`
//! (`/ember/<id>` by default) under every v1 hierarchy. Where each
//! controller is mounted differs between machines (`cpu,cpuacct` joined or
//! apart, under `/sys/fs/cgroup` or elsewhere), so the mount points come
//! from `/proc/self/mountinfo`, looked up once per process.
//!
//! The warm pool freezes idle runners by writing the freezer's `freezer.state`
//! directly: one `write(2)` instead of exec'ing `runc pause` (a Go binary
//! that starts, reads its state and then writes the same file; about 10 ms).
//! runc reads the same file, so `runc state` still reports `paused`.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::mount::{self, MountEntry};

/// How often [`remove_dir`] tries to remove a busy cgroup, and how long it
/// waits between tries (after killing what is still in it): 2 s in all,
/// enough for the kernel to reap SIGKILLed tasks on a loaded machine.
const REMOVE_TRIES: u32 = 100;
const REMOVE_PAUSE: Duration = Duration::from_millis(20);

/// The v1 hierarchies, by controller name, as mounted in this process's
/// mount namespace.
fn hierarchies() -> &'static HashMap<String, PathBuf> {
    static H: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    H.get_or_init(|| {
        // No mount table, no cgroups: every lookup then finds nothing,
        // which callers treat as "not mounted".
        mount::mounts()
            .map(|m| v1_hierarchies(&m))
            .unwrap_or_default()
    })
}

/// Controller name → mount point of every `cgroup` (v1) mount in a
/// mountinfo text. A hierarchy with several controllers (`cpu,cpuacct`)
/// appears under each of them; named hierarchies (`name=systemd`) under
/// their full option. The lines are read by the one mountinfo parser,
/// [`mount::parse_mountinfo`].
pub fn parse_v1_mounts(mountinfo: &str) -> HashMap<String, PathBuf> {
    v1_hierarchies(&mount::parse_mountinfo(mountinfo))
}

fn v1_hierarchies(mounts: &[MountEntry]) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    for m in mounts.iter().filter(|m| m.fs_type == "cgroup") {
        for opt in m.super_options.split(',') {
            // Mount flags and options that are not controllers.
            if matches!(
                opt,
                "rw" | "ro" | "nosuid" | "nodev" | "noexec" | "relatime" | "noatime"
            ) || opt.starts_with("release_agent=")
                || opt == "clone_children"
                || opt == "xattr"
            {
                continue;
            }
            out.entry(opt.to_owned())
                .or_insert_with(|| m.mount_point.clone());
        }
    }
    out
}

/// The cgroup directories of one container.
#[derive(Debug, Clone)]
pub struct Cgroups {
    /// `<freezer mount>/<path>`.
    freezer: Option<PathBuf>,
    /// `<memory mount>/<path>`.
    memory: Option<PathBuf>,
    /// `<cpuacct mount>/<path>`.
    cpuacct: Option<PathBuf>,
}

/// What the freezer says about a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezerState {
    /// Running.
    Thawed,
    /// Asked to freeze; some task has not stopped yet.
    Freezing,
    /// Every task stopped.
    Frozen,
}

impl Cgroups {
    /// The directories of the container whose `cgroupsPath` is `path`
    /// (`/ember/<id>`), whether or not they exist yet.
    pub fn for_path(path: &str) -> Cgroups {
        let rel = path.trim_start_matches('/');
        let h = hierarchies();
        let dir = |c: &str| h.get(c).map(|m| m.join(rel));
        Cgroups {
            freezer: dir("freezer"),
            memory: dir("memory"),
            cpuacct: dir("cpuacct"),
        }
    }

    /// The freezer cgroup directory, if the freezer is mounted.
    pub fn freezer_dir(&self) -> Option<&Path> {
        self.freezer.as_deref()
    }

    /// The memory cgroup directory, if the memory controller is mounted.
    pub fn memory_dir(&self) -> Option<&Path> {
        self.memory.as_deref()
    }

    /// The cpuacct cgroup directory, if cpuacct is mounted.
    pub fn cpuacct_dir(&self) -> Option<&Path> {
        self.cpuacct.as_deref()
    }

    fn freezer_file(&self) -> io::Result<PathBuf> {
        self.freezer
            .as_ref()
            .map(|d| d.join("freezer.state"))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v1 freezer mounted"))
    }

    /// Asks the kernel to freeze every task; returns at once (the state may
    /// still read [`FreezerState::Freezing`]).
    pub fn freeze(&self) -> io::Result<()> {
        fs::write(self.freezer_file()?, "FROZEN")
    }

    /// Lets every task run again.
    pub fn thaw(&self) -> io::Result<()> {
        thaw_file(&self.freezer_file()?)
    }

    /// The freezer's state.
    pub fn freezer_state(&self) -> io::Result<FreezerState> {
        let s = fs::read_to_string(self.freezer_file()?)?;
        match s.trim() {
            "THAWED" => Ok(FreezerState::Thawed),
            "FREEZING" => Ok(FreezerState::Freezing),
            "FROZEN" => Ok(FreezerState::Frozen),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown freezer state {other:?}"),
            )),
        }
    }

    /// Polls until the state reads `FROZEN`; `false` if it does not within
    /// `timeout` (a task stuck in an uninterruptible sleep, or someone thawed
    /// the cgroup meanwhile).
    pub fn wait_frozen(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(50);
        loop {
            match self.freezer_state()? {
                FreezerState::Frozen => return Ok(true),
                FreezerState::Thawed => return Ok(false),
                FreezerState::Freezing if Instant::now() >= deadline => return Ok(false),
                FreezerState::Freezing => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
            }
        }
    }

    /// `memory.usage_in_bytes` (includes page cache the runner caused).
    pub fn memory_usage(&self) -> Option<u64> {
        read_u64(&self.memory.as_ref()?.join("memory.usage_in_bytes"))
    }

    /// How often the runner hit its memory limit (`memory.failcnt`) and how
    /// many of its processes the OOM killer killed (`oom_kill` of
    /// `memory.oom_control`, Linux 4.13+; 0 when absent).
    pub fn memory_events(&self) -> MemoryEvents {
        let Some(dir) = &self.memory else {
            return MemoryEvents::default();
        };
        let failcnt = read_u64(&dir.join("memory.failcnt")).unwrap_or(0);
        let oom_kill = fs::read_to_string(dir.join("memory.oom_control"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        MemoryEvents { failcnt, oom_kill }
    }

    /// CPU time used by every task of the cgroup, in nanoseconds
    /// (`cpuacct.usage`).
    pub fn cpu_usage_ns(&self) -> Option<u64> {
        read_u64(&self.cpuacct.as_ref()?.join("cpuacct.usage"))
    }

    /// Pids of the cgroup's processes (`cgroup.procs` of the freezer).
    pub fn procs(&self) -> io::Result<Vec<i32>> {
        let dir = self
            .freezer
            .as_ref()
            .or(self.memory.as_ref())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v1 mounted"))?;
        Ok(fs::read_to_string(dir.join("cgroup.procs"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// Removes the directories that still exist (runc removes them when
    /// the container's init exits; a runc killed halfway leaves them
    /// behind), thawing and killing what is left in them first. Every
    /// directory is tried; the first error is returned.
    pub fn remove_leftovers(&self) -> io::Result<()> {
        let dirs = self.existing_dirs();
        if let Some(f) = &self.freezer
            && f.is_dir()
        {
            // Frozen tasks do not act on SIGKILL until thawed.
            thaw_dir(f);
        }
        let mut first = None;
        for d in dirs {
            if let Err(e) = remove_dir(&d) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The directories that exist right now (for leak checks).
    pub fn existing_dirs(&self) -> Vec<PathBuf> {
        [&self.freezer, &self.memory, &self.cpuacct]
            .into_iter()
            .flatten()
            .filter(|d| d.is_dir())
            .cloned()
            .collect()
    }
}

/// Memory-limit counters of a cgroup; see [`Cgroups::memory_events`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    /// `memory.failcnt`.
    pub failcnt: u64,
    /// `oom_kill` of `memory.oom_control`.
    pub oom_kill: u64,
}

/// The `cgroupsPath` of the `config.json` in bundle `dir`, if it has one
/// (a directory that crashed before its config was written has none).
pub fn bundle_cgroups_path(dir: &Path) -> Option<String> {
    let text = fs::read(dir.join(crate::spec::CONFIG_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("linux")?
        .get("cgroupsPath")?
        .as_str()
        .map(str::to_owned)
}

/// The directories of cgroup path `rel` (`ember/<id>`) that exist in any
/// mounted hierarchy, v1 or v2, named ones included.
pub fn existing_in_every_hierarchy(rel: &str) -> Result<Vec<PathBuf>, mount::MountError> {
    let rel = rel.trim_start_matches('/');
    Ok(mount::mounts()?
        .iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(|m| m.mount_point.join(rel))
        .filter(|p| p.is_dir())
        .collect())
}

/// Thaws the cgroup `dir` if it has a freezer (a v1 freezer hierarchy's
/// `freezer.state`); errors are ignored, since the caller's next step (a
/// kill, a removal) reports what still fails.
pub fn thaw_dir(dir: &Path) {
    let state = dir.join("freezer.state");
    if state.exists() {
        let _ = thaw_file(&state);
    }
}

/// The one thaw: `THAWED` into a `freezer.state`. Thawing takes effect at
/// once (unlike freezing), so there is nothing to wait for or retry.
fn thaw_file(state: &Path) -> io::Result<()> {
    fs::write(state, "THAWED")
}

/// Removes cgroup directory `dir`, killing what is left in it first (the
/// one retry policy: 100 tries 20 ms apart). A
/// directory already gone counts as removed.
pub fn remove_dir(dir: &Path) -> io::Result<()> {
    for _ in 0..REMOVE_TRIES {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // Processes remain: kill them and try again.
                if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
                std::thread::sleep(REMOVE_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::EBUSY))
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_controllers_joined_and_apart() {
        let text = "\
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n\
31 25 0:27 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n\
32 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,nosuid,memory\n\
33 25 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
34 25 0:30 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n\
35 25 0:31 / /mnt/a\\040b rw - cgroup cgroup rw,pids\n";
        let m = parse_v1_mounts(text);
        assert_eq!(m["cpu"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m["cpuacct"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m["freezer"], PathBuf::from("/sys/fs/cgroup/freezer"));
        assert_eq!(m["memory"], PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(m["name=systemd"], PathBuf::from("/sys/fs/cgroup/systemd"));
        assert_eq!(m["pids"], PathBuf::from("/mnt/a b"));
        assert!(!m.contains_key("rw") && !m.contains_key("xattr"));
        assert_eq!(m.len(), 6);
    }

    #[test]
    fn removing_a_missing_cgroup_succeeds_and_a_file_fails() {
        let d = tempfile::tempdir().unwrap();
        remove_dir(&d.path().join("gone")).unwrap();
        let f = d.path().join("file");
        fs::write(&f, b"").unwrap();
        assert!(remove_dir(&f).is_err());
        let empty = d.path().join("empty");
        fs::create_dir(&empty).unwrap();
        remove_dir(&empty).unwrap();
        assert!(!empty.exists());
    }
}
