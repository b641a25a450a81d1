//! `ember_store::unpack` against hostile and tricky layer tars, in both
//! modes. Hostile streams are written header by header (`tar::Builder`
//! refuses `..` and absolute names), each unpacked into a fresh `dest`
//! inside its own parent directory, so "nothing outside dest" is checked by
//! listing the parent — and, for escapes through symlinks to `/` or `../..`,
//! by looking for the uniquely named file where it would have landed.

mod common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use common::{BLOCK, CHAR, Header, RawTar, names};
use ember_store::unpack::{Mode, UnpackError, UnpackStats, unpack};

const MODES: [Mode; 2] = [Mode::Overlay, Mode::Flatten];

/// A parent directory holding only `dest`.
struct Sandbox {
    parent: tempfile::TempDir,
    dest: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        let parent = tempfile::Builder::new()
            .prefix("ember-unpack-")
            .tempdir()
            .expect("tempdir");
        let dest = parent.path().join("dest");
        fs::create_dir(&dest).expect("create dest");
        Sandbox { parent, dest }
    }

    /// Unpacks, and for an overlay unpack that succeeds checks that the
    /// tree record the unpacker built as it wrote equals a walk of the
    /// finished tree (what `ember store verify` compares it with).
    fn unpack(&self, tar: &[u8], mode: Mode) -> Result<UnpackStats, UnpackError> {
        let stats = unpack(tar, &self.dest, mode)?;
        if mode == Mode::Overlay {
            let walked = ember_store::tree::scan(&self.dest).expect("walk the unpacked tree");
            let built = stats
                .tree
                .as_ref()
                .expect("overlay unpack records the tree");
            assert_eq!(
                String::from_utf8_lossy(&built.to_bytes()),
                String::from_utf8_lossy(&walked.to_bytes()),
                "the record built while unpacking differs from a walk of the tree"
            );
        }
        Ok(stats)
    }

    /// Nothing but `dest` (and `allowed`) may be in the parent.
    fn assert_contained(&self, allowed: &[&str]) {
        let mut want: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        want.push("dest".into());
        want.sort();
        assert_eq!(
            names(self.parent.path()),
            want,
            "something was written beside dest"
        );
    }
}

