//! The HTTP side: endpoints, auth handshakes, retries, manifests and blobs.

use crate::auth::{Challenge, Credentials, basic_auth_value, parse_challenge};
use crate::error::{RegistryError, chain};
use bytes::Bytes;
use ember_oci::{Digest, Reference, media};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
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
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            mirrors: Vec::new(),
            insecure_hosts: Vec::new(),
            credentials: Credentials::none(),
            attempts: 3,
            retry_delay: Duration::from_millis(200),
        }
    }
}

/// One place a request can go: a mirror or the origin registry.
#[derive(Debug, Clone)]
struct Endpoint {
    /// `scheme://host[:port]` (plus a path prefix for some mirrors).
    base: String,
    /// Host used to look up credentials.
    host: String,
    /// Origin registry host, sent as `?ns=` to mirrors.
    ns: Option<String>,
}

impl Endpoint {
    fn url(&self, path: &str) -> String {
        match &self.ns {
            Some(ns) => format!("{}{}?ns={}", self.base, path, percent_encode(ns)),
            None => format!("{}{}", self.base, path),
        }
    }
}

/// A manifest or index, verified against its digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// Media type from `Content-Type` or, failing that, the document.
    pub media_type: String,
    /// sha256 of `bytes`.
    pub digest: Digest,
    /// The raw document, exactly as served (its digest depends on it).
    pub bytes: Bytes,
    /// Which endpoint served it (a mirror or the origin).
    pub endpoint: String,
}

/// A blob body being received. The caller verifies the digest as it reads.
pub struct BlobStream {
    response: reqwest::Response,
    what: String,
    url: String,
    expected_len: Option<u64>,
    received: u64,
    /// Which endpoint serves it.
    pub endpoint: String,
}

impl BlobStream {
    /// The announced length, if any.
    pub fn content_length(&self) -> Option<u64> {
        self.expected_len
    }

    /// The next chunk, or `None` at the end. A body shorter than its
    /// `Content-Length` ends in [`RegistryError::Truncated`], never in a
    /// quiet `None`.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, RegistryError> {
        match self.response.chunk().await {
            Ok(Some(b)) => {
                self.received += b.len() as u64;
                Ok(Some(b))
            }
            Ok(None) => match self.expected_len {
                Some(n) if self.received < n => Err(RegistryError::Truncated {
                    what: self.what.clone(),
                    expected: n,
                    got: self.received,
                }),
                _ => Ok(None),
            },
            Err(e) => Err(match self.expected_len {
                Some(n) if self.received < n && e.is_body() || e.is_decode() => {
                    RegistryError::Truncated {
                        what: self.what.clone(),
                        expected: n,
                        got: self.received,
                    }
                }
                _ => RegistryError::Transport {
                    what: self.what.clone(),
                    url: self.url.clone(),
                    detail: chain(&e),
                },
            }),
        }
    }
}

#[derive(Default)]
struct AuthState {
    /// Bearer tokens by (endpoint base, repository).
    tokens: HashMap<(String, String), String>,
    /// Endpoints that asked for basic auth.
    basic: HashSet<String>,
    /// Endpoints whose `/v2/` answered.
    pinged: HashSet<String>,
}

