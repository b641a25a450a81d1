//! OCI runtime configurations (`config.json`) from an image configuration
//! and the options of one run.
//!
//! The result matches what `runc spec` and Docker produce where it matters:
//!
//! * **Process**: `Entrypoint + Cmd` exactly as Docker (arguments given for
//!   the run replace `Cmd` and keep `Entrypoint`); image `Env` with the run's
//!   variables replacing those of the same name; `PATH` and `HOME` added when
//!   missing; working directory from the run, else the image, else `/`.
//! * **Capabilities**: Docker's default set. Like Docker, a non-root user only
//!   gets them in the bounding set, so it has none in effect (as after
//!   `execve`). `noNewPrivileges` is false, as in Docker.
//! * **Rlimits**: `RLIMIT_NOFILE` only, clamped to the caller's current hard
//!   limit, because raising a hard limit fails where it is not permitted and
//!   then `runc` refuses to start the container.
//! * **Namespaces**: pid, mount, ipc, uts, and network unless
//!   [`Network::Host`]; a new network namespace holds only `lo` (runc brings
//!   it up). The cgroup namespace is the host's, as Docker does on cgroup v1.
//! * **Mounts**: runc's defaults (`/proc`, `/dev`, `/dev/pts`, `/dev/shm`,
//!   `/dev/mqueue`, `/sys` read-only, `/sys/fs/cgroup` read-only unless
//!   turned off) plus the run's bind mounts. Masked and read-only paths are
//!   runc's defaults. No seccomp profile (neither has `runc spec`).
//! * **Cgroups**: `cgroupsPath` `<cgroup_parent>/<id>` (cgroupfs driver), with
//!   memory, CPU quota and pids limits.

use std::io;
use std::path::{Path, PathBuf};

use nix::sys::resource::{Resource, getrlimit};
use oci_spec::OciSpecError;
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceCgroupBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount, MountBuilder,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use crate::user::ResolvedUser;

/// Name of the runtime configuration inside a bundle.
pub const CONFIG_FILE: &str = "config.json";

/// Default `pids.max` of a container.
pub const DEFAULT_PIDS_LIMIT: i64 = 4096;

/// Default parent of every container's cgroup.
pub const DEFAULT_CGROUP_PARENT: &str = "/ember";

/// `PATH` when neither the image nor the run sets one (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// CPU bandwidth period for `cpus` limits, in microseconds (Docker's).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Highest `RLIMIT_NOFILE` a container asks for (Docker's daemon default).
const NOFILE_MAX: u64 = 1_048_576;
/// Soft `RLIMIT_NOFILE`: what most programs expect (select(2) breaks above).
const NOFILE_SOFT: u64 = 1024;

