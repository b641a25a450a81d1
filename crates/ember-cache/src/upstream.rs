//! The cache's client for one upstream registry.
//!
//! Written on reqwest directly rather than on `ember-registry` because the
//! cache needs what a puller does not: `HEAD` requests, the upstream's raw
//! `Content-Type` and `Docker-Content-Digest`, `Range` requests to resume a
//! partial download, and bodies handed over unverified (the cache verifies
//! while writing to disk, and streams to clients at the same time).

use crate::error::CacheError;
use crate::route::ManifestRef;
use bytes::Bytes;
use ember_oci::{Digest, media};
use ember_registry::{Challenge, Credential, parse_challenge, percent_encode};
use reqwest::StatusCode;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, RANGE, WWW_AUTHENTICATE,
};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Manifests larger than this are refused, as distribution does: they are
/// JSON documents of a few KiB and must not make the cache buffer GiBs.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Attempts for a request that fails before any response arrives
/// (connection refused, reset) or with 429/5xx.
const ATTEMPTS: u32 = 2;

/// One configured upstream registry.
pub struct Upstream {
    /// The name clients select it by (`?ns=` or first path component); the
    /// host of its URL for the default upstream.
    pub name: String,
    /// Base URL, `scheme://host[:port]`, no trailing slash.
    pub base: String,
    /// Our own credential for it, if any. Sent only to this upstream and
    /// to the token service it names.
    credential: Option<Credential>,
    /// Whether content fetched from it may be served to any client. An
    /// upstream with a credential is private unless the operator says so.
    pub public: bool,
    http: reqwest::Client,
    /// Bearer tokens by repository; a token's scope is one repository.
    tokens: Mutex<HashMap<String, String>>,
    /// Set once the upstream asked for basic auth.
    basic: AtomicBool,
}

/// A manifest as the upstream served it, verified.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// The raw document (its digest depends on the exact bytes).
    pub bytes: Bytes,
    /// The media type from `Content-Type`, or sniffed from the document.
    pub media_type: String,
    /// The digest of `bytes` (in the algorithm asked for, sha256 for tags).
    pub digest: Digest,
}

/// The start of a blob download.
pub struct BlobResponse {
    /// The response whose body is the blob from `offset` on.
    pub response: reqwest::Response,
    /// Where the body starts: 0 for a 200, the requested offset for a 206.
    pub offset: u64,
    /// The blob's total size, if the upstream said.
    pub total: Option<u64>,
}

impl Upstream {
    /// An upstream called `name` at `base`.
    pub fn new(
        name: String,
        base: String,
        credential: Option<Credential>,
        public: bool,
        http: reqwest::Client,
    ) -> Self {
        let public = public || credential.is_none();
        Upstream {
            name,
            base: base.trim_end_matches('/').to_string(),
            credential,
            public,
            http,
            tokens: Mutex::new(HashMap::new()),
            basic: AtomicBool::new(false),
        }
    }

