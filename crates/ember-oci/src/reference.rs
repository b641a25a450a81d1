//! Image references, parsed by the grammar of distribution's `reference`
//! package and normalised the way Docker does (`busybox` is
//! `docker.io/library/busybox:latest`).

use crate::digest::{Digest, DigestError};
use std::fmt;
use std::str::FromStr;

/// The registry name Docker Hub images are written with.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's registry API actually answers.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// Why a string is not an image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// Empty input.
    #[error("invalid reference: empty")]
    Empty,
    /// A repository path component outside `[a-z0-9]+([._]|__|-+)[a-z0-9]+`.
    #[error(
        "invalid reference {reference:?}: repository path component {component:?} must be lowercase letters, digits and separators"
    )]
    Component {
        /// The whole input.
        reference: String,
        /// The offending component.
        component: String,
    },
    /// A registry host that is not a host name, IPv4/IPv6 address and port.
    #[error("invalid reference {reference:?}: bad registry host {host:?}")]
    Host {
        /// The whole input.
        reference: String,
        /// The offending host.
        host: String,
    },
    /// A tag outside `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
    #[error("invalid reference {reference:?}: bad tag {tag:?}")]
    Tag {
        /// The whole input.
        reference: String,
        /// The offending tag.
        tag: String,
    },
    /// The part after `@` is not a digest.
    #[error("invalid reference {reference:?}")]
    Digest {
        /// The whole input.
        reference: String,
        /// Why the digest is bad.
        source: DigestError,
    },
    /// The repository name is longer than 255 characters.
    #[error("invalid reference {0:?}: repository name longer than 255 characters")]
    TooLong(String),
}

/// A fully qualified image reference: registry, repository, and a tag and/or
/// digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// The registry host as written (`docker.io`, `localhost:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host the registry API is reached at: Docker Hub's API host for
    /// `docker.io`, the registry itself otherwise.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The repository path (`library/busybox`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if one was given or defaulted.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry's manifest endpoint for: the digest when
    /// pinned (it wins over a tag, as in Docker), else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same image pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// Whether the registry is on a loopback address, where plain HTTP is
    /// allowed without being asked for.
    pub fn is_loopback_registry(&self) -> bool {
        is_loopback_host(&self.registry)
    }
}

/// Whether `host[:port]` names localhost or an address in 127.0.0.0/8 or ::1.
pub(crate) fn is_loopback_host(host_port: &str) -> bool {
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        host_port.split(':').next().unwrap_or_default()
    };
    if host == "localhost" || host == "::1" {
        return true;
    }
    host.parse::<std::net::Ipv4Addr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

/// Whether `c` is one repository path component by distribution's grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub fn is_valid_path_component(c: &str) -> bool {
    // [a-z0-9]+ ( ( [._] | __ | -+ ) [a-z0-9]+ )*
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        // [IPv6]:port
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return false,
            },
        };
        (None, port)
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (Some(n), Some(p)),
            None => (Some(host), None),
        }
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    match name {
        None => true,
        Some(n) => {
            !n.is_empty()
                && n.split('.').all(|label| {
                    let lb = label.as_bytes();
                    !lb.is_empty()
                        && lb[0].is_ascii_alphanumeric()
                        && lb[lb.len() - 1].is_ascii_alphanumeric()
                        && lb.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-')
                })
        }
    }
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => {
                let digest = d.parse().map_err(|source| ReferenceError::Digest {
                    reference: input.to_string(),
                    source,
                })?;
                (r, Some(digest))
            }
            None => (input, None),
        };
        // A tag is a ':' after the last '/', so `host:5000/app` has none.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                if !valid_tag(tag) {
                    return Err(ReferenceError::Tag {
                        reference: input.to_string(),
                        tag: tag.to_string(),
                    });
                }
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(ReferenceError::Empty);
        }
        // Docker's rule: the first component is a registry if it has a '.'
        // or ':' or is `localhost` (or has uppercase, which a repository
        // component cannot).
        let (registry, repository) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.bytes().any(|b| b.is_ascii_uppercase()) =>
            {
                if !valid_host(first) {
                    return Err(ReferenceError::Host {
                        reference: input.to_string(),
                        host: first.to_string(),
                    });
                }
                let registry = if first == "index.docker.io" {
                    DOCKER_HUB.to_string()
                } else {
                    first.to_string()
                };
                (registry, remainder.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        for component in repository.split('/') {
            if !is_valid_path_component(component) {
                return Err(ReferenceError::Component {
                    reference: input.to_string(),
                    component: component.to_string(),
                });
            }
        }
        if registry.len() + 1 + repository.len() > 255 {
            return Err(ReferenceError::TooLong(input.to_string()));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl serde::Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn p(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("busybox");
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(p("user/app:1.0").to_string(), "docker.io/user/app:1.0");
        assert_eq!(p("index.docker.io/library/x").registry(), "docker.io");
    }

    #[test]
    fn hosts_ports_and_paths() {
        let r = p("localhost:5000/a/b/c:tag-1.2_x");
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "a/b/c");
        assert_eq!(r.tag(), Some("tag-1.2_x"));
        assert!(r.is_loopback_registry());
        let r = p("127.0.0.1:5000/app");
        assert_eq!(r.tag(), Some("latest"));
        assert!(r.is_loopback_registry());
        assert!(!p("ghcr.io/org/app").is_loopback_registry());
        assert_eq!(p("localhost/app").registry(), "localhost");
        assert_eq!(p("[::1]:5000/app").registry(), "[::1]:5000");
        assert!(p("[::1]:5000/app").is_loopback_registry());
        assert_eq!(
            p("my-registry.example.com/x__y/a.b-c").repository(),
            "x__y/a.b-c"
        );
    }

    #[test]
    fn digests() {
        let r = p(&format!("quay.io/app@{D}"));
        assert_eq!(r.tag(), None);
        assert_eq!(r.manifest_reference(), D);
        let r = p(&format!("app:v1@{D}"));
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.manifest_reference(), D);
        assert_eq!(r.to_string(), format!("docker.io/library/app:v1@{D}"));
    }

    #[test]
    fn a_bad_digest_is_said_once_in_the_chain() {
        let e = "app@sha256:zz"
            .parse::<Reference>()
            .expect_err("bad digest");
        assert_eq!(
            ember_error::repeated_source(&e),
            None,
            "{}",
            ember_error::chain(&e)
        );
        let chain = ember_error::chain(&e).to_string();
        assert!(
            chain.starts_with("invalid reference \"app@sha256:zz\": "),
            "{chain}"
        );
        assert!(
            chain.len() > "invalid reference \"app@sha256:zz\": ".len(),
            "{chain}"
        );
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "UPPER",
            "app:",
            "app:-bad",
            "a//b",
            "/app",
            "app/",
            "app@sha256:123",
            "app@",
            "host:port/app",
            "app:tag/with/slash",
            "a..b",
            "a/../b",
            "-app",
        ] {
            assert!(
                bad.parse::<Reference>().is_err(),
                "{bad:?} should be rejected"
            );
        }
        let long = "a/".repeat(130) + "a";
        assert!(long.parse::<Reference>().is_err());
    }

    #[test]
    fn round_trips() {
        for s in ["docker.io/library/busybox:latest", "localhost:5000/a/b:t"] {
            assert_eq!(p(s).to_string(), s);
            assert_eq!(p(&p(s).to_string()), p(s));
        }
    }
}
