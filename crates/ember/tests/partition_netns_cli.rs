//! A partition across real network namespaces (issue 10, "Partitions,
//! tested across real hosts"): `ember control`, `ember cache` and two
//! `ember node` processes each in their own network namespace, joined by
//! veth pairs to one bridge on the host, and one node's link cut with
//! `ip link set DEV down` for longer than the heartbeat timeout.
//!
//! The processes are started with `nsenter --net=/run/netns/NS`, not `ip
//! netns exec NS`: `ip netns exec` also gives the command its own mount
//! namespace with a fresh sysfs on `/sys`, which hides this machine's
//! cgroup v1 hierarchies under `/sys/fs/cgroup`, and runc cannot create
//! the runners' cgroups there. Only the network is what a separate host
//! changes here, so only the network namespace is entered.

mod common;

use common::cluster::*;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `ip ARGS`, panicking with its stderr if it fails.
fn ip(args: &[&str]) {
    sh_ok(Command::new("ip").args(args));
}

/// A bridge on the host with one veth pair per namespace, on a private
/// /24 named after our pid; everything is deleted when dropped, so a
/// failing assertion leaves no namespace or link behind.
struct Net {
    /// `10.A.B`, the /24's first three octets.
    prefix: String,
    /// This test run's tag in every name (`e<pid>`).
    tag: String,
    /// The namespaces made (names).
    namespaces: Vec<String>,
    /// The host-side ends of the veth pairs made (deleting one deletes
    /// its pair).
    links: Vec<String>,
    bridge: String,
}

impl Net {
    /// The bridge, with the host's address `.254`.
    fn new() -> Net {
        let pid = std::process::id();
        let tag = format!("e{pid}");
        // Interface names have at most 15 bytes: `e` + 7 digits + 3.
        let bridge = format!("{tag}br");
        let net = Net {
            prefix: format!("10.{}.{}", 128 + (pid >> 8) % 128, pid % 256),
            tag,
            namespaces: Vec::new(),
            links: Vec::new(),
            bridge,
        };
        // A leftover of an earlier run with our pid (killed before its
        // guard ran) would make `ip link add` fail.
        let _ = Command::new("ip")
            .args(["link", "del", &net.bridge])
            .stderr(Stdio::null())
            .status();
        ip(&["link", "add", &net.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", net.host()),
            "dev",
            &net.bridge,
        ]);
        ip(&["link", "set", &net.bridge, "up"]);
        net
    }

    /// The host's address on the bridge.
    fn host(&self) -> String {
        format!("{}.254", self.prefix)
    }

