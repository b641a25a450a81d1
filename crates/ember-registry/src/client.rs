//! The HTTP side: endpoints, auth handshakes, retries, manifests and blobs.

use crate::auth::{Challenge, Credential, Credentials, basic_auth_value, parse_challenge};
use crate::error::{RegistryError, chain};
use bytes::Bytes;
use ember_oci::{Digest, Reference, media};
use reqwest::StatusCode;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, HeaderName, RANGE,
    WWW_AUTHENTICATE,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Manifests larger than this are refused: they are JSON documents of a few
/// KiB, and a registry (or a hostile mirror) must not make us buffer GiBs.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Mirror base URLs (`http://cache:5000`), tried in order before the
    /// origin registry.
    pub mirrors: Vec<String>,
    /// Registry hosts (`host[:port]`) that may be reached over plain HTTP.
    /// Loopback hosts always may.
    pub insecure_hosts: Vec<String>,
    /// Credentials by host.
    pub credentials: Credentials,
    /// Attempts per endpoint for retryable failures (connection errors,
    /// 429, 5xx).
    pub attempts: u32,
    /// Delay before the first retry; it quadruples per attempt.
    pub retry_delay: Duration,
    /// The `User-Agent` sent with every request.
    pub user_agent: String,
    /// Idle connections kept per host.
    pub pool_max_idle_per_host: usize,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            mirrors: Vec::new(),
            insecure_hosts: Vec::new(),
            credentials: Credentials::none(),
            attempts: 3,
            retry_delay: Duration::from_millis(200),
            user_agent: concat!("ember/", env!("CARGO_PKG_VERSION")).to_string(),
            pool_max_idle_per_host: 16,
        }
    }
}

/// One place a request can go: a mirror or an origin registry, with the
/// one credential that may be sent to it.
///
/// [`RegistryClient::manifest`] and [`RegistryClient::blob`] build these
/// from a [`Reference`] and the options (mirrors first); a pull-through
/// cache, which talks to one configured upstream at a time, builds its own
/// and uses the `*_at` methods.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `scheme://host[:port]` (plus a path prefix for some mirrors).
    base: String,
    /// What error messages call it (a registry host or an upstream name).
    name: String,
    /// Origin registry host, sent as `?ns=` to mirrors.
    ns: Option<String>,
    /// Sent only to this endpoint and the token service it names.
    credential: Option<Credential>,
}

impl Endpoint {
    /// An endpoint at `base` (`scheme://host[:port]`) called `name` in
    /// messages, with an optional credential of its own.
    pub fn new(name: impl Into<String>, base: &str, credential: Option<Credential>) -> Self {
        Endpoint {
            base: base.trim_end_matches('/').to_string(),
            name: name.into(),
            ns: None,
            credential,
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn url(&self, path: &str) -> String {
        match &self.ns {
            Some(ns) => format!("{}{}?ns={}", self.base, path, percent_encode(ns)),
            None => format!("{}{}", self.base, path),
        }
    }

    /// Tokens and auth decisions are kept per endpoint and credential: two
    /// upstreams at one URL with different credentials must not share a
    /// token.
    fn auth_key(&self) -> String {
        match &self.credential {
            Some(c) => format!("{}\0{}", self.base, c.username),
            None => self.base.clone(),
        }
    }
}

/// A manifest or index, verified against its digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// Media type: the registry's `Content-Type` unless it is a generic one
    /// (`application/json`, ...), else what the document declares or its
    /// shape says. [`RegistryClient::manifest`] further narrows it to a
    /// manifest or index type Ember reads.
    pub media_type: String,
    /// The digest the bytes were verified against: the one asked for, else
    /// the registry's `Docker-Content-Digest` (in its algorithm), else the
    /// sha256 of the bytes.
    pub digest: Digest,
    /// The raw document, exactly as served (its digest depends on it).
    pub bytes: Bytes,
    /// Which endpoint served it (a mirror or the origin).
    pub endpoint: String,
}

/// A blob body being received. The caller verifies the digest as it reads.
///
/// A body that breaks off (connection cut, shorter than its
/// `Content-Length`) on a mirror continues from the next endpoint (the
/// origin last) with a `Range` request for the rest, so one bad mirror
/// costs a reconnect, not the pull; if that endpoint ignores the `Range`,
/// the bytes already handed out are skipped. Only when no endpoint is left
/// does the break reach the caller, as [`RegistryError::Truncated`] or
/// [`RegistryError::Transport`].
pub struct BlobStream {
    inner: Arc<Inner>,
    response: reqwest::Response,
    what: String,
    url: String,
    repo: String,
    digest: Digest,
    /// Where in the blob this stream started (a `Range` request's offset).
    start: u64,
    /// The blob's whole size, if an endpoint said.
    total: Option<u64>,
    /// Position in the blob of the next byte handed to the caller.
    pos: u64,
    /// Position in the blob of the current response's next byte (behind
    /// `pos` while skipping what an endpoint that ignored `Range` resends).
    resp_pos: u64,
    /// Where the current response's body ends, if it said.
    resp_end: Option<u64>,
    /// Endpoints to continue from if this one breaks off.
    fallbacks: VecDeque<Endpoint>,
    /// Which endpoint serves it now.
    pub endpoint: String,
}

impl BlobStream {
    /// The announced length of the body from [`BlobStream::offset`] on, if
    /// any.
    pub fn content_length(&self) -> Option<u64> {
        self.total.map(|t| t.saturating_sub(self.start))
    }

