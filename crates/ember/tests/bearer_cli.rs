//! The Docker bearer-token flow against a real CNCF distribution registry
//! (`docker-registry serve`) configured with `auth: token`, and a small
//! token server (`token_server.py`) that signs RS256 JWTs with a throwaway
//! self-signed certificate the registry trusts.
//!
//! Checks that `ember pull` answers the registry's `Bearer` challenge by
//! asking the token service for `repository:NAME:pull` on the right
//! service, anonymously or with Basic credentials from `--auth-file`; that
//! the pulled image runs; and that a refused token request fails the pull
//! with exit code 125 and "unauthorized" without adding layers to the store.
//!
//! Skips (passing, with a message) only when `openssl` or `docker-registry`
//! is not installed.

mod common;

use common::*;
use ember_testkit::fixtures;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVICE: &str = "ember-test-registry";
const ISSUER: &str = "ember-test-issuer";

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `cmd ARGS` can be spawned at all.
fn installed(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running docker-registry and where its log goes.
struct Registry {
    proc: Proc,
    addr: String,
    log: PathBuf,
}

impl Registry {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// Starts docker-registry with storage under `dir/data`, with token auth
/// against `realm` or without auth.
fn start_registry(dir: &Path, name: &str, realm: Option<&str>) -> Registry {
    let port = free_port();
    let auth = match realm {
        Some(realm) => format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    \
             rootcertbundle: {}\n",
            dir.join("cert.pem").display()
        ),
        None => String::new(),
    };
    let config = format!(
        "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
         http:\n  addr: 127.0.0.1:{port}\n{auth}",
        dir.join("data").display()
    );
    let config_path = dir.join(format!("{name}.yml"));
    std::fs::write(&config_path, config).expect("write registry config");
    let log = dir.join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log).expect("create registry log");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config_path)
        .stdout(log_file.try_clone().expect("dup log"))
        .stderr(log_file)
        .spawn()
        .expect("spawn docker-registry");
    let mut reg = Registry {
        proc: Proc(child),
        addr: format!("127.0.0.1:{port}"),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(&reg.addr).is_err() {
        if let Some(status) = reg.proc.0.try_wait().expect("try_wait") {
            panic!("docker-registry exited ({status}):\n{}", reg.log_tail());
        }
        assert!(
            Instant::now() < deadline,
            "docker-registry did not listen on {}:\n{}",
            reg.addr,
            reg.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    reg
}

/// Starts the token server; returns it and its port.
fn start_token_server(dir: &Path, log: &Path) -> (Proc, u16) {
    let script = ember_testkit::token::SCRIPT;
    let mut child = Command::new("python3")
        .arg(script)
        .arg(dir.join("key.pem"))
        .arg(dir.join("cert.pem"))
        .arg(log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python3 token_server.py");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read token server port");
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("token server printed {line:?}, not a port"));
    (Proc(child), port)
}

/// The token server's request log, one JSON object per request.
fn token_log(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("token log line"))
        .collect()
}

/// Whether a log entry's list field `key` contains `value`.
fn has(entry: &serde_json::Value, key: &str, value: &str) -> bool {
    entry[key]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v == value))
}

/// Status line and headers of a plain `GET path` to `addr`.
fn raw_get_head(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    resp.split("\r\n\r\n").next().unwrap_or("").to_string()
}

