//! Checkpoint and restore of containers with CRIU, through runc.
//!
//! [`checkpoint`] saves a running container into a directory;
//! [`restore`] starts a new, independent container from it, as often as
//! wanted (each restore gets its own id, bundle, overlay and cgroup):
//!
//! ```text
//! <checkpoint>/criu/                 CRIU's images (`runc checkpoint --image-path`)
//! <checkpoint>/upper/                the container's filesystem changes (overlay upperdir)
//! <checkpoint>/config.json           the runtime configuration it ran with
//! <checkpoint>/ember-checkpoint.json what a restore must match (see Metadata)
//! ```
//!
//! CRIU saves process memory, descriptors and namespaces, but not the files
//! of the root filesystem, so the overlay's upper directory is copied too.
//! To make that copy agree with the memory image, the container is frozen
//! (`runc pause`) from before the dump until after the copy.
//!
//! A restore puts a copy of `upper/` under a fresh overlay of the same
//! layers, writes the saved configuration with the new container's cgroup
//! and any rebound bind-mount sources ([`RestoreTarget::rebind`]: per-copy
//! directories such as a runner's `/run/ember`), and runs `runc restore
//! --detach`. Before anything is touched it compares
//! [`Metadata`] with this machine (CRIU version, kernel release, CPU
//! features) and with the caller's [`ImageIdentity`], and refuses with
//! [`CheckpointError::Mismatch`] naming the first difference: a process
//! restored onto another kernel or onto a CPU lacking an instruction set it
//! detected at start-up may crash later rather than fail now.
//!
//! A container that joins a network namespace (its configuration names a
//! `path`) has it handed to CRIU as external; [`checkpoint`] then records
//! in the dump that its network was not locked (unless it saves
//! established TCP connections) and [`restore`] joins each copy to a new
//! namespace of its own ([`crate::netns`]), which spares every restore
//! CRIU's iptables lock and unlock (≈60–75 ms). A configuration binding the
//! bundle-relative [`crate::spec::MASK_DIR`] gets the copy's own.
//!
//! CRIU's logs (`dump.log`, `restore.log`) are written into
//! `<bundle>/criu-work/` of the container concerned; a failure quotes their
//! `Error` lines and last lines.
//!
//! What cannot be checkpointed: a container holding host files open (a log
//! file as stdout: CRIU finds no mount for it; use `/dev/null` or a file
//! under one of the container's own mounts) or connected to host sockets
//! (close agent connections first: see the agent's readiness protocol).
//!
//! CRIU probes kernel features on every start (≈50 ms here) unless it finds
//! its cache `/run/criu.kdat`, which it only writes on a tmpfs; the wrapper
//! `scripts/install-criu.sh` installs writes it where `/run` is not one, and
//! [`CriuInfo::kdat_cached`] says whether it is there.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::container::LOCK_FILE;
use crate::mount::{MountError, RootFs, UPPER_DIR};
use crate::netns::{NetnsError, NetnsHolder};
use crate::runc::{self, ContainerStatus, PID_FILE, Runc, RuncError};
use crate::spec::{BindMount, CONFIG_FILE};

/// Name of the metadata file inside a checkpoint directory.
pub const METADATA_FILE: &str = "ember-checkpoint.json";
/// Directory of CRIU's images inside a checkpoint directory.
pub const IMAGES_DIR: &str = "criu";
/// Directory of CRIU's logs inside a container's bundle.
pub const CRIU_WORK_DIR: &str = "criu-work";
/// Version of the metadata format this module writes and reads.
pub const METADATA_FORMAT: u32 = 1;
/// CRIU's kernel-feature cache (see the module documentation).
pub const KDAT_CACHE: &str = "/run/criu.kdat";

/// How long a checkpoint without `leave_running` waits for the source's
/// init to die of its SIGKILL.
const END_WAIT: Duration = Duration::from_secs(10);
/// How many lines of CRIU's log an error quotes.
const LOG_TAIL_LINES: usize = 12;