    /// Where the body starts in the blob: 0, or the offset a `Range`
    /// request asked for when the registry honoured it.
    pub fn offset(&self) -> u64 {
        self.start
    }

    /// The blob's whole size, if the registry said.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// The next chunk, or `None` at the end. A body shorter than its
    /// `Content-Length` ends in [`RegistryError::Truncated`], never in a
    /// quiet `None`.
    ///
    /// Not cancel-safe while it reconnects to a fallback endpoint; use
    /// [`BlobStream::into_stream`] where a read may be dropped half-way.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
        loop {
            let err = match self.response.chunk().await {
                Ok(Some(mut b)) => {
                    let at = self.resp_pos;
                    self.resp_pos += b.len() as u64;
                    if at < self.pos {
                        // Resent by an endpoint that ignored our Range.
                        let skip = (self.pos - at).min(b.len() as u64) as usize;
                        b = b.slice(skip..);
                        if b.is_empty() {
                            continue;
                        }
                    }
                    self.pos += b.len() as u64;
                    return Ok(Some(b));
                }
                Ok(None) => match self.resp_end {
                    Some(end) if self.resp_pos < end => self.truncated(),
                    // Ended before the bytes already handed out: short.
                    _ if self.resp_pos < self.pos => self.truncated(),
                    _ => return Ok(None),
                },
                Err(e) => {
                    if (e.is_body() || e.is_decode())
                        && self.resp_end.is_some_and(|end| self.resp_pos < end)
                    {
                        self.truncated()
                    } else {
                        RegistryError::Transport {
                            what: self.what.clone(),
                            url: self.url.clone(),
                            detail: chain(&e),
                        }
                    }
                }
            };
            self.fall_back(err).await?;
        }
    }

