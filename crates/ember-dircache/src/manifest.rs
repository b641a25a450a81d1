//! The entry manifest: the tree (paths, kinds, modes, owners, mtimes,
//! symlink targets, hardlinks) and the chunk list of its data.
//!
//! File contents are one stream, the files' bytes concatenated in manifest
//! order (as casync's catar does), cut into content-defined chunks. Small
//! files therefore share chunks instead of costing a request each, and a
//! change to one file changes only the chunks around it. A file's bytes are
//! `[offset, offset + size)` of that stream, so its chunk list is the
//! chunks overlapping that range ([`Manifest::file_chunks`]).
//!
//! A manifest comes from the network, so [`Manifest::validate`] is run by
//! the cache before it stores one and by the client before it restores
//! one. Restoring writes only into a fresh directory and only through
//! parents the manifest itself declared as directories, which is what
//! keeps a hostile manifest from writing outside the target.

use crate::error::DircacheError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The manifest format this crate writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// Longest path inside an entry.
const MAX_PATH: usize = 4096;

/// Largest uncompressed chunk any manifest may name (the chunker's
/// maximum is below it; the bound keeps decompression bounded).
pub const MAX_CHUNK_BYTES: u32 = 1 << 20;

/// One entry's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Everything under the saved directory, parents before children.
    pub nodes: Vec<Node>,
    /// The data stream's chunks, in order.
    pub chunks: Vec<ChunkRef>,
}

/// One chunk of the data stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Lowercase hex SHA-256 of the uncompressed bytes.
    pub digest: String,
    /// Uncompressed size.
    pub size: u32,
}

/// A path in the tree and what is there.
///
/// On the wire a flat object, the kind's fields beside the others:
/// `{"path":…,"type":"file","offset":…,"size":…,"mode":…,…}`. It is read
/// and written through a private flat struct rather than `#[serde(flatten)]` with an
/// internally tagged enum: that pair buffers every node into an
/// intermediate map before reading it, which made parsing a manifest of
/// ten thousand files most of a restore's start (on the cache, which
/// reads the stored entry, and on the client).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "NodeWire<String>")]
pub struct Node {
    /// Relative, `/`-separated, no `.` or `..` components.
    pub path: String,
    /// What it is.
    pub kind: NodeKind,
    /// Permission bits (`0o7777`); ignored for symlinks and hardlinks.
    pub mode: u32,
    /// Owner, restored when the restorer may (root).
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
}

/// The kinds of nodes an entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory (possibly empty).
    Dir,
    /// A regular file: `size` bytes of the data stream from `offset`.
    File {
        /// Offset in the data stream.
        offset: u64,
        /// Length.
        size: u64,
    },
    /// A symbolic link.
    Symlink {
        /// The link's target, as stored.
        target: String,
    },
    /// Another name of an earlier regular file.
    Hardlink {
        /// The earlier file's path.
        target: String,
    },
}

/// The `type` field of a node on the wire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum KindTag {
    Dir,
    File,
    Symlink,
    Hardlink,
}

/// A [`Node`] as JSON has it: one flat object. Fields another kind would
/// have are ignored when read (as the flattened form did) and left out
/// when written.
#[derive(Serialize, Deserialize)]
struct NodeWire<S> {
    path: S,
    #[serde(rename = "type")]
    kind: KindTag,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<S>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    #[serde(default)]
    mtime_nsec: u32,
}

impl TryFrom<NodeWire<String>> for Node {
    type Error = String;
    fn try_from(mut w: NodeWire<String>) -> Result<Self, String> {
        let missing = |f: &str| {
            format!(
                "{} node {:?} has no {f}",
                tag_name(w.kind),
                truncate(&w.path)
            )
        };
        let kind = match w.kind {
            KindTag::Dir => NodeKind::Dir,
            KindTag::File => NodeKind::File {
                offset: w.offset.ok_or_else(|| missing("offset"))?,
                size: w.size.ok_or_else(|| missing("size"))?,
            },
            KindTag::Symlink => NodeKind::Symlink {
                target: w.target.take().ok_or_else(|| missing("target"))?,
            },
            KindTag::Hardlink => NodeKind::Hardlink {
                target: w.target.take().ok_or_else(|| missing("target"))?,
            },
        };
        Ok(Node {
            path: w.path,
            kind,
            mode: w.mode,
            uid: w.uid,
            gid: w.gid,
            mtime: w.mtime,
            mtime_nsec: w.mtime_nsec,
        })
    }
}

