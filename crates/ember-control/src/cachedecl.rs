//! A run's (or a deployment's) directory caches: what it declares
//! ([`CacheDecl`]), how the declaration is checked at submit, and its key
//! templates ([`KeyTemplate`]).
//!
//! A key such as `pip-{{ hash "requirements.txt" }}` is literal text with
//! `{{ hash "FILE" ... }}` actions. The control plane only parses it (a
//! syntax error is a 400 at submit); the node renders it before the run's
//! process starts, reading the files from the runner's filesystem, and
//! uses the same rendered key to restore and, after a successful exit, to
//! save. Rendering is a pure function of a file-hashing callback, so the
//! rules live here once and are unit-tested without a container.

use serde::{Deserialize, Serialize};

/// At most this many caches per run.
pub const MAX_CACHES: usize = 16;
/// At most this many restore-key prefixes (and fallback scopes) per cache.
pub const MAX_FALLBACKS: usize = 16;
/// A rendered key (and a restore key) is at most this long: the cluster
/// cache's limit for keys.
pub const MAX_KEY_BYTES: usize = 512;
/// A scope is at most this many characters (so at most 252 bytes, within
/// the cluster cache's limit of 255).
pub const MAX_SCOPE_CHARS: usize = 63;
/// At most this many files per `hash` action.
pub const MAX_HASH_FILES: usize = 32;
/// A rendered `hash` action: the SHA-256 of the files, in lower-case hex.
pub const HASH_HEX_LEN: usize = 64;
/// A key template (or restore key) is at most this many characters. A
/// `hash` action takes at least 12 of them (`{{hash "a"}}`) and renders to
/// 64 bytes, and a literal character to at most 4, so no template this
/// long renders past [`MAX_KEY_BYTES`]; and the limit is one the API
/// document can state.
pub const MAX_TEMPLATE_CHARS: usize = 96;
/// A cache path is at most this many characters.
pub const MAX_PATH_CHARS: usize = 1024;

