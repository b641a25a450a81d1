//! The store's metadata index: which images exist, which names point at
//! them, which layers they use and when each was last used.
//!
//! It is one JSON document, replaced atomically (write, fsync, rename) under
//! an exclusive `flock`, so concurrent `ember` processes never see half an
//! update and a `kill -9` leaves either the old or the new index.

use ember_oci::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the index format; bumped on incompatible changes.
pub const INDEX_VERSION: u32 = 1;

/// The whole index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Index {
    /// Format version.
    pub version: u32,
    /// Images by manifest digest (the platform manifest, not an index).
    pub images: BTreeMap<Digest, ImageRecord>,
    /// Normalised references (`host/repo:tag`) to manifest digests.
    pub refs: BTreeMap<String, Digest>,
    /// Unpacked layers by diff_id.
    pub layers: BTreeMap<Digest, LayerRecord>,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            version: INDEX_VERSION,
            images: BTreeMap::new(),
            refs: BTreeMap::new(),
            layers: BTreeMap::new(),
        }
    }
}

/// One image: a platform manifest, its config and its layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Digest of the manifest.
    pub manifest: Digest,
    /// The manifest's media type (OCI or Docker).
    pub media_type: String,
    /// The index this manifest was chosen from, if any.
    pub index: Option<Digest>,
    /// Repository it was pulled from (`host/repo`).
    pub repository: String,
    /// Platform (`linux/amd64`).
    pub platform: String,
    /// Config blob digest.
    pub config: Digest,
    /// Layers, lowest first.
    pub layers: Vec<LayerRef>,
    /// When it was pulled (Unix seconds).
    pub pulled_at: u64,
    /// When it was last pulled or run (Unix milliseconds): the LRU clock.
    pub last_used_ms: u64,
}

/// A layer as an image refers to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRef {
    /// Compressed blob digest from the manifest.
    pub digest: Digest,
    /// Uncompressed digest from the config; keys the unpacked directory.
    pub diff_id: Digest,
    /// Compressed size.
    pub size: u64,
    /// Layer media type.
    pub media_type: String,
}

/// An unpacked layer directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Bytes of file contents.
    pub bytes: u64,
    /// Entries in the layer tar.
    pub entries: u64,
    /// Set when the layer was committed without a `syncfs`: the boot id of
    /// the kernel that wrote it. If the machine has rebooted since (a power
    /// loss could have dropped unwritten data), the layer is discarded on
    /// the next store open and pulled again when needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsynced_boot: Option<String>,
}

impl Index {
    /// Bytes the given images' layers take, each layer counted once.
    pub fn bytes_of<'a>(&self, images: impl IntoIterator<Item = &'a ImageRecord>) -> u64 {
        let mut seen = std::collections::BTreeSet::new();
        let mut total = 0;
        for img in images {
            for l in &img.layers {
                if seen.insert(&l.diff_id) {
                    total += self.layers.get(&l.diff_id).map(|r| r.bytes).unwrap_or(0);
                }
            }
        }
        total
    }

    /// Names (references) pointing at `manifest`.
    pub fn names_of(&self, manifest: &Digest) -> Vec<String> {
        self.refs
            .iter()
            .filter(|(_, d)| *d == manifest)
            .map(|(n, _)| n.clone())
            .collect()
    }
}
