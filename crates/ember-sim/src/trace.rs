//! The launch trace format (documented in `docs/sim.md`): one JSON object
//! per line, `{"t": seconds, "image": "reference", "layers": [{"digest":
//! "sha256:…", "size": bytes}], "duration_s": seconds}`, in any order
//! (the replay sorts by `t`). Blank lines are skipped.

use std::io::{BufRead, Write};

use ember_control::pullplan::Layer;
use serde::{Deserialize, Serialize};

/// One launch of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// Seconds since the trace's start.
    pub t: f64,
    /// The image reference; a rebuilt image is a new reference.
    pub image: String,
    /// Its layers (shared layers have equal digests).
    pub layers: Vec<Layer>,
    /// How long the run holds its slot once started.
    pub duration_s: f64,
}

/// A trace that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Reading failed.
    #[error("reading the trace")]
    Io(#[from] std::io::Error),
    /// A line is not a launch.
    #[error("trace line {line}: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        message: String,
    },
}

/// Reads a trace, checking each launch (finite, non-negative times; at
/// least one layer), sorted by time.
pub fn read(input: impl BufRead) -> Result<Vec<Launch>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| TraceError::Line {
            line: i + 1,
            message,
        };
        let l: Launch = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        if !(l.t.is_finite() && l.t >= 0.0) {
            return Err(bad(format!("t must be a non-negative number, not {}", l.t)));
        }
        if !(l.duration_s.is_finite() && l.duration_s >= 0.0) {
            return Err(bad(format!(
                "duration_s must be a non-negative number, not {}",
                l.duration_s
            )));
        }
        if l.layers.is_empty() {
            return Err(bad(format!("image {:?} has no layers", l.image)));
        }
        out.push(l);
    }
    out.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(out)
}

/// Writes launches one JSON object per line.
pub fn write(mut out: impl Write, launches: &[Launch]) -> std::io::Result<()> {
    for l in launches {
        serde_json::to_writer(&mut out, l)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_sorts() {
        let a = Launch {
            t: 5.0,
            image: "a:1".into(),
            layers: vec![Layer {
                digest: "sha256:aa".into(),
                size: 10,
            }],
            duration_s: 1.0,
        };
        let mut b = a.clone();
        b.t = 1.0;
        let mut buf = Vec::new();
        write(&mut buf, &[a.clone(), b.clone()]).expect("write");
        buf.extend_from_slice(b"\n");
        assert_eq!(read(&buf[..]).expect("read"), [b, a]);
    }

    #[test]
    fn bad_lines_name_their_line() {
        let input = "{\"t\":1,\"image\":\"a\",\"layers\":[{\"digest\":\"d\",\"size\":1}],\"duration_s\":1}\n{\"t\":-1,\"image\":\"a\",\"layers\":[{\"digest\":\"d\",\"size\":1}],\"duration_s\":1}\n";
        let e = read(input.as_bytes()).expect_err("negative t");
        assert!(e.to_string().starts_with("trace line 2:"), "{e}");
        let e = read("{\"t\":1,\"image\":\"a\",\"layers\":[],\"duration_s\":1}".as_bytes())
            .expect_err("no layers");
        assert!(e.to_string().contains("no layers"), "{e}");
        let e = read("not json".as_bytes()).expect_err("junk");
        assert!(e.to_string().starts_with("trace line 1:"), "{e}");
    }
}
