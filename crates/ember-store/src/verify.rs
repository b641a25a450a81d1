//! `ember store verify [--repair]`: re-check what can be re-checked, as
//! `podman system check` does.
//!
//! * Every file in `blobs/sha256/` is hashed and compared with its name.
//! * Every image's manifest, config and index blob must be there.
//! * Every layer in the index must have its directory and its tree record
//!   (`trees/<hex>`, written at commit), and the directory must match the
//!   record: types, modes, owners, sizes, link counts, mtimes, devices,
//!   symlink targets, opaque markers and file checksums.
//! * Layer directories and records the index does not know are leftovers
//!   of a crash.
//!
//! The check runs without the store lock (it reads every layer's data);
//! what it finds is checked once more under the lock, so an object that a
//! concurrent pull committed or a GC removed meanwhile is not reported.
//! With `repair`, bad blobs, layers and leftovers are removed under that
//! lock, with the index entries of layers that go and of images that lose
//! a blob or a layer, so the next pull of those images fetches them again.
//! Objects used by a running container are reported but left alone.

use crate::error::io;
use crate::index::Index;
use crate::tree::{RecordError, TreeRecord};
use crate::{Store, StoreError};
use ember_oci::Digest;
use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::PathBuf;

/// Differences listed per tampered layer.
const DIFF_LINES: usize = 10;

/// What is wrong with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A blob's bytes do not hash to its name.
    BlobCorrupt,
    /// An image's manifest, config or index blob is not in the store.
    BlobMissing,
    /// A file in `blobs/sha256/` whose name is not a digest.
    StrayBlob,
    /// A layer in the index has no directory.
    LayerMissing,
    /// A layer directory differs from the record written at commit.
    LayerModified,
    /// A layer has no tree record (a commit torn by a crash, or a layer
    /// committed by an Ember that did not write records).
    RecordMissing,
    /// A layer's tree record is cut off or malformed.
    RecordTorn,
    /// A layer directory the index does not know.
    OrphanLayer,
    /// A tree record without a layer in the index.
    OrphanRecord,
}

impl std::fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProblemKind::BlobCorrupt => "blob corrupt",
            ProblemKind::BlobMissing => "blob missing",
            ProblemKind::StrayBlob => "stray file in blobs",
            ProblemKind::LayerMissing => "layer missing",
            ProblemKind::LayerModified => "layer modified",
            ProblemKind::RecordMissing => "layer has no tree record",
            ProblemKind::RecordTorn => "layer's tree record is torn",
            ProblemKind::OrphanLayer => "orphan layer directory",
            ProblemKind::OrphanRecord => "orphan tree record",
        })
    }
}

/// One thing found wrong.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The blob or layer digest, or the file name for stray files.
    pub object: String,
    /// Specifics (the actual digest, which paths differ, ...).
    pub detail: Vec<String>,
    /// Images (by a name, or digest) that use the object.
    pub images: Vec<String>,
    /// Whether `--repair` removed it.
    pub repaired: bool,
    /// Why it was not repaired, if repair was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_repaired: Option<String>,
}

/// What a verify pass found and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Blob files hashed.
    pub blobs_checked: usize,
    /// Layers compared with their records.
    pub layers_checked: usize,
    /// What is wrong.
    pub problems: Vec<Problem>,
    /// Images removed from the index by `--repair` (pull them again).
    pub images_removed: Vec<String>,
}

impl VerifyReport {
    /// True when the store is consistent now: nothing was found, or all of
    /// it was repaired.
    pub fn consistent(&self) -> bool {
        self.problems.iter().all(|p| p.repaired)
    }
}

/// What to look at again under the lock.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Object {
    Blob(String),
    ImageBlob(Digest),
    Layer(Digest),
    OrphanLayer(String),
    OrphanRecord(String),
}

impl Store {
    /// Re-checks blobs and layers; with `repair`, removes what is bad (see
    /// the module documentation of `verify`).
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let ix = self.read_index()?;
        let mut suspects = BTreeSet::new();