    /// A namespace `NAME` with `eth0` at `.N` on the bridge and `lo` up;
    /// returns the namespace's name and the host-side link.
    fn add(&mut self, name: &str, n: u8) -> (String, String) {
        let ns = format!("ember-{}-{name}", self.tag);
        let link = format!("{}{name}", self.tag);
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &link])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        self.links.push(link.clone());
        ip(&["link", "set", &link, "master", &self.bridge, "up"]);
        let addr = format!("{}.{n}/24", self.prefix);
        ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        (ns, link)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for l in self.links.iter().chain([&self.bridge]) {
            let _ = Command::new("ip").args(["link", "del", l]).status();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Starts `ember --root ROOT ARGS...` in namespace `ns` and returns it
/// with the first line of its stderr (which names the address for
/// `ember control` and `ember cache`); the rest of stderr is copied to
/// ours. `nsenter` execs ember itself, so the pid is ember's.
fn start_in(ns: &str, root: &Path, args: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(ember())
        .arg("--root")
        .arg(root)
        .args(args);
    start_logged(cmd, &format!("[{ns}] "))
}

/// Forwards TCP connections from `listen` to `upstream`: the registry
/// only listens on the host's loopback, which the namespaces cannot
/// reach, so the cache reaches it through the bridge's host address.
fn forward(listen: &str, upstream: String) -> String {
    let listener = TcpListener::bind(listen).expect("bind the forwarder");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for down in listener.incoming().flatten() {
            let Ok(up) = TcpStream::connect(&upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (
                    down.try_clone().expect("clone"),
                    up.try_clone().expect("clone"),
                ),
                (up, down),
            ] {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

/// Polls run `id` until `done` says so; the deadline only stops a hung
/// test, the machine being slow cannot fail it.
fn wait_run(
    url: &str,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let r = run_json(url, id);
        if done(&r) {
            return r;
        }
        // An ended run cannot become what is waited for.
        assert!(
            !matches!(
                r["state"].as_str(),
                Some("succeeded" | "failed" | "lost" | "cancelled")
            ),
            "{id} ended, never {what}: {r}"
        );
        assert!(Instant::now() < deadline, "{id} never {what}: {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `ember node --id ID` in namespace `ns` against `control`, pulling
/// through `cache`; returns once the control plane lists it.
fn node_in(ns: &str, root: &Path, control: &str, cache: &str, id: &str, agent: &Path) -> Proc {
    let agent = agent.to_string_lossy().into_owned();
    let (node, _) = start_in(
        ns,
        root,
        &[
            "node",
            "--control",
            control,
            "--token",
            NODE_TOKEN,
            "--id",
            id,
            "--slots",
            "1",
            "--agent",
            &agent,
            "--cache",
            cache,
            "--heartbeat",
            "1",
        ],
    );
    // This is the test waiting, not the system.
    let deadline = Instant::now() + Duration::from_secs(60);
    let quoted = format!("\"{id}\"");
    while !client_ok(control, &["nodes", "--json"]).contains(&quoted) {
        assert!(Instant::now() < deadline, "node {id} never registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    node
}

/// Whether `ip netns` works here (root with CAP_SYS_ADMIN, a kernel with
/// network namespaces); the error if not.
fn netns_unavailable() -> Option<String> {
    let probe = format!("ember-probe-{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
            None
        }
        Ok(o) => Some(String::from_utf8_lossy(&o.stderr).into_owned()),
        Err(e) => Some(format!("ip: {e}")),
    }
}

/// A partition across network namespaces (issue 10): node A's veth is set
/// down on the host side, while A runs a run, for longer than the
/// heartbeat timeout; the run is lost and retried on node B; when A's link
/// is back, A stops its stale copy (its runner is destroyed, which a
/// finished run's would not be, and runc no longer knows its container),
/// and the run is recorded once: one run, B's attempt 2, B's exit code,
/// A's late reports refused.
#[test]
fn a_node_cut_off_by_its_link_stops_the_run_retried_elsewhere() {
    if let Some(e) = netns_unavailable() {
        eprintln!("skipped: network namespaces are not available here: {e}");
        return;
    }
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    // Declared first, so it is dropped last, after every process in it.
    let mut net = Net::new();
    let (ns_ctl, _) = net.add("ctl", 1);
    let (ns_cache, _) = net.add("cch", 2);
    let (ns_a, link_a) = net.add("a", 3);
    let (ns_b, _) = net.add("b", 4);
    let p = net.prefix.clone();

    let registry = registry_with(&["busybox"]);
    // The reference names the registry as the host knows it; the nodes
    // reach its content only through the cache (the origin's loopback
    // address is their own).
    let image = format!("{}/ember/busybox:latest", registry.addr());
    let fwd = forward(&format!("{}:0", net.host()), registry.addr());

    let tmp = tempfile::tempdir().expect("tempdir");
    let db = tmp.path().join("control.db").to_string_lossy().into_owned();
    let (mut control, line) = start_in(
        &ns_ctl,
        tmp.path(),
        &[
            "control",
            "--listen",
            &format!("{p}.1:7070"),
            "--db",
            &db,
            "--client-token",
            CLIENT_TOKEN,
            "--node-token",
            NODE_TOKEN,
            // Heartbeats every second (the nodes') against a 5 s timeout.
            "--heartbeat-timeout",
            "5",
            "--keepalive",
            "1",
        ],
    );
    assert!(line.contains(&format!("{p}.1:7070")), "{line}");
    let url = format!("http://{p}.1:7070");
    let cache_dir = tmp.path().join("cache").to_string_lossy().into_owned();
    let (mut cache, line) = start_in(
        &ns_cache,
        &tmp.path().join("cache-root"),
        &[
            "cache",
            "--listen",
            &format!("{p}.2:5000"),
            "--dir",
            &cache_dir,
            "--max-bytes",
            "1G",
            "--upstream",
            // The nodes ask for the origin by name (`?ns=HOST`).
            &format!("{}=http://{fwd}", registry.addr()),
        ],
    );
    assert!(line.contains("serving"), "{line}");
    let cache_url = format!("http://{p}.2:5000");

    let a_root = tmp.path().join("a");
    let b_root = tmp.path().join("b");
    let mut a = node_in(&ns_a, &a_root, &url, &cache_url, "a", &agent);
    // Long enough that A's copy still runs when its link is back (A's
    // reconnection waits for TCP's SYN retries); a recycling key, so that
    // A makes no spare runner (the test counts runners).
    let id = client_ok(
        &url,
        &[
            "submit",
            "--attempts",
            "2",
            "--recycle-key",
            "netns",
            &image,
            "--",
            "sleep",
            "75",
        ],
    );
    let r = wait_run(&url, &id, "ran", |r| r["state"] == "running");
    assert_eq!(r["node"], "a", "{r}");
    assert_eq!(r["attempts"], 1, "{r}");
    assert_eq!(runners(&a_root), 1);

    ip(&["link", "set", &link_a, "down"]);
    let cut = Instant::now();
    let mut b = node_in(&ns_b, &b_root, &url, &cache_url, "b", &agent);
    let r = wait_run(&url, &id, "was retried on b", |r| {
        r["state"] == "running" && r["node"] == "b"
    });
    eprintln!(
        "retried on b {} ms after a's link went down",
        cut.elapsed().as_millis()
    );
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(runners(&a_root), 1, "a still runs its copy, cut off");
    // What the control plane says of A while it is cut off.
    let nodes = client_ok(&url, &["nodes", "--json"]);
    eprintln!("nodes while a is cut off: {nodes}");

    ip(&["link", "set", &link_a, "up"]);
    let healed = Instant::now();
    let deadline = healed + Duration::from_secs(180);
    while runners(&a_root) > 0 {
        assert!(
            Instant::now() < deadline,
            "a never stopped the run it no longer owns"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "a stopped its stale copy {} ms after its link came back",
        healed.elapsed().as_millis()
    );
    let runc = Command::new("runc")
        .arg("--root")
        .arg(a_root.join("runc"))
        .args(["list", "-q"])
        .output()
        .expect("runc list");
    assert_eq!(
        String::from_utf8_lossy(&runc.stdout).trim(),
        "",
        "runc still knows a's container"
    );
    // A's reports of its stopped copy (attempt 1) did not touch the run.
    let r = run_json(&url, &id);
    assert_eq!(r["state"], "running", "{r}");
    assert_eq!(r["node"], "b", "{r}");
    assert_eq!(r["attempts"], 2, "{r}");

    let r = wait_run(&url, &id, "finished", |r| r["state"] != "running");
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["node"], "b", "{r}");
    assert_eq!(r["attempts"], 2, "{r}");
    assert_eq!(r["max_attempts"], 2, "{r}");
    assert_eq!(r["exit_code"], 0, "{r}");
    // One run recorded, not a second one for A's copy.
    assert_eq!(runs_json(&url).len(), 1);
    a.stop();
    b.stop();
    cache.stop();
    control.stop();
}
