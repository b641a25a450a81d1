//! `ember runs`: runs and their start-time breakdown.

use crate::cmd::cluster::ControlArgs;
use ember_api::client::ControlClient;
use ember_bench::stats::{PHASES, PhaseSamples, span};
use ember_control::model::Run;
use std::io::Write;
use std::process::ExitCode;

/// List runs, newest first, or start-latency percentiles with --stats.
#[derive(clap::Args, Debug)]
#[command(after_help = "--stats phases: queue (submit → picked up by the \
scheduler), placement (→ assigned to a node; 0 for a warm hand-off), image (→ image \
on the node), restore (→ snapshot restored; runs of snapshot deployments that restored), \
runner (→ runner ready), process (→ process started), total (submit → process started). \
The same phases as `ember bench burst`'s queue, placement and node (= image + \
restore + runner + process). --timings shows each run's phases, and for a snapshot \
run why it started fresh.")]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Print JSON (the runs with their start-time breakdown).
    #[arg(long)]
    pub json: bool,
    /// Print start-latency percentiles per phase (over every run, or the
    /// newest --limit N).
    #[arg(long)]
    pub stats: bool,
    /// Print each run's start-time breakdown by phase (ms), and why a
    /// snapshot run started fresh instead of restoring.
    #[arg(long, conflicts_with_all = ["stats", "json"])]
    pub timings: bool,
    /// Show the newest N runs (default: one page of the server's default
    /// size, 100).
    #[arg(long, value_name = "N", conflicts_with = "all")]
    pub limit: Option<usize>,
    /// Show every run, fetched page by page.
    #[arg(long)]
    pub all: bool,
}

/// How many runs to fetch: `None` is all of them.
fn wanted(args: &Args) -> Option<usize> {
    if args.all || (args.stats && args.limit.is_none()) {
        None
    } else {
        Some(args.limit.unwrap_or(ember_api::wire::DEFAULT_PAGE))
    }
}

/// Calls `each` with the newest runs, page by page, until `wanted` runs
/// (`None`: all); returns whether more runs were left behind. Only one
/// page is held at a time, so `--all` and `--stats` work on any number of
/// runs.
async fn for_each_page(
    client: &ControlClient,
    wanted: Option<usize>,
    mut each: impl FnMut(&[Run]) -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    let mut cursor: Option<String> = None;
    let mut seen = 0usize;
    loop {
        let left = wanted.map(|w| w - seen);
        let limit = left.map(|l| l.min(ember_api::wire::MAX_PAGE));
        if limit == Some(0) {
            // Asked for exactly what was seen: more exist if the last page
            // said so.
            return Ok(cursor.is_some());
        }
        let page = client.runs_page(limit, cursor.as_deref()).await?;
        seen += page.runs.len();
        each(&page.runs)?;
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(false),
        }
        if wanted.is_some_and(|w| seen >= w) {
            return Ok(true);
        }
    }
}

/// Runs `ember runs`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.control.client()?;
    let wanted = wanted(&args);
    if args.stats {
        // Only the phase durations are kept, not the runs.
        let mut samples = PhaseSamples::new(&PHASES);
        let mut total = 0usize;
        for_each_page(&client, wanted, |runs| {
            total += runs.len();
            samples.add(runs);
            Ok(())
        })
        .await?;
        let started = samples.started();
        let mut out = serde_json::Map::new();
        if !args.json {
            println!("{started} runs started (of {total})");
            println!(
                "{:<13} {:>8} {:>8} {:>8} {:>8}",
                "PHASE", "P50 ms", "P90 ms", "P99 ms", "MAX ms"
            );
        }
        for (phase, p) in samples.percentiles() {
            let name = phase.name;
            let (p50, p90, p99, max) = (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms);
            if args.json {
                out.insert(
                    name.to_owned(),
                    serde_json::json!({"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max, "n": p.n}),
                );
            } else {
                println!("{name:<13} {p50:>8} {p90:>8} {p99:>8} {max:>8}");
            }
        }
        if args.json {
            println!("{}", serde_json::Value::Object(out));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut stdout = std::io::stdout().lock();
    let more = if args.timings {
        for_each_page(&client, wanted, |runs| {
            for r in runs {
                let phases: Vec<String> = PHASES
                    .iter()
                    .filter_map(|p| (p.of)(&r.times).map(|ms| format!("{} {ms}", p.name)))
                    .collect();
                let mut line = format!("{:<10} {}", r.id.to_string(), phases.join(" | "));
                if let Some(note) = &r.times.snapshot_note {
                    line.push_str(&format!(" | snapshot not restored: {note}"));
                }
                writeln!(stdout, "{line}")?;
            }
            Ok(())
        })
        .await?
    } else if args.json {
        // One JSON array, written a page at a time.
        let mut first = true;
        write!(stdout, "[")?;
        let more = for_each_page(&client, wanted, |runs| {
            for r in runs {
                write!(stdout, "{}\n  ", if first { "" } else { "," })?;
                first = false;
                serde_json::to_writer(&mut stdout, r)?;
            }
            Ok(())
        })
        .await?;
        writeln!(stdout, "{}]", if first { "" } else { "\n" })?;
        more
    } else {
        writeln!(
            stdout,
            "{:<10} {:<10} {:<12} {:>4} {:>9}  WHAT",
            "RUN", "STATE", "NODE", "EXIT", "START ms"
        )?;
        for_each_page(&client, wanted, |runs| {
            for r in runs {
                let what = r
                    .deployment
                    .clone()
                    .unwrap_or_else(|| r.image.reference.clone());
                writeln!(
                    stdout,
                    "{:<10} {:<10} {:<12} {:>4} {:>9}  {what}",
                    r.id.to_string(),
                    r.state.as_str(),
                    r.node.as_deref().unwrap_or("-"),
                    r.exit_code.map_or("-".into(), |c| c.to_string()),
                    span(r.times.queued, r.times.process_started)
                        .map_or("-".into(), |t| t.to_string()),
                )?;
            }
            Ok(())
        })
        .await?
    };
    stdout.flush()?;
    if more {
        eprintln!(
            "(newest {} runs shown; older ones: --limit N or --all)",
            wanted.unwrap_or(0)
        );
    }
    Ok(ExitCode::SUCCESS)
}
