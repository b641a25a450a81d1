//! Per-node credentials: bearer tokens each bound to one node id.
//!
//! An operator issues one per node (`POST /v1/nodes/{id}/credentials`,
//! `ember nodes token issue ID`) and revokes a node's
//! (`DELETE /v1/nodes/{id}/credentials`, `ember nodes token revoke ID`).
//! The store keeps only each token's SHA-256; the server keeps a copy of
//! the hash → node table in memory, reloaded every second (and at once
//! after an issue or revoke through this replica, or when an unknown
//! token is seen, at most once a second), so checking a node's request
//! costs one hash and one map lookup, and a revocation through any replica
//! takes effect on every replica within a second: requests with the token
//! get 401 and the work stream it opened is closed.
//!
//! A credential presented on another node's path is refused with 403, so
//! node B's token can neither read node A's work stream (and the
//! environments of A's runs) nor report on A's runs.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ember_control::model::NodeId;
use sha2::{Digest as _, Sha256};

/// An unknown token triggers a reload at most this often, so random
/// tokens cannot turn into a query each.
const MISS_RELOAD_GAP: Duration = Duration::from_secs(1);

/// The SHA-256 of `token`, lower-case hex: what the store keeps.
pub(crate) fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new token: 32 bytes from the kernel's generator, in hex.
pub(crate) fn new_token() -> std::io::Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The in-memory copy of the credential table.
#[derive(Debug, Default)]
pub(crate) struct Credentials {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_hash: HashMap<String, NodeId>,
    loaded: Option<Instant>,
}

impl Credentials {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node `token_hash` belongs to, as of the last load.
    pub(crate) fn owner(&self, token_hash: &str) -> Option<NodeId> {
        self.lock().by_hash.get(token_hash).cloned()
    }

    /// Whether an unknown token may trigger a reload now.
    pub(crate) fn may_reload(&self) -> bool {
        self.lock()
            .loaded
            .is_none_or(|t| t.elapsed() >= MISS_RELOAD_GAP)
    }

    /// Replaces the table with what the store holds.
    pub(crate) fn replace(&self, rows: Vec<(String, NodeId)>) {
        let mut inner = self.lock();
        inner.by_hash = rows.into_iter().collect();
        inner.loaded = Some(Instant::now());
    }

    /// Adds one just issued through this replica.
    pub(crate) fn insert(&self, token_hash: String, node: NodeId) {
        self.lock().by_hash.insert(token_hash, node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha256_hex_and_tokens_differ() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (a, b) = (new_token().expect("token"), new_token().expect("token"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
