//! Resolving an image's or a run's `User` to numeric ids, as Docker does.
//!
//! Accepted forms: `""` (root), `uid`, `uid:gid`, `name`, `name:group`,
//! `uid:group`, `name:gid`. Names are looked up in the container's own
//! `/etc/passwd` and `/etc/group`, opened with `RESOLVE_IN_ROOT` so that a
//! symlink in the image cannot make Ember read the host's files. The rules
//! follow Docker (`moby/sys/user.GetExecUser`):
//!
//! * a numeric uid need not exist in `/etc/passwd`; if it does, its primary
//!   group and home come from there;
//! * without an explicit group, the supplementary groups are the groups of
//!   `/etc/group` that list the user's name;
//! * home defaults to `/`.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// Errors from resolving a user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A user name that the image's `/etc/passwd` does not list.
    #[error("unable to find user {user:?} in the image's /etc/passwd")]
    UnknownUser {
        /// The name.
        user: String,
    },
    /// A group name that the image's `/etc/group` does not list.
    #[error("unable to find group {group:?} in the image's /etc/group")]
    UnknownGroup {
        /// The name.
        group: String,
    },
    /// The specification has too many parts or an empty name.
    #[error("invalid user specification {spec:?}")]
    Invalid {
        /// What was given.
        spec: String,
    },
    /// A database file exists but could not be read.
    #[error("cannot read {file} under {rootfs}")]
    Read {
        /// `etc/passwd` or `etc/group`.
        file: &'static str,
        /// The container's root.
        rootfs: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A user resolved to the ids the container process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub additional_gids: Vec<u32>,
    /// Home directory, for `HOME` when the environment does not set it.
    pub home: String,
    /// The user's name, if `/etc/passwd` knows it.
    pub name: Option<String>,
}

impl ResolvedUser {
    /// Root (uid 0, gid 0) with home `/`: the defaults before `/etc/passwd`
    /// is consulted.
    pub fn root() -> ResolvedUser {
        ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
            home: "/".to_owned(),
            name: None,
        }
    }
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

fn parse_passwd(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        // name:password:uid:gid:gecos:home:shell
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let _gecos = f.next();
        let home = f.next().unwrap_or("");
        Some(PasswdEntry {
            name,
            uid,
            gid,
            home,
        })
    })
}

fn parse_group(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        // name:password:gid:member,member
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let gid = f.next()?.parse().ok()?;
        let members = f.next().unwrap_or("");
        Some(GroupEntry { name, gid, members })
    })
}

/// Reads `file` (relative, e.g. `etc/passwd`) inside `rootfs`, treating
/// `rootfs` as `/` for every symlink. A missing file is `Ok(None)`.
fn read_in_root(rootfs: &Path, file: &'static str) -> Result<Option<String>, UserError> {
    let err = |source| UserError::Read {
        file,
        rootfs: rootfs.to_path_buf(),
        source,
    };
    let root = File::open(rootfs).map_err(err)?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd: OwnedFd = match nix::fcntl::openat2(&root, file, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::ENOTDIR) => return Ok(None),
        Err(e) => return Err(err(e.into())),
    };
    let mut text = String::new();
    File::from(fd).read_to_string(&mut text).map_err(err)?;
    Ok(Some(text))
}