/// Names under `store/layers` (empty if it does not exist).
fn layer_entries(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(store.join("layers")) {
        Ok(rd) => rd
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn write_auth_file(path: &Path, addr: &str, user_pass: &str) {
    use std::fmt::Write as _;
    // Standard base64 of "user:pass", without pulling in a crate.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in user_pass.as_bytes().chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut json = String::new();
    write!(json, r#"{{"auths":{{"{addr}":{{"auth":"{b64}"}}}}}}"#).expect("format");
    std::fs::write(path, json).expect("write auth file");
}

#[test]
fn bearer_token_pull() {
    if !installed("openssl", &["version"]) || !installed("docker-registry", &["--version"]) {
        eprintln!("SKIP bearer_token_pull: needs `openssl` and `docker-registry` on PATH");
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();

    // Throwaway signing key and the certificate the registry trusts.
    sh_ok(Command::new("openssl").current_dir(dir).args([
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
    ]));

    // Push the fixture with auth off (the test pusher does not speak
    // auth), then serve the same storage with token auth.
    {
        let open = start_registry(dir, "open", None);
        let fx = fixtures::build_cached("busybox").expect("fixture");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio");
        rt.block_on(fixtures::push(
            &fx,
            &format!("http://{}", open.addr),
            "ember/busybox",
            "latest",
        ))
        .expect("push fixture");
    }
    let log = dir.join("token-log.jsonl");
    let (_token_server, token_port) = start_token_server(dir, &log);
    let realm = format!("http://127.0.0.1:{token_port}/token");
    let reg = start_registry(dir, "token", Some(&realm));
    let addr = reg.addr.clone();

    // The registry really demands a token, and points at our realm.
    let head = raw_get_head(&addr, "/v2/ember/busybox/manifests/latest");
    assert!(
        head.lines().next().is_some_and(|l| l.contains(" 401 ")),
        "{head}"
    );
    assert!(
        head.contains(&format!(r#"Bearer realm="{realm}",service="{SERVICE}""#)),
        "{head}"
    );

    // 1. Anonymous pull: a token for repository:ember/busybox:pull.
    let none = dir.join("none.json");
    std::fs::write(&none, "{}").expect("write empty auth file");
    let none = none.to_str().expect("utf-8");
    let store = dir.join("store");
    let image = format!("{addr}/ember/busybox:latest");
    let out = run_ember(&store, &["pull", "-q", "--auth-file", none, &image]);
    assert!(
        out.status.success(),
        "anonymous pull failed ({}): {}\nregistry log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        reg.log_tail()
    );
    let entries = token_log(&log);
    assert!(!entries.is_empty(), "no token request was made");
    for e in &entries {
        assert_eq!(e["path"], "/token", "{e}");
        assert!(has(e, "service", SERVICE), "{e}");
        assert!(has(e, "scope", "repository:ember/busybox:pull"), "{e}");
        assert!(e["authorization"].is_null(), "anonymous sent auth: {e}");
        assert_eq!(e["status"], 200, "{e}");
    }
    let anon_requests = entries.len();
    let layers = layer_entries(&store);
    assert!(!layers.is_empty(), "pull stored no layers");

    let out = ember_ok(&store, &["run", &image]);
    assert_eq!(out, "hello from ember\n");

    // 2. A repository the token server refuses: 125, "unauthorized", no
    // layers added.
    let private = format!("{addr}/private/busybox:latest");
    let out = run_ember(&store, &["pull", "-q", "--auth-file", none, &private]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("unauthorized") && err.contains("private/busybox"),
        "{err}"
    );
    assert_eq!(
        layer_entries(&store),
        layers,
        "refused pull changed layers/"
    );
    let entries = token_log(&log);
    assert!(
        entries[anon_requests..]
            .iter()
            .any(|e| has(e, "scope", "repository:private/busybox:pull") && e["status"] == 401),
        "no refused token request for private/busybox: {entries:?}"
    );
    let before_creds = entries.len();

    // 3. Credentials from --auth-file go to the token service as Basic.
    let auth = dir.join("auth.json");
    write_auth_file(&auth, &addr, "alice:s3cret");
    let store2 = dir.join("store2");
    let out = run_ember(
        &store2,
        &[
            "pull",
            "-q",
            "--auth-file",
            auth.to_str().expect("utf-8"),
            &image,
        ],
    );
    assert!(
        out.status.success(),
        "pull with credentials failed ({}): {}\nregistry log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        reg.log_tail()
    );
    let entries = token_log(&log);
    let new = &entries[before_creds..];
    assert!(!new.is_empty(), "pull with credentials asked for no token");
    for e in new {
        assert!(has(e, "service", SERVICE), "{e}");
        assert!(has(e, "scope", "repository:ember/busybox:pull"), "{e}");
        assert_eq!(e["authorization"], "Basic", "{e}");
        assert_eq!(e["user"], "alice", "{e}");
        assert_eq!(e["status"], 200, "{e}");
    }
    assert_eq!(ember_ok(&store2, &["run", &image]), "hello from ember\n");

    // 4. Wrong password: the token service refuses, the pull fails cleanly.
    let bad = dir.join("bad.json");
    write_auth_file(&bad, &addr, "alice:wrong");
    let store3 = dir.join("store3");
    let out = run_ember(
        &store3,
        &[
            "pull",
            "-q",
            "--auth-file",
            bad.to_str().expect("utf-8"),
            &image,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("unauthorized"), "{err}");
    assert!(
        layer_entries(&store3).is_empty(),
        "refused pull stored layers"
    );
    let entries = token_log(&log);
    assert!(
        entries
            .last()
            .is_some_and(|e| e["status"] == 401 && e["user"] == "alice"),
        "{entries:?}"
    );

    drop(reg);
    eprintln!("bearer_token_pull took {:?}", started.elapsed());
}
