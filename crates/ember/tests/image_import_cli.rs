//! `ember image import` end to end: an image that `podman build` makes
//! here, saved as a docker-archive, an OCI archive and an OCI layout
//! (through skopeo), imported and run with real runc and no pull; hostile
//! inputs that must leave the store as it was; a push to a real
//! docker-registry, pulled back into another store.

mod common;

use common::*;
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// What the built image's default command prints.
const GREETING: &str = "built-by-podman";
/// The name `podman build -t` gives it.
const NAME: &str = "localhost/ember-import-test:v1";

/// The podman-built image, saved in the three forms; built once per test
/// binary run.
struct Built {
    docker_archive: PathBuf,
    oci_archive: PathBuf,
    /// Written by skopeo, whose layout names the image by its tag only.
    oci_layout: PathBuf,
    /// A docker-archive of two images: the first, and [`SECOND`] built
    /// on it (`podman save --multi-image-archive`).
    multi_archive: PathBuf,
}

/// The second image, whose default command prints [`SECOND_GREETING`].
const SECOND: &str = "localhost/ember-import-test:v2";
/// What it prints.
const SECOND_GREETING: &str = "second-image";

fn podman(dir: &Path) -> Command {
    let mut c = Command::new("podman");
    c.arg("--root")
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("runroot"))
        .args([
            "--storage-driver",
            "vfs",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]);
    c
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        // Under the target's test directory, replaced on each run, so
        // repeated runs do not pile podman stores up in /tmp.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("image-import");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let ctx = dir.join("ctx");
        std::fs::create_dir_all(&ctx).expect("mkdir");
        std::fs::copy("/usr/bin/busybox", ctx.join("busybox")).expect("static busybox");
        std::fs::write(
            ctx.join("Containerfile"),
            format!(
                "FROM scratch\nADD busybox /bin/busybox\n\
                 RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
                 RUN echo {GREETING} > /hello\nCMD [\"/bin/cat\", \"/hello\"]\n"
            ),
        )
        .expect("Containerfile");
        sh_ok(
            podman(&dir)
                .args([
                    "build",
                    "--quiet",
                    "--network",
                    "none",
                    "--ulimit",
                    "nofile=1024:1024",
                    "--ulimit",
                    "nproc=1024:1024",
                    "-t",
                    NAME,
                ])
                .arg(&ctx),
        );
        std::fs::write(
            ctx.join("Containerfile.2"),
            format!("FROM {NAME}\nRUN echo {SECOND_GREETING} > /hello\n"),
        )
        .expect("Containerfile.2");
        sh_ok(
            podman(&dir)
                .args([
                    "build",
                    "--quiet",
                    "--network",
                    "none",
                    "--ulimit",
                    "nofile=1024:1024",
                    "--ulimit",
                    "nproc=1024:1024",
                    "-t",
                    SECOND,
                    "-f",
                ])
                .arg(ctx.join("Containerfile.2"))
                .arg(&ctx),
        );
        let multi_archive = dir.join("multi.tar");
        sh_ok(
            podman(&dir)
                .args([
                    "save",
                    "--quiet",
                    "--multi-image-archive",
                    "--format",
                    "docker-archive",
                    "-o",
                ])
                .arg(&multi_archive)
                .args([NAME, SECOND]),
        );
        let docker_archive = dir.join("docker.tar");
        let oci_archive = dir.join("oci.tar");
        let oci_layout = dir.join("layout");
        for (format, out) in [
            ("docker-archive", &docker_archive),
            ("oci-archive", &oci_archive),
        ] {
            sh_ok(
                podman(&dir)
                    .args(["save", "--quiet", "--format", format, "-o"])
                    .arg(out)
                    .arg(NAME),
            );
        }
        sh_ok(Command::new("skopeo").args([
            "copy",
            "--quiet",
            &format!("oci-archive:{}", oci_archive.display()),
            &format!("oci:{}:v1", oci_layout.display()),
        ]));
        Built {
            docker_archive,
            oci_archive,
            oci_layout,
            multi_archive,
        }
    })
}

