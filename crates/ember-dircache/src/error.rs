//! What saving and restoring can end in, other than success.

use std::path::PathBuf;

/// Errors of the directory cache client and of manifest validation.
#[derive(Debug, thiserror::Error)]
pub enum DircacheError {
    /// A manifest that must not be restored (or stored): a path outside
    /// the tree, a symlink leading out of it, a duplicate, a chunk list
    /// that does not add up.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// A chunk whose bytes do not match its digest, or do not decompress
    /// to its recorded size.
    #[error("chunk {digest}: {detail}")]
    CorruptChunk {
        /// The chunk's digest (hex SHA-256 of its uncompressed bytes).
        digest: String,
        /// What was wrong.
        detail: String,
    },
    /// The cache does not have a chunk an entry refers to.
    #[error("chunk {0} is missing from the cache")]
    ChunkMissing(String),
    /// A save asked of a read-only client or refused by the cache for a
    /// read-only scope.
    #[error("scope {0:?} is read-only")]
    ReadOnly(String),
    /// A scope or key outside what the cache accepts.
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        /// "scope", "key" or "restore key".
        what: &'static str,
        /// The value (truncated).
        value: String,
        /// Why.
        why: &'static str,
    },
    /// The tree to save holds something that cannot be saved (a socket, a
    /// device, a file that changed while it was read, a name that is not
    /// UTF-8).
    #[error("{path}: {detail}")]
    Unsupported {
        /// The offending path.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The cache could not be reached or broke off.
    #[error("cache {url}: {detail}")]
    Transport {
        /// The request URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The cache answered with an error.
    #[error("cache answered {status} to {what}: {message}")]
    Refused {
        /// What was asked.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The cache's error code (`DENIED`, `ENTRY_EXISTS`, ...).
        code: String,
        /// Its message.
        message: String,
    },
    /// Local disk trouble.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl DircacheError {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        DircacheError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        DircacheError::InvalidManifest(msg.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_say_their_source_once_in_the_chain() {
        let e = DircacheError::io("reading the tree", std::io::Error::other("EIO"));
        assert_eq!(ember_error::repeated_source(&e), None);
        assert_eq!(ember_error::chain(&e).to_string(), "reading the tree: EIO");
    }
}