fn tag_name(t: KindTag) -> &'static str {
    match t {
        KindTag::Dir => "dir",
        KindTag::File => "file",
        KindTag::Symlink => "symlink",
        KindTag::Hardlink => "hardlink",
    }
}

impl Serialize for Node {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (kind, offset, size, target) = match &self.kind {
            NodeKind::Dir => (KindTag::Dir, None, None, None),
            NodeKind::File { offset, size } => (KindTag::File, Some(*offset), Some(*size), None),
            NodeKind::Symlink { target } => (KindTag::Symlink, None, None, Some(target.as_str())),
            NodeKind::Hardlink { target } => (KindTag::Hardlink, None, None, Some(target.as_str())),
        };
        NodeWire {
            path: self.path.as_str(),
            kind,
            offset,
            size,
            target,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            mtime_nsec: self.mtime_nsec,
        }
        .serialize(s)
    }
}

/// How strict [`Manifest::validate`] is about symlink targets.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Accept symlinks with absolute targets (a virtualenv's
    /// `bin/python -> /usr/bin/python3`). Relative targets that climb out
    /// of the tree are refused either way.
    pub allow_absolute_symlinks: bool,
}

impl Manifest {
    /// Total bytes of the data stream.
    pub fn data_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.size)).sum()
    }

    /// The distinct chunk digests, in first-use order.
    pub fn unique_digests(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .map(|c| c.digest.as_str())
            .filter(|d| seen.insert(*d))
            .collect()
    }

    /// Indices into `chunks` of the chunks holding a file's bytes.
    pub fn file_chunks(&self, offset: u64, size: u64) -> std::ops::Range<usize> {
        let mut start = 0u64;
        let (mut first, mut last) = (usize::MAX, 0);
        for (i, c) in self.chunks.iter().enumerate() {
            let end = start + u64::from(c.size);
            if end > offset && start < offset + size {
                first = first.min(i);
                last = i + 1;
            }
            start = end;
        }
        if first == usize::MAX {
            0..0
        } else {
            first..last
        }
    }

    /// Checks everything a restore relies on. Refuses: absolute paths,
    /// `.`/`..`/empty components, NUL, duplicates, a node whose parent is
    /// not a directory declared earlier (so nothing is ever written through
    /// a symlink), hardlinks to anything but an earlier regular file,
    /// symlinks whose relative target climbs out of the tree (and absolute
    /// ones unless the policy allows them), file ranges that do not tile
    /// the data stream, and malformed chunk references.
    pub fn validate(&self, policy: Policy) -> Result<(), DircacheError> {
        if self.version != MANIFEST_VERSION {
            return Err(DircacheError::invalid(format!(
                "version {} (this build reads {MANIFEST_VERSION})",
                self.version
            )));
        }
        for c in &self.chunks {
            if !is_digest_hex(&c.digest) {
                return Err(DircacheError::invalid(format!(
                    "chunk digest {:?}",
                    truncate(&c.digest)
                )));
            }
            if c.size == 0 || c.size > MAX_CHUNK_BYTES {
                return Err(DircacheError::invalid(format!(
                    "chunk {} of {} bytes",
                    c.digest, c.size
                )));
            }
        }
        // path -> is it a directory / a regular file
        let mut seen: HashMap<&str, &NodeKind> = HashMap::with_capacity(self.nodes.len());
        let mut offset = 0u64;
        for n in &self.nodes {
            check_path(&n.path)?;
            if let Some((parent, _)) = n.path.rsplit_once('/') {
                match seen.get(parent) {
                    Some(NodeKind::Dir) => {}
                    _ => {
                        return Err(DircacheError::invalid(format!(
                            "{:?}: parent is not a directory listed before it",
                            truncate(&n.path)
                        )));
                    }
                }
            }
            match &n.kind {
                NodeKind::Dir => {}
                NodeKind::File { offset: o, size } => {
                    if *o != offset {
                        return Err(DircacheError::invalid(format!(
                            "{:?}: data offset {o}, expected {offset}",
                            truncate(&n.path)
                        )));
                    }
                    offset = offset.checked_add(*size).ok_or_else(|| {
                        DircacheError::invalid(format!("{:?}: size overflows", truncate(&n.path)))
                    })?;
                }
                NodeKind::Symlink { target } => check_symlink(&n.path, target, policy)?,
                NodeKind::Hardlink { target } => match seen.get(target.as_str()) {
                    Some(NodeKind::File { .. }) => {}
                    _ => {
                        return Err(DircacheError::invalid(format!(
                            "{:?}: hardlink to {:?}, not a regular file listed before it",
                            truncate(&n.path),
                            truncate(target)
                        )));
                    }
                },
            }
            if seen.insert(n.path.as_str(), &n.kind).is_some() {
                return Err(DircacheError::invalid(format!(
                    "{:?} listed twice",
                    truncate(&n.path)
                )));
            }
        }
        if offset != self.data_bytes() {
            return Err(DircacheError::invalid(format!(
                "files hold {offset} bytes but the chunks {}",
                self.data_bytes()
            )));
        }
        Ok(())
    }
}

