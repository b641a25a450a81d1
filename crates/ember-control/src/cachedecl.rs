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
/// A scope is at most this long: the cluster cache's limit for scopes.
pub const MAX_SCOPE_BYTES: usize = 255;
/// At most this many files per `hash` action.
pub const MAX_HASH_FILES: usize = 32;
/// A rendered `hash` action: the SHA-256 of the files, in lower-case hex.
pub const HASH_HEX_LEN: usize = 64;

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
    /// Two caches of one run overlap.
    #[error("cache paths {a:?} and {b:?} overlap (one is inside the other)")]
    Overlap {
        /// One path.
        a: String,
        /// The other.
        b: String,
    },
    /// A key or restore key does not parse or is too long.
    #[error("cache {path:?}: {what} {template:?}: {source}")]
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
    /// `}}` outside an action.
    #[error("`}}}}` without `{{{{` at byte {0}")]
    StrayClose(usize),
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

/// A parsed key template ([module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    /// The pieces, in order.
    pub parts: Vec<Part>,
}

impl KeyTemplate {
    /// Parses `template`; checks that every rendering fits the cache's key
    /// limit (literal bytes plus 64 per `hash`) and is not empty.
    pub fn parse(template: &str) -> Result<KeyTemplate, TemplateError> {
        if template.chars().any(char::is_control) {
            return Err(TemplateError::Control);
        }
        let mut parts = Vec::new();
        let mut rest = template;
        let mut at = 0usize;
        while !rest.is_empty() {
            let open = rest.find("{{");
            if let Some(c) = rest.find("}}")
                && open.is_none_or(|o| c < o)
            {
                return Err(TemplateError::StrayClose(at + c));
            }
            let Some(o) = open else {
                parts.push(Part::Literal(rest.to_owned()));
                break;
            };
            if o > 0 {
                parts.push(Part::Literal(rest[..o].to_owned()));
            }
            let inner_start = o + 2;
            let Some(len) = find_close(&rest[inner_start..]) else {
                return Err(TemplateError::Unclosed(at + o));
            };
            parts.push(parse_action(&rest[inner_start..inner_start + len])?);
            let consumed = inner_start + len + 2;
            at += consumed;
            rest = &rest[consumed..];
        }
        let t = KeyTemplate { parts };
        let bound = t.max_len();
        if bound == 0 {
            return Err(TemplateError::Length("empty".into()));
        }
        if bound > MAX_KEY_BYTES {
            return Err(TemplateError::Length(format!(
                "renders to up to {bound} bytes (at most {MAX_KEY_BYTES}; each hash is {HASH_HEX_LEN})"
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
    pub fn render(
        &self,
        hash: &mut dyn FnMut(&[String]) -> Result<String, (String, String)>,
    ) -> Result<String, TemplateError> {
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

/// The length of an action's inside: up to the first `}}` not inside a
/// quoted string.
fn find_close(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut quoted = false;
    while i < b.len() {
        match b[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'}' if !quoted && b.get(i + 1) == Some(&b'}') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Parses the inside of `{{ ... }}`: `hash` and quoted file names.
fn parse_action(inner: &str) -> Result<Part, TemplateError> {
    let inner = inner.trim();
    let (name, mut args) = match inner.find(char::is_whitespace) {
        Some(i) => (&inner[..i], inner[i..].trim_start()),
        None => (inner, ""),
    };
    if name != "hash" {
        return Err(TemplateError::UnknownFunction(name.to_owned()));
    }
    let mut files = Vec::new();
    while !args.is_empty() {
        let Some(body) = args.strip_prefix('"') else {
            return Err(TemplateError::BadArguments(format!(
                "expected a quoted file name at {args:?}"
            )));
        };
        let mut file = String::new();
        let mut chars = body.char_indices();
        let end = loop {
            match chars.next() {
                None => {
                    return Err(TemplateError::BadArguments(
                        "unterminated quoted file name".into(),
                    ));
                }
                Some((_, '\\')) => match chars.next() {
                    Some((_, c @ ('"' | '\\'))) => file.push(c),
                    _ => {
                        return Err(TemplateError::BadArguments(
                            "only \\\" and \\\\ may be escaped".into(),
                        ));
                    }
                },
                Some((i, '"')) => break i,
                Some((_, c)) => file.push(c),
            }
        };
        if file.is_empty() {
            return Err(TemplateError::BadArguments("an empty file name".into()));
        }
        files.push(file);
        let after = &body[end + 1..];
        if !after.is_empty() && !after.starts_with(char::is_whitespace) {
            return Err(TemplateError::BadArguments(
                "file names must be separated by spaces".into(),
            ));
        }
        args = after.trim_start();
    }
    if files.is_empty() {
        return Err(TemplateError::BadArguments("no file named".into()));
    }
    if files.len() > MAX_HASH_FILES {
        return Err(TemplateError::BadArguments(format!(
            "{} files (at most {MAX_HASH_FILES})",
            files.len()
        )));
    }
    Ok(Part::Hash(files))
}

/// Paths Ember keeps for itself inside a runner (its agent and socket):
/// a cache there would replace them.
const RESERVED: &[&str] = &["/.ember", "/run/ember", "/proc", "/sys", "/dev"];

/// Checks one path: absolute, normal components only, not `/` and not
/// inside a path Ember keeps for itself.
fn check_path(path: &str) -> Result<(), CacheDeclError> {
    let bad = |why| CacheDeclError::Path {
        path: path.chars().take(200).collect(),
        why,
    };
    if !path.starts_with('/') {
        return Err(bad("must be absolute"));
    }
    if path.len() > 4096 {
        return Err(bad("too long"));
    }
    if path.chars().any(char::is_control) {
        return Err(bad("contains control characters"));
    }
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if comps.is_empty() {
        return Err(bad("must not be the root directory"));
    }
    if comps.iter().any(|c| *c == "." || *c == "..") {
        return Err(bad("must not contain `.` or `..` components"));
    }
    let norm = normal(path);
    if RESERVED.iter().any(|r| inside(&norm, r)) {
        return Err(bad("is a directory Ember or the kernel keeps"));
    }
    Ok(())
}

/// `path` without repeated or trailing slashes.
fn normal(path: &str) -> String {
    let mut s = String::new();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        s.push('/');
        s.push_str(c);
    }
    s
}

/// Whether `path` is `dir` or inside it (both normal).
fn inside(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

fn check_scope(path: &str, scope: &str) -> Result<(), CacheDeclError> {
    let why = if scope.is_empty() {
        Some("empty")
    } else if scope.len() > MAX_SCOPE_BYTES {
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

/// Checks a run's (or deployment's) whole list: each declaration, their
/// number, and that no two paths overlap.
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
    for (i, a) in caches.iter().enumerate() {
        for b in &caches[i + 1..] {
            let (na, nb) = (normal(&a.path), normal(&b.path));
            if inside(&na, &nb) || inside(&nb, &na) {
                return Err(CacheDeclError::Overlap {
                    a: a.path.clone(),
                    b: b.path.clone(),
                });
            }
        }
    }
    Ok(())
}

/// A deployment's caches with a run's own merged over them: a run's cache
/// replaces the deployment's of the same path, and adds to them otherwise.
pub fn merge_caches(deployment: Vec<CacheDecl>, run: &[CacheDecl]) -> Vec<CacheDecl> {
    let mut out: Vec<CacheDecl> = deployment
        .into_iter()
        .filter(|d| !run.iter().any(|r| normal(&r.path) == normal(&d.path)))
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
    fn quoted_names_may_hold_braces_and_escaped_quotes() {
        let t = KeyTemplate::parse(r#"k{{ hash "x}}y" "q\"\\" }}"#).expect("parse");
        assert_eq!(t.parts[1], Part::Hash(vec!["x}}y".into(), "q\"\\".into()]));
    }

    #[test]
    fn syntax_errors_are_refused_with_a_reason() {
        for (bad, want) in [
            ("pip-{{ hash \"a\"", "unclosed"),
            ("pip-}}", "without"),
            ("{{ sha \"a\" }}", "unknown function"),
            ("{{ hash }}", "no file"),
            ("{{ hash a }}", "quoted"),
            ("{{ hash \"a }}", "unclosed"),
            ("{{ hash \"a\\\" }}", "unclosed"),
            ("{{ hash \"\" }}", "empty file"),
            ("{{ hash \"a\"\"b\" }}", "separated"),
            ("{{ hash \"\\n\" }}", "escaped"),
            ("", "empty"),
            ("a\nb", "control"),
        ] {
            let e = KeyTemplate::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_template_that_could_render_too_long_is_refused() {
        let ok = format!("{}{{{{ hash \"f\" }}}}", "k".repeat(MAX_KEY_BYTES - 64));
        assert!(KeyTemplate::parse(&ok).is_ok());
        let long = format!("{}{{{{ hash \"f\" }}}}", "k".repeat(MAX_KEY_BYTES - 63));
        let e = KeyTemplate::parse(&long).expect_err("too long").to_string();
        assert!(e.contains("at most 512"), "{e}");
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
        assert!(CacheDecl::new("/workspace/target/", "k").validate().is_ok());
        for (bad, want) in [
            ("root/.cache", "absolute"),
            ("/", "root directory"),
            ("//", "root directory"),
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
    fn overlapping_and_too_many_caches_are_refused() {
        let a = CacheDecl::new("/root/.cache", "a");
        let b = CacheDecl::new("/root/.cache/pip/", "b");
        let e = validate_caches(&[a.clone(), b]).expect_err("overlap");
        assert!(matches!(e, CacheDeclError::Overlap { .. }), "{e}");
        assert!(validate_caches(&[a, CacheDecl::new("/root/.cachex", "c")]).is_ok());
        let many: Vec<_> = (0..=MAX_CACHES)
            .map(|i| CacheDecl::new(format!("/c{i}"), "k"))
            .collect();
        assert!(matches!(
            validate_caches(&many),
            Err(CacheDeclError::TooMany { .. })
        ));
        let mut bad_scope = CacheDecl::new("/c", "k");
        bad_scope.fallback_scopes = vec![String::new()];
        assert!(matches!(
            bad_scope.validate(),
            Err(CacheDeclError::Scope { .. })
        ));
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
        let d = vec![CacheDecl::new("/a", "d1"), CacheDecl::new("/b/", "d2")];
        let r = vec![CacheDecl::new("/b", "r2"), CacheDecl::new("/c", "r3")];
        let keys: Vec<_> = merge_caches(d, &r).into_iter().map(|c| c.key).collect();
        assert_eq!(keys, vec!["d1", "r2", "r3"]);
    }
}