/// Errors of checkpoint and restore.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The CRIU binary could not be executed.
    #[error("CRIU is missing: cannot execute {binary}; install it with scripts/install-criu.sh")]
    CriuMissing {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// CRIU runs but cannot work on this machine.
    #[error("CRIU at {binary} is unusable: {reason}")]
    CriuUnusable {
        /// The binary.
        binary: PathBuf,
        /// What it said.
        reason: String,
    },
    /// `runc checkpoint` failed.
    #[error("checkpoint of container {id} failed ({status}): {runc}\nfrom {log}:\n{log_tail}", log = log.display())]
    Dump {
        /// The container.
        id: String,
        /// How runc exited.
        status: String,
        /// What runc said.
        runc: String,
        /// CRIU's log.
        log: PathBuf,
        /// Its `Error` lines and its last lines.
        log_tail: String,
    },
    /// `runc restore` failed.
    #[error("restore of container {id} failed ({status}): {runc}\nfrom {log}:\n{log_tail}", log = log.display())]
    Restore {
        /// The new container.
        id: String,
        /// How runc exited.
        status: String,
        /// What runc said.
        runc: String,
        /// CRIU's log.
        log: PathBuf,
        /// Its `Error` lines and its last lines.
        log_tail: String,
    },
    /// The checkpoint was taken somewhere a restore here cannot match.
    #[error("checkpoint {dir} does not match: {what} is {recorded:?} in the checkpoint but {here:?} here", dir = dir.display())]
    Mismatch {
        /// The checkpoint directory.
        dir: PathBuf,
        /// What differs ("CRIU version", "kernel release", …).
        what: &'static str,
        /// The checkpoint's value.
        recorded: String,
        /// This machine's (or the caller's) value.
        here: String,
    },
    /// A [`RestoreTarget::rebind`] entry names no bind mount of the
    /// checkpointed configuration.
    #[error("checkpoint {dir}: cannot rebind {destination}: {what}", dir = dir.display(), destination = destination.display())]
    Rebind {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The destination asked for.
        destination: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
    /// The metadata file is missing, unreadable or malformed.
    #[error("checkpoint metadata {path}: {reason}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The destination of a checkpoint already exists.
    #[error("checkpoint destination {path} already exists")]
    Exists {
        /// The directory.
        path: PathBuf,
    },
    /// The container is not in a state that can be checkpointed.
    #[error("container {id} is {status:?}, not running or paused")]
    NotRunning {
        /// The container.
        id: String,
        /// Its status.
        status: ContainerStatus,
    },
    /// A file or directory could not be read, written or copied.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Copying the filesystem changes failed.
    #[error("cannot copy {from} to {to}: {stderr}", from = from.display(), to = to.display())]
    Copy {
        /// Source directory.
        from: PathBuf,
        /// Destination directory.
        to: PathBuf,
        /// What `cp` said.
        stderr: String,
    },
    /// runc failed outside checkpoint/restore itself (state, pause, delete).
    #[error(transparent)]
    Runc(#[from] RuncError),
    /// The restored copy's network namespace could not be made.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Mounting the restored container's root filesystem failed.
    #[error("root filesystem of restored container {id}")]
    Mount {
        /// The container.
        id: String,
        /// Why.
        #[source]
        source: MountError,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The CRIU binary runc is told to use (`runc --criu`).
#[derive(Debug, Clone)]
pub struct Criu {
    binary: PathBuf,
    /// `criu --version`, asked once: it is part of every metadata check.
    version: Arc<OnceLock<String>>,
}

impl Default for Criu {
    fn default() -> Self {
        Criu::new("criu")
    }
}

/// What [`Criu::probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuInfo {
    /// The binary.
    pub binary: PathBuf,
    /// Its version, e.g. `4.1.1`.
    pub version: String,
    /// Whether CRIU's kernel-feature cache exists, sparing every CRIU start
    /// its kernel probe.
    pub kdat_cached: bool,
}

impl Criu {
    /// `binary` (a path, or a name looked up on `PATH`).
    pub fn new(binary: impl Into<PathBuf>) -> Criu {
        Criu {
            binary: binary.into(),
            version: Arc::new(OnceLock::new()),
        }
    }

    /// The binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Its version (`criu --version`), cached after the first call, and
    /// across processes in [`VERSION_CACHE_DIR`] keyed by the boot and
    /// the binary's file identity: a CRIU start through the trixie loader
    /// costs 5–10 ms of CPU, a third of what `ember run --snapshot` does
    /// besides runc and CRIU.
    pub fn version(&self) -> Result<String, CheckpointError> {
        if let Some(v) = self.version.get() {
            return Ok(v.clone());
        }
        let key = version_cache_key(&self.binary);
        if let Some(v) = key.as_ref().and_then(read_cached_version) {
            return Ok(self.version.get_or_init(|| v).clone());
        }
        let out = Command::new(&self.binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CheckpointError::CriuMissing {
                binary: self.binary.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .find_map(|l| l.strip_prefix("Version:"))
            .map(|v| v.trim().to_owned())
            .filter(|v| out.status.success() && !v.is_empty())
            .ok_or_else(|| CheckpointError::CriuUnusable {
                binary: self.binary.clone(),
                reason: format!(
                    "`criu --version` printed no version: {}{}",
                    text.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            })?;
        if let Some(key) = &key {
            write_cached_version(key, &version);
        }
        Ok(self.version.get_or_init(|| version).clone())
    }

    /// Checks that CRIU can checkpoint and restore here: its version and
    /// `criu check` (which fails, for example, on kernels its vDSO handling
    /// does not know). Costs one CRIU start (≈5 ms with the kernel-feature
    /// cache, ≈50 ms without).
    pub fn probe(&self) -> Result<CriuInfo, CheckpointError> {
        let version = self.version()?;
        let out = Command::new(&self.binary)
            .arg("check")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CheckpointError::CriuMissing {
                binary: self.binary.clone(),
                source,
            })?;
        if !out.status.success() {
            let mut said = String::from_utf8_lossy(&out.stderr).into_owned();
            said.push_str(&String::from_utf8_lossy(&out.stdout));
            return Err(CheckpointError::CriuUnusable {
                binary: self.binary.clone(),
                reason: format!("`criu check` failed: {}", tail(&said, LOG_TAIL_LINES)),
            });
        }
        Ok(CriuInfo {
            binary: self.binary.clone(),
            version,
            kdat_cached: Path::new(KDAT_CACHE).exists(),
        })
    }
}

/// Where [`Criu::version`] remembers versions between processes: one file
/// per binary, named by its device and inode, holding the full key's line
/// and the version. Under `/run`, so a reboot does not matter either way
/// (the key holds the boot id as well).
pub const VERSION_CACHE_DIR: &str = "/run/ember-criu-version";

/// A cached version's file and what it is valid for: this boot and the
/// binary's file as it is (path found on `PATH`, device, inode, size,
/// modification and change times), so a reinstall
/// (scripts/install-criu.sh rewrites the wrapper) asks again.
struct VersionCacheKey {
    file: PathBuf,
    key: String,
}

/// `None` when the binary cannot be found: then the spawn reports why.
fn version_cache_key(binary: &Path) -> Option<VersionCacheKey> {
    use std::os::unix::fs::MetadataExt;
    let path = if binary.components().count() > 1 {
        binary.to_path_buf()
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(binary))
                .find(|p| p.is_file())
        })?
    };
    let path = fs::canonicalize(path).ok()?;
    let m = fs::metadata(&path).ok()?;
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(VersionCacheKey {
        file: Path::new(VERSION_CACHE_DIR).join(format!("{}-{}", m.dev(), m.ino())),
        key: format!(
            "{} {} {} {} {} {}.{} {}.{}",
            boot.trim(),
            path.display(),
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ),
    })
}

fn read_cached_version(c: &VersionCacheKey) -> Option<String> {
    let text = fs::read_to_string(&c.file).ok()?;
    let (k, v) = text.split_once('\n')?;
    let v = v.trim();
    (k == c.key && !v.is_empty() && !v.contains(char::is_whitespace)).then(|| v.to_owned())
}

/// Best effort: without the cache (not root, a read-only `/run`) every
/// process asks CRIU once, as before.
fn write_cached_version(c: &VersionCacheKey, version: &str) {
    let tmp = c.file.with_extension(format!("tmp.{}", std::process::id()));
    let written = fs::create_dir_all(VERSION_CACHE_DIR)
        .and_then(|()| fs::write(&tmp, format!("{}\n{version}\n", c.key)))
        .and_then(|()| fs::rename(&tmp, &c.file));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        tracing::debug!(error = %e, "not caching CRIU's version");
    }
}

/// What a restore must run on to match its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// CRIU's version.
    pub criu_version: String,
    /// `uname -r`.
    pub kernel_release: String,
    /// `uname -m`.
    pub machine: String,
    /// The CPU features user space can detect and then rely on
    /// ([`relevant_cpu_flag`]), sorted. A restore needs all of them.
    pub cpu_flags: Vec<String>,
}

impl HostFacts {
    /// This machine's facts, with `criu`'s version.
    pub fn here(criu: &Criu) -> Result<HostFacts, CheckpointError> {
        let uts = nix::sys::utsname::uname().map_err(|e| CheckpointError::Io {
            what: "uname",
            path: PathBuf::new(),
            source: e.into(),
        })?;
        Ok(HostFacts {
            criu_version: criu.version()?,
            kernel_release: uts.release().to_string_lossy().into_owned(),
            machine: uts.machine().to_string_lossy().into_owned(),
            cpu_flags: cpu_flags()?.clone(),
        })
    }
}

