//! The OpenAPI document against the real `ember control`: schemathesis (a
//! property-based API fuzzer; `scripts/install-schemathesis.sh` puts a
//! pinned version in `/opt/ember-venv`) generates requests from
//! `crates/ember-controld/openapi.json`, valid and invalid ones, and
//! checks every answer: no 5xx, documented status codes, content types and
//! bodies, valid requests accepted and invalid ones refused.
//!
//! Fuzzed: every operation, the client API (runs, deployments and their
//! deletion, the node list, node credentials) and the node agent's
//! (registration, run events one by one and in batches, log appends),
//! with the node token.
//! Left out: `follow=true` log reads and the node work stream
//! (`GET /v1/nodes/{id}/work`), which stay open by design, so a fuzzer
//! waiting for their end would wait for ever (they are tested in
//! `control_cli.rs`, `node_faults_cli.rs` and the API tests).

mod common;

use common::cluster::*;
use std::path::PathBuf;
use std::process::Command;

/// Where schemathesis is: `$EMBER_SCHEMATHESIS`, else the venv the
/// install script makes.
fn schemathesis() -> PathBuf {
    std::env::var_os("EMBER_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/ember-venv/bin/schemathesis"))
}

#[test]
fn the_document_and_the_server_agree_under_a_fuzzer() {
    let st = schemathesis();
    assert!(
        st.exists(),
        "{} is missing: run scripts/install-schemathesis.sh (scripts/install-deps.sh does)",
        st.display()
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("crates/ember-controld/openapi.json")).expect("openapi.json"),
    )
    .expect("JSON");
    // The same document without the long-lived streams: a followed log of
    // a queued run (no node here) never ends, nor does a work stream.
    let mut fuzzed = doc.clone();
    let logs = &mut fuzzed["paths"]["/v1/runs/{id}/logs"]["get"]["parameters"];
    let kept: Vec<serde_json::Value> = logs
        .as_array()
        .expect("parameters")
        .iter()
        .filter(|p| p["name"] != "follow")
        .cloned()
        .collect();
    *logs = serde_json::Value::Array(kept);

    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = tmp.path().join("openapi.json");
    std::fs::write(&spec, serde_json::to_vec(&fuzzed).expect("JSON")).expect("write");
    let db = tmp.path().join("control.db").to_string_lossy().into_owned();
    // One token for both schemes: the fuzzer sends one header, the client
    // token on client endpoints and the shared node token on node ones.
    let (mut control, url) = {
        let (p, line) = start(
            tmp.path(),
            &[
                "control",
                "--listen",
                "127.0.0.1:0",
                "--db",
                &db,
                "--client-token",
                "fuzz",
                "--node-token",
                "fuzz",
            ],
        );
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_owned();
        (p, url)
    };
    // A fixed seed by default, so a failure reproduces; EMBER_FUZZ_SEED
    // and EMBER_FUZZ_EXAMPLES explore further.
    let seed = std::env::var("EMBER_FUZZ_SEED").unwrap_or_else(|_| "20261202".into());
    let examples = std::env::var("EMBER_FUZZ_EXAMPLES").unwrap_or_else(|_| "60".into());
    // A body over the size limit is refused with 413 (documented), which
    // is a refusal like any 4xx: the check that invalid data is refused
    // takes it too (schemathesis' default list lacks it, and a batch over
    // `maxItems` is that large).
    let config = tmp.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[checks.negative_data_rejection]\nexpected-statuses = \
         [\"400\", \"401\", \"403\", \"404\", \"405\", \"406\", \"409\", \"413\", \
         \"415\", \"422\", \"428\", \"429\"]\n",
    )
    .expect("write");
    let out = Command::new(&st)
        .current_dir(tmp.path())
        .args(["--config-file", &config.to_string_lossy()])
        .env("NO_COLOR", "1")
        .args(["run", &spec.to_string_lossy(), "--url", &url])
        .args(["-H", "Authorization: Bearer fuzz"])
        .args(["--include-path-regex", "^/(v1/|metrics$)"])
        // The work stream never ends (see above).
        .args(["--exclude-path", "/v1/nodes/{id}/work"])
        .args(["--checks", "all"])
        .args(["--max-examples", &examples, "--seed", &seed])
        .args(["--request-timeout", "20", "--workers", "1", "--no-color"])
        // One worker: hypothesis describing strategies from two threads
        // at once hit a Python AST error (a fuzzer fault, not a finding).
        .args(["--generation-database", "none"])
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect();
    eprintln!("{}", summary.join("\n"));
    assert!(
        out.status.success(),
        "schemathesis found disagreements (seed {seed}):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Tested: 17") && stdout.contains(" generated, "),
        "the fuzzer did not test every operation but the work stream:\n{stdout}"
    );
    // Nothing the fuzzer sent took the server down.
    assert!(
        matches!(control.0.try_wait(), Ok(None)),
        "ember control exited under the fuzzer"
    );
    control.stop();
}
