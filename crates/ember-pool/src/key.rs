//! What makes two runs interchangeable: [`RunnerKey`].
//!
//! A runner is a container started for one image with one runtime shape
//! (resources, mounts, user, network, read-only root). Reuse is opt-in: a
//! runner serves another run only if both runs named the same recycling
//! key (a control plane uses the deployment's name, or a key the user
//! gave) and asked for exactly the same image manifest and shape. A spec
//! without a recycling key is *single-use*: its run gets a runner nobody
//! has used (new, or a never-used spare) and the runner is destroyed after
//! it, so runs that never asked to share never see each other's files.
//!
//! The key is a SHA-256 over a canonical encoding of all three, so it is
//! stable across processes and can be reported to a scheduler that prefers
//! nodes with a warm runner of the key.

use std::fmt;
use std::path::PathBuf;

use ember_oci::Digest;
use ember_runtime::{BindMount, Network};
use ember_store::{ImageRecord, Store, StoreError};
use oci_spec::image::ImageConfiguration;
use sha2::{Digest as _, Sha256};

/// An image as the pool runs it: what the store holds for one manifest.
#[derive(Debug, Clone)]
pub struct RunnerImage {
    /// The platform manifest's digest: the image part of the key, and what
    /// the store's GC claim names.
    pub manifest: Digest,
    /// The image configuration (env, working directory, user).
    pub config: ImageConfiguration,
    /// Unpacked layer directories, lowest first.
    pub layers: Vec<PathBuf>,
}

impl RunnerImage {
    /// The image `record` of `store`.
    pub fn from_store(store: &Store, record: &ImageRecord) -> Result<RunnerImage, StoreError> {
        Ok(RunnerImage {
            manifest: record.manifest.clone(),
            config: store.image_config(record)?,
            layers: store.layer_dirs(record),
        })
    }
}

/// The runtime shape of a runner: everything fixed when its container is
/// created. Two runs with different shapes never share a runner.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerShape {
    /// Memory limit in bytes.
    pub memory_bytes: Option<i64>,
    /// CPU limit in CPUs.
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    pub pids_limit: Option<i64>,
    /// Extra bind mounts.
    pub mounts: Vec<BindMount>,
    /// User in Docker's `--user` syntax; `None` keeps the image's.
    pub user: Option<String>,
    /// Network namespace.
    pub network: Network,
    /// Mount the root filesystem read-only.
    pub readonly_rootfs: bool,
}

impl Default for RunnerShape {
    fn default() -> Self {
        RunnerShape {
            memory_bytes: None,
            cpus: None,
            pids_limit: Some(ember_runtime::spec::DEFAULT_PIDS_LIMIT),
            mounts: Vec::new(),
            user: None,
            network: Network::None,
            readonly_rootfs: false,
        }
    }
}

/// Identifies interchangeable runners; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunnerKey(String);

