//! `ember-fixtures`: build Ember's reproducible fixture images as OCI
//! layouts and push them to a registry.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ember_testkit::fixtures::{self, Fixture};

/// Build Ember's reproducible test images and push them to a registry.
///
/// Fixtures are OCI image layouts tagged `latest`, byte-for-byte identical
/// on every build with the same /bin/busybox. Builds are cached: a
/// complete earlier build in the output directory is reused.
#[derive(Parser)]
#[command(name = "ember-fixtures", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the fixtures and what each contains.
    List,
    /// Build fixtures as OCI layouts in DIR/NAME (all when no NAME given).
    Build {
        /// Output directory [default: $EMBER_FIXTURES_DIR, or
        /// $TMPDIR/ember-fixtures-vN].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Fixtures to build (see `list`).
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
    /// Build (or reuse) fixtures and push each as REPO-PREFIX/NAME:latest.
    Push {
        /// Registry to push to over plain HTTP, e.g. 127.0.0.1:5000.
        #[arg(long, value_name = "HOST:PORT")]
        registry: String,
        /// Repository namespace the fixtures are pushed under.
        #[arg(long, value_name = "PREFIX", default_value = "ember")]
        prefix: String,
        /// Where fixtures are built or found [default: as for `build`].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Fixtures to push (all when none given).
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        // One line with the whole cause chain, without anyhow's backtrace.
        eprintln!("ember-fixtures: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::List => {
            for f in fixtures::all() {
                println!("{:<12} {}", f.name, f.description);
            }
            Ok(())
        }
        Command::Build { out, names } => {
            let out = out.unwrap_or_else(fixtures::default_cache_dir);
            for name in selected(&names)? {
                build(&name, &out)?;
            }
            Ok(())
        }
        Command::Push {
            registry,
            prefix,
            out,
            names,
        } => {
            let out = out.unwrap_or_else(fixtures::default_cache_dir);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            for name in selected(&names)? {
                let fixture = build(&name, &out)?;
                let repo = format!("{prefix}/{name}");
                let start = Instant::now();
                runtime.block_on(fixtures::push(&fixture, &registry, &repo, fixtures::TAG))?;
                println!(
                    "pushed {registry}/{repo}:{} in {:.2}s",
                    fixtures::TAG,
                    start.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
    }
}

/// The names asked for, checked, or every fixture when none were.
fn selected(names: &[String]) -> anyhow::Result<Vec<String>> {
    if names.is_empty() {
        return Ok(fixtures::all().iter().map(|f| f.name.to_string()).collect());
    }
    for name in names {
        if fixtures::info(name).is_none() {
            anyhow::bail!("unknown fixture {name:?}; run `ember-fixtures list`");
        }
    }
    Ok(names.to_vec())
}

fn build(name: &str, out: &std::path::Path) -> anyhow::Result<Fixture> {
    let start = Instant::now();
    let fixture = fixtures::build(name, out)?;
    println!(
        "{:<12} {:>8.1} MB in {} blobs, {:.2}s  {}",
        name,
        fixture.total_size() as f64 / 1e6,
        fixture.blobs.len(),
        start.elapsed().as_secs_f64(),
        fixture.layout.display()
    );
    Ok(fixture)
}
