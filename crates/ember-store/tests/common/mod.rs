//! Helpers shared by the store's integration tests: hand-written tar
//! streams (including entries `tar::Builder` refuses to write), snapshots
//! of a store directory, and pushing hand-built images to a real registry.
//!
//! Each test binary uses a different subset, hence the `dead_code` allow.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ember_registry::{RegistryClient, RegistryOptions};
use ember_testkit::digest::sha256_digest;
use ember_testkit::fixtures::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Platform};
use ember_testkit::push::Pusher;
use sha2::{Digest as _, Sha256};

// ---------------------------------------------------------------------------
// Raw tar streams
// ---------------------------------------------------------------------------

/// Entry types, as the ustar `typeflag` byte.
pub const REGULAR: u8 = b'0';
pub const HARDLINK: u8 = b'1';
pub const SYMLINK: u8 = b'2';
pub const CHAR: u8 = b'3';
pub const BLOCK: u8 = b'4';
pub const DIRECTORY: u8 = b'5';

/// One ustar header, written field by field so any name (`..`, absolute,
/// empty whiteouts) goes in verbatim, with a correct checksum.
#[derive(Clone, Debug)]
pub struct Header {
    pub name: String,
    pub kind: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub link: String,
    pub dev: (u32, u32),
}

impl Header {
    pub fn new(name: &str, kind: u8) -> Header {
        Header {
            name: name.to_string(),
            kind,
            mode: if kind == DIRECTORY { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            size: 0,
            link: String::new(),
            dev: (0, 0),
        }
    }

    /// The 512-byte header block.
    pub fn encode(&self) -> [u8; 512] {
        fn octal(field: &mut [u8], value: u64) {
            // width-1 octal digits then NUL, as GNU tar and tar-rs write.
            let digits = field.len() - 1;
            let s = format!("{value:0digits$o}");
            assert!(
                s.len() == digits,
                "{value} does not fit a {digits}-digit field"
            );
            field[..digits].copy_from_slice(s.as_bytes());
            field[digits] = 0;
        }
        fn text(field: &mut [u8], value: &str) {
            assert!(
                value.len() <= field.len(),
                "{value:?} is too long for ustar"
            );
            field[..value.len()].copy_from_slice(value.as_bytes());
        }
        let mut h = [0u8; 512];
        text(&mut h[0..100], &self.name);
        octal(&mut h[100..108], u64::from(self.mode));
        octal(&mut h[108..116], self.uid);
        octal(&mut h[116..124], self.gid);
        octal(&mut h[124..136], self.size);
        octal(&mut h[136..148], 1_704_067_200);
        h[156] = self.kind;
        text(&mut h[157..257], &self.link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        text(&mut h[265..297], "root");
        text(&mut h[297..329], "root");
        octal(&mut h[329..337], u64::from(self.dev.0));
        octal(&mut h[337..345], u64::from(self.dev.1));
        // The checksum is computed with its own field as eight spaces.
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        h
    }
}

/// Builds a tar stream entry by entry.
#[derive(Default, Clone)]
pub struct RawTar {
    bytes: Vec<u8>,
}

impl RawTar {
    pub fn new() -> RawTar {
        RawTar::default()
    }

    /// Any header followed by `data` (padded to a block). `header.size` is
    /// set from `data`.
    pub fn entry(&mut self, mut header: Header, data: &[u8]) -> &mut Self {
        header.size = data.len() as u64;
        self.bytes.extend_from_slice(&header.encode());
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(Header::new(name, REGULAR), data)
    }

    pub fn file_mode(
        &mut self,
        name: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        data: &[u8],
    ) -> &mut Self {
        let mut h = Header::new(name, REGULAR);
        h.mode = mode;
        h.uid = uid;
        h.gid = gid;
        self.entry(h, data)
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(Header::new(name, DIRECTORY), b"")
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut h = Header::new(name, SYMLINK);
        h.mode = 0o777;
        h.link = target.to_string();
        self.entry(h, b"")
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut h = Header::new(name, HARDLINK);
        h.link = target.to_string();
        self.entry(h, b"")
    }

    pub fn device(&mut self, name: &str, kind: u8, major: u32, minor: u32) -> &mut Self {
        let mut h = Header::new(name, kind);
        h.dev = (major, minor);
        self.entry(h, b"")
    }

    /// The stream without the end-of-archive blocks.
    pub fn unterminated(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// The stream with the two zero blocks that end an archive.
    pub fn finish(&self) -> Vec<u8> {
        let mut out = self.bytes.clone();
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

/// gzip of `bytes` (what a registry stores for a `tar+gzip` layer).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

// ---------------------------------------------------------------------------
// Directory snapshots
// ---------------------------------------------------------------------------

/// Everything under `root` except `tmp/` and the `lock` file, as relative
/// path → description (type, mode, owner, and for files size and sha256,
/// for symlinks the target, for devices the rdev). Two equal snapshots mean
/// the store's blobs, layers and index are byte-for-byte what they were.
pub fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for e in rd {
            let e = e.expect("directory entry");
            let child = rel.join(e.file_name());
            if rel.as_os_str().is_empty() && (e.file_name() == "tmp" || e.file_name() == "lock") {
                continue;
            }
            let path = e.path();
            let m = fs::symlink_metadata(&path).expect("lstat");
            let ft = m.file_type();
            let common = format!(
                "mode={:o} uid={} gid={}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            );
            let desc = if ft.is_dir() {
                stack.push(child.clone());
                format!("dir {common}")
            } else if ft.is_file() {
                format!(
                    "file {common} size={} sha256={}",
                    m.len(),
                    file_sha256(&path)
                )
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).expect("readlink");
                format!("symlink -> {}", target.display())
            } else if ft.is_char_device() || ft.is_block_device() {
                format!("device {common} rdev={}", m.rdev())
            } else {
                format!("other {common}")
            };
            out.insert(child.display().to_string(), desc);
        }
    }
    out
}

/// Hex sha256 of a file's content.
pub fn file_sha256(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("reading file");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Names in a directory, sorted; empty if it does not exist.
/// The work in `<root>/tmp/`: its entries but the `<owner>-lock` files
/// every open store holds there (see `ember_store`'s tmp module).
pub fn tmp_work(root: &Path) -> Vec<String> {
    names(&root.join("tmp"))
        .into_iter()
        .filter(|n| !n.ends_with("-lock"))
        .collect()
}

pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                e.expect("directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Fails with a readable diff when two snapshots differ.
pub fn assert_same_snapshot(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
    if before == after {
        return;
    }
    let mut diff = String::new();
    for (k, v) in before {
        match after.get(k) {
            None => diff.push_str(&format!("  removed {k}: {v}\n")),
            Some(w) if w != v => diff.push_str(&format!("  changed {k}: {v} -> {w}\n")),
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            diff.push_str(&format!("  added   {k}: {v}\n"));
        }
    }
    panic!("store changed:\n{diff}");
}

// ---------------------------------------------------------------------------
// Registries and images
// ---------------------------------------------------------------------------

/// A registry client with short retry delays, so fault tests stay quick.
pub fn client(mirrors: Vec<String>) -> Arc<RegistryClient> {
    Arc::new(
        RegistryClient::new(RegistryOptions {
            mirrors,
            retry_delay: Duration::from_millis(10),
            ..Default::default()
        })
        .expect("registry client"),
    )
}

/// A blob's data file inside a distribution registry's filesystem storage.
pub fn registry_blob_path(storage: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// What [`push_image`] pushed.
#[derive(Debug, Clone)]
pub struct PushedImage {
    pub manifest: String,
    pub config: String,
    /// Compressed layer digests.
    pub layers: Vec<String>,
    /// Uncompressed digests of the layer tars (what the config should say).
    pub diff_ids: Vec<String>,
}

/// Pushes an OCI image made of `layer_tars` (gzip-compressed here) as
/// `repo:tag`. The config lists `diff_ids` if given (to forge a mismatch),
/// else the true uncompressed digests.
pub async fn push_image(
    registry_url: &str,
    repo: &str,
    tag: &str,
    layer_tars: &[Vec<u8>],
    diff_ids: Option<Vec<String>>,
) -> anyhow::Result<PushedImage> {
    let true_diff_ids: Vec<String> = layer_tars.iter().map(|t| sha256_digest(t)).collect();
    let layers: Vec<RawLayer> = layer_tars
        .iter()
        .map(|t| RawLayer {
            blob: gzip(t),
            media_type: OCI_LAYER_GZIP,
        })
        .collect();
    let listed = diff_ids.unwrap_or_else(|| true_diff_ids.clone());
    let mut pushed = push_raw_image(registry_url, repo, tag, &layers, listed).await?;
    pushed.diff_ids = true_diff_ids;
    Ok(pushed)
}

/// Layer digests and diff_ids of a fixture's root manifest.
pub fn fixture_layers(fixture: &ember_testkit::fixtures::Fixture) -> (Vec<String>, Vec<String>) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&fixture.read_blob(&fixture.root.digest).expect("manifest"))
            .expect("manifest JSON");
    let layers = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect();
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    let config: serde_json::Value =
        serde_json::from_slice(&fixture.read_blob(config_digest).expect("config"))
            .expect("config JSON");
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|d| d.as_str().expect("diff_id").to_string())
        .collect();
    (layers, diff_ids)
}

/// A store at `<parent>/store`, so a test can check that nothing was
/// written beside it.
pub struct StoreDir {
    pub parent: tempfile::TempDir,
    pub store: ember_store::Store,
}

impl StoreDir {
    pub fn new() -> StoreDir {
        let parent = tempfile::Builder::new()
            .prefix("ember-store-test-")
            .tempdir()
            .expect("tempdir");
        let store = ember_store::Store::open(parent.path().join("store")).expect("open store");
        StoreDir { parent, store }
    }

    pub fn root(&self) -> &Path {
        self.store.root()
    }

    pub fn snapshot(&self) -> BTreeMap<String, String> {
        snapshot(self.root())
    }

    pub fn tmp_entries(&self) -> Vec<String> {
        tmp_work(self.root())
    }

    /// After a failed operation: the store is exactly `before`, nothing is
    /// left in `tmp/`, and nothing was written beside the store.
    pub fn assert_untouched(&self, before: &BTreeMap<String, String>) {
        assert_eq!(
            self.tmp_entries(),
            Vec::<String>::new(),
            "tmp/ is not empty"
        );
        assert_same_snapshot(before, &self.snapshot());
        assert_eq!(names(self.parent.path()), vec!["store".to_string()]);
    }
}

/// One layer blob as the registry will serve it: bytes (compressed or
/// not, possibly broken on purpose) and its media type.
pub struct RawLayer {
    pub blob: Vec<u8>,
    pub media_type: &'static str,
}

/// Pushes an OCI image whose layer blobs are exactly `layers` (no client
/// in between that would refuse a broken stream) and whose config lists
/// `diff_ids` verbatim. Returns the compressed layer digests in `layers`.
pub async fn push_raw_image(
    registry_url: &str,
    repo: &str,
    tag: &str,
    layers: &[RawLayer],
    diff_ids: Vec<String>,
) -> anyhow::Result<PushedImage> {
    let pusher = Pusher::new(registry_url)?;
    let mut descs = Vec::new();
    for l in layers {
        let digest = sha256_digest(&l.blob);
        descs.push(serde_json::json!({
            "mediaType": l.media_type,
            "digest": digest,
            "size": l.blob.len(),
        }));
        pusher.push_blob(repo, l.blob.clone(), &digest).await?;
    }
    let host = Platform::host();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": host.architecture,
        "os": host.os,
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let config_digest = sha256_digest(&config);
    let config_size = config.len();
    pusher.push_blob(repo, config, &config_digest).await?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": descs,
    }))?;
    let manifest_digest = pusher
        .push_manifest(repo, tag, OCI_MANIFEST, manifest)
        .await?;
    Ok(PushedImage {
        manifest: manifest_digest,
        config: config_digest,
        layers: descs
            .iter()
            .map(|l| l["digest"].as_str().unwrap_or_default().to_string())
            .collect(),
        diff_ids,
    })
}

/// zstd of `bytes`.
pub fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(bytes, 3).expect("zstd into memory")
}
