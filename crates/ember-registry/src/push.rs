//! The write side of the distribution API: push an image's blobs, then its
//! manifest, to the origin registry of a reference.
//!
//! Each blob is first asked for with `HEAD` (a registry that has it is not
//! sent it again), then uploaded monolithically: `POST
//! /v2/<name>/blobs/uploads/` opens an upload, `PUT <Location>&digest=`
//! sends the bytes, and the registry checks them against the digest. The
//! manifest goes last, so a reader never sees a manifest whose blobs are
//! not there yet. Requests go through the same auth, token and retry code
//! as pulls (a registry asks a pusher for a `push` token in its challenge).
//! Mirrors are never pushed to.

use crate::client::{RegistryClient, blob_path};
use crate::error::RegistryError;
use bytes::Bytes;
use ember_oci::{Digest, Reference};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use std::io::Read;
use std::sync::Arc;

/// Opens a blob's bytes; called once per upload attempt.
pub type OpenBlob = Arc<dyn Fn() -> std::io::Result<Box<dyn Read + Send>> + Send + Sync>;

/// A blob to push.
#[derive(Clone)]
pub struct PushBlob {
    /// Its digest (the registry checks the bytes against it).
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Where its bytes come from.
    pub open: OpenBlob,
}

impl std::fmt::Debug for PushBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushBlob")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// What a push did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PushReport {
    /// Blobs uploaded.
    pub blobs_pushed: usize,
    /// Blobs the registry had already.
    pub blobs_skipped: usize,
    /// Bytes uploaded.
    pub bytes_pushed: u64,
    /// The manifest's digest, as the registry confirmed it.
    pub manifest: Option<Digest>,
}

/// Chunks a blob is streamed in.
const CHUNK: usize = 256 * 1024;

/// A request body that streams `open()`'s bytes, read on a blocking thread.
fn streaming_body(open: &OpenBlob) -> Result<reqwest::Body, RegistryError> {
    let mut r = open().map_err(|e| RegistryError::Config(format!("opening blob: {e}")))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        loop {
            let mut buf = vec![0u8; CHUNK];
            match r.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return; // the request was dropped
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(reqwest::Body::wrap_stream(stream))
}

impl RegistryClient {
    /// The origin endpoint of `r` (pushes never go to mirrors).
    fn origin(&self, r: &Reference) -> Result<crate::Endpoint, RegistryError> {
        self.endpoints(r)?
            .pop()
            .ok_or_else(|| RegistryError::Config(format!("{r}: no endpoint")))
    }

    /// Whether `r`'s repository already has blob `digest` (`HEAD`).
    pub async fn blob_exists(&self, r: &Reference, digest: &Digest) -> Result<bool, RegistryError> {
        let ep = self.origin(r)?;
        let what = format!("blob {digest} of {}", r.name());
        let url = ep_url(&ep, &blob_path(r.repository(), digest));
        match self
            .inner
            .send_url(
                &ep,
                reqwest::Method::HEAD,
                r.repository(),
                &url,
                &[],
                None,
                &what,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(RegistryError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads `blob` to `r`'s repository unless it is there already;
    /// returns whether it was uploaded.
    pub async fn push_blob(&self, r: &Reference, blob: &PushBlob) -> Result<bool, RegistryError> {
        if self.blob_exists(r, &blob.digest).await? {
            return Ok(false);
        }
        let ep = self.origin(r)?;
        let repo = r.repository();
        let what = format!("pushing blob {} to {}", blob.digest, r.name());
        let start = ep_url(&ep, &format!("/v2/{repo}/blobs/uploads/"));
        let resp = self
            .inner
            .send_url(
                &ep,
                reqwest::Method::POST,
                repo,
                &start,
                &[(CONTENT_LENGTH, "0".to_string())],
                None,
                &what,
            )
            .await?;
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Invalid {
                what: what.clone(),
                detail: "upload started without a Location".into(),
            })?;
        // Location may be absolute or relative to the registry.
        let mut url = if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", ep.base())
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!(
            "digest={}",
            crate::percent_encode(&blob.digest.to_string())
        ));
        let open = blob.open.clone();
        let body = move || streaming_body(&open);
        self.inner
            .send_url(
                &ep,
                reqwest::Method::PUT,
                repo,
                &url,
                &[
                    (CONTENT_LENGTH, blob.size.to_string()),
                    (CONTENT_TYPE, "application/octet-stream".to_string()),
                ],
                Some(&body),
                &what,
            )
            .await?;
        Ok(true)
    }

    /// Puts `bytes` (of `media_type`) as `r`'s manifest, under its tag or
    /// digest, and checks the digest the registry answers with.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let ep = self.origin(r)?;
        let repo = r.repository();
        let digest = Digest::sha256_of(&bytes);
        let what = format!("pushing manifest {digest} to {r}");
        let url = ep_url(
            &ep,
            &format!("/v2/{repo}/manifests/{}", r.manifest_reference()),
        );
        let body = move || Ok(reqwest::Body::from(bytes.clone()));
        let resp = self
            .inner
            .send_url(
                &ep,
                reqwest::Method::PUT,
                repo,
                &url,
                &[(CONTENT_TYPE, media_type.to_string())],
                Some(&body),
                &what,
            )
            .await?;
        if let Some(h) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            && h != digest.to_string()
        {
            return Err(RegistryError::Invalid {
                what,
                detail: format!("the registry stored it as {h}"),
            });
        }
        Ok(digest)
    }

    /// Pushes `blobs` (skipping those the registry has), then the manifest:
    /// the image is visible under `r` only once all of it is there.
    /// `progress` hears of each blob as it is done (`true`: uploaded).
    pub async fn push_image(
        &self,
        r: &Reference,
        blobs: &[PushBlob],
        media_type: &str,
        manifest: Bytes,
        progress: &(dyn Fn(&Digest, bool) + Send + Sync),
    ) -> Result<PushReport, RegistryError> {
        let mut report = PushReport::default();
        for b in blobs {
            if self.push_blob(r, b).await? {
                report.blobs_pushed += 1;
                report.bytes_pushed += b.size;
                progress(&b.digest, true);
            } else {
                report.blobs_skipped += 1;
                progress(&b.digest, false);
            }
        }
        report.manifest = Some(self.push_manifest(r, media_type, manifest).await?);
        Ok(report)
    }
}

fn ep_url(ep: &crate::Endpoint, path: &str) -> String {
    format!("{}{path}", ep.base())
}