/// A registry client shared by all pulls of a process; cheap to clone
/// connections are pooled inside.
pub struct RegistryClient {
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
            .user_agent(concat!("ember/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(16)
            .build()
            .map_err(|e| RegistryError::Config(format!("building HTTP client: {}", chain(&e))))?;
        Ok(RegistryClient {
            http,
            opts,
            auth: Mutex::new(AuthState::default()),
        })
    }

    fn endpoints(&self, r: &Reference) -> Result<Vec<Endpoint>, RegistryError> {
        let mut eps = Vec::new();
        for m in &self.opts.mirrors {
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
                base,
                host,
                ns: Some(r.registry().to_string()),
            });
        }
        let host = r.api_host().to_string();
        let insecure =
            r.is_loopback_registry() || self.opts.insecure_hosts.iter().any(|h| h == r.registry());
        let scheme = if insecure { "http" } else { "https" };
        eps.push(Endpoint {
            base: format!("{scheme}://{host}"),
            host,
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
            match self.ping_endpoint(ep).await {
                Ok(()) => return Ok(ep.base.clone()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Config("no endpoints".into())))
    }

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
                self.lock().basic.insert(ep.base.clone());
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
        if let Some(t) = st.tokens.get(&(ep.base.clone(), repo.to_string())) {
            return Some(format!("Bearer {t}"));
        }
        if st.basic.contains(&ep.base)
            && let Some(c) = self.opts.credentials.get(&ep.host)
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
                if self.opts.credentials.get(&ep.host).is_none() {
                    return Ok(false);
                }
                let mut st = self.lock();
                Ok(st.basic.insert(ep.base.clone()))
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let scope = scope.unwrap_or_else(|| format!("repository:{repo}:pull"));
                let mut url = format!("{realm}?scope={}", percent_encode(&scope));
                if let Some(s) = service {
                    url.push_str(&format!("&service={}", percent_encode(&s)));
                }
                let mut req = self.http.get(&url);
                if let Some(c) = self.opts.credentials.get(&ep.host) {
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
                let key = (ep.base.clone(), repo.to_string());
                let fresh = st.tokens.get(&key) != Some(&token);
                st.tokens.insert(key, token);
                Ok(fresh)
            }
            None => Ok(false),
        }
    }

    /// GET `path` on one endpoint with auth and retries; returns a success
    /// response or the error it ended in.
    async fn get(
        &self,
        ep: &Endpoint,
        repo: &str,
        path: &str,
        accept: Option<&str>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        self.ping_endpoint(ep).await?;
        let url = ep.url(path);
        let mut attempt = 0;
        let mut auth_rounds = 0;
        loop {
            attempt += 1;
            let mut req = self.http.get(&url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
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
            tracing::debug!(%url, attempt, ?delay, error = %err, "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Fetches the manifest or index `reference` (a tag or digest) of `r`'s
    /// repository, trying mirrors first. Verifies it against the digest when
    /// asked by digest, and against `Docker-Content-Digest` when the
    /// registry sends one.
    pub async fn manifest(
        &self,
        r: &Reference,
        reference: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let what = format!("manifest {}/{}:{}", r.registry(), r.repository(), reference)
            .replace(":sha256:", "@sha256:");
        let eps = self.endpoints(r)?;
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            match self.manifest_from(ep, r, reference, &what).await {
                Ok(m) => return Ok(m),
                Err(e) if i + 1 < n => {
                    tracing::warn!(mirror = %ep.base, error = %e, "mirror failed; trying next");
                }
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::Config(format!("{what}: no endpoints")))
    }

    async fn manifest_from(
        &self,
        ep: &Endpoint,
        r: &Reference,
        reference: &str,
        what: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let path = format!("/v2/{}/manifests/{}", r.repository(), reference);
        let mut resp = self
            .get(
                ep,
                r.repository(),
                &path,
                Some(media::MANIFEST_ACCEPT),
                what,
            )
            .await?;
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_BYTES as u64)
        {
            return Err(RegistryError::Invalid {
                what: what.to_string(),
                detail: format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
            });
        }
        let header_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<Digest>().ok());
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    body.extend_from_slice(&c);
                    if body.len() > MAX_MANIFEST_BYTES {
                        return Err(RegistryError::Invalid {
                            what: what.to_string(),
                            detail: format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
                        });
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
        let digest = Digest::sha256_of(&body);
        let expected = reference
            .parse::<Digest>()
            .ok()
            .or(header_digest.filter(|d| d.algorithm() == "sha256"));
        if let Some(exp) = expected {
            let actual = if exp.algorithm() == "sha256" {
                digest.clone()
            } else {
                let mut v = exp.verifier();
                v.update(&body);
                match v.finish() {
                    Ok(_) => exp.clone(),
                    Err(a) => a,
                }
            };
            if actual != exp {
                return Err(RegistryError::DigestMismatch {
                    what: what.to_string(),
                    expected: exp,
                    actual,
                });
            }
        }
        let media_type = match header_type.filter(|t| media::manifest_kind(t).is_some()) {
            Some(t) => t,
            None => sniff_media_type(&body).ok_or_else(|| RegistryError::Invalid {
                what: what.to_string(),
                detail: "not an OCI or Docker schema 2 manifest or index".into(),
            })?,
        };
        Ok(FetchedManifest {
            media_type,
            digest,
            bytes: Bytes::from(body),
            endpoint: ep.base.clone(),
        })
    }

    /// Starts fetching blob `digest` of `r`'s repository, trying mirrors
    /// first. The stream is not verified: the caller hashes what it reads.
    pub async fn blob(&self, r: &Reference, digest: &Digest) -> Result<BlobStream, RegistryError> {
        let what = format!("blob {digest} of {}", r.name());
        let eps = self.endpoints(r)?;
        let n = eps.len();
        let path = format!("/v2/{}/blobs/{}", r.repository(), digest);
        for (i, ep) in eps.iter().enumerate() {
            match self.get(ep, r.repository(), &path, None, &what).await {
                Ok(response) => {
                    return Ok(BlobStream {
                        expected_len: response.content_length(),
                        url: ep.url(&path),
                        response,
                        what,
                        received: 0,
                        endpoint: ep.base.clone(),
                    });
                }
                Err(e) if i + 1 < n => {
                    tracing::warn!(mirror = %ep.base, error = %e, "mirror failed; trying next");
                }
                Err(e) => return Err(e),
            }
        }
        Err(RegistryError::Config(format!("{what}: no endpoints")))
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

/// Media type from the document itself, for registries that send a generic
/// `Content-Type`.
fn sniff_media_type(body: &[u8]) -> Option<String> {
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
    fn error_bodies() {
        assert_eq!(
            oci_error_detail(
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
            ),
            Some("MANIFEST_UNKNOWN: manifest unknown".into())
        );
        assert_eq!(oci_error_detail("<html>"), None);
        assert_eq!(
            sniff_media_type(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(media::OCI_INDEX)
        );
    }
}
