//! Import: an image built on this machine goes into the store without a
//! registry round trip (`ember image import`).
//!
//! Three inputs, told apart by their contents:
//!
//! * an OCI image layout directory (`oci-layout`, `index.json`, `blobs/`);
//! * an OCI archive: a tar of such a layout (`podman save --format
//!   oci-archive`, `buildah push oci-archive:`, Docker 25+ `docker save`);
//! * a docker-archive (`podman save --format docker-archive`, older
//!   `docker save`): `manifest.json` naming a config file and layer tars.
//!
//! Archives are read in place: one pass over the tar headers records where
//! each member's bytes are, and blobs are then read straight from those
//! offsets (nothing is copied out first). Compressed archives (`docker save
//! | gzip`) are refused with a message saying so.
//!
//! Verification is a pull's: every blob a manifest or index names is
//! checked against its digest and size, the config's diff_ids against the
//! decompressed layers, and layers go through the same extraction
//! (`pull::extract`, hence the same hostile-tar rules of `unpack`) and the
//! same commit (`pull::commit_image`). Nothing reaches `layers/`, `blobs/`
//! or the index until everything is verified, so a failed import leaves the
//! store as it was.
//!
//! A docker-archive has no manifest: its layers are named by their diff_ids
//! only. The import builds an OCI manifest for it: an uncompressed layer is
//! described as `application/vnd.oci.image.layer.v1.tar` with its diff_id as
//! its digest (no recompression, so the import costs one read of each layer
//! and the result is the same bytes every time); a compressed one (rare in
//! docker-archives) keeps its compression and is hashed first. The config
//! is kept byte for byte, so the image id (the config digest) is the one
//! podman and Docker show.

use crate::index::{ImageRecord, LayerRef};
use crate::pull::{self, DiffCheck, Extracted, FetchedLayer, PullProgress, TmpGuard};
use crate::unpack::UnpackError;
use crate::{Store, StoreError, now_ms};
use ember_oci::media::{self, Compression, ManifestKind};
use ember_oci::{Digest, Platform, Reference};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Manifests, indexes, configs and `manifest.json` are small JSON
/// documents; a hostile archive must not make us buffer GiBs.
const MAX_DOC_BYTES: u64 = 8 << 20;
/// Layers extracted at once (a 2-core node gains nothing from more).
const PARALLEL_LAYERS: usize = 2;
/// The annotation containerd and Docker put the full image name in.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation for a layout entry's name (a full reference from
/// podman and buildah, a bare tag from skopeo).
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What was imported from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImportFormat {
    /// An OCI image layout directory.
    OciLayout,
    /// A tar of an OCI image layout.
    OciArchive,
    /// A `docker save` / `podman save --format docker-archive` tar.
    DockerArchive,
}

impl std::fmt::Display for ImportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImportFormat::OciLayout => "oci-layout",
            ImportFormat::OciArchive => "oci-archive",
            ImportFormat::DockerArchive => "docker-archive",
        })
    }
}

/// Why an import failed. The store is unchanged whenever one is returned.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Reading the input failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not an OCI layout, an OCI archive or a docker-archive.
    #[error("{0}")]
    Format(String),
    /// The archive's tar structure is broken (cut short, corrupt headers).
    #[error("reading the archive: {0}")]
    Archive(String),
    /// A blob or file the documents name is not in the input.
    #[error("{what} is missing from the input")]
    Missing {
        /// What is missing (a blob digest or a file name).
        what: String,
    },
    /// A blob's bytes do not hash to the digest that names it.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The blob.
        what: String,
        /// The digest its descriptor or name gives.
        expected: Digest,
        /// What its bytes hash to.
        actual: Digest,
    },
    /// A blob's size differs from its descriptor.
    #[error("{what}: expected {expected} bytes, found {actual}")]
    SizeMismatch {
        /// The blob.
        what: String,
        /// The descriptor's size.
        expected: u64,
        /// The input's size.
        actual: u64,
    },
    /// A layer's decompressed content does not match the config's diff_id.
    #[error("layer {digest}: uncompressed content does not match diff_id {diff_id} (got {actual})")]
    DiffIdMismatch {
        /// The layer blob.
        digest: Digest,
        /// The config's diff_id.
        diff_id: Digest,
        /// What the content hashes to.
        actual: Digest,
    },
    /// A layer could not be decompressed to its end.
    #[error("layer {digest}: {compression} stream: {detail}; content not verified")]
    Decompress {
        /// The layer blob.
        digest: Digest,
        /// `tar`, `gzip` or `zstd`.
        compression: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// A layer's tar is hostile or corrupt (the pull's rules).
    #[error("layer {digest}")]
    Unpack {
        /// The layer blob.
        digest: Digest,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// A document that Ember cannot use.
    #[error("{0}")]
    BadImage(String),
    /// The input holds several images and nothing says which one.
    #[error(
        "the input holds {count} images ({names}); pass --name with one of these names to pick it"
    )]
    Ambiguous {
        /// How many.
        count: usize,
        /// Their names or digests.
        names: String,
    },
    /// Nothing names the image.
    #[error("{0}; pass --name REF")]
    NoName(String),
    /// The image is for another platform.
    #[error("the image is for {found}, not {wanted}")]
    Platform {
        /// What the image's config says.
        found: String,
        /// What was asked for.
        wanted: String,
    },
    /// Committing to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImportError {
    let path = path.into();
    move |source| ImportError::Io { op, path, source }
}