/// Whether a `/proc/cpuinfo` flag matters to a restored process: the
/// instruction-set extensions a program (glibc's `memcpy` selection, a JIT,
/// numpy) detects once at start-up and then uses without asking again, and
/// the extended-state features that shape the FPU frame CRIU restores.
/// Kernel-side and mitigation flags (`md_clear`, `ibrs`, `constant_tsc`, …)
/// are left out: they differ between otherwise identical machines and never
/// change what a process may execute.
pub fn relevant_cpu_flag(flag: &str) -> bool {
    const PREFIXES: [&str; 5] = ["sse", "ssse", "avx", "amx", "xsave"];
    const EXACT: [&str; 27] = [
        "fpu",
        "mmx",
        "cx8",
        "cx16",
        "cmov",
        "popcnt",
        "abm",
        "lzcnt",
        "bmi1",
        "bmi2",
        "adx",
        "aes",
        "vaes",
        "pclmulqdq",
        "vpclmulqdq",
        "sha_ni",
        "gfni",
        "fma",
        "f16c",
        "movbe",
        "rdrand",
        "rdseed",
        "erms",
        "fsrm",
        "pku",
        "ospke",
        "rdpid",
    ];
    PREFIXES.iter().any(|p| flag.starts_with(p)) || EXACT.contains(&flag)
}

fn cpu_flags() -> Result<&'static Vec<String>, CheckpointError> {
    static FLAGS: OnceLock<Vec<String>> = OnceLock::new();
    if let Some(f) = FLAGS.get() {
        return Ok(f);
    }
    let path = Path::new("/proc/cpuinfo");
    let text = fs::read_to_string(path).map_err(io_err("cannot read", path))?;
    Ok(FLAGS.get_or_init(|| parse_cpu_flags(&text)))
}

/// The relevant flags of the first processor in `/proc/cpuinfo` text.
pub fn parse_cpu_flags(cpuinfo: &str) -> Vec<String> {
    let set: BTreeSet<String> = cpuinfo
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .unwrap_or_default()
        .split_whitespace()
        .filter(|f| relevant_cpu_flag(f))
        .map(str::to_owned)
        .collect();
    set.into_iter().collect()
}

/// What the checkpointed root filesystem was made of; the caller names it
/// (image manifest digest and layer digests, lowest first) and a restore
/// must present the same.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIdentity {
    /// The image (manifest digest).
    pub digest: String,
    /// Its layers, lowest first (digests of what is mounted).
    pub layers: Vec<String>,
}

/// The parts of a runtime configuration a restore depends on: CRIU recreates
/// namespaces and mounts as they were, so the configuration it is restored
/// with must have the same ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeShape {
    /// Namespace types, sorted; `type=path` for joined namespaces.
    pub namespaces: Vec<String>,
    /// Mounts as `destination type`, in order.
    pub mounts: Vec<String>,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Working directory.
    pub cwd: String,
    /// Whether the process has a terminal.
    pub terminal: bool,
    /// Whether the root filesystem is read-only.
    pub readonly_rootfs: bool,
}

impl RuntimeShape {
    /// The shape of a `config.json`.
    pub fn of_config(config: &serde_json::Value) -> RuntimeShape {
        let str_of = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(|s| s.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let mut namespaces: Vec<String> = config
            .pointer("/linux/namespaces")
            .and_then(|n| n.as_array())
            .into_iter()
            .flatten()
            .map(|ns| match ns.get("path").and_then(|p| p.as_str()) {
                Some(p) if !p.is_empty() => format!("{}={p}", str_of(ns, "type")),
                _ => str_of(ns, "type"),
            })
            .collect();
        namespaces.sort();
        let mounts = config
            .get("mounts")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
            .map(|m| format!("{} {}", str_of(m, "destination"), str_of(m, "type")))
            .collect();
        let num = |p: &str| {
            config
                .pointer(p)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0)
        };
        let flag = |p: &str| config.pointer(p).and_then(|v| v.as_bool()).unwrap_or(false);
        RuntimeShape {
            namespaces,
            mounts,
            uid: num("/process/user/uid"),
            gid: num("/process/user/gid"),
            cwd: config
                .pointer("/process/cwd")
                .and_then(|v| v.as_str())
                .unwrap_or("/")
                .to_owned(),
            terminal: flag("/process/terminal"),
            readonly_rootfs: flag("/root/readonly"),
        }
    }
}

/// Options of [`checkpoint`] (and the matching ones of [`restore`], which
/// repeats them from the metadata).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOptions {
    /// Keep the container running afterwards (else CRIU ends it).
    pub leave_running: bool,
    /// Save established TCP connections (`--tcp-established`); a restore
    /// then repairs them, which only makes sense while the peer still has
    /// its end.
    pub tcp_established: bool,
    /// Save `flock`/`fcntl` locks (`--file-locks`); without it CRIU refuses
    /// a process holding one.
    pub file_locks: bool,
    /// Allow Unix sockets connected to peers outside the container
    /// (`--ext-unix-sk`).
    pub ext_unix_sk: bool,
}

/// Recorded beside a checkpoint: what it is of and what a restore must
/// match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// [`METADATA_FORMAT`].
    pub format: u32,
    /// The machine it was taken on.
    pub host: HostFacts,
    /// The root filesystem's layers.
    pub image: ImageIdentity,
    /// The runtime configuration's shape.
    pub runtime: RuntimeShape,
    /// The options it was taken with.
    pub options: CheckpointOptions,
    /// The container it was taken of.
    pub source_id: String,
    /// The checkpointed container's cgroup path (`<parent>/<id>`).
    pub cgroups_path: String,
    /// When it was taken (seconds since the epoch).
    pub created_unix: u64,
}

