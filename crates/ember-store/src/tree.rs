//! The record of a layer directory's tree, written when the layer is
//! committed, so `ember store verify` can later find a layer that was
//! changed on disk or torn by a crash.
//!
//! A record lists every entry under the layer directory (the directory
//! itself as `.`): type, mode, owner, size, link count, mtime, device
//! number, symlink target, the overlayfs opaque marker of directories, and
//! an XXH3-64 checksum of each regular file's contents. The unpacker builds
//! the record as it writes (see [`RecordBuilder`]): checksums come from its
//! copy buffer, and files' and directories' metadata from the values it set
//! itself, so recording costs neither a second read of the data nor a walk
//! of the finished tree (a path lookup, and for a directory a `getxattr`,
//! per entry). Only what it cannot vouch for (links, special files,
//! implicit and opaque directories) is `lstat`ed at the end. XXH3 is not a
//! cryptographic hash: the record guards against accidents (a disk, a
//! crash, a hand edit), and anyone who can rewrite layer files as root can
//! rewrite the record too. The layer's identity is still its diff_id,
//! checked over the whole stream at pull time.
//!
//! The file format is text, one entry per line, sorted by path:
//!
//! ```text
//! ember-tree 1
//! <kind> <mode> <uid> <gid> <size> <nlink> <mtime> <rdev> <xxh3> <path> [<target>]
//! end <entries>
//! ```
//!
//! `kind` is `d`, `D` (opaque directory), `f`, `l`, `c`, `b`, `p` or `s`;
//! numbers are decimal except `mode` (octal) and `xxh3` (hex); `path` and
//! `target` escape bytes outside printable ASCII, space and `%` as `%XX`.
//! The `end` line makes a torn record (a crash while it was written)
//! recognisable.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const HEADER: &str = "ember-tree 1";

/// One entry of a layer tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    /// `d`, `D` (opaque directory), `f`, `l`, `c`, `b`, `p` or `s`.
    pub kind: u8,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (files and symlinks; 0 otherwise).
    pub size: u64,
    /// Hard link count (files; 0 otherwise, as directories' vary by
    /// filesystem).
    pub nlink: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// Device number (character and block devices).
    pub rdev: u64,
    /// XXH3-64 of a regular file's contents.
    pub xxh3: u64,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
}

/// A layer tree: relative path (`.` for the root) → entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeRecord {
    /// Entries by path bytes, sorted.
    pub entries: BTreeMap<Vec<u8>, TreeEntry>,
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record file is not there.
    #[error("no tree record")]
    Missing,
    /// The file could not be read.
    #[error("reading tree record")]
    Io(#[source] io::Error),
    /// The file ends early or is malformed (a crash while it was written).
    #[error("tree record is torn or malformed: {0}")]
    Torn(String),
}

/// A streaming content checksum, as the unpacker and the verifier compute it.
pub struct ContentHasher(xxhash_rust::xxh3::Xxh3);

impl ContentHasher {
    /// A fresh hasher.
    pub fn new() -> ContentHasher {
        ContentHasher(xxhash_rust::xxh3::Xxh3::new())
    }
    /// Feeds bytes.
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b);
    }
    /// The checksum so far.
    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
}

impl Default for ContentHasher {
    fn default() -> Self {
        ContentHasher::new()
    }
}