/// Import settings.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Store the image under this name only, instead of the names the
    /// input records; also picks one image out of several.
    pub name: Option<String>,
    /// The platform to pick from an index, and that a single image must be.
    pub platform: Platform,
    /// `syncfs` before commit (see [`crate::PullOptions::durable`]).
    pub durable: bool,
    /// Record each layer's tree for `ember store verify`.
    pub record_trees: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            name: None,
            platform: Platform::host(),
            durable: false,
            record_trees: true,
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// What the input was.
    pub format: ImportFormat,
    /// The names the image went into the index under.
    pub names: Vec<String>,
    /// Manifest digest.
    pub manifest: Digest,
    /// Config digest (the image id podman and Docker show).
    pub config: Digest,
    /// Layers in the image.
    pub layers: usize,
    /// Layers unpacked now.
    pub layers_imported: usize,
    /// Layers the store already had.
    pub layers_present: usize,
    /// Layer bytes read from the input.
    pub bytes_read: u64,
    /// Whole import, milliseconds.
    pub total_ms: f64,
    /// The image as recorded in the store.
    #[serde(skip)]
    pub image: ImageRecord,
}

/// Where a member's bytes are inside an uncompressed tar.
#[derive(Debug, Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
}

/// An opened input: a directory, or a tar read in place.
#[derive(Debug)]
enum Container {
    Dir(PathBuf),
    Tar {
        file: PathBuf,
        members: HashMap<String, Member>,
    },
}

/// An import input, opened and recognised; also the source of the layer
/// blobs for a later push (the store keeps layers unpacked only).
#[derive(Debug)]
pub struct ImportSource {
    path: PathBuf,
    container: Container,
    format: ImportFormat,
}

