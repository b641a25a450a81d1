//! `ember submit`: queue a run on the control plane.

use crate::cmd::cluster::ControlArgs;
use crate::cmd::logs::print_logs;
use anyhow::{Context, bail};
use ember_control::model::{CacheDecl, PinnedImage, RunSpec};
use ember_oci::Reference;
use ember_registry::{RegistryClient, RegistryOptions};
use std::collections::BTreeMap;
use std::process::ExitCode;

/// Submit a run of a deployment or an image.
#[derive(clap::Args, Debug)]
#[command(after_help = "IMAGE is pinned to its current digest here, before the \
run is queued, so every attempt runs the same bytes.\n\
With --wait, the run's output is streamed and ember exits with its exit code.")]
pub struct Args {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Run this deployment.
    #[arg(long, value_name = "NAME", conflicts_with = "image")]
    pub deployment: Option<String>,
    /// Run this image.
    #[arg(value_name = "IMAGE", required_unless_present = "deployment")]
    pub image: Option<String>,
    /// Stream the output and exit with the run's exit code.
    #[arg(long)]
    pub wait: bool,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Kill the run after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Times the run may be scheduled if its node is lost.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub attempts: u32,
    /// Idempotency key: a second submit with it returns the first run.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Share runners with the runs (and deployments) that name the same
    /// recycling key; without it (or --deployment) the run gets a runner
    /// no run has used, destroyed after it.
    #[arg(long, value_name = "KEY")]
    pub recycle_key: Option<String>,
    /// Run with a read-only root filesystem (/workspace, /tmp, /var/tmp,
    /// /run and /dev/shm stay writable).
    #[arg(long)]
    pub read_only: bool,
    /// A directory cache, restored before the process starts and saved
    /// after it exits 0 (repeatable):
    /// PATH=KEY[,restore=PREFIX]...[,scope=S][,fallback=S]...[,read-only].
    /// KEY may hash files of the image: `pip-{{ hash "requirements.txt" }}`.
    #[arg(long = "cache", value_name = "PATH=KEY[,OPT]...", value_parser = parse_cache)]
    pub caches: Vec<CacheDecl>,
    /// Print the run as JSON.
    #[arg(long)]
    pub json: bool,
    /// Command and arguments (default: the image's). For a snapshot
    /// deployment (`ember deploy --snapshot`), the arguments and the -e
    /// variables go to its start-up as `argv` and `env` of the resume line
    /// instead, and its start-up command stays.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Splits `s` at commas outside `{{ ... }}` actions (a key template's
/// file names may hold commas).
fn split_options(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"{{") {
            depth += 1;
            i += 2;
            continue;
        }
        if b[i..].starts_with(b"}}") {
            depth = depth.saturating_sub(1);
            i += 2;
            continue;
        }
        if b[i] == b',' && depth == 0 {
            out.push(&s[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    out.push(&s[start..]);
    out
}

/// Parses one `--cache PATH=KEY[,restore=PREFIX]...[,scope=S][,fallback=S]...[,read-only]`
/// (the control plane checks the rest when the run or deployment arrives).
pub fn parse_cache(s: &str) -> Result<CacheDecl, String> {
    let (path, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected PATH=KEY[,OPTION]..."))?;
    let mut parts = split_options(rest).into_iter();
    let key = parts.next().unwrap_or_default();
    if key.is_empty() {
        return Err(format!("{s:?}: the key is empty"));
    }
    let mut decl = CacheDecl::new(path, key);
    for opt in parts {
        match opt.split_once('=') {
            Some(("restore", p)) => decl.restore_keys.push(p.to_owned()),
            Some(("scope", v)) => decl.scope = Some(v.to_owned()),
            Some(("fallback", v)) => decl.fallback_scopes.push(v.to_owned()),
            None if opt == "read-only" => decl.read_only = true,
            _ => {
                return Err(format!(
                    "{opt:?}: unknown cache option (restore=PREFIX, scope=S, fallback=S, read-only)"
                ));
            }
        }
    }
    Ok(decl)
}

/// Pins `image` to its manifest digest by asking its registry.
pub async fn pin(image: &str) -> anyhow::Result<PinnedImage> {
    let r: Reference = image.parse()?;
    let digest = match r.digest() {
        Some(d) => d.to_string(),
        None => {
            let client = RegistryClient::new(RegistryOptions::default())?;
            client
                .manifest(&r, &r.manifest_reference())
                .await
                .with_context(|| format!("resolving {image}"))?
                .digest
                .to_string()
        }
    };
    Ok(PinnedImage::new(image, digest)?)
}

/// Runs `ember submit`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.control.client()?;
    let mut env = BTreeMap::new();
    for e in &args.env {
        let (k, v) = e
            .split_once('=')
            .with_context(|| format!("invalid --env {e:?}: expected KEY=VALUE"))?;
        env.insert(k.to_owned(), v.to_owned());
    }
    let image = match &args.image {
        Some(i) => Some(pin(i).await?),
        None => None,
    };
    let spec = RunSpec {
        caches: args.caches.clone(),
        deployment: args.deployment.clone(),
        image,
        command: args.command.clone(),
        env,
        timeout_ms: args.timeout.map(|s| s.saturating_mul(1000)),
        idempotency_key: None,
        max_attempts: args.attempts,
        node_selector: BTreeMap::new(),
        recycle_key: args.recycle_key.clone(),
        readonly_rootfs: args.read_only,
    };
    let submitted = client
        .submit(&spec, args.idempotency_key.as_deref())
        .await?;
    let run = submitted.run;
    if args.json {
        println!("{}", serde_json::to_string(&run)?);
    } else if !args.wait {
        println!("{}", run.id);
    }
    if !submitted.created {
        eprintln!("{} already existed for this idempotency key", run.id);
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("{} queued", run.id);
    // Ctrl-C while waiting cancels the run, as it would stop a local
    // `ember run`.
    tokio::select! {
        r = print_logs(&client, run.id, true) => r?,
        _ = tokio::signal::ctrl_c() => {
            let run = client.cancel(run.id).await?;
            eprintln!("{} {}", run.id, run.state);
            return Ok(ExitCode::from(130));
        }
    }
    let run = client.run(run.id).await?;
    match run.exit_code {
        Some(c) => Ok(ExitCode::from(u8::try_from(c.clamp(0, 255)).unwrap_or(255))),
        None => bail!(
            "{} ended {}{}",
            run.id,
            run.state,
            run.error.map(|e| format!(": {e}")).unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_flags_parse_keys_with_templates_and_options() {
        let c = parse_cache(
            r#"/root/.cache/pip=pip-{{ hash "a,b.txt" "c" }},restore=pip-,restore=p,scope=br,fallback=main,read-only"#,
        )
        .expect("parse");
        assert_eq!(c.path, "/root/.cache/pip");
        assert_eq!(c.key, r#"pip-{{ hash "a,b.txt" "c" }}"#);
        assert_eq!(c.restore_keys, vec!["pip-", "p"]);
        assert_eq!(
            (
                c.scope.as_deref(),
                c.fallback_scopes.as_slice(),
                c.read_only
            ),
            (Some("br"), &["main".to_owned()][..], true)
        );
        assert_eq!(
            parse_cache("/c=k").expect("plain"),
            CacheDecl::new("/c", "k")
        );
        assert!(parse_cache("/c").is_err());
        assert!(parse_cache("/c=").is_err());
        assert!(parse_cache("/c=k,bogus").is_err());
    }
}
