//! `ember snapshot push|pull`: snapshots through the cluster cache
//! (`ember cache`), so a machine that never captured a start-up restores
//! it. The work is [`ember_node::snapshot_cache`]'s; this parses flags and
//! prints.

use crate::util::human_bytes;
use anyhow::Context;
use ember_node::snapshot_cache::SnapshotCache;
use ember_runtime::Criu;
use ember_runtime::checkpoint::HostFacts;
use ember_store::Store;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Where the cache is and how to authenticate to it.
#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    /// The cluster cache (`ember cache`), `http://host:port`.
    #[arg(long, value_name = "URL", env = "EMBER_SNAPSHOT_CACHE")]
    pub cache: String,
    /// The cache's snapshot write token (needed to push; sent as a bearer
    /// token).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "EMBER_SNAPSHOT_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `ember snapshot push`.
#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// The snapshot (in this store) to send; the cache keeps it under
    /// this name.
    #[arg(value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// `ember snapshot pull`.
#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// The snapshot to bring from the cache.
    #[arg(value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The CRIU binary a restore here would use (its version must be the
    /// checkpoint's).
    #[arg(long, value_name = "PATH", env = "EMBER_CRIU", default_value = "criu")]
    pub criu: PathBuf,
}

/// Runs `ember snapshot push`.
pub async fn push(store: &Store, a: PushArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let client = SnapshotCache::new(&a.cache.cache, a.cache.token)?;
    let p = client
        .push(store, &a.name)
        .await
        .with_context(|| format!("pushing snapshot {} to {}", a.name, a.cache.cache))?;
    if a.cache.json {
        println!("{}", serde_json::to_string(&p)?);
    } else {
        println!(
            "pushed snapshot {} to {} (artifact {}, {}{}) in {:.1} s",
            a.name,
            a.cache.cache,
            p.artifact,
            human_bytes(p.bytes),
            if p.uploaded {
                ""
            } else {
                ", already on the cache"
            },
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `ember snapshot pull`.
pub async fn pull(store: &Store, a: PullArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let here = HostFacts::here(&Criu::new(&a.criu))
        .context("reading this machine's facts (CRIU version, kernel, CPU)")?;
    let client = SnapshotCache::new(&a.cache.cache, a.cache.token)?;
    let f = client
        .fetch(store, &a.name, &here)
        .await
        .with_context(|| format!("pulling snapshot {} from {}", a.name, a.cache.cache))?;
    let m = &f.manifest;
    let has_image = store.read_index()?.images.contains_key(&m.image);
    if a.cache.json {
        let mut v = serde_json::to_value(&f)?;
        v["image_present"] = has_image.into();
        println!("{v}");
    } else {
        println!(
            "pulled snapshot {} from {} (artifact {}, {}{}) in {:.1} s",
            a.name,
            a.cache.cache,
            m.artifact,
            human_bytes(m.artifact_bytes),
            if f.downloaded {
                ""
            } else {
                ", already in the store"
            },
            t0.elapsed().as_secs_f64()
        );
    }
    if !has_image {
        eprintln!(
            "ember: the snapshot's image {} ({}) is not in this store; `ember pull {}` before `ember run --snapshot {}`",
            m.image_name, m.image, m.image_name, a.name
        );
    }
    Ok(ExitCode::SUCCESS)
}