/// A file name no other test or process uses, for escape targets in
/// shared directories (`/`, the system temp dir, `/etc`).
fn unique(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "ember-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Unpacks `tar` in `mode` into a fresh sandbox, expects a hostile-layer
/// error, and checks nothing landed outside dest or at any of `outside`.
fn expect_refused(tar: &[u8], mode: Mode, outside: &[PathBuf]) -> (Sandbox, String) {
    let sb = Sandbox::new();
    let msg = expect_refused_in(&sb, tar, mode, outside);
    (sb, msg)
}

/// [`expect_refused`] in a sandbox the caller made (to compute where an
/// escape relative to dest would land).
fn expect_refused_in(sb: &Sandbox, tar: &[u8], mode: Mode, outside: &[PathBuf]) -> String {
    let err = match sb.unpack(tar, mode) {
        Ok(stats) => panic!("{mode:?}: hostile tar was accepted ({stats:?})"),
        Err(e) => e,
    };
    assert!(
        matches!(err, UnpackError::Hostile { .. }),
        "{mode:?}: expected a hostile-layer error, got {err:?}"
    );
    let msg = ember_error::chain(&err).to_string();
    assert!(msg.contains("hostile layer"), "{mode:?}: {msg}");
    sb.assert_contained(&[]);
    for p in outside {
        assert!(!exists(p), "{mode:?}: {} was created", p.display());
    }
    msg
}

#[test]
fn parent_dir_components_are_refused() {
    for mode in MODES {
        for name in [
            "../escape",
            "a/../../escape",
            "./../escape",
            "a/b/../../../escape",
        ] {
            let tar = RawTar::new().file(name, b"pwned").finish();
            let (sb, msg) = expect_refused(&tar, mode, &[]);
            assert!(
                msg.contains(name),
                "{mode:?}: error does not name {name:?}: {msg}"
            );
            assert!(!exists(&sb.parent.path().join("escape")));
        }
        // Also as a directory entry and as a symlink's own name.
        let mut t = RawTar::new();
        t.dir("../escape/");
        expect_refused(&t.finish(), mode, &[]);
        let mut t = RawTar::new();
        t.symlink("../escape", "/etc/passwd");
        expect_refused(&t.finish(), mode, &[]);
    }
}

#[test]
fn absolute_paths_land_inside_dest() {
    for mode in MODES {
        let name = unique("abs");
        let real = Path::new("/etc").join(&name);
        let tar = RawTar::new()
            .file(&format!("/etc/{name}"), b"inside")
            .file("/top", b"top")
            .finish();
        let sb = Sandbox::new();
        let stats = sb
            .unpack(&tar, mode)
            .expect("absolute paths are made relative");
        assert_eq!(stats.entries, 2);
        assert_eq!(
            fs::read(sb.dest.join("etc").join(&name)).expect("etc/x in dest"),
            b"inside"
        );
        assert_eq!(fs::read(sb.dest.join("top")).expect("top in dest"), b"top");
        assert!(
            !exists(&real),
            "{mode:?}: wrote the real {}",
            real.display()
        );
        sb.assert_contained(&[]);
    }
}

#[test]
fn symlink_then_entry_through_it_is_refused() {
    for mode in MODES {
        for target in ["/", "../..", "..", "/tmp/../", "."] {
            let sb = Sandbox::new();
            let name = unique("via-link");
            // Where `link/<name>` would land if the link were followed.
            let landing = normalize(&sb.dest.join(target).join(&name));
            let tar = RawTar::new()
                .symlink("link", target)
                .file(&format!("link/{name}"), b"pwned")
                .finish();
            let msg = expect_refused_in(&sb, &tar, mode, std::slice::from_ref(&landing));
            assert!(msg.contains("link"), "{mode:?}: {msg}");
            // The symlink itself is stored verbatim; it is only resolved
            // inside a container's root.
            assert_eq!(
                fs::read_link(sb.dest.join("link")).expect("link kept"),
                PathBuf::from(target)
            );
            assert!(!exists(&sb.dest.join(&name)));
            // A directory entry through the link is refused the same way.
            let sb = Sandbox::new();
            let landing = normalize(&sb.dest.join(target).join(&name));
            let tar = RawTar::new()
                .symlink("link", target)
                .dir(&format!("link/{name}/"))
                .finish();
            expect_refused_in(&sb, &tar, mode, &[landing]);
        }
    }
}

/// `a/./b/../c` → `a/c` without touching the filesystem.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn flatten_refuses_to_follow_a_symlink_from_a_lower_layer() {
    let name = unique("lower-link");
    let sb = Sandbox::new();
    let lower = RawTar::new().symlink("lib", "/").finish();
    sb.unpack(&lower, Mode::Flatten).expect("lower layer");
    let upper = RawTar::new()
        .file(&format!("lib/{name}"), b"pwned")
        .finish();
    let err = sb
        .unpack(&upper, Mode::Flatten)
        .expect_err("upper layer must be refused");
    assert!(matches!(err, UnpackError::Hostile { .. }), "{err:?}");
    assert!(!exists(&Path::new("/").join(&name)));
    sb.assert_contained(&[]);
}

#[test]
fn file_over_a_symlink_replaces_the_link_not_its_target() {
    for mode in MODES {
        let sb = Sandbox::new();
        let victim = sb.parent.path().join("victim");
        fs::write(&victim, b"original").expect("victim");
        let tar = RawTar::new()
            .symlink("f", victim.to_str().expect("utf-8 path"))
            .file("f", b"pwned")
            .finish();
        sb.unpack(&tar, mode).expect("replacing a symlink is fine");
        assert_eq!(fs::read(&victim).expect("victim"), b"original");
        let m = fs::symlink_metadata(sb.dest.join("f")).expect("f");
        assert!(m.is_file(), "{mode:?}: f should now be a regular file");
        assert_eq!(fs::read(sb.dest.join("f")).expect("f"), b"pwned");
        sb.assert_contained(&["victim"]);
    }
}