fn prerequisites() -> bool {
    ember_testkit::require::root() && ember_testkit::require::runc().is_some()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The first line of `ember image import --json`.
fn import_json(root: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["image", "import", "--json", "-q"];
    a.extend_from_slice(args);
    let out = ember_ok(root, &a);
    serde_json::from_str(out.lines().next().expect("a JSON line")).expect("import JSON")
}

/// Runs the image and checks it printed the greeting without pulling.
fn run_without_pull(root: &Path, image: &str) {
    let out = run_ember(root, &["run", "--rm", "--timings=json", image]);
    assert!(
        out.status.success(),
        "run {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{GREETING}\n")
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let t: serde_json::Value = stderr
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no timings in {stderr}"));
    assert_eq!(t["pulled"], false, "{t}");
    assert_eq!(t["pull_ms"].as_f64(), Some(0.0), "{t}");
    assert_eq!(t["unpack_ms"].as_f64(), Some(0.0), "{t}");
}

#[test]
fn imports_what_podman_builds_in_each_form_and_runs_it_without_a_pull() {
    if !prerequisites() {
        return;
    }
    let b = built();
    let tmp = tempfile::tempdir().expect("tempdir");

    // docker-archive: named by its RepoTags; the manifest is built here.
    let root = tmp.path().join("docker");
    let r = import_json(&root, &[path_str(&b.docker_archive)]);
    assert_eq!(r["format"], "docker-archive", "{r}");
    assert_eq!(r["names"][0], NAME, "{r}");
    assert_eq!(r["layers_imported"], 3, "{r}");
    run_without_pull(&root, NAME);
    // The same archive again: the same manifest, nothing unpacked twice.
    let again = import_json(&root, &[path_str(&b.docker_archive)]);
    assert_eq!(again["manifest"], r["manifest"]);
    assert_eq!(again["layers_imported"], 0, "{again}");
    assert_eq!(again["layers_present"], 3, "{again}");
    let docker_config = r["config"].clone();

    // oci-archive: named by its ref.name annotation; podman's manifest.
    let root = tmp.path().join("oci");
    let r = import_json(&root, &[path_str(&b.oci_archive)]);
    assert_eq!(r["format"], "oci-archive", "{r}");
    assert_eq!(r["names"][0], NAME, "{r}");
    // The config is kept byte for byte: the image id podman shows.
    assert_eq!(r["config"], docker_config);
    run_without_pull(&root, NAME);

    // OCI layout from skopeo: its ref.name is a bare tag, which names
    // nothing, so the import asks for --name.
    let root = tmp.path().join("layout");
    let out = run_ember(&root, &["image", "import", path_str(&b.oci_layout)]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--name"), "{err}");
    let r = import_json(
        &root,
        &[
            "--name",
            "localhost/from-layout:v2",
            path_str(&b.oci_layout),
        ],
    );
    assert_eq!(r["format"], "oci-layout", "{r}");
    assert_eq!(r["names"][0], "localhost/from-layout:v2", "{r}");
    run_without_pull(&root, "localhost/from-layout:v2");

    // Two images in one archive: refused without --name, naming both;
    // --name picks one of them.
    let root = tmp.path().join("multi");
    let out = run_ember(&root, &["image", "import", path_str(&b.multi_archive)]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 images")
            && err.contains(NAME)
            && err.contains(SECOND)
            && err.contains("--name"),
        "{err}"
    );
    assert!(
        !root.join("index.json").exists(),
        "a refused import wrote the index"
    );
    let r = import_json(&root, &["--name", SECOND, path_str(&b.multi_archive)]);
    assert_eq!(r["names"], serde_json::json!([SECOND]), "{r}");
    assert_eq!(r["layers"], 4, "{r}");
    let out = ember_ok(&root, &["run", "--rm", SECOND]);
    assert_eq!(out, format!("{SECOND_GREETING}\n"));
}

/// A tar whose one member is named `name` (any bytes, even `../x`, which
/// tar builders refuse to write).
fn raw_tar(name: &str, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// A docker-archive by hand whose one layer is `layer`.
fn docker_archive_of(dir: &Path, layer: &[u8]) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(layer)));
    std::fs::write(src.join("layer.tar"), layer).expect("layer");
    std::fs::write(
        src.join("config.json"),
        format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/x"]}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
        ),
    )
    .expect("config");
    std::fs::write(
        src.join("manifest.json"),
        r#"[{"Config":"config.json","RepoTags":["localhost/hostile:v1"],"Layers":["layer.tar"]}]"#,
    )
    .expect("manifest.json");
    let out = dir.join("hostile.tar");
    sh_ok(
        Command::new("tar")
            .arg("-cf")
            .arg(&out)
            .arg("-C")
            .arg(&src)
            .args(["manifest.json", "config.json", "layer.tar"]),
    );
    out
}