    /// The body as a stream of chunks (cancel-safe: a dropped `next()`
    /// leaves the read in progress inside the stream).
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, RegistryError>> + Send + 'static {
        futures_util::stream::unfold(Some(self), |st| async move {
            let mut s = st?;
            match s.next_chunk().await {
                Ok(Some(b)) => Some((Ok(b), Some(s))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    fn truncated(&self) -> RegistryError {
        RegistryError::Truncated {
            what: self.what.clone(),
            expected: self.total.unwrap_or(self.resp_end.unwrap_or(self.resp_pos)),
            got: self.pos,
        }
    }

    /// Continues the body from the next endpoint that answers, or returns
    /// `err` when there is none.
    async fn fall_back(&mut self, mut err: RegistryError) -> Result<(), RegistryError> {
        loop {
            let Some(ep) = self.fallbacks.pop_front() else {
                return Err(err);
            };
            tracing::warn!(
                from = %self.endpoint, to = %ep.base, at = self.pos, error = %ember_error::chain(&err),
                "blob broke off; continuing from the next endpoint"
            );
            match self
                .inner
                .open_blob(&ep, &self.repo, &self.digest, self.pos, &self.what)
                .await
            {
                Ok(o) => {
                    if let (Some(a), Some(b)) = (self.total, o.total)
                        && a != b
                    {
                        err = RegistryError::Invalid {
                            what: self.what.clone(),
                            detail: format!(
                                "{} says {b} bytes, {} said {a}",
                                ep.base, self.endpoint
                            ),
                        };
                        continue;
                    }
                    self.resp_end = o.response.content_length().map(|n| o.offset + n);
                    self.resp_pos = o.offset;
                    self.response = o.response;
                    self.url = ep.url(&blob_path(&self.repo, &self.digest));
                    self.endpoint = ep.base.clone();
                    self.total = self.total.or(o.total);
                    return Ok(());
                }
                Err(e) => err = e,
            }
        }
    }
}

/// The start of a blob response.
struct Opened {
    response: reqwest::Response,
    offset: u64,
    total: Option<u64>,
}

#[derive(Default)]
struct AuthState {
    /// Bearer tokens by (endpoint auth key, repository).
    tokens: HashMap<(String, String), String>,
    /// Endpoint auth keys that asked for basic auth.
    basic: HashSet<String>,
    /// Endpoints whose `/v2/` answered.
    pinged: HashSet<String>,
}

/// A registry client shared by all pulls of a process; cheap to clone
/// (connections and tokens are shared between clones).
///
/// Everything that talks to a registry goes through here (the node's
/// pulls and the cache's upstream requests), so there is one place for
/// auth, tokens, retries and manifest verification.
#[derive(Clone)]
pub struct RegistryClient {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    http: reqwest::Client,
    opts: RegistryOptions,
    auth: Mutex<AuthState>,
}

impl RegistryClient {
    /// A client with `opts`.
    pub fn new(opts: RegistryOptions) -> Result<Self, RegistryError> {
        // reqwest is built without a default crypto provider (ring is much
        // quicker to build than aws-lc); install ring once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(opts.user_agent.clone())
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(opts.pool_max_idle_per_host)
            .build()
            .map_err(|e| RegistryError::Config(format!("building HTTP client: {}", chain(&e))))?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http,
                opts,
                auth: Mutex::new(AuthState::default()),
            }),
        })
    }

    pub(crate) fn endpoints(&self, r: &Reference) -> Result<Vec<Endpoint>, RegistryError> {
        let opts = &self.inner.opts;
        let mut eps = Vec::new();
        for m in &opts.mirrors {
            let base = m.trim_end_matches('/').to_string();
            let host = base
                .split("://")
                .nth(1)
                .unwrap_or(&base)
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            eps.push(Endpoint {
                credential: opts.credentials.get(&host).cloned(),
                base,
                name: r.registry().to_string(),
                ns: Some(r.registry().to_string()),
            });
        }
        let host = r.api_host().to_string();
        let insecure =
            r.is_loopback_registry() || opts.insecure_hosts.iter().any(|h| h == r.registry());
        let scheme = if insecure { "http" } else { "https" };
        eps.push(Endpoint {
            base: format!("{scheme}://{host}"),
            credential: opts.credentials.get(&host).cloned(),
            name: r.registry().to_string(),
            ns: None,
        });
        Ok(eps)
    }

