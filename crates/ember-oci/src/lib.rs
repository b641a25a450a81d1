//! Names and content addresses of OCI images, shared by every Ember crate.
//!
//! * [`Reference`] parses everything a Docker image reference can be
//!   (`busybox`, `name:tag`, `name@sha256:…`, `host:port/a/b:tag`) and applies
//!   Docker Hub's defaults.
//! * [`Digest`] is a validated content address; [`Verifier`] checks bytes
//!   against one as they stream past.
//! * [`media`] names the manifest, index, config and layer media types of
//!   both OCI and Docker schema 2, and [`Platform`] picks a manifest out of an
//!   index.
//! * [`manifest`] holds the few manifest, index and config fields Ember
//!   reads, shared by the store and the cache.
//!
//! ```
//! use ember_oci::Reference;
//! let r: Reference = "localhost:5000/team/app:v2".parse().unwrap();
//! assert_eq!(r.registry(), "localhost:5000");
//! assert_eq!(r.repository(), "team/app");
//! assert_eq!(r.tag(), Some("v2"));
//! ```

mod digest;
pub mod manifest;
pub mod media;
mod platform;
mod reference;

pub use digest::{Digest, DigestError, Verifier};
pub use platform::{Platform, PlatformError};
pub use reference::{
    DOCKER_HUB, DOCKER_HUB_API, Reference, ReferenceError, is_valid_path_component,
};
