//! A small OCI distribution push client: blobs and manifests over plain
//! HTTP, no authentication. It exists to load fixtures into test
//! registries, so it favours clear errors over features.

use std::path::Path;

use anyhow::{Context, bail};
use reqwest::{Body, StatusCode, Url, header};

use crate::digest::sha256_digest;

/// A push client for one registry. Reuses connections across calls; create
/// one per async runtime (pooled connections belong to the runtime that
/// opened them).
#[derive(Clone)]
pub struct Pusher {
    client: reqwest::Client,
    base: Url,
}

impl Pusher {
    /// A client for the registry at `base_url` (`http://HOST:PORT` or
    /// `HOST:PORT`, which means plain HTTP).
    pub fn new(base_url: &str) -> anyhow::Result<Self> {
        let base = parse_base_url(base_url)?;
        Ok(Self {
            client: http_client()?,
            base,
        })
    }

    /// Whether `repo` already has the blob `digest` (`HEAD` answers 200).
    pub async fn blob_exists(&self, repo: &str, digest: &str) -> anyhow::Result<bool> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        let resp = self
            .client
            .head(url.clone())
            .send()
            .await
            // The context names the URL; keep reqwest from repeating it.
            .map_err(reqwest::Error::without_url)
            .with_context(|| format!("HEAD {url}"))?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => bail!("HEAD {url}: unexpected status {status}"),
        }
    }

    /// Uploads `bytes` as blob `digest` to `repo` unless it is already
    /// there. The digest is checked locally first so a fixture bug shows up
    /// as a clear error rather than a registry `DIGEST_INVALID`.
    pub async fn push_blob(&self, repo: &str, bytes: Vec<u8>, digest: &str) -> anyhow::Result<()> {
        let actual = sha256_digest(&bytes);
        if actual != digest {
            bail!("blob content has digest {actual}, not {digest}");
        }
        if self.blob_exists(repo, digest).await? {
            return Ok(());
        }
        let len = bytes.len() as u64;
        self.upload(repo, digest, len, Body::from(bytes)).await
    }

    /// Uploads the file at `path` as blob `digest` to `repo` unless it is
    /// already there, streaming it so large layers are never held in
    /// memory. The registry verifies the digest.
    pub async fn push_blob_file(
        &self,
        repo: &str,
        path: &Path,
        digest: &str,
    ) -> anyhow::Result<()> {
        if self.blob_exists(repo, digest).await? {
            return Ok(());
        }
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .await
            .with_context(|| format!("reading the size of {}", path.display()))?
            .len();
        self.upload(repo, digest, len, Body::from(file))
            .await
            .with_context(|| format!("pushing {}", path.display()))
    }

    /// Stores `bytes` as a manifest (or index) of `media_type` under
    /// `reference` (a tag or digest) in `repo`, and returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: Vec<u8>,
    ) -> anyhow::Result<String> {
        let digest = sha256_digest(&bytes);
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let resp = self
            .client
            .put(url.clone())
            .header(header::CONTENT_TYPE, media_type)
            .body(bytes)
            .send()
            .await
            .map_err(reqwest::Error::without_url)
            .with_context(|| format!("PUT {url}"))?;
        let status = resp.status();
        if status != StatusCode::CREATED {
            let body = resp.text().await.unwrap_or_default();
            bail!("PUT {url} ({media_type}): status {status}: {}", body.trim());
        }
        Ok(digest)
    }

    /// Opens an upload session and finishes it with one monolithic PUT.
    async fn upload(&self, repo: &str, digest: &str, len: u64, body: Body) -> anyhow::Result<()> {
        let start = self.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        let resp = self
            .client
            .post(start.clone())
            .header(header::CONTENT_LENGTH, 0)
            .send()
            .await
            .map_err(reqwest::Error::without_url)
            .with_context(|| format!("POST {start}"))?;
        let status = resp.status();
        if status != StatusCode::ACCEPTED {
            let body = resp.text().await.unwrap_or_default();
            bail!("POST {start}: status {status}: {}", body.trim());
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .ok_or_else(|| anyhow::anyhow!("POST {start}: 202 without a Location header"))?
            .to_str()
            .with_context(|| format!("POST {start}: Location is not text"))?;
        let put = upload_url(&start, location, digest)?;
        let resp = self
            .client
            .put(put.clone())
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, len)
            .body(body)
            .send()
            .await
            .map_err(reqwest::Error::without_url)
            .with_context(|| format!("PUT {put}"))?;
        let status = resp.status();
        if status != StatusCode::CREATED {
            let body = resp.text().await.unwrap_or_default();
            bail!("PUT {put}: status {status}: {}", body.trim());
        }
        Ok(())
    }

    fn url(&self, path: &str) -> anyhow::Result<Url> {
        self.base
            .join(path)
            .with_context(|| format!("building a URL for {path} on {}", self.base))
    }
}