#[test]
fn hardlinks_out_of_the_layer_are_refused() {
    let passwd = Path::new("/etc/passwd");
    let nlink_before = fs::metadata(passwd).map(|m| m.nlink()).ok();
    for mode in MODES {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot target",
                RawTar::new().hardlink("pw", "../../etc/passwd").finish(),
            ),
            (
                "absolute target (dest has no etc/)",
                RawTar::new().hardlink("pw", "/etc/passwd").finish(),
            ),
            (
                "target through a symlinked dir",
                RawTar::new()
                    .symlink("etc", "/etc")
                    .hardlink("pw", "etc/passwd")
                    .finish(),
            ),
            (
                "target is a symlink",
                RawTar::new()
                    .symlink("s", "/etc/passwd")
                    .hardlink("pw", "s")
                    .finish(),
            ),
            (
                "target is a directory",
                RawTar::new().dir("d/").hardlink("pw", "d").finish(),
            ),
            (
                "target missing",
                RawTar::new().hardlink("pw", "nowhere").finish(),
            ),
        ];
        for (what, tar) in cases {
            let sb = Sandbox::new();
            let err = sb
                .unpack(&tar, mode)
                .expect_err(&format!("{mode:?}: {what}: accepted"));
            assert!(
                matches!(err, UnpackError::Hostile { .. }),
                "{mode:?}: {what}: {err:?}"
            );
            assert!(!exists(&sb.dest.join("pw")), "{mode:?}: {what}: pw created");
            sb.assert_contained(&[]);
        }
    }
    assert_eq!(
        fs::metadata(passwd).map(|m| m.nlink()).ok(),
        nlink_before,
        "the host's /etc/passwd gained a link"
    );
}

#[test]
fn absolute_hardlink_target_resolves_inside_dest() {
    // `/etc/passwd` names the layer's own etc/passwd, never the host's.
    for mode in MODES {
        let sb = Sandbox::new();
        let tar = RawTar::new()
            .file("etc/passwd", b"root:x:0:0::/:/bin/sh\n")
            .hardlink("pw", "/etc/passwd")
            .finish();
        sb.unpack(&tar, mode).expect("link inside the layer");
        let a = fs::metadata(sb.dest.join("etc/passwd")).expect("etc/passwd");
        let b = fs::metadata(sb.dest.join("pw")).expect("pw");
        assert_eq!(a.ino(), b.ino());
        assert_ne!(
            Some(b.ino()),
            fs::metadata("/etc/passwd").ok().map(|m| m.ino()),
            "linked the host's file"
        );
    }
}

#[test]
fn device_nodes_are_created_as_the_tar_says() {
    for mode in MODES {
        let sb = Sandbox::new();
        let tar = RawTar::new()
            .dir("dev/")
            .device("dev/null", CHAR, 1, 3)
            .device("dev/sda", BLOCK, 8, 0)
            .file("ok", b"ok")
            .finish();
        let stats = sb.unpack(&tar, mode).expect("devices unpack");
        assert_eq!(stats.devices, 2, "{mode:?}");
        assert_eq!(stats.entries, 4, "{mode:?}");
        let null = fs::symlink_metadata(sb.dest.join("dev/null")).expect("dev/null");
        assert!(null.file_type().is_char_device(), "{mode:?}: dev/null");
        assert_eq!(null.rdev(), libc::makedev(1, 3), "{mode:?}: dev/null");
        assert_eq!(null.mode() & 0o7777, 0o644, "{mode:?}: dev/null mode");
        let sda = fs::symlink_metadata(sb.dest.join("dev/sda")).expect("dev/sda");
        assert!(sda.file_type().is_block_device(), "{mode:?}: dev/sda");
        assert_eq!(sda.rdev(), libc::makedev(8, 0), "{mode:?}: dev/sda");
        assert_eq!(fs::read(sb.dest.join("ok")).expect("ok"), b"ok");
        // The store's record of an overlay layer names the devices.
        if mode == Mode::Overlay {
            let tree = stats.tree.expect("overlay unpack records the tree");
            let e = &tree.entries[b"dev/null".as_slice()];
            assert_eq!((e.kind, e.rdev), (b'c', libc::makedev(1, 3)));
        } else {
            assert!(stats.tree.is_none(), "flatten does not record");
        }
        sb.assert_contained(&[]);
    }
}

