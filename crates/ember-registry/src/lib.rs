//! A client for the read side of the OCI distribution API.
//!
//! [`RegistryClient`] fetches manifests and blobs for an
//! [`ember_oci::Reference`]. It handles what real registries ask of a client:
//!
//! * the `/v2/` ping, anonymous access, basic auth, and the bearer-token
//!   flow announced by `WWW-Authenticate` (tokens cached per scope);
//! * mirrors tried in order before the origin, each request carrying
//!   `?ns=<origin host>` as containerd sends it, so one mirror can front
//!   several registries; any failure on a mirror falls back to the next;
//! * retries with backoff on connection errors, 429 and 5xx;
//! * plain HTTP only for loopback registries and hosts named insecure.
//!
//! Manifests are verified against their digest here. Blobs are returned as
//! a stream; the caller verifies them while it consumes them (the store does
//! so in its unpack pipeline), because holding a whole layer to check it
//! first would serialise download and unpack.

mod auth;
mod client;
mod error;

pub use auth::{Challenge, Credential, Credentials, basic_auth_value, parse_challenge};
pub use client::{BlobStream, FetchedManifest, RegistryClient, RegistryOptions, percent_encode};
pub use error::RegistryError;
