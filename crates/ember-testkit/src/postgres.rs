//! A private PostgreSQL server from Debian's `postgresql` package on a free
//! loopback port, for tests of the PostgreSQL state store.
//!
//! PostgreSQL refuses to run as root, so `initdb` and `postgres` run as the
//! package's `postgres` user (through `setpriv`), in a fresh data directory
//! with `trust` authentication on 127.0.0.1 only. The server is started by a
//! small `sh` supervisor whose stdin is a pipe from this process: when the
//! pipe closes — [`Postgres`] dropped, or the test process exiting in any
//! way, even SIGKILL — the supervisor shuts the server down and removes its
//! directory. That is what makes [`Postgres::shared`] (one server per test
//! process, never dropped) leave nothing behind.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const PORT_ATTEMPTS: usize = 5;
const READY_LINE: &str = "database system is ready to accept connections";

/// A running PostgreSQL server. Dropping it stops the server and deletes
/// its data.
pub struct Postgres {
    supervisor: Mutex<Option<(Child, ChildStdin)>>,
    port: u16,
    dir: PathBuf,
    bindir: PathBuf,
    next_db: AtomicU32,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Postgres {
    /// Starts a private server. Settings favour test speed over durability
    /// (`fsync=off`): a test database never has to survive a power cut.
    pub fn start() -> anyhow::Result<Self> {
        let bindir = bindir()?;
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            match Self::launch(&bindir)? {
                Ok(pg) => return Ok(pg),
                Err(port_taken) => last_err = Some(port_taken),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no attempt made"))).context(format!(
            "starting postgres: no free port after {PORT_ATTEMPTS} attempts"
        ))
    }

    /// One server for the whole test process, started on first use and
    /// stopped when the process exits.
    pub fn shared() -> anyhow::Result<&'static Postgres> {
        static SHARED: OnceLock<Result<Postgres, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Postgres::start().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection URL of database `db` as the `postgres` superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new, empty database and returns its URL; every call gives
    /// a different one, so tests sharing a server don't see each other.
    pub fn create_database(&self) -> anyhow::Result<String> {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let name = format!("ember_test_{}_{n}", std::process::id());
        self.psql(&format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

    /// Runs one SQL command through `psql` as the superuser on database
    /// `postgres`; returns its unaligned output.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.psql_in("postgres", sql)
    }

    /// Runs one SQL command through `psql` as the superuser on `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", db])
            .args(["-p", &self.port.to_string()])
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// `Ok(Err(_))` when the port was taken (try another).
    fn launch(bindir: &Path) -> anyhow::Result<Result<Self, anyhow::Error>> {
        let tmp = tempfile::Builder::new()
            .prefix("ember-postgres-")
            .tempdir()
            .context("creating postgres' temporary directory")?;
        // The supervisor removes the directory, not TempDir: it must outlive
        // this process when the server is shared.
        let dir = tmp.keep();
        // The postgres user must be able to reach its data directory.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o711))
            .with_context(|| format!("chmod {}", dir.display()))?;
        let data = dir.join("data");
        fs::create_dir(&data).with_context(|| format!("creating {}", data.display()))?;
        let (uid, gid) = postgres_user()?;
        std::os::unix::fs::chown(&data, Some(uid), Some(gid))
            .with_context(|| format!("chown postgres {}", data.display()))?;
        let initdb = as_postgres(&bindir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .args(["-E", "UTF8", "--locale=C"])
            .stdin(Stdio::null())
            .output()
            .context("running initdb (is Debian's postgresql package installed?)")?;
        if !initdb.status.success() {
            let _ = fs::remove_dir_all(&dir);
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&initdb.stderr).trim()
            );
        }
        let port = free_port()?;
        let log = dir.join("postgres.log");
        // $1 data dir, $2 port, $3 directory to remove, $4 log, $5 postgres.
        let script = r#"
            setpriv --reuid=postgres --regid=postgres --clear-groups \
                "$5" -D "$1" -p "$2" -k "$1" -c listen_addresses=127.0.0.1 \
                -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
                -c max_connections=200 >"$4" 2>&1 &
            pid=$!
            cat >/dev/null
            kill -INT "$pid" 2>/dev/null
            wait "$pid"
            rm -rf "$3"
        "#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&data)
            .arg(port.to_string())
            .arg(&dir)
            .arg(&log)
            .arg(bindir.join("postgres"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the postgres supervisor")?;
        let stdin = child.stdin.take().context("supervisor stdin")?;
        let pg = Postgres {
            supervisor: Mutex::new(Some((child, stdin))),
            port,
            dir,
            bindir: bindir.to_owned(),
            next_db: AtomicU32::new(0),
        };
        match pg.wait_ready() {
            Ok(()) => Ok(Ok(pg)),
            Err(e) => {
                let log = pg.log();
                drop(pg);
                if log.contains("could not bind") || log.contains("already in use") {
                    Ok(Err(e))
                } else {
                    Err(e.context(format!("postgres log:\n{log}")))
                }
            }
        }
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            let log = self.log();
            if log.contains(READY_LINE) && TcpStream::connect(addr).is_ok() {
                return Ok(());
            }
            if log.contains("FATAL") || log.contains("could not bind") {
                bail!("postgres on port {} failed to start", self.port);
            }
            if Instant::now() >= deadline {
                bail!(
                    "postgres on port {} not ready within {READY_TIMEOUT:?}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let taken = self.supervisor.lock().map(|mut s| s.take());
        if let Ok(Some((mut child, mut stdin))) = taken {
            // Closing the pipe is the stop signal; the write makes sure a
            // supervisor stuck before `cat` still sees data, then EOF.
            let _ = stdin.write_all(b"\n");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// Debian installs each major version in /usr/lib/postgresql/MAJOR/bin;
/// take the newest, or `$EMBER_PG_BINDIR`.
fn bindir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EMBER_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let newest = fs::read_dir(root)
        .with_context(|| {
            format!(
                "reading {} (install Debian's postgresql package: scripts/install-deps.sh)",
                root.display()
            )
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("postgres").exists())
        .max_by_key(|(major, _)| *major);
    newest
        .map(|(_, bin)| bin)
        .with_context(|| format!("no PostgreSQL server under {}", root.display()))
}

fn as_postgres(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"])
        .arg(program);
    cmd
}

/// The `postgres` user's uid and gid, from /etc/passwd.
fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!("no postgres user (install Debian's postgresql package: scripts/install-deps.sh)")
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr().context("bound address")?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_creates_databases_and_cleans_up() {
        let pg = Postgres::start().expect("start postgres");
        let a = pg.create_database().expect("db a");
        let b = pg.create_database().expect("db b");
        assert_ne!(a, b);
        assert_eq!(pg.psql("SELECT 1 + 1").expect("query").trim(), "2");
        let dir = pg.dir.clone();
        assert!(dir.join("data").exists());
        drop(pg);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
