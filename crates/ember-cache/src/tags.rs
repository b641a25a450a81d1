//! Tag resolutions: which digest a tag pointed at when the upstream was
//! last asked. Kept in memory and in `tags/` (one small file per tag, so a
//! restart keeps serving tags while the upstream is down).

use ember_oci::Digest;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One tag's last resolution.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TagRecord {
    /// The manifest digest the tag pointed at.
    pub digest: Digest,
    /// When the upstream last confirmed it, in ms since the epoch.
    pub checked_ms: u64,
}

impl TagRecord {
    /// A record confirmed now.
    pub fn now(digest: Digest) -> Self {
        TagRecord {
            digest,
            checked_ms: now_ms(),
        }
    }

    /// Whether it was confirmed less than `ttl` ago.
    pub fn fresh(&self, ttl: Duration) -> bool {
        now_ms().saturating_sub(self.checked_ms) < ttl.as_millis() as u64
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Tag records by (upstream, repository, tag).
pub struct Tags {
    dir: PathBuf,
    mem: Mutex<HashMap<String, TagRecord>>,
}

impl Tags {
    /// Records stored under `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Tags {
            dir,
            mem: Mutex::new(HashMap::new()),
        }
    }

    fn key(upstream: &str, repo: &str, tag: &str) -> String {
        format!("{upstream}\0{repo}\0{tag}")
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!(
            "{}.json",
            hex::encode(Sha256::digest(key.as_bytes()))
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TagRecord>> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last resolution of a tag, from memory or disk. Blocking.
    pub fn get(&self, upstream: &str, repo: &str, tag: &str) -> Option<TagRecord> {
        let key = Self::key(upstream, repo, tag);
        if let Some(r) = self.lock().get(&key) {
            return Some(r.clone());
        }
        let r: TagRecord = serde_json::from_slice(&std::fs::read(self.path(&key)).ok()?).ok()?;
        self.lock().insert(key, r.clone());
        Some(r)
    }

    /// Records a resolution. Blocking; a failed write only costs the
    /// record after a restart.
    pub fn put(&self, upstream: &str, repo: &str, tag: &str, record: TagRecord) {
        let key = Self::key(upstream, repo, tag);
        let path = self.path(&key);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if let Ok(b) = serde_json::to_vec(&record)
            && std::fs::write(&tmp, b)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
        }
        self.lock().insert(key, record);
    }

    /// Forgets a tag the upstream no longer has. Blocking.
    pub fn remove(&self, upstream: &str, repo: &str, tag: &str) {
        let key = Self::key(upstream, repo, tag);
        let _ = std::fs::remove_file(self.path(&key));
        self.lock().remove(&key);
    }
}