impl Metadata {
    /// Reads `<dir>/ember-checkpoint.json`.
    pub fn read(dir: &Path) -> Result<Metadata, CheckpointError> {
        let path = dir.join(METADATA_FILE);
        let bad = |reason: String| CheckpointError::Metadata {
            path: path.clone(),
            reason,
        };
        let text = fs::read(&path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        let meta: Metadata =
            serde_json::from_slice(&text).map_err(|e| bad(format!("malformed: {e}")))?;
        if meta.format != METADATA_FORMAT {
            return Err(bad(format!(
                "format {} (this Ember reads {METADATA_FORMAT})",
                meta.format
            )));
        }
        Ok(meta)
    }

    /// Checks this checkpoint against a machine and an image; the error
    /// names the first difference.
    pub fn check(
        &self,
        dir: &Path,
        here: &HostFacts,
        image: &ImageIdentity,
    ) -> Result<(), CheckpointError> {
        let mismatch = |what, recorded: &str, here: &str| {
            Err(CheckpointError::Mismatch {
                dir: dir.to_path_buf(),
                what,
                recorded: recorded.to_owned(),
                here: here.to_owned(),
            })
        };
        let h = &self.host;
        if h.criu_version != here.criu_version {
            return mismatch("CRIU version", &h.criu_version, &here.criu_version);
        }
        if h.kernel_release != here.kernel_release {
            return mismatch("kernel release", &h.kernel_release, &here.kernel_release);
        }
        if h.machine != here.machine {
            return mismatch("machine", &h.machine, &here.machine);
        }
        let missing: Vec<&str> = h
            .cpu_flags
            .iter()
            .filter(|f| !here.cpu_flags.contains(f))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return mismatch("CPU features", &missing.join(" "), "missing");
        }
        if self.image.digest != image.digest {
            return mismatch("image digest", &self.image.digest, &image.digest);
        }
        if self.image.layers != image.layers {
            return mismatch(
                "image layers",
                &self.image.layers.join(","),
                &image.layers.join(","),
            );
        }
        Ok(())
    }
}

/// A checkpoint on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Its metadata.
    pub metadata: Metadata,
    /// How long `runc checkpoint` took.
    pub dump_time: Duration,
    /// Total time, including the copy of the filesystem changes.
    pub total_time: Duration,
}