/// A path inside the input as the documents name it, normalised
/// (`./a//b` → `a/b`); `None` if it is absolute or climbs out (`..`).
fn clean_name(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Resolves a symlink member's target relative to its directory, inside
/// the archive; `None` if it climbs out.
fn resolve_link(link: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Records where every regular member of the tar at `path` is. Symlinks
/// (the legacy docker-archive's `<id>/layer.tar -> ../<diff>.tar`) resolve
/// to the member they point at, within the archive.
fn index_tar(path: &Path) -> Result<HashMap<String, Member>, ImportError> {
    let file = File::open(path).map_err(io("open", path))?;
    let len = file.metadata().map_err(io("stat", path))?.len();
    let mut ar = tar::Archive::new(file);
    let mut members = HashMap::new();
    let mut links = Vec::new();
    let entries = ar
        .entries_with_seek()
        .map_err(|e| ImportError::Archive(e.to_string()))?;
    for e in entries {
        let e = e.map_err(|e| ImportError::Archive(e.to_string()))?;
        let raw = e
            .path()
            .map_err(|e| ImportError::Archive(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        // A member whose name climbs out can never be what a document
        // names (names are cleaned the same way): leave it out.
        let Some(name) = clean_name(&raw) else {
            continue;
        };
        match e.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let m = Member {
                    offset: e.raw_file_position(),
                    size: e.size(),
                };
                if m.offset.saturating_add(m.size) > len {
                    return Err(ImportError::Archive(format!(
                        "{name} ends at byte {} but the archive has {len}: cut short",
                        m.offset.saturating_add(m.size)
                    )));
                }
                members.insert(name, m);
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                if let Ok(Some(t)) = e.link_name() {
                    let t = t.to_string_lossy().into_owned();
                    // A hard link's target is archive-rooted; a symlink's is
                    // relative to its directory.
                    let target = if e.header().entry_type() == tar::EntryType::Link {
                        clean_name(&t)
                    } else {
                        resolve_link(&name, &t)
                    };
                    if let Some(t) = target {
                        links.push((name, t));
                    }
                }
            }
            _ => {}
        }
    }
    // Chains of links resolve in a few rounds; loops never do.
    for _ in 0..8 {
        let mut progress = false;
        links.retain(|(name, target)| match members.get(target).copied() {
            Some(m) => {
                members.insert(name.clone(), m);
                progress = true;
                false
            }
            None => true,
        });
        if !progress {
            break;
        }
    }
    Ok(members)
}

impl ImportSource {
    /// Opens `path` and tells which of the three inputs it is.
    pub fn open(path: &Path) -> Result<ImportSource, ImportError> {
        let meta = std::fs::metadata(path).map_err(io("stat", path))?;
        let (container, archive) = if meta.is_dir() {
            (Container::Dir(path.to_path_buf()), false)
        } else {
            let mut head = [0u8; 4];
            let mut f = File::open(path).map_err(io("open", path))?;
            let n = f.read(&mut head).map_err(io("read", path))?;
            if n >= 2 && head[..2] == [0x1f, 0x8b] || n >= 4 && head == [0x28, 0xb5, 0x2f, 0xfd] {
                return Err(ImportError::Format(format!(
                    "{} is compressed; decompress it first (gunzip / unzstd): \
                     archives are read in place",
                    path.display()
                )));
            }
            let members = index_tar(path)?;
            (
                Container::Tar {
                    file: path.to_path_buf(),
                    members,
                },
                true,
            )
        };
        let mut src = ImportSource {
            path: path.to_path_buf(),
            container,
            format: ImportFormat::OciLayout,
        };
        // Docker 25+ writes both an OCI layout and manifest.json; the
        // layout is the richer description (real manifests), so it wins.
        src.format = if src.has("oci-layout") && src.has("index.json") {
            if archive {
                ImportFormat::OciArchive
            } else {
                ImportFormat::OciLayout
            }
        } else if archive && src.has("manifest.json") {
            ImportFormat::DockerArchive
        } else {
            return Err(ImportError::Format(format!(
                "{} is neither an OCI image layout (oci-layout, index.json), an OCI \
                 archive nor a docker-archive (manifest.json)",
                path.display()
            )));
        };
        Ok(src)
    }

    /// Which input this is.
    pub fn format(&self) -> ImportFormat {
        self.format
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn has(&self, name: &str) -> bool {
        match &self.container {
            Container::Dir(d) => d.join(name).is_file(),
            Container::Tar { members, .. } => members.contains_key(name),
        }
    }

    /// Opens a member by the name a document gives it, with its size.
    fn open_member(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64), ImportError> {
        let missing = || ImportError::Missing {
            what: format!("file {name:?}"),
        };
        let clean = clean_name(name).ok_or_else(missing)?;
        match &self.container {
            Container::Dir(d) => {
                let p = d.join(&clean);
                let f = match File::open(&p) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
                    Err(e) => return Err(io("open", p)(e)),
                };
                let m = f.metadata().map_err(io("stat", &p))?;
                if !m.is_file() {
                    return Err(missing());
                }
                Ok((Box::new(f), m.len()))
            }
            Container::Tar { file, members } => {
                let m = *members.get(&clean).ok_or_else(missing)?;
                let mut f = File::open(file).map_err(io("open", file))?;
                f.seek(SeekFrom::Start(m.offset))
                    .map_err(io("seek", file))?;
                Ok((Box::new(f.take(m.size)), m.size))
            }
        }
    }

    /// Reads a small member whole.
    fn read_doc(&self, name: &str) -> Result<Vec<u8>, ImportError> {
        let (mut r, size) = self.open_member(name)?;
        if size > MAX_DOC_BYTES {
            return Err(ImportError::BadImage(format!(
                "{name} is {size} bytes, more than a document may be"
            )));
        }
        let mut b = Vec::with_capacity(size as usize);
        r.read_to_end(&mut b)
            .map_err(io("read", self.path.join(name)))?;
        Ok(b)
    }

    fn blob_name(d: &Digest) -> String {
        format!("blobs/{}/{}", d.algorithm(), d.hex())
    }

    /// Reads a small blob of an OCI layout and checks its digest and size.
    fn read_blob(&self, what: &str, d: &Digest, size: u64) -> Result<Vec<u8>, ImportError> {
        let name = Self::blob_name(d);
        if !self.has(&name) {
            return Err(ImportError::Missing {
                what: format!("{what} {d}"),
            });
        }
        let b = self.read_doc(&name)?;
        check_bytes(&format!("{what} {d}"), d, size, &b)?;
        Ok(b)
    }

    /// Opens the blob of an imported layer, by its digest, with its size:
    /// what a push sends (see [`ImportPlan::layer_blob`]).
    fn open_layer(&self, l: &PlannedLayer) -> Result<(Box<dyn Read + Send>, u64), ImportError> {
        self.open_member(&l.member)
    }
}

fn check_bytes(what: &str, d: &Digest, size: u64, b: &[u8]) -> Result<(), ImportError> {
    let mut v = d.verifier();
    v.update(b);
    v.finish().map_err(|actual| ImportError::DigestMismatch {
        what: what.to_string(),
        expected: d.clone(),
        actual,
    })?;
    if b.len() as u64 != size {
        return Err(ImportError::SizeMismatch {
            what: what.to_string(),
            expected: size,
            actual: b.len() as u64,
        });
    }
    Ok(())
}

/// A descriptor with the annotations an OCI layout's `index.json` names
/// images by.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutDescriptor {
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default)]
    platform: Option<ember_oci::manifest::DescriptorPlatform>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct LayoutIndex {
    manifests: Vec<LayoutDescriptor>,
}