/// One directory cache a run restores before its process starts and saves
/// after it exits 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CacheDecl {
    /// The directory inside the container: absolute, without `.` or `..`
    /// components.
    pub path: String,
    /// The entry's key, a [`KeyTemplate`]: `pip-{{ hash "requirements.txt" }}`.
    pub key: String,
    /// Key prefixes tried in order when no entry has the key (or a key
    /// starting with it); templates too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore_keys: Vec<String>,
    /// The scope the cache is saved in and first restored from; `None`:
    /// the run's deployment, else its image repository ([`CacheDecl::scope_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Scopes restored from (never saved to) when `scope` has no match, in
    /// order: a branch's run falls back to the default branch's entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_scopes: Vec<String>,
    /// Restore only, never save: for runs whose output must not reach
    /// other runs (untrusted code).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// Why a cache declaration was refused (a 400 at submit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheDeclError {
    /// The path is relative, has `.`/`..` components, or is one Ember
    /// keeps for itself.
    #[error("cache path {path:?}: {why}")]
    Path {
        /// The path as declared.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A key or restore key does not parse or is too long.
    #[error("cache {path:?}: {what} {template:?}")]
    Template {
        /// The cache's path.
        path: String,
        /// `key` or `restore key`.
        what: &'static str,
        /// The template as declared (shortened).
        template: String,
        /// Why.
        source: TemplateError,
    },
    /// A scope is empty, too long or has control characters.
    #[error("cache {path:?}: scope {scope:?}: {why}")]
    Scope {
        /// The cache's path.
        path: String,
        /// The scope.
        scope: String,
        /// Why.
        why: &'static str,
    },
    /// More caches, restore keys or fallback scopes than allowed.
    #[error("too many {what}: {count} (at most {max})")]
    TooMany {
        /// Of what.
        what: &'static str,
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Why a key template does not parse, or could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{` without its `}}`.
    #[error("unclosed `{{{{` at byte {0}")]
    Unclosed(usize),
    /// A `{` or `}` in the literal text that does not open an action.
    #[error("a brace outside `{{{{ ... }}}}` at byte {0} (literal text cannot hold braces)")]
    Brace(usize),
    /// An action other than `hash`.
    #[error("unknown function {0:?} (only `hash` is known)")]
    UnknownFunction(String),
    /// `{{ hash }}` with no file, too many, or an argument that is not a
    /// quoted file name.
    #[error("bad arguments to hash: {0}")]
    BadArguments(String),
    /// A rendered key could exceed [`MAX_KEY_BYTES`], or is empty.
    #[error("{0}")]
    Length(String),
    /// Control characters in the literal text.
    #[error("contains control characters")]
    Control,
    /// The file-hashing callback failed (a file missing in the container).
    #[error("hash {file:?}: {why}")]
    Hash {
        /// The file as the template names it.
        file: String,
        /// Why it could not be hashed.
        why: String,
    },
}

/// One piece of a parsed key template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Text copied as it is.
    Literal(String),
    /// `{{ hash "a" "b" }}`: the SHA-256 of these files' contents.
    Hash(Vec<String>),
}

/// What [`KeyTemplate::render`] hashes files with: the hex digest of the
/// files named, or the file that failed and why.
pub type HashFiles<'a> = dyn FnMut(&[String]) -> Result<String, (String, String)> + 'a;

/// A parsed key template ([module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    /// The pieces, in order.
    pub parts: Vec<Part>,
}

impl KeyTemplate {
    /// Parses `template` ([module docs](self) for the grammar). The
    /// template is at most [`MAX_TEMPLATE_CHARS`] characters, which keeps
    /// every rendering within the cache's key limit.
    pub fn parse(template: &str) -> Result<KeyTemplate, TemplateError> {
        let chars = template.chars().count();
        if chars == 0 {
            return Err(TemplateError::Length("empty".into()));
        }
        if chars > MAX_TEMPLATE_CHARS {
            return Err(TemplateError::Length(format!(
                "{chars} characters (at most {MAX_TEMPLATE_CHARS})"
            )));
        }
        if template.chars().any(char::is_control) {
            return Err(TemplateError::Control);
        }
        let mut parts = Vec::new();
        let mut rest = template;
        let mut at = 0usize;
        while !rest.is_empty() {
            let Some(o) = rest.find(['{', '}']) else {
                parts.push(Part::Literal(rest.to_owned()));
                break;
            };
            if !rest[o..].starts_with("{{") {
                return Err(TemplateError::Brace(at + o));
            }
            if o > 0 {
                parts.push(Part::Literal(rest[..o].to_owned()));
            }
            let (part, len) = parse_action(&rest[o + 2..]).map_err(|e| match e {
                TemplateError::Unclosed(_) => TemplateError::Unclosed(at + o),
                e => e,
            })?;
            parts.push(part);
            let consumed = o + 2 + len;
            at += consumed;
            rest = &rest[consumed..];
        }
        let t = KeyTemplate { parts };
        // Guaranteed by the character limit; checked all the same, as the
        // cache refuses longer keys.
        let bound = t.max_len();
        if bound > MAX_KEY_BYTES {
            return Err(TemplateError::Length(format!(
                "renders to up to {bound} bytes (at most {MAX_KEY_BYTES})"
            )));
        }
        Ok(t)
    }

    /// The longest key this template renders to.
    pub fn max_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.len(),
                Part::Hash(_) => HASH_HEX_LEN,
            })
            .sum()
    }

    /// Whether the template reads any file.
    pub fn has_hash(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Hash(_)))
    }

    /// Renders the key; `hash(files)` returns the hex digest of the files
    /// (or why one could not be read: the file that failed and the reason).
    pub fn render(&self, hash: &mut HashFiles<'_>) -> Result<String, TemplateError> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::Hash(files) => {
                    let h = hash(files).map_err(|(file, why)| TemplateError::Hash { file, why })?;
                    out.push_str(&h);
                }
            }
        }
        Ok(out)
    }
}

/// Parses what follows `{{`: spaces, `hash`, one or more (spaces, quoted
/// file name), spaces, `}}`. Returns the part and the bytes consumed.
fn parse_action(s: &str) -> Result<(Part, usize), TemplateError> {
    let bad = |why: &str| TemplateError::BadArguments(why.to_owned());
    let mut rest = s.trim_start_matches(' ');
    let name_len = rest
        .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .unwrap_or(rest.len());
    let name = &rest[..name_len];
    if name != "hash" {
        if !s.contains("}}") {
            return Err(TemplateError::Unclosed(0));
        }
        return Err(TemplateError::UnknownFunction(name.to_owned()));
    }
    rest = &rest[name_len..];
    let mut files = Vec::new();
    loop {
        let after_spaces = rest.trim_start_matches(' ');
        let spaced = after_spaces.len() < rest.len();
        rest = after_spaces;
        if let Some(r) = rest.strip_prefix("}}") {
            if files.is_empty() {
                return Err(bad("no file named"));
            }
            if files.len() > MAX_HASH_FILES {
                return Err(bad(&format!(
                    "{} files (at most {MAX_HASH_FILES})",
                    files.len()
                )));
            }
            return Ok((Part::Hash(files), s.len() - r.len()));
        }
        if rest.is_empty() {
            return Err(TemplateError::Unclosed(0));
        }
        let Some(body) = rest.strip_prefix('"') else {
            return Err(bad(&format!(
                "expected a quoted file name or `}}}}` at {rest:?}"
            )));
        };
        if !spaced {
            return Err(bad("file names must follow a space"));
        }
        let Some(end) = body.find(['"', '\\']) else {
            return Err(TemplateError::Unclosed(0));
        };
        if body[end..].starts_with('\\') {
            return Err(bad("file names cannot hold `\\`"));
        }
        if end == 0 {
            return Err(bad("an empty file name"));
        }
        files.push(body[..end].to_owned());
        rest = &body[end + 1..];
    }
}

/// Paths Ember keeps for itself inside a runner (its agent and socket):
/// a cache there would replace them.
const RESERVED: &[&str] = &["/.ember", "/run/ember", "/proc", "/sys", "/dev"];

/// Checks one path: `/` and a name, once or more (no empty, `.` or `..`
/// name, no trailing `/`), not inside a path Ember keeps for itself.
fn check_path(path: &str) -> Result<(), CacheDeclError> {
    let bad = |why| CacheDeclError::Path {
        path: path.chars().take(200).collect(),
        why,
    };
    if !path.starts_with('/') {
        return Err(bad("must be absolute"));
    }
    if path.chars().count() > MAX_PATH_CHARS {
        return Err(bad("too long (at most 1024 characters)"));
    }
    if path.chars().any(char::is_control) {
        return Err(bad("contains control characters"));
    }
    if path == "/" {
        return Err(bad("must not be the root directory"));
    }
    if path[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad(
            "must be normal: no `.` or `..` components, no `//`, no trailing `/`",
        ));
    }
    if RESERVED.iter().any(|r| inside(path, r)) {
        return Err(bad("is a directory Ember or the kernel keeps"));
    }
    Ok(())
}

