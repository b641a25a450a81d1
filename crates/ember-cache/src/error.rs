//! The cache's errors, and the one place they become OCI error responses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Everything a request to the cache can end in, other than success.
///
/// The `IntoResponse` impl below is the only place these turn into an HTTP
/// status and an OCI error body; internal details (paths, upstream URLs,
/// I/O errors) are logged there and never sent to clients.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A repository name outside the distribution grammar (this also
    /// rejects `..`, empty components and percent-encoding).
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
    /// A digest that does not parse.
    #[error("invalid digest {0:?}")]
    DigestInvalid(String),
    /// A tag outside `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
    #[error("invalid tag {0:?}")]
    TagInvalid(String),
    /// A path the read side of the distribution API does not have.
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// A `?ns=` or host alias naming no configured upstream.
    #[error("no upstream configured for {0:?}")]
    UnknownUpstream(String),
    /// Pushes, deletes, catalog listing: a cache is read-only.
    #[error("{0} is not supported by a pull-through cache")]
    Unsupported(String),
    /// The client did not present valid credentials for a private upstream.
    #[error("credentials required for upstream {0}")]
    Unauthorized(String),
    /// The upstream says the manifest does not exist.
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    /// The upstream says the blob does not exist.
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    /// The upstream served a manifest over the size limit.
    #[error("manifest {what} larger than {limit} bytes")]
    ManifestTooLarge {
        /// Which manifest.
        what: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The upstream served a manifest we cannot read or whose media type is
    /// not a manifest type.
    #[error("invalid manifest {what}: {detail}")]
    ManifestInvalid {
        /// Which manifest.
        what: String,
        /// Why.
        detail: String,
    },
    /// Bytes from the upstream did not match the digest they were asked by.
    #[error("{what}: upstream sent content with digest {actual}, expected {expected}")]
    DigestMismatch {
        /// Which blob or manifest.
        what: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// A `Range` outside the blob.
    #[error("range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable {
        /// The blob's size.
        size: u64,
    },
    /// The upstream could not be reached, failed, or broke off.
    #[error("upstream {upstream}: {detail}")]
    Upstream {
        /// The upstream's name.
        upstream: String,
        /// What went wrong.
        detail: String,
    },
    /// The upstream refused our own credentials.
    #[error("upstream {upstream} refused access: {detail}")]
    UpstreamDenied {
        /// The upstream's name.
        upstream: String,
        /// What it said.
        detail: String,
    },
    /// A malformed request body (the warm endpoint's JSON).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// An error shared by every request that joined one download.
    #[error(transparent)]
    Shared(std::sync::Arc<CacheError>),
    /// The cache's filesystem has no room for a blob even after evicting
    /// everything it may: answered before the status line, never as a
    /// short body.
    #[error("no room on disk for {what} ({bytes} bytes)")]
    NoRoom {
        /// Which blob.
        what: String,
        /// Its size.
        bytes: u64,
    },
    /// A directory cache entry PUT for a key that has one (entries are
    /// immutable).
    #[error("directory cache entry exists: {0}")]
    EntryExists(String),
    /// No directory cache entry matched.
    #[error("directory cache entry unknown: {0}")]
    EntryUnknown(String),
    /// A write into a protected directory cache scope without its token.
    #[error("directory cache scope {0:?} is read-only for this client")]
    ScopeReadOnly(String),
    /// An entry naming chunks the cache does not have.
    #[error("the entry names {0} chunks the cache does not have")]
    ChunksMissing(usize),
    /// A body over a limit (a chunk, an entry over its scope's budget).
    #[error("too large: {0}")]
    TooLarge(String),
    /// An upload whose bytes do not hash to the digest it was PUT under.
    #[error("upload of {expected}: the bytes hash to {actual}; refused")]
    UploadDigestMismatch {
        /// The digest in the URL.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// No snapshot manifest of that key.
    #[error("snapshot unknown: {0}")]
    SnapshotUnknown(String),
    /// A write (upload, delete) the client may not make.
    #[error("denied: {0}")]
    WriteDenied(String),
    /// Local disk trouble.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl CacheError {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        CacheError::Io {
            what: what.into(),
            source,
        }
    }

    /// Status and OCI error code for this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use CacheError::*;
        match self {
            Shared(e) => e.status_and_code(),
            NameInvalid(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            TagInvalid(_) => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
            NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            UnknownUpstream(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            Unsupported(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            Unauthorized(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            ManifestUnknown(_) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            BlobUnknown(_) => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            // The client's request was fine; the upstream's answer was not.
            ManifestTooLarge { .. } | ManifestInvalid { .. } => {
                (StatusCode::BAD_GATEWAY, "MANIFEST_INVALID")
            }
            DigestMismatch { .. } => (StatusCode::BAD_GATEWAY, "DIGEST_INVALID"),
            RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UNKNOWN"),
            Upstream { .. } | NoRoom { .. } => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            UpstreamDenied { .. } => (StatusCode::BAD_GATEWAY, "DENIED"),
            BadRequest(_) => (StatusCode::BAD_REQUEST, "UNSUPPORTED"),
            EntryExists(_) => (StatusCode::CONFLICT, "ENTRY_EXISTS"),
            EntryUnknown(_) => (StatusCode::NOT_FOUND, "ENTRY_UNKNOWN"),
            ScopeReadOnly(_) => (StatusCode::FORBIDDEN, "DENIED"),
            ChunksMissing(_) => (StatusCode::BAD_REQUEST, "CHUNKS_MISSING"),
            TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID"),
            UploadDigestMismatch { .. } => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            SnapshotUnknown(_) => (StatusCode::NOT_FOUND, "SNAPSHOT_UNKNOWN"),
            WriteDenied(_) => (StatusCode::FORBIDDEN, "DENIED"),
            Io { .. } | Config(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        }
    }

    /// The message sent to clients: our own words for client errors, a
    /// generic one for internal faults (details go to the log).
    fn public_message(&self) -> String {
        match self {
            CacheError::Shared(e) => e.public_message(),
            CacheError::Io { .. } | CacheError::Config(_) => "internal error".to_string(),
            CacheError::Upstream { upstream, .. } => format!("upstream {upstream} unavailable"),
            CacheError::NoRoom { .. } => "the cache has no room for this blob".to_string(),
            CacheError::UpstreamDenied { upstream, .. } => {
                format!("upstream {upstream} refused the cache's credentials")
            }
            e => ember_error::chain(e).to_string(),
        }
    }
}

impl IntoResponse for CacheError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() || status == StatusCode::BAD_GATEWAY {
            tracing::warn!(error = %ember_error::chain(&self), "request failed");
        } else {
            tracing::debug!(error = %ember_error::chain(&self), "request refused");
        }
        let body = serde_json::json!({
            "errors": [{"code": code, "message": self.public_message(), "detail": null}]
        })
        .to_string();
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match &self {
            CacheError::Unauthorized(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"ember-cache\""),
                );
            }
            CacheError::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    h.insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        resp
    }
}

