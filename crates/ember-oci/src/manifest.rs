//! The parts of manifests, indexes and image configs that Ember reads.
//!
//! One set of small serde types for every crate that looks inside these
//! documents (the node's store when it pulls, the cache when it warms), so
//! they cannot drift apart. Only the fields Ember uses are declared; unknown
//! fields are ignored, as the OCI image spec requires of readers. Digests
//! are parsed strictly ([`Digest`]), so a document naming a malformed
//! digest fails to parse rather than reaching a file name.
//!
//! The raw bytes stay the source of truth: a manifest's digest is computed
//! over what the registry served, never over a re-serialisation of these.

use crate::Digest;
use crate::media;
use serde::Deserialize;

/// A content descriptor: what a manifest or index says about a blob or a
/// child manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of the content it points at.
    pub media_type: String,
    /// The content's digest.
    pub digest: Digest,
    /// The content's size in bytes.
    pub size: u64,
    /// For index entries: the platform the child manifest is for.
    #[serde(default)]
    pub platform: Option<DescriptorPlatform>,
}

/// The `platform` of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DescriptorPlatform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `v7`, `v8`, ...
    #[serde(default)]
    pub variant: Option<String>,
}

impl DescriptorPlatform {
    /// `os/arch[/variant]`, as users write platforms.
    pub fn display(&self) -> String {
        match &self.variant {
            Some(v) => format!("{}/{}/{v}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// An image manifest (OCI or Docker schema 2): a config and layers.
#[derive(Debug, Clone, Deserialize)]
pub struct ManifestDoc {
    /// The image config blob.
    pub config: Descriptor,
    /// The layer blobs, base first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// An image index or Docker manifest list: per-platform manifests.
#[derive(Debug, Clone, Deserialize)]
pub struct IndexDoc {
    /// The child manifests.
    pub manifests: Vec<Descriptor>,
}

/// The part of an image config that ties layers to their content.
#[derive(Debug, Clone, Deserialize)]
pub struct ConfigDoc {
    /// The uncompressed layer digests.
    pub rootfs: RootFs,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    /// The digests of the uncompressed layer tars, base first.
    pub diff_ids: Vec<Digest>,
}

/// A document from a manifest endpoint, by what it is.
#[derive(Debug, Clone)]
pub enum Document {
    /// An image manifest.
    Manifest(ManifestDoc),
    /// An index or manifest list.
    Index(IndexDoc),
}

/// Why a document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The media type is neither a manifest nor an index Ember reads.
    #[error("unsupported manifest type {0:?}")]
    Unsupported(String),
    /// Not valid JSON of the expected shape.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl Document {
    /// Parses `bytes` as the kind of document `media_type` names. For a
    /// media type that is not a manifest type (a registry's generic
    /// `application/json`), the document's own shape decides.
    pub fn parse(media_type: &str, bytes: &[u8]) -> Result<Document, ManifestError> {
        let kind = media::manifest_kind(media_type).or_else(|| {
            sniff_media_type(bytes)
                .as_deref()
                .and_then(media::manifest_kind)
        });
        match kind {
            Some(media::ManifestKind::Manifest) => {
                Ok(Document::Manifest(serde_json::from_slice(bytes)?))
            }
            Some(media::ManifestKind::Index) => Ok(Document::Index(serde_json::from_slice(bytes)?)),
            None => Err(ManifestError::Unsupported(media_type.to_string())),
        }
    }
}

/// The media type a manifest document declares (`mediaType`), or the one
/// its shape says (`manifests` → index; `config` or `layers` → manifest),
/// for registries that answer with a generic `Content-Type`.
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

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn a_json_error_is_passed_on_transparently() {
        let e = Document::parse(media::OCI_MANIFEST, b"{").expect_err("not JSON");
        assert!(matches!(e, ManifestError::Json(_)), "{e}");
        assert_eq!(
            ember_error::repeated_source(&e),
            None,
            "{}",
            ember_error::chain(&e)
        );
        assert!(e.to_string().contains("EOF"), "{e}");
    }

    #[test]
    fn parses_manifests_and_indexes() {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{c}","digest":"{D}","size":2}},
            "layers":[{{"mediaType":"x","digest":"{D}","size":3,"annotations":{{}}}}]}}"#,
            c = media::OCI_CONFIG
        );
        match Document::parse(media::OCI_MANIFEST, m.as_bytes()).unwrap() {
            Document::Manifest(m) => {
                assert_eq!(m.config.size, 2);
                assert_eq!(m.layers[0].digest.to_string(), D);
            }
            d => panic!("{d:?}"),
        }
        let i = format!(
            r#"{{"manifests":[{{"mediaType":"{t}","digest":"{D}","size":1,
            "platform":{{"os":"linux","architecture":"arm","variant":"v7"}}}}]}}"#,
            t = media::OCI_MANIFEST
        );
        // A generic Content-Type: the shape says it is an index.
        match Document::parse("application/json", i.as_bytes()).unwrap() {
            Document::Index(i) => {
                let p = i.manifests[0].platform.as_ref().unwrap();
                assert_eq!(p.display(), "linux/arm/v7");
            }
            d => panic!("{d:?}"),
        }
        // A bad digest is a parse error, not a string passed along.
        let bad = m.replace(D, "sha256:../../etc");
        assert!(Document::parse(media::OCI_MANIFEST, bad.as_bytes()).is_err());
        assert!(matches!(
            Document::parse("text/plain", b"{}"),
            Err(ManifestError::Unsupported(_))
        ));
    }
}