#[test]
fn a_zero_zero_character_device_is_refused_not_taken_for_a_whiteout() {
    for mode in MODES {
        let sb = Sandbox::new();
        // Something a whiteout in disguise would hide.
        fs::write(sb.dest.join("victim"), b"below").expect("victim");
        let tar = RawTar::new()
            .file("ok", b"ok")
            .device("victim", CHAR, 0, 0)
            .finish();
        let res = sb.unpack(&tar, mode);
        match res {
            Err(UnpackError::Hostile { path, why }) => {
                assert_eq!(path, "victim", "{mode:?}");
                assert!(why.contains("0:0"), "{mode:?}: {why}");
            }
            other => panic!("{mode:?}: 0:0 character device accepted: {other:?}"),
        }
        assert_eq!(
            fs::read(sb.dest.join("victim")).expect("victim is still a file"),
            b"below",
            "{mode:?}"
        );
        sb.assert_contained(&[]);
    }
}

#[test]
fn malformed_whiteouts_are_refused() {
    for mode in MODES {
        for name in [".wh.", "sub/.wh.", ".wh...", "sub/.wh...", ".wh.."] {
            let sb = Sandbox::new();
            // Something for a misread whiteout to delete.
            fs::create_dir(sb.dest.join("sub")).expect("sub");
            fs::write(sb.dest.join("sub/keep"), b"keep").expect("keep");
            fs::write(sb.parent.path().join("keep"), b"keep").expect("outer keep");
            let tar = RawTar::new().file(name, b"").finish();
            let res = sb.unpack(&tar, mode);
            assert!(
                matches!(res, Err(UnpackError::Hostile { .. })),
                "{mode:?}: whiteout {name:?} should be refused as malformed, got {res:?}"
            );
            assert!(
                exists(&sb.dest.join("sub/keep")),
                "{mode:?}: whiteout {name:?} deleted sub/keep"
            );
            sb.assert_contained(&["keep"]);
        }
    }
}

#[test]
fn truncated_tars_are_errors() {
    let big = vec![b'x'; 10_000];
    let full = RawTar::new().file("a", b"first").file("big", &big).finish();
    // Cut in the middle of big's data, in the middle of its header, and
    // right after its header.
    let data_start = 512 + 512 + 512;
    for cut in [data_start + 3000, 512 + 512 + 100, data_start] {
        for mode in MODES {
            let sb = Sandbox::new();
            let res = sb.unpack(&full[..cut], mode);
            assert!(
                res.is_err(),
                "{mode:?}: tar cut at {cut} of {} was accepted: {res:?}",
                full.len()
            );
            sb.assert_contained(&[]);
        }
    }
}

// --- what layers legitimately do -----------------------------------------

