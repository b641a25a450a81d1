//! How Ember prints an error: the error and each of its sources, outermost
//! first, `: `-separated (`pulling app:v2: layer sha256:…: unexpected end
//! of file`).
//!
//! The rule every Ember error follows (the Rust API guidelines' and
//! `anyhow`'s convention): an error's `Display` says what failed at its own
//! level and does **not** include its source's text when it returns that
//! source from [`Error::source`]. A variant that only passes a source on
//! uses `#[error(transparent)]`. So one error's `Display` alone is only the
//! outermost layer, and whoever shows an error to a person (a log line, an
//! HTTP error body, a run's `error` in the state store, the CLI's last line)
//! prints the whole chain with [`chain`].
//!
//! This crate has no dependencies so that every crate, from the runtime to
//! the binaries, can use the one printer.
//!
//! ```
//! #[derive(Debug, thiserror::Error)]
//! #[error("reading {path}")]
//! struct ReadError {
//!     path: String,
//!     source: std::io::Error,
//! }
//!
//! let e = ReadError { path: "/etc/app.toml".into(), source: std::io::ErrorKind::NotFound.into() };
//! assert_eq!(e.to_string(), "reading /etc/app.toml");
//! assert_eq!(ember_error::chain(&e).to_string(), "reading /etc/app.toml: entity not found");
//! // In a log line: tracing::warn!(error = %ember_error::chain(&e), "...");
//! ```

use std::error::Error;
use std::fmt;

/// `e` and its sources, printed `a: b: c` by its `Display`; see the crate
/// docs. Borrowing, so a log line (`error = %chain(&e)`) formats the chain
/// without building a `String` first.
pub fn chain<'a>(e: &'a (dyn Error + 'a)) -> Chain<'a> {
    Chain(e)
}

/// An error printed with all its sources; made by [`chain`].
#[derive(Clone, Copy)]
pub struct Chain<'a>(&'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// For tests of the rule: the first source in `e`'s chain whose text an
/// error above it already includes in its own `Display`, or `None` when
/// the printed chain says each thing once.
pub fn repeated_source(e: &(dyn Error + '_)) -> Option<String> {
    let mut outer: Vec<String> = vec![e.to_string()];
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && outer.iter().any(|o| o.contains(&text)) {
            return Some(text);
        }
        outer.push(text);
        cause = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("disk on fire")]
        Io(#[source] std::io::Error),
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("pulling {0}")]
        Pull(&'static str, #[source] Inner),
        #[error("pulling {0}: {1}")]
        Repeats(&'static str, #[source] Inner),
        #[error(transparent)]
        Passed(Inner),
    }

    fn inner() -> Inner {
        Inner::Io(std::io::Error::other("EIO"))
    }

    #[test]
    fn chain_prints_every_level_once_outermost_first() {
        let e = Outer::Pull("app:v2", inner());
        assert_eq!(chain(&e).to_string(), "pulling app:v2: disk on fire: EIO");
        assert_eq!(
            format!("{:?}", chain(&e)),
            "pulling app:v2: disk on fire: EIO"
        );
        assert_eq!(repeated_source(&e), None);
    }

    #[test]
    fn chain_does_not_hide_a_repeat() {
        // The printer no longer de-duplicates: an error that breaks the rule
        // shows up twice, and the rule's test finds it.
        let e = Outer::Repeats("app:v2", inner());
        assert_eq!(
            chain(&e).to_string(),
            "pulling app:v2: disk on fire: disk on fire: EIO"
        );
        assert_eq!(repeated_source(&e).as_deref(), Some("disk on fire"));
    }

    #[test]
    fn transparent_adds_no_level() {
        let e = Outer::Passed(inner());
        assert_eq!(chain(&e).to_string(), "disk on fire: EIO");
        assert_eq!(repeated_source(&e), None);
    }

    #[test]
    fn a_lone_error_is_its_display() {
        let e = std::io::Error::other("EIO");
        assert_eq!(chain(&e).to_string(), "EIO");
        let boxed: Box<dyn Error + Send + Sync> = "plain".into();
        assert_eq!(chain(&*boxed).to_string(), "plain");
    }
}