/// Checkpoints container `id`, whose bundle (with `rootfs/` and `upper/`) is
/// `bundle`, into `dest`, which must not exist. `image` names its layers.
///
/// The container is frozen from before CRIU's dump until its filesystem
/// changes are copied, so both describe the same moment. With
/// [`CheckpointOptions::leave_running`] it is thawed afterwards (unless it
/// was paused to begin with); otherwise it is killed once saved (this
/// returns after its init is gone) and the caller removes it as usual. `dest` appears complete or not at all: everything is written
/// to a sibling directory first and renamed.
pub fn checkpoint(
    runc: &Runc,
    criu: &Criu,
    id: &str,
    bundle: &Path,
    dest: &Path,
    image: &ImageIdentity,
    options: CheckpointOptions,
) -> Result<Checkpoint, CheckpointError> {
    let started = Instant::now();
    let host = HostFacts::here(criu)?;
    if dest.exists() {
        return Err(CheckpointError::Exists {
            path: dest.to_path_buf(),
        });
    }
    let config_path = bundle.join(CONFIG_FILE);
    let config_bytes = fs::read(&config_path).map_err(io_err("cannot read", &config_path))?;
    let config: serde_json::Value =
        serde_json::from_slice(&config_bytes).map_err(|e| CheckpointError::Io {
            what: "malformed runtime configuration",
            path: config_path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;

    let state = runc.state(id)?;
    let was_paused = match state.status {
        ContainerStatus::Running => false,
        ContainerStatus::Paused => true,
        status => {
            return Err(CheckpointError::NotRunning {
                id: id.to_owned(),
                status,
            });
        }
    };

    let tmp = sibling(dest, "tmp")?;
    let _ = fs::remove_dir_all(&tmp);
    let images = tmp.join(IMAGES_DIR);
    fs::create_dir_all(&images).map_err(io_err("cannot create", &images))?;
    let result = (|| {
        if !was_paused {
            runc.pause(id)?;
        }
        let work = bundle.join(CRIU_WORK_DIR);
        fs::create_dir_all(&work).map_err(io_err("cannot create", &work))?;
        let mut cmd = runc_command(runc, criu, bundle);
        // Always leave it running (frozen) so the upper directory is copied
        // before anything changes it; ended below if asked.
        cmd.args(["checkpoint", "--leave-running", "--image-path"])
            .arg(&images)
            .arg("--work-path")
            .arg(&work);
        options.apply(&mut cmd);
        cmd.arg(id);
        let t = Instant::now();
        run_criu_step(
            cmd,
            &work.join("dump.log"),
            |status, runc, log, log_tail| CheckpointError::Dump {
                id: id.to_owned(),
                status,
                runc,
                log,
                log_tail,
            },
        )?;
        let dump_time = t.elapsed();
        if joins_netns(&config) && !options.tcp_established {
            skip_network_lock(&images)?;
        }
        copy_tree(&bundle.join(UPPER_DIR), &tmp.join(UPPER_DIR))?;
        Ok(dump_time)
    })();
    // Thaw (or end) the container whatever happened above: a failed
    // checkpoint must not leave it frozen.
    let thaw = if options.leave_running || result.is_err() {
        if was_paused { Ok(()) } else { runc.resume(id) }
    } else {
        // Opened before the kill, so a reused pid cannot be mistaken for it.
        let init = runc::PidFd::open(state.pid).ok();
        // Whether a frozen process dies of SIGKILL before it is thawed
        // depends on the kernel; thaw it if it is still there.
        runc.kill(id, nix::sys::signal::Signal::SIGKILL, true)
            .and_then(|()| match runc.state(id) {
                Ok(s) if s.status == ContainerStatus::Paused => runc.resume(id),
                Ok(_) | Err(RuncError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            })
            .map(|()| {
                // Return with the source gone, as `runc checkpoint` without
                // --leave-running would.
                if let Some(fd) = init
                    && !fd.wait_readable(END_WAIT).unwrap_or(true)
                {
                    tracing::warn!(%id, "checkpointed container still running after SIGKILL");
                }
            })
    };
    let dump_time = match result {
        Ok(t) => t,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = thaw {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.into());
    }

    let metadata = Metadata {
        format: METADATA_FORMAT,
        host,
        image: image.clone(),
        runtime: RuntimeShape::of_config(&config),
        options,
        source_id: id.to_owned(),
        cgroups_path: config
            .pointer("/linux/cgroupsPath")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let finish = || {
        let saved_config = tmp.join(CONFIG_FILE);
        fs::write(&saved_config, &config_bytes).map_err(io_err("cannot write", &saved_config))?;
        let meta_path = tmp.join(METADATA_FILE);
        let json = serde_json::to_vec_pretty(&metadata).map_err(|e| CheckpointError::Io {
            what: "cannot encode",
            path: meta_path.clone(),
            source: io::Error::other(e),
        })?;
        fs::write(&meta_path, json).map_err(io_err("cannot write", &meta_path))?;
        fs::rename(&tmp, dest).map_err(io_err("cannot rename into place", dest))
    };
    if let Err(e) = finish() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(Checkpoint {
        dir: dest.to_path_buf(),
        metadata,
        dump_time,
        total_time: started.elapsed(),
    })
}

impl CheckpointOptions {
    fn apply(&self, cmd: &mut Command) {
        for (on, flag) in [
            (self.tcp_established, "--tcp-established"),
            (self.file_locks, "--file-locks"),
            (self.ext_unix_sk, "--ext-unix-sk"),
        ] {
            if on {
                cmd.arg(flag);
            }
        }
    }
}

/// A container restored from a checkpoint, running detached.
///
/// Dropping it cleans up (errors are logged); call [`Restored::cleanup`] to
/// see them.
#[derive(Debug)]
pub struct Restored {
    runc: Runc,
    id: String,
    dir: PathBuf,
    pid: i32,
    rootfs: Option<RootFs>,
    lock: Option<Flock<File>>,
    /// The directory was created by this restore and is removed with it.
    owns_dir: bool,
    /// How long `runc restore` took.
    pub restore_time: Duration,
    /// Total time: checks, copy of the filesystem changes, mount, restore.
    pub total_time: Duration,
}

impl Restored {
    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The bundle directory.
    pub fn bundle(&self) -> &Path {
        &self.dir
    }

    /// Pid of the restored init process on the host.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The mounted root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(crate::mount::ROOTFS_DIR)
    }

    /// Kills the container and removes its runc state, overlay and
    /// directory. Idempotent.
    pub fn cleanup(&mut self) -> Result<(), CheckpointError> {
        if self.runc.has_state(&self.id) {
            self.runc.delete(&self.id, true)?;
        }
        if let Some(mut rootfs) = self.rootfs.take()
            && let Err(source) = rootfs.unmount()
        {
            self.rootfs = Some(rootfs);
            return Err(CheckpointError::Mount {
                id: self.id.clone(),
                source,
            });
        }
        if self.owns_dir {
            match fs::remove_dir_all(&self.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot remove", &self.dir)(e)),
            }
            self.owns_dir = false;
        }
        self.lock = None;
        Ok(())
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::warn!(id = %self.id, error = %ember_error::chain(&e), "cleanup of restored container failed");
        }
    }
}

/// Where and how [`restore`] starts its copy.
#[derive(Debug, Clone, Copy)]
pub struct RestoreTarget<'a, P: AsRef<Path>> {
    /// The new container's id.
    pub id: &'a str,
    /// Its directory (the bundle), which must not exist.
    pub dir: &'a Path,
    /// The layers to mount, lowest first: the same as checkpointed.
    pub layers: &'a [P],
    /// What they are; must match the checkpoint's metadata.
    pub image: &'a ImageIdentity,
    /// Bind mounts of the checkpointed configuration whose host source is
    /// different for this copy (per-runner directories such as the agent's
    /// socket directory at `/run/ember`), found by destination. Everything
    /// else is mounted as it was.
    pub rebind: &'a [BindMount],
}

/// Restores the checkpoint in `from` as a new container (`target.id` in
/// `target.dir`), on an overlay of `target.layers` with a copy of the
/// checkpointed filesystem changes, after checking the metadata against
/// this machine and `target.image`. The restored process runs detached; it
/// continues where the checkpoint left it, with the standard streams it had
/// (files are reopened; pipes of the checkpointed container cannot be, so
/// checkpoint containers whose streams are `/dev/null` or files), sharing
/// no writable state with the checkpoint or other restores. A refused or
/// failed restore leaves nothing behind.
pub fn restore<P: AsRef<Path>>(
    runc: &Runc,
    criu: &Criu,
    from: &Path,
    target: &RestoreTarget<'_, P>,
) -> Result<Restored, CheckpointError> {
    let RestoreTarget {
        id,
        dir,
        layers,
        image,
        rebind,
    } = *target;
    let started = Instant::now();
    runc::validate_id(id)?;
    let metadata = Metadata::read(from)?;
    metadata.check(from, &HostFacts::here(criu)?, image)?;
    let saved_config = from.join(CONFIG_FILE);
    let config_bytes = fs::read(&saved_config).map_err(io_err("cannot read", &saved_config))?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&config_bytes).map_err(|e| CheckpointError::Metadata {
            path: saved_config.clone(),
            reason: format!("malformed runtime configuration: {e}"),
        })?;
    let shape = RuntimeShape::of_config(&config);
    if shape != metadata.runtime {
        return Err(CheckpointError::Mismatch {
            dir: from.to_path_buf(),
            what: "runtime configuration shape",
            recorded: format!("{:?}", metadata.runtime),
            here: format!("{shape:?}"),
        });
    }
    // A joined network namespace (see crate::netns) is external to CRIU:
    // this copy joins a new one of its own, held until runc has restored.
    let netns = match joined_netns(&mut config) {
        Some(path) => {
            let holder = NetnsHolder::spawn()?;
            *path = serde_json::Value::String(holder.path().to_string_lossy().into_owned());
            Some(holder)
        }
        None => None,
    };
    for b in rebind {
        rebind_mount(&mut config, b).map_err(|what| CheckpointError::Rebind {
            dir: from.to_path_buf(),
            destination: b.destination.clone(),
            what,
        })?;
    }
    if dir.exists() {
        return Err(CheckpointError::Exists {
            path: dir.to_path_buf(),
        });
    }
    let dir = std::path::absolute(dir).map_err(io_err("cannot resolve", dir))?;

    fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
    let mut restored = Restored {
        runc: runc.clone(),
        id: id.to_owned(),
        dir: dir.clone(),
        pid: 0,
        rootfs: None,
        lock: None,
        owns_dir: true,
        restore_time: Duration::ZERO,
        total_time: Duration::ZERO,
    };
    // From here on, dropping `restored` undoes everything.
    let lock_path = dir.join(LOCK_FILE);
    let file = File::create(&lock_path).map_err(io_err("cannot create", &lock_path))?;
    restored.lock = Some(
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| io_err("cannot lock", &lock_path)(errno.into()))?,
    );
    copy_tree(&from.join(UPPER_DIR), &dir.join(UPPER_DIR))?;
    restored.rootfs =
        Some(
            RootFs::mount(&dir, layers).map_err(|source| CheckpointError::Mount {
                id: id.to_owned(),
                source,
            })?,
        );
    // Its own cgroup, named after the new id under the same parent.
    let parent = metadata
        .cgroups_path
        .rsplit_once('/')
        .map(|(p, _)| p)
        .filter(|p| !p.is_empty())
        .unwrap_or(crate::spec::DEFAULT_CGROUP_PARENT);
    if let Some(linux) = config.get_mut("linux").and_then(|l| l.as_object_mut()) {
        linux.insert(
            "cgroupsPath".into(),
            serde_json::Value::String(format!("{parent}/{id}")),
        );
    }
    let config_path = dir.join(CONFIG_FILE);
    let bytes = serde_json::to_vec(&config)
        .map_err(|e| io_err("cannot encode", &config_path)(io::Error::other(e)))?;
    fs::write(&config_path, bytes).map_err(io_err("cannot write", &config_path))?;
    if crate::spec::uses_mask_dir(&config) {
        // This copy's own empty directory behind its masked paths.
        let mask = dir.join(crate::spec::MASK_DIR);
        crate::spec::create_mask_dir(&dir).map_err(io_err("cannot create", &mask))?;
    }

    let work = dir.join(CRIU_WORK_DIR);
    fs::create_dir_all(&work).map_err(io_err("cannot create", &work))?;
    let mut cmd = runc_command(runc, criu, &dir);
    cmd.args(["restore", "--detach", "--image-path"])
        .arg(from.join(IMAGES_DIR))
        .arg("--work-path")
        .arg(&work)
        .arg("--bundle")
        .arg(&dir)
        .arg("--pid-file")
        .arg(dir.join(PID_FILE));
    metadata.options.apply(&mut cmd);
    cmd.arg(id);
    let t = Instant::now();
    run_criu_step(
        cmd,
        &work.join("restore.log"),
        |status, runc, log, log_tail| CheckpointError::Restore {
            id: id.to_owned(),
            status,
            runc,
            log,
            log_tail,
        },
    )?;
    restored.restore_time = t.elapsed();
    // The restored tasks are in the namespace now and keep it.
    drop(netns);
    if let Some(keep) = std::env::var_os("EMBER_CRIU_KEEP_LOGS") {
        // Profiling aid: CRIU's restore log (with its timestamps) outlives
        // the container.
        let _ = fs::copy(
            work.join("restore.log"),
            Path::new(&keep).join(format!("{id}.log")),
        );
    }
    let pid_path = dir.join(PID_FILE);
    restored.pid = fs::read_to_string(&pid_path)
        .map_err(io_err("cannot read", &pid_path))?
        .trim()
        .parse()
        .map_err(|_| io_err("malformed pid in", &pid_path)(io::ErrorKind::InvalidData.into()))?;
    restored.total_time = started.elapsed();
    Ok(restored)
}

