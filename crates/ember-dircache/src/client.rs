//! HTTP client of the cache's `/dircache/v1` API ([`crate::wire`]).

use crate::chunk;
use crate::error::DircacheError;
use crate::manifest::{Manifest, check_name};
use crate::wire::{
    EntryInfo, EntryList, Found, GcReport, LookupRequest, MissingRequest, MissingResponse,
};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A connection pool to one cache server.
#[derive(Clone)]
pub struct CacheClient {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
    /// Set once the server turned out not to know `chunks/fetch` (an older
    /// cache): chunks are then asked for one request each.
    no_batch: Arc<AtomicBool>,
}

/// Whether an entry PUT stored a new entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Stored.
    Created,
    /// The key already had an entry (entries are immutable); nothing changed.
    Exists,
}

fn query(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

impl CacheClient {
    /// A client for the cache at `url` (`http://host:port`). `token` is
    /// sent as a bearer token: the cache requires it for writes into its
    /// protected scopes.
    pub fn new(url: &str, token: Option<String>) -> Result<Self, DircacheError> {
        let http = ember_http::client::builder(&[url])
            .connect_timeout(Duration::from_secs(10))
            // Per request, generous: a slow machine must not fail a save.
            .timeout(Duration::from_secs(300))
            .pool_max_idle_per_host(32)
            .user_agent(concat!("ember-dircache/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DircacheError::Transport {
                url: url.to_string(),
                detail: ember_error::chain(&e).to_string(),
            })?;
        Ok(CacheClient {
            base: url.trim_end_matches('/').to_string(),
            http,
            token,
            no_batch: Arc::default(),
        })
    }

    /// The cache's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn req(&self, method: reqwest::Method, path: &str) -> (String, reqwest::RequestBuilder) {
        let url = format!("{}/dircache/v1/{path}", self.base);
        let mut r = self.http.request(method, &url);
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        (url, r)
    }

    async fn send(
        &self,
        what: &str,
        url: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, DircacheError> {
        let resp = req.send().await.map_err(|e| transport(url, &e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(refused(what, resp).await)
    }

    async fn json<T: serde::de::DeserializeOwned>(
        url: &str,
        resp: reqwest::Response,
    ) -> Result<T, DircacheError> {
        let body = resp.bytes().await.map_err(|e| transport(url, &e))?;
        serde_json::from_slice(&body).map_err(|e| DircacheError::Transport {
            url: url.to_string(),
            detail: format!("unreadable answer: {e}"),
        })
    }

    /// Which of `digests` the cache lacks.
    pub async fn missing(&self, digests: &[String]) -> Result<Vec<String>, DircacheError> {
        let (url, r) = self.req(reqwest::Method::POST, "chunks/missing");
        let body = serde_json::to_vec(&MissingRequest {
            digests: digests.to_vec(),
        })
        .map_err(|e| DircacheError::io("encoding a request", e.into()))?;
        let resp = self
            .send("a missing-chunks query", &url, r.body(body))
            .await?;
        Ok(Self::json::<MissingResponse>(&url, resp).await?.missing)
    }

    /// Uploads a compressed chunk.
    pub async fn put_chunk(&self, digest: &str, stored: Bytes) -> Result<(), DircacheError> {
        let (url, r) = self.req(reqwest::Method::PUT, &format!("chunks/{digest}"));
        self.send(&format!("chunk {digest}"), &url, r.body(stored))
            .await?;
        Ok(())
    }

    /// Downloads a chunk and returns its bytes, decompressed and verified.
    pub async fn get_chunk(&self, digest: &str, size: u32) -> Result<Vec<u8>, DircacheError> {
        let (url, r) = self.req(reqwest::Method::GET, &format!("chunks/{digest}"));
        let resp = match self.send(&format!("chunk {digest}"), &url, r).await {
            Err(DircacheError::Refused { status: 404, .. }) => {
                return Err(DircacheError::ChunkMissing(digest.to_string()));
            }
            r => r?,
        };
        let stored = resp.bytes().await.map_err(|e| transport(&url, &e))?;
        let digest = digest.to_string();
        tokio::task::spawn_blocking(move || chunk::open(&digest, &stored, Some(size)))
            .await
            .map_err(|e| DircacheError::io("verifying a chunk", std::io::Error::other(e)))?
    }

    /// Downloads several chunks in one request (`chunks/fetch`), returned
    /// as stored: compressed and **not yet verified**; pass each through
    /// [`chunk::open`] or [`chunk::open_into`]. In the order asked; a
    /// server without that route gets one GET per chunk instead.
    pub async fn fetch_stored(&self, digests: &[&str]) -> Result<Vec<Bytes>, DircacheError> {
        if !self.no_batch.load(Ordering::Relaxed) {
            match self.fetch_batch(digests).await? {
                Some(v) => return Ok(v),
                None => self.no_batch.store(true, Ordering::Relaxed),
            }
        }
        let one = |d: &str| {
            let d = d.to_string();
            async move {
                let (url, r) = self.req(reqwest::Method::GET, &format!("chunks/{d}"));
                let resp = match self.send(&format!("chunk {d}"), &url, r).await {
                    Err(DircacheError::Refused { status: 404, .. }) => {
                        return Err(DircacheError::ChunkMissing(d));
                    }
                    r => r?,
                };
                resp.bytes().await.map_err(|e| transport(&url, &e))
            }
        };
        futures_util::future::try_join_all(digests.iter().map(|d| one(d))).await
    }

    /// `Ok(None)` when the server lacks the route.
    async fn fetch_batch(&self, digests: &[&str]) -> Result<Option<Vec<Bytes>>, DircacheError> {
        let (url, r) = self.req(reqwest::Method::POST, "chunks/fetch");
        let body = serde_json::to_vec(&MissingRequest {
            digests: digests.iter().map(|d| d.to_string()).collect(),
        })
        .map_err(|e| DircacheError::io("encoding a request", e.into()))?;
        let resp = match self.send("a chunk fetch", &url, r.body(body)).await {
            Ok(resp) => resp,
            Err(DircacheError::Refused {
                status: 404,
                code,
                message,
                ..
            }) if code == "BLOB_UNKNOWN" => {
                // The message names the digest; report the first one asked
                // for that it mentions.
                let d = digests
                    .iter()
                    .find(|d| message.contains(**d))
                    .map_or_else(|| message.clone(), |d| d.to_string());
                return Err(DircacheError::ChunkMissing(d));
            }
            // No such route (404 without a registry code) or method.
            Err(DircacheError::Refused {
                status: 404 | 405, ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let body = resp.bytes().await.map_err(|e| transport(&url, &e))?;
        let mut out = Vec::with_capacity(digests.len());
        let mut pos = 0usize;
        let short = |got: usize| DircacheError::Transport {
            url: url.clone(),
            detail: format!(
                "the chunk fetch answer ends after {got} of {} chunks",
                digests.len()
            ),
        };
        for _ in digests {
            let Some(len) = body.get(pos..pos + 4) else {
                return Err(short(out.len()));
            };
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            pos += 4;
            if body.len() - pos < len {
                return Err(short(out.len()));
            }
            out.push(body.slice(pos..pos + len));
            pos += len;
        }
        if pos != body.len() {
            return Err(DircacheError::Transport {
                url,
                detail: "the chunk fetch answer is longer than the chunks asked for".into(),
            });
        }
        Ok(Some(out))
    }

    /// Stores an entry's manifest under `scope` and `key`.
    pub async fn put_entry(
        &self,
        scope: &str,
        key: &str,
        manifest: &Manifest,
    ) -> Result<Stored, DircacheError> {
        check_name("scope", scope)?;
        check_name("key", key)?;
        let (url, r) = self.req(
            reqwest::Method::PUT,
            &format!("entry?{}", query(&[("scope", scope), ("key", key)])),
        );
        let body = serde_json::to_vec(manifest)
            .map_err(|e| DircacheError::io("encoding the manifest", e.into()))?;
        match self
            .send(&format!("entry {scope}/{key}"), &url, r.body(body))
            .await
        {
            Ok(_) => Ok(Stored::Created),
            Err(DircacheError::Refused { status: 409, .. }) => Ok(Stored::Exists),
            Err(DircacheError::Refused { status: 403, .. }) => {
                Err(DircacheError::ReadOnly(scope.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// The entry stored under exactly `scope` and `key`, if any.
    pub async fn get_entry(&self, scope: &str, key: &str) -> Result<Option<Found>, DircacheError> {
        let (url, r) = self.req(
            reqwest::Method::GET,
            &format!("entry?{}", query(&[("scope", scope), ("key", key)])),
        );
        match self.send(&format!("entry {scope}/{key}"), &url, r).await {
            Ok(resp) => Ok(Some(Self::json(&url, resp).await?)),
            Err(DircacheError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether exactly `scope`/`key` has an entry (a HEAD: the manifest is
    /// not transferred).
    pub async fn exists(&self, scope: &str, key: &str) -> Result<bool, DircacheError> {
        let (url, r) = self.req(
            reqwest::Method::HEAD,
            &format!("entry?{}", query(&[("scope", scope), ("key", key)])),
        );
        match self.send(&format!("entry {scope}/{key}"), &url, r).await {
            Ok(_) => Ok(true),
            Err(DircacheError::Refused { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Looks an entry up with prefix and restore-key fallbacks.
    pub async fn lookup(&self, req: &LookupRequest) -> Result<Option<Found>, DircacheError> {
        let (url, r) = self.req(reqwest::Method::POST, "lookup");
        let body = serde_json::to_vec(req)
            .map_err(|e| DircacheError::io("encoding a request", e.into()))?;
        match self.send("a lookup", &url, r.body(body)).await {
            Ok(resp) => Ok(Some(Self::json(&url, resp).await?)),
            Err(DircacheError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A scope's entries, newest first.
    pub async fn list(&self, scope: &str) -> Result<Vec<EntryInfo>, DircacheError> {
        let (url, r) = self.req(
            reqwest::Method::GET,
            &format!("entries?{}", query(&[("scope", scope)])),
        );
        let resp = self.send("a listing", &url, r).await?;
        Ok(Self::json::<EntryList>(&url, resp).await?.entries)
    }

    /// Removes an entry; false if there was none.
    pub async fn remove(&self, scope: &str, key: &str) -> Result<bool, DircacheError> {
        let (url, r) = self.req(
            reqwest::Method::DELETE,
            &format!("entry?{}", query(&[("scope", scope), ("key", key)])),
        );
        match self.send(&format!("entry {scope}/{key}"), &url, r).await {
            Ok(_) => Ok(true),
            Err(DircacheError::Refused { status: 404, .. }) => Ok(false),
            Err(DircacheError::Refused { status: 403, .. }) => {
                Err(DircacheError::ReadOnly(scope.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// Asks the cache to apply budgets and expiry and to remove chunks no
    /// entry refers to now.
    pub async fn gc(&self) -> Result<GcReport, DircacheError> {
        let (url, r) = self.req(reqwest::Method::POST, "gc");
        let resp = self.send("a garbage collection", &url, r).await?;
        Self::json(&url, resp).await
    }
}

fn transport(url: &str, e: &reqwest::Error) -> DircacheError {
    DircacheError::Transport {
        url: url.to_string(),
        detail: ember_error::chain(e).to_string(),
    }
}

async fn refused(what: &str, resp: reqwest::Response) -> DircacheError {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let e = &v["errors"][0];
    DircacheError::Refused {
        what: what.to_string(),
        status,
        code: e["code"].as_str().unwrap_or("").to_string(),
        message: e["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect()),
    }
}
