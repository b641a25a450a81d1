//! `ember logs`: a run's output.

use crate::cmd::cluster::ControlArgs;
use anyhow::Context;
use ember_api::client::ControlClient;
use ember_api::wire::parse_run_id;
use ember_api::wire::{LogRecord, LogStream};
use ember_control::model::RunId;
use std::io::Write;
use std::process::ExitCode;

/// Print a run's output byte for byte (stdout to stdout, stderr to stderr).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Keep following until the run ends.
    #[arg(short, long)]
    pub follow: bool,
    /// The run (`run-7` or `7`).
    #[arg(value_name = "RUN")]
    pub run: String,
}

/// Streams the log of `id` to this process's stdout and stderr.
pub async fn print_logs(client: &ControlClient, id: RunId, follow: bool) -> anyhow::Result<()> {
    let mut resp = client.logs(id, follow).await?;
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.context("reading the log stream")? {
        buf.extend_from_slice(&chunk);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let rec: LogRecord = serde_json::from_slice(&line).context("decoding a log record")?;
            // The raw bytes, whatever they are (binary output, invalid
            // UTF-8, a character split between records), flushed per
            // record so interleaved output keeps its order on a terminal.
            // A marker (the control plane's own notice: truncated at the
            // per-run limit, or pruned) goes to stderr like any other
            // stderr record; it already says it is Ember's.
            match rec.stream {
                LogStream::Stdout => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&rec.data)?;
                    o.flush()?;
                }
                LogStream::Stderr => {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&rec.data)?;
                    e.flush()?;
                }
            }
        }
    }
    Ok(())
}

/// Runs `ember logs`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.control.client()?;
    let id = parse_run_id(&args.run)
        .with_context(|| format!("invalid run id {:?}: expected run-N or N", args.run))?;
    print_logs(&client, id, args.follow).await?;
    Ok(ExitCode::SUCCESS)
}