/// Whether a configuration joins a network namespace (`path` set), which
/// runc then hands CRIU as external.
fn joins_netns(config: &serde_json::Value) -> bool {
    config
        .pointer("/linux/namespaces")
        .and_then(|n| n.as_array())
        .into_iter()
        .flatten()
        .filter(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))
        .any(|ns| {
            ns.get("path")
                .and_then(|p| p.as_str())
                .is_some_and(|p| !p.is_empty())
        })
}

/// CRIU's inventory image (`inventory.img`).
const INVENTORY_IMAGE: &str = "inventory.img";
/// Its magic number, the image's first four bytes (little-endian).
const INVENTORY_MAGIC: u32 = 0x5831_3116;
/// `inventory_entry.network_lock_method` (images/inventory.proto).
const INVENTORY_NETWORK_LOCK_FIELD: u64 = 11;
/// CRIU's `NETWORK_LOCK_SKIP` (criu/include/cr_options.h: iptables 0,
/// nftables 1, skip 2).
const NETWORK_LOCK_SKIP: u64 = 2;

/// Records in a dump's inventory that its network was not locked, so a
/// restore neither locks nor unlocks it.
///
/// Why: CRIU takes the lock method of a restore from the dump's inventory
/// (`--network-lock` is ignored on restore), runc 1.1 cannot pass one to
/// the dump (no option; its `org.criu.config` file route crashes CRIU
/// 4.1.1, whose RPC config parser dereferences a null `argv` after any
/// `network-lock` line), and the default, iptables, costs every restore
/// ≈60–75 ms: after the tasks are restored and before they resume, CRIU
/// runs `iptables-restore`/`ip6tables-restore` (nf_tables here) four or
/// five times to remove lock rules.
///
/// Why it is safe, and only called then: the lock keeps packets away from
/// restored TCP connections until they are repaired. The container joined
/// a network namespace of its own (external to CRIU: its rules are neither
/// saved nor restored, and each restore joins a new one with only `lo`,
/// see [`crate::netns`]), and without
/// [`CheckpointOptions::tcp_established`] no connected TCP socket is in
/// the dump (CRIU refuses one), so nothing outside the restored tasks can
/// reach them before they resume.
fn skip_network_lock(images: &Path) -> Result<(), CheckpointError> {
    let path = images.join(INVENTORY_IMAGE);
    let bytes = fs::read(&path).map_err(io_err("cannot read", &path))?;
    let rewritten = inventory_with_lock_method(&bytes, NETWORK_LOCK_SKIP).ok_or_else(|| {
        CheckpointError::Metadata {
            path: path.clone(),
            reason: "not a CRIU inventory image this Ember can read".into(),
        }
    })?;
    let tmp = images.join(".inventory.img.tmp");
    fs::write(&tmp, rewritten).map_err(io_err("cannot write", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("cannot rename into place", &path))
}

/// `inventory` (magic, 32-bit size, one protobuf `inventory_entry`) with
/// its `network_lock_method` set to `method`: the field's occurrences are
/// removed and one appended. `None` if it does not parse.
fn inventory_with_lock_method(inventory: &[u8], method: u64) -> Option<Vec<u8>> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            inventory.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    if word(0)? != INVENTORY_MAGIC {
        return None;
    }
    let size = word(4)? as usize;
    let message = inventory.get(8..8 + size)?;
    let trailer = &inventory[8 + size..];
    let mut kept = Vec::with_capacity(message.len() + 2);
    let mut at = 0;
    while at < message.len() {
        let start = at;
        let tag = read_varint(message, &mut at)?;
        match tag & 7 {
            0 => {
                read_varint(message, &mut at)?;
            }
            1 => at += 8,
            2 => {
                let len = usize::try_from(read_varint(message, &mut at)?).ok()?;
                at = at.checked_add(len)?;
            }
            5 => at += 4,
            _ => return None,
        }
        if at > message.len() {
            return None;
        }
        if tag != INVENTORY_NETWORK_LOCK_FIELD << 3 {
            kept.extend_from_slice(&message[start..at]);
        }
    }
    write_varint(&mut kept, INVENTORY_NETWORK_LOCK_FIELD << 3);
    write_varint(&mut kept, method);
    let mut out = Vec::with_capacity(8 + kept.len() + trailer.len());
    out.extend_from_slice(&INVENTORY_MAGIC.to_le_bytes());
    out.extend_from_slice(&u32::try_from(kept.len()).ok()?.to_le_bytes());
    out.extend_from_slice(&kept);
    out.extend_from_slice(trailer);
    Some(out)
}

