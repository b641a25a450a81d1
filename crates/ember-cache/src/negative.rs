//! Remembered "not found" answers (negative caching).
//!
//! Concurrent requests for one missing blob or manifest already share one
//! upstream request (the blob and manifest single-flights); this remembers
//! the upstream's 404 for a few seconds ([`CacheConfig::negative_ttl`]) so
//! the next wave of requests for it does not go upstream either. Only "not
//! found" is remembered: an upstream that is down or failing is asked again
//! by the next request (and tags are then served stale).
//!
//! [`CacheConfig::negative_ttl`]: crate::CacheConfig::negative_ttl

use crate::error::CacheError;
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Entries kept at most; a flood of distinct missing names beyond this is
/// simply not remembered (each costs one upstream request, as it would
/// without this cache).
const MAX_ENTRIES: usize = 100_000;

/// "Not found" answers by upstream, repository and reference.
pub struct NotFound {
    ttl: Duration,
    map: Mutex<HashMap<String, (Instant, Arc<CacheError>)>>,
    metrics: Arc<Metrics>,
}

impl NotFound {
    /// Remembers answers for `ttl` (zero: never).
    pub fn new(ttl: Duration, metrics: Arc<Metrics>) -> Self {
        NotFound {
            ttl,
            map: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The key of blob `digest` in `repo` on `upstream`.
    pub fn blob_key(upstream: &str, repo: &str, digest: &str) -> String {
        format!("blob\0{upstream}\0{repo}\0{digest}")
    }

    /// The key of manifest `reference` (a digest or tag) in `repo` on
    /// `upstream` (a digest's manifest and its blob are different answers).
    pub fn manifest_key(upstream: &str, repo: &str, reference: &str) -> String {
        format!("manifest\0{upstream}\0{repo}\0{reference}")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Arc<CacheError>)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The remembered answer for `key`, if still fresh.
    pub fn get(&self, key: &str) -> Option<CacheError> {
        if self.ttl.is_zero() {
            return None;
        }
        let mut map = self.lock();
        match map.get(key) {
            Some((at, e)) if at.elapsed() < self.ttl => {
                Metrics::add(&self.metrics.negative_hits, 1);
                Some(CacheError::Shared(e.clone()))
            }
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers `e` for `key` if it says "not found".
    pub fn put(&self, key: String, e: &Arc<CacheError>) {
        if self.ttl.is_zero() || !not_found(e) {
            return;
        }
        let mut map = self.lock();
        if map.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            map.retain(|_, (at, _)| at.elapsed() < ttl);
            if map.len() >= MAX_ENTRIES {
                return;
            }
        }
        map.insert(key, (Instant::now(), e.clone()));
    }

    /// Forgets `key` (the thing was found after all).
    pub fn forget(&self, key: &str) {
        self.lock().remove(key);
    }
}

/// Whether an upstream answer means the thing does not exist there.
pub fn not_found(e: &CacheError) -> bool {
    match e {
        CacheError::BlobUnknown(_) | CacheError::ManifestUnknown(_) => true,
        CacheError::Shared(inner) => not_found(inner),
        _ => false,
    }
}
