//! The cache's validated configuration.

use ember_registry::Credentials;
use std::path::PathBuf;
use std::time::Duration;

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An `--upstream` value that is not `URL` or `HOST=URL`.
    #[error("invalid upstream {0:?}: expected http(s)://host[:port] or HOST=http(s)://host[:port]")]
    Upstream(String),
    /// Two upstreams with the same name.
    #[error("upstream {0:?} configured twice")]
    Duplicate(String),
    /// More than one upstream without a name.
    #[error("more than one default upstream (give the others a HOST= alias)")]
    TwoDefaults,
    /// No upstream at all. No longer returned: a cache without upstreams
    /// serves only the directory cache and the Turborepo API.
    #[error("no upstream configured")]
    NoUpstream,
    /// Watermarks outside 1..=100 or low above high.
    #[error("watermarks must satisfy 0 < low <= high <= 100 (got low {low}, high {high})")]
    Watermarks {
        /// Low watermark, percent.
        low: u8,
        /// High watermark, percent.
        high: u8,
    },
    /// A peer URL that is not `http(s)://host:port`.
    #[error("invalid peer URL {0:?}")]
    Peer(String),
}

/// One upstream as configured: a default one (`name: None`) or one
/// selected by a host alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// The alias clients select it by (`docker.io`, `ghcr.io`,
    /// `127.0.0.1:5000`); `None` for the default upstream.
    pub alias: Option<String>,
    /// Base URL, `http(s)://host[:port]`.
    pub url: String,
}

impl UpstreamSpec {
    /// Parses `URL` or `HOST=URL`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let (alias, url) = match s.split_once('=') {
            Some((a, u)) => (Some(a.trim().to_string()), u.trim()),
            None => (None, s.trim()),
        };
        let url = url.trim_end_matches('/').to_string();
        let host = url_host(&url).ok_or_else(|| ConfigError::Upstream(s.to_string()))?;
        if host.is_empty() || url[url.find("://").unwrap_or(0) + 3..].contains('/') {
            return Err(ConfigError::Upstream(s.to_string()));
        }
        if let Some(a) = &alias
            && (a.is_empty() || a.contains('/') || a.contains(char::is_whitespace))
        {
            return Err(ConfigError::Upstream(s.to_string()));
        }
        Ok(UpstreamSpec { alias, url })
    }

    /// The name it is known by: its alias, or its URL's `host[:port]`.
    pub fn name(&self) -> String {
        self.alias
            .clone()
            .unwrap_or_else(|| url_host(&self.url).unwrap_or_default().to_string())
    }
}

/// `host[:port]` of an `http(s)://` URL.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// Everything `ember cache` needs to run.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Cache directory.
    pub dir: PathBuf,
    /// Byte budget for verified blobs.
    pub max_bytes: u64,
    /// Eviction starts above this percentage of `max_bytes`...
    pub high_watermark: u8,
    /// ...and goes down to this percentage.
    pub low_watermark: u8,
    /// Upstream registries. None: a pure build cache (`/dircache/v1`,
    /// `/v8/artifacts`); the registry routes then answer that no registry
    /// is configured.
    pub upstreams: Vec<UpstreamSpec>,
    /// The cache's own credentials, by upstream name or URL host.
    pub credentials: Credentials,
    /// Upstreams (by name) with credentials whose content may still be
    /// served to any client.
    pub public: Vec<String>,
    /// How long a tag resolution is trusted before the upstream is asked
    /// again.
    pub tag_ttl: Duration,
    /// The other cache servers (base URLs).
    pub peers: Vec<String>,
    /// This server's URL as its peers know it; defaults to
    /// `http://<listen address>`.
    pub advertise: Option<String>,
    /// How long an upstream's "not found" for a blob or manifest is
    /// remembered, so a storm of requests for something missing costs
    /// one upstream request per interval (zero: not remembered).
    pub negative_ttl: Duration,
    /// Header and idle timeouts and the connection cap of the HTTP server.
    pub http: ember_http::Limits,
    /// The directory cache's budgets, expiry and protected scopes.
    pub dircache: crate::dircache::DircacheConfig,
    /// The bearer token that may upload and delete snapshots
    /// (`/ember/v1/snapshots`); none: snapshots are read-only (a restore
    /// runs the uploaded memory image, so writes are never open).
    pub snapshot_write_token: Option<String>,
}

impl CacheConfig {
    /// A configuration with defaults for everything but the essentials.
    pub fn new(dir: PathBuf, max_bytes: u64, upstreams: Vec<UpstreamSpec>) -> Self {
        CacheConfig {
            dir,
            max_bytes,
            high_watermark: 95,
            low_watermark: 80,
            upstreams,
            credentials: Credentials::none(),
            public: Vec::new(),
            tag_ttl: Duration::from_secs(60),
            peers: Vec::new(),
            advertise: None,
            negative_ttl: Duration::from_secs(5),
            http: ember_http::Limits::new(),
            dircache: Default::default(),
            snapshot_write_token: None,
        }
    }

    /// Checks what cannot be checked while parsing one flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.upstreams.iter().filter(|u| u.alias.is_none()).count() > 1 {
            return Err(ConfigError::TwoDefaults);
        }
        let mut names: Vec<String> = self.upstreams.iter().map(|u| u.name()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::Duplicate(w[0].clone()));
        }
        let (low, high) = (self.low_watermark, self.high_watermark);
        if low == 0 || low > high || high > 100 {
            return Err(ConfigError::Watermarks { low, high });
        }
        for p in self.peers.iter().chain(self.advertise.iter()) {
            if url_host(p).is_none_or(|h| h.is_empty()) {
                return Err(ConfigError::Peer(p.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstreams() {
        let u = UpstreamSpec::parse("http://127.0.0.1:5000/").unwrap();
        assert_eq!(u.alias, None);
        assert_eq!(u.name(), "127.0.0.1:5000");
        let u = UpstreamSpec::parse("docker.io=https://registry-1.docker.io").unwrap();
        assert_eq!(u.name(), "docker.io");
        assert_eq!(u.url, "https://registry-1.docker.io");
        for bad in [
            "ftp://x",
            "x",
            "a=b",
            "http://h/path",
            "=http://h",
            "a/b=http://h",
        ] {
            assert!(UpstreamSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validates() {
        let up = |s| UpstreamSpec::parse(s).unwrap();
        let mut c = CacheConfig::new("/x".into(), 1, vec![up("http://a"), up("http://b")]);
        assert!(matches!(c.validate(), Err(ConfigError::TwoDefaults)));
        c.upstreams = vec![up("http://a"), up("a=http://b")];
        assert!(matches!(c.validate(), Err(ConfigError::Duplicate(_))));
        c.upstreams = vec![up("http://a"), up("b=http://b")];
        c.validate().unwrap();
        c.low_watermark = 99;
        assert!(c.validate().is_err());
        // No upstream: a directory-cache-only server is a valid setup.
        let c = CacheConfig::new("/x".into(), 1, vec![]);
        c.validate().unwrap();
    }
}
