//! The process's log output: `--log` picks what is logged, `--log-format`
//! how. `text` (the default) is for people; `json` is one object per line
//! for log pipelines (Loki, Elasticsearch, `jq`): `timestamp`, `level`,
//! `message` and the event's fields at the top level, and the spans the
//! event is in under `spans` (the node agent logs inside a `node{node}`
//! span, each run's task inside `run{run}`), so node and run ids are
//! fields wherever they apply.
//!
//! The one start-up line of each server (`ember control: serving on ...`)
//! is not a log event: it stays plain text in both formats, so scripts
//! reading the address work either way.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber, writing to stderr.
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}