        let blobs = self.root().join("blobs/sha256");
        let rd = fs::read_dir(&blobs).map_err(io("read", &blobs))?;
        for e in rd {
            let e = e.map_err(io("read", &blobs))?;
            let name = e.file_name().to_string_lossy().into_owned();
            report.blobs_checked += 1;
            if self.check_blob(&ix, &name)?.is_some() {
                suspects.insert(Object::Blob(name));
            }
        }
        for d in image_blobs(&ix) {
            if !self.blob_path(&d).exists() {
                suspects.insert(Object::ImageBlob(d));
            }
        }
        for d in ix.layers.keys() {
            report.layers_checked += 1;
            if self.check_layer(&ix, d)?.is_some() {
                suspects.insert(Object::Layer(d.clone()));
            }
        }
        for (dir, orphan) in [
            ("layers", Object::OrphanLayer as fn(String) -> Object),
            ("trees", Object::OrphanRecord),
        ] {
            let p = self.root().join(dir);
            let Ok(rd) = fs::read_dir(&p) else { continue };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !in_index(&ix, &name) {
                    suspects.insert(orphan(name));
                }
            }
        }
        if suspects.is_empty() {
            return Ok(report);
        }

        // Confirm under the lock, and repair there.
        let users = self.live_users();
        let lock = self.lock()?;
        let mut ix = self.read_index()?;
        let mut confirmed = Vec::new();
        for s in suspects {
            let p = match &s {
                Object::Blob(name) => self.check_blob(&ix, name)?,
                Object::ImageBlob(d) => {
                    (image_blobs(&ix).contains(d) && !self.blob_path(d).exists()).then(|| Problem {
                        kind: ProblemKind::BlobMissing,
                        object: d.to_string(),
                        detail: Vec::new(),
                        images: images_with_blob(&ix, d),
                        repaired: false,
                        not_repaired: None,
                    })
                }
                Object::Layer(d) => self.check_layer(&ix, d)?,
                Object::OrphanLayer(name) => (!in_index(&ix, name)
                    && fs::symlink_metadata(self.root().join("layers").join(name)).is_ok())
                .then(|| problem(ProblemKind::OrphanLayer, name.clone())),
                Object::OrphanRecord(name) => (!in_index(&ix, name)
                    && !self.root().join("layers").join(name).exists()
                    && self.root().join("trees").join(name).exists())
                .then(|| problem(ProblemKind::OrphanRecord, name.clone())),
            };
            if let Some(p) = p {
                confirmed.push((s, p));
            }
        }
        if !repair {
            report.problems = confirmed.into_iter().map(|(_, p)| p).collect();
            return Ok(report);
        }

        let in_use = |images: &[Digest]| {
            users
                .iter()
                .find(|(_, d)| images.contains(d))
                .map(|(id, _)| format!("in use by container {id}"))
        };
        let mut drop_images: BTreeSet<Digest> = BTreeSet::new();
        let mut delete_dirs: Vec<PathBuf> = Vec::new();
        let mut delete_files: Vec<PathBuf> = Vec::new();
        for (s, mut p) in confirmed {
            match s {
                Object::Blob(name) => {
                    let users_of: Vec<Digest> = match format!("sha256:{name}").parse::<Digest>() {
                        Ok(d) => image_digests_with_blob(&ix, &d),
                        Err(_) => Vec::new(),
                    };
                    if let Some(why) = in_use(&users_of) {
                        p.not_repaired = Some(why);
                    } else {
                        drop_images.extend(users_of);
                        delete_files.push(self.root().join("blobs/sha256").join(&name));
                        p.repaired = true;
                    }
                }
                Object::ImageBlob(d) => {
                    let users_of = image_digests_with_blob(&ix, &d);
                    if let Some(why) = in_use(&users_of) {
                        p.not_repaired = Some(why);
                    } else {
                        drop_images.extend(users_of);
                        p.repaired = true;
                    }
                }
                Object::Layer(d) => {
                    let users_of: Vec<Digest> = ix
                        .images
                        .values()
                        .filter(|i| i.layers.iter().any(|l| l.diff_id == d))
                        .map(|i| i.manifest.clone())
                        .collect();
                    if let Some(why) = in_use(&users_of) {
                        p.not_repaired = Some(why);
                    } else {
                        drop_images.extend(users_of);
                        ix.layers.remove(&d);
                        delete_dirs.push(self.layer_dir(&d));
                        p.repaired = true;
                    }
                }
                Object::OrphanLayer(name) => {
                    delete_dirs.push(self.root().join("layers").join(name));
                    p.repaired = true;
                }
                Object::OrphanRecord(name) => {
                    delete_files.push(self.root().join("trees").join(name));
                    p.repaired = true;
                }
            }
            report.problems.push(p);
        }
        for d in &drop_images {
            let label = ix
                .names_of(d)
                .into_iter()
                .next()
                .unwrap_or_else(|| d.to_string());
            ix.refs.retain(|_, m| m != d);
            ix.images.remove(d);
            let _ = fs::remove_file(self.root().join("lru").join(d.hex()));
            report.images_removed.push(label);
        }
        // Index first: a crash before the deletions leaves orphans (found
        // and removed by the next verify or GC), never an index entry for
        // something that is gone.
        self.write_index(&lock, &ix)?;
        for f in delete_files {
            fs::remove_file(&f).map_err(io("remove", &f))?;
        }
        drop(lock);
        self.delete_layers(delete_dirs);
        Ok(report)
    }

    /// A blob file's problem, if it has one.
    fn check_blob(&self, ix: &Index, name: &str) -> Result<Option<Problem>, StoreError> {
        let path = self.root().join("blobs/sha256").join(name);
        let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else {
            return Ok(fs::symlink_metadata(&path)
                .is_ok()
                .then(|| problem(ProblemKind::StrayBlob, name.to_string())));
        };
        let mut f = match fs::File::open(&path) {
            Ok(f) => f,
            // Removed meanwhile (GC): nothing to report.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("open", &path)(e)),
        };
        let mut v = digest.verifier();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(io("read", &path))?;
            if n == 0 {
                break;
            }
            v.update(&buf[..n]);
        }
        Ok(match v.finish() {
            Ok(_) => None,
            Err(actual) => Some(Problem {
                kind: ProblemKind::BlobCorrupt,
                object: digest.to_string(),
                detail: vec![format!("contents hash to {actual}")],
                images: images_with_blob(ix, &digest),
                repaired: false,
                not_repaired: None,
            }),
        })
    }

    /// An indexed layer's problem, if it has one.
    fn check_layer(&self, ix: &Index, diff_id: &Digest) -> Result<Option<Problem>, StoreError> {
        if !ix.layers.contains_key(diff_id) {
            return Ok(None);
        }
        let images: Vec<String> = ix
            .images
            .values()
            .filter(|i| i.layers.iter().any(|l| &l.diff_id == diff_id))
            .map(|i| label(ix, &i.manifest))
            .collect();
        let found = |kind, detail| {
            Some(Problem {
                kind,
                object: diff_id.to_string(),
                detail,
                images: images.clone(),
                repaired: false,
                not_repaired: None,
            })
        };
        let dir = self.layer_dir(diff_id);
        if !dir.is_dir() {
            return Ok(found(ProblemKind::LayerMissing, Vec::new()));
        }
        let record = match TreeRecord::read(&self.tree_path(diff_id)) {
            Ok(r) => r,
            Err(RecordError::Missing) => return Ok(found(ProblemKind::RecordMissing, Vec::new())),
            Err(e @ RecordError::Torn(_)) => {
                return Ok(found(ProblemKind::RecordTorn, vec![e.to_string()]));
            }
            Err(RecordError::Io(e)) => return Err(io("read", &self.tree_path(diff_id))(e)),
        };
        let actual = match crate::tree::scan(&dir) {
            Ok(t) => t,
            Err(e) => {
                return Ok(found(
                    ProblemKind::LayerModified,
                    vec![format!("reading the layer: {e}")],
                ));
            }
        };
        let diff = record.diff(&actual, DIFF_LINES);
        Ok((!diff.is_empty())
            .then(|| found(ProblemKind::LayerModified, diff))
            .flatten())
    }
}

