//! The directory cache's server side (`/dircache/v1`, see
//! [`ember_dircache::wire`]): content-addressed chunks and immutable
//! entries by scope and key, with per-scope byte budgets (LRU), an
//! unused-age expiry and garbage collection of chunks no entry refers to.
//!
//! Layout under `<cache dir>/dircache`:
//!
//! ```text
//! chunks/<hh>/<hex>    zstd-compressed chunks, named by the SHA-256 of their
//!                      uncompressed bytes (verified on PUT)
//! entries/<id>.entry   one line of {info, meta}, then the manifest as it
//!                      was stored; id = sha256(scope NUL key); the file's
//!                      mtime is the entry's last use
//! tmp/                 uploads being written
//! ```
//!
//! Invariants: a chunk or entry file appears under its name only complete
//! and synced (written in `tmp/`, fsynced, renamed); an entry is stored
//! only once every chunk it names is present, and a chunk is removed only
//! when no entry names it and it was not used (uploaded or reported
//! present) within the grace period, so a save between its "which do you
//! lack" query and its entry PUT does not lose its chunks. The index (one
//! mutex) is rebuilt from the files at start.

use crate::error::CacheError;
use crate::peers::PeerSet;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ember_dircache::manifest::{MAX_CHUNK_BYTES, Manifest, Policy, check_name, is_digest_hex};
use ember_dircache::wire::{
    EntryInfo, EntryList, Found, GcReport, LookupRequest, MissingRequest, MissingResponse,
};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest compressed chunk accepted (an incompressible chunk of the
/// largest size, plus zstd's framing).
const MAX_STORED_CHUNK: usize = MAX_CHUNK_BYTES as usize + (64 << 10);

/// Largest manifest accepted (about 300,000 files).
const MAX_MANIFEST: usize = 64 << 20;

/// Budgets, expiry and write protection.
#[derive(Debug, Clone)]
pub struct DircacheConfig {
    /// Bytes each scope may hold; the least recently used entries go
    /// first when a save passes it.
    pub scope_bytes: u64,
    /// Entries not restored for this long are removed.
    pub max_unused: Duration,
    /// Scopes (a default branch) that only writers presenting
    /// `write_token` may save into or delete from; every client may read
    /// them. Exact names.
    pub protected_scopes: Vec<String>,
    /// The bearer token that may write protected scopes (none: nobody may).
    pub write_token: Option<String>,
    /// How long an unreferenced chunk is kept after its last use, so a save
    /// in progress keeps the chunks it was told are present.
    pub gc_grace: Duration,
    /// How often budgets, expiry and chunk GC run without a request asking.
    pub gc_every: Duration,
    /// Bearer tokens the Turborepo API (`/v8/artifacts`) accepts; none:
    /// that API is off.
    pub turbo_tokens: Vec<String>,
}

impl Default for DircacheConfig {
    fn default() -> Self {
        // GitHub Actions' defaults: 10 GB per repository, 7 days unused.
        DircacheConfig {
            scope_bytes: 10 << 30,
            max_unused: Duration::from_secs(7 * 24 * 3600),
            protected_scopes: Vec::new(),
            write_token: None,
            gc_grace: Duration::from_secs(3600),
            gc_every: Duration::from_secs(600),
            turbo_tokens: Vec::new(),
        }
    }
}

struct ChunkRec {
    size: u64,
    last_use: SystemTime,
    /// Entries naming it.
    refs: u32,
}

struct EntryRec {
    info: EntryInfo,
    digests: Vec<String>,
}

#[derive(Default)]
struct Index {
    chunks: HashMap<String, ChunkRec>,
    entries: HashMap<(String, String), EntryRec>,
}

/// The chunk and entry store.
pub struct DirStore {
    root: PathBuf,
    config: DircacheConfig,
    index: Mutex<Index>,
    seq: AtomicU64,
    /// The other cache servers, asked in order when a chunk or an entry
    /// is missing here.
    peers: OnceLock<PeerSet>,
}

/// Marks a request one cache server sends another on a miss: the peer
/// answers from its own store only, so a miss never bounces between them.
pub const PEER_HEADER: &str = "x-ember-dircache-peer";

/// Response headers kept with an entry (name -> value).
pub type Headers = BTreeMap<String, String>;

/// The first line of an entry's file; the manifest's JSON follows it.
/// The manifest is kept apart so a lookup answers with its bytes as they
/// are, without decoding and re-encoding megabytes of tree (the client
/// validates what it gets anyway).
#[derive(serde::Serialize, serde::Deserialize)]
struct EntryHead {
    info: EntryInfo,
    /// Headers to answer with (a Turborepo artifact's tag and duration).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    meta: BTreeMap<String, String>,
}

/// An entry as earlier builds stored it: one JSON document,
/// `entries/<id>.json`. Rewritten in the current form when the store opens.
#[derive(serde::Deserialize)]
struct LegacyEntry {
    info: EntryInfo,
    manifest: Manifest,
    #[serde(default)]
    meta: BTreeMap<String, String>,
}

/// What [`DirStore::load_entry_file`] made of a file.
enum Loaded {
    /// An entry, with the path its file has now.
    Entry(EntryInfo, Manifest, PathBuf),
    /// Not an entry: removed.
    Unreadable,
    /// Not indexed from this file: an entry in the earlier form that
    /// could not be rewritten (left on disk for the next start), or one
    /// already rewritten (removed).
    Kept,
}

/// An entry file's bytes: the head, a newline, the manifest. Compact JSON
/// never holds a raw newline, so the first one ends the head.
fn encode_entry(head: &EntryHead, manifest: &[u8]) -> Result<Vec<u8>, CacheError> {
    let mut out =
        serde_json::to_vec(head).map_err(|e| CacheError::io("encoding an entry", e.into()))?;
    out.reserve(manifest.len() + 1);
    out.push(b'\n');
    out.extend_from_slice(manifest);
    Ok(out)
}

/// The head of an entry file and where its manifest starts.
fn split_entry(bytes: &[u8]) -> Result<(EntryHead, usize), serde_json::Error> {
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    let head = serde_json::from_slice(&bytes[..end])?;
    Ok((head, (end + 1).min(bytes.len())))
}

/// A [`Found`]'s JSON around a manifest already encoded: the same bytes
/// `serde_json` would write for it, field for field.
fn found_body(info: &EntryInfo, exact: bool, manifest: &[u8]) -> Result<Vec<u8>, CacheError> {
    let mut out = Vec::with_capacity(manifest.len() + 512);
    out.extend_from_slice(b"{\"info\":");
    serde_json::to_writer(&mut out, info)
        .map_err(|e| CacheError::io("encoding an entry", e.into()))?;
    out.extend_from_slice(if exact {
        b",\"exact\":true,\"manifest\":"
    } else {
        b",\"exact\":false,\"manifest\":"
    });
    out.extend_from_slice(manifest);
    out.push(b'}');
    Ok(out)
}

fn now_ms() -> u64 {
    ms(SystemTime::now())
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CacheError {
    let what = what.into();
    move |e| CacheError::io(what, e)
}

/// Writes `bytes` to `dest` crash-safely: a temp file, fsync, rename,
/// fsync of the directory.
fn write_atomic(tmp: &Path, dest: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let mut f = File::create(tmp).map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    fs::rename(tmp, dest).map_err(io(format!("renaming to {}", dest.display())))?;
    if let Some(dir) = dest.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

impl DirStore {
    /// Opens (creating) the store in `root` and rebuilds its index.
    pub fn open(root: &Path, config: DircacheConfig) -> Result<Arc<DirStore>, CacheError> {
        for d in ["chunks", "entries", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io(format!("creating {}", p.display())))?;
        }
        // Uploads a previous process left half-written.
        if let Ok(rd) = fs::read_dir(root.join("tmp")) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let store = DirStore {
            root: root.to_path_buf(),
            config,
            index: Mutex::new(Index::default()),
            seq: AtomicU64::new(0),
            peers: OnceLock::new(),
        };
        store.rebuild()?;
        Ok(Arc::new(store))
    }

    /// Its configuration.
    pub fn config(&self) -> &DircacheConfig {
        &self.config
    }

    /// Sets the other cache servers (base URLs, this one excluded) that a
    /// chunk or entry missing here is asked from. Once, at start; later
    /// calls are ignored.
    pub fn set_peers(&self, urls: Vec<String>) -> Result<(), CacheError> {
        if let Some(p) = PeerSet::new(urls, PEER_HEADER)? {
            let _ = self.peers.set(p);
        }
        Ok(())
    }

    /// Which of `digests` are not stored here.
    pub fn absent(&self, digests: &[String]) -> Vec<String> {
        let idx = self.lock();
        let mut seen = HashSet::new();
        digests
            .iter()
            .filter(|d| !idx.chunks.contains_key(d.as_str()) && seen.insert(d.as_str()))
            .cloned()
            .collect()
    }

    /// Fetches chunk `hex` from the first peer that has it, verifies its
    /// digest and stores it here (unreferenced, so collected after the
    /// grace period unless an entry comes to name it). False when no peer
    /// has a good copy.
    pub async fn chunk_from_peers(self: &Arc<Self>, hex: &str) -> bool {
        let Some(p) = self.peers.get() else {
            return false;
        };
        for url in p.urls() {
            let Some(resp) = p
                .ask(url, |h| h.get(format!("{url}/dircache/v1/chunks/{hex}")))
                .await
            else {
                continue;
            };
            let body = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(peer = %url, chunk = hex, error = %ember_error::chain(&e), "peer broke off a chunk");
                    continue;
                }
            };
            let s = self.clone();
            let h = hex.to_string();
            // put_chunk verifies the digest before anything is stored.
            match blocking(move || s.put_chunk(&h, &body)).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(peer = %url, chunk = hex, error = %ember_error::chain(&e), "peer served a bad chunk");
                }
            }
        }
        false
    }

    /// Asks the peers, in order, for an entry (`path` under `/dircache/v1`,
    /// a GET, or a POST of `body`); the first valid answer, as the peer
    /// sent it. Not stored here: its chunks come through
    /// [`Self::chunk_from_peers`] as a restore asks for them.
    async fn entry_from_peers(&self, path: &str, body: Option<Bytes>) -> Option<Vec<u8>> {
        let p = self.peers.get()?;
        for url in p.urls() {
            let u = format!("{url}/dircache/v1/{path}");
            let Some(resp) = p
                .ask(url, |h| match &body {
                    Some(b) => h.post(&u).body(b.clone()),
                    None => h.get(&u),
                })
                .await
            else {
                continue;
            };
            let Ok(bytes) = resp.bytes().await else {
                continue;
            };
            let Ok(found) = serde_json::from_slice::<Found>(&bytes) else {
                tracing::warn!(peer = %url, "peer sent an unreadable entry");
                continue;
            };
            // Checked as a manifest PUT would be; the client checks again.
            if let Err(e) = found.manifest.validate(Policy {
                allow_absolute_symlinks: true,
            }) {
                tracing::warn!(peer = %url, error = %ember_error::chain(&e), "peer sent an invalid manifest");
                continue;
            }
            return Some(bytes.to_vec());
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // Every update leaves the index consistent before it can panic.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rebuild(&self) -> Result<(), CacheError> {
        let mut idx = self.lock();
        let chunks = self.root.join("chunks");
        for sub in fs::read_dir(&chunks)
            .map_err(io(format!("reading {}", chunks.display())))?
            .flatten()
        {
            for e in fs::read_dir(sub.path()).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Ok(md) = e.metadata() else { continue };
                if !is_digest_hex(&name) || !md.is_file() {
                    let _ = fs::remove_file(e.path());
                    continue;
                }
                idx.chunks.insert(
                    name,
                    ChunkRec {
                        size: md.len(),
                        last_use: md.modified().unwrap_or(UNIX_EPOCH),
                        refs: 0,
                    },
                );
            }
        }
        let entries = self.root.join("entries");
        // Listed first: rewriting an entry of the earlier form adds a file
        // the listing must not then yield a second time.
        let files: Vec<PathBuf> = fs::read_dir(&entries)
            .map_err(io(format!("reading {}", entries.display())))?
            .flatten()
            .map(|e| e.path())
            .collect();
        for p in files {
            let (mut info, manifest, p) = match self.load_entry_file(&p) {
                Loaded::Entry(info, manifest, p) => (info, manifest, p),
                Loaded::Unreadable => {
                    tracing::warn!(path = %p.display(), "unreadable directory cache entry removed");
                    let _ = fs::remove_file(&p);
                    continue;
                }
                Loaded::Kept => continue,
            };
            let digests: Vec<String> = manifest
                .unique_digests()
                .into_iter()
                .map(str::to_string)
                .collect();
            if digests.iter().any(|d| !idx.chunks.contains_key(d)) {
                tracing::warn!(path = %p.display(), "directory cache entry with missing chunks removed");
                let _ = fs::remove_file(&p);
                continue;
            }
            for d in &digests {
                if let Some(c) = idx.chunks.get_mut(d) {
                    c.refs += 1;
                }
            }
            if let Ok(t) = fs::metadata(&p).and_then(|m| m.modified()) {
                // File times lag the clock by up to a tick: an entry
                // never restored since it was stored was used when made.
                info.last_used_ms = ms(t).max(info.created_ms);
            }
            idx.entries.insert(
                (info.scope.clone(), info.key.clone()),
                EntryRec { info, digests },
            );
        }
        tracing::info!(
            chunks = idx.chunks.len(),
            entries = idx.entries.len(),
            "directory cache index rebuilt"
        );
        Ok(())
    }

    /// Reads an entry file at start: its info, its manifest and the path it
    /// now has. A file in the earlier one-document form is rewritten in
    /// the current form first (its mtime, the entry's last use, carried
    /// over).
    fn load_entry_file(&self, p: &Path) -> Loaded {
        let Ok(bytes) = fs::read(p) else {
            return Loaded::Unreadable;
        };
        let parsed = match p.extension().and_then(|x| x.to_str()) {
            Some("entry") => split_entry(&bytes).ok().and_then(|(head, at)| {
                let manifest = serde_json::from_slice(&bytes[at..]).ok()?;
                Some((head, manifest, None))
            }),
            Some("json") => serde_json::from_slice::<LegacyEntry>(&bytes)
                .ok()
                .and_then(|old| {
                    let json = serde_json::to_vec(&old.manifest).ok()?;
                    let head = EntryHead {
                        info: old.info,
                        meta: old.meta,
                    };
                    Some((head, old.manifest, Some(json)))
                }),
            _ => None,
        };
        let Some((head, manifest, rewrite)) = parsed else {
            return Loaded::Unreadable;
        };
        let Some(json) = rewrite else {
            return Loaded::Entry(head.info, manifest, p.to_path_buf());
        };
        let dest = self.entry_path(&head.info.scope, &head.info.key);
        if dest.exists() {
            // Rewritten before, and the old file not yet removed.
            let _ = fs::remove_file(p);
            return Loaded::Kept;
        }
        let used = fs::metadata(p).and_then(|m| m.modified()).ok();
        let written =
            encode_entry(&head, &json).and_then(|new| write_atomic(&self.tmp_path(), &dest, &new));
        if let Err(e) = written {
            // Left as it is, for the next start to try again.
            tracing::warn!(path = %p.display(), error = %ember_error::chain(&e), "directory cache entry not rewritten; skipped");
            return Loaded::Kept;
        }
        if let (Some(t), Ok(f)) = (used, File::options().write(true).open(&dest)) {
            let _ = f.set_modified(t);
        }
        let _ = fs::remove_file(p);
        Loaded::Entry(head.info, manifest, dest)
    }

    fn chunk_path(&self, hex: &str) -> PathBuf {
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn entry_path(&self, scope: &str, key: &str) -> PathBuf {
        let mut h = Sha256::new();
        h.update(scope.as_bytes());
        h.update([0u8]);
        h.update(key.as_bytes());
        self.root
            .join("entries")
            .join(format!("{}.entry", hex::encode(h.finalize())))
    }

    fn tmp_path(&self) -> PathBuf {
        self.root.join("tmp").join(format!(
            "{}.{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn may_write(&self, scope: &str, token: Option<&str>) -> Result<(), CacheError> {
        if !self.config.protected_scopes.iter().any(|s| s == scope) {
            return Ok(());
        }
        match (&self.config.write_token, token) {
            (Some(want), Some(got)) if constant_time_eq(want.as_bytes(), got.as_bytes()) => Ok(()),
            _ => Err(CacheError::ScopeReadOnly(scope.to_string())),
        }
    }

    /// The stored size of chunk `hex`, if present.
    pub fn chunk_size(&self, hex: &str) -> Option<u64> {
        self.lock().chunks.get(hex).map(|c| c.size)
    }

    /// Verifies and stores a compressed chunk. Blocking.
    pub fn put_chunk(&self, hex: &str, body: &[u8]) -> Result<(), CacheError> {
        if body.len() > MAX_STORED_CHUNK {
            return Err(CacheError::TooLarge(format!(
                "chunk of {} bytes",
                body.len()
            )));
        }
        ember_dircache::chunk::open(hex, body, None)
            .map_err(|e| CacheError::DigestInvalid(e.to_string()))?;
        {
            let mut idx = self.lock();
            if let Some(c) = idx.chunks.get_mut(hex) {
                c.last_use = SystemTime::now();
                return Ok(());
            }
        }
        let dest = self.chunk_path(hex);
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        write_atomic(&self.tmp_path(), &dest, body)?;
        self.lock().chunks.insert(
            hex.to_string(),
            ChunkRec {
                size: body.len() as u64,
                last_use: SystemTime::now(),
                refs: 0,
            },
        );
        Ok(())
    }

    /// Reads a compressed chunk; `None` if absent. Blocking.
    pub fn get_chunk(&self, hex: &str) -> Result<Option<Vec<u8>>, CacheError> {
        if self.chunk_size(hex).is_none() {
            return Ok(None);
        }
        match fs::read(self.chunk_path(hex)) {
            Ok(b) => Ok(Some(b)),
            // Collected between the lookup and the read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CacheError::io(format!("reading chunk {hex}"), e)),
        }
    }

    /// Several compressed chunks, framed for `POST chunks/fetch` (see
    /// [`ember_dircache::wire::FETCH_FRAME`]): each as a 4-byte big-endian
    /// length and its bytes, in the order asked. `Err(BlobUnknown)` names
    /// the first one absent; nothing is framed then. Blocking.
    pub fn get_chunks_framed(&self, digests: &[String]) -> Result<Vec<u8>, CacheError> {
        let mut total = 0u64;
        {
            let idx = self.lock();
            for d in digests {
                match idx.chunks.get(d.as_str()) {
                    Some(c) => total += 4 + c.size,
                    None => return Err(CacheError::BlobUnknown(d.clone())),
                }
            }
        }
        let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for d in digests {
            let start = out.len();
            out.extend_from_slice(&[0u8; 4]);
            match File::open(self.chunk_path(d)).and_then(|mut f| {
                use std::io::Read as _;
                f.read_to_end(&mut out)
            }) {
                Ok(n) => {
                    let n = u32::try_from(n).map_err(|_| {
                        CacheError::io(
                            format!("reading chunk {d}"),
                            std::io::Error::other("too large"),
                        )
                    })?;
                    out[start..start + 4].copy_from_slice(&n.to_be_bytes());
                }
                // Collected between the lookup and the read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CacheError::BlobUnknown(d.clone()));
                }
                Err(e) => return Err(CacheError::io(format!("reading chunk {d}"), e)),
            }
        }
        Ok(out)
    }

    /// The digests of `req` the store lacks; those it has are marked used.
    pub fn missing(&self, req: &MissingRequest) -> MissingResponse {
        let now = SystemTime::now();
        let mut idx = self.lock();
        let missing = req
            .digests
            .iter()
            .filter(|d| match idx.chunks.get_mut(d.as_str()) {
                Some(c) => {
                    c.last_use = now;
                    false
                }
                None => true,
            })
            .cloned()
            .collect();
        MissingResponse { missing }
    }

    /// Stores an entry; then applies the scope's budget. Blocking.
    pub fn put_entry(
        &self,
        scope: &str,
        key: &str,
        body: &[u8],
        token: Option<&str>,
    ) -> Result<EntryInfo, CacheError> {
        check_name("scope", scope).map_err(|e| CacheError::BadRequest(e.to_string()))?;
        check_name("key", key).map_err(|e| CacheError::BadRequest(e.to_string()))?;
        self.may_write(scope, token)?;
        let manifest: Manifest = serde_json::from_slice(body)
            .map_err(|e| CacheError::BadRequest(format!("manifest: {e}")))?;
        // The server accepts absolute symlink targets; a restoring client
        // decides whether it does.
        manifest
            .validate(Policy {
                allow_absolute_symlinks: true,
            })
            .map_err(|e| CacheError::BadRequest(e.to_string()))?;
        self.store_entry(
            scope,
            key,
            &manifest,
            body,
            body.len() as u64,
            BTreeMap::new(),
        )
    }

    /// Stores a validated manifest, kept as `json` (its encoding); then
    /// applies the scope's budget. The entry is charged its chunks and
    /// `manifest_bytes`.
    fn store_entry(
        &self,
        scope: &str,
        key: &str,
        manifest: &Manifest,
        json: &[u8],
        manifest_bytes: u64,
        meta: BTreeMap<String, String>,
    ) -> Result<EntryInfo, CacheError> {
        let digests: Vec<String> = manifest
            .unique_digests()
            .into_iter()
            .map(str::to_string)
            .collect();
        let id = (scope.to_string(), key.to_string());
        let info = {
            let mut idx = self.lock();
            if idx.entries.contains_key(&id) {
                return Err(CacheError::EntryExists(format!("{scope}/{key}")));
            }
            let mut bytes = manifest_bytes;
            let mut absent = 0usize;
            for d in &digests {
                match idx.chunks.get(d) {
                    Some(c) => bytes += c.size,
                    None => absent += 1,
                }
            }
            if absent > 0 {
                return Err(CacheError::ChunksMissing(absent));
            }
            if bytes > self.config.scope_bytes {
                return Err(CacheError::TooLarge(format!(
                    "entry of {bytes} bytes, over the scope budget of {}",
                    self.config.scope_bytes
                )));
            }
            let now = now_ms();
            let info = EntryInfo {
                scope: scope.to_string(),
                key: key.to_string(),
                bytes,
                data_bytes: manifest.data_bytes(),
                chunks: digests.len() as u64,
                created_ms: now,
                last_used_ms: now,
            };
            let stored = encode_entry(
                &EntryHead {
                    info: info.clone(),
                    meta,
                },
                json,
            )?;
            // Under the lock: the chunks checked above cannot be collected
            // before the entry that names them is on disk.
            write_atomic(&self.tmp_path(), &self.entry_path(scope, key), &stored)?;
            for d in &digests {
                if let Some(c) = idx.chunks.get_mut(d) {
                    c.refs += 1;
                }
            }
            idx.entries.insert(
                id,
                EntryRec {
                    info: info.clone(),
                    digests,
                },
            );
            info
        };
        let mut report = GcReport::default();
        self.enforce_budget(scope, Some(key), &mut report);
        self.collect_chunks(&mut report);
        Ok(info)
    }

    /// Looks an entry up (see [`LookupRequest`]) and marks it used; the
    /// [`Found`]'s JSON. Blocking.
    pub fn lookup(&self, req: &LookupRequest) -> Result<Option<Vec<u8>>, CacheError> {
        for _ in 0..3 {
            let hit = {
                let idx = self.lock();
                find(&idx, req)
            };
            let Some((scope, key, exact)) = hit else {
                return Ok(None);
            };
            // Removed between the index lookup and the read: look again.
            if let Some((head, bytes, at)) = self.read_file(&scope, &key)? {
                return found_body(&head.info, exact, &bytes[at..]).map(Some);
            }
        }
        Ok(None)
    }

    /// The entry stored under exactly `scope`/`key`, marked used; the
    /// [`Found`]'s JSON. Blocking.
    pub fn get_entry(&self, scope: &str, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        match self.read_file(scope, key)? {
            Some((head, bytes, at)) => found_body(&head.info, true, &bytes[at..]).map(Some),
            None => Ok(None),
        }
    }

    /// An entry with its manifest decoded, and its headers.
    fn read_stored(&self, scope: &str, key: &str) -> Result<Option<(Found, Headers)>, CacheError> {
        let Some((head, bytes, at)) = self.read_file(scope, key)? else {
            return Ok(None);
        };
        let manifest = serde_json::from_slice(&bytes[at..]).map_err(|e| {
            CacheError::io(
                format!("reading {}", self.entry_path(scope, key).display()),
                e.into(),
            )
        })?;
        Ok(Some((
            Found {
                info: head.info,
                exact: true,
                manifest,
            },
            head.meta,
        )))
    }

    /// An entry's file, marked used: its head (with the new last use),
    /// its bytes and where the manifest starts in them.
    fn read_file(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<(EntryHead, Vec<u8>, usize)>, CacheError> {
        let p = self.entry_path(scope, key);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CacheError::io(format!("reading {}", p.display()), e)),
        };
        let (mut head, at) = split_entry(&bytes)
            .map_err(|e| CacheError::io(format!("reading {}", p.display()), e.into()))?;
        let now = SystemTime::now();
        // Recency across restarts lives in the file's mtime.
        if let Ok(f) = File::options().write(true).open(&p) {
            let _ = f.set_modified(now);
        }
        {
            let mut idx = self.lock();
            match idx.entries.get_mut(&(scope.to_string(), key.to_string())) {
                Some(e) => {
                    e.info.last_used_ms = ms(now);
                    head.info.last_used_ms = ms(now);
                }
                None => return Ok(None),
            }
        }
        Ok(Some((head, bytes, at)))
    }

    /// Stores `data` as a one-file entry (a Turborepo artifact), chunked
    /// like a saved tree so artifacts share chunks with each other. An
    /// existing key is left as it is. Blocking.
    pub fn put_blob(
        &self,
        scope: &str,
        key: &str,
        data: &[u8],
        meta: BTreeMap<String, String>,
    ) -> Result<(), CacheError> {
        self.put_blob_from(scope, key, data, u64::MAX, meta)
            .map(|_| ())
    }

    /// [`DirStore::put_blob`] reading from `src` as it arrives: one chunk
    /// (at most 256 KiB) held at a time, so an artifact of any size costs
    /// bounded memory. More than `limit` bytes fails (the chunks already
    /// stored are collected as unreferenced). Returns the bytes stored.
    /// Blocking.
    pub fn put_blob_from(
        &self,
        scope: &str,
        key: &str,
        src: impl std::io::Read,
        limit: u64,
        meta: BTreeMap<String, String>,
    ) -> Result<u64, CacheError> {
        let mut chunks = Vec::new();
        let mut total = 0u64;
        for data in ember_dircache::chunk::stream(src) {
            let data = data.map_err(|e| CacheError::io("reading an artifact", e))?;
            total += data.len() as u64;
            if total > limit {
                return Err(CacheError::TooLarge(format!("artifact over {limit} bytes")));
            }
            let digest = ember_dircache::chunk::digest_hex(&data);
            let stored = ember_dircache::chunk::compress(&data)
                .map_err(|e| CacheError::io("compressing an artifact", std::io::Error::other(e)))?;
            self.put_chunk(&digest, &stored)?;
            chunks.push(ember_dircache::manifest::ChunkRef {
                digest,
                size: data.len() as u32,
            });
        }
        let manifest = Manifest {
            version: ember_dircache::manifest::MANIFEST_VERSION,
            nodes: vec![ember_dircache::manifest::Node {
                path: "artifact".into(),
                kind: ember_dircache::manifest::NodeKind::File {
                    offset: 0,
                    size: total,
                },
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
            }],
            chunks,
        };
        let json = serde_json::to_vec(&manifest)
            .map_err(|e| CacheError::io("encoding an entry", e.into()))?;
        match self.store_entry(scope, key, &manifest, &json, 0, meta) {
            Ok(_) | Err(CacheError::EntryExists(_)) => Ok(total),
            Err(e) => Err(e),
        }
    }

    /// The bytes stored by [`DirStore::put_blob`], every chunk verified,
    /// and their headers; `None` if absent. Blocking.
    pub fn get_blob(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Headers)>, CacheError> {
        let Some((found, meta)) = self.read_stored(scope, key)? else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(found.manifest.data_bytes() as usize);
        for c in &found.manifest.chunks {
            match self.blob_chunk(c)? {
                Some(data) => out.extend_from_slice(&data),
                None => return Ok(None),
            }
        }
        Ok(Some((out, meta)))
    }

    /// A stored artifact's manifest and headers, to stream it chunk by
    /// chunk with [`DirStore::blob_chunk`]; `None` if absent. Blocking.
    pub fn blob_manifest(
        &self,
        scope: &str,
        key: &str,
    ) -> Result<Option<(Manifest, Headers)>, CacheError> {
        Ok(self.read_stored(scope, key)?.map(|(f, h)| (f.manifest, h)))
    }

    /// One chunk of an artifact, decompressed and verified; `None` if it
    /// is gone. Blocking.
    pub fn blob_chunk(
        &self,
        c: &ember_dircache::manifest::ChunkRef,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(stored) = self.get_chunk(&c.digest)? else {
            return Ok(None);
        };
        ember_dircache::chunk::open(&c.digest, &stored, Some(c.size))
            .map(Some)
            .map_err(|e| CacheError::io("reading an artifact", std::io::Error::other(e)))
    }

    /// Whether `scope`/`key` has an entry.
    pub fn has_entry(&self, scope: &str, key: &str) -> bool {
        self.lock()
            .entries
            .contains_key(&(scope.to_string(), key.to_string()))
    }

    /// A scope's entries, newest first.
    pub fn list(&self, scope: &str) -> EntryList {
        let idx = self.lock();
        let mut entries: Vec<EntryInfo> = idx
            .entries
            .values()
            .filter(|e| e.info.scope == scope)
            .map(|e| e.info.clone())
            .collect();
        entries.sort_by(|a, b| {
            b.created_ms
                .cmp(&a.created_ms)
                .then_with(|| b.key.cmp(&a.key))
        });
        EntryList { entries }
    }

    /// Removes an entry and the chunks only it used. Blocking.
    pub fn remove(&self, scope: &str, key: &str, token: Option<&str>) -> Result<(), CacheError> {
        self.may_write(scope, token)?;
        let gone = {
            let mut idx = self.lock();
            self.drop_entry(&mut idx, &(scope.to_string(), key.to_string()))
        };
        if !gone {
            return Err(CacheError::EntryUnknown(format!("{scope}/{key}")));
        }
        self.collect_chunks(&mut GcReport::default());
        Ok(())
    }

    fn drop_entry(&self, idx: &mut Index, id: &(String, String)) -> bool {
        let Some(rec) = idx.entries.remove(id) else {
            return false;
        };
        let _ = fs::remove_file(self.entry_path(&id.0, &id.1));
        let now = SystemTime::now();
        for d in &rec.digests {
            if let Some(c) = idx.chunks.get_mut(d) {
                c.refs = c.refs.saturating_sub(1);
                // Grace counts from when the last entry let go of it.
                c.last_use = now;
            }
        }
        true
    }

    /// Evicts the least recently used entries of `scope` while it is over
    /// its budget.
    /// `keep` (the entry just stored, which fits the budget on its own) is
    /// spared even if a clock tie makes it look as old as another.
    fn enforce_budget(&self, scope: &str, keep: Option<&str>, report: &mut GcReport) {
        let mut idx = self.lock();
        let mut mine: Vec<(u64, u64, String, u64)> = idx
            .entries
            .values()
            .filter(|e| e.info.scope == scope)
            .map(|e| {
                (
                    e.info.last_used_ms,
                    e.info.created_ms,
                    e.info.key.clone(),
                    e.info.bytes,
                )
            })
            .collect();
        let mut total: u64 = mine.iter().map(|m| m.3).sum();
        mine.sort();
        for (_, _, key, bytes) in mine {
            if total <= self.config.scope_bytes {
                break;
            }
            if Some(key.as_str()) == keep {
                continue;
            }
            if self.drop_entry(&mut idx, &(scope.to_string(), key.clone())) {
                tracing::info!(
                    scope,
                    key,
                    bytes,
                    "directory cache entry evicted (scope budget)"
                );
                total -= bytes;
                report.evicted_entries += 1;
            }
        }
    }

    /// Removes chunks no entry names that were not used within the grace
    /// period.
    fn collect_chunks(&self, report: &mut GcReport) {
        let now = SystemTime::now();
        let mut idx = self.lock();
        let doomed: Vec<String> = idx
            .chunks
            .iter()
            .filter(|(_, c)| {
                c.refs == 0
                    && now.duration_since(c.last_use).unwrap_or_default() >= self.config.gc_grace
            })
            .map(|(d, _)| d.clone())
            .collect();
        for d in doomed {
            // Unlinked under the lock: a concurrent PUT of the same chunk
            // then finds it absent and writes it anew.
            let _ = fs::remove_file(self.chunk_path(&d));
            if let Some(c) = idx.chunks.remove(&d) {
                report.removed_chunks += 1;
                report.removed_bytes += c.size;
            }
        }
    }

    /// Expiry, budgets, chunk collection. Blocking.
    pub fn gc(&self) -> GcReport {
        let mut report = GcReport::default();
        let cutoff = now_ms().saturating_sub(self.config.max_unused.as_millis() as u64);
        let scopes: HashSet<String> = {
            let mut idx = self.lock();
            let old: Vec<(String, String)> = idx
                .entries
                .iter()
                .filter(|(_, e)| e.info.last_used_ms < cutoff)
                .map(|(k, _)| k.clone())
                .collect();
            for id in old {
                if self.drop_entry(&mut idx, &id) {
                    tracing::info!(
                        scope = id.0,
                        key = id.1,
                        "directory cache entry expired (unused)"
                    );
                    report.expired_entries += 1;
                }
            }
            idx.entries.keys().map(|(s, _)| s.clone()).collect()
        };
        for s in scopes {
            self.enforce_budget(&s, None, &mut report);
        }
        self.collect_chunks(&mut report);
        report
    }
}