fn read_varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The `path` of the configuration's network namespace, if it joins one.
fn joined_netns(config: &mut serde_json::Value) -> Option<&mut serde_json::Value> {
    config
        .pointer_mut("/linux/namespaces")?
        .as_array_mut()?
        .iter_mut()
        .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get_mut("path")
        .filter(|p| p.as_str().is_some_and(|p| !p.is_empty()))
}

/// Points the bind mount at `b.destination` to `b.source`.
fn rebind_mount(config: &mut serde_json::Value, b: &BindMount) -> Result<(), &'static str> {
    let dest = b.destination.to_str().ok_or("not UTF-8")?;
    let source = b.source.to_str().ok_or("source not UTF-8")?;
    let m = config
        .get_mut("mounts")
        .and_then(|m| m.as_array_mut())
        .and_then(|ms| {
            ms.iter_mut()
                .find(|m| m.get("destination").and_then(|d| d.as_str()) == Some(dest))
        })
        .ok_or("no such mount in the checkpointed configuration")?;
    if m.get("type").and_then(|t| t.as_str()) != Some("bind") {
        return Err("not a bind mount");
    }
    m["source"] = serde_json::Value::String(source.to_owned());
    Ok(())
}

/// `runc --criu <criu> --root <root> --log <bundle>/runc.log --log-format
/// json`: runc's messages go to the log, where a failure finds them.
fn runc_command(runc: &Runc, criu: &Criu, bundle: &Path) -> Command {
    let mut cmd = Command::new(runc.binary());
    cmd.arg("--criu")
        .arg(criu.binary())
        .arg("--root")
        .arg(runc.root())
        .arg("--log")
        .arg(bundle.join(runc::LOG_FILE))
        .args(["--log-format", "json"]);
    cmd
}

/// Runs a runc checkpoint/restore command; on failure, `make` builds the
/// error from runc's status and messages and the tail of CRIU's `log`.
fn run_criu_step(
    mut cmd: Command,
    log: &Path,
    make: impl FnOnce(String, String, PathBuf, String) -> CheckpointError,
) -> Result<(), CheckpointError> {
    // Stale logs from an earlier attempt would be quoted as this one's.
    let _ = fs::remove_file(log);
    let runc_log = log
        .parent()
        .and_then(Path::parent)
        .map(|bundle| bundle.join(runc::LOG_FILE));
    if let Some(l) = &runc_log {
        let _ = fs::remove_file(l);
    }
    // No pipes: a restored container would inherit them from runc and hold
    // them open, so waiting for their end would never return. runc's
    // messages are read from its log instead.
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|source| {
            CheckpointError::Runc(RuncError::Spawn {
                op: "checkpoint/restore",
                id: String::new(),
                binary: PathBuf::from(cmd.get_program()),
                source,
            })
        })?;
    if status.success() {
        return Ok(());
    }
    let log_tail = fs::read_to_string(log)
        .map(|t| quote_log(&t))
        .unwrap_or_else(|e| format!("(no CRIU log: {e})"));
    let said = runc_log
        .as_deref()
        .and_then(runc::log_errors)
        .unwrap_or_default();
    Err(make(
        runc::describe(status),
        said,
        log.to_path_buf(),
        log_tail,
    ))
}