fn problem(kind: ProblemKind, object: String) -> Problem {
    Problem {
        kind,
        object,
        detail: Vec::new(),
        images: Vec::new(),
        repaired: false,
        not_repaired: None,
    }
}

/// Whether a `layers/` or `trees/` entry name is a layer the index knows.
fn in_index(ix: &Index, name: &str) -> bool {
    format!("sha256:{name}")
        .parse::<Digest>()
        .is_ok_and(|d| ix.layers.contains_key(&d))
}

/// Every blob an image in the index needs.
fn image_blobs(ix: &Index) -> BTreeSet<Digest> {
    let mut out = BTreeSet::new();
    for i in ix.images.values() {
        out.insert(i.manifest.clone());
        out.insert(i.config.clone());
        if let Some(x) = &i.index {
            out.insert(x.clone());
        }
    }
    out
}

fn image_digests_with_blob(ix: &Index, blob: &Digest) -> Vec<Digest> {
    ix.images
        .values()
        .filter(|i| &i.manifest == blob || &i.config == blob || i.index.as_ref() == Some(blob))
        .map(|i| i.manifest.clone())
        .collect()
}

fn images_with_blob(ix: &Index, blob: &Digest) -> Vec<String> {
    image_digests_with_blob(ix, blob)
        .iter()
        .map(|d| label(ix, d))
        .collect()
}

fn label(ix: &Index, manifest: &Digest) -> String {
    ix.names_of(manifest)
        .into_iter()
        .next()
        .unwrap_or_else(|| manifest.to_string())
}