/// The lookup order: per scope, exact key, newest with the key as prefix,
/// newest with each restore key as prefix.
fn find(idx: &Index, req: &LookupRequest) -> Option<(String, String, bool)> {
    for scope in &req.scopes {
        if idx.entries.contains_key(&(scope.clone(), req.key.clone())) {
            return Some((scope.clone(), req.key.clone(), true));
        }
        for prefix in std::iter::once(&req.key).chain(req.restore_keys.iter()) {
            let newest = idx
                .entries
                .values()
                .filter(|e| &e.info.scope == scope && e.info.key.starts_with(prefix.as_str()))
                .max_by(|a, b| {
                    a.info
                        .created_ms
                        .cmp(&b.info.created_ms)
                        .then_with(|| a.info.key.cmp(&b.info.key))
                });
            if let Some(e) = newest {
                return Some((scope.clone(), e.info.key.clone(), false));
            }
        }
    }
    None
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Collects garbage every `gc_every` while the store is alive.
pub fn spawn_gc(store: &Arc<DirStore>) {
    let weak: Weak<DirStore> = Arc::downgrade(store);
    let every = store.config.gc_every;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(s) = weak.upgrade() else { break };
            let _ = tokio::task::spawn_blocking(move || s.gc()).await;
        }
    });
}

