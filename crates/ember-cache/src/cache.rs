//! The cache itself, apart from HTTP: upstream selection, manifests and
//! tags, blob lookups with access checks, peers.

use crate::config::{CacheConfig, ConfigError, url_host};
use crate::error::CacheError;
use crate::flight::{Flight, Flights, Lookup};
use crate::metrics::Metrics;
use crate::negative::NotFound;
use crate::peers::Ring;
use crate::route::ManifestRef;
use crate::storage::{Meta, Pinned, Store};
use crate::tags::{TagRecord, Tags};
use crate::upstream::{MAX_MANIFEST_BYTES, Upstream, sniff_media_type};
use bytes::Bytes;
use ember_oci::Digest;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// A manifest ready to serve.
#[derive(Debug, Clone)]
pub struct Doc {
    /// The document.
    pub bytes: Bytes,
    /// Its media type.
    pub media_type: String,
    /// Its digest.
    pub digest: Digest,
}

type ManifestFlight = Shared<BoxFuture<'static, Result<Arc<Doc>, Arc<CacheError>>>>;

/// The cache: shared by every request handler.
///
/// Ownership: the store and the flights are shared with the download tasks
/// the flights spawn (which outlive the request that started them); the
/// manifest flights map is shared with the fetch futures, which remove
/// themselves when done.
pub struct Cache {
    /// Validated configuration.
    pub config: CacheConfig,
    /// Verified blobs on disk.
    pub store: Arc<Store>,
    /// Blob downloads in progress.
    pub flights: Arc<Flights>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    upstreams: Vec<Arc<Upstream>>,
    /// Index into `upstreams` of the default one.
    default: Option<usize>,
    tags: Arc<Tags>,
    manifest_flights: Arc<Mutex<HashMap<String, ManifestFlight>>>,
    /// Upstream 404s for blobs and manifests, remembered briefly.
    negative: Arc<NotFound>,
    /// The peer ring, once this server's own URL is known (at bind time).
    ring: OnceLock<Ring>,
    /// Client for peers (short connect timeout: a dead peer is skipped).
    pub(crate) peer_http: reqwest::Client,
}

