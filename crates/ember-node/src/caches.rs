//! A run's declared directory caches ([`CacheDecl`]) on the node: restored
//! into the runner before the run's process starts, saved after it exits 0.
//!
//! The runner is already running (warm runners are made before any run is
//! known), so nothing can be mounted into it: the node writes and reads
//! the runner's filesystem through `/proc/<init>/root`, its agent's view
//! of it, which includes the overlay root and the bind-mounted
//! `/workspace` and scratch directories alike. Paths are resolved inside
//! that root component by component ([`resolve_in_root`]), so a symlink
//! the image (or an earlier run of a recycled runner) left on the way
//! cannot lead the node, which is root on the host, to a host path.
//!
//! Decisions, per cache:
//!
//! * The key and restore keys are rendered once, before the process
//!   starts, from the runner's files as the image (and nothing else) has
//!   them; the same key is saved under after the run. A file a `hash`
//!   names that is not there fails the run before its process starts: a
//!   key silently rendered without it would make every version of the
//!   project share one entry.
//! * Without a dircache URL on the node, the cache is skipped with a log
//!   line and a note on the run. A restore that fails (the cache
//!   unreachable, a corrupt chunk, a read-only root) is also only a note:
//!   the cache saves time, the run does not depend on it, and the
//!   dircache restore leaves the target as it was.
//! * Saved only after exit 0, never in read-only mode; a save error is
//!   logged (the run has already been reported by then).

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use ember_control::cachedecl::{CacheDecl, KeyTemplate};
use ember_control::model::Run;
use ember_dircache::{CacheClient, RestoreOptions, SaveOptions};
use sha2::{Digest as _, Sha256};

/// Symlinks followed while resolving one path, as the kernel's limit.
const MAX_SYMLINKS: usize = 40;

/// How long one save may take before the node gives up on it (the runner
/// is held meanwhile).
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

/// One declared cache, its keys rendered, ready to restore and save.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    /// The declaration.
    pub(crate) decl: CacheDecl,
    /// The rendered key.
    pub(crate) key: String,
    /// The rendered restore keys.
    pub(crate) restore_keys: Vec<String>,
    /// Saved in.
    pub(crate) scope: String,
}

/// What the caches' restore did, for the run's `CachesRestored` report.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    /// The caches to save after a successful exit (not read-only, and the
    /// node has a cache URL).
    pub(crate) to_save: Vec<Prepared>,
    /// One line per cache for the run's notes.
    pub(crate) notes: Vec<String>,
}

/// The filesystem of a running runner, as the host reaches it.
#[derive(Debug, Clone)]
pub(crate) struct RunnerFs {
    /// `/proc/<pid>/root` of the runner's init (its agent).
    pub(crate) root: PathBuf,
    /// The working directory of the run's process (relative `hash` files
    /// are read against it).
    pub(crate) cwd: String,
    /// Owner for directories created on the way to a cache's path.
    pub(crate) owner: (u32, u32),
}

impl RunnerFs {
    /// The filesystem of the runner whose cgroup holds `pids`: the one of
    /// them that is pid 1 in its own namespace (its agent; a process of an
    /// earlier run may have changed its root).
    pub(crate) fn of_init(pids: &[i32], cwd: &str, owner: (u32, u32)) -> Result<RunnerFs, String> {
        let init = pids
            .iter()
            .copied()
            .find(|pid| is_namespace_init(*pid))
            .ok_or_else(|| format!("no init process among the runner's {pids:?}"))?;
        Ok(RunnerFs {
            root: PathBuf::from(format!("/proc/{init}/root")),
            cwd: cwd.to_owned(),
            owner,
        })
    }
}

/// Whether `pid`'s innermost pid-namespace id is 1 (`NSpid` in its status).
fn is_namespace_init(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last().map(|p| p == "1"))
        })
        .unwrap_or(false)
}

