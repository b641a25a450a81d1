//! Test support for Ember: real registries and reproducible fixture images.
//!
//! Ember's tests run against the real thing wherever it can run here, so
//! this crate provides four pieces:
//!
//! - [`registry`]: a real CNCF distribution registry (`docker-registry
//!   serve`) on a free loopback port with throwaway storage, either as an
//!   ordinary registry or as a pull-through proxy of another one; its access
//!   log can be read back to count upstream requests.
//! - [`token`]: a Docker token service for the bearer flow, to put in
//!   front of a registry started with
//!   [`registry::Registry::start_token_auth`].
//! - [`proxy`]: a mirror in front of a real registry that cuts blob
//!   bodies half-way, to test fallback to the origin mid-blob.
//! - [`postgres`]: a private PostgreSQL server from Debian's package on a
//!   free loopback port, with a fresh database per test.
//! - [`push`]: a small OCI distribution push client (blobs and manifests)
//!   used to load fixtures into such a registry.
//! - [`require`]: what privileged tests need (root, runc, the static
//!   agent): a clear failure when it is missing, a skip only when the
//!   environment says `EMBER_TEST_SKIP_PRIVILEGED=1`.
//! - [`fixtures`]: byte-for-byte reproducible OCI images (busybox, layer
//!   edge cases, a 110 MiB layer, a large multi-layer image, an image index
//!   and Docker schema 2 variants), written as OCI image layouts and cached
//!   on disk so tests build them once.
//!
//! The `ember-fixtures` binary exposes the builder and the pusher on the
//! command line.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use ember_testkit::{fixtures, registry::Registry};
//!
//! let registry = Registry::start()?;
//! let fixture = fixtures::build_cached("busybox")?;
//! fixtures::push(&fixture, &registry.url(), "ember/busybox", "latest").await?;
//! // Clients can now pull 127.0.0.1:PORT/ember/busybox:latest.
//! # Ok(())
//! # }
//! ```

pub mod digest;
pub mod fixtures;
pub mod postgres;
pub mod proxy;
pub mod push;
pub mod registry;
pub mod require;
pub mod tmpfs;
pub mod token;