/// One entry of a docker-archive's `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The OCI manifest built for a docker-archive image.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BuiltManifest<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: BuiltDescriptor,
    layers: Vec<BuiltDescriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BuiltDescriptor {
    media_type: String,
    digest: Digest,
    size: u64,
}

/// The parts of a config that say which platform it is for.
#[derive(Debug, Deserialize)]
struct ConfigPlatform {
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    variant: Option<String>,
}

/// One layer to import: its descriptor and where its blob is.
#[derive(Debug, Clone)]
struct PlannedLayer {
    layer: LayerRef,
    member: String,
    compression: Compression,
}

/// An image read and checked from the input, before its layers are
/// unpacked: every document verified, the names chosen.
#[derive(Debug)]
pub struct ImportPlan {
    source: ImportSource,
    names: Vec<String>,
    index: Option<(Digest, Vec<u8>)>,
    manifest: (Digest, Vec<u8>),
    media_type: String,
    config: (Digest, Vec<u8>),
    platform: String,
    layers: Vec<PlannedLayer>,
}

/// A name as the store's index keys it (`localhost/app:v1` →
/// `localhost/app:v1`, `app` → `docker.io/library/app:latest`).
fn normalize(name: &str) -> Result<String, ImportError> {
    let r: Reference = name
        .parse()
        .map_err(|e| ImportError::BadImage(format!("image name {name:?}: {e}")))?;
    if r.digest().is_some() {
        return Err(ImportError::BadImage(format!(
            "image name {name:?}: a digest cannot name an imported image; use name:tag"
        )));
    }
    Ok(r.to_string())
}