/// Whether `s` is 64 lowercase hex digits.
pub fn is_digest_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_path(p: &str) -> Result<(), DircacheError> {
    let bad = |why: &str| DircacheError::invalid(format!("path {:?}: {why}", truncate(p)));
    if p.is_empty() || p.len() > MAX_PATH {
        return Err(bad("empty or too long"));
    }
    if p.starts_with('/') {
        return Err(bad("absolute"));
    }
    if p.contains('\0') {
        return Err(bad("contains NUL"));
    }
    for c in p.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(bad("empty, `.` or `..` component"));
        }
    }
    Ok(())
}

fn check_symlink(path: &str, target: &str, policy: Policy) -> Result<(), DircacheError> {
    let bad = |why: &str| {
        DircacheError::invalid(format!(
            "symlink {:?} -> {:?}: {why}",
            truncate(path),
            truncate(target)
        ))
    };
    if target.is_empty() || target.len() > MAX_PATH || target.contains('\0') {
        return Err(bad("empty, too long or contains NUL"));
    }
    if target.starts_with('/') {
        return if policy.allow_absolute_symlinks {
            Ok(())
        } else {
            Err(bad(
                "absolute target (allow absolute symlinks to restore it)",
            ))
        };
    }
    // Resolve lexically from the link's directory: depth below the root
    // means the link leads out of the tree.
    let mut depth = path.matches('/').count() as i64;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(bad("leads out of the tree"));
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Checks a scope or key as the cache accepts them: 1 to 512 bytes of
/// UTF-8 without control characters (scopes: at most 255).
pub fn check_name(what: &'static str, value: &str) -> Result<(), DircacheError> {
    let max = if what == "scope" { 255 } else { 512 };
    let why = if value.is_empty() {
        Some("empty")
    } else if value.len() > max {
        Some("too long")
    } else if value.chars().any(char::is_control) {
        Some("contains control characters")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(DircacheError::InvalidName {
            what,
            value: truncate(value),
            why,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(path: &str, kind: NodeKind) -> Node {
        Node {
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
        }
    }

    fn with(nodes: Vec<Node>) -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            nodes,
            chunks: vec![],
        }
    }

    /// The wire form is the one earlier builds wrote (`type` beside the
    /// other fields), so entries stored by them still restore.
    #[test]
    fn the_json_form_is_flat_and_unchanged() {
        let json = concat!(
            r#"{"version":1,"nodes":["#,
            r#"{"path":"a","type":"dir","mode":493,"uid":0,"gid":0,"mtime":1796336519,"mtime_nsec":683003041},"#,
            r#"{"path":"a/f","type":"file","offset":0,"size":7,"mode":420,"uid":1,"gid":2,"mtime":-5,"mtime_nsec":0},"#,
            r#"{"path":"a/s","type":"symlink","target":"f","mode":511,"uid":0,"gid":0,"mtime":3,"mtime_nsec":0},"#,
            r#"{"path":"a/h","type":"hardlink","target":"a/f","mode":420,"uid":0,"gid":0,"mtime":3,"mtime_nsec":0}"#,
            r#"],"chunks":[{"digest":"ab","size":7}]}"#
        );
        let m: Manifest = serde_json::from_str(json).unwrap();
        assert_eq!(m.nodes[1].kind, NodeKind::File { offset: 0, size: 7 });
        assert_eq!(m.nodes[1].mtime, -5);
        assert_eq!(
            m.nodes[3].kind,
            NodeKind::Hardlink {
                target: "a/f".into()
            }
        );
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
        // mtime_nsec may be absent; another kind's fields are ignored.
        let n: Node = serde_json::from_str(
            r#"{"path":"d","type":"dir","size":9,"mode":493,"uid":0,"gid":0,"mtime":1}"#,
        )
        .unwrap();
        assert_eq!((n.kind, n.mtime_nsec), (NodeKind::Dir, 0));
        // A file without its place in the stream is refused, by name.
        let e = serde_json::from_str::<Node>(
            r#"{"path":"x","type":"file","size":1,"mode":420,"uid":0,"gid":0,"mtime":1}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(r#"file node "x" has no offset"#),
            "{e}"
        );
        assert!(
            serde_json::from_str::<Node>(
                r#"{"path":"x","type":"fifo","mode":420,"uid":0,"gid":0,"mtime":1}"#
            )
            .is_err()
        );
    }

    #[test]
    fn refuses_hostile_paths_and_links() {
        let sym = |t: &str| NodeKind::Symlink { target: t.into() };
        let bad = [
            vec![node("../x", NodeKind::Dir)],
            vec![node("/etc", NodeKind::Dir)],
            vec![node("a/../../x", NodeKind::Dir)],
            vec![node("a//b", NodeKind::Dir)],
            vec![node("./a", NodeKind::Dir)],
            vec![node("a\0b", NodeKind::Dir)],
            // A child of something not declared a directory: of nothing...
            vec![node("a/b", NodeKind::Dir)],
            // ...or of a symlink (writing through it would escape).
            vec![node("a", sym("/")), node("a/b", NodeKind::Dir)],
            vec![node("a", sym("..")), node("a/etc", NodeKind::Dir)],
            vec![node("a", NodeKind::Dir), node("a", NodeKind::Dir)],
            vec![node("l", sym("../outside"))],
            vec![node("d", NodeKind::Dir), node("d/l", sym("../../x"))],
            vec![node("l", sym("/etc/passwd"))],
            vec![node(
                "h",
                NodeKind::Hardlink {
                    target: "../x".into(),
                },
            )],
            vec![
                node("d", NodeKind::Dir),
                node("h", NodeKind::Hardlink { target: "d".into() }),
            ],
            vec![node("f", NodeKind::File { offset: 5, size: 1 })],
        ];
        for nodes in bad {
            let m = with(nodes.clone());
            assert!(m.validate(Policy::default()).is_err(), "{nodes:?} accepted");
        }
    }

    #[test]
    fn accepts_a_normal_tree() {
        let m = Manifest {
            version: MANIFEST_VERSION,
            nodes: vec![
                node("d", NodeKind::Dir),
                node("d/f", NodeKind::File { offset: 0, size: 3 }),
                node(
                    "d/h",
                    NodeKind::Hardlink {
                        target: "d/f".into(),
                    },
                ),
                node(
                    "d/l",
                    NodeKind::Symlink {
                        target: "../d/f".into(),
                    },
                ),
                node("e", NodeKind::Dir),
                node("g", NodeKind::File { offset: 3, size: 2 }),
            ],
            chunks: vec![ChunkRef {
                digest: "a".repeat(64),
                size: 5,
            }],
        };
        m.validate(Policy::default()).unwrap();
        assert_eq!(m.file_chunks(3, 2), 0..1);
        let abs = with(vec![node(
            "l",
            NodeKind::Symlink {
                target: "/usr/bin/python3".into(),
            },
        )]);
        abs.validate(Policy {
            allow_absolute_symlinks: true,
        })
        .unwrap();
    }
}