// ---- HTTP ----

/// The `/dircache/v1` routes (to be nested there).
pub fn router<S>(store: Arc<DirStore>) -> Router<S> {
    Router::new()
        .route("/chunks/missing", post(missing))
        .route("/chunks/fetch", post(fetch_chunks))
        .route(
            "/chunks/{hex}",
            get(get_chunk).head(head_chunk).put(put_chunk),
        )
        .route("/entry", get(get_entry).put(put_entry).delete(delete_entry))
        .route("/lookup", post(lookup))
        .route("/entries", get(list))
        .route("/gc", post(gc))
        .layer(DefaultBodyLimit::max(MAX_MANIFEST))
        .with_state(store)
}

type St = State<Arc<DirStore>>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::io("a worker thread", std::io::Error::other(e)))?
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

fn answer<T: serde::Serialize>(r: Result<T, CacheError>) -> Response {
    match r {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

/// [`answer`] for a body already encoded.
fn answer_json(r: Result<Vec<u8>, CacheError>) -> Response {
    match r {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

fn digest_param(hex: &str) -> Result<String, CacheError> {
    if is_digest_hex(hex) {
        Ok(hex.to_string())
    } else {
        Err(CacheError::DigestInvalid(hex.chars().take(80).collect()))
    }
}

/// `scope` and `key` from the query string.
fn scope_key(uri: &Uri, need_key: bool) -> Result<(String, String), CacheError> {
    let (mut scope, mut key) = (None, None);
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match &*k {
            "scope" => scope = Some(v.into_owned()),
            "key" => key = Some(v.into_owned()),
            _ => {}
        }
    }
    let scope = scope.ok_or_else(|| CacheError::BadRequest("missing ?scope=".into()))?;
    let key = match key {
        Some(k) => k,
        None if !need_key => String::new(),
        None => return Err(CacheError::BadRequest("missing &key=".into())),
    };
    Ok((scope, key))
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string())
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, CacheError> {
    serde_json::from_slice(body).map_err(|e| CacheError::BadRequest(e.to_string()))
}

async fn missing(State(s): St, body: Bytes) -> Response {
    answer(parse_body::<MissingRequest>(&body).map(|req| s.missing(&req)))
}

/// Whether a request came from a peer (answered from this store only).
fn from_peer(headers: &HeaderMap) -> bool {
    crate::peers::from_peer(headers, PEER_HEADER)
}

async fn fetch_chunks(State(s): St, headers: HeaderMap, body: Bytes) -> Response {
    let r = async {
        let req: MissingRequest = parse_body(&body)?;
        if req.digests.len() > ember_dircache::wire::MAX_FETCH {
            return Err(CacheError::BadRequest(format!(
                "{} chunks asked for at once (at most {})",
                req.digests.len(),
                ember_dircache::wire::MAX_FETCH
            )));
        }
        for d in &req.digests {
            digest_param(d)?;
        }
        if !from_peer(&headers) && s.peers.get().is_some() {
            let absent = s.absent(&req.digests);
            futures_util::future::join_all(absent.iter().map(|d| s.chunk_from_peers(d))).await;
        }
        blocking(move || s.get_chunks_framed(&req.digests)).await
    }
    .await;
    match r {
        Ok(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, ember_dircache::wire::FETCH_FRAME)],
            bytes,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn head_chunk(State(s): St, UrlPath(hex): UrlPath<String>) -> Response {
    let r = digest_param(&hex).and_then(|hex| {
        s.chunk_size(&hex)
            .ok_or_else(|| CacheError::BlobUnknown(hex.clone()))
    });
    match r {
        Ok(size) => (StatusCode::OK, [(header::CONTENT_LENGTH, size.to_string())]).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_chunk(State(s): St, headers: HeaderMap, UrlPath(hex): UrlPath<String>) -> Response {
    let r = async {
        let hex = digest_param(&hex)?;
        let (s2, h) = (s.clone(), hex.clone());
        if let Some(b) = blocking(move || s2.get_chunk(&h)).await? {
            return Ok(b);
        }
        if from_peer(&headers) || !s.chunk_from_peers(&hex).await {
            return Err(CacheError::BlobUnknown(hex));
        }
        let h = hex.clone();
        blocking(move || s.get_chunk(&h))
            .await?
            .ok_or(CacheError::BlobUnknown(hex))
    }
    .await;
    match r {
        Ok(bytes) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/zstd")],
            bytes,
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn put_chunk(State(s): St, UrlPath(hex): UrlPath<String>, body: Bytes) -> Response {
    let r = async {
        let hex = digest_param(&hex)?;
        blocking(move || s.put_chunk(&hex, &body)).await
    }
    .await;
    match r {
        Ok(()) => StatusCode::CREATED.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_entry(State(s): St, headers: HeaderMap, uri: Uri) -> Response {
    let r = async {
        let (scope, key) = scope_key(&uri, true)?;
        let what = format!("{scope}/{key}");
        let s2 = s.clone();
        if let Some(f) = blocking(move || s2.get_entry(&scope, &key)).await? {
            return Ok(f);
        }
        if from_peer(&headers) {
            return Err(CacheError::EntryUnknown(what));
        }
        let path = format!("entry?{}", uri.query().unwrap_or(""));
        s.entry_from_peers(&path, None)
            .await
            .ok_or(CacheError::EntryUnknown(what))
    }
    .await;
    answer_json(r)
}

async fn put_entry(State(s): St, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let r = async {
        let (scope, key) = scope_key(&uri, true)?;
        let token = bearer(&headers);
        blocking(move || s.put_entry(&scope, &key, &body, token.as_deref())).await
    }
    .await;
    match r {
        Ok(info) => json(StatusCode::CREATED, &info),
        Err(e) => e.into_response(),
    }
}

async fn delete_entry(State(s): St, uri: Uri, headers: HeaderMap) -> Response {
    let r = async {
        let (scope, key) = scope_key(&uri, true)?;
        let token = bearer(&headers);
        blocking(move || s.remove(&scope, &key, token.as_deref())).await
    }
    .await;
    match r {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn lookup(State(s): St, headers: HeaderMap, body: Bytes) -> Response {
    let r = async {
        let req: LookupRequest = parse_body(&body)?;
        let what = req.key.clone();
        let s2 = s.clone();
        if let Some(f) = blocking(move || s2.lookup(&req)).await? {
            return Ok(f);
        }
        if from_peer(&headers) {
            return Err(CacheError::EntryUnknown(what));
        }
        s.entry_from_peers("lookup", Some(body))
            .await
            .ok_or(CacheError::EntryUnknown(what))
    }
    .await;
    answer_json(r)
}

async fn list(State(s): St, uri: Uri) -> Response {
    answer(scope_key(&uri, false).map(|(scope, _)| s.list(&scope)))
}

async fn gc(State(s): St) -> Response {
    answer(blocking(move || Ok(s.gc())).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_dircache::manifest::{ChunkRef, MANIFEST_VERSION, Node, NodeKind};

    /// A tree of one file, `path`, made of `chunks`.
    fn one_file(path: &str, chunks: Vec<ChunkRef>) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            nodes: vec![Node {
                path: path.into(),
                kind: NodeKind::File {
                    offset: 0,
                    size: chunks.iter().map(|c| u64::from(c.size)).sum(),
                },
                mode: 0o644,
                uid: 1,
                gid: 2,
                mtime: 3,
                mtime_nsec: 4,
            }],
            chunks,
        }
    }

    #[test]
    fn a_found_built_around_stored_bytes_is_what_serde_writes() {
        let manifest = one_file(
            "a \"quoted\"\nname",
            vec![ChunkRef {
                digest: "ab".repeat(32),
                size: 3,
            }],
        );
        let info = EntryInfo {
            scope: "main".into(),
            key: "k\u{e9}".into(),
            bytes: 10,
            data_bytes: 3,
            chunks: 1,
            created_ms: 5,
            last_used_ms: 6,
        };
        let json = serde_json::to_vec(&manifest).unwrap();
        let head = EntryHead {
            info: info.clone(),
            meta: BTreeMap::from([("x-artifact-tag".to_string(), "t\nu".to_string())]),
        };
        let file = encode_entry(&head, &json).unwrap();
        let (back, at) = split_entry(&file).unwrap();
        assert_eq!(back.info, info);
        assert_eq!(back.meta, head.meta);
        assert_eq!(
            &file[at..],
            &json[..],
            "a newline inside a string is escaped"
        );
        for exact in [true, false] {
            let want = serde_json::to_vec(&Found {
                info: info.clone(),
                exact,
                manifest: manifest.clone(),
            })
            .unwrap();
            assert_eq!(found_body(&info, exact, &file[at..]).unwrap(), want);
        }
    }

    /// An entry of the earlier form met with a full disk at start is left
    /// on disk (not indexed, not deleted) and rewritten at the next start
    /// with room.
    #[test]
    fn an_old_entry_that_cannot_be_rewritten_is_kept_for_the_next_start() {
        if !ember_testkit::require::root() {
            return;
        }
        let dir = ember_testkit::tmpfs::Tmpfs::mount("256k").unwrap();

        let store = DirStore::open(dir.path(), DircacheConfig::default()).unwrap();
        let manifest = one_file("empty", vec![]);
        let info = EntryInfo {
            scope: "main".into(),
            key: "old".into(),
            bytes: 100,
            data_bytes: 0,
            chunks: 0,
            created_ms: 1,
            last_used_ms: 1,
        };
        let legacy = store.entry_path("main", "old").with_extension("json");
        let doc = serde_json::json!({"info": info, "manifest": manifest});
        fs::write(&legacy, serde_json::to_vec(&doc).unwrap()).unwrap();
        drop(store);

        // Fill the disk, then start: the rewrite meets ENOSPC.
        let filler = dir.path().join("filler");
        let mut f = File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        drop(f);
        let store = DirStore::open(dir.path(), DircacheConfig::default()).unwrap();
        assert!(!store.has_entry("main", "old"));
        assert!(legacy.is_file(), "kept for the next start");
        assert!(!store.entry_path("main", "old").exists());
        drop(store);

        fs::remove_file(&filler).unwrap();
        let store = DirStore::open(dir.path(), DircacheConfig::default()).unwrap();
        assert!(store.has_entry("main", "old"));
        assert!(!legacy.exists());
        let body = store.get_entry("main", "old").unwrap().expect("the entry");
        let found: Found = serde_json::from_slice(&body).unwrap();
        assert_eq!(found.manifest, manifest);
        assert_eq!(found.info.key, "old");
    }
}