/// Docker's default capability set (moby `caps.DefaultCapabilities`).
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Errors from building or writing a runtime configuration.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Neither the image nor the run says what to execute.
    #[error("no command: the image has no Entrypoint or Cmd and the run gave no arguments")]
    NoCommand,
    /// An environment variable with an empty name or a `=` in its name.
    #[error("invalid environment variable name {name:?}")]
    InvalidEnv {
        /// The name.
        name: String,
    },
    /// A working directory that is not absolute.
    #[error("working directory {dir:?} is not an absolute path")]
    RelativeWorkdir {
        /// The directory.
        dir: String,
    },
    /// A bind mount destination that is not absolute.
    #[error("bind mount destination {dest} is not an absolute path")]
    RelativeMount {
        /// The destination.
        dest: PathBuf,
    },
    /// A CPU limit that is not a positive finite number.
    #[error("invalid CPU limit {cpus}")]
    InvalidCpus {
        /// The limit.
        cpus: f64,
    },
    /// A memory limit that is not positive.
    #[error("invalid memory limit {bytes}")]
    InvalidMemory {
        /// The limit.
        bytes: i64,
    },
    /// `getrlimit(2)` failed.
    #[error("cannot read the current RLIMIT_NOFILE")]
    Rlimit(#[source] nix::errno::Errno),
    /// An oci-spec builder rejected a value.
    #[error("invalid runtime configuration")]
    Build(#[from] OciSpecError),
    /// Serialization failed.
    #[error("cannot serialize the runtime configuration")]
    Serialize(#[source] serde_json::Error),
    /// `config.json` could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A host path bind-mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Path on the host.
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub destination: PathBuf,
    /// Mount it read-only.
    pub readonly: bool,
}

/// The container's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Network {
    /// A new network namespace with only the loopback interface.
    #[default]
    None,
    /// The host's network namespace.
    Host,
}

/// The options of one run, layered over the image configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// Replaces the image's `Cmd` (the `Entrypoint` stays), like the
    /// arguments after the image in `docker run`. `None` or an empty list
    /// keeps the image's `Cmd`.
    pub args: Option<Vec<String>>,
    /// Environment variables; each replaces the image's variable of the same
    /// name, or is appended.
    pub env: Vec<(String, String)>,
    /// Working directory (absolute); `None` keeps the image's.
    pub workdir: Option<String>,
    /// User in Docker's `--user` syntax; `None` keeps the image's.
    pub user: Option<String>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<i64>,
    /// CPU limit in CPUs, enforced as a CFS quota per [`CPU_PERIOD_US`].
    pub cpus: Option<f64>,
    /// Maximum number of processes; `None` means unlimited.
    pub pids_limit: Option<i64>,
    /// Hostname; `None` uses the container id.
    pub hostname: Option<String>,
    /// Allocate a terminal (runc then needs one on its own stdin).
    pub terminal: bool,
    /// Mount the root filesystem read-only.
    pub readonly_rootfs: bool,
    /// Extra bind mounts, applied after the default mounts.
    pub mounts: Vec<BindMount>,
    /// Network namespace.
    pub network: Network,
    /// Parent of the container's cgroup, e.g. `/ember`.
    pub cgroup_parent: String,
    /// Mount the cgroup filesystem read-only at `/sys/fs/cgroup`, as Docker
    /// and `runc spec` do. Runtimes such as the JVM read their limits there;
    /// on cgroup v1 it costs runc one mount per hierarchy (about 4 ms here).
    pub mount_cgroupfs: bool,
    /// Mask the masked directories under `/sys` (`/sys/firmware`) with
    /// a read-only bind mount of the bundle's own empty [`MASK_DIR`]
    /// instead of runc's read-only tmpfs. Equally strong (read-only, empty,
    /// no device nodes or executables), but CRIU treats a bind mount as an
    /// external mount and restores it from the configuration, where it
    /// saves and restores every tmpfs with a `tar | gzip` pair (≈6–12 ms
    /// each): for containers that are checkpointed. Masked files stay
    /// `/dev/null` binds either way.
    pub mask_with_binds: bool,
    /// With [`Network::None`]: join this network namespace (a path such as
    /// [`crate::netns::NetnsHolder::path`]) instead of having runc make one.
    /// CRIU then treats it as external: see [`crate::netns`].
    pub netns_path: Option<PathBuf>,
}

impl Default for RunSpec {
    fn default() -> Self {
        RunSpec {
            args: None,
            env: Vec::new(),
            workdir: None,
            user: None,
            memory_bytes: None,
            cpus: None,
            pids_limit: Some(DEFAULT_PIDS_LIMIT),
            hostname: None,
            terminal: false,
            readonly_rootfs: false,
            mounts: Vec::new(),
            network: Network::None,
            cgroup_parent: DEFAULT_CGROUP_PARENT.to_owned(),
            mount_cgroupfs: true,
            mask_with_binds: false,
            netns_path: None,
        }
    }
}

impl RunSpec {
    /// The user to resolve: the run's, else the image's, else root (`None`).
    pub fn effective_user<'a>(&'a self, image: &'a ImageConfiguration) -> Option<&'a str> {
        self.user
            .as_deref()
            .or_else(|| image.config().as_ref().and_then(|c| c.user().as_deref()))
            .filter(|u| !u.is_empty())
    }
}

