//! Ember's container runtime: overlayfs root filesystems, OCI runtime
//! configurations and `runc`.
//!
//! The caller hands over unpacked layer directories (lowest first, already
//! in overlayfs's whiteout format) and an image configuration; this crate
//! knows nothing about the store they come from.
//!
//! * [`mount`]: [`RootFs`] mounts the layers as an overlay at
//!   `<container>/rootfs`, with `upper/` and `work/` beside it.
//! * [`user`]: resolves Docker-style `user[:group]` against the image's own
//!   `/etc/passwd` and `/etc/group`.
//! * [`spec`]: builds `config.json` from the image configuration and a
//!   [`RunSpec`] (Docker's `Entrypoint`/`Cmd` rules, default capabilities,
//!   cgroup limits, namespaces, runc's default mounts).
//! * [`runc`]: typed wrappers around the `runc` command line, with its own
//!   `--root`.
//! * [`container`]: the lifecycle `ember run` uses — [`Container::prepare`],
//!   [`Prepared::run`] with optional timeout and captured output, and a
//!   cleanup that happens on every path, also from a signal-handling thread
//!   through a [`ContainerHandle`].
//! * [`cgroup`]: the cgroup v1 files of a container (freezer, memory and
//!   CPU counters) and removing what runc left behind.
//! * [`recover`](mod@recover): removes what a killed Ember left behind.
//! * [`checkpoint`](mod@checkpoint): CRIU checkpoints of running containers
//!   (process memory and filesystem changes) and restores of them as new,
//!   independent containers, refused where the machine or image differs.
//!
//! Everything is synchronous: each step is a few system calls or one runc
//! process, so an async caller wraps [`Prepared::run`] in `spawn_blocking`.
//!
//! ```no_run
//! use ember_runtime::{Container, RunSpec, Runc};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let image: oci_spec::image::ImageConfiguration = todo!();
//! let runc = Runc::new("/var/lib/ember/runc");
//! let layers = ["/var/lib/ember/layers/a", "/var/lib/ember/layers/b"];
//! let run = RunSpec {
//!     args: Some(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()]),
//!     memory_bytes: Some(256 << 20),
//!     ..RunSpec::default()
//! };
//! let prepared = Container::new(runc, "job-1", "/var/lib/ember/containers/job-1")
//!     .prepare(&layers, &image, &run)?;
//! let outcome = prepared.run()?;
//! prepared.cleanup()?;
//! std::process::exit(outcome.exit_code);
//! # }
//! ```

// Tests may unwrap: a panic is the failure report there.
#![cfg_attr(test, allow(clippy::unwrap_used))]
#![warn(missing_docs)]

pub mod cgroup;
pub mod checkpoint;
pub mod container;
pub mod mount;
pub mod netns;
pub mod recover;
pub mod runc;
pub mod spec;
pub mod user;

pub use checkpoint::{
    Checkpoint, CheckpointError, CheckpointOptions, Criu, CriuInfo, ImageIdentity, Metadata,
    RestoreTarget, Restored,
};
pub use container::{
    Container, ContainerError, ContainerHandle, Prepared, RunOptions, RunOutcome, StartMode,
    Timings,
};
pub use mount::{MountError, RootFs};
pub use recover::{RecoverError, RecoverReport, recover};
pub use runc::{ContainerStdio, Input, Output, Runc, RuncError};
pub use spec::{BindMount, Network, RunSpec, SpecError};
pub use user::{ResolvedUser, UserError};
