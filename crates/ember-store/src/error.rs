//! Store errors.

use crate::unpack::UnpackError;
use ember_oci::{Digest, Reference};
use ember_registry::RegistryError;
use std::path::PathBuf;

/// Why a store operation failed. Messages name the image and blob involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation on the store failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The registry could not give us something.
    #[error("pulling {reference}")]
    Registry {
        /// The image being pulled.
        reference: String,
        /// The registry error (names the manifest or blob).
        #[source]
        source: RegistryError,
    },
    /// A blob's bytes do not match its digest.
    #[error("pulling {reference}: blob {digest}: digest mismatch (got {actual})")]
    DigestMismatch {
        /// The image being pulled.
        reference: String,
        /// The digest the manifest names.
        digest: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// A layer's uncompressed content does not match the config's diff_id.
    #[error(
        "pulling {reference}: layer {digest}: uncompressed content does not match diff_id {diff_id} (got {actual})"
    )]
    DiffIdMismatch {
        /// The image being pulled.
        reference: String,
        /// The compressed layer digest.
        digest: Digest,
        /// The diff_id in the image config.
        diff_id: Digest,
        /// What the uncompressed bytes hash to.
        actual: Digest,
    },
    /// A blob's size differs from its descriptor.
    #[error("pulling {reference}: blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The image being pulled.
        reference: String,
        /// The blob.
        digest: Digest,
        /// Size in the descriptor.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// A layer's compressed stream could not be decompressed to its end,
    /// so its diff_id could not be computed: the layer is refused.
    #[error(
        "pulling {reference}: layer {digest}: {compression} stream: {detail}; content not verified, layer not stored"
    )]
    Decompress {
        /// The image being pulled.
        reference: String,
        /// The compressed layer digest.
        digest: Digest,
        /// `gzip`, `zstd` or `tar`.
        compression: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// A layer could not be unpacked (hostile, corrupt or truncated tar).
    #[error("pulling {reference}: layer {digest}")]
    Unpack {
        /// The image being pulled.
        reference: String,
        /// The layer.
        digest: Digest,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// A manifest, index or config that Ember cannot use.
    #[error("{reference}: {detail}")]
    BadImage {
        /// The image.
        reference: String,
        /// What is wrong.
        detail: String,
    },
    /// No manifest for the requested platform in an index.
    #[error("{reference}: no image for platform {platform} (index has: {available})")]
    NoPlatform {
        /// The image.
        reference: String,
        /// The platform asked for.
        platform: String,
        /// The platforms the index lists.
        available: String,
    },
    /// The image is not in the store.
    #[error("image not found in the store: {0}")]
    ImageUnknown(String),
    /// The image is used by a running container.
    #[error("image {image} is in use by container {container}")]
    InUse {
        /// The image.
        image: String,
        /// A container using it.
        container: String,
    },
    /// The store's index file is unreadable.
    #[error("store index {path} is corrupt: {detail}")]
    CorruptIndex {
        /// The index file.
        path: PathBuf,
        /// The parse error.
        detail: String,
    },
    /// A reference that does not parse.
    #[error(transparent)]
    Reference(#[from] ember_oci::ReferenceError),
}

pub(crate) fn io(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { op, path, source }
}

/// Keeps the reference in errors built deep in the pipeline.
pub(crate) fn registry(reference: &Reference) -> impl FnOnce(RegistryError) -> StoreError + '_ {
    move |source| StoreError::Registry {
        reference: reference.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::SnapshotError;
    use crate::tree::RecordError;

    fn eio() -> std::io::Error {
        std::io::Error::other("EIO")
    }

    /// Each error says its own level; its source is printed once, by
    /// whoever prints the chain.
    #[test]
    fn errors_say_their_source_once_in_the_chain() {
        let digest: Digest =
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                .parse()
                .expect("digest");
        let unpack = || UnpackError::Io {
            path: "/l/etc/passwd".into(),
            op: "create",
            source: eio(),
        };
        let cases: Vec<(Box<dyn std::error::Error>, &str)> = vec![
            (
                Box::new(io("read", "/s/index.json")(eio())),
                "read /s/index.json: EIO",
            ),
            (
                Box::new(StoreError::Registry {
                    reference: "app:v2".into(),
                    source: RegistryError::Config("no such mirror".into()),
                }),
                "pulling app:v2: no such mirror",
            ),
            (
                Box::new(StoreError::Unpack {
                    reference: "app:v2".into(),
                    digest,
                    source: unpack(),
                }),
                "pulling app:v2: layer sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855: unpacking /l/etc/passwd: create: EIO",
            ),
            (Box::new(UnpackError::Read(eio())), "reading layer tar: EIO"),
            (
                Box::new(UnpackError::ReadAt {
                    entry: "a/b".into(),
                    source: eio(),
                }),
                "reading layer tar at entry \"a/b\": EIO",
            ),
            (Box::new(RecordError::Io(eio())), "reading tree record: EIO"),
            (
                Box::new(SnapshotError::Io {
                    op: "write",
                    path: "/s/m.json".into(),
                    source: eio(),
                }),
                "write /s/m.json: EIO",
            ),
        ];
        for (e, want) in &cases {
            assert_eq!(ember_error::repeated_source(&**e), None, "{want}");
            assert_eq!(ember_error::chain(&**e).to_string(), *want);
        }
    }
}