/// The argument vector Docker would run: `Entrypoint` followed by the run's
/// arguments if any, else by the image's `Cmd`.
pub fn process_args(
    image: &ImageConfiguration,
    args: Option<&[String]>,
) -> Result<Vec<String>, SpecError> {
    let config = image.config().as_ref();
    let entrypoint = config
        .and_then(|c| c.entrypoint().as_deref())
        .unwrap_or(&[]);
    let cmd = match args {
        Some(a) if !a.is_empty() => a,
        _ => config.and_then(|c| c.cmd().as_deref()).unwrap_or(&[]),
    };
    let argv: Vec<String> = entrypoint.iter().chain(cmd).cloned().collect();
    if argv.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(argv)
}

/// The process environment: the image's, overridden by the run's, plus
/// `HOSTNAME`, and `PATH` and `HOME` when missing (as Docker does).
pub fn process_env(
    image: &ImageConfiguration,
    run: &[(String, String)],
    hostname: &str,
    home: &str,
) -> Result<Vec<String>, SpecError> {
    let image_env = image
        .config()
        .as_ref()
        .and_then(|c| c.env().as_deref())
        .unwrap_or(&[]);
    let mut env: Vec<String> = Vec::with_capacity(image_env.len() + run.len() + 3);
    env.push(format!("HOSTNAME={hostname}"));
    env.extend(image_env.iter().cloned());
    for (name, value) in run {
        if name.is_empty() || name.contains('=') {
            return Err(SpecError::InvalidEnv { name: name.clone() });
        }
        let entry = format!("{name}={value}");
        match env.iter_mut().find(|e| env_name(e) == name) {
            Some(existing) => *existing = entry,
            None => env.push(entry),
        }
    }
    if !env.iter().any(|e| env_name(e) == "PATH") {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !env.iter().any(|e| env_name(e) == "HOME") {
        env.push(format!("HOME={home}"));
    }
    Ok(env)
}

fn env_name(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(k, _)| k)
}

/// The working directory: the run's, else the image's, else `/`.
pub fn process_cwd(image: &ImageConfiguration, run: &RunSpec) -> Result<String, SpecError> {
    let dir = run
        .workdir
        .as_deref()
        .or_else(|| {
            image
                .config()
                .as_ref()
                .and_then(|c| c.working_dir().as_deref())
        })
        .filter(|d| !d.is_empty())
        .unwrap_or("/");
    if !dir.starts_with('/') {
        return Err(SpecError::RelativeWorkdir {
            dir: dir.to_owned(),
        });
    }
    Ok(dir.to_owned())
}

/// `RLIMIT_NOFILE` (soft, hard) for containers: 1024 and 1048576, each
/// clamped to the caller's current hard limit.
pub fn nofile_limits() -> Result<(u64, u64), SpecError> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(SpecError::Rlimit)?;
    let hard = NOFILE_MAX.min(hard);
    Ok((NOFILE_SOFT.min(hard), hard))
}

/// The hostname used when the run sets none: the id, cut to the kernel's
/// 64-byte limit.
fn default_hostname(id: &str) -> &str {
    let mut end = id.len().min(63);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}

