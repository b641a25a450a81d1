//! Parsing what clients send: `/v2/<name>/(manifests|blobs)/<ref>` paths,
//! repository names, tags and `Range` headers. Everything here is outside
//! input and is validated before it reaches the upstream or the disk.

use crate::error::CacheError;
use ember_oci::Digest;

/// What a `/v2/...` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `GET /v2/`: the API version check.
    Base,
    /// A manifest by tag or digest.
    Manifest {
        /// Repository path as sent (it may start with a host alias).
        name: String,
        /// Tag or digest.
        reference: ManifestRef,
    },
    /// A blob by digest.
    Blob {
        /// Repository path as sent.
        name: String,
        /// The blob's digest.
        digest: Digest,
    },
}

/// A manifest reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestRef {
    /// A tag, resolved through the upstream.
    Tag(String),
    /// Content addressed.
    Digest(Digest),
}

impl std::fmt::Display for ManifestRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManifestRef::Tag(t) => f.write_str(t),
            ManifestRef::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// Longest repository name distribution accepts.
const MAX_NAME: usize = 255;

/// Parses the path of a read request.
pub fn parse_path(path: &str) -> Result<Target, CacheError> {
    let rest = path
        .strip_prefix("/v2")
        .ok_or_else(|| CacheError::NotFound(path.to_string()))?;
    if rest.is_empty() || rest == "/" {
        return Ok(Target::Base);
    }
    let rest = rest
        .strip_prefix('/')
        .ok_or_else(|| CacheError::NotFound(path.to_string()))?;
    // The name may contain slashes, so split at the last `/manifests/` or
    // `/blobs/` (a repository component can be called `blobs`).
    let (name, kind, reference) = ["/manifests/", "/blobs/"]
        .iter()
        .filter_map(|k| rest.rfind(k).map(|i| (i, *k)))
        .max_by_key(|(i, _)| *i)
        .map(|(i, k)| (&rest[..i], k, &rest[i + k.len()..]))
        .ok_or_else(|| CacheError::NotFound(path.to_string()))?;
    validate_name(name)?;
    match kind {
        "/manifests/" => {
            let reference = if reference.contains(':') {
                ManifestRef::Digest(parse_digest(reference)?)
            } else {
                validate_tag(reference)?;
                ManifestRef::Tag(reference.to_string())
            };
            Ok(Target::Manifest {
                name: name.to_string(),
                reference,
            })
        }
        _ => {
            if reference.is_empty() || reference == "uploads" || reference.starts_with("uploads/") {
                return Err(CacheError::Unsupported("blob upload".into()));
            }
            Ok(Target::Blob {
                name: name.to_string(),
                digest: parse_digest(reference)?,
            })
        }
    }
}

/// Parses a digest, mapping failures to `DIGEST_INVALID`.
pub fn parse_digest(s: &str) -> Result<Digest, CacheError> {
    s.parse::<Digest>()
        .map_err(|_| CacheError::DigestInvalid(truncate(s)))
}

/// Checks a repository name against distribution's grammar: components of
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`. A first component may
/// be a host alias (`docker.io`, `127.0.0.1:5000`), so `:` is allowed there
/// only; routing decides whether it names an upstream.
pub fn validate_name(name: &str) -> Result<(), CacheError> {
    let bad = || CacheError::NameInvalid(truncate(name));
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(bad());
    }
    for (i, comp) in name.split('/').enumerate() {
        let ok = if i == 0 && comp.contains(':') {
            host_like(comp)
        } else {
            ember_oci::is_valid_path_component(comp)
        };
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

/// `host:port` as a first path component: letters, digits, `.`, `-`, one
/// `:` followed by digits.
fn host_like(c: &str) -> bool {
    let Some((host, port)) = c.split_once(':') else {
        return false;
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !host.contains("..")
        && !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
}

/// Checks a tag against `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), CacheError> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(CacheError::TagInvalid(truncate(tag)))
    }
}

/// Echoing outside input into errors and logs is capped.
fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

/// A byte range of a blob, inclusive start, exclusive end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// A parsed `Range` header, before the blob's size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-b` (b inclusive) or `bytes=a-` (b = None).
    FromTo(u64, Option<u64>),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// Parses a `Range` header. Only a single `bytes` range is supported;