/// Resolves `path` (absolute inside the container, or relative to `cwd`)
/// to a host path under `root` without leaving it: each existing component
/// is looked at with `lstat`, a symlink's target is resolved inside
/// `root` again (absolute targets from `root`, `..` never above it), and
/// from the first missing component on the rest is appended as it is.
/// With `follow_last` false a final symlink is kept as it is (the caller
/// replaces or refuses it). Racy against processes inside the runner,
/// which is why the node does this only while the run's own processes are
/// not running.
pub(crate) fn resolve_in_root(
    root: &Path,
    cwd: &str,
    path: &str,
    follow_last: bool,
) -> Result<PathBuf, String> {
    let start = if path.starts_with('/') {
        String::new()
    } else {
        cwd.to_owned()
    };
    let mut pending: Vec<String> = Vec::new();
    push_components(&mut pending, &format!("{start}/{path}"));
    pending.reverse();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    let mut missing = false;
    while let Some(c) = pending.pop() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let candidate = join(root, &resolved).join(&c);
        let last = pending.is_empty();
        if missing {
            resolved.push(c);
            continue;
        }
        match std::fs::symlink_metadata(&candidate) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                missing = true;
                resolved.push(c);
            }
            Err(e) => return Err(format!("{}: {e}", shown(&resolved, &c))),
            Ok(m) if m.file_type().is_symlink() && (follow_last || !last) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(format!("{}: too many symlinks", shown(&resolved, &c)));
                }
                let target = std::fs::read_link(&candidate)
                    .map_err(|e| format!("{}: {e}", shown(&resolved, &c)))?;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    resolved.clear();
                }
                let mut more = Vec::new();
                push_components(&mut more, &target);
                for m in more.into_iter().rev() {
                    pending.push(m);
                }
            }
            Ok(_) => resolved.push(c),
        }
    }
    Ok(join(root, &resolved))
}

fn push_components(out: &mut Vec<String>, path: &str) {
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n.to_string_lossy().into_owned()),
            Component::ParentDir => out.push("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

fn join(root: &Path, comps: &[String]) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in comps {
        p.push(c);
    }
    p
}

/// The container path of `comps` + `c`, for messages.
fn shown(comps: &[String], c: &str) -> String {
    format!(
        "/{}",
        comps
            .iter()
            .map(String::as_str)
            .chain([c])
            .collect::<Vec<_>>()
            .join("/")
    )
}

/// The `hash` of a key template: SHA-256 over one `sha256sum`-style line
/// per file (`<hex of its bytes>  <name as written>\n`), in the order
/// named, so renaming or reordering the files changes the key too.
fn hash_files(fs: &RunnerFs, files: &[String]) -> Result<String, (String, String)> {
    let mut all = Sha256::new();
    for f in files {
        let fail = |why: String| (f.clone(), why);
        let host = resolve_in_root(&fs.root, &fs.cwd, f, true).map_err(fail)?;
        let mut file = std::fs::File::open(&host).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                fail(format!(
                    "no such file in the runner (working directory {})",
                    fs.cwd
                ))
            } else {
                fail(e.to_string())
            }
        })?;
        let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
        if !meta.is_file() {
            return Err(fail("not a regular file".into()));
        }
        let mut one = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(|e| fail(e.to_string()))?;
            if n == 0 {
                break;
            }
            one.update(&buf[..n]);
        }
        all.update(format!("{}  {f}\n", hex::encode(one.finalize())).as_bytes());
    }
    Ok(hex::encode(all.finalize()))
}

/// Renders the keys of `run`'s caches from the runner's files; an error
/// is the run's (a syntax error the control plane missed, a file missing).
pub(crate) fn prepare(run: &Run, fs: &RunnerFs) -> Result<Vec<Prepared>, String> {
    let mut out = Vec::with_capacity(run.caches.len());
    for decl in &run.caches {
        let render = |what: &str, t: &str| -> Result<String, String> {
            let tpl = KeyTemplate::parse(t)
                .map_err(|e| format!("cache {}: {what} {t:?}: {e}", decl.path))?;
            tpl.render(&mut |files| hash_files(fs, files))
                .map_err(|e| format!("cache {}: {what} {t:?}: {e}", decl.path))
        };
        let key = render("key", &decl.key)?;
        let restore_keys = decl
            .restore_keys
            .iter()
            .map(|r| render("restore key", r))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(Prepared {
            scope: decl.scope_for(run.deployment.as_deref(), &run.image.reference),
            decl: decl.clone(),
            key,
            restore_keys,
        });
    }
    Ok(out)
}