/// Resolves `spec` (Docker's `--user` syntax; `None` or `""` = root) against
/// the container root filesystem at `rootfs`.
pub fn resolve_user(rootfs: &Path, spec: Option<&str>) -> Result<ResolvedUser, UserError> {
    let spec = spec.unwrap_or("");
    let mut parts = spec.splitn(3, ':');
    let user_arg = parts.next().unwrap_or("");
    let group_arg = parts.next();
    if parts.next().is_some() || group_arg == Some("") {
        return Err(UserError::Invalid {
            spec: spec.to_owned(),
        });
    }
    let uid_arg: Option<u32> = user_arg.parse().ok();
    let gid_arg: Option<u32> = group_arg.and_then(|g| g.parse().ok());

    // Docker reads passwd even for numeric ids: it supplies the home
    // directory and, without an explicit group, the primary group.
    let passwd = read_in_root(rootfs, "etc/passwd")?;

    let mut user = ResolvedUser::root();
    let found = passwd.as_deref().and_then(|text| {
        parse_passwd(text).find(|e| match uid_arg {
            _ if user_arg.is_empty() => e.uid == 0,
            Some(uid) => e.uid == uid,
            None => e.name == user_arg,
        })
    });
    match (found, uid_arg) {
        (Some(e), _) => {
            user.uid = e.uid;
            user.gid = e.gid;
            if !e.home.is_empty() {
                user.home = e.home.to_owned();
            }
            user.name = Some(e.name.to_owned());
        }
        (None, Some(uid)) => user.uid = uid,
        (None, None) if user_arg.is_empty() => {}
        (None, None) => {
            return Err(UserError::UnknownUser {
                user: user_arg.to_owned(),
            });
        }
    }

    match (group_arg, gid_arg) {
        (Some(_), Some(gid)) => user.gid = gid,
        (Some(group), None) => {
            let groups = read_in_root(rootfs, "etc/group")?;
            let entry = groups
                .as_deref()
                .and_then(|text| parse_group(text).find(|g| g.name == group).map(|g| g.gid));
            user.gid = entry.ok_or_else(|| UserError::UnknownGroup {
                group: group.to_owned(),
            })?;
        }
        (None, _) => {
            if let Some(name) = &user.name
                && let Some(text) = read_in_root(rootfs, "etc/group")?
            {
                user.additional_gids = parse_group(&text)
                    .filter(|g| g.members.split(',').any(|m| m.trim() == name))
                    .map(|g| g.gid)
                    .filter(|gid| *gid != user.gid)
                    .collect();
                user.additional_gids.dedup();
            }
        }
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("etc")).unwrap();
        fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\n# comment\nalice:x:1000:1001::/home/alice:/bin/sh\nbad line\n",
        )
        .unwrap();
        fs::write(
            d.path().join("etc/group"),
            "root:x:0:\nstaff:x:50:alice,bob\nalice:x:1001:\nwheel:x:10:bob\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn default_is_root_with_home_from_passwd() {
        let d = rootfs();
        let u = resolve_user(d.path(), None).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn names_resolve_with_supplementary_groups() {
        let d = rootfs();
        let u = resolve_user(d.path(), Some("alice")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1001));
        assert_eq!(u.additional_gids, vec![50]);
        assert_eq!(u.home, "/home/alice");
        let u = resolve_user(d.path(), Some("alice:wheel")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 10));
        assert!(u.additional_gids.is_empty());
    }

    #[test]
    fn numeric_ids_need_no_entry() {
        let d = rootfs();
        let u = resolve_user(d.path(), Some("4242")).unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (4242, 0, "/"));
        let u = resolve_user(d.path(), Some("1000")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1001));
        let u = resolve_user(d.path(), Some("7:8")).unwrap();
        assert_eq!((u.uid, u.gid), (7, 8));
        let empty = tempfile::tempdir().unwrap();
        let u = resolve_user(empty.path(), Some("1000:1000")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
    }

    #[test]
    fn unknown_names_are_errors() {
        let d = rootfs();
        assert!(matches!(
            resolve_user(d.path(), Some("mallory")),
            Err(UserError::UnknownUser { .. })
        ));
        assert!(matches!(
            resolve_user(d.path(), Some("alice:nogroup")),
            Err(UserError::UnknownGroup { .. })
        ));
        assert!(matches!(
            resolve_user(d.path(), Some("a:b:c")),
            Err(UserError::Invalid { .. })
        ));
    }

    #[test]
    fn absolute_symlinks_stay_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("etc")).unwrap();
        // On the host this would be the host's passwd, which knows "root".
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("etc/passwd")).unwrap();
        // Inside the root, /etc/passwd is the link itself: a loop, or
        // missing; either way not the host file.
        let r = resolve_user(d.path(), Some("root"));
        assert!(r.is_err(), "{r:?}");
    }
}
