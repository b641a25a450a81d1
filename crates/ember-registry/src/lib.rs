//! A client for the OCI distribution API: pulls, and pushes (`push`).
//!
//! [`RegistryClient`] fetches manifests and blobs for an
//! [`ember_oci::Reference`]. It handles what real registries ask of a client:
//!
//! * the `/v2/` ping, anonymous access, basic auth, and the bearer-token
//!   flow announced by `WWW-Authenticate` (tokens cached per scope);
//! * mirrors tried in order before the origin, each request carrying
//!   `?ns=<origin host>` as containerd sends it, so one mirror can front
//!   several registries; any failure on a mirror falls back to the next,
//!   including a blob body that breaks off half-way (the rest comes from
//!   the next endpoint with a `Range` request);
//! * retries with backoff on connection errors, 429 and 5xx;
//! * plain HTTP only for loopback registries and hosts named insecure.
//!
//! The same client serves the cluster cache's upstream requests through
//! [`Endpoint`] and the `*_at` methods (one endpoint, its own credential,
//! `HEAD`, `Range`, the registry's own `Content-Type`), so auth, tokens,
//! retries and manifest verification live in one place.
//!
//! Manifests are verified against their digest here (the one asked for, or
//! for a tag the registry's `Docker-Content-Digest`; one that cannot be
//! checked is an error). Blobs are returned as
//! a stream; the caller verifies them while it consumes them (the store does
//! so in its unpack pipeline), because holding a whole layer to check it
//! first would serialise download and unpack.

mod auth;
mod client;
mod error;
mod push;

pub use auth::{Challenge, Credential, Credentials, basic_auth_value, parse_challenge};
pub use client::{
    BlobStream, Endpoint, FetchedManifest, MAX_MANIFEST_BYTES, RegistryClient, RegistryOptions,
    percent_encode,
};
pub use error::RegistryError;
pub use push::{OpenBlob, PushBlob, PushReport};