/// anything else (several ranges, other units, garbage) yields `None`, which
/// means "serve the whole blob" as RFC 9110 allows.
pub fn parse_range(header: &str) -> Option<RangeSpec> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.trim().split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        return Some(RangeSpec::Suffix(n));
    }
    let start: u64 = a.parse().ok()?;
    if b.is_empty() {
        return Some(RangeSpec::FromTo(start, None));
    }
    let last: u64 = b.parse().ok()?;
    if last < start {
        return None;
    }
    Some(RangeSpec::FromTo(start, Some(last)))
}

impl RangeSpec {
    /// The range within a blob of `size` bytes, or an error if it does not
    /// overlap the blob at all.
    pub fn resolve(self, size: u64) -> Result<ByteRange, CacheError> {
        match self {
            RangeSpec::FromTo(start, last) => {
                if start >= size {
                    return Err(CacheError::RangeNotSatisfiable { size });
                }
                let end = last.map_or(size, |l| l.saturating_add(1).min(size));
                Ok(ByteRange { start, end })
            }
            RangeSpec::Suffix(n) => {
                if n == 0 || size == 0 {
                    return Err(CacheError::RangeNotSatisfiable { size });
                }
                Ok(ByteRange {
                    start: size.saturating_sub(n),
                    end: size,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_paths() {
        assert_eq!(parse_path("/v2/").unwrap(), Target::Base);
        assert_eq!(parse_path("/v2").unwrap(), Target::Base);
        assert_eq!(
            parse_path("/v2/library/busybox/manifests/latest").unwrap(),
            Target::Manifest {
                name: "library/busybox".into(),
                reference: ManifestRef::Tag("latest".into())
            }
        );
        assert_eq!(
            parse_path(&format!("/v2/a/blobs/b/blobs/{D}")).unwrap(),
            Target::Blob {
                name: "a/blobs/b".into(),
                digest: D.parse().unwrap()
            }
        );
        assert!(matches!(
            parse_path(&format!("/v2/127.0.0.1:5000/x/manifests/{D}")).unwrap(),
            Target::Manifest { .. }
        ));
    }

    #[test]
    fn rejects_hostile_paths() {
        for p in [
            "/v2/../etc/passwd/blobs/sha256:00",
            &format!("/v2/../x/blobs/{D}"),
            &format!("/v2/a/../b/blobs/{D}"),
            &format!("/v2/a//b/blobs/{D}"),
            &format!("/v2/A/blobs/{D}"),
            &format!("/v2/a%2f..%2fb/blobs/{D}"),
            &format!("/v2//blobs/{D}"),
            "/v2/a/manifests/..",
            "/v2/a/manifests/../../x",
            "/v2/a/blobs/sha256:../../../etc/passwd",
            "/v2/a/blobs/sha256:ABC",
            &format!("/v2/-a/blobs/{D}"),
            &format!("/v2/a-/manifests/{D}"),
            &format!("/v2/a.._b/manifests/{D}"),
            &format!("/v2/ho..st:5000/a/manifests/{D}"),
            &format!("/v2/{}/manifests/latest", "a".repeat(300)),
        ] {
            assert!(parse_path(p).is_err(), "{p} accepted");
        }
        assert!(matches!(
            parse_path("/v2/a/blobs/uploads/"),
            Err(CacheError::Unsupported(_))
        ));
        assert!(matches!(
            parse_path("/v2/_catalog"),
            Err(CacheError::NotFound(_))
        ));
    }

    #[test]
    fn parses_ranges() {
        assert_eq!(
            parse_range("bytes=0-9"),
            Some(RangeSpec::FromTo(0, Some(9)))
        );
        assert_eq!(parse_range("bytes=5-"), Some(RangeSpec::FromTo(5, None)));
        assert_eq!(parse_range("bytes=-3"), Some(RangeSpec::Suffix(3)));
        assert_eq!(parse_range("bytes=0-1,4-5"), None);
        assert_eq!(parse_range("items=0-1"), None);
        assert_eq!(parse_range("bytes=9-1"), None);
        assert_eq!(parse_range("bytes=x-1"), None);
        let r = RangeSpec::FromTo(5, Some(100)).resolve(10).unwrap();
        assert_eq!((r.start, r.end), (5, 10));
        let r = RangeSpec::Suffix(30).resolve(10).unwrap();
        assert_eq!((r.start, r.end), (0, 10));
        assert!(RangeSpec::FromTo(10, None).resolve(10).is_err());
        assert!(RangeSpec::Suffix(0).resolve(10).is_err());
    }
}