    /// Checks that the origin registry (or its first working mirror) speaks
    /// the distribution API: `GET /v2/` answering 200 or 401.
    pub async fn ping(&self, r: &Reference) -> Result<String, RegistryError> {
        let eps = self.endpoints(r)?;
        let mut last = None;
        for ep in &eps {
            match self.inner.ping_endpoint(ep).await {
                Ok(()) => return Ok(ep.base.clone()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config("no endpoints".into())))
    }

    /// Fetches the manifest or index `reference` (a tag or digest) of `r`'s
    /// repository, trying mirrors first. Verifies it (see
    /// [`RegistryClient::manifest_at`]) and narrows its media type to a
    /// manifest or index type Ember reads.
    pub async fn manifest(
        &self,
        r: &Reference,
        reference: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let what = manifest_what(r.registry(), r.repository(), reference);
        let eps = self.endpoints(r)?;
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let got = self
                .inner
                .manifest_from(ep, r.repository(), reference, &what)
                .await
                .and_then(|m| readable_manifest(m, &what));
            match got {
                Ok(m) => return Ok(m),
                Err(e) if i + 1 < n => {
                    tracing::warn!(mirror = %ep.base, error = %ember_error::chain(&e), "mirror failed; trying next");
                }
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::Config(format!("{what}: no endpoints")))
    }

    /// Fetches manifest `reference` of `repo` from `ep` alone, keeping the
    /// registry's media type (see [`FetchedManifest::media_type`]).
    ///
    /// Verification: by digest, against that digest; by tag, against
    /// `Docker-Content-Digest` in whatever algorithm it names. A
    /// `Docker-Content-Digest` that cannot be checked (malformed, or an
    /// algorithm Ember does not implement) is an error, never skipped.
    pub async fn manifest_at(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let what = manifest_what(&ep.name, repo, reference);
        self.inner.manifest_from(ep, repo, reference, &what).await
    }

    /// `HEAD` of manifest `reference` of `repo` on `ep`: its
    /// `Docker-Content-Digest`, or `None` if the registry sent none (or one
    /// that does not parse: the caller then fetches and verifies it).
    pub async fn head_manifest_at(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &str,
    ) -> Result<Option<Digest>, RegistryError> {
        let what = manifest_what(&ep.name, repo, reference);
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .inner
            .send(
                ep,
                reqwest::Method::HEAD,
                repo,
                &path,
                &[(ACCEPT, media::MANIFEST_ACCEPT.to_string())],
                &what,
            )
            .await?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok()))
    }

    /// `HEAD` of blob `digest` of `repo` on `ep`: its size.
    pub async fn head_blob_at(
        &self,
        ep: &Endpoint,
        repo: &str,
        digest: &Digest,
    ) -> Result<u64, RegistryError> {
        let what = format!("blob {digest} of {}/{repo}", ep.name);
        let resp = self
            .inner
            .send(
                ep,
                reqwest::Method::HEAD,
                repo,
                &blob_path(repo, digest),
                &[],
                &what,
            )
            .await?;
        resp.headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| RegistryError::Invalid {
                what,
                detail: "HEAD without Content-Length".into(),
            })
    }

    /// Starts fetching blob `digest` of `r`'s repository, trying mirrors
    /// first; a body that breaks off continues from the next endpoint (see
    /// [`BlobStream`]). The stream is not verified: the caller hashes what
    /// it reads.
    pub async fn blob(&self, r: &Reference, digest: &Digest) -> Result<BlobStream, RegistryError> {
        let what = format!("blob {digest} of {}", r.name());
        let mut eps: VecDeque<Endpoint> = self.endpoints(r)?.into();
        while let Some(ep) = eps.pop_front() {
            match self
                .inner
                .open_blob(&ep, r.repository(), digest, 0, &what)
                .await
            {
                Ok(o) => return Ok(self.stream(o, ep, r.repository(), digest, what, eps)),
                Err(e) if !eps.is_empty() => {
                    tracing::warn!(mirror = %ep.base, error = %ember_error::chain(&e), "mirror failed; trying next");
                }
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::Config(format!("{what}: no endpoints")))
    }

    /// Starts fetching blob `digest` of `repo` from `ep` alone, from byte
    /// `from` (a `Range` request when `from > 0`). The registry may ignore
    /// the `Range`: then [`BlobStream::offset`] is 0 and the body is the
    /// whole blob. Not verified: the caller hashes what it reads.
    pub async fn blob_at(
        &self,
        ep: &Endpoint,
        repo: &str,
        digest: &Digest,
        from: u64,
    ) -> Result<BlobStream, RegistryError> {
        let what = format!("blob {digest} of {}/{repo}", ep.name);
        let o = self.inner.open_blob(ep, repo, digest, from, &what).await?;
        Ok(self.stream(o, ep.clone(), repo, digest, what, VecDeque::new()))
    }

    fn stream(
        &self,
        o: Opened,
        ep: Endpoint,
        repo: &str,
        digest: &Digest,
        what: String,
        fallbacks: VecDeque<Endpoint>,
    ) -> BlobStream {
        BlobStream {
            inner: self.inner.clone(),
            resp_end: o.response.content_length().map(|n| o.offset + n),
            response: o.response,
            url: ep.url(&blob_path(repo, digest)),
            what,
            repo: repo.to_string(),
            digest: digest.clone(),
            start: o.offset,
            total: o.total,
            pos: o.offset,
            resp_pos: o.offset,
            fallbacks,
            endpoint: ep.base,
        }
    }

    /// Fetches a small blob (an image config) whole and verifies it.
    pub async fn blob_bytes(
        &self,
        r: &Reference,
        digest: &Digest,
        max: usize,
    ) -> Result<Bytes, RegistryError> {
        let mut s = self.blob(r, digest).await?;
        let what = format!("blob {digest} of {}", r.name());
        let mut body = Vec::new();
        let mut v = digest.verifier();
        while let Some(c) = s.next_chunk().await? {
            v.update(&c);
            body.extend_from_slice(&c);
            if body.len() > max {
                return Err(RegistryError::Invalid {
                    what,
                    detail: format!("larger than {max} bytes"),
                });
            }
        }
        v.finish().map_err(|actual| RegistryError::DigestMismatch {
            what,
            expected: digest.clone(),
            actual,
        })?;
        Ok(Bytes::from(body))
    }
}

