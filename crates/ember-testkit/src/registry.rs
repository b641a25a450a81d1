//! A real CNCF distribution registry (`docker-registry serve`) for tests.
//!
//! Each [`Registry`] is its own process with its own temporary storage,
//! configuration and logs on a free loopback port, so tests can run in
//! parallel and never see each other's content. The process is killed when
//! the value is dropped.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The registry binary; Debian packages distribution 2.8 under this name.
const REGISTRY_BIN: &str = "docker-registry";

/// How long a freshly started registry gets to answer `GET /v2/`. It
/// normally takes well under a second; the margin is for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often to start over on a new port when another process took the
/// port between our probe and the registry's bind.
const PORT_ATTEMPTS: usize = 5;

/// A running `docker-registry serve` on `127.0.0.1`, killed on drop.
pub struct Registry {
    /// The registry process; killed and reaped in `Drop`.
    child: Child,
    /// The port it listens on.
    port: u16,
    /// Holds config, storage and logs; removed on drop after the process is
    /// gone, so the registry never writes into a deleted directory.
    dir: tempfile::TempDir,
}

/// One request line parsed from a registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Request target, e.g. `/v2/ember/busybox/blobs/sha256:...`.
    pub path: String,
    /// Response status code.
    pub status: u16,
}

impl Registry {
    /// Starts an ordinary registry (deletes enabled) on a free port and
    /// waits until it answers `GET /v2/`.
    pub fn start() -> anyhow::Result<Self> {
        Self::launch(None)
    }

    /// Starts a pull-through proxy (`proxy: remoteurl:`) of `upstream_url`
    /// (`http://HOST:PORT` or `HOST:PORT`). The upstream must already be up.
    ///
    /// Distribution's proxy refuses pushes; it fetches from the upstream on
    /// the first pull of each blob and manifest.
    pub fn start_proxy(upstream_url: &str) -> anyhow::Result<Self> {
        let upstream = if upstream_url.contains("://") {
            upstream_url.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", upstream_url.trim_end_matches('/'))
        };
        Self::launch(Some(&upstream))
    }

    /// Starts a registry that serves the storage at `storage` (for example
    /// another, plain [`Registry`]'s [`Registry::storage_dir`], after
    /// pushing there: the test pusher does not speak auth) and demands
    /// bearer tokens from `token`'s service. `realm` is the URL its
    /// challenges name; it may carry a query string of its own.
    pub fn start_token_auth(
        storage: &Path,
        token: &crate::token::TokenServer,
        realm: &str,
    ) -> anyhow::Result<Self> {
        let auth = TokenAuth {
            storage: storage.to_path_buf(),
            realm: realm.to_string(),
            cert: token.cert_path(),
        };
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            match Self::launch_on(port, None, Some(&auth))? {
                Launch::Ready(registry) => return Ok(registry),
                Launch::PortTaken(err) => last_err = Some(err),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
            .context(format!("starting {REGISTRY_BIN} with token auth"))
    }

    /// `127.0.0.1:PORT`, the form image references use.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`, the base URL for HTTP clients.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port the registry listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The registry's storage root (the filesystem driver's
    /// `rootdirectory`).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Everything in the access log so far: one Apache combined-format line
    /// per request. Empty if it cannot be read.
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// The access log parsed into requests, oldest first; lines that are
    /// not request lines are skipped.
    pub fn requests(&self) -> Vec<AccessLogEntry> {
        self.access_log()
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// How many `method` requests whose path contains `path_fragment` the
    /// registry has served, e.g. `("GET", "/blobs/sha256:")` to count blob
    /// downloads an upstream saw.
    pub fn count_requests(&self, method: &str, path_fragment: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path.contains(path_fragment))
            .count()
    }

    /// Waits until [`Registry::count_requests`] reaches `at_least` or
    /// `timeout` passes, and returns the count then. A request appears in
    /// the log only after its response is complete, and a proxy may fetch
    /// from its upstream in the background after its client is served, so
    /// counts read right after a client finishes can be low.
    pub fn wait_for_requests(
        &self,
        method: &str,
        path_fragment: &str,
        at_least: usize,
        timeout: Duration,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.count_requests(method, path_fragment);
            if count >= at_least || Instant::now() >= deadline {
                return count;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The registry's own log (its stderr), for diagnosing failures.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    fn launch(upstream: Option<&str>) -> anyhow::Result<Self> {
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            match Self::launch_on(port, upstream, None)? {
                Launch::Ready(registry) => return Ok(registry),
                Launch::PortTaken(err) => last_err = Some(err),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no attempt made"))).context(format!(
            "starting {REGISTRY_BIN}: no free port after {PORT_ATTEMPTS} attempts"
        ))
    }

    fn launch_on(
        port: u16,
        upstream: Option<&str>,
        auth: Option<&TokenAuth>,
    ) -> anyhow::Result<Launch> {
        let dir = tempfile::Builder::new()
            .prefix("ember-registry-")
            .tempdir()
            .context("creating the registry's temporary directory")?;
        let storage = dir.path().join("storage");
        fs::create_dir(&storage).with_context(|| format!("creating {}", storage.display()))?;
        let config = dir.path().join("config.yml");
        let mut yaml = match auth {
            Some(a) => config_yaml(port, &a.storage, upstream),
            None => config_yaml(port, &storage, upstream),
        };
        if let Some(a) = auth {
            yaml.push_str(&a.yaml());
        }
        fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
        // Distribution writes the access log (gorilla's combined logging
        // handler) to stdout and everything else to stderr.
        let access_log = create_log(dir.path(), "access.log")?;
        let registry_log = create_log(dir.path(), "registry.log")?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(access_log)
            .stderr(registry_log)
            .spawn()
            .with_context(|| format!("spawning {REGISTRY_BIN} (is it installed?)"))?;
        let mut registry = Registry { child, port, dir };
        match registry.wait_ready() {
            Ok(()) => Ok(Launch::Ready(registry)),
            Err(err) => {
                let log = registry.log();
                // Drop kills the process and removes the directory.
                drop(registry);
                if log.contains("address already in use") {
                    Ok(Launch::PortTaken(err))
                } else {
                    Err(err.context(format!("{REGISTRY_BIN} log:\n{log}")))
                }
            }
        }
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(status) = self.child.try_wait().context("polling the registry")? {
                bail!(
                    "{REGISTRY_BIN} on port {} exited early with {status}",
                    self.port
                );
            }
            // 401 is a registry with auth that is up.
            if let Ok(200 | 401) = http_get_status(addr, "/v2/") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{REGISTRY_BIN} on port {} did not answer GET /v2/ within {:?}",
                    self.port,
                    READY_TIMEOUT
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Errors mean the process is already gone; nothing else to do.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Token auth settings for a registry.
struct TokenAuth {
    storage: PathBuf,
    realm: String,
    cert: PathBuf,
}

impl TokenAuth {
    fn yaml(&self) -> String {
        let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            quote(&self.realm),
            quote(crate::token::SERVICE),
            quote(crate::token::ISSUER),
            quote(&self.cert.to_string_lossy()),
        )
    }
}

enum Launch {
    Ready(Registry),
    PortTaken(anyhow::Error),
}

/// A port that was free a moment ago. The registry binds it itself, so
/// another process can take it in between: `launch` retries when that
/// happens.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("reading the bound address")?
        .port())
}

