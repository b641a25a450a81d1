//! `ember-agent`: the exec agent inside every Ember runner container.
//!
//! It runs as the container's PID 1, listens on a Unix socket in a
//! directory bind-mounted from the host, runs the commands it is sent
//! (protocol: the `ember-agent-proto` crate and `docs/agent-protocol.md`),
//! streams their output, reaps every zombie, forwards SIGTERM, SIGINT,
//! SIGHUP, SIGUSR1 and SIGUSR2 to running commands, and kills whatever a
//! command leaves behind when it ends.
//!
//! ```text
//! ember-agent --socket /run/ember/agent.sock
//! ```

mod server;
mod spawn;
mod sys;
mod tree;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: ember-agent [--socket PATH]

Runs commands sent over a Unix socket (default /run/ember/agent.sock).
Exits on SIGTERM or SIGINT once no command is running.";

fn parse_args() -> Result<server::Config, String> {
    let mut socket = PathBuf::from("/run/ember/agent.sock");
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--socket") => {
                socket = args.next().ok_or("--socket needs a path")?.into();
            }
            Some(s) if s.starts_with("--socket=") => {
                socket = PathBuf::from(&s["--socket=".len()..]);
            }
            Some("-h" | "--help") => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            Some("-V" | "--version") => {
                println!(
                    "ember-agent {} (protocol {})",
                    env!("CARGO_PKG_VERSION"),
                    ember_agent_proto::PROTOCOL_VERSION
                );
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    Ok(server::Config { socket })
}

fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ember-agent: {e}");
            return ExitCode::from(2);
        }
    };
    match server::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember-agent: {e}");
            ExitCode::from(1)
        }
    }
}