impl Inner {
    async fn ping_endpoint(&self, ep: &Endpoint) -> Result<(), RegistryError> {
        if self.lock().pinged.contains(&ep.base) {
            return Ok(());
        }
        let url = format!("{}/v2/", ep.base);
        let what = format!("registry {}", ep.base);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| RegistryError::Transport {
                what: what.clone(),
                url: url.clone(),
                detail: chain(&e),
            })?;
        let status = resp.status();
        if status.is_success() || status == StatusCode::UNAUTHORIZED {
            if let Some(Challenge::Basic) = challenge_of(resp.headers()) {
                self.lock().basic.insert(ep.auth_key());
            }
            self.lock().pinged.insert(ep.base.clone());
            Ok(())
        } else {
            Err(RegistryError::Status {
                what,
                status: status.as_u16(),
                detail: "the /v2/ endpoint does not answer like a registry".into(),
            })
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // A panic while holding this lock cannot leave the maps half-updated
        // in a way that matters (each insert is atomic), so recover.
        self.auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn auth_header(&self, ep: &Endpoint, repo: &str) -> Option<String> {
        let st = self.lock();
        if let Some(t) = st.tokens.get(&(ep.auth_key(), repo.to_string())) {
            return Some(format!("Bearer {t}"));
        }
        if st.basic.contains(&ep.auth_key())
            && let Some(c) = &ep.credential
        {
            return Some(basic_auth_value(c));
        }
        None
    }

    /// Answers a 401's challenge: remembers basic auth or fetches a token.
    /// Returns false when there is nothing more we can try.
    async fn authenticate(
        &self,
        ep: &Endpoint,
        repo: &str,
        headers: &HeaderMap,
        what: &str,
    ) -> Result<bool, RegistryError> {
        match challenge_of(headers) {
            Some(Challenge::Basic) => {
                if ep.credential.is_none() {
                    return Ok(false);
                }
                let mut st = self.lock();
                Ok(st.basic.insert(ep.auth_key()))
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let scope = scope.unwrap_or_else(|| format!("repository:{repo}:pull"));
                let url = token_url(&realm, &scope, service.as_deref());
                let mut req = self.http.get(&url);
                if let Some(c) = &ep.credential {
                    req = req.basic_auth(&c.username, Some(&c.password));
                }
                let resp = req.send().await.map_err(|e| RegistryError::Transport {
                    what: format!("{what}: token"),
                    url: realm.clone(),
                    detail: chain(&e),
                })?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(RegistryError::Unauthorized {
                        what: what.to_string(),
                        detail: format!("token service {realm} answered {status}"),
                    });
                }
                #[derive(serde::Deserialize)]
                struct TokenResponse {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let raw = resp.bytes().await.map_err(|e| RegistryError::Transport {
                    what: format!("{what}: token"),
                    url: realm.clone(),
                    detail: chain(&e),
                })?;
                let body: TokenResponse =
                    serde_json::from_slice(&raw).map_err(|e| RegistryError::Invalid {
                        what: format!("{what}: token"),
                        detail: e.to_string(),
                    })?;
                let Some(token) = body.token.or(body.access_token) else {
                    return Err(RegistryError::Invalid {
                        what: format!("{what}: token"),
                        detail: "no token in the token service's answer".into(),
                    });
                };
                let mut st = self.lock();
                let key = (ep.auth_key(), repo.to_string());
                let fresh = st.tokens.get(&key) != Some(&token);
                st.tokens.insert(key, token);
                Ok(fresh)
            }
            None => Ok(false),
        }
    }

    /// Sends `method path` to one endpoint with auth and retries; returns
    /// a success response or the error it ended in.
    async fn send(
        &self,
        ep: &Endpoint,
        method: reqwest::Method,
        repo: &str,
        path: &str,
        headers: &[(HeaderName, String)],
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = ep.url(path);
        self.send_url(ep, method, repo, &url, headers, None, what)
            .await
    }

    /// [`Inner::send`] to a full URL (an upload's `Location`), with a body
    /// made afresh for every attempt (a retry or an auth round resends it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_url(
        &self,
        ep: &Endpoint,
        method: reqwest::Method,
        repo: &str,
        url: &str,
        headers: &[(HeaderName, String)],
        body: Option<&(dyn Fn() -> Result<reqwest::Body, RegistryError> + Send + Sync)>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        self.ping_endpoint(ep).await?;
        let url = url.to_string();
        let mut attempt = 0;
        let mut auth_rounds = 0;
        loop {
            attempt += 1;
            let mut req = self.http.request(method.clone(), &url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(b) = body {
                req = req.body(b()?);
            }
            if let Some(h) = self.auth_header(ep, repo) {
                req = req.header(AUTHORIZATION, h);
            }
            let result = req.send().await;
            let err = match result {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && auth_rounds < 2 => {
                    auth_rounds += 1;
                    attempt -= 1;
                    let headers = resp.headers().clone();
                    if self.authenticate(ep, repo, &headers, what).await? {
                        continue;
                    }
                    status_error(resp, what).await
                }
                Ok(resp) => status_error(resp, what).await,
                Err(e) => RegistryError::Transport {
                    what: what.to_string(),
                    url: url.clone(),
                    detail: chain(&e),
                },
            };
            if !err.is_retryable() || attempt >= self.opts.attempts.max(1) {
                return Err(err);
            }
            let delay = self.opts.retry_delay * 4u32.pow(attempt - 1);
            tracing::debug!(%url, attempt, ?delay, error = %ember_error::chain(&err), "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn manifest_from(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &str,
        what: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        // A reference that looks like a digest but is not one is refused
        // here: sent as a tag it would come back unverified.
        let by_digest = if reference.contains(':') {
            Some(
                reference
                    .parse::<Digest>()
                    .map_err(|e| RegistryError::Invalid {
                        what: what.to_string(),
                        detail: e.to_string(),
                    })?,
            )
        } else {
            None
        };
        let path = format!("/v2/{repo}/manifests/{reference}");
        let mut resp = self
            .send(
                ep,
                reqwest::Method::GET,
                repo,
                &path,
                &[(ACCEPT, media::MANIFEST_ACCEPT.to_string())],
                what,
            )
            .await?;
        let too_large = || RegistryError::TooLarge {
            what: what.to_string(),
            limit: MAX_MANIFEST_BYTES,
        };
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_BYTES as u64)
        {
            return Err(too_large());
        }
        let header_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string());
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    body.extend_from_slice(&c);
                    if body.len() > MAX_MANIFEST_BYTES {
                        return Err(too_large());
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(RegistryError::Transport {
                        what: what.to_string(),
                        url: ep.base.clone(),
                        detail: chain(&e),
                    });
                }
            }
        }
        let expected = match (by_digest, header_digest) {
            (Some(d), _) => d,
            (None, Some(h)) => h.parse::<Digest>().map_err(|e| RegistryError::Invalid {
                what: what.to_string(),
                detail: format!("Docker-Content-Digest cannot be checked: {e}"),
            })?,
            (None, None) => Digest::sha256_of(&body),
        };
        let mut v = expected.verifier();
        v.update(&body);
        v.finish().map_err(|actual| RegistryError::DigestMismatch {
            what: what.to_string(),
            expected: expected.clone(),
            actual,
        })?;
        let media_type = match header_type.filter(|t| specific_type(t)) {
            Some(t) => t,
            None => ember_oci::manifest::sniff_media_type(&body).ok_or_else(|| {
                RegistryError::Invalid {
                    what: what.to_string(),
                    detail: "no media type in the response or the document".into(),
                }
            })?,
        };
        Ok(FetchedManifest {
            media_type,
            digest: expected,
            bytes: Bytes::from(body),
            endpoint: ep.base.clone(),
        })
    }

    /// `GET` of a blob from `from` on, with the offset and total the
    /// registry's answer gives.
    async fn open_blob(
        &self,
        ep: &Endpoint,
        repo: &str,
        digest: &Digest,
        from: u64,
        what: &str,
    ) -> Result<Opened, RegistryError> {
        let headers = if from > 0 {
            vec![(RANGE, format!("bytes={from}-"))]
        } else {
            vec![]
        };
        let response = self
            .send(
                ep,
                reqwest::Method::GET,
                repo,
                &blob_path(repo, digest),
                &headers,
                what,
            )
            .await?;
        match response.status() {
            StatusCode::OK => Ok(Opened {
                total: response.content_length(),
                response,
                offset: 0,
            }),
            StatusCode::PARTIAL_CONTENT if from > 0 => {
                let cr = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                match cr {
                    Some((start, total)) if start == from => Ok(Opened {
                        total: total.or_else(|| response.content_length().map(|n| n + from)),
                        response,
                        offset: from,
                    }),
                    _ => Err(RegistryError::Invalid {
                        what: what.to_string(),
                        detail: format!("unusable Content-Range for bytes={from}-"),
                    }),
                }
            }
            s => Err(RegistryError::Invalid {
                what: what.to_string(),
                detail: format!("answered {s} to a blob GET"),
            }),
        }
    }
}

