//! The JSON bodies of the cache's `/dircache/v1` API, shared by the
//! client here and the server in `ember-cache`.
//!
//! ```text
//! HEAD|GET|PUT /dircache/v1/chunks/<hex>      a chunk, zstd-compressed; PUT verified
//! POST         /dircache/v1/chunks/missing    MissingRequest -> MissingResponse
//! POST         /dircache/v1/chunks/fetch      MissingRequest -> the chunks, framed
//!                                             (FETCH_FRAME); 404 if one is absent
//! PUT          /dircache/v1/entry?scope&key   a Manifest; 409 if the key exists
//! GET|DELETE   /dircache/v1/entry?scope&key   exact key -> Found
//! POST         /dircache/v1/lookup            LookupRequest -> Found, or 404
//! GET          /dircache/v1/entries?scope     -> EntryList
//! POST         /dircache/v1/gc                -> GcReport
//! ```

use crate::manifest::Manifest;
use serde::{Deserialize, Serialize};

/// Which of these chunks does the cache lack?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingRequest {
    /// Hex digests.
    pub digests: Vec<String>,
}

/// Content type of a `chunks/fetch` answer: for each digest asked, in
/// order, a 4-byte big-endian length and that many bytes of the stored
/// (compressed, not yet verified) chunk. One request for many chunks
/// saves a restore thousands of round trips and server wake-ups.
pub const FETCH_FRAME: &str = "application/vnd.ember.dircache.chunks.v1";

/// Most digests one `chunks/fetch` may ask for (at most 256 MiB framed).
pub const MAX_FETCH: usize = 256;

/// The ones it lacks. Those it has are marked used, so a garbage
/// collection running before the entry is stored spares them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MissingResponse {
    /// Hex digests, a subset of the request's.
    pub missing: Vec<String>,
}

/// Find an entry: in each scope in order, the exact `key`, else the newest
/// entry whose key starts with `key`, else the newest whose key starts with
/// each of `restore_keys` in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LookupRequest {
    /// Scopes to search, first the run's own (its branch), then fallbacks.
    pub scopes: Vec<String>,
    /// The key asked for.
    pub key: String,
    /// Prefix fallbacks.
    #[serde(default)]
    pub restore_keys: Vec<String>,
}

/// An entry found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Found {
    /// Its description.
    pub info: EntryInfo,
    /// Whether its key is exactly the one asked for.
    pub exact: bool,
    /// The tree.
    pub manifest: Manifest,
}

/// An entry's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// Its scope.
    pub scope: String,
    /// Its key.
    pub key: String,
    /// Bytes it is charged in its scope's budget: its distinct chunks as
    /// stored (compressed) plus its manifest.
    pub bytes: u64,
    /// Bytes of the tree's file data.
    pub data_bytes: u64,
    /// Distinct chunks.
    pub chunks: u64,
    /// Created, milliseconds since the epoch.
    pub created_ms: u64,
    /// Last restored (or created), milliseconds since the epoch.
    pub last_used_ms: u64,
}

/// Entries of a scope, newest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryList {
    /// The entries.
    pub entries: Vec<EntryInfo>,
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    /// Entries removed because their scope was over budget.
    pub evicted_entries: u64,
    /// Entries removed because they were unused too long.
    pub expired_entries: u64,
    /// Chunks no entry referred to, removed.
    pub removed_chunks: u64,
    /// Their stored bytes.
    pub removed_bytes: u64,
}