/// A reqwest client that works in this workspace. reqwest is built with
/// `rustls-no-provider`, so building any client (even for plain HTTP)
/// panics unless a process-wide rustls crypto provider is installed; this
/// installs ring's if none is.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: any provider will do.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    reqwest::Client::builder()
        .build()
        .context("building the HTTP client")
}

/// Pushes one blob held in memory; see [`Pusher::push_blob`].
pub async fn push_blob(
    base_url: &str,
    repo: &str,
    bytes: Vec<u8>,
    digest: &str,
) -> anyhow::Result<()> {
    Pusher::new(base_url)?.push_blob(repo, bytes, digest).await
}

/// Pushes one blob streamed from a file; see [`Pusher::push_blob_file`].
pub async fn push_blob_file(
    base_url: &str,
    repo: &str,
    path: &Path,
    digest: &str,
) -> anyhow::Result<()> {
    Pusher::new(base_url)?
        .push_blob_file(repo, path, digest)
        .await
}

/// Pushes one manifest and returns its digest; see
/// [`Pusher::push_manifest`].
pub async fn push_manifest(
    base_url: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: Vec<u8>,
) -> anyhow::Result<String> {
    Pusher::new(base_url)?
        .push_manifest(repo, reference, media_type, bytes)
        .await
}

/// `http://HOST:PORT/` from `http://HOST:PORT`, `https://...` or a bare
/// `HOST:PORT` (plain HTTP, as test registries are).
pub fn parse_base_url(base_url: &str) -> anyhow::Result<Url> {
    let with_scheme = if base_url.contains("://") {
        base_url.to_string()
    } else {
        format!("http://{base_url}")
    };
    let mut url =
        Url::parse(&with_scheme).with_context(|| format!("invalid registry URL {base_url:?}"))?;
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// The URL of the monolithic PUT that completes an upload: the `Location`
/// a registry returned (absolute, or relative to the POST's URL), with
/// `digest` added to whatever query string it already carries (registries
/// keep upload state there).
pub fn upload_url(post_url: &Url, location: &str, digest: &str) -> anyhow::Result<Url> {
    let mut url = post_url
        .join(location)
        .with_context(|| format!("invalid upload Location {location:?}"))?;
    url.query_pairs_mut().append_pair("digest", digest);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post_url() -> Url {
        Url::parse("http://127.0.0.1:5000/v2/ember/x/blobs/uploads/").expect("valid URL")
    }

    #[test]
    fn absolute_location_with_query() {
        let url = upload_url(
            &post_url(),
            "http://127.0.0.1:5000/v2/ember/x/blobs/uploads/u1?_state=abc%3D",
            "sha256:00",
        )
        .expect("valid location");
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:5000/v2/ember/x/blobs/uploads/u1?_state=abc%3D&digest=sha256%3A00"
        );
    }

    #[test]
    fn root_relative_location() {
        let url = upload_url(&post_url(), "/v2/ember/x/blobs/uploads/u2", "sha256:00")
            .expect("valid location");
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:5000/v2/ember/x/blobs/uploads/u2?digest=sha256%3A00"
        );
    }

    #[test]
    fn path_relative_location() {
        let url = upload_url(&post_url(), "u3?x=1", "sha256:00").expect("valid location");
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:5000/v2/ember/x/blobs/uploads/u3?x=1&digest=sha256%3A00"
        );
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base_url("127.0.0.1:5000").expect("valid").as_str(),
            "http://127.0.0.1:5000/"
        );
        assert_eq!(
            parse_base_url("http://127.0.0.1:5000/")
                .expect("valid")
                .as_str(),
            "http://127.0.0.1:5000/"
        );
    }
}