/// Most of a refused upload's body that is still read before the refusal
/// is sent.
const DISCARD_MAX_BYTES: usize = 64 << 20;
/// How long reading a refused upload's body may take.
const DISCARD_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops what is left of an upload refused before its body was
/// read (a missing token, a bad name, no room), within a byte and time cap.
///
/// Clients such as reqwest write their whole body before they read the
/// response; if the server answers and closes first, they report a broken
/// pipe instead of the refusal. Reading the body first (nginx's lingering
/// close) lets them see the error; the caps keep a hostile client from
/// holding the connection with an endless body.
pub(crate) async fn discard_body(body: axum::body::Body) {
    use futures_util::StreamExt;
    let mut frames = body.into_data_stream();
    let mut seen = 0usize;
    let _ = tokio::time::timeout(DISCARD_MAX_TIME, async {
        while let Some(Ok(f)) = frames.next().await {
            seen += f.len();
            if seen > DISCARD_MAX_BYTES {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_say_their_source_once_and_stay_out_of_responses() {
        let e = CacheError::io("writing blob sha256:ab", std::io::Error::other("ENOSPC"));
        assert_eq!(ember_error::repeated_source(&e), None);
        assert_eq!(
            ember_error::chain(&e).to_string(),
            "writing blob sha256:ab: ENOSPC"
        );
        // Internal details go to the log, not to clients.
        assert_eq!(e.public_message(), "internal error");
        let shared = CacheError::Shared(std::sync::Arc::new(e));
        assert_eq!(ember_error::repeated_source(&shared), None);
        assert_eq!(
            ember_error::chain(&shared).to_string(),
            "writing blob sha256:ab: ENOSPC"
        );
    }
}
