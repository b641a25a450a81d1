//! HTTP client of the cache's `/dircache/v1` API ([`crate::wire`]).

use crate::chunk;
use crate::error::DircacheError;
use crate::manifest::{Manifest, check_name};
use crate::wire::{
    EntryInfo, EntryList, Found, GcReport, LookupRequest, MissingRequest, MissingResponse,
};
use bytes::Bytes;
use std::time::Duration;

/// A connection pool to one cache server.
#[derive(Clone)]
pub struct CacheClient {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
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
        // reqwest is built without a default crypto provider; install ring
        // once per process (a second install is refused harmlessly).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
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
