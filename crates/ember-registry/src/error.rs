//! Registry client errors. Each names what was being fetched, so a failed
//! pull prints one line that says which reference and which blob.

use ember_oci::Digest;

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Could not connect, or the connection broke.
    #[error("{what}: request to {url} failed: {detail}")]
    Transport {
        /// What was being fetched.
        what: String,
        /// The URL (without credentials).
        url: String,
        /// The transport error with its causes.
        detail: String,
    },
    /// The registry does not have it (404, `MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`).
    #[error("{what}: not found ({detail})")]
    NotFound {
        /// What was being fetched.
        what: String,
        /// The registry's error message.
        detail: String,
    },
    /// The registry refused our credentials or we have none (401/403).
    #[error("{what}: unauthorized ({detail})")]
    Unauthorized {
        /// What was being fetched.
        what: String,
        /// The registry's error message.
        detail: String,
    },
    /// Any other non-success status, after retries where they apply.
    #[error("{what}: registry answered {status} ({detail})")]
    Status {
        /// What was being fetched.
        what: String,
        /// HTTP status.
        status: u16,
        /// The registry's error message.
        detail: String,
    },
    /// The bytes do not hash to the digest they were asked for by.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was being fetched.
        what: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// The body ended before the announced length.
    #[error("{what}: truncated: got {got} of {expected} bytes")]
    Truncated {
        /// What was being fetched.
        what: String,
        /// Expected length.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// A manifest over the size limit (see [`crate::MAX_MANIFEST_BYTES`]).
    #[error("{what}: larger than {limit} bytes")]
    TooLarge {
        /// What was being fetched.
        what: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// A manifest or token response that is not what it claims to be.
    #[error("{what}: invalid response: {detail}")]
    Invalid {
        /// What was being fetched.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// Plain HTTP was needed for a host not marked insecure, or similar.
    #[error("{0}")]
    Config(String),
}

impl RegistryError {
    /// Whether trying again (or another endpoint) could help.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Transport { .. } | RegistryError::Truncated { .. } => true,
            RegistryError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// Formats an error and its causes on one line, as reqwest's `Display` only
/// shows the outermost layer ("error sending request").
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    ember_error::chain(e).to_string()
}