/// Whether `path` is `dir` or inside it.
fn inside(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

fn check_scope(path: &str, scope: &str) -> Result<(), CacheDeclError> {
    let why = if scope.is_empty() {
        Some("empty")
    } else if scope.chars().count() > MAX_SCOPE_CHARS {
        Some("too long")
    } else if scope.chars().any(char::is_control) {
        Some("contains control characters")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(CacheDeclError::Scope {
            path: path.to_owned(),
            scope: scope.chars().take(200).collect(),
            why,
        }),
    }
}

impl CacheDecl {
    /// A writable cache of `path` under `key`, in the default scope.
    pub fn new(path: impl Into<String>, key: impl Into<String>) -> CacheDecl {
        CacheDecl {
            path: path.into(),
            key: key.into(),
            restore_keys: Vec::new(),
            scope: None,
            fallback_scopes: Vec::new(),
            read_only: false,
        }
    }

    /// Checks the path, the templates and the scopes.
    pub fn validate(&self) -> Result<(), CacheDeclError> {
        check_path(&self.path)?;
        let template = |what, t: &str| {
            KeyTemplate::parse(t).map_err(|source| CacheDeclError::Template {
                path: self.path.clone(),
                what,
                template: t.chars().take(200).collect(),
                source,
            })
        };
        template("key", &self.key)?;
        for r in &self.restore_keys {
            template("restore key", r)?;
        }
        for (what, n) in [
            ("restore keys", self.restore_keys.len()),
            ("fallback scopes", self.fallback_scopes.len()),
        ] {
            if n > MAX_FALLBACKS {
                return Err(CacheDeclError::TooMany {
                    what,
                    count: n,
                    max: MAX_FALLBACKS,
                });
            }
        }
        for s in self.scope.iter().chain(&self.fallback_scopes) {
            check_scope(&self.path, s)?;
        }
        Ok(())
    }

    /// The scope the cache is saved in: its own, else the deployment's
    /// name, else the image's repository (`reference` without its tag or
    /// digest), so runs of one image share entries unless told otherwise.
    pub fn scope_for(&self, deployment: Option<&str>, image_reference: &str) -> String {
        if let Some(s) = &self.scope {
            return s.clone();
        }
        if let Some(d) = deployment {
            return d.to_owned();
        }
        repository(image_reference).to_owned()
    }
}

/// `reference` without `@digest` and without a `:tag` after its last `/`.
pub fn repository(reference: &str) -> &str {
    let r = reference.split('@').next().unwrap_or(reference);
    let slash = r.rfind('/').map_or(0, |i| i + 1);
    match r[slash..].rfind(':') {
        Some(colon) => &r[..slash + colon],
        None => r,
    }
}

/// Checks a run's (or deployment's) whole list: each declaration and
/// their number. Paths may overlap: caches are restored in order, so one
/// inside another's path replaces that part of it.
pub fn validate_caches(caches: &[CacheDecl]) -> Result<(), CacheDeclError> {
    if caches.len() > MAX_CACHES {
        return Err(CacheDeclError::TooMany {
            what: "caches",
            count: caches.len(),
            max: MAX_CACHES,
        });
    }
    for c in caches {
        c.validate()?;
    }
    Ok(())
}

/// A deployment's caches with a run's own merged over them: a run's cache
/// replaces the deployment's of the same path, and adds to them otherwise.
pub fn merge_caches(deployment: Vec<CacheDecl>, run: &[CacheDecl]) -> Vec<CacheDecl> {
    let mut out: Vec<CacheDecl> = deployment
        .into_iter()
        .filter(|d| !run.iter().any(|r| r.path == d.path))
        .collect();
    out.extend(run.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_of(files: &[String]) -> Result<String, (String, String)> {
        Ok(format!("<{}>", files.join("+")))
    }

    #[test]
    fn templates_render_literals_and_hashes_in_order() {
        let t = KeyTemplate::parse(r#"pip-{{ hash "requirements.txt" }}-{{hash "a" "b c"}}"#)
            .expect("parse");
        assert_eq!(
            t.parts,
            vec![
                Part::Literal("pip-".into()),
                Part::Hash(vec!["requirements.txt".into()]),
                Part::Literal("-".into()),
                Part::Hash(vec!["a".into(), "b c".into()]),
            ]
        );
        assert_eq!(
            t.render(&mut hash_of).expect("render"),
            "pip-<requirements.txt>-<a+b c>"
        );
        let plain = KeyTemplate::parse("cargo-v1").expect("parse");
        assert!(!plain.has_hash());
        assert_eq!(plain.render(&mut hash_of).expect("render"), "cargo-v1");
    }

    #[test]
    fn quoted_names_may_hold_braces_and_spaces() {
        let t = KeyTemplate::parse(r#"k{{ hash "x}}y" "a b" }}"#).expect("parse");
        assert_eq!(t.parts[1], Part::Hash(vec!["x}}y".into(), "a b".into()]));
    }

    #[test]
    fn syntax_errors_are_refused_with_a_reason() {
        for (bad, want) in [
            ("pip-{{ hash \"a\"", "unclosed"),
            ("pip-}}", "brace"),
            ("a{b", "brace"),
            ("{{ sha \"a\" }}", "unknown function"),
            ("{{ hash }}", "no file"),
            ("{{ hash a }}", "quoted"),
            ("{{ hash \"a }}", "unclosed"),
            ("{{ hash \"\" }}", "empty file"),
            ("{{ hash \"a\"\"b\" }}", "follow a space"),
            ("{{ hash \"a\\b\" }}", "cannot hold"),
            ("{{hash\"a\"}}", "follow a space"),
            ("", "empty"),
            ("a\nb", "control"),
        ] {
            let e = KeyTemplate::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

    #[test]
    fn templates_are_limited_so_that_no_rendering_outgrows_the_cache_key() {
        let ok = "k".repeat(MAX_TEMPLATE_CHARS);
        assert!(KeyTemplate::parse(&ok).is_ok());
        let e = KeyTemplate::parse(&format!("{ok}k")).expect_err("too long");
        assert!(e.to_string().contains("at most 96"), "{e}");
        // The worst case: as many of the shortest hash actions as fit.
        let hashes = "{{hash \"a\"}}".repeat(MAX_TEMPLATE_CHARS / 12);
        let t = KeyTemplate::parse(&hashes).expect("parse");
        assert!(t.max_len() <= MAX_KEY_BYTES);
        let wide = "é".repeat(MAX_TEMPLATE_CHARS);
        assert!(KeyTemplate::parse(&wide).expect("parse").max_len() <= MAX_KEY_BYTES);
    }

    #[test]
    fn a_failing_hash_names_the_file() {
        let t = KeyTemplate::parse(r#"k-{{ hash "gone.txt" }}"#).expect("parse");
        let e = t
            .render(&mut |f| Err((f[0].clone(), "no such file".into())))
            .expect_err("missing");
        assert_eq!(e.to_string(), r#"hash "gone.txt": no such file"#);
    }

    #[test]
    fn paths_must_be_absolute_normal_and_not_reserved() {
        assert!(CacheDecl::new("/root/.cache/pip", "k").validate().is_ok());
        assert!(CacheDecl::new("/workspace/.target", "k").validate().is_ok());
        for (bad, want) in [
            ("root/.cache", "absolute"),
            ("/", "root directory"),
            ("//", "normal"),
            ("/a/", "normal"),
            ("/a//b", "normal"),
            ("/a/../etc", "`..`"),
            ("/a/./b", "`..`"),
            ("/run/ember/x", "Ember"),
            ("/proc", "Ember"),
        ] {
            let e = CacheDecl::new(bad, "k")
                .validate()
                .expect_err(bad)
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(CacheDecl::new("/procs", "k").validate().is_ok());
    }

    #[test]
    fn too_many_caches_and_bad_scopes_are_refused() {
        // Overlapping paths are allowed: restored in order.
        let a = CacheDecl::new("/root/.cache", "a");
        assert!(validate_caches(&[a.clone(), CacheDecl::new("/root/.cache/pip", "b")]).is_ok());
        let many: Vec<_> = (0..=MAX_CACHES)
            .map(|i| CacheDecl::new(format!("/c{i}"), "k"))
            .collect();
        assert!(matches!(
            validate_caches(&many),
            Err(CacheDeclError::TooMany { .. })
        ));
        for bad in [
            String::new(),
            "s".repeat(MAX_SCOPE_CHARS + 1),
            "a\tb".into(),
        ] {
            let mut c = CacheDecl::new("/c", "k");
            c.fallback_scopes = vec![bad.clone()];
            assert!(
                matches!(c.validate(), Err(CacheDeclError::Scope { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_default_scope_is_the_deployment_else_the_repository() {
        let c = CacheDecl::new("/c", "k");
        assert_eq!(c.scope_for(Some("web"), "reg:5000/app:v1"), "web");
        assert_eq!(c.scope_for(None, "reg:5000/app:v1"), "reg:5000/app");
        assert_eq!(
            c.scope_for(None, "reg:5000/team/app@sha256:ab"),
            "reg:5000/team/app"
        );
        assert_eq!(c.scope_for(None, "app"), "app");
        let mut own = c.clone();
        own.scope = Some("refs/heads/main".into());
        assert_eq!(own.scope_for(Some("web"), "app"), "refs/heads/main");
    }

    #[test]
    fn a_runs_cache_replaces_the_deployments_of_the_same_path() {
        let d = vec![CacheDecl::new("/a", "d1"), CacheDecl::new("/b", "d2")];
        let r = vec![CacheDecl::new("/b", "r2"), CacheDecl::new("/c", "r3")];
        let keys: Vec<_> = merge_caches(d, &r).into_iter().map(|c| c.key).collect();
        assert_eq!(keys, vec!["d1", "r2", "r3"]);
    }
}