/// Creates the missing directories on the way to `target` (a resolved
/// host path under `root`), owned by `owner`, so a cache under a non-root
/// user's home stays writable by that user.
fn make_parents(root: &Path, target: &Path, owner: (u32, u32)) -> std::io::Result<()> {
    let Some(parent) = target.parent() else {
        return Ok(());
    };
    let mut missing = Vec::new();
    let mut p = parent;
    while p != root && std::fs::symlink_metadata(p).is_err() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(up) => p = up,
            None => break,
        }
    }
    for dir in missing.into_iter().rev() {
        std::fs::DirBuilder::new().mode(0o755).create(&dir)?;
        std::os::unix::fs::chown(&dir, Some(owner.0), Some(owner.1))?;
    }
    Ok(())
}

/// Restores each prepared cache into the runner (see the module docs for
/// what fails the run and what is only a note).
pub(crate) async fn restore_all(
    client: Option<&CacheClient>,
    prepared: Vec<Prepared>,
    fs: &RunnerFs,
) -> Restored {
    let mut out = Restored::default();
    for p in prepared {
        let path = p.decl.path.clone();
        let Some(client) = client else {
            tracing::info!(cache = %path, "skipping a declared cache: this node has no dircache URL (ember node --dircache)");
            out.notes.push(format!(
                "cache {path}: skipped: the node has no dircache URL (ember node --dircache)"
            ));
            continue;
        };
        let t0 = Instant::now();
        let mut scopes = vec![p.scope.clone()];
        scopes.extend(p.decl.fallback_scopes.iter().cloned());
        let mut opts = RestoreOptions::new(scopes, &p.key);
        opts.restore_keys = p.restore_keys.clone();
        let result = match resolve_in_root(&fs.root, "/", &path, false) {
            Err(e) => Err(e),
            Ok(target) => match make_parents(&fs.root, &target, fs.owner) {
                Err(e) => Err(format!("creating its parent: {e}")),
                Ok(()) => ember_dircache::restore(client, &target, &opts)
                    .await
                    .map_err(|e| ember_api::client::error_chain(&e)),
            },
        };
        match result {
            Ok(Some(r)) => {
                let how = if r.exact { "exact key" } else { "fallback" };
                tracing::info!(cache = %path, key = %r.entry.key, scope = %r.entry.scope, bytes = r.bytes, ms = t0.elapsed().as_millis() as u64, "restored a cache");
                out.notes.push(format!(
                    "cache {path}: restored {:?} from scope {:?} ({how}, {} bytes, {} ms)",
                    r.entry.key,
                    r.entry.scope,
                    r.bytes,
                    t0.elapsed().as_millis()
                ));
            }
            Ok(None) => {
                tracing::info!(cache = %path, key = %p.key, "no cache entry to restore");
                out.notes.push(format!(
                    "cache {path}: no entry for {:?} in {:?}",
                    p.key, opts.scopes
                ));
            }
            Err(e) => {
                tracing::warn!(cache = %path, error = %e, "restoring a cache failed; the run goes on without it");
                out.notes
                    .push(format!("cache {path}: restore failed (run goes on): {e}"));
            }
        }
        if !p.decl.read_only {
            out.to_save.push(p);
        }
    }
    out
}