/// Picks one of `candidates` (each with its recorded names): the only one,
/// or the one `wanted` names.
fn choose<'a, T>(
    candidates: &'a [(T, Vec<String>, String)],
    wanted: Option<&str>,
) -> Result<&'a (T, Vec<String>, String), ImportError> {
    match candidates {
        [] => Err(ImportError::BadImage("the input holds no image".into())),
        [one] => Ok(one),
        many => {
            if let Some(w) = wanted {
                let w = normalize(w)?;
                let hits: Vec<_> = many.iter().filter(|c| c.1.contains(&w)).collect();
                if let [one] = hits[..] {
                    return Ok(one);
                }
            }
            Err(ImportError::Ambiguous {
                count: many.len(),
                names: many
                    .iter()
                    .map(|c| {
                        if c.1.is_empty() {
                            c.2.clone()
                        } else {
                            c.1.join(" ")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }
}

impl ImportPlan {
    /// Reads and verifies `source`'s documents and picks the image and its
    /// names; layers are checked later, as they are unpacked.
    pub fn read(source: ImportSource, opts: &ImportOptions) -> Result<ImportPlan, ImportError> {
        match source.format {
            ImportFormat::OciLayout | ImportFormat::OciArchive => Self::read_layout(source, opts),
            ImportFormat::DockerArchive => Self::read_docker(source, opts),
        }
    }

    fn read_layout(source: ImportSource, opts: &ImportOptions) -> Result<ImportPlan, ImportError> {
        let top: LayoutIndex = serde_json::from_slice(&source.read_doc("index.json")?)
            .map_err(|e| ImportError::BadImage(format!("index.json: {e}")))?;
        let mut candidates = Vec::new();
        for d in top.manifests {
            if media::manifest_kind(&d.media_type).is_none() {
                continue; // signatures, attestations, artifacts
            }
            // Another platform's entry of a multi-platform layout.
            if let Some(p) = &d.platform
                && !opts
                    .platform
                    .matches(&p.os, &p.architecture, p.variant.as_deref())
            {
                continue;
            }
            // containerd's name is always a full reference; the OCI
            // annotation is one from podman and buildah, a bare tag from
            // skopeo (which names nothing on its own).
            let recorded = d
                .annotations
                .get(CONTAINERD_NAME)
                .or_else(|| d.annotations.get(OCI_REF_NAME))
                .cloned();
            let names = match &recorded {
                Some(n) if n.contains('/') || n.contains(':') => vec![normalize(n)?],
                _ => Vec::new(),
            };
            let label = match &recorded {
                Some(n) => format!("{n} ({})", d.digest),
                None => d.digest.to_string(),
            };
            candidates.push((d, names, label));
        }
        let (desc, recorded, label) = choose(&candidates, opts.name.as_deref())?;
        let names = match &opts.name {
            Some(n) => vec![normalize(n)?],
            None if recorded.is_empty() => {
                return Err(ImportError::NoName(format!(
                    "the layout does not record a full image name for {label}"
                )));
            }
            None => recorded.clone(),
        };
        let top_bytes = source.read_blob("manifest", &desc.digest, desc.size)?;
        let (index, manifest_digest, manifest_bytes, media_type) =
            match media::manifest_kind(&desc.media_type) {
                Some(ManifestKind::Index) => {
                    let doc: ember_oci::manifest::IndexDoc = serde_json::from_slice(&top_bytes)
                        .map_err(|e| {
                            ImportError::BadImage(format!("index {}: {e}", desc.digest))
                        })?;
                    let chosen = doc
                        .manifests
                        .iter()
                        .find(|m| {
                            m.platform.as_ref().is_some_and(|p| {
                                opts.platform
                                    .matches(&p.os, &p.architecture, p.variant.as_deref())
                            }) && media::manifest_kind(&m.media_type)
                                == Some(ManifestKind::Manifest)
                        })
                        .ok_or_else(|| ImportError::Platform {
                            found: doc
                                .manifests
                                .iter()
                                .filter_map(|m| m.platform.as_ref().map(|p| p.display()))
                                .collect::<Vec<_>>()
                                .join(", "),
                            wanted: opts.platform.to_string(),
                        })?;
                    let b = source.read_blob("manifest", &chosen.digest, chosen.size)?;
                    (
                        Some((desc.digest.clone(), top_bytes)),
                        chosen.digest.clone(),
                        b,
                        chosen.media_type.clone(),
                    )
                }
                _ => (
                    None,
                    desc.digest.clone(),
                    top_bytes,
                    desc.media_type.clone(),
                ),
            };
        let doc: ember_oci::manifest::ManifestDoc = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| ImportError::BadImage(format!("manifest {manifest_digest}: {e}")))?;
        let config = source.read_blob("config", &doc.config.digest, doc.config.size)?;
        let diff_ids = diff_ids(&doc.config.digest, &config)?;
        if diff_ids.len() != doc.layers.len() {
            return Err(ImportError::BadImage(format!(
                "manifest has {} layers but config lists {} diff_ids",
                doc.layers.len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        for (l, diff_id) in doc.layers.iter().zip(diff_ids) {
            let compression = media::layer_compression(&l.media_type).ok_or_else(|| {
                ImportError::BadImage(format!(
                    "layer {} has unsupported media type {}",
                    l.digest, l.media_type
                ))
            })?;
            let member = ImportSource::blob_name(&l.digest);
            if !source.has(&member) {
                return Err(ImportError::Missing {
                    what: format!("layer {}", l.digest),
                });
            }
            layers.push(PlannedLayer {
                layer: LayerRef {
                    digest: l.digest.clone(),
                    diff_id,
                    size: l.size,
                    media_type: l.media_type.clone(),
                },
                member,
                compression,
            });
        }
        let platform = config_platform(&config, opts)?;
        Ok(ImportPlan {
            source,
            names,
            index,
            manifest: (manifest_digest, manifest_bytes),
            media_type,
            config: (doc.config.digest, config),
            platform,
            layers,
        })
    }

    fn read_docker(source: ImportSource, opts: &ImportOptions) -> Result<ImportPlan, ImportError> {
        let entries: Vec<DockerEntry> = serde_json::from_slice(&source.read_doc("manifest.json")?)
            .map_err(|e| ImportError::BadImage(format!("manifest.json: {e}")))?;
        let mut candidates = Vec::new();
        for e in entries {
            let names = e
                .repo_tags
                .iter()
                .flatten()
                .map(|n| normalize(n))
                .collect::<Result<Vec<_>, _>>()?;
            let label = e.config.clone();
            candidates.push((e, names, label));
        }
        let (entry, recorded, label) = choose(&candidates, opts.name.as_deref())?;
        // Every RepoTag names this one image: all of them go in.
        let names = match &opts.name {
            Some(n) => vec![normalize(n)?],
            None if recorded.is_empty() => {
                return Err(ImportError::NoName(format!(
                    "the archive records no RepoTags for {label}"
                )));
            }
            None => recorded.clone(),
        };
        let config = source.read_doc(&entry.config)?;
        let config_digest = Digest::sha256_of(&config);
        // The config is named by its digest (`<hex>.json`, or
        // `blobs/sha256/<hex>` from Docker 25+): hold it to that name.
        let stem = entry
            .config
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .trim_end_matches(".json");
        if stem.len() == 64
            && stem.bytes().all(|b| b.is_ascii_hexdigit())
            && stem != config_digest.hex()
        {
            let named: Digest = format!("sha256:{stem}")
                .parse()
                .map_err(|e| ImportError::BadImage(format!("config {}: {e}", entry.config)))?;
            return Err(ImportError::DigestMismatch {
                what: format!("config {}", entry.config),
                expected: named,
                actual: config_digest,
            });
        }
        let diff_ids = diff_ids(&config_digest, &config)?;
        if diff_ids.len() != entry.layers.len() {
            return Err(ImportError::BadImage(format!(
                "manifest.json lists {} layers but the config lists {} diff_ids",
                entry.layers.len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        for (member, diff_id) in entry.layers.iter().zip(diff_ids) {
            let (mut r, size) = source.open_member(member)?;
            let mut head = [0u8; 4];
            let n = read_up_to(&mut r, &mut head).map_err(io("read", source.path.join(member)))?;
            let compression = if n >= 2 && head[..2] == [0x1f, 0x8b] {
                Compression::Gzip
            } else if n == 4 && head == [0x28, 0xb5, 0x2f, 0xfd] {
                Compression::Zstd
            } else {
                Compression::None
            };
            let (digest, media_type) = match compression {
                // Uncompressed: the blob is the diff, so its digest is the
                // diff_id, checked as the layer is unpacked.
                Compression::None => (diff_id.clone(), "application/vnd.oci.image.layer.v1.tar"),
                Compression::Gzip | Compression::Zstd => {
                    let (mut r, _) = source.open_member(member)?;
                    let mut v = Digest::sha256_of(b"").verifier();
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        let n = r
                            .read(&mut buf)
                            .map_err(io("read", source.path.join(member)))?;
                        if n == 0 {
                            break;
                        }
                        v.update(&buf[..n]);
                    }
                    let d = match v.finish() {
                        Ok(d) | Err(d) => d,
                    };
                    let t = if compression == Compression::Gzip {
                        "application/vnd.oci.image.layer.v1.tar+gzip"
                    } else {
                        "application/vnd.oci.image.layer.v1.tar+zstd"
                    };
                    (d, t)
                }
            };
            layers.push(PlannedLayer {
                layer: LayerRef {
                    digest,
                    diff_id,
                    size,
                    media_type: media_type.to_string(),
                },
                member: member.clone(),
                compression,
            });
        }
        let manifest = serde_json::to_vec(&BuiltManifest {
            schema_version: 2,
            media_type: media::OCI_MANIFEST,
            config: BuiltDescriptor {
                media_type: media::OCI_CONFIG.to_string(),
                digest: config_digest.clone(),
                size: config.len() as u64,
            },
            layers: layers
                .iter()
                .map(|l| BuiltDescriptor {
                    media_type: l.layer.media_type.clone(),
                    digest: l.layer.digest.clone(),
                    size: l.layer.size,
                })
                .collect(),
        })
        .map_err(|e| ImportError::BadImage(format!("building the manifest: {e}")))?;
        let platform = config_platform(&config, opts)?;
        Ok(ImportPlan {
            source,
            names,
            index: None,
            manifest: (Digest::sha256_of(&manifest), manifest),
            media_type: media::OCI_MANIFEST.to_string(),
            config: (config_digest, config),
            platform,
            layers,
        })
    }

    /// What the input was.
    pub fn format(&self) -> ImportFormat {
        self.source.format
    }

    /// The names the image goes into the index under.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The manifest's digest, media type and bytes (what a push sends last).
    pub fn manifest(&self) -> (&Digest, &str, &[u8]) {
        (&self.manifest.0, &self.media_type, &self.manifest.1)
    }

    /// The config's digest and bytes.
    pub fn config(&self) -> (&Digest, &[u8]) {
        (&self.config.0, &self.config.1)
    }

    /// The layers' descriptors, base first.
    pub fn layers(&self) -> Vec<LayerRef> {
        self.layers.iter().map(|l| l.layer.clone()).collect()
    }

    /// Opens the `i`-th layer's blob in the input (for a push): its bytes
    /// are what the manifest's descriptor names.
    pub fn layer_blob(&self, i: usize) -> Result<(Box<dyn Read + Send>, u64), ImportError> {
        let l = self.layers.get(i).ok_or_else(|| ImportError::Missing {
            what: format!("layer {i}"),
        })?;
        self.source.open_layer(l)
    }
}

/// Reads until `buf` is full or the stream ends.
fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn diff_ids(digest: &Digest, config: &[u8]) -> Result<Vec<Digest>, ImportError> {
    let c: ember_oci::manifest::ConfigDoc = serde_json::from_slice(config)
        .map_err(|e| ImportError::BadImage(format!("config {digest}: {e}")))?;
    Ok(c.rootfs.diff_ids)
}

/// The config's platform, which must be the one asked for (an image for
/// another architecture would only fail later, at its first run).
fn config_platform(config: &[u8], opts: &ImportOptions) -> Result<String, ImportError> {
    let c: ConfigPlatform = serde_json::from_slice(config)
        .map_err(|e| ImportError::BadImage(format!("config: {e}")))?;
    match (c.os, c.architecture) {
        (Some(os), Some(arch)) => {
            if !opts.platform.matches(&os, &arch, c.variant.as_deref()) {
                let found = match &c.variant {
                    Some(v) => format!("{os}/{arch}/{v}"),
                    None => format!("{os}/{arch}"),
                };
                return Err(ImportError::Platform {
                    found,
                    wanted: opts.platform.to_string(),
                });
            }
            Ok(opts.platform.to_string())
        }
        _ => Ok(opts.platform.to_string()),
    }
}

/// Counts bytes read for progress reports.
struct Counting<'a, R> {
    inner: R,
    digest: &'a Digest,
    progress: &'a dyn PullProgress,
    cancel: &'a AtomicBool,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("cancelled"));
        }
        let n = self.inner.read(buf)?;
        self.progress.layer_bytes(self.digest, n as u64);
        Ok(n)
    }
}

/// Unpacks one layer into a temp dir and checks it as a pull does.
fn import_layer(
    store: &Store,
    plan: &ImportPlan,
    l: &PlannedLayer,
    opts: &ImportOptions,
    progress: &dyn PullProgress,
    cancel: &AtomicBool,
) -> Result<FetchedLayer, ImportError> {
    let layer = &l.layer;
    progress.layer_started(&layer.digest, layer.size);
    let (r, size) = plan.source.open_layer(l)?;
    if size != layer.size {
        return Err(ImportError::SizeMismatch {
            what: format!("layer {}", layer.digest),
            expected: layer.size,
            actual: size,
        });
    }
    let tmp = TmpGuard::new(store.tmp_path("layer"));
    std::fs::create_dir(tmp.path()).map_err(io("create", tmp.path()))?;
    let src = Counting {
        inner: r,
        digest: &layer.digest,
        progress,
        cancel,
    };
    let ex: Extracted = pull::extract(
        src,
        l.compression,
        layer.digest.clone(),
        layer.diff_id.clone(),
        tmp.path(),
        opts.record_trees,
    );
    // The same order of checks as a pull: the blob's digest first.
    match ex.compressed {
        Err(actual) => {
            return Err(ImportError::DigestMismatch {
                what: format!("layer {}", layer.digest),
                expected: layer.digest.clone(),
                actual,
            });
        }
        Ok(_) if ex.compressed_len != layer.size => {
            return Err(ImportError::SizeMismatch {
                what: format!("layer {}", layer.digest),
                expected: layer.size,
                actual: ex.compressed_len,
            });
        }
        Ok(_) => {}
    }
    let stats = ex.unpack.map_err(|source| ImportError::Unpack {
        digest: layer.digest.clone(),
        source,
    })?;
    match ex.diff_id {
        DiffCheck::Match => {}
        DiffCheck::Mismatch(actual) => {
            return Err(ImportError::DiffIdMismatch {
                digest: layer.digest.clone(),
                diff_id: layer.diff_id.clone(),
                actual,
            });
        }
        DiffCheck::Incomplete(detail) => {
            return Err(ImportError::Decompress {
                digest: layer.digest.clone(),
                compression: l.compression.name(),
                detail,
            });
        }
    }
    progress.layer_done(&layer.digest, false);
    Ok(FetchedLayer {
        diff_id: layer.diff_id.clone(),
        tmp,
        stats,
        compressed: ex.compressed_len,
        last_byte_at: Instant::now(),
    })
}

/// Imports the image `plan` describes into `store`: unpacks the layers the
/// store lacks (a few at a time), verifies each as a pull does, then
/// commits layers, blobs and names in one index update.
pub fn import(
    store: &Store,
    plan: &ImportPlan,
    opts: &ImportOptions,
    progress: &dyn PullProgress,
) -> Result<ImportReport, ImportError> {
    let t0 = Instant::now();
    progress.resolved(&plan.manifest.0, plan.layers.len());
    let known = store.read_index()?.layers;
    let mut todo = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut present = 0;
    for l in &plan.layers {
        if !seen.insert(l.layer.diff_id.clone()) {
            continue;
        }
        if known.contains_key(&l.layer.diff_id) && store.layer_dir(&l.layer.diff_id).is_dir() {
            present += 1;
            progress.layer_done(&l.layer.digest, true);
        } else {
            todo.push(l);
        }
    }
    let queue = Mutex::new(todo.into_iter());
    let done = Mutex::new(Vec::new());
    let first_err: Mutex<Option<ImportError>> = Mutex::new(None);
    let cancel = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL_LAYERS {
            s.spawn(|| {
                loop {
                    if cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let Some(l) = next else { return };
                    match import_layer(store, plan, l, opts, progress, &cancel) {
                        Ok(f) => done.lock().unwrap_or_else(|e| e.into_inner()).push(f),
                        Err(e) => {
                            let mut slot = first_err.lock().unwrap_or_else(|e| e.into_inner());
                            // The first failure is the story; the others
                            // are "cancelled".
                            if slot.is_none() {
                                *slot = Some(e);
                            }
                            cancel.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|e| e.into_inner()) {
        // Unpacked layers' temp dirs go with their guards.
        return Err(e);
    }
    let fetched = done.into_inner().unwrap_or_else(|e| e.into_inner());
    let bytes_read = fetched.iter().map(|f| f.compressed).sum();
    let layers_imported = fetched.len();
    let now = now_ms();
    let repository = plan
        .names
        .first()
        .and_then(|n| n.parse::<Reference>().ok())
        .map(|r| r.name())
        .unwrap_or_default();
    let record = ImageRecord {
        manifest: plan.manifest.0.clone(),
        media_type: plan.media_type.clone(),
        index: plan.index.as_ref().map(|(d, _)| d.clone()),
        repository,
        platform: plan.platform.clone(),
        config: plan.config.0.clone(),
        layers: plan.layers(),
        pulled_at: now / 1000,
        last_used_ms: now,
    };
    let mut blobs: Vec<(&Digest, &[u8])> = Vec::new();
    if let Some((d, b)) = &plan.index {
        blobs.push((d, b));
    }
    blobs.push((&plan.manifest.0, &plan.manifest.1));
    blobs.push((&plan.config.0, &plan.config.1));
    let label = plan.source.path.display().to_string();
    pull::commit_image(
        store,
        &label,
        fetched,
        &blobs,
        &record,
        &plan.names,
        opts.durable,
    )?;
    Ok(ImportReport {
        format: plan.source.format,
        names: plan.names.clone(),
        manifest: record.manifest.clone(),
        config: record.config.clone(),
        layers: record.layers.len(),
        layers_imported,
        layers_present: present,
        bytes_read,
        total_ms: ms(t0.elapsed()),
        image: record,
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_and_kept_inside() {
        assert_eq!(clean_name("./a//b").as_deref(), Some("a/b"));
        assert_eq!(clean_name("../x"), None);
        assert_eq!(clean_name("/etc/passwd"), None);
        assert_eq!(
            resolve_link("id/layer.tar", "../abc.tar").as_deref(),
            Some("abc.tar")
        );
        assert_eq!(resolve_link("layer.tar", "../../etc/passwd"), None);
        assert_eq!(resolve_link("a/l", "/abs"), None);
    }
}