pub(crate) fn blob_path(repo: &str, digest: &Digest) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

fn manifest_what(registry: &str, repo: &str, reference: &str) -> String {
    format!("manifest {registry}/{repo}:{reference}")
        .replace(":sha256:", "@sha256:")
        .replace(":sha512:", "@sha512:")
}

/// Narrows a fetched manifest's media type to one Ember reads, sniffing the
/// document when the registry's type is not one.
fn readable_manifest(mut m: FetchedManifest, what: &str) -> Result<FetchedManifest, RegistryError> {
    if media::manifest_kind(&m.media_type).is_none() {
        m.media_type = readable_media_type(&m.bytes).ok_or_else(|| RegistryError::Invalid {
            what: what.to_string(),
            detail: "not an OCI or Docker schema 2 manifest or index".into(),
        })?;
    }
    Ok(m)
}

/// The token request URL for a realm, which may already carry a query
/// string of its own (`https://auth.example/token?service=x`).
fn token_url(realm: &str, scope: &str, service: Option<&str>) -> String {
    let sep = match realm.rfind('?') {
        None => "?",
        Some(i) if i + 1 == realm.len() || realm.ends_with('&') => "",
        Some(_) => "&",
    };
    let mut url = format!("{realm}{sep}scope={}", percent_encode(scope));
    if let Some(s) = service {
        url.push_str(&format!("&service={}", percent_encode(s)));
    }
    url
}