    /// Whether `authorization` (a client's `Authorization` header) carries
    /// this upstream's credential. Public upstreams accept anyone.
    pub fn client_allowed(&self, authorization: Option<&str>) -> bool {
        if self.public {
            return true;
        }
        let Some(c) = &self.credential else {
            return true;
        };
        let Some(h) = authorization else {
            return false;
        };
        let Some(b64) = h
            .strip_prefix("Basic ")
            .or_else(|| h.strip_prefix("basic "))
        else {
            return false;
        };
        let expected = ember_registry::basic_auth_value(c);
        let expected = expected.trim_start_matches("Basic ");
        constant_time_eq(b64.trim().as_bytes(), expected.as_bytes())
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // Inserts are atomic; a panic elsewhere cannot leave the map torn.
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn auth_header(&self, repo: &str) -> Option<String> {
        if let Some(t) = self.tokens().get(repo) {
            return Some(format!("Bearer {t}"));
        }
        if self.basic.load(Ordering::Relaxed)
            && let Some(c) = &self.credential
        {
            return Some(ember_registry::basic_auth_value(c));
        }
        None
    }

    fn err(&self, detail: impl Into<String>) -> CacheError {
        CacheError::Upstream {
            upstream: self.name.clone(),
            detail: detail.into(),
        }
    }

    /// Sends `method path` with auth, answering one round of 401
    /// challenges, and retrying connection errors, 429 and 5xx once.
    /// Returns whatever response ended it (the caller judges the status).
    async fn send(
        &self,
        method: reqwest::Method,
        repo: &str,
        path: &str,
        headers: &[(reqwest::header::HeaderName, String)],
    ) -> Result<reqwest::Response, CacheError> {
        let url = format!("{}{}", self.base, path);
        let mut attempt = 0;
        let mut authed = false;
        loop {
            attempt += 1;
            let mut req = self.http.request(method.clone(), &url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(a) = self.auth_header(repo) {
                req = req.header(AUTHORIZATION, a);
            }
            match req.send().await {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !authed => {
                    authed = true;
                    attempt -= 1;
                    if !self.authenticate(repo, resp.headers()).await? {
                        return Ok(resp);
                    }
                }
                Ok(resp)
                    if (resp.status().is_server_error()
                        || resp.status() == StatusCode::TOO_MANY_REQUESTS)
                        && attempt < ATTEMPTS =>
                {
                    tracing::debug!(%url, status = %resp.status(), "retrying upstream request");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(resp) => return Ok(resp),
                Err(e) if attempt < ATTEMPTS && (e.is_connect() || e.is_request()) => {
                    tracing::debug!(%url, error = %e, "retrying upstream request");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(self.err(format!("{method} {path}: {}", chain(&e)))),
            }
        }
    }

    /// Answers a 401 challenge. Returns whether a retry can succeed.
    async fn authenticate(&self, repo: &str, headers: &HeaderMap) -> Result<bool, CacheError> {
        let challenge = headers
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_challenge);
        match challenge {
            Some(Challenge::Basic) => {
                if self.credential.is_none() {
                    return Ok(false);
                }
                self.basic.store(true, Ordering::Relaxed);
                Ok(true)
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let scope = scope.unwrap_or_else(|| format!("repository:{repo}:pull"));
                let sep = if realm.contains('?') { '&' } else { '?' };
                let mut url = format!("{realm}{sep}scope={}", percent_encode(&scope));
                if let Some(s) = &service {
                    url.push_str(&format!("&service={}", percent_encode(s)));
                }
                let mut req = self.http.get(&url);
                if let Some(c) = &self.credential {
                    req = req.basic_auth(&c.username, Some(&c.password));
                }
                let resp = req
                    .send()
                    .await
                    .map_err(|e| self.err(format!("token service {realm}: {}", chain(&e))))?;
                if !resp.status().is_success() {
                    return Err(CacheError::UpstreamDenied {
                        upstream: self.name.clone(),
                        detail: format!("token service {realm} answered {}", resp.status()),
                    });
                }
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let raw = resp
                    .bytes()
                    .await
                    .map_err(|e| self.err(format!("token service {realm}: {}", chain(&e))))?;
                let body: Token = serde_json::from_slice(&raw)
                    .map_err(|e| self.err(format!("token service {realm}: {e}")))?;
                let Some(token) = body.token.or(body.access_token) else {
                    return Err(self.err(format!("token service {realm}: no token")));
                };
                self.tokens().insert(repo.to_string(), token);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Maps a non-success status to an error; `unknown` builds the 404
    /// error for the object asked for.
    fn status_error(
        &self,
        status: StatusCode,
        what: &str,
        unknown: impl FnOnce(String) -> CacheError,
    ) -> CacheError {
        match status {
            StatusCode::NOT_FOUND => unknown(what.to_string()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CacheError::UpstreamDenied {
                upstream: self.name.clone(),
                detail: format!("{what}: {status}"),
            },
            s => self.err(format!("{what}: {s}")),
        }
    }

    /// `HEAD` of a manifest: its digest from `Docker-Content-Digest`, or
    /// `None` if the upstream does not send one.
    pub async fn head_manifest(
        &self,
        repo: &str,
        reference: &ManifestRef,
    ) -> Result<Option<Digest>, CacheError> {
        let what = format!("{}/{repo}:{reference}", self.name);
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self
            .send(
                reqwest::Method::HEAD,
                repo,
                &path,
                &[(ACCEPT, media::MANIFEST_ACCEPT.to_string())],
            )
            .await?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp.status(), &what, CacheError::ManifestUnknown));
        }
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok()))
    }

    /// `GET` of a manifest, verified against the digest asked for, or for a
    /// tag against `Docker-Content-Digest` when the upstream sends one.
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &ManifestRef,
    ) -> Result<FetchedManifest, CacheError> {
        let what = format!("{}/{repo}:{reference}", self.name);
        let path = format!("/v2/{repo}/manifests/{reference}");
        let mut resp = self
            .send(
                reqwest::Method::GET,
                repo,
                &path,
                &[(ACCEPT, media::MANIFEST_ACCEPT.to_string())],
            )
            .await?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp.status(), &what, CacheError::ManifestUnknown));
        }
        let too_large = || CacheError::ManifestTooLarge {
            what: what.clone(),
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
        let header_digest: Option<Digest> = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok());
        let mut body = Vec::new();
        while let Some(c) = resp
            .chunk()
            .await
            .map_err(|e| self.err(format!("{what}: {}", chain(&e))))?
        {
            body.extend_from_slice(&c);
            if body.len() > MAX_MANIFEST_BYTES {
                return Err(too_large());
            }
        }
        let expected = match reference {
            ManifestRef::Digest(d) => d.clone(),
            ManifestRef::Tag(_) => header_digest.unwrap_or_else(|| Digest::sha256_of(&body)),
        };
        let mut v = expected.verifier();
        v.update(&body);
        v.finish().map_err(|actual| CacheError::DigestMismatch {
            what: what.clone(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        })?;
        let media_type = match header_type.filter(|t| specific_type(t)) {
            Some(t) => t,
            None => sniff_media_type(&body).ok_or_else(|| CacheError::ManifestInvalid {
                what: what.clone(),
                detail: "no media type in the response or the document".into(),
            })?,
        };
        Ok(FetchedManifest {
            bytes: Bytes::from(body),
            media_type,
            digest: expected,
        })
    }

    /// `HEAD` of a blob: its size.
    pub async fn head_blob(&self, repo: &str, digest: &Digest) -> Result<u64, CacheError> {
        let what = format!("{}/{repo}@{digest}", self.name);
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self.send(reqwest::Method::HEAD, repo, &path, &[]).await?;
        if !resp.status().is_success() {
            return Err(self.status_error(resp.status(), &what, CacheError::BlobUnknown));
        }
        resp.headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.err(format!("{what}: HEAD without Content-Length")))
    }

    /// Starts a `GET` of a blob from byte `from` (a `Range` request when
    /// `from > 0`; the upstream may ignore it and send everything).
    pub async fn blob(
        &self,
        repo: &str,
        digest: &Digest,
        from: u64,
    ) -> Result<BlobResponse, CacheError> {
        let what = format!("{}/{repo}@{digest}", self.name);
        let path = format!("/v2/{repo}/blobs/{digest}");
        let headers = if from > 0 {
            vec![(RANGE, format!("bytes={from}-"))]
        } else {
            vec![]
        };
        let resp = self
            .send(reqwest::Method::GET, repo, &path, &headers)
            .await?;
        let status = resp.status();
        if status == StatusCode::PARTIAL_CONTENT && from > 0 {
            let cr = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            return match cr {
                Some((start, total)) if start == from => Ok(BlobResponse {
                    total: total.or_else(|| resp.content_length().map(|n| n + from)),
                    response: resp,
                    offset: from,
                }),
                _ => Err(self.err(format!("{what}: unusable Content-Range for bytes={from}-"))),
            };
        }
        if status == StatusCode::OK {
            return Ok(BlobResponse {
                total: resp.content_length(),
                response: resp,
                offset: 0,
            });
        }
        Err(self.status_error(status, &what, CacheError::BlobUnknown))
    }
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

/// The media type a manifest document declares, or the one its shape says.
pub fn sniff_media_type(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    if let Some(t) = v.get("mediaType").and_then(|t| t.as_str()) {
        return Some(t.to_string());
    }
    if v.get("manifests").is_some() {
        Some(media::OCI_INDEX.to_string())
    } else if v.get("config").is_some() || v.get("layers").is_some() {
        Some(media::OCI_MANIFEST.to_string())
    } else {
        None
    }
}

/// Compares secrets without an early exit, so timing does not reveal how
/// much of a guessed credential was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The error and its sources on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 5-9/10"), None);
    }

    #[test]
    fn client_credentials() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        let cred = Credential {
            username: "u".into(),
            password: "p".into(),
        };
        let private = Upstream::new("r".into(), "http://r".into(), Some(cred), false, http);
        assert!(!private.client_allowed(None));
        assert!(!private.client_allowed(Some("Basic dTp4")));
        assert!(private.client_allowed(Some("Basic dTpw")));
    }
}