/// Everything an import could change: the index, blobs, layers, trees
/// and what is left in tmp/ (apart from this process's own lock).
fn store_state(root: &Path) -> String {
    let mut s = std::fs::read_to_string(root.join("index.json")).unwrap_or_default();
    for d in ["blobs/sha256", "layers", "trees", "tmp"] {
        let mut names: Vec<String> = std::fs::read_dir(root.join(d))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.ends_with("-lock"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        s.push_str(&format!("\n{d}: {names:?}"));
    }
    s
}

fn copy_dir(from: &Path, to: &Path) {
    sh_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

#[test]
fn hostile_or_broken_inputs_are_refused_and_leave_the_store_as_it_was() {
    if !prerequisites() {
        return;
    }
    let b = built();
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    // Something in the store already, so "unchanged" means something (an
    // image of its own: layers the store holds are not read again, as a
    // pull does not download them, so the hostile copies below must not
    // share the podman image's layers with it).
    let good = docker_archive_of(&tmp.path().join("good"), &raw_tar("ok", b"fine\n"));
    import_json(&root, &[path_str(&good)]);
    let before = store_state(&root);

    let refused = |path: &Path, extra: &[&str], expect: &str| {
        let mut args = vec!["image", "import"];
        args.extend_from_slice(extra);
        args.push(path_str(path));
        let out = run_ember(&root, &args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(125), "{path:?} was accepted: {err}");
        assert!(
            err.contains(expect),
            "{path:?}: expected {expect:?} in: {err}"
        );
        assert_eq!(store_state(&root), before, "{path:?} changed the store");
    };

    // A layer blob with one byte changed: its digest no longer matches.
    let layout = tmp.path().join("flipped");
    copy_dir(&b.oci_layout, &layout);
    let blobs = layout.join("blobs/sha256");
    let biggest = std::fs::read_dir(&blobs)
        .expect("blobs")
        .flatten()
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("a blob")
        .path();
    let mut bytes = std::fs::read(&biggest).expect("read blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&biggest, &bytes).expect("write blob");
    refused(&layout, &["--name", "localhost/x:1"], "digest mismatch");

    // The same layer blob missing.
    std::fs::remove_file(&biggest).expect("rm blob");
    refused(&layout, &["--name", "localhost/x:1"], "missing");

    // An archive cut short in the middle of a layer.
    let cut = tmp.path().join("cut.tar");
    let whole = std::fs::read(&b.oci_archive).expect("read archive");
    std::fs::write(&cut, &whole[..whole.len() * 2 / 3]).expect("write cut");
    let out = run_ember(&root, &["image", "import", path_str(&cut)]);
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(
        store_state(&root),
        before,
        "a cut archive changed the store"
    );

    // A layer that climbs out with `../`: refused by the pull's rules.
    let dir = tmp.path().join("climb");
    let hostile = docker_archive_of(&dir, &raw_tar("../evil", b"gotcha\n"));
    refused(&hostile, &[], "..");
    assert!(!root.join("evil").exists() && !root.join("layers/../evil").exists());

    // A layer whose content is not what the config's diff_id says.
    let dir = tmp.path().join("swapped");
    let archive = docker_archive_of(&dir, &raw_tar("other", b"other\n"));
    let mut raw = std::fs::read(&archive).expect("read");
    let at = raw
        .windows(6)
        .position(|w| w == b"other\n")
        .expect("layer data");
    raw[at] = b'F';
    std::fs::write(&archive, &raw).expect("write");
    refused(&archive, &[], "digest mismatch");

    // Not an image at all, and a compressed archive.
    let junk = tmp.path().join("junk.tar");
    std::fs::write(&junk, raw_tar("hello", b"hi")).expect("junk");
    refused(&junk, &[], "neither an OCI image layout");
    let gz = tmp.path().join("oci.tar.gz");
    sh_ok(Command::new("sh").arg("-c").arg(format!(
        "gzip -c {} > {}",
        b.oci_archive.display(),
        gz.display()
    )));
    refused(&gz, &[], "decompress it first");
}

#[test]
fn push_goes_to_a_real_registry_and_pulls_back_the_same_digest() {
    if !prerequisites() {
        return;
    }
    let b = built();
    let registry = ember_testkit::registry::Registry::start().expect("registry");
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("builder");
    let target = format!("{}/imported/app:v1", registry.addr());
    let out = ember_ok(
        &root,
        &[
            "image",
            "import",
            "--json",
            "-q",
            "--push",
            &target,
            path_str(&b.docker_archive),
        ],
    );
    let mut lines = out.lines();
    let imported: serde_json::Value =
        serde_json::from_str(lines.next().expect("import line")).expect("json");
    let pushed: serde_json::Value =
        serde_json::from_str(lines.next().expect("push line")).expect("json");
    let report = &pushed["push"]["report"];
    assert_eq!(report["blobs_pushed"], 4, "{pushed}"); // 3 layers + config
    assert_eq!(report["manifest"], imported["manifest"], "{pushed}");

    // Another node pulls it: the same manifest, and it runs.
    let other = tmp.path().join("other");
    let digest = ember_ok(&other, &["pull", "-q", &target]);
    assert_eq!(
        digest.trim(),
        imported["manifest"].as_str().expect("digest")
    );
    let ran = ember_ok(&other, &["run", "--rm", &target]);
    assert_eq!(ran, format!("{GREETING}\n"));
    // skopeo agrees about what the registry holds.
    let inspect = sh_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{target}"),
    ]));
    let inspect: serde_json::Value = serde_json::from_str(&inspect).expect("skopeo json");
    assert_eq!(inspect["Digest"], imported["manifest"], "{inspect}");

    // Pushing again sends no blob twice (HEAD first); a tag from the name.
    let out = ember_ok(
        &root,
        &[
            "image",
            "import",
            "--json",
            "-q",
            "--push",
            &format!("{}/imported/app", registry.addr()),
            path_str(&b.oci_archive),
        ],
    );
    let pushed: serde_json::Value =
        serde_json::from_str(out.lines().nth(1).expect("push line")).expect("json");
    assert_eq!(
        pushed["push"]["target"],
        format!("{}/imported/app:v1", registry.addr())
    );
    // podman's OCI manifest has its own (gzip) layer blobs, so only the
    // config (the same bytes) is already there.
    assert_eq!(pushed["push"]["report"]["blobs_skipped"], 1, "{pushed}");

    // A push that cannot happen: the image is imported all the same, the
    // exit status says the push failed.
    let root = tmp.path().join("nopush");
    let out = run_ember(
        &root,
        &[
            "image",
            "import",
            "-q",
            "--push",
            "127.0.0.1:1/nowhere/app:v1",
            path_str(&b.docker_archive),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pushing to 127.0.0.1:1/nowhere/app:v1 failed"),
        "{err}"
    );
    run_without_pull(&root, NAME);
}

/// Whether the control plane's view of node `id` lists image `digest`.
fn node_lists(url: &str, id: &str, digest: &str) -> bool {
    let nodes: serde_json::Value =
        serde_json::from_str(&common::cluster::client_ok(url, &["nodes", "--json"]))
            .expect("nodes JSON");
    nodes.as_array().into_iter().flatten().any(|n| {
        let spec = n.get("spec").unwrap_or(n);
        spec["id"] == id && spec["inventory"]["images"].get(digest).is_some()
    })
}

#[test]
fn an_import_on_a_node_is_reported_at_once_and_its_next_run_lands_there_without_a_pull() {
    use common::cluster::*;
    use std::time::{Duration, Instant};
    if !prerequisites() {
        return;
    }
    let Some(agent) = static_agent() else {
        eprintln!("skipped: the static ember-agent could not be built");
        return;
    };
    let b = built();
    let tmp = tempfile::tempdir().expect("tempdir");
    // Heartbeats far apart (and a control plane that waits for them), so
    // only the node's watch on its store index can report the import in
    // time; ties between equal nodes go to the lower id, "a".
    let (_control, url) = start_control(
        &tmp.path().join("control"),
        &tmp.path().join("control.db").to_string_lossy(),
        &["--heartbeat-timeout", "900"],
    );
    let (a_root, b_root) = (tmp.path().join("a"), tmp.path().join("b"));
    let slow = ["--heartbeat", "600"];
    let _a = start_node(&a_root, &url, "a", 2, &agent, &slow);
    let _b = start_node(&b_root, &url, "b", 2, &agent, &slow);

    // Imported into B's store while B runs.
    let r = import_json(&b_root, &[path_str(&b.docker_archive)]);
    let digest = r["manifest"].as_str().expect("digest").to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node_lists(&url, "b", &digest) {
        assert!(
            Instant::now() < deadline,
            "node b did not report the imported image"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!node_lists(&url, "a", &digest));

    // The image is in no registry: the run can only succeed where it was
    // imported, with nothing pulled.
    let image = format!("{NAME}@{digest}");
    let launch = || {
        let sub: serde_json::Value = serde_json::from_str(&client_ok(
            &url,
            &["submit", "--json", &image, "--", "cat", "/hello"],
        ))
        .expect("submit JSON");
        let id = sub["id"]
            .as_u64()
            .or_else(|| sub["run"]["id"].as_u64())
            .expect("run id")
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(180);
        let run = loop {
            let run = run_json(&url, &id);
            if matches!(
                run["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled" | "lost")
            ) {
                break run;
            }
            assert!(Instant::now() < deadline, "run {id} never finished: {run}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(run["state"], "succeeded", "{run}");
        assert_eq!(run["node"], "b", "{run}");
        let logs = client_ok(&url, &["logs", &id]);
        assert!(logs.contains(GREETING), "{logs}");
        let t = &run["times"];
        let (ready, sched) = t["image_ready"]
            .as_u64()
            .zip(t["scheduled"].as_u64())
            .unwrap_or_else(|| panic!("no image phase recorded: {run}"));
        ready.saturating_sub(sched)
    };
    // Printed, not asserted (no timing assertions): the first run's image
    // phase is the assignment's and the report's trip, as for a run of an
    // image the node has run before (the second).
    let first = launch();
    let second = launch();
    eprintln!("image phase: first run after the import {first} ms, second run {second} ms");
}