/// Builds the runtime configuration of container `id`, whose root
/// filesystem is `rootfs/` next to `config.json` in the bundle, for a
/// process running as `user`.
pub fn build_spec(
    id: &str,
    image: &ImageConfiguration,
    run: &RunSpec,
    user: &ResolvedUser,
) -> Result<Spec, SpecError> {
    let hostname = run
        .hostname
        .clone()
        .unwrap_or_else(|| default_hostname(id).to_owned());
    let args = process_args(image, run.args.as_deref())?;
    let env = process_env(image, &run.env, &hostname, &user.home)?;
    let cwd = process_cwd(image, run)?;

    let caps: Capabilities = DEFAULT_CAPABILITIES.into_iter().collect();
    // What execve leaves a non-root user: nothing beyond the bounding set.
    let in_effect = if user.uid == 0 {
        caps.clone()
    } else {
        Capabilities::new()
    };
    // Every set is given explicitly: the builder's defaults are not empty.
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps)
        .effective(in_effect.clone())
        .permitted(in_effect)
        .inheritable(Capabilities::new())
        .ambient(Capabilities::new())
        .build()?;

    let (soft, hard) = nofile_limits()?;
    let mut process_user = UserBuilder::default().uid(user.uid).gid(user.gid);
    if !user.additional_gids.is_empty() {
        process_user = process_user.additional_gids(user.additional_gids.clone());
    }
    let process = ProcessBuilder::default()
        .terminal(run.terminal)
        .user(process_user.build()?)
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(capabilities)
        .rlimits(vec![
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .soft(soft)
                .hard(hard)
                .build()?,
        ])
        .no_new_privileges(false)
        .build()?;

    let mut resources = LinuxResourcesBuilder::default().devices(vec![
        // Deny all, then runc adds the standard allowed devices.
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()?,
    ]);
    if let Some(bytes) = run.memory_bytes {
        if bytes <= 0 {
            return Err(SpecError::InvalidMemory { bytes });
        }
        resources = resources.memory(LinuxMemoryBuilder::default().limit(bytes).build()?);
    }
    if let Some(cpus) = run.cpus {
        if !cpus.is_finite() || cpus <= 0.0 {
            return Err(SpecError::InvalidCpus { cpus });
        }
        // The kernel's smallest quota is 1 ms.
        let quota = ((cpus * CPU_PERIOD_US as f64) as i64).max(1000);
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(CPU_PERIOD_US)
                .build()?,
        );
    }
    if let Some(limit) = run.pids_limit {
        resources = resources.pids(LinuxPidsBuilder::default().limit(limit).build()?);
    }

    let mut namespaces: Vec<LinuxNamespace> = Vec::with_capacity(5);
    let mut kinds = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if run.network == Network::None {
        kinds.push(LinuxNamespaceType::Network);
    }
    for typ in kinds {
        let mut ns = LinuxNamespaceBuilder::default().typ(typ);
        if typ == LinuxNamespaceType::Network
            && let Some(path) = &run.netns_path
        {
            ns = ns.path(path.clone());
        }
        namespaces.push(ns.build()?);
    }

    let cgroups_path = format!("{}/{}", run.cgroup_parent.trim_end_matches('/'), id);
    let mut masked = oci_spec::runtime::get_default_maskedpaths();
    let mut mask_mounts = Vec::new();
    if run.mask_with_binds {
        // Only under /sys: runc refuses any mount inside /proc but a few
        // whitelisted files, so /proc's masked directories keep their
        // tmpfs. A directory of the host's /sys is one in the container's
        // (same kernel); runc skips masked paths that do not exist, and so
        // does this, since a bind needs its mount point.
        let (dirs, rest): (Vec<String>, Vec<String>) = masked
            .into_iter()
            .partition(|p| p.starts_with("/sys/") && Path::new(p).is_dir());
        masked = rest;
        for d in dirs {
            mask_mounts.push(mount(
                &d,
                "bind",
                MASK_DIR,
                &["bind", "ro", "nosuid", "nodev", "noexec", "rprivate"],
            )?);
        }
    }
    let linux = LinuxBuilder::default()
        .resources(resources.build()?)
        .cgroups_path(PathBuf::from(cgroups_path))
        .namespaces(namespaces)
        .masked_paths(masked)
        .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
        .build()?;
    let mut all_mounts = mounts(run)?;
    all_mounts.extend(mask_mounts);

    let spec = SpecBuilder::default()
        .version("1.0.2-dev")
        .root(
            RootBuilder::default()
                .path("rootfs")
                .readonly(run.readonly_rootfs)
                .build()?,
        )
        .hostname(hostname)
        .mounts(all_mounts)
        .process(process)
        .linux(linux)
        .build()?;
    Ok(spec)
}

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, SpecError> {
    let mut m = MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source);
    if !options.is_empty() {
        m = m.options(options.iter().map(|o| (*o).to_owned()).collect::<Vec<_>>());
    }
    Ok(m.build()?)
}