/// What an error quotes of a CRIU log: its `Error` lines (the first few:
/// the cause is usually among them, far above the end) and its last lines.
fn quote_log(text: &str) -> String {
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error ("))
        .take(LOG_TAIL_LINES / 2)
        .collect();
    let end = tail(text, LOG_TAIL_LINES);
    if errors.is_empty() {
        end
    } else {
        format!("{}\n...\n{end}", errors.join("\n"))
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `<parent>/.<name>.<suffix>-<pid>-<n>`: a sibling of `path` on the same
/// filesystem, so it can be renamed into place, unique per call.
fn sibling(path: &Path, suffix: &str) -> Result<PathBuf, CheckpointError> {
    static N: AtomicU64 = AtomicU64::new(0);
    let bad = || io_err("no file name in", path)(io::ErrorKind::InvalidInput.into());
    let name = path.file_name().ok_or_else(bad)?.to_string_lossy();
    let parent = path.parent().ok_or_else(bad)?;
    fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    let n = N.fetch_add(1, Ordering::Relaxed);
    Ok(parent.join(format!(".{name}.{suffix}-{}-{n}", std::process::id())))
}

/// Copies a directory tree with owners, modes, times, xattrs (overlayfs's
/// opaque markers) and device nodes (its whiteouts) — `cp -a`, which does
/// all of that and uses reflinks where the filesystem has them.
fn copy_tree(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    let out = Command::new("cp")
        .args(["-a", "--reflink=auto", "--no-target-directory", "--"])
        .arg(from)
        .arg(to)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CheckpointError::Copy {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            stderr: format!("cannot execute cp: {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CheckpointError::Copy {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CRIU stand-in that counts its starts in `runs` and prints
    /// `version`.
    fn fake_criu(dir: &Path, version: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("criu");
        let runs = dir.join("runs");
        fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho x >> '{}'\necho 'Version: {version}'\n",
                runs.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    fn starts(dir: &Path) -> usize {
        fs::read_to_string(dir.join("runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    #[test]
    fn criu_version_is_asked_once_per_binary_across_processes() {
        if !nix::unistd::geteuid().is_root() {
            // The cache lives under /run; without root each process asks
            // CRIU itself, which the test below would see as two starts.
            eprintln!("not root: the version cache under /run is not writable");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let bin = fake_criu(d.path(), "4.1.1");
        // Two values stand in for two processes: each has its own
        // in-memory copy.
        assert_eq!(Criu::new(&bin).version().unwrap(), "4.1.1");
        assert_eq!(Criu::new(&bin).version().unwrap(), "4.1.1");
        assert_eq!(starts(d.path()), 1, "the second asked CRIU again");
        // A reinstalled binary (another size and change time) is asked
        // again, and its answer replaces the old one.
        let bin = fake_criu(d.path(), "4.2");
        assert_eq!(Criu::new(&bin).version().unwrap(), "4.2");
        assert_eq!(starts(d.path()), 2);
        // A binary that prints no version is never cached as one.
        let bogus = Criu::new("/bin/true");
        assert!(bogus.version().is_err());
        assert!(Criu::new("/bin/true").version().is_err());
        let _ = fs::remove_file(version_cache_key(&bin).expect("the fake exists").file);
    }

    #[test]
    fn cpu_flags_keep_instruction_sets_only() {
        let info = "processor\t: 0\nflags\t\t: fpu vme sse sse2 ssse3 sse4_1 avx2 avx512f md_clear constant_tsc xsave xsaveopt sha_ni hypervisor\n\nprocessor\t: 1\nflags\t\t: fpu\n";
        assert_eq!(
            parse_cpu_flags(info),
            [
                "avx2", "avx512f", "fpu", "sha_ni", "sse", "sse2", "sse4_1", "ssse3", "xsave",
                "xsaveopt"
            ]
        );
    }

    fn meta() -> Metadata {
        Metadata {
            format: METADATA_FORMAT,
            host: HostFacts {
                criu_version: "4.1.1".into(),
                kernel_release: "6.1.0".into(),
                machine: "x86_64".into(),
                cpu_flags: vec!["avx2".into(), "sse2".into()],
            },
            image: ImageIdentity {
                digest: "sha256:aa".into(),
                layers: vec!["sha256:l1".into()],
            },
            runtime: RuntimeShape::default(),
            options: CheckpointOptions::default(),
            source_id: "c".into(),
            cgroups_path: "/ember/c".into(),
            created_unix: 0,
        }
    }

    #[test]
    fn metadata_check_names_the_first_difference() {
        let m = meta();
        let dir = Path::new("/ckpt");
        let mut here = m.host.clone();
        here.cpu_flags.push("avx512f".into());
        // More CPU features than recorded is fine.
        m.check(dir, &here, &m.image).unwrap();
        let what = |here: &HostFacts, image: &ImageIdentity| match m.check(dir, here, image) {
            Err(CheckpointError::Mismatch { what, .. }) => what,
            other => panic!("expected a mismatch, got {other:?}"),
        };
        let mut h = here.clone();
        h.kernel_release = "6.2.0".into();
        assert_eq!(what(&h, &m.image), "kernel release");
        let mut h = here.clone();
        h.criu_version = "3.17".into();
        assert_eq!(what(&h, &m.image), "CRIU version");
        let mut h = here.clone();
        h.cpu_flags.retain(|f| f != "avx2");
        assert_eq!(what(&h, &m.image), "CPU features");
        let mut img = m.image.clone();
        img.digest = "sha256:bb".into();
        assert_eq!(what(&here, &img), "image digest");
        let mut img = m.image.clone();
        img.layers.push("sha256:l2".into());
        assert_eq!(what(&here, &img), "image layers");
    }

    #[test]
    fn runtime_shape_of_a_config() {
        let config = serde_json::json!({
            "process": {"user": {"uid": 1000, "gid": 50}, "cwd": "/srv", "terminal": false},
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [{"destination": "/proc", "type": "proc"}, {"destination": "/dev", "type": "tmpfs"}],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/x"}, {"type": "mount"}]}
        });
        let s = RuntimeShape::of_config(&config);
        assert_eq!(s.namespaces, ["mount", "network=/run/netns/x", "pid"]);
        assert_eq!(s.mounts, ["/proc proc", "/dev tmpfs"]);
        assert_eq!((s.uid, s.gid, s.cwd.as_str()), (1000, 50, "/srv"));
        assert!(s.readonly_rootfs && !s.terminal);
    }

    #[test]
    fn quoted_logs_lead_with_their_errors() {
        let log = "(0.1) a\n(0.2) Error (criu/files.c:1): cause\n(0.3) b\n(0.4) c\n";
        assert_eq!(
            quote_log(log),
            "(0.2) Error (criu/files.c:1): cause\n...\n(0.1) a\n(0.2) Error (criu/files.c:1): cause\n(0.3) b\n(0.4) c"
        );
        assert_eq!(quote_log("x\ny\n"), "x\ny");
    }

    #[test]
    fn inventory_lock_method_is_replaced_and_the_rest_kept() {
        // A real CRIU 4.1.1 inventory (iptables lock, field 11 = 0), then
        // one without the field.
        let mut real = INVENTORY_MAGIC.to_le_bytes().to_vec();
        let msg: &[u8] = &[
            0x08, 0x02, 0x10, 0x01, 0x1a, 0x02, 0x08, 0x01, 0x58, 0x00, 0x62, 0x00, 0x6a, 0x03,
            b'a', b'b', b'c',
        ];
        real.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        real.extend_from_slice(msg);
        let out = inventory_with_lock_method(&real, NETWORK_LOCK_SKIP).unwrap();
        let body = &out[8..];
        assert_eq!(
            u32::from_le_bytes(out[4..8].try_into().unwrap()) as usize,
            body.len()
        );
        assert_eq!(
            body,
            [
                0x08, 0x02, 0x10, 0x01, 0x1a, 0x02, 0x08, 0x01, 0x62, 0x00, 0x6a, 0x03, b'a', b'b',
                b'c', 0x58, 0x02
            ]
        );
        // Idempotent, and appends when absent.
        assert_eq!(
            inventory_with_lock_method(&out, NETWORK_LOCK_SKIP).unwrap(),
            out
        );
        let mut bare = INVENTORY_MAGIC.to_le_bytes().to_vec();
        bare.extend_from_slice(&2u32.to_le_bytes());
        bare.extend_from_slice(&[0x08, 0x02]);
        assert_eq!(
            &inventory_with_lock_method(&bare, NETWORK_LOCK_SKIP).unwrap()[8..],
            [0x08, 0x02, 0x58, 0x02]
        );
        // Not an inventory, or truncated.
        assert!(inventory_with_lock_method(b"\0\0\0\0\0\0\0\0", 2).is_none());
        assert!(inventory_with_lock_method(&real[..real.len() - 2], 2).is_none());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }

    #[test]
    fn errors_say_their_source_once_in_the_chain() {
        let enoent = || io::Error::from(io::ErrorKind::NotFound);
        let errors = [
            CheckpointError::CriuMissing {
                binary: "/usr/sbin/criu".into(),
                source: enoent(),
            },
            CheckpointError::Io {
                what: "reading",
                path: "/x".into(),
                source: enoent(),
            },
            CheckpointError::Runc(RuncError::Spawn {
                op: "restore",
                id: "c1".into(),
                binary: "/usr/bin/runc".into(),
                source: enoent(),
            }),
        ];
        for e in &errors {
            assert_eq!(
                ember_error::repeated_source(e),
                None,
                "{}",
                ember_error::chain(e)
            );
            // The cause is still printed, once, at the end.
            let chain = ember_error::chain(e).to_string();
            assert!(chain.ends_with(&enoent().to_string()), "{chain}");
        }
        let missing = ember_error::chain(&errors[0]).to_string();
        assert!(
            missing.starts_with("CRIU is missing: cannot execute /usr/sbin/criu; install it"),
            "{missing}"
        );
    }
}