/// Saves each cache from the runner after a successful exit; errors are
/// logged, not returned (the run is over).
pub(crate) async fn save_all(client: &CacheClient, to_save: &[Prepared], fs: &RunnerFs) {
    for p in to_save {
        let path = &p.decl.path;
        let dir = match resolve_in_root(&fs.root, "/", path, true) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(cache = %path, error = %e, "not saving a cache");
                continue;
            }
        };
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                tracing::warn!(cache = %path, mode = m.mode(), "not saving a cache: not a directory");
                continue;
            }
            Err(_) => {
                tracing::info!(cache = %path, "not saving a cache: the run left no directory there");
                continue;
            }
        }
        let opts = SaveOptions::new(&p.scope, &p.key);
        match tokio::time::timeout(SAVE_TIMEOUT, ember_dircache::save(client, &dir, &opts)).await {
            Ok(Ok(r)) if r.created => tracing::info!(
                cache = %path, key = %p.key, scope = %p.scope,
                uploaded = r.chunks_uploaded, reused = r.chunks_reused, bytes = r.bytes_uploaded,
                ms = r.elapsed.as_millis() as u64, "saved a cache"
            ),
            Ok(Ok(_)) => {
                tracing::info!(cache = %path, key = %p.key, "cache entry already exists; not saved again")
            }
            Ok(Err(e)) => {
                tracing::warn!(cache = %path, error = %ember_api::client::error_chain(&e), "saving a cache failed")
            }
            Err(_) => tracing::warn!(cache = %path, "saving a cache timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn paths_resolve_inside_the_root_whatever_the_symlinks_say() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path();
        std::fs::create_dir_all(root.join("real/dir")).expect("mkdir");
        symlink("/real", root.join("abs")).expect("symlink");
        symlink("../../../../..", root.join("real/up")).expect("symlink");
        symlink("/etc", root.join("etc-link")).expect("symlink");
        let r = |p: &str, follow| resolve_in_root(root, "/real", p, follow).expect(p);
        assert_eq!(r("/abs/dir", true), root.join("real/dir"));
        assert_eq!(r("dir", true), root.join("real/dir"));
        // `..` and absolute targets stop at the runner's root.
        assert_eq!(r("/real/up/real", true), root.join("real"));
        assert_eq!(r("/etc-link/passwd", true), root.join("etc/passwd"));
        // A final symlink is kept when asked.
        assert_eq!(r("/etc-link", false), root.join("etc-link"));
        // Missing components are appended as they are.
        assert_eq!(r("/abs/new/deeper", true), root.join("real/new/deeper"));
    }

    #[test]
    fn a_symlink_loop_is_an_error() {
        let t = tempfile::tempdir().expect("tempdir");
        symlink("/b", t.path().join("a")).expect("symlink");
        symlink("/a", t.path().join("b")).expect("symlink");
        let e = resolve_in_root(t.path(), "/", "/a/x", true).expect_err("loop");
        assert!(e.contains("too many symlinks"), "{e}");
    }

    #[test]
    fn file_hashes_follow_content_names_and_order() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(t.path().join("app")).expect("mkdir");
        std::fs::write(t.path().join("app/a"), "one").expect("write");
        std::fs::write(t.path().join("app/b"), "two").expect("write");
        let fs = RunnerFs {
            root: t.path().to_path_buf(),
            cwd: "/app".into(),
            owner: (0, 0),
        };
        let h = |files: &[&str]| {
            let files: Vec<String> = files.iter().map(|s| s.to_string()).collect();
            hash_files(&fs, &files)
        };
        let ab = h(&["a", "b"]).expect("hash");
        assert_eq!(ab.len(), 64);
        assert_eq!(h(&["/app/a", "/app/b"]).expect("hash").len(), 64);
        assert_ne!(ab, h(&["b", "a"]).expect("hash"), "order matters");
        assert_eq!(ab, h(&["a", "b"]).expect("hash"), "deterministic");
        std::fs::write(t.path().join("app/b"), "three").expect("write");
        assert_ne!(ab, h(&["a", "b"]).expect("hash"), "content matters");
        let (file, why) = h(&["a", "missing"]).expect_err("missing");
        assert_eq!(file, "missing");
        assert!(why.contains("no such file"), "{why}");
        let (_, why) = h(&["/app"]).expect_err("a directory");
        assert!(why.contains("regular file"), "{why}");
    }
}