impl RunnerKey {
    /// The key of `image` run with `shape` and the user's `recycle_key`.
    pub fn new(image: &Digest, shape: &RunnerShape, recycle_key: Option<&str>) -> RunnerKey {
        let mut h = Sha256::new();
        // Every field is written with a tag and a length or a fixed width,
        // so no two different inputs encode to the same bytes.
        let mut field = |tag: &str, value: &[u8]| {
            h.update(tag.as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(value);
        };
        field("v", b"1");
        field("image", image.to_string().as_bytes());
        let opt_i64 =
            |v: Option<i64>| v.map_or_else(|| b"-".to_vec(), |n| n.to_le_bytes().to_vec());
        field("memory", &opt_i64(shape.memory_bytes));
        field(
            "cpus",
            &shape
                .cpus
                .map_or_else(|| b"-".to_vec(), |c| c.to_bits().to_le_bytes().to_vec()),
        );
        field("pids", &opt_i64(shape.pids_limit));
        field("mounts", &(shape.mounts.len() as u64).to_le_bytes());
        for m in &shape.mounts {
            field("src", m.source.as_os_str().as_encoded_bytes());
            field("dst", m.destination.as_os_str().as_encoded_bytes());
            field("ro", &[m.readonly as u8]);
        }
        field(
            "user",
            shape
                .user
                .as_deref()
                .map_or(b"-".as_slice(), |u| u.as_bytes()),
        );
        let net: &[u8] = match shape.network {
            Network::None => b"none",
            Network::Host => b"host",
        };
        field("network", net);
        field("ro_rootfs", &[shape.readonly_rootfs as u8]);
        match recycle_key {
            Some(k) => field("recycle", k.as_bytes()),
            None => field("recycle-none", b""),
        }
        RunnerKey(format!("sha256:{}", hex::encode(h.finalize())))
    }

    /// The key as text (`sha256:<hex>`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for logs.
    pub fn short(&self) -> &str {
        let hex = self.0.strip_prefix("sha256:").unwrap_or(&self.0);
        &hex[..hex.len().min(12)]
    }
}

impl fmt::Display for RunnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything needed to create a runner, with its key computed once.
#[derive(Debug, Clone)]
pub struct RunnerSpec {
    image: RunnerImage,
    shape: RunnerShape,
    recycle_key: Option<String>,
    key: RunnerKey,
}

impl RunnerSpec {
    /// A spec for `image` with `shape`. With a `recycle_key`, runs of
    /// specs equal in all three share runners; without one, the spec is
    /// single-use (see the [module docs](self)).
    pub fn new(image: RunnerImage, shape: RunnerShape, recycle_key: Option<String>) -> RunnerSpec {
        let key = RunnerKey::new(&image.manifest, &shape, recycle_key.as_deref());
        RunnerSpec {
            image,
            shape,
            recycle_key,
            key,
        }
    }

    /// The key runners made from this spec carry.
    pub fn key(&self) -> &RunnerKey {
        &self.key
    }

    /// The image.
    pub fn image(&self) -> &RunnerImage {
        &self.image
    }

    /// The runtime shape.
    pub fn shape(&self) -> &RunnerShape {
        &self.shape
    }

    /// The user's recycling key.
    pub fn recycle_key(&self) -> Option<&str> {
        self.recycle_key.as_deref()
    }

    /// Whether runs of this spec may share runners: it has a recycling
    /// key. A single-use spec's runner serves one run and is destroyed.
    pub fn recyclable(&self) -> bool {
        self.recycle_key.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[test]
    fn keys_differ_by_every_part_and_are_stable() {
        let base = RunnerShape::default();
        let k = RunnerKey::new(&digest('a'), &base, None);
        assert_eq!(k, RunnerKey::new(&digest('a'), &base.clone(), None));
        assert!(k.as_str().starts_with("sha256:") && k.as_str().len() == 71);
        assert_eq!(k.short().len(), 12);

        let mut variants = vec![
            RunnerKey::new(&digest('b'), &base, None),
            RunnerKey::new(&digest('a'), &base, Some("tenant-1")),
            RunnerKey::new(&digest('a'), &base, Some("")),
        ];
        let shapes = [
            RunnerShape {
                memory_bytes: Some(1 << 30),
                ..base.clone()
            },
            RunnerShape {
                cpus: Some(0.5),
                ..base.clone()
            },
            RunnerShape {
                pids_limit: None,
                ..base.clone()
            },
            RunnerShape {
                user: Some("1000".into()),
                ..base.clone()
            },
            RunnerShape {
                network: Network::Host,
                ..base.clone()
            },
            RunnerShape {
                readonly_rootfs: true,
                ..base.clone()
            },
            RunnerShape {
                mounts: vec![BindMount {
                    source: "/data".into(),
                    destination: "/data".into(),
                    readonly: true,
                }],
                ..base.clone()
            },
            RunnerShape {
                mounts: vec![BindMount {
                    source: "/data".into(),
                    destination: "/data".into(),
                    readonly: false,
                }],
                ..base.clone()
            },
        ];
        for s in &shapes {
            variants.push(RunnerKey::new(&digest('a'), s, None));
        }
        variants.push(k.clone());
        let mut sorted = variants.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), variants.len(), "{variants:#?}");
    }
}
