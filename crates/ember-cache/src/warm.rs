//! `POST /ember/v1/warm`: fetch images into the cache before anyone asks.
//!
//! Request: `{"images": ["host/repo:tag", ...], "platforms": ["linux/amd64"]}`
//! (`platforms` defaults to the server's own; `["all"]` takes every entry of
//! an index). The answer lists, per image, the manifest digest and how many
//! blobs and bytes it needed, or the error. Blobs another server owns are
//! warmed on that server (by a request through it, whose body is dropped).

use crate::cache::Cache;
use crate::error::CacheError;
use crate::flight::Lookup;
use crate::route::ManifestRef;
use crate::upstream::Upstream;
use ember_oci::manifest::{Document, ManifestError};
use ember_oci::{Digest, Platform, Reference};
use futures_util::StreamExt;
use std::sync::Arc;

#[derive(serde::Deserialize)]
struct WarmRequest {
    images: Vec<String>,
    #[serde(default)]
    platforms: Option<Vec<String>>,
}

#[derive(serde::Serialize)]
struct ImageResult {
    image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    blobs: usize,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Warms the images in a JSON request body; returns the JSON report.
pub async fn warm(cache: &Arc<Cache>, body: &[u8]) -> Result<String, CacheError> {
    let req: WarmRequest =
        serde_json::from_slice(body).map_err(|e| CacheError::BadRequest(e.to_string()))?;
    let platforms: Option<Vec<Platform>> = match &req.platforms {
        Some(p) if p.iter().any(|s| s == "all") => None,
        Some(p) => Some(
            p.iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()
                .map_err(|e: ember_oci::PlatformError| CacheError::BadRequest(e.to_string()))?,
        ),
        None => Some(vec![Platform::host()]),
    };
    let mut results = Vec::new();
    for image in &req.images {
        let r = warm_image(cache, image, platforms.as_deref()).await;
        results.push(match r {
            Ok((digest, blobs, bytes)) => ImageResult {
                image: image.clone(),
                digest: Some(digest.to_string()),
                blobs,
                bytes,
                error: None,
            },
            Err(e) => ImageResult {
                image: image.clone(),
                digest: None,
                blobs: 0,
                bytes: 0,
                error: Some(ember_error::chain(&e).to_string()),
            },
        });
    }
    Ok(serde_json::json!({ "images": results }).to_string())
}

async fn warm_image(
    cache: &Arc<Cache>,
    image: &str,
    platforms: Option<&[Platform]>,
) -> Result<(Digest, usize, u64), CacheError> {
    let r: Reference = image.parse().map_err(|e: ember_oci::ReferenceError| {
        CacheError::BadRequest(ember_error::chain(&e).to_string())
    })?;
    let up = cache
        .upstream_named(r.registry())
        .or_else(|| cache.upstream_named(r.api_host()))
        .or_else(|| cache.default_upstream())
        .ok_or_else(|| CacheError::UnknownUpstream(r.registry().to_string()))?
        .clone();
    let repo = r.repository().to_string();
    let reference = match r.digest() {
        Some(d) => ManifestRef::Digest(d.clone()),
        None => ManifestRef::Tag(r.tag().unwrap_or("latest").to_string()),
    };
    let (root, _) = cache.manifest(&up, &repo, &reference).await?;
    let invalid = |what: String, e: ManifestError| CacheError::ManifestInvalid {
        what,
        detail: ember_error::chain(&e).to_string(),
    };
    let mut manifests = vec![];
    match Document::parse(&root.media_type, &root.bytes)
        .map_err(|e| invalid(image.to_string(), e))?
    {
        Document::Index(index) => {
            for m in &index.manifests {
                let wanted = match (platforms, &m.platform) {
                    (None, _) => true,
                    (Some(ps), Some(p)) => ps
                        .iter()
                        .any(|w| w.matches(&p.os, &p.architecture, p.variant.as_deref())),
                    (Some(_), None) => false,
                };
                if !wanted {
                    continue;
                }
                let what = format!("{image}@{}", m.digest);
                let (child, _) = cache
                    .manifest(&up, &repo, &ManifestRef::Digest(m.digest.clone()))
                    .await?;
                match Document::parse(&child.media_type, &child.bytes)
                    .map_err(|e| invalid(what.clone(), e))?
                {
                    Document::Manifest(doc) => manifests.push(doc),
                    // A nested index: its own document is cached above;
                    // warming does not descend further (as before).
                    Document::Index(_) => {}
                }
            }
        }
        Document::Manifest(doc) => manifests.push(doc),
    }
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    for m in &manifests {
        for d in std::iter::once(&m.config).chain(&m.layers) {
            if !blobs.iter().any(|(b, _)| *b == d.digest) {
                blobs.push((d.digest.clone(), d.size));
            }
        }
    }
    let n = blobs.len();
    let bytes: u64 = blobs.iter().map(|(_, s)| s).sum();
    let results = futures_util::stream::iter(blobs)
        .map(|(d, _)| {
            let up = up.clone();
            let repo = repo.clone();
            let image = image.to_string();
            async move { warm_blob(cache, &up, &image, &repo, &d).await }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    for r in results {
        r?;
    }
    Ok((root.digest.clone(), n, bytes))
}

async fn warm_blob(
    cache: &Arc<Cache>,
    up: &Arc<Upstream>,
    image: &str,
    repo: &str,
    digest: &Digest,
) -> Result<(), CacheError> {
    if let Some(ring) = cache.ring() {
        let owner = ring.owner(digest);
        if owner != ring.me() {
            let path = format!("{owner}/v2/{repo}/blobs/{digest}?ns={}", up.name);
            match drain(cache, &path).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(peer = owner, error = %e, image, "warming on peer failed; warming locally");
                }
            }
        }
    }
    match cache.blob(up, repo, digest).await? {
        Lookup::Hit(_) => Ok(()),
        Lookup::Flight(f) => f.finished().await.map(|_| ()),
    }
}

async fn drain(cache: &Cache, url: &str) -> Result<(), String> {
    let resp = cache
        .peer_http
        .get(url)
        .header(crate::server::FORWARDED, "1")
        .send()
        .await
        .map_err(|e| ember_error::chain(&e).to_string())?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    let mut s = resp.bytes_stream();
    while let Some(c) = s.next().await {
        c.map_err(|e| ember_error::chain(&e).to_string())?;
    }
    Ok(())
}