fn mounts(run: &RunSpec) -> Result<Vec<Mount>, SpecError> {
    let mut v = vec![
        mount("/proc", "proc", "proc", &[])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
    ];
    if run.mount_cgroupfs {
        v.push(mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?);
    }
    for b in &run.mounts {
        if !b.destination.is_absolute() {
            return Err(SpecError::RelativeMount {
                dest: b.destination.clone(),
            });
        }
        let mode = if b.readonly { "ro" } else { "rw" };
        v.push(
            MountBuilder::default()
                .destination(b.destination.clone())
                .typ("bind")
                .source(b.source.clone())
                .options(vec![
                    "rbind".to_owned(),
                    "rprivate".to_owned(),
                    mode.to_owned(),
                ])
                .build()?,
        );
    }
    Ok(v)
}

/// The empty directory, relative to the bundle, that
/// [`RunSpec::mask_with_binds`] binds read-only over masked directories.
/// runc resolves a relative bind source against the bundle, so every
/// container (and every restored copy) has its own, and a checkpointed
/// configuration names no host path.
pub const MASK_DIR: &str = "masked";

/// Whether a configuration (`config.json` as JSON) binds [`MASK_DIR`].
pub fn uses_mask_dir(config: &serde_json::Value) -> bool {
    config
        .get("mounts")
        .and_then(|m| m.as_array())
        .is_some_and(|ms| {
            ms.iter().any(|m| {
                m.get("type").and_then(|t| t.as_str()) == Some("bind")
                    && m.get("source").and_then(|s| s.as_str()) == Some(MASK_DIR)
            })
        })
}

