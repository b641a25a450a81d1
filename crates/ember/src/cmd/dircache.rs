//! `ember dircache save|restore|ls|rm`: directories (tool caches) saved to
//! and restored from the cluster cache. Thin: the work is in
//! `ember-dircache`.

use crate::util::human_bytes;
use anyhow::Context;
use ember_dircache::{CacheClient, Policy, Progress, RestoreOptions, SaveOptions};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Save, restore, list and remove directory cache entries.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Save a directory as an immutable entry (only chunks the cache
    /// lacks are uploaded; an existing key is left as it is).
    Save(SaveArgs),
    /// Restore the best matching entry into a directory: the exact key,
    /// else the newest key with it as prefix, else each --restore-key
    /// prefix; in --scope, then each --fallback-scope.
    Restore(RestoreArgs),
    /// List a scope's entries, newest first.
    Ls(LsArgs),
    /// Remove an entry (its chunks go when no other entry uses them).
    Rm(RmArgs),
}

/// Where the cache is.
#[derive(clap::Args, Debug)]
pub struct Conn {
    /// The cache server (`ember cache`) URL.
    #[arg(long, env = "EMBER_DIRCACHE_URL", value_name = "URL")]
    pub cache: String,
    /// Bearer token for writes into the cache's protected scopes.
    #[arg(
        long,
        env = "EMBER_DIRCACHE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// No progress display.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `ember dircache save`.
#[derive(clap::Args, Debug)]
pub struct SaveArgs {
    /// The directory to save.
    pub path: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
    /// Scope to save into (e.g. the branch).
    #[arg(long, value_name = "S")]
    pub scope: String,
    /// The entry's key (e.g. `cargo-<hash of Cargo.lock>`).
    #[arg(long, value_name = "K")]
    pub key: String,
    /// Read-only mode (an untrusted run): refuse to save.
    #[arg(long)]
    pub read_only: bool,
    /// Chunk uploads in flight.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub jobs: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `ember dircache restore`.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// Where to put the tree (replaced whole; created if absent).
    pub path: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
    /// Scope searched first (e.g. the branch).
    #[arg(long, value_name = "S")]
    pub scope: String,
    /// Scopes searched next, in order, read only (e.g. the default
    /// branch; repeatable).
    #[arg(long = "fallback-scope", value_name = "S")]
    pub fallback_scopes: Vec<String>,
    /// The key.
    #[arg(long, value_name = "K")]
    pub key: String,
    /// Key prefixes to fall back to, in order (repeatable).
    #[arg(long = "restore-key", value_name = "P")]
    pub restore_keys: Vec<String>,
    /// Accepted for symmetry with save: restoring never writes the cache.
    #[arg(long)]
    pub read_only: bool,
    /// Restore symlinks with absolute targets (a virtualenv's python).
    #[arg(long)]
    pub allow_absolute_symlinks: bool,
    /// Exit with status 1 when no entry matches.
    #[arg(long)]
    pub fail_on_miss: bool,
    /// Chunk downloads in flight.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub jobs: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `ember dircache ls`.
#[derive(clap::Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The scope.
    #[arg(long, value_name = "S")]
    pub scope: String,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `ember dircache rm`.
#[derive(clap::Args, Debug)]
pub struct RmArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// The scope.
    #[arg(long, value_name = "S")]
    pub scope: String,
    /// The key.
    #[arg(long, value_name = "K")]
    pub key: String,
}

fn client(c: &Conn) -> anyhow::Result<CacheClient> {
    CacheClient::new(&c.cache, c.token.clone()).context("connecting to the cache")
}

/// A bar over `Progress` on a terminal; nothing otherwise.
fn show(progress: &Arc<Progress>, quiet: bool, verb: &'static str) -> Option<ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(verb);
    let (b, p) = (bar.clone(), progress.clone());
    tokio::spawn(async move {
        while !b.is_finished() {
            b.set_length(p.total_bytes.load(Ordering::Relaxed));
            b.set_position(p.bytes_done.load(Ordering::Relaxed));
            b.set_message(format!(
                "{} chunks sent, {} reused",
                p.chunks_uploaded.load(Ordering::Relaxed),
                p.chunks_reused.load(Ordering::Relaxed)
            ));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Some(bar)
}

/// Runs `ember dircache ...`.
pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Save(a) => {
            let client = client(&a.conn)?;
            let mut opts = SaveOptions::new(&a.scope, &a.key);
            opts.read_only = a.read_only;
            opts.concurrency = a.jobs;
            let bar = show(&opts.progress, a.conn.quiet, "save");
            let r = ember_dircache::save(&client, &a.path, &opts).await;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let r = r.with_context(|| format!("saving {}", a.path.display()))?;
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "scope": a.scope, "key": a.key, "created": r.created,
                        "files": r.files, "nodes": r.nodes,
                        "bytes_chunked": r.bytes_chunked, "chunks": r.chunks,
                        "unique_chunks": r.unique_chunks,
                        "chunks_uploaded": r.chunks_uploaded,
                        "chunks_reused": r.chunks_reused,
                        "bytes_uploaded": r.bytes_uploaded,
                        "data_bytes_uploaded": r.data_bytes_uploaded,
                        "seconds": r.elapsed.as_secs_f64(),
                    })
                );
                return Ok(ExitCode::SUCCESS);
            }
            if !r.created && r.unique_chunks == 0 {
                println!("{}/{}: already saved, left as it is", a.scope, a.key);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "saved {}/{}: {} files, {} chunked into {} chunks ({} distinct); uploaded {} chunks ({} compressed), reused {}; {:.2}s{}",
                a.scope,
                a.key,
                r.files,
                human_bytes(r.bytes_chunked),
                r.chunks,
                r.unique_chunks,
                r.chunks_uploaded,
                human_bytes(r.bytes_uploaded),
                r.chunks_reused,
                r.elapsed.as_secs_f64(),
                if r.created {
                    ""
                } else {
                    " (another save stored this key first)"
                }
            );
            if r.skipped > 0 {
                eprintln!("ember: left out {} sockets, FIFOs or devices", r.skipped);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore(a) => {
            let client = client(&a.conn)?;
            let mut scopes = vec![a.scope.clone()];
            scopes.extend(a.fallback_scopes.iter().cloned());
            let mut opts = RestoreOptions::new(scopes, &a.key);
            opts.restore_keys = a.restore_keys.clone();
            opts.concurrency = a.jobs;
            opts.policy = Policy {
                allow_absolute_symlinks: a.allow_absolute_symlinks,
            };
            let bar = show(&opts.progress, a.conn.quiet, "restore");
            let r = ember_dircache::restore(&client, &a.path, &opts).await;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            match r.with_context(|| format!("restoring into {}", a.path.display()))? {
                Some(r) if a.json => {
                    println!(
                        "{}",
                        serde_json::json!({
                            "scope": r.entry.scope, "key": r.entry.key, "exact": r.exact,
                            "nodes": r.nodes, "bytes": r.bytes, "chunks": r.chunks,
                            "stored_bytes": r.entry.bytes,
                            "seconds": r.elapsed.as_secs_f64(),
                        })
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Some(r) => {
                    println!(
                        "restored {}/{} ({}): {} nodes, {} in {} chunks; {:.2}s",
                        r.entry.scope,
                        r.entry.key,
                        if r.exact { "exact key" } else { "prefix match" },
                        r.nodes,
                        human_bytes(r.bytes),
                        r.chunks,
                        r.elapsed.as_secs_f64()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    println!("no entry for {} (target left as it was)", a.key);
                    Ok(if a.fail_on_miss {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    })
                }
            }
        }
        Command::Ls(a) => {
            let entries = client(&a.conn)?.list(&a.scope).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<50} {:>10} {:>10} {:>7}",
                "KEY", "STORED", "DATA", "CHUNKS"
            );
            for e in entries {
                println!(
                    "{:<50} {:>10} {:>10} {:>7}",
                    e.key,
                    human_bytes(e.bytes),
                    human_bytes(e.data_bytes),
                    e.chunks
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm(a) => {
            if client(&a.conn)?.remove(&a.scope, &a.key).await? {
                println!("removed {}/{}", a.scope, a.key);
                Ok(ExitCode::SUCCESS)
            } else {
                anyhow::bail!("no entry {}/{}", a.scope, a.key)
            }
        }
    }
}