/// `bytes START-END/TOTAL` → (START, Some(TOTAL)); `*` total → None.
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}

/// Whether a `Content-Type` says which kind of manifest this is (registries
/// behind some proxies answer a generic type).
fn specific_type(t: &str) -> bool {
    !matches!(
        t,
        "" | "application/json" | "text/plain" | "application/octet-stream"
    )
}

fn challenge_of(headers: &HeaderMap) -> Option<Challenge> {
    headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(parse_challenge)
        .next()
}

/// Turns a non-success response into an error carrying the registry's OCI
/// error code and message.
async fn status_error(resp: reqwest::Response, what: &str) -> RegistryError {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let detail = oci_error_detail(&body).unwrap_or_else(|| {
        status
            .canonical_reason()
            .unwrap_or("unexpected status")
            .to_string()
    });
    match status {
        StatusCode::NOT_FOUND => RegistryError::NotFound {
            what: what.to_string(),
            detail,
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RegistryError::Unauthorized {
            what: what.to_string(),
            detail,
        },
        s => RegistryError::Status {
            what: what.to_string(),
            status: s.as_u16(),
            detail,
        },
    }
}

/// `CODE: message` from an OCI error body, if it is one.
fn oci_error_detail(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let e = v.get("errors")?.as_array()?.first()?;
    let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("UNKNOWN");
    let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
    Some(format!("{code}: {msg}"))
}

/// A manifest or index type Ember reads, from the document itself, for
/// registries that send a generic or wrong `Content-Type`. Stricter than
/// [`ember_oci::manifest::sniff_media_type`] (which keeps whatever type a
/// document declares, as a cache must): a pull needs a type it can read.
fn readable_media_type(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    if let Some(t) = v.get("mediaType").and_then(|t| t.as_str())
        && media::manifest_kind(t).is_some()
    {
        return Some(t.to_string());
    }
    if v.get("manifests").is_some() {
        Some(media::OCI_INDEX.to_string())
    } else if v.get("layers").is_some() && v.get("config").is_some() {
        Some(media::OCI_MANIFEST.to_string())
    } else {
        None
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved
/// characters), for `?ns=` and token requests.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_order_and_ns() {
        let c = RegistryClient::new(RegistryOptions {
            mirrors: vec!["http://127.0.0.1:9000/".into()],
            ..Default::default()
        })
        .unwrap();
        let r: Reference = "busybox".parse().unwrap();
        let eps = c.endpoints(&r).unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(
            eps[0].url("/v2/library/busybox/manifests/latest"),
            "http://127.0.0.1:9000/v2/library/busybox/manifests/latest?ns=docker.io"
        );
        assert_eq!(eps[1].base, "https://registry-1.docker.io");
        let r: Reference = "127.0.0.1:5000/app".parse().unwrap();
        assert_eq!(c.endpoints(&r).unwrap()[1].base, "http://127.0.0.1:5000");
        assert_eq!(percent_encode("127.0.0.1:5000"), "127.0.0.1%3A5000");
    }

    #[test]
    fn token_url_keeps_the_realms_query() {
        let scope = "repository:a/b:pull";
        assert_eq!(
            token_url("https://auth/token", scope, Some("reg")),
            "https://auth/token?scope=repository%3Aa%2Fb%3Apull&service=reg"
        );
        // Regression: `{realm}?scope=` made `?foo=bar?scope=...`, so the
        // token service saw no scope at all.
        assert_eq!(
            token_url("https://auth/token?foo=bar", scope, None),
            "https://auth/token?foo=bar&scope=repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(
            token_url("https://auth/token?", scope, None),
            "https://auth/token?scope=repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 5-9/10"), None);
    }

    #[test]
    fn error_bodies() {
        assert_eq!(
            oci_error_detail(
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
            ),
            Some("MANIFEST_UNKNOWN: manifest unknown".into())
        );
        assert_eq!(oci_error_detail("<html>"), None);
        assert_eq!(
            readable_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(media::OCI_INDEX)
        );
    }
}
