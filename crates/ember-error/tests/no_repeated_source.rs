//! The workspace's error rule, checked over the source: a `thiserror`
//! message never formats the field that is also its `source()`, because
//! every printer shows the chain and the source would be said twice.
//!
//! This reads the `#[error("...")]` attributes of every crate's `src/` and
//! the variant or struct each one describes. It is a text check, not a
//! parser: it understands `#[from]`, `#[source]` and a field named
//! `source`, for tuple and named fields.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The format string of an `#[error("...")]` attribute starting at `s`
/// (just after `#[error(`), or `None` for `transparent` and the like.
fn format_string(s: &str) -> Option<String> {
    let s = s.trim_start();
    let s = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// Splits `s` on commas that are not inside brackets.
fn top_level_fields(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' | '<' | '[' | '{' => depth += 1,
            ')' | '>' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().filter(|f| !f.trim().is_empty()).collect()
}

/// The text between the bracket at `open` in `s` and its match.
fn bracketed(s: &str, open: usize) -> Option<&str> {
    let (o, c) = match s.as_bytes()[open] {
        b'(' => ('(', ')'),
        b'{' => ('{', '}'),
        _ => return None,
    };
    let mut depth = 0;
    for (i, ch) in s[open..].char_indices() {
        if ch == o {
            depth += 1;
        } else if ch == c {
            depth -= 1;
            if depth == 0 {
                return Some(&s[open + 1..open + i]);
            }
        }
    }
    None
}

/// How the source field is named in a format string: `0`, `source`...
fn source_name(fields_open: char, fields: &str) -> Option<String> {
    let fields = top_level_fields(fields);
    for (i, f) in fields.iter().enumerate() {
        let f = f.trim();
        let marked = f.contains("#[from]") || f.contains("#[source]");
        match fields_open {
            '(' if marked => return Some(i.to_string()),
            '{' => {
                // Strip attributes and doc comments to find the name.
                let decl = f
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.starts_with("///") && !l.starts_with("#["))
                    .collect::<Vec<_>>()
                    .join(" ");
                let decl = decl.trim_start_matches("pub ").trim();
                let name = decl.split(':').next().unwrap_or("").trim();
                if marked || name == "source" {
                    return Some(name.to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether `fmt` formats the field `name` (`{0}`, `{0:?}`, `{source}`,
/// or an expression argument that uses `.0` / `source`).
fn formats(fmt: &str, args: &str, name: &str) -> bool {
    let mut rest = fmt;
    while let Some(i) = rest.find('{') {
        rest = &rest[i + 1..];
        if rest.starts_with('{') {
            rest = &rest[1..];
            continue;
        }
        let end = rest.find('}').unwrap_or(rest.len());
        let field = rest[..end].split(':').next().unwrap_or("");
        if field == name {
            return true;
        }
        rest = &rest[end..];
    }
    let dotted = format!(".{name}");
    args.split(',')
        .any(|a| a.trim().starts_with(&dotted) || a.trim() == name)
}

#[test]
fn no_error_message_formats_its_own_source() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crates/ holds this crate")
        .to_path_buf();
    let mut files = Vec::new();
    for c in fs::read_dir(&crates).expect("reading crates/").flatten() {
        rust_files(&c.path().join("src"), &mut files);
    }
    assert!(files.len() > 50, "found only {} source files", files.len());
    let mut checked = 0;
    let mut bad = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).expect("reading a source file");
        // Unit tests may hold deliberate bad examples.
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        let mut at = 0;
        while let Some(i) = text[at..].find("#[error(") {
            let start = at + i + "#[error(".len();
            at = start;
            let Some(fmt) = format_string(&text[start..]) else {
                continue;
            };
            // The attribute's arguments after the format string.
            let attr_end = text[start..].find(")]\n").map_or(start, |e| start + e);
            let after_fmt = text[start..attr_end]
                .find(&format!("{fmt}\""))
                .map_or(attr_end, |p| start + p + fmt.len() + 1)
                .min(attr_end);
            let args = &text[after_fmt..attr_end];
            // The item the attribute describes: its first field list.
            let body = &text[attr_end..];
            let Some(open) = body.find(['(', '{', ',']) else {
                continue;
            };
            let opener = body.as_bytes()[open] as char;
            if opener == ',' {
                continue; // a unit variant
            }
            let Some(fields) = bracketed(body, open) else {
                continue;
            };
            checked += 1;
            if let Some(name) = source_name(opener, fields)
                && formats(&fmt, args, &name)
            {
                let line = text[..start].lines().count();
                bad.push(format!("{}:{line}: \"{fmt}\"", f.display()));
            }
        }
    }
    assert!(checked > 100, "checked only {checked} error messages");
    assert!(
        bad.is_empty(),
        "these messages repeat their source (drop the field from the message; \
         the chain prints it):\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_check_sees_a_repeat() {
    assert_eq!(
        source_name('(', "String, #[source] io::Error"),
        Some("1".into())
    );
    assert_eq!(
        source_name('{', "path: PathBuf,\n source: io::Error,"),
        Some("source".into())
    );
    assert!(formats("reading {1}", "", "1"));
    assert!(formats("x {source:?}", "", "source"));
    assert!(!formats("reading {0}", "", "1"));
    assert!(formats("x {}", ", .0.display()", "0"));
    assert!(!formats("{{0}}", "", "0"));
}