/// Creates `<bundle>/`[`MASK_DIR`]: empty, mode 0555 (the bind is
/// read-only anyway; this keeps the host side from being written by
/// mistake too). An existing one is left as it is.
pub fn create_mask_dir(bundle: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = bundle.join(MASK_DIR);
    match std::fs::DirBuilder::new().mode(0o555).create(&path) {
        // The umask may have taken bits; set exactly 0555.
        Ok(()) => std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `spec` as `<bundle>/config.json` (and creates the bundle's
/// [`MASK_DIR`] if the spec binds it). Deliberately without fsync: the
/// bundle only lives as long as the container, and a crash discards it.
pub fn write_config(bundle: &Path, spec: &Spec) -> Result<(), SpecError> {
    if spec.mounts().iter().flatten().any(|m| {
        m.typ().as_deref() == Some("bind") && m.source().as_deref() == Some(Path::new(MASK_DIR))
    }) {
        create_mask_dir(bundle).map_err(|source| SpecError::Write {
            path: bundle.join(MASK_DIR),
            source,
        })?;
    }
    let bytes = serde_json::to_vec(spec).map_err(SpecError::Serialize)?;
    let path = bundle.join(CONFIG_FILE);
    std::fs::write(&path, bytes).map_err(|source| SpecError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(json: &str) -> ImageConfiguration {
        let full = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{json}}}"#
        );
        serde_json::from_str(&full).unwrap()
    }

    #[test]
    fn args_follow_docker() {
        let img = image(r#"{"Entrypoint":["/ep","-x"],"Cmd":["a","b"]}"#);
        assert_eq!(process_args(&img, None).unwrap(), ["/ep", "-x", "a", "b"]);
        let over = vec!["c".to_owned()];
        assert_eq!(process_args(&img, Some(&over)).unwrap(), ["/ep", "-x", "c"]);
        assert_eq!(
            process_args(&img, Some(&[])).unwrap(),
            ["/ep", "-x", "a", "b"]
        );
        let cmd_only = image(r#"{"Cmd":["sh"]}"#);
        assert_eq!(process_args(&cmd_only, Some(&over)).unwrap(), ["c"]);
        let none = image("{}");
        assert!(matches!(
            process_args(&none, None),
            Err(SpecError::NoCommand)
        ));
    }

    #[test]
    fn env_overrides_by_name_and_adds_defaults() {
        let img = image(r#"{"Env":["A=1","B=2","PATH=/x"]}"#);
        let env = process_env(
            &img,
            &[("B".into(), "3".into()), ("C".into(), "4".into())],
            "h",
            "/root",
        )
        .unwrap();
        assert_eq!(
            env,
            ["HOSTNAME=h", "A=1", "B=3", "PATH=/x", "C=4", "HOME=/root"]
        );
        let bad = process_env(&img, &[("A=B".into(), "x".into())], "h", "/");
        assert!(matches!(bad, Err(SpecError::InvalidEnv { .. })));
    }

    #[test]
    fn spec_has_limits_namespaces_and_clamped_rlimits() {
        let img = image(r#"{"Cmd":["/bin/true"],"WorkingDir":"/srv"}"#);
        let run = RunSpec {
            memory_bytes: Some(64 << 20),
            cpus: Some(1.5),
            ..RunSpec::default()
        };
        let spec = build_spec("abc", &img, &run, &ResolvedUser::root()).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["linux"]["cgroupsPath"], "/ember/abc");
        assert_eq!(json["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(json["linux"]["resources"]["cpu"]["quota"], 150_000);
        assert_eq!(
            json["linux"]["resources"]["pids"]["limit"],
            DEFAULT_PIDS_LIMIT
        );
        assert_eq!(json["process"]["cwd"], "/srv");
        assert_eq!(json["hostname"], "abc");
        let ns: Vec<&str> = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(ns.contains(&"network") && ns.contains(&"pid"));
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let rl = &json["process"]["rlimits"][0];
        assert!(rl["hard"].as_u64().unwrap() <= hard);
        assert!(rl["soft"].as_u64().unwrap() <= rl["hard"].as_u64().unwrap());
        assert_eq!(
            json["process"]["capabilities"]["effective"]
                .as_array()
                .unwrap()
                .len(),
            14
        );
        assert_eq!(
            json["process"]["capabilities"]["ambient"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn non_root_users_get_only_a_bounding_set() {
        let img = image(r#"{"Cmd":["/bin/true"]}"#);
        let user = ResolvedUser {
            uid: 1000,
            gid: 1000,
            additional_gids: vec![10],
            home: "/home/u".into(),
            name: None,
        };
        let spec = build_spec("x", &img, &RunSpec::default(), &user).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        let caps = &json["process"]["capabilities"];
        assert_eq!(caps["effective"].as_array().unwrap().len(), 0);
        assert_eq!(caps["ambient"].as_array().unwrap().len(), 0);
        assert_eq!(caps["bounding"].as_array().unwrap().len(), 14);
        assert_eq!(json["process"]["user"]["additionalGids"][0], 10);
    }

    #[test]
    fn rejects_bad_limits_and_paths() {
        let img = image(r#"{"Cmd":["/bin/true"]}"#);
        let u = ResolvedUser::root();
        for run in [
            RunSpec {
                cpus: Some(0.0),
                ..RunSpec::default()
            },
            RunSpec {
                memory_bytes: Some(-1),
                ..RunSpec::default()
            },
            RunSpec {
                workdir: Some("rel".into()),
                ..RunSpec::default()
            },
            RunSpec {
                mounts: vec![BindMount {
                    source: "/tmp".into(),
                    destination: "rel".into(),
                    readonly: true,
                }],
                ..RunSpec::default()
            },
        ] {
            assert!(build_spec("x", &img, &run, &u).is_err(), "{run:?}");
        }
    }
}
