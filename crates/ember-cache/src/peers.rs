//! Sharing the load between cache servers by rendezvous hashing.
//!
//! Every server knows the same set of URLs (its own and its peers'); the
//! owner of a digest is the URL with the highest hash of (URL, digest).
//! Each blob is thus fetched from upstream and stored on one server only,
//! adding or removing a server moves only the blobs it owns, and no
//! coordination is needed.
//!
//! What is not placed by the ring (directory cache entries and chunks,
//! snapshot manifests and artifacts: they are stored where a client put
//! them) is found by asking every peer in turn on a miss ([`PeerSet`]).
//! Such a request carries a marker header, and a server answers a marked
//! request from its own store only, so a miss never bounces between
//! servers.

use std::time::Duration;

use ember_oci::Digest;
use sha2::{Digest as _, Sha256};

use crate::error::CacheError;

/// The other cache servers, asked in order when something is missing here.
pub struct PeerSet {
    urls: Vec<String>,
    http: reqwest::Client,
    marker: &'static str,
}

impl PeerSet {
    /// The peers at `urls` (base URLs, this server excluded), whose
    /// requests carry header `marker`; `None` when there are none.
    pub fn new(urls: Vec<String>, marker: &'static str) -> Result<Option<PeerSet>, CacheError> {
        if urls.is_empty() {
            return Ok(None);
        }
        // Short connect timeout: a dead peer is skipped quickly.
        let list: Vec<&str> = urls.iter().map(String::as_str).collect();
        let http = ember_http::client::builder(&list)
            .connect_timeout(Duration::from_secs(2))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| CacheError::io("building the HTTP client", std::io::Error::other(e)))?;
        let urls = urls
            .into_iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        Ok(Some(PeerSet { urls, http, marker }))
    }

    /// Their base URLs, in the order they are asked.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Sends the request `build` makes with this set's client to peer
    /// `url`, marked as a peer's; its response if it succeeded (2xx).
    /// A peer that cannot be reached is logged; one that answers an error
    /// (it does not have it) is not.
    pub async fn ask(
        &self,
        url: &str,
        build: impl FnOnce(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Option<reqwest::Response> {
        match build(&self.http).header(self.marker, "1").send().await {
            Ok(r) if r.status().is_success() => Some(r),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(peer = %url, error = %ember_error::chain(&e), "peer unreachable");
                None
            }
        }
    }
}

/// Whether a request carries the peer `marker` (it is answered from this
/// server's own store only).
pub fn from_peer(headers: &axum::http::HeaderMap, marker: &str) -> bool {
    headers.contains_key(marker)
}

/// The servers sharing the load.
#[derive(Debug, Clone)]
pub struct Ring {
    me: String,
    nodes: Vec<String>,
}

impl Ring {
    /// A ring of `me` and `peers` (duplicates and `me` among the peers are
    /// fine).
    pub fn new(me: String, peers: Vec<String>) -> Self {
        let me = me.trim_end_matches('/').to_string();
        let mut nodes: Vec<String> = peers
            .into_iter()
            .map(|p| p.trim_end_matches('/').to_string())
            .chain(std::iter::once(me.clone()))
            .collect();
        nodes.sort();
        nodes.dedup();
        Ring { me, nodes }
    }

    /// Whether there is anyone to share with.
    pub fn has_peers(&self) -> bool {
        self.nodes.len() > 1
    }

    /// The other servers' URLs.
    pub fn others(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| **n != self.me)
            .cloned()
            .collect()
    }

    /// This server's URL.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The URL of the server owning `digest`.
    pub fn owner(&self, digest: &Digest) -> &str {
        self.nodes
            .iter()
            .max_by_key(|n| score(n, digest))
            .map_or(self.me.as_str(), |s| s.as_str())
    }
}

fn score(node: &str, digest: &Digest) -> u64 {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0]);
    h.update(digest.to_string().as_bytes());
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&out[..8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_agree_and_spread() {
        let urls = ["http://a:1", "http://b:1", "http://c:1"];
        let rings: Vec<Ring> = urls
            .iter()
            .map(|me| Ring::new(me.to_string(), urls.iter().map(|s| s.to_string()).collect()))
            .collect();
        let mut counts = [0usize; 3];
        for i in 0..300u32 {
            let d = Digest::sha256_of(&i.to_be_bytes());
            let o = rings[0].owner(&d);
            assert!(rings.iter().all(|r| r.owner(&d) == o));
            counts[urls.iter().position(|u| *u == o).unwrap()] += 1;
        }
        // Each of three servers owns a fair share (expected 100 each).
        assert!(counts.iter().all(|&c| c > 60), "{counts:?}");
        // Removing a server only moves the blobs it owned.
        let two = Ring::new(urls[0].into(), vec![urls[1].into()]);
        for i in 0..300u32 {
            let d = Digest::sha256_of(&i.to_be_bytes());
            let o = rings[0].owner(&d);
            if o != urls[2] {
                assert_eq!(two.owner(&d), o);
            }
        }
    }
}
