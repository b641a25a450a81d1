//! A Docker token service for bearer-auth tests, and what it was asked.
//!
//! [`TokenServer`] runs `token_server.py` (next to this crate's
//! `Cargo.toml`): a small HTTP server that signs RS256 JWTs with a
//! throwaway key whose self-signed certificate a real `docker-registry`
//! configured with `auth: token` trusts (see
//! [`crate::registry::Registry::start_token_auth`]). Anonymous requests get
//! `pull`; Basic `alice:s3cret` gets `pull,push`; other credentials and any
//! repository under `private/` get 401. Every request is logged, so a test
//! can check which scope, service and realm parameters a client sent.

use anyhow::{Context, bail};
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The token server script.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/token_server.py");
/// The `service` the registry is configured with and names in challenges.
pub const SERVICE: &str = "ember-test-registry";
/// The issuer the token server signs as and the registry expects.
pub const ISSUER: &str = "ember-test-issuer";

/// A running token server on a free loopback port, killed on drop.
pub struct TokenServer {
    child: Child,
    port: u16,
    /// Key, certificate and request log.
    dir: tempfile::TempDir,
}

impl TokenServer {
    /// Makes a throwaway key and certificate (`openssl`) and starts the
    /// server (`python3`).
    pub fn start() -> anyhow::Result<TokenServer> {
        let dir = tempfile::Builder::new()
            .prefix("ember-token-")
            .tempdir()
            .context("creating the token server's directory")?;
        let status = Command::new("openssl")
            .current_dir(dir.path())
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "1",
                "-subj",
                "/CN=ember-test-token",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running openssl (is it installed?)")?;
        if !status.success() {
            bail!("openssl req failed: {status}");
        }
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .arg(dir.path().join("key.pem"))
            .arg(dir.path().join("cert.pem"))
            .arg(dir.path().join("log.jsonl"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning python3 token_server.py")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("token server stdout")?;
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the token server's port")?;
        let port = match line.trim().parse() {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("token server printed {line:?}, not a port");
            }
        };
        Ok(TokenServer { child, port, dir })
    }

    /// `http://127.0.0.1:PORT`; the token endpoint is `/token` under it.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The certificate a registry must trust to accept its tokens.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// Every request so far, oldest first: `path`, `raw_query`, `service`,
    /// `scope` and `foo` (lists of the query's values), `authorization`
    /// (the scheme), `user`, `status`.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("log.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
