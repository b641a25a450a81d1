//! The cache's client for one upstream registry.
//!
//! A thin layer over [`ember_registry::RegistryClient`], the same client
//! the node pulls with, so auth, bearer tokens, retries and manifest
//! verification are written once. What the cache needs beyond a puller
//! (`HEAD`, the upstream's own `Content-Type` and digest, `Range` to resume
//! a partial download, bodies handed over unverified because the cache
//! verifies while writing to disk) are the registry client's `*_at`
//! methods on an [`Endpoint`] carrying this upstream's credential. This
//! module only turns their errors into the cache's.

use crate::error::CacheError;
use crate::route::ManifestRef;
use bytes::Bytes;
use ember_oci::Digest;
use ember_registry::{Credential, Endpoint, RegistryClient, RegistryError};
use futures_util::Stream;
use std::pin::Pin;

pub use ember_oci::manifest::sniff_media_type;
pub use ember_registry::{FetchedManifest, MAX_MANIFEST_BYTES};

/// One configured upstream registry.
pub struct Upstream {
    /// The name clients select it by (`?ns=` or first path component); the
    /// host of its URL for the default upstream.
    pub name: String,
    /// Base URL, `scheme://host[:port]`, no trailing slash.
    pub base: String,
    /// Our own credential for it, if any. Sent only to this upstream and
    /// to the token service it names (the endpoint carries it).
    credential: Option<Credential>,
    /// Whether content fetched from it may be served to any client. An
    /// upstream with a credential is private unless the operator says so.
    pub public: bool,
    /// The registry client, shared by all upstreams (connection pool and
    /// token cache; tokens are kept per endpoint and credential).
    client: RegistryClient,
    endpoint: Endpoint,
}

/// The start of a blob download.
pub struct BlobResponse {
    /// The body: the blob from `offset` on. Unverified.
    pub body: Pin<Box<dyn Stream<Item = Result<Bytes, RegistryError>> + Send>>,
    /// Where the body starts: 0 for a 200, the requested offset for a 206.
    pub offset: u64,
    /// The blob's total size, if the upstream said.
    pub total: Option<u64>,
}

impl Upstream {
    /// An upstream called `name` at `base`, reached through `client`.
    pub fn new(
        name: String,
        base: String,
        credential: Option<Credential>,
        public: bool,
        client: RegistryClient,
    ) -> Self {
        let public = public || credential.is_none();
        let base = base.trim_end_matches('/').to_string();
        Upstream {
            endpoint: Endpoint::new(name.clone(), &base, credential.clone()),
            name,
            base,
            credential,
            public,
            client,
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

    /// The cache's error for a registry client error about `what` (our own
    /// words: the registry client's messages name upstream URLs, which are
    /// not for clients). `unknown` builds the 404 for the object asked for.
    fn error(
        &self,
        e: RegistryError,
        what: &str,
        unknown: impl FnOnce(String) -> CacheError,
    ) -> CacheError {
        match e {
            RegistryError::NotFound { .. } => unknown(what.to_string()),
            RegistryError::Unauthorized { detail, .. } => CacheError::UpstreamDenied {
                upstream: self.name.clone(),
                detail: format!("{what}: {detail}"),
            },
            RegistryError::DigestMismatch {
                expected, actual, ..
            } => CacheError::DigestMismatch {
                what: what.to_string(),
                expected: expected.to_string(),
                actual: actual.to_string(),
            },
            RegistryError::TooLarge { limit, .. } => CacheError::ManifestTooLarge {
                what: what.to_string(),
                limit,
            },
            e => CacheError::Upstream {
                upstream: self.name.clone(),
                detail: ember_error::chain(&e).to_string(),
            },
        }
    }

    /// Like [`Upstream::error`] for manifests: a document the registry
    /// client refused as invalid is the upstream's fault, not an outage.
    fn manifest_error(&self, e: RegistryError, what: &str) -> CacheError {
        match e {
            RegistryError::Invalid { detail, .. } => CacheError::ManifestInvalid {
                what: what.to_string(),
                detail,
            },
            e => self.error(e, what, CacheError::ManifestUnknown),
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
        self.client
            .head_manifest_at(&self.endpoint, repo, &reference.to_string())
            .await
            .map_err(|e| self.manifest_error(e, &what))
    }

    /// `GET` of a manifest, verified against the digest asked for, or for a
    /// tag against `Docker-Content-Digest` when the upstream sends one (one
    /// it sends that cannot be checked is refused).
    pub async fn manifest(
        &self,
        repo: &str,
        reference: &ManifestRef,
    ) -> Result<FetchedManifest, CacheError> {
        let what = format!("{}/{repo}:{reference}", self.name);
        self.client
            .manifest_at(&self.endpoint, repo, &reference.to_string())
            .await
            .map_err(|e| self.manifest_error(e, &what))
    }

    /// `HEAD` of a blob: its size.
    pub async fn head_blob(&self, repo: &str, digest: &Digest) -> Result<u64, CacheError> {
        let what = format!("{}/{repo}@{digest}", self.name);
        self.client
            .head_blob_at(&self.endpoint, repo, digest)
            .await
            .map_err(|e| self.error(e, &what, CacheError::BlobUnknown))
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
        let s = self
            .client
            .blob_at(&self.endpoint, repo, digest, from)
            .await
            .map_err(|e| self.error(e, &what, CacheError::BlobUnknown))?;
        Ok(BlobResponse {
            offset: s.offset(),
            total: s.total(),
            body: Box::pin(s.into_stream()),
        })
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
    ember_error::chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_credentials() {
        let client = ember_registry::RegistryClient::new(Default::default()).unwrap();
        let cred = Credential {
            username: "u".into(),
            password: "p".into(),
        };
        let private = Upstream::new("r".into(), "http://r".into(), Some(cred), false, client);
        assert!(!private.client_allowed(None));
        assert!(!private.client_allowed(Some("Basic dTp4")));
        assert!(private.client_allowed(Some("Basic dTpw")));
    }
}