fn checksum_file(p: &Path, buf: &mut [u8]) -> io::Result<u64> {
    let mut f = fs::File::open(p)?;
    let mut h = ContentHasher::new();
    loop {
        match f.read(buf) {
            Ok(0) => return Ok(h.finish()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The record of a tree being unpacked, built from what the unpacker
/// knows as it writes, so no walk of the finished tree is needed.
///
/// A regular file is recorded from the owner, mode, mtime and size the
/// unpacker set through its descriptor, and a directory from the metadata
/// applied to it at the very end, when the filesystem keeps those values
/// exactly (as root, an mtime in 1970..2038). Everything else an unpack
/// creates (symlinks, devices, fifos and whiteouts; implicit parents and
/// opaque directories; files that get hardlinks, whose link count
/// changes) is noted and `lstat`ed by [`RecordBuilder::finish`]. A removed path takes its record and
/// everything below it along. The unpack tests check that the result
/// equals [`scan`] of the same tree.
#[derive(Debug, Default)]
pub struct RecordBuilder {
    /// Regular files recorded through their descriptor.
    done: BTreeMap<Vec<u8>, TreeEntry>,
    /// Paths to `lstat` at the end, with the checksum of those that are
    /// regular files (hardlinked ones).
    late: BTreeMap<Vec<u8>, Option<u64>>,
}

/// What the unpacker set on a regular file it created, for
/// [`RecordBuilder::file`].
#[derive(Debug, Clone, Copy)]
pub struct NewFile {
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Bytes written.
    pub size: u64,
    /// Modification time, seconds.
    pub mtime: i64,
    /// XXH3-64 of the contents.
    pub xxh3: u64,
}

/// What the unpacker set on a directory, for [`RecordBuilder::dir`].
#[derive(Debug, Clone, Copy)]
pub struct NewDir {
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds.
    pub mtime: i64,
}

fn key(rel: &Path) -> Vec<u8> {
    rel.as_os_str().as_bytes().to_vec()
}

/// Removes `k` and every key below it (`k/...`) from a sorted map.
fn remove_below<V>(map: &mut BTreeMap<Vec<u8>, V>, k: &[u8]) {
    map.remove(k);
    let mut prefix = k.to_vec();
    prefix.push(b'/');
    let below: Vec<Vec<u8>> = map
        .range(prefix.clone()..)
        .take_while(|(p, _)| p.starts_with(&prefix))
        .map(|(p, _)| p.clone())
        .collect();
    for p in below {
        map.remove(&p);
    }
}

impl RecordBuilder {
    /// An empty record.
    pub fn new() -> RecordBuilder {
        RecordBuilder::default()
    }

    /// A new regular file at `rel` is complete, with exactly this owner,
    /// mode (`& 0o7777`), mtime, size and checksum set through its
    /// descriptor, and one link. The unpack tests check such entries
    /// against a walk of the tree.
    pub fn file(&mut self, rel: &Path, e: NewFile) {
        let k = key(rel);
        self.late.remove(&k);
        self.done.insert(
            k,
            TreeEntry {
                kind: b'f',
                mode: e.mode & 0o7777,
                uid: e.uid,
                gid: e.gid,
                size: e.size,
                nlink: 1,
                mtime: e.mtime,
                rdev: 0,
                xxh3: e.xxh3,
                target: None,
            },
        );
    }

    /// Something at `rel` to record from `lstat` at the end.
    pub fn later(&mut self, rel: &Path) {
        let k = key(rel);
        self.done.remove(&k);
        self.late.insert(k, None);
    }

    /// A directory at `rel` (not opaque) whose owner, mode and mtime were
    /// just set to exactly these, after everything inside it was written.
    pub fn dir(&mut self, rel: &Path, e: NewDir) {
        let k = key(rel);
        self.late.remove(&k);
        self.done.insert(
            k,
            TreeEntry {
                kind: b'd',
                mode: e.mode & 0o7777,
                uid: e.uid,
                gid: e.gid,
                size: 0,
                nlink: 0,
                mtime: e.mtime,
                rdev: 0,
                xxh3: 0,
                target: None,
            },
        );
    }

    /// A regular file at `rel` with checksum `xxh3`, whose metadata is to
    /// be read with `lstat` at the end.
    pub fn file_later(&mut self, rel: &Path, xxh3: u64) {
        let k = key(rel);
        self.done.remove(&k);
        self.late.insert(k, Some(xxh3));
    }

    /// `link` was made a hardlink of the regular file `target`: both are
    /// recorded at the end (their link count changed), with the target's
    /// checksum.
    pub fn hardlink(&mut self, link: &Path, target: &Path) {
        let t = key(target);
        let sum = match self.done.remove(&t) {
            Some(e) => Some(e.xxh3),
            None => self.late.get(&t).copied().flatten(),
        };
        self.late.insert(t, sum);
        let l = key(link);
        self.done.remove(&l);
        self.late.insert(l, sum);
    }

    /// Whatever was at `rel` (and below it) was removed.
    pub fn removed(&mut self, rel: &Path) {
        let k = key(rel);
        remove_below(&mut self.done, &k);
        remove_below(&mut self.late, &k);
    }

    /// The record of the finished tree at `dir`: what was recorded on the
    /// way, plus an `lstat` of the root and of every noted path. A noted
    /// path that is gone is left out, as a walk would leave it out; a noted
    /// regular file without a known checksum is read.
    pub fn finish(self, dir: &Path) -> io::Result<TreeRecord> {
        let mut rec = TreeRecord { entries: self.done };
        let root = fs::symlink_metadata(dir)?;
        rec.entries
            .insert(b".".to_vec(), entry_of(dir, &root, None, 0)?);
        let mut buf = Vec::new();
        for (k, sum) in self.late {
            let abs = dir.join(std::ffi::OsStr::from_bytes(&k));
            let m = match fs::symlink_metadata(&abs) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let sum = match (m.is_file(), sum) {
                (false, _) => 0,
                (true, Some(s)) => s,
                (true, None) => {
                    buf.resize(128 * 1024, 0);
                    checksum_file(&abs, &mut buf)?
                }
            };
            let target = if m.file_type().is_symlink() {
                Some(fs::read_link(&abs)?.into_os_string().into_vec())
            } else {
                None
            };
            rec.entries.insert(k, entry_of(&abs, &m, target, sum)?);
        }
        Ok(rec)
    }
}

/// Walks `dir` and records its tree, reading every regular file for its
/// checksum: what `ember store verify` compares a layer's record with.
pub fn scan(dir: &Path) -> io::Result<TreeRecord> {
    let mut rec = TreeRecord::default();
    let mut buf = vec![0u8; 128 * 1024];
    let root = fs::symlink_metadata(dir)?;
    rec.entries
        .insert(b".".to_vec(), entry_of(dir, &root, None, 0)?);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let child = rel.join(e.file_name());
            let abs = dir.join(&child);
            let m = fs::symlink_metadata(&abs)?;
            if m.is_dir() {
                stack.push(child.clone());
            }
            let sum = if m.is_file() {
                checksum_file(&abs, &mut buf)?
            } else {
                0
            };
            let target = if m.file_type().is_symlink() {
                Some(fs::read_link(&abs)?.into_os_string().into_vec())
            } else {
                None
            };
            rec.entries.insert(
                child.as_os_str().as_bytes().to_vec(),
                entry_of(&abs, &m, target, sum)?,
            );
        }
    }
    Ok(rec)
}

fn entry_of(
    abs: &Path,
    m: &fs::Metadata,
    target: Option<Vec<u8>>,
    xxh3: u64,
) -> io::Result<TreeEntry> {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        if crate::is_opaque(abs) { b'D' } else { b'd' }
    } else if ft.is_file() {
        b'f'
    } else if ft.is_symlink() {
        b'l'
    } else if ft.is_char_device() {
        b'c'
    } else if ft.is_block_device() {
        b'b'
    } else if ft.is_fifo() {
        b'p'
    } else {
        b's'
    };
    Ok(TreeEntry {
        kind,
        // A symlink's mode is always 0777 and not settable: not recorded.
        mode: if kind == b'l' { 0 } else { m.mode() & 0o7777 },
        uid: m.uid(),
        gid: m.gid(),
        size: if matches!(kind, b'f' | b'l') {
            m.len()
        } else {
            0
        },
        nlink: if kind == b'f' { m.nlink() } else { 0 },
        mtime: m.mtime(),
        rdev: if matches!(kind, b'c' | b'b') {
            m.rdev()
        } else {
            0
        },
        xxh3,
        target,
    })
}

fn escape(out: &mut Vec<u8>, b: &[u8]) {
    for &c in b {
        if c.is_ascii_graphic() && c != b'%' {
            out.push(c);
        } else {
            out.extend_from_slice(format!("%{c:02x}").as_bytes());
        }
    }
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

impl TreeRecord {
    /// The record in its file format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.entries.len() * 96);
        out.extend_from_slice(HEADER.as_bytes());
        out.push(b'\n');
        for (path, e) in &self.entries {
            // Straight into the buffer, not through a `String` per entry.
            let _ = write!(
                out,
                "{} {:o} {} {} {} {} {} {} {:016x} ",
                e.kind as char, e.mode, e.uid, e.gid, e.size, e.nlink, e.mtime, e.rdev, e.xxh3
            );
            escape(&mut out, path);
            if let Some(t) = &e.target {
                out.push(b' ');
                escape(&mut out, t);
            }
            out.push(b'\n');
        }
        out.extend_from_slice(format!("end {}\n", self.entries.len()).as_bytes());
        out
    }

    /// Parses a record; anything short of a complete, well-formed file is
    /// [`RecordError::Torn`].
    pub fn parse(bytes: &[u8]) -> Result<TreeRecord, RecordError> {
        let torn = |why: String| RecordError::Torn(why);
        let text = std::str::from_utf8(bytes).map_err(|_| torn("not UTF-8".into()))?;
        let mut lines = text.split_inclusive('\n');
        if lines.next().and_then(|l| l.strip_suffix('\n')) != Some(HEADER) {
            return Err(torn("bad header".into()));
        }
        let mut rec = TreeRecord::default();
        let mut pos = HEADER.len() + 1;
        for (n, line) in lines.enumerate() {
            pos += line.len();
            let Some(line) = line.strip_suffix('\n') else {
                return Err(torn(format!("line {} is cut off", n + 2)));
            };
            if let Some(count) = line.strip_prefix("end ") {
                if count.parse::<usize>().ok() != Some(rec.entries.len()) {
                    return Err(torn(format!(
                        "end line says {count} entries, record has {}",
                        rec.entries.len()
                    )));
                }
                if pos != bytes.len() {
                    return Err(torn("data after the end line".into()));
                }
                return Ok(rec);
            }
            let bad = || torn(format!("line {} is malformed", n + 2));
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() != 10 && f.len() != 11 {
                return Err(bad());
            }
            let kind = *f[0].as_bytes().first().ok_or_else(bad)?;
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
            let e = TreeEntry {
                kind,
                mode: u32::from_str_radix(f[1], 8).map_err(|_| bad())?,
                uid: f[2].parse().map_err(|_| bad())?,
                gid: f[3].parse().map_err(|_| bad())?,
                size: num(f[4])?,
                nlink: num(f[5])?,
                mtime: f[6].parse().map_err(|_| bad())?,
                rdev: num(f[7])?,
                xxh3: u64::from_str_radix(f[8], 16).map_err(|_| bad())?,
                target: match f.get(10) {
                    Some(t) => Some(unescape(t).ok_or_else(bad)?),
                    None => None,
                },
            };
            rec.entries.insert(unescape(f[9]).ok_or_else(bad)?, e);
        }
        Err(torn("no end line".into()))
    }

    /// Reads the record at `path`.
    pub fn read(path: &Path) -> Result<TreeRecord, RecordError> {
        match fs::read(path) {
            Ok(b) => TreeRecord::parse(&b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(RecordError::Missing),
            Err(e) => Err(RecordError::Io(e)),
        }
    }

    /// How `actual` differs from this record, one line per path, at most
    /// `limit` lines (plus a count of the rest).
    pub fn diff(&self, actual: &TreeRecord, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
        for (p, want) in &self.entries {
            match actual.entries.get(p) {
                None => out.push(format!("{}: missing", show(p))),
                Some(got) if got != want => {
                    out.push(format!("{}: {}", show(p), describe(want, got)))
                }
                Some(_) => {}
            }
        }
        for p in actual.entries.keys() {
            if !self.entries.contains_key(p) {
                out.push(format!("{}: not in the record", show(p)));
            }
        }
        if out.len() > limit {
            let rest = out.len() - limit;
            out.truncate(limit);
            out.push(format!("... and {rest} more"));
        }
        out
    }
}

fn describe(want: &TreeEntry, got: &TreeEntry) -> String {
    let mut what = Vec::new();
    if want.kind != got.kind {
        what.push(format!(
            "type {} -> {}",
            want.kind as char, got.kind as char
        ));
    }
    if want.size != got.size {
        what.push(format!("size {} -> {}", want.size, got.size));
    }
    if want.xxh3 != got.xxh3 {
        what.push("content differs".into());
    }
    if want.mode != got.mode {
        what.push(format!("mode {:o} -> {:o}", want.mode, got.mode));
    }
    if (want.uid, want.gid) != (got.uid, got.gid) {
        what.push(format!(
            "owner {}:{} -> {}:{}",
            want.uid, want.gid, got.uid, got.gid
        ));
    }
    if want.nlink != got.nlink {
        what.push(format!("links {} -> {}", want.nlink, got.nlink));
    }
    if want.mtime != got.mtime {
        what.push(format!("mtime {} -> {}", want.mtime, got.mtime));
    }
    if want.rdev != got.rdev {
        what.push(format!("device {} -> {}", want.rdev, got.rdev));
    }
    if want.target != got.target {
        what.push("symlink target differs".into());
    }
    what.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_torn_ones_are_refused() {
        let mut rec = TreeRecord::default();
        rec.entries.insert(
            b"a b/%x\n".to_vec(),
            TreeEntry {
                kind: b'l',
                mode: 0,
                uid: 1,
                gid: 2,
                size: 3,
                nlink: 0,
                mtime: -5,
                rdev: 0,
                xxh3: 0xdead,
                target: Some(b"../t a".to_vec()),
            },
        );
        rec.entries.insert(
            b".".to_vec(),
            TreeEntry {
                kind: b'D',
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                nlink: 0,
                mtime: 1,
                rdev: 0,
                xxh3: 0,
                target: None,
            },
        );
        let b = rec.to_bytes();
        assert_eq!(TreeRecord::parse(&b).expect("parse"), rec);
        for cut in [0, 5, b.len() / 2, b.len() - 1] {
            assert!(
                matches!(TreeRecord::parse(&b[..cut]), Err(RecordError::Torn(_))),
                "record cut at {cut} of {} was accepted",
                b.len()
            );
        }
        let mut extra = b.clone();
        extra.extend_from_slice(b"junk\n");
        assert!(TreeRecord::parse(&extra).is_err());
    }
}
