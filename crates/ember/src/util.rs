//! Small helpers shared by commands.

use anyhow::{Context, bail};
use ember_registry::{Credentials, RegistryClient, RegistryOptions};
use std::sync::Arc;

/// One line: the error and its causes (`a: b: c`). Errors do not repeat
/// their source in their own message, so nothing is de-duplicated here.
pub fn error_chain(e: &anyhow::Error) -> String {
    ember_error::chain(e.as_ref()).to_string()
}

/// Parses a byte size: `1024`, `512k`, `100M`, `1.5G`, `2GiB`, `10GB`
/// (powers of 1024 throughout, as Docker's `--memory` does).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("invalid size {s:?}: expected a number with an optional unit"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => bail!("invalid size {s:?}: unknown unit {u:?} (use k, M, G or T)"),
    };
    if !n.is_finite() || n < 0.0 {
        bail!("invalid size {s:?}");
    }
    Ok((n * mult as f64) as u64)
}

/// Human-readable bytes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Registry flags shared by `pull` and `run`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Mirror to try before the origin registry (repeatable, tried in
    /// order). Requests carry `?ns=<origin host>`.
    #[arg(long = "mirror", value_name = "URL")]
    pub mirrors: Vec<String>,
    /// Registry host allowed over plain HTTP (loopback always is).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure: Vec<String>,
    /// Platform to pick from a multi-platform image.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Docker-style credentials file (`{"auths":{host:{"auth":...}}}`);
    /// defaults to $DOCKER_CONFIG/config.json or ~/.docker/config.json.
    #[arg(long, value_name = "FILE")]
    pub auth_file: Option<std::path::PathBuf>,
}

impl RegistryArgs {
    /// A registry client configured from the flags.
    pub fn client(&self) -> anyhow::Result<Arc<RegistryClient>> {
        for m in &self.mirrors {
            if !(m.starts_with("http://") || m.starts_with("https://")) {
                bail!("invalid --mirror {m:?}: expected an http:// or https:// URL");
            }
        }
        let mut credentials = Credentials::none();
        let path = match &self.auth_file {
            Some(p) => Some(p.clone()),
            None => std::env::var_os("DOCKER_CONFIG")
                .map(|d| std::path::PathBuf::from(d).join("config.json"))
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(|h| std::path::PathBuf::from(h).join(".docker/config.json"))
                }),
        };
        if let Some(p) = path {
            credentials
                .load_docker_config(&p)
                .map_err(anyhow::Error::msg)?;
        }
        Ok(Arc::new(RegistryClient::new(RegistryOptions {
            mirrors: self.mirrors.clone(),
            insecure_hosts: self.insecure.clone(),
            credentials,
            ..Default::default()
        })?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("512k").unwrap(), 512 * 1024);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("100MB").unwrap(), 100 << 20);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5X").is_err());
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }

    /// Every layer is printed, once, in order; a cause that happens to
    /// share words with its parent is no longer dropped.
    #[test]
    fn error_chain_prints_every_layer() {
        let store = ember_store::StoreError::Registry {
            reference: "app:v2".into(),
            source: ember_registry::RegistryError::Config("no such mirror".into()),
        };
        let e = anyhow::Error::new(store).context("pulling app:v2 for ember run");
        assert_eq!(
            error_chain(&e),
            "pulling app:v2 for ember run: pulling app:v2: no such mirror"
        );
        let e = anyhow::anyhow!("c").context("b").context("a");
        assert_eq!(error_chain(&e), "a: b: c");
    }
}
