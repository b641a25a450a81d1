//! Ember's directory cache: tool caches (`~/.cargo/registry`, `target/`,
//! `~/.cache/pip`, `~/.npm`) saved after a build and restored before the
//! next one on any machine, through the cluster cache (`ember cache`).
//!
//! * **Content-defined chunks** ([`chunk`]): the files' bytes, concatenated
//!   in a fixed order, are cut by FastCDC (the `fastcdc` crate, 16/64/256
//!   KiB), so consecutive versions of a tree share most chunks and a
//!   one-file change re-uploads a few of them. Chunks are zstd-compressed
//!   and named by the SHA-256 of their uncompressed bytes, checked by the
//!   cache on upload and by the client on every read.
//! * **Manifest** ([`manifest`]): relative paths, kinds, modes, owners,
//!   mtimes, symlinks, hardlinks, empty directories, and the chunk list.
//!   Validated before it is stored and before it is restored.
//! * **Save** ([`save`]): scan, chunk, ask the cache which chunks it lacks,
//!   upload only those in parallel, store the manifest. Entries are
//!   immutable: saving an existing key does nothing.
//! * **Restore** ([`restore`]): exact key, else the newest entry with the
//!   key as prefix, else each restore-key prefix, over an ordered list of
//!   scopes; chunks fetched in parallel and verified; the tree is written
//!   (files by several threads) beside the target and renamed into place,
//!   so a failure leaves the target as it was.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), ember_dircache::DircacheError> {
//! use ember_dircache::{CacheClient, RestoreOptions, SaveOptions};
//! let cache = CacheClient::new("http://cache:5000", None)?;
//! let saved = ember_dircache::save(&cache, "/root/.cargo/registry".as_ref(),
//!     &SaveOptions::new("refs/heads/feature", "cargo-abc123")).await?;
//! println!("uploaded {} of {} chunks", saved.chunks_uploaded, saved.unique_chunks);
//! let mut opts = RestoreOptions::new(
//!     vec!["refs/heads/feature".into(), "refs/heads/main".into()], "cargo-abc123");
//! opts.restore_keys = vec!["cargo-".into()];
//! if let Some(r) = ember_dircache::restore(&cache, "/root/.cargo/registry".as_ref(), &opts).await? {
//!     println!("restored {} ({} bytes)", r.entry.key, r.bytes);
//! }
//! # Ok(())
//! # }
//! ```

pub mod chunk;
pub mod client;
pub mod error;
pub mod manifest;
pub mod progress;
pub mod restore;
pub mod save;
pub mod walk;
pub mod wire;
mod writer;

pub use client::{CacheClient, Stored};
pub use error::DircacheError;
pub use manifest::{Manifest, Policy};
pub use progress::Progress;
pub use restore::{RestoreOptions, RestoreReport, restore, restore_manifest};
pub use save::{SaveOptions, SaveReport, save};