impl Cache {
    /// Opens the store and builds the upstream clients.
    pub fn new(config: CacheConfig) -> Result<Arc<Cache>, CacheError> {
        config.validate().map_err(config_err)?;
        // One registry client for every upstream: the node's, so auth,
        // tokens, retries and verification are the same code. A cache
        // retries once (its clients retry too, and fall back to the origin).
        let client = ember_registry::RegistryClient::new(ember_registry::RegistryOptions {
            attempts: 2,
            retry_delay: Duration::from_millis(100),
            user_agent: concat!("ember-cache/", env!("CARGO_PKG_VERSION")).to_string(),
            pool_max_idle_per_host: 32,
            ..Default::default()
        })
        .map_err(|e| CacheError::io("building the registry client", std::io::Error::other(e)))?;
        // Peers are named later (`set_peers`): any server.
        let peer_http = ember_http::client::builder(&[])
            .connect_timeout(Duration::from_secs(2))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| CacheError::io("building the HTTP client", std::io::Error::other(e)))?;
        let mut upstreams = Vec::new();
        let mut default = None;
        for (i, spec) in config.upstreams.iter().enumerate() {
            let name = spec.name();
            let credential = config
                .credentials
                .get(&name)
                .or_else(|| {
                    config
                        .credentials
                        .get(url_host(&spec.url).unwrap_or_default())
                })
                .cloned();
            let public = config.public.contains(&name);
            upstreams.push(Arc::new(Upstream::new(
                name,
                spec.url.clone(),
                credential,
                public,
                client.clone(),
            )));
            if spec.alias.is_none() {
                default = Some(i);
            }
        }
        let metrics = Arc::new(Metrics::default());
        let max = config.max_bytes;
        let high = max / 100 * u64::from(config.high_watermark)
            + max % 100 * u64::from(config.high_watermark) / 100;
        let low = max / 100 * u64::from(config.low_watermark)
            + max % 100 * u64::from(config.low_watermark) / 100;
        let store = Store::open(&config.dir, high, low, metrics.clone())?;
        let negative = Arc::new(NotFound::new(config.negative_ttl, metrics.clone()));
        let flights = Flights::new(store.clone(), metrics.clone(), negative.clone());
        let tags = Arc::new(Tags::new(store.tags_dir()));
        Ok(Arc::new(Cache {
            config,
            store,
            flights,
            metrics,
            upstreams,
            default,
            tags,
            manifest_flights: Arc::new(Mutex::new(HashMap::new())),
            negative,
            ring: OnceLock::new(),
            peer_http,
        }))
    }

    /// Sets this server's URL among its peers; called once the listen
    /// address is known.
    pub fn set_self_url(&self, url: &str) {
        let me = self
            .config
            .advertise
            .clone()
            .unwrap_or_else(|| url.to_string());
        let _ = self.ring.set(Ring::new(me, self.config.peers.clone()));
    }

    /// The peer ring, if peers are configured.
    pub fn ring(&self) -> Option<&Ring> {
        self.ring.get().filter(|r| r.has_peers())
    }

    /// The upstream named `name` (an alias or a URL host).
    pub fn upstream_named(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams
            .iter()
            .find(|u| u.name == name || url_host(&u.base) == Some(name))
    }

    /// The default upstream, if configured.
    pub fn default_upstream(&self) -> Option<&Arc<Upstream>> {
        self.default.map(|i| &self.upstreams[i])
    }

    /// Picks the upstream for a request and the repository to ask it for:
    /// `?ns=` wins, then a first path component naming an upstream, then
    /// the default upstream.
    pub fn select(
        &self,
        name: &str,
        ns: Option<&str>,
    ) -> Result<(Arc<Upstream>, String), CacheError> {
        let (up, repo) = if let Some(ns) = ns {
            let up = self
                .upstream_named(ns)
                .ok_or_else(|| CacheError::UnknownUpstream(ns.chars().take(100).collect()))?;
            (up.clone(), name.to_string())
        } else if let Some((first, rest)) = name.split_once('/')
            && let Some(up) = self.upstream_named(first)
        {
            (up.clone(), rest.to_string())
        } else if let Some(up) = self.default_upstream() {
            (up.clone(), name.to_string())
        } else {
            let first = name.split('/').next().unwrap_or_default();
            return Err(CacheError::UnknownUpstream(first.to_string()));
        };
        // What goes upstream must be a plain repository name.
        if repo.contains(':') {
            return Err(CacheError::NameInvalid(name.to_string()));
        }
        crate::route::validate_name(&repo)?;
        Ok((up, repo))
    }

    // ---- manifests ----

    /// The manifest `reference` of `repo` on `up`: from disk when the tag is
    /// fresh (or confirmed by a `HEAD`) or the digest is cached, from the
    /// upstream otherwise. The flag says it is served stale because the
    /// upstream is down.
    pub async fn manifest(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        reference: &ManifestRef,
    ) -> Result<(Arc<Doc>, bool), CacheError> {
        let m = &self.metrics;
        let tag = match reference {
            ManifestRef::Digest(d) => {
                if let Some(doc) = self.stored_doc(d, up, repo).await? {
                    Metrics::add(&m.manifest_hits, 1);
                    return Ok((doc, false));
                }
                Metrics::add(&m.manifest_misses, 1);
                return Ok((self.fetch_manifest(up, repo, reference).await?, false));
            }
            ManifestRef::Tag(t) => t,
        };
        let record = {
            let (u, r, t) = (up.name.clone(), repo.to_string(), tag.clone());
            let tags = &self.tags;
            // A small file read; not worth a blocking-pool round trip when
            // the record is in memory, which is the common case.
            tags.get(&u, &r, &t)
        };
        if let Some(rec) = &record {
            if rec.fresh(self.config.tag_ttl) {
                if let Some(doc) = self.stored_doc(&rec.digest, up, repo).await? {
                    Metrics::add(&m.manifest_hits, 1);
                    return Ok((doc, false));
                }
            } else {
                match up.head_manifest(repo, reference).await {
                    Ok(Some(d)) if d == rec.digest => {
                        if let Some(doc) = self.stored_doc(&d, up, repo).await? {
                            self.tags.put(&up.name, repo, tag, TagRecord::now(d));
                            Metrics::add(&m.manifest_hits, 1);
                            return Ok((doc, false));
                        }
                    }
                    Ok(_) => {}
                    Err(e) if unavailable(&e) => {
                        return self.stale(rec, up, repo, e).await;
                    }
                    Err(e @ CacheError::ManifestUnknown(_)) => {
                        self.tags.remove(&up.name, repo, tag);
                        let e = Arc::new(e);
                        self.negative.put(
                            NotFound::manifest_key(&up.name, repo, &reference.to_string()),
                            &e,
                        );
                        return Err(CacheError::Shared(e));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Metrics::add(&m.manifest_misses, 1);
        match self.fetch_manifest(up, repo, reference).await {
            Ok(doc) => Ok((doc, false)),
            Err(e) if unavailable(&e) => match &record {
                Some(rec) => self.stale(rec, up, repo, e).await,
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    async fn stale(
        &self,
        rec: &TagRecord,
        up: &Arc<Upstream>,
        repo: &str,
        err: CacheError,
    ) -> Result<(Arc<Doc>, bool), CacheError> {
        match self.stored_doc_local(&rec.digest, up).await? {
            Some(doc) => {
                tracing::warn!(upstream = %up.name, repo, error = %ember_error::chain(&err), "upstream down: serving a stale tag");
                Metrics::add(&self.metrics.stale_served, 1);
                Ok((doc, true))
            }
            None => Err(err),
        }
    }

    /// A manifest from disk, if cached and visible to `up`'s clients (asking
    /// `up` whether it has it when it came from another private upstream).
    async fn stored_doc(
        &self,
        d: &Digest,
        up: &Arc<Upstream>,
        repo: &str,
    ) -> Result<Option<Arc<Doc>>, CacheError> {
        let Some((doc, visible)) = self.read_doc(d, up).await? else {
            return Ok(None);
        };
        if !visible {
            up.head_manifest(repo, &ManifestRef::Digest(d.clone()))
                .await?;
            self.add_origin(d, up).await?;
        }
        Ok(Some(doc))
    }

    /// Like `stored_doc` but never asks the upstream (it is down): content
    /// not already visible to `up`'s clients is not served.
    async fn stored_doc_local(
        &self,
        d: &Digest,
        up: &Arc<Upstream>,
    ) -> Result<Option<Arc<Doc>>, CacheError> {
        Ok(self
            .read_doc(d, up)
            .await?
            .and_then(|(doc, visible)| visible.then_some(doc)))
    }

    async fn read_doc(
        &self,
        d: &Digest,
        up: &Arc<Upstream>,
    ) -> Result<Option<(Arc<Doc>, bool)>, CacheError> {
        let store = self.store.clone();
        let d2 = d.clone();
        let pinned = blocking(move || store.get(&d2)).await?;
        let Some(p) = pinned else { return Ok(None) };
        if p.size > MAX_MANIFEST_BYTES as u64 {
            return Err(CacheError::ManifestTooLarge {
                what: d.to_string(),
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let visible = p.meta.visible_to(&up.name);
        let media_type = p.meta.media_type.clone();
        let bytes = blocking(move || read_all(&p)).await?;
        let media_type = match media_type.or_else(|| sniff_media_type(&bytes)) {
            Some(t) => t,
            None => {
                return Err(CacheError::ManifestInvalid {
                    what: d.to_string(),
                    detail: "not a manifest".into(),
                });
            }
        };
        Ok(Some((
            Arc::new(Doc {
                bytes: Bytes::from(bytes),
                media_type,
                digest: d.clone(),
            }),
            visible,
        )))
    }

    async fn add_origin(&self, d: &Digest, up: &Arc<Upstream>) -> Result<(), CacheError> {
        let (store, d, name, public) = (self.store.clone(), d.clone(), up.name.clone(), up.public);
        blocking(move || store.add_origin(&d, &name, public)).await
    }

    /// GETs a manifest from the upstream, once however many ask at the same
    /// time, stores it and records the tag.
    ///
    /// A fetch records its result before it leaves the map, and the map is
    /// checked together with those records, so a request that missed just
    /// before a fetch finished does not start a second one.
    async fn fetch_manifest(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        reference: &ManifestRef,
    ) -> Result<Arc<Doc>, CacheError> {
        let key = format!("{}\0{repo}\0{reference}", up.name);
        let done = {
            let mut map = self
                .manifest_flights
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(f) = map.get(&key) {
                Err(f.clone())
            } else {
                let arrived = match reference {
                    ManifestRef::Digest(d) => Some(d.clone()).filter(|d| self.store.contains(d)),
                    ManifestRef::Tag(t) => self
                        .tags
                        .get(&up.name, repo, t)
                        .filter(|r| r.fresh(self.config.tag_ttl) && self.store.contains(&r.digest))
                        .map(|r| r.digest),
                };
                match arrived {
                    Some(d) => Ok(d),
                    None => {
                        // Under the flights lock: a fetch that got a 404
                        // recorded it before leaving the map.
                        let nkey = NotFound::manifest_key(&up.name, repo, &reference.to_string());
                        if let Some(e) = self.negative.get(&nkey) {
                            return Err(e);
                        }
                        let (up, repo, reference) =
                            (up.clone(), repo.to_string(), reference.clone());
                        let store = self.store.clone();
                        let tags = self.tags.clone();
                        let flights = self.manifest_flights.clone();
                        let negative = self.negative.clone();
                        let k = key.clone();
                        let f = async move {
                            let result = fetch_and_store(&up, &repo, &reference, store).await;
                            if let (Ok(doc), ManifestRef::Tag(t)) = (&result, &reference) {
                                tags.put(&up.name, &repo, t, TagRecord::now(doc.digest.clone()));
                            }
                            let result = result.map_err(Arc::new);
                            if let Err(e) = &result {
                                negative.put(nkey, e);
                            }
                            flights.lock().unwrap_or_else(|p| p.into_inner()).remove(&k);
                            result
                        }
                        .boxed()
                        .shared();
                        map.insert(key, f.clone());
                        Err(f)
                    }
                }
            }
        };
        match done {
            Ok(d) => match self.stored_doc(&d, up, repo).await? {
                Some(doc) => Ok(doc),
                // Evicted in between: fetch after all.
                None => Box::pin(self.fetch_manifest(up, repo, reference)).await,
            },
            Err(fut) => {
                // Run on its own task so a client hanging up does not cancel
                // the fetch for the others waiting on it.
                tokio::spawn(fut.clone());
                fut.await.map_err(CacheError::Shared)
            }
        }
    }

    // ---- blobs ----

    /// The blob from disk or from its download, checking that `up`'s
    /// clients may see it. Starts a download if there is none.
    pub async fn blob(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        digest: &Digest,
    ) -> Result<Lookup, CacheError> {
        let (flights, d, u, r) = (
            self.flights.clone(),
            digest.clone(),
            up.clone(),
            repo.to_string(),
        );
        let rt = tokio::runtime::Handle::current();
        let lookup = blocking(move || flights.lookup(&d, &u, &r, &rt)).await?;
        match &lookup {
            Lookup::Hit(p) => {
                if !p.meta.visible_to(&up.name) {
                    up.head_blob(repo, digest).await?;
                    self.add_origin(digest, up).await?;
                }
                Metrics::add(&self.metrics.blob_hits, 1);
            }
            Lookup::Flight(f) => {
                self.check_flight_access(f, up, repo).await?;
                Metrics::add(&self.metrics.blob_misses, 1);
            }
        }
        Ok(lookup)
    }

    async fn check_flight_access(
        &self,
        f: &Flight,
        up: &Arc<Upstream>,
        repo: &str,
    ) -> Result<(), CacheError> {
        if !f.upstream.public && f.upstream.name != up.name {
            up.head_blob(repo, &f.digest).await?;
        }
        Ok(())
    }

    /// The size of a blob for a `HEAD`, without starting a download.
    pub async fn blob_size(
        &self,
        up: &Arc<Upstream>,
        repo: &str,
        digest: &Digest,
    ) -> Result<u64, CacheError> {
        let (store, d) = (self.store.clone(), digest.clone());
        if let Some(p) = blocking(move || store.get(&d)).await? {
            if !p.meta.visible_to(&up.name) {
                up.head_blob(repo, digest).await?;
                self.add_origin(digest, up).await?;
            }
            return Ok(p.size);
        }
        let nkey = NotFound::blob_key(&up.name, repo, &digest.to_string());
        if let Some(e) = self.negative.get(&nkey) {
            return Err(e);
        }
        up.head_blob(repo, digest).await.map_err(|e| {
            let e = Arc::new(e);
            self.negative.put(nkey, &e);
            CacheError::Shared(e)
        })
    }
}

async fn fetch_and_store(
    up: &Arc<Upstream>,
    repo: &str,
    reference: &ManifestRef,
    store: Arc<Store>,
) -> Result<Arc<Doc>, CacheError> {
    let m = up.manifest(repo, reference).await?;
    let meta = Meta {
        media_type: Some(m.media_type.clone()),
        private_to: if up.public {
            vec![]
        } else {
            vec![up.name.clone()]
        },
        ..Default::default()
    };
    let (d, b) = (m.digest.clone(), m.bytes.clone());
    blocking(move || store.put_bytes(&d, &b, meta)).await?;
    Ok(Arc::new(Doc {
        bytes: m.bytes,
        media_type: m.media_type,
        digest: m.digest,
    }))
}

/// Whether an upstream error means "down" (serve stale) rather than "no".
fn unavailable(e: &CacheError) -> bool {
    match e {
        CacheError::Upstream { .. } => true,
        CacheError::Shared(inner) => unavailable(inner),
        _ => false,
    }
}

fn read_all(p: &Pinned) -> Result<Vec<u8>, CacheError> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; p.size as usize];
    p.file
        .read_exact_at(&mut buf, 0)
        .map_err(|e| CacheError::io("reading a cached manifest", e))?;
    Ok(buf)
}

/// Runs blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::io("blocking task", std::io::Error::other(e)))?
}

fn config_err(e: ConfigError) -> CacheError {
    CacheError::Config(e)
}