fn rdev_of(p: &Path) -> Option<u64> {
    let m = fs::symlink_metadata(p).ok()?;
    m.file_type().is_char_device().then_some(m.rdev())
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = CString::new(p.as_os_str().as_bytes()).expect("path");
    let n = CString::new(name).expect("name");
    let mut buf = [0u8; 64];
    // SAFETY: valid NUL-terminated strings and a buffer with its length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

#[test]
fn whiteouts_become_overlay_devices_or_deletions() {
    let tar = RawTar::new()
        .file(".wh.gone", b"")
        .dir("dir/")
        .file("dir/.wh.sub", b"")
        .file("dir/kept", b"kept")
        .finish();

    let sb = Sandbox::new();
    sb.unpack(&tar, Mode::Overlay).expect("overlay");
    assert_eq!(rdev_of(&sb.dest.join("gone")), Some(0), "root whiteout");
    assert_eq!(
        rdev_of(&sb.dest.join("dir/sub")),
        Some(0),
        "nested whiteout"
    );
    assert!(!exists(&sb.dest.join(".wh.gone")));
    assert_eq!(fs::read(sb.dest.join("dir/kept")).expect("kept"), b"kept");

    let sb = Sandbox::new();
    let lower = RawTar::new()
        .file("gone", b"lower")
        .dir("dir/sub/")
        .file("dir/sub/deep", b"lower")
        .finish();
    sb.unpack(&lower, Mode::Flatten).expect("lower");
    sb.unpack(&tar, Mode::Flatten).expect("upper");
    assert!(!exists(&sb.dest.join("gone")));
    assert!(!exists(&sb.dest.join("dir/sub")));
    assert!(!exists(&sb.dest.join(".wh.gone")));
    assert_eq!(names(&sb.dest.join("dir")), vec!["kept"]);
}

#[test]
fn opaque_dirs_become_xattrs_or_hide_lower_content() {
    // The marker after one of the layer's own entries, as some tools write it.
    let tar = RawTar::new()
        .dir("dir/")
        .file("dir/new", b"new")
        .file("dir/.wh..wh..opq", b"")
        .file("dir/newer", b"newer")
        .finish();

    let sb = Sandbox::new();
    sb.unpack(&tar, Mode::Overlay).expect("overlay");
    assert_eq!(
        xattr(&sb.dest.join("dir"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!exists(&sb.dest.join("dir/.wh..wh..opq")));
    assert_eq!(names(&sb.dest.join("dir")), vec!["new", "newer"]);

    let sb = Sandbox::new();
    let lower = RawTar::new()
        .dir("dir/")
        .file("dir/old", b"old")
        .dir("dir/olddir/")
        .file("dir/olddir/x", b"x")
        .finish();
    sb.unpack(&lower, Mode::Flatten).expect("lower");
    sb.unpack(&tar, Mode::Flatten).expect("upper");
    assert_eq!(names(&sb.dest.join("dir")), vec!["new", "newer"]);
    assert_eq!(xattr(&sb.dest.join("dir"), "trusted.overlay.opaque"), None);
}

#[test]
fn setuid_and_setgid_survive_chown() {
    for mode in MODES {
        let sb = Sandbox::new();
        let mut t = RawTar::new();
        t.file_mode("bin/su", 0o4755, 1000, 1000, b"#!/bin/sh\n");
        t.file_mode("bin/wall", 0o2755, 0, 5, b"#!/bin/sh\n");
        let mut d = Header::new("shared/", common::DIRECTORY);
        d.mode = 0o3775;
        d.uid = 1000;
        d.gid = 1000;
        t.entry(d, b"");
        sb.unpack(&t.finish(), mode).expect("unpack");
        let su = fs::metadata(sb.dest.join("bin/su")).expect("su");
        assert_eq!(su.permissions().mode() & 0o7777, 0o4755, "{mode:?}");
        assert_eq!((su.uid(), su.gid()), (1000, 1000));
        let wall = fs::metadata(sb.dest.join("bin/wall")).expect("wall");
        assert_eq!(wall.permissions().mode() & 0o7777, 0o2755, "{mode:?}");
        assert_eq!(wall.gid(), 5);
        let shared = fs::metadata(sb.dest.join("shared")).expect("shared");
        assert_eq!(shared.permissions().mode() & 0o7777, 0o3775, "{mode:?}");
        assert_eq!((shared.uid(), shared.gid()), (1000, 1000));
    }
}

#[test]
fn hardlinks_inside_the_layer_work() {
    for mode in MODES {
        let sb = Sandbox::new();
        let tar = RawTar::new()
            .file("usr/bin/a", b"same inode")
            .hardlink("usr/bin/b", "usr/bin/a")
            .hardlink("c", "./usr/bin/a")
            .finish();
        sb.unpack(&tar, mode).expect("unpack");
        let a = fs::metadata(sb.dest.join("usr/bin/a")).expect("a");
        let b = fs::metadata(sb.dest.join("usr/bin/b")).expect("b");
        let c = fs::metadata(sb.dest.join("c")).expect("c");
        assert_eq!(a.ino(), b.ino(), "{mode:?}");
        assert_eq!(a.ino(), c.ino(), "{mode:?}");
        assert_eq!(a.nlink(), 3, "{mode:?}");
        assert_eq!(fs::read(sb.dest.join("c")).expect("c"), b"same inode");
    }
}

#[test]
fn entries_change_type_within_one_tar() {
    for mode in MODES {
        let sb = Sandbox::new();
        let tar = RawTar::new()
            // A directory with content, then a file of the same name.
            .dir("x/")
            .file("x/child", b"child")
            .file("x", b"now a file")
            // A file, then a directory of the same name with content.
            .file("y", b"was a file")
            .dir("y/")
            .file("y/z", b"z")
            // A symlink, then a directory of the same name.
            .symlink("s", "/etc")
            .dir("s/")
            .file("s/inner", b"inner")
            .finish();
        sb.unpack(&tar, mode).expect("unpack");
        assert_eq!(
            fs::read(sb.dest.join("x")).expect("x"),
            b"now a file",
            "{mode:?}"
        );
        assert!(fs::symlink_metadata(sb.dest.join("y")).expect("y").is_dir());
        assert_eq!(fs::read(sb.dest.join("y/z")).expect("y/z"), b"z");
        assert!(fs::symlink_metadata(sb.dest.join("s")).expect("s").is_dir());
        assert_eq!(
            fs::read(sb.dest.join("s/inner")).expect("s/inner"),
            b"inner"
        );
        assert!(!exists(Path::new("/etc/inner")));
        sb.assert_contained(&[]);
    }
}

/// `sub/.wh..` hides `.` in `sub`: malformed, like `.wh..` at the root.
/// `clean_path("sub/.")` equals `sub` (Path comparison ignores a trailing
/// `.`), so the check in the whiteout branch lets it through and the
/// removal is aimed at `sub` itself.
#[test]
fn whiteout_of_dot_in_a_subdirectory_is_refused() {
    for mode in MODES {
        let sb = Sandbox::new();
        fs::create_dir(sb.dest.join("sub")).expect("sub");
        fs::write(sb.dest.join("sub/keep"), b"keep").expect("keep");
        let tar = RawTar::new().file("sub/.wh..", b"").finish();
        let res = sb.unpack(&tar, mode);
        let left = names(&sb.dest);
        let kept = exists(&sb.dest.join("sub/keep"));
        assert!(
            matches!(res, Err(UnpackError::Hostile { .. })) && kept,
            "{mode:?}: got {res:?}; dest now holds {left:?}, sub/keep kept: {kept}"
        );
    }
}

/// A directory entry's mode is applied after all entries; if a later
/// entry of the same tar replaced the directory with a symlink, that chmod
/// must not follow the symlink out of dest.
#[test]
fn dir_replaced_by_symlink_does_not_chmod_the_target() {
    for mode in MODES {
        let sb = Sandbox::new();
        let victim = sb.parent.path().join("victim");
        fs::write(&victim, b"secret").expect("victim");
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut dir = Header::new("x/", common::DIRECTORY);
        dir.mode = 0o4777;
        let tar = RawTar::new()
            .entry(dir, b"")
            .symlink("x", victim.to_str().expect("utf-8 path"))
            .finish();
        let res = sb.unpack(&tar, mode);
        let victim_mode = fs::metadata(&victim).expect("victim").permissions().mode() & 0o7777;
        assert_eq!(
            victim_mode, 0o600,
            "{mode:?}: unpack ({res:?}) changed the mode of a file outside dest"
        );
    }
}

/// Same cause, harmless direction: a file that replaced a directory gets
/// the directory's mode and mtime.
#[test]
fn dir_replaced_by_file_keeps_the_file_mode() {
    for mode in MODES {
        let sb = Sandbox::new();
        let mut dir = Header::new("x/", common::DIRECTORY);
        dir.mode = 0o700;
        let tar = RawTar::new()
            .entry(dir, b"")
            .file_mode("x", 0o640, 0, 0, b"file")
            .finish();
        sb.unpack(&tar, mode).expect("unpack");
        let m = fs::symlink_metadata(sb.dest.join("x")).expect("x");
        assert!(m.is_file());
        assert_eq!(m.permissions().mode() & 0o7777, 0o640, "{mode:?}");
    }
}

/// Every refusal should name the entry as written in the tar, so an
/// operator can find it in the layer. See the bug note on the attribute.
#[test]
fn refusals_name_the_tar_entry() {
    let big = vec![b'x'; 10_000];
    let truncated = RawTar::new().file("trunc/big", &big).finish()[..512 + 3000].to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("../escape", RawTar::new().file("../escape", b"").finish()),
        (
            "link/escape",
            RawTar::new()
                .symlink("link", "/")
                .file("link/escape", b"")
                .finish(),
        ),
        (
            "pw",
            RawTar::new().hardlink("pw", "../../etc/passwd").finish(),
        ),
        ("pw", RawTar::new().hardlink("pw", "/etc/passwd").finish()),
        (
            "pw",
            RawTar::new()
                .symlink("etc", "/etc")
                .hardlink("pw", "etc/passwd")
                .finish(),
        ),
        (".wh...", RawTar::new().file(".wh...", b"").finish()),
        ("sub/.wh...", RawTar::new().file("sub/.wh...", b"").finish()),
        ("trunc/big", truncated),
    ];
    let mut unnamed = Vec::new();
    for (entry, tar) in &cases {
        for mode in MODES {
            let sb = Sandbox::new();
            match sb.unpack(tar, mode) {
                Ok(_) => unnamed.push(format!("{mode:?} {entry:?}: accepted")),
                Err(e) if !ember_error::chain(&e).to_string().contains(entry) => {
                    unnamed.push(format!("{mode:?} {entry:?}: {e}"))
                }
                Err(_) => {}
            }
        }
    }
    assert!(
        unnamed.is_empty(),
        "errors that do not name the entry:\n{}",
        unnamed.join("\n")
    );
}

/// Found by the `unpack_gen` fuzz target: a 1.5 KiB GNU sparse entry whose
/// header claims 8 GiB made the tar crate fill the hole with real zeros. It
/// must be refused before anything is written.
#[test]
fn gnu_sparse_bomb_is_refused() {
    let tar = include_bytes!("data/gnu-sparse-hole-8GiB.tar");
    for mode in [Mode::Overlay, Mode::Flatten] {
        let parent = tempfile::tempdir().expect("tempdir");
        let dest = parent.path().join("dest");
        std::fs::create_dir(&dest).expect("mkdir");
        let err = ember_store::unpack::unpack(&tar[..], &dest, mode)
            .expect_err("a sparse entry must be refused");
        assert!(
            ember_error::chain(&err).to_string().contains("sparse"),
            "{err}"
        );
        let written: u64 = std::fs::read_dir(&dest)
            .expect("read dest")
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        assert_eq!(written, 0, "bytes were written for a refused entry");
    }
}

/// Files whose metadata the unpacker cannot vouch for from the tar alone
/// (an mtime a filesystem may clamp, an owner beyond 32 bits, setuid and
/// setgid bits, hardlinks made and replaced) still get a record equal to a
/// walk of the tree (checked by `Sandbox::unpack`).
#[test]
fn the_tree_record_matches_the_tree_for_odd_metadata() {
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, pax: &[(&str, &str)], name: &str, mode: u32| {
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (*k, v.as_bytes())))
                .expect("pax");
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_size(3);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, name, &b"abc"[..]).expect("append");
    };
    add(&mut b, &[("mtime", "99999999999")], "far-future", 0o644);
    add(&mut b, &[("mtime", "-100")], "before-1970", 0o644);
    add(&mut b, &[("uid", "5000000000")], "big-uid", 0o644);
    add(&mut b, &[], "setid", 0o6755);
    add(&mut b, &[], "a", 0o600);
    add(&mut b, &[], "b", 0o600);
    let link = |b: &mut tar::Builder<Vec<u8>>, name: &str, target: &str| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        b.append_link(&mut h, name, target).expect("link");
    };
    link(&mut b, "a2", "a");
    link(&mut b, "a3", "a2");
    link(&mut b, "b2", "b");
    // b is replaced: b2 keeps the old inode, now with one link.
    add(&mut b, &[], "b", 0o640);
    let tar = b.into_inner().expect("tar");
    let sb = Sandbox::new();
    let stats = sb.unpack(&tar, Mode::Overlay).expect("unpack");
    let tree = stats.tree.expect("record");
    assert_eq!(tree.entries[b"a".as_slice()].nlink, 3);
    assert_eq!(tree.entries[b"b2".as_slice()].nlink, 1);
    assert_eq!(tree.entries[b"setid".as_slice()].mode, 0o6755);
}