fn create_log(dir: &Path, name: &str) -> anyhow::Result<fs::File> {
    let path = dir.join(name);
    fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
}

fn config_yaml(port: u16, storage: &Path, upstream: Option<&str>) -> String {
    // JSON strings are valid YAML double-quoted scalars, which keeps paths
    // with odd characters safe.
    let quote = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut yaml = format!(
        "version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: ember-testkit-not-a-secret
health:
  storagedriver:
    enabled: false
",
        storage = quote(&storage.to_string_lossy()),
    );
    if let Some(upstream) = upstream {
        yaml.push_str(&format!("proxy:\n  remoteurl: {}\n", quote(upstream)));
    }
    yaml
}

/// Sends `GET path` over plain HTTP/1.1 and returns the status code. Kept
/// synchronous and dependency-free so `Registry::start` works inside and
/// outside an async runtime.
fn http_get_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let mut len = 0;
    // The status line is all we need; stop reading once it is in.
    while len < head.len() {
        let n = stream.read(&mut head[len..])?;
        if n == 0 {
            break;
        }
        len += n;
        if head[..len].contains(&b'\n') {
            break;
        }
    }
    let line = String::from_utf8_lossy(&head[..len]);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP status line: {line:?}"))
}

/// Parses `HOST - - [DATE] "METHOD PATH PROTO" STATUS SIZE ...`.
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let (_, rest) = line.split_once('"')?;
    let (request, rest) = rest.split_once('"')?;
    let mut request = request.split_whitespace();
    let method = request.next()?.to_string();
    let path = request.next()?.to_string();
    let status = rest.split_whitespace().next()?.parse().ok()?;
    Some(AccessLogEntry {
        method,
        path,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_combined_log_lines() {
        let line = r#"127.0.0.1 - - [01/Jan/2024:00:00:00 +0000] "GET /v2/ember/busybox/blobs/sha256:abc HTTP/1.1" 200 1234 "" "skopeo/1.9""#;
        assert_eq!(
            parse_access_line(line),
            Some(AccessLogEntry {
                method: "GET".into(),
                path: "/v2/ember/busybox/blobs/sha256:abc".into(),
                status: 200,
            })
        );
        assert_eq!(parse_access_line("time=... level=info msg=hello"), None);
    }

    #[test]
    fn proxy_config_names_the_upstream() {
        let yaml = config_yaml(5000, Path::new("/tmp/x"), Some("http://127.0.0.1:1"));
        assert!(yaml.contains("addr: 127.0.0.1:5000"));
        assert!(yaml.contains("rootdirectory: \"/tmp/x\""));
        assert!(yaml.contains("proxy:\n  remoteurl: \"http://127.0.0.1:1\""));
        assert!(!config_yaml(5000, Path::new("/tmp/x"), None).contains("proxy"));
    }
}
