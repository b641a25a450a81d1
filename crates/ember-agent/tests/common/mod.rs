//! Shared helpers: an agent started as an ordinary host process in a temp
//! dir, and small process-table probes.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ember_agent_proto::{AgentClient, ExecRequest, ExecResult};

/// An `ember-agent` child process listening in its own temp dir; killed
/// (SIGKILL) when dropped unless it already exited.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Agent {
    pub fn start() -> Agent {
        Self::start_bin(Path::new(env!("CARGO_BIN_EXE_ember-agent")))
    }

    pub fn start_bin(bin: &Path) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/agent.sock");
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            // Must not leak into execs' environments.
            .env("AGENT_ONLY_SECRET", "leaked")
            .spawn()
            .unwrap();
        Agent { child, socket, dir }
    }

    pub fn client(&self) -> AgentClient {
        AgentClient::connect_timeout(&self.socket, Duration::from_secs(20)).unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill takes plain integers; the pid is our live child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits up to `timeout` for the agent to exit; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A request with a small standard environment.
pub fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()],
        ..ExecRequest::default()
    }
}

/// Output of one exec, per stream.
pub struct Output {
    pub result: ExecResult,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

pub fn run(c: &mut AgentClient, r: &ExecRequest) -> Output {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let result = c
        .exec(r, &mut |is_err, b| {
            if is_err {
                stderr.extend_from_slice(b)
            } else {
                stdout.extend_from_slice(b)
            }
        })
        .unwrap();
    Output {
        result,
        stdout,
        stderr,
    }
}

/// True when `pid` does not exist (or is a zombie nobody reaped yet).
pub fn pid_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'),
    }
}

/// Waits up to two seconds for `pid` to be gone.
pub fn wait_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if pid_gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Percentile of sorted values.
pub fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
