//! Where a run's state changes: what every [`StateStore`](crate::StateStore)
//! does inside its transactions, apart from SQL — resolving a submit into
//! a run, moving it along the state machine
//! ([`model::check_transition`](crate::model::check_transition)), applying
//! a node's report, handing it to a warm runner, declaring it lost. Each
//! backend reads the rows, calls these, and writes the result back, so
//! SQLite and PostgreSQL cannot drift apart in behaviour.

use crate::model::{
    Deployment, LogChunk, LogStream, Millis, ModelError, NodeReport, Run, RunId, RunSnapshot,
    RunSpec, RunState, StartTimes,
};
use crate::store::{Appended, LogRetention, StoreError};

/// How far a write must have reached the disk before it is acknowledged.
///
/// What a user was told is stored — a submit, a cancel, a deployment — is
/// `Synced`. The run's progress through the machinery (claims, placement,
/// node reports, heartbeats, output) is `Relaxed`: it survives a crash of
/// the control-plane process, and an OS crash or power cut loses at most
/// the last moments of it, which nodes re-report when they reconnect (a run
/// assigned in those moments may be dispatched again: at-least-once). That
/// takes several fsyncs off every run's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Commit {
    /// On disk before the call returns.
    Synced,
    /// Ordered and crash-consistent, flushed shortly after.
    Relaxed,
}

/// `run.apply`, with the error a store returns.
pub(crate) fn apply(run: &mut Run, to: RunState, now: Millis) -> Result<(), StoreError> {
    run.apply(to, now).map_err(|source| StoreError::Transition {
        run: run.id,
        source,
    })
}

/// Resolves a submitted spec into a run (id 0 until the store assigns
/// one): copies the deployment's fields in, so later changes to the
/// deployment don't alter runs already queued. `deployment` is the one
/// `spec.deployment` names, as the caller loaded it in its transaction.
pub(crate) fn resolve(
    spec: &RunSpec,
    deployment: Option<Deployment>,
    now: Millis,
) -> Result<Run, StoreError> {
    let mut snapshot = false;
    let (
        deployment,
        image,
        mut command,
        mut env,
        resources,
        recycle_key,
        readonly,
        mut selector,
        caches,
    ) = match (&spec.deployment, &spec.image) {
        (Some(name), None) => {
            let d = deployment.ok_or_else(|| StoreError::DeploymentNotFound(name.clone()))?;
            let s = d.spec;
            snapshot = s.snapshot;
            (
                Some(s.name),
                s.image,
                s.command,
                s.env,
                s.resources,
                s.recycle_key,
                s.readonly_rootfs,
                s.node_selector,
                s.caches,
            )
        }
        (None, Some(image)) => {
            image.validate()?;
            (
                None,
                image.clone(),
                Vec::new(),
                Default::default(),
                Default::default(),
                None,
                false,
                Default::default(),
                Vec::new(),
            )
        }
        _ => return Err(ModelError::RunTarget.into()),
    };
    // The run's own are checked here (a deployment's were when it was
    // deployed), and the merged list again: together they may be too
    // many.
    crate::cachedecl::validate_caches(&spec.caches).map_err(ModelError::from)?;
    let caches = crate::cachedecl::merge_caches(caches, &spec.caches);
    crate::cachedecl::validate_caches(&caches).map_err(ModelError::from)?;
    // A snapshot deployment's command and env are its start-up's, which
    // its checkpoint is keyed by; the run's own go to the start-up
    // through `Resume`.
    let run_snapshot = snapshot.then(|| RunSnapshot {
        argv: spec.command.clone(),
        env: spec.env.clone(),
    });
    if run_snapshot.is_none() {
        if !spec.command.is_empty() {
            command = spec.command.clone();
        }
        env.extend(spec.env.clone());
    }
    selector.extend(spec.node_selector.clone());
    Ok(Run {
        id: RunId(0),
        deployment,
        image,
        command,
        env,
        resources,
        recycle_key: spec.recycle_key.clone().or(recycle_key),
        readonly_rootfs: readonly || spec.readonly_rootfs,
        node_selector: selector,
        timeout_ms: spec.timeout_ms,
        idempotency_key: spec.idempotency_key.clone(),
        attempts: 0,
        max_attempts: spec.max_attempts.max(1),
        state: RunState::Queued,
        node: None,
        exit_code: None,
        error: None,
        submitted_at: now,
        times: StartTimes {
            queued: Some(now),
            ..StartTimes::default()
        },
        caches,
        cache_notes: Vec::new(),
        snapshot: run_snapshot,
    })
}

/// Warm hand-off: `run` (queued, unclaimed) goes to `node` at once; the
/// hand-off is its claim, so placement takes no time.
pub(crate) fn hand_off(run: &mut Run, node: &str, now: Millis) -> Result<(), StoreError> {
    run.times.claimed = Some(now);
    apply(run, RunState::Scheduled, now)?;
    run.node = Some(node.to_owned());
    Ok(())
}

/// Whether `node` may report on (or post output of) `run`: it must be
/// active there. Late reports from a node declared lost fail here.
pub(crate) fn check_assigned(run: &Run, node: &str) -> Result<(), StoreError> {
    if run.node.as_deref() != Some(node) || !run.state.is_active() {
        return Err(StoreError::NotAssigned {
            run: run.id,
            node: node.to_owned(),
        });
    }
    Ok(())
}

/// Applies a node's report to a run, if it is `node`'s and active.
pub(crate) fn apply_report(
    run: &mut Run,
    node: &str,
    report: &NodeReport,
    now: Millis,
) -> Result<(), StoreError> {
    check_assigned(run, node)?;
    // Progress events imply acceptance: a node that reports its image ready
    // has clearly taken the run, even if `Accepted` got lost.
    let accept = |run: &mut Run| -> Result<(), StoreError> {
        if run.state == RunState::Scheduled {
            apply(run, RunState::Starting, now)?;
        }
        Ok(())
    };
    match report {
        NodeReport::Accepted => apply(run, RunState::Starting, now)?,
        NodeReport::ImageReady => {
            accept(run)?;
            run.times.image_ready = Some(now);
        }
        NodeReport::RunnerReady => {
            accept(run)?;
            run.times.runner_ready = Some(now);
        }
        NodeReport::CachesRestored { notes } => {
            accept(run)?;
            run.times.caches_restored = Some(now);
            run.cache_notes = notes.clone();
        }
        NodeReport::Snapshot { restored, note } => {
            accept(run)?;
            if *restored {
                run.times.snapshot_restored = Some(now);
            }
            run.times.snapshot_note = note.clone();
        }
        NodeReport::Started => {
            accept(run)?;
            apply(run, RunState::Running, now)?;
        }
        NodeReport::Exited { code, .. } => {
            let to = if *code == 0 {
                RunState::Succeeded
            } else {
                RunState::Failed
            };
            apply(run, to, now)?;
            run.exit_code = Some(*code);
        }
        NodeReport::Failed { error } => {
            apply(run, RunState::Failed, now)?;
            run.error = Some(error.clone());
        }
        NodeReport::Lost { error } => {
            apply(run, RunState::Lost, now)?;
            run.error = Some(error.clone());
            // Retried at once, in the same transaction: a node that comes
            // back within a second of a crash must not leave its runs lost
            // (nothing else re-queues a run that is already lost), and a
            // run with no attempts left stays lost with the reason.
            retry_if_attempts_left(run, now)?;
        }
    }
    Ok(())
}

/// `lost → queued` when the run has attempts left; nothing otherwise.
pub(crate) fn retry_if_attempts_left(run: &mut Run, now: Millis) -> Result<(), StoreError> {
    if run.state == RunState::Lost && run.attempts < run.max_attempts.max(1) {
        apply(run, RunState::Queued, now)?;
    }
    Ok(())
}

/// Applies a node's reports on `run` in order, each all or nothing: the
/// first refused one ends the list and what came before it stands. Returns
/// whether `run` changed (and so must be saved), and the refusal if any.
///
/// `ages_ms[i]` dates report `i` that long before `now` (see
/// [`RunReports::ages_ms`](crate::RunReports::ages_ms)), but never before
/// the run's latest recorded time nor before the report ahead of it.
pub(crate) fn apply_reports(
    run: &mut Run,
    node: &str,
    batch: &crate::store::RunReports,
    now: Millis,
) -> (bool, Result<(), StoreError>) {
    let (reports, ages_ms) = (&batch.reports, &batch.ages_ms);
    if reports.is_empty() {
        return (false, Err(ModelError::Empty { what: "reports" }.into()));
    }
    // Fencing: a report of an earlier attempt (lost, then retried) is
    // stale whatever node it comes from.
    if batch.attempt.is_some_and(|a| a != run.attempts) {
        return (
            false,
            Err(StoreError::NotAssigned {
                run: run.id,
                node: node.to_owned(),
            }),
        );
    }
    let t = &run.times;
    let mut floor = [
        t.queued,
        t.claimed,
        t.scheduled,
        t.image_ready,
        t.snapshot_restored,
        t.runner_ready,
        t.caches_restored,
        t.process_started,
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0)
    .min(now);
    for (i, report) in reports.iter().enumerate() {
        let age = ages_ms.get(i).copied().unwrap_or(0);
        let at = now.saturating_sub(age).max(floor);
        floor = at;
        // A report that fails half-way (accepted, then refused to run)
        // must leave no trace, as its own transaction would.
        let mut next = run.clone();
        if let Err(e) = apply_report(&mut next, node, report, at) {
            return (i > 0, Err(e));
        }
        *run = next;
    }
    (true, Ok(()))
}

/// An active run on a node that stopped heartbeating becomes `lost`.
pub(crate) fn mark_lost(run: &mut Run, now: Millis) -> Result<(), StoreError> {
    apply(run, RunState::Lost, now)?;
    run.error = Some(format!(
        "node {:?} stopped heartbeating",
        run.node.as_deref().unwrap_or_default()
    ));
    Ok(())
}

/// Compare-and-set check of [`StateStore::transition_run`](crate::StateStore::transition_run).
pub(crate) fn expect_state(run: &Run, expected: RunState) -> Result<(), StoreError> {
    if run.state != expected {
        return Err(StoreError::Conflict {
            run: run.id,
            expected,
            actual: run.state,
        });
    }
    Ok(())
}

/// A stored log row as a chunk.
pub(crate) fn log_chunk(seq: i64, stream: &str, data: Vec<u8>) -> Result<LogChunk, StoreError> {
    let marker = stream == MARKER_STREAM;
    let stream = if marker {
        LogStream::Stderr
    } else {
        LogStream::from_name(stream)
            .ok_or_else(|| StoreError::Backend(format!("unknown log stream {stream:?}").into()))?
    };
    Ok(LogChunk {
        seq: u64::try_from(seq).unwrap_or(0),
        stream,
        data,
        marker,
    })
}

/// A credential must name a node and carry a SHA-256 in lower-case hex.
pub(crate) fn check_credential(node: &str, token_sha256: &str) -> Result<(), StoreError> {
    if node.is_empty() {
        return Err(ModelError::Empty { what: "node id" }.into());
    }
    if token_sha256.len() != 64
        || !token_sha256
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(ModelError::CredentialHash.into());
    }
    Ok(())
}

/// The `stream` column value of a notice the control plane wrote itself
/// ([`LogChunk::marker`]); read back as stderr.
pub(crate) const MARKER_STREAM: &str = "marker";

/// The notice appended once when a run's output reaches `max_bytes`.
pub(crate) fn truncation_notice(max_bytes: u64) -> Vec<u8> {
    format!(
        "\n[ember: output truncated: this run's log reached the control plane's limit of \
         {max_bytes} bytes; later output was dropped]\n"
    )
    .into_bytes()
}

/// The notice left in place of a pruned run's log.
pub(crate) const PRUNED_NOTICE: &[u8] =
    b"[ember: this run's log was pruned (older than the retention period, or over the log budget)]\n";

/// What to store of one append of `len` bytes to a run whose log holds
/// `stored` bytes (`truncated`: the limit was reached before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AppendPlan {
    /// Bytes of the append to keep (a prefix).
    pub keep: usize,
    /// Write the truncation notice after them.
    pub notice: bool,
    /// What the caller is told.
    pub outcome: Appended,
}

/// Decides [`AppendPlan`]: everything fits, a prefix fits (then the notice
/// follows, once), or the limit was reached before (nothing is kept).
pub(crate) fn plan_append(stored: u64, truncated: bool, len: usize, max_bytes: u64) -> AppendPlan {
    if truncated || stored >= max_bytes {
        return AppendPlan {
            keep: 0,
            notice: !truncated,
            outcome: if truncated {
                Appended::Dropped
            } else {
                Appended::Truncated
            },
        };
    }
    let room = max_bytes - stored;
    let len64 = u64::try_from(len).unwrap_or(u64::MAX);
    if len64 <= room {
        AppendPlan {
            keep: len,
            notice: false,
            outcome: Appended::Stored,
        }
    } else {
        AppendPlan {
            // room < len, so it fits in usize.
            keep: usize::try_from(room).unwrap_or(len),
            notice: true,
            outcome: Appended::Truncated,
        }
    }
}

/// Which logs to prune: `candidates` are `(run, bytes, last_append)` of
/// the prunable logs (final runs, not pruned yet), least recently appended
/// first; `total` is the bytes of every run's log. Returns `(run, bytes)`:
/// every candidate older than the age limit, then more, oldest first,
/// until the total is within the budget.
pub(crate) fn prune_victims(
    candidates: &[(i64, u64, Millis)],
    total: u64,
    retention: &LogRetention,
    now: Millis,
) -> Vec<(i64, u64)> {
    let cutoff = retention.max_age_ms.map(|age| now.saturating_sub(age));
    let mut left = total;
    let mut out = Vec::new();
    for &(id, bytes, at) in candidates {
        let too_old = cutoff.is_some_and(|c| at < c);
        let over = retention.max_total_bytes.is_some_and(|max| left > max);
        if !too_old && !over {
            break;
        }
        left = left.saturating_sub(bytes);
        out.push((id, bytes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_keep_what_fits_then_one_notice_then_nothing() {
        let fits = plan_append(0, false, 10, 100);
        assert_eq!(
            (fits.keep, fits.notice, fits.outcome),
            (10, false, Appended::Stored)
        );
        let exact = plan_append(90, false, 10, 100);
        assert_eq!((exact.keep, exact.notice), (10, false));
        let cut = plan_append(95, false, 10, 100);
        assert_eq!(
            (cut.keep, cut.notice, cut.outcome),
            (5, true, Appended::Truncated)
        );
        // Full to the byte but the notice not written yet: it is written now.
        let full = plan_append(100, false, 1, 100);
        assert_eq!(
            (full.keep, full.notice, full.outcome),
            (0, true, Appended::Truncated)
        );
        let after = plan_append(100, true, 1, 100);
        assert_eq!(
            (after.keep, after.notice, after.outcome),
            (0, false, Appended::Dropped)
        );
    }

    use crate::model::{DeploymentSpec, PinnedImage};

    fn image() -> PinnedImage {
        PinnedImage::new("app", format!("sha256:{}", "a".repeat(64))).expect("pin")
    }

    #[test]
    fn resolve_carries_the_recycling_key_and_read_only_root() {
        let plain = resolve(
            &RunSpec {
                image: Some(image()),
                ..RunSpec::default()
            },
            None,
            1,
        )
        .expect("plain");
        assert!(!plain.recyclable() && !plain.readonly_rootfs);

        let keyed = resolve(
            &RunSpec {
                image: Some(image()),
                recycle_key: Some("ci".into()),
                readonly_rootfs: true,
                ..RunSpec::default()
            },
            None,
            1,
        )
        .expect("keyed");
        assert_eq!(
            (keyed.recycle_key.as_deref(), keyed.readonly_rootfs),
            (Some("ci"), true)
        );

        let d = Deployment {
            spec: DeploymentSpec {
                caches: Vec::new(),
                name: "web".into(),
                image: image(),
                command: vec![],
                env: Default::default(),
                resources: Default::default(),
                recycle_key: Some("shared".into()),
                readonly_rootfs: true,
                warm_runners: 0,
                node_selector: Default::default(),
                snapshot: false,
            },
            created_at: 0,
        };
        let from_d = |spec: RunSpec| resolve(&spec, Some(d.clone()), 1).expect("deployment run");
        let r = from_d(RunSpec {
            deployment: Some("web".into()),
            ..RunSpec::default()
        });
        assert_eq!(
            (r.recycle_key.as_deref(), r.readonly_rootfs),
            (Some("shared"), true)
        );
        assert_eq!(r.warm_key(), d.spec.warm_key());
        // The run's own key overrides the deployment's.
        let r = from_d(RunSpec {
            deployment: Some("web".into()),
            recycle_key: Some("mine".into()),
            ..RunSpec::default()
        });
        assert_eq!(r.recycle_key.as_deref(), Some("mine"));
    }

    #[test]
    fn a_snapshot_deployments_run_keeps_the_start_up_and_resumes_with_its_own_args() {
        let d = Deployment {
            spec: DeploymentSpec {
                caches: Vec::new(),
                name: "slow".into(),
                image: image(),
                command: vec!["/start-up".into()],
                env: [("MODE".to_owned(), "warm".to_owned())].into(),
                resources: Default::default(),
                recycle_key: None,
                readonly_rootfs: false,
                warm_runners: 0,
                node_selector: Default::default(),
                snapshot: true,
            },
            created_at: 0,
        };
        let r = resolve(
            &RunSpec {
                deployment: Some("slow".into()),
                command: vec!["hello".into()],
                env: [("MODE".to_owned(), "run".to_owned())].into(),
                ..RunSpec::default()
            },
            Some(d.clone()),
            1,
        )
        .expect("run");
        // The start-up (what the checkpoint is keyed by) is the
        // deployment's; the run's command and env go to Resume.
        assert_eq!(r.command, vec!["/start-up".to_owned()]);
        assert_eq!(r.env["MODE"], "warm");
        let snap = r.snapshot.clone().expect("a snapshot run");
        assert_eq!(snap.argv, vec!["hello".to_owned()]);
        assert_eq!(snap.env["MODE"], "run");
        // So runs with other arguments restore the same checkpoint.
        let other = resolve(
            &RunSpec {
                deployment: Some("slow".into()),
                command: vec!["bye".into()],
                ..RunSpec::default()
            },
            Some(d.clone()),
            1,
        )
        .expect("run");
        assert_eq!(r.snapshot_key(), other.snapshot_key());
        let key = r.snapshot_key().expect("a key");
        assert!(key.starts_with("d.slow."), "{key}");
        assert_eq!(crate::model::snapshot_key_deployment(&key), Some("slow"));
        // A new start-up command or image makes a new checkpoint.
        let mut changed = d.clone();
        changed.spec.command = vec!["/start-up".into(), "--more".into()];
        let r2 = resolve(
            &RunSpec {
                deployment: Some("slow".into()),
                ..RunSpec::default()
            },
            Some(changed),
            1,
        )
        .expect("run");
        assert_ne!(r2.snapshot_key(), r.snapshot_key());
        let mut moved = r.clone();
        moved.image.digest = format!("sha256:{}", "b".repeat(64));
        assert_ne!(moved.snapshot_key(), r.snapshot_key());
        // Other runs have no checkpoint.
        let mut plain = d;
        plain.spec.snapshot = false;
        let r3 = resolve(
            &RunSpec {
                deployment: Some("slow".into()),
                command: vec!["hello".into()],
                ..RunSpec::default()
            },
            Some(plain),
            1,
        )
        .expect("run");
        assert_eq!(
            (r3.snapshot_key(), r3.command),
            (None, vec!["hello".to_owned()])
        );
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use crate::model::{CacheDecl, DeploymentSpec, PinnedImage};

    fn image() -> PinnedImage {
        PinnedImage::new("app", format!("sha256:{}", "a".repeat(64))).expect("pin")
    }

    fn deployment(caches: Vec<CacheDecl>) -> Deployment {
        Deployment {
            spec: DeploymentSpec {
                snapshot: false,
                name: "web".into(),
                image: image(),
                command: vec![],
                env: Default::default(),
                resources: Default::default(),
                recycle_key: None,
                readonly_rootfs: false,
                warm_runners: 0,
                node_selector: Default::default(),
                caches,
            },
            created_at: 0,
        }
    }

    #[test]
    fn a_run_takes_its_deployments_caches_with_its_own_merged_over() {
        let d = deployment(vec![
            CacheDecl::new("/root/.cache/pip", "pip-{{ hash \"req.txt\" }}"),
            CacheDecl::new("/root/.npm", "npm"),
        ]);
        let spec = RunSpec {
            deployment: Some("web".into()),
            caches: vec![CacheDecl::new("/root/.npm", "npm-mine")],
            ..RunSpec::default()
        };
        let run = resolve(&spec, Some(d), 1).expect("resolve");
        let keys: Vec<_> = run.caches.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, vec!["pip-{{ hash \"req.txt\" }}", "npm-mine"]);
    }

    #[test]
    fn bad_declarations_are_refused_as_invalid_input() {
        for bad in [
            CacheDecl::new("relative/dir", "k"),
            CacheDecl::new("/a/../b", "k"),
            CacheDecl::new("/c", "k-{{ hash \"f\""),
            CacheDecl::new("/c", "x".repeat(600)),
        ] {
            let spec = RunSpec {
                image: Some(image()),
                caches: vec![bad.clone()],
                ..RunSpec::default()
            };
            let e = resolve(&spec, None, 1).expect_err("refused");
            assert!(matches!(e, StoreError::Invalid(_)), "{bad:?}: {e}");
        }
        // The merged list is checked too: a run's caches with its
        // deployment's may be too many.
        let d = deployment(
            (0..10)
                .map(|i| CacheDecl::new(format!("/d{i}"), "k"))
                .collect(),
        );
        let spec = RunSpec {
            deployment: Some("web".into()),
            caches: (0..10)
                .map(|i| CacheDecl::new(format!("/r{i}"), "k"))
                .collect(),
            ..RunSpec::default()
        };
        assert!(matches!(
            resolve(&spec, Some(d), 1),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn caches_restored_stamps_its_time_and_keeps_the_notes() {
        let spec = RunSpec {
            image: Some(image()),
            caches: vec![CacheDecl::new("/c", "k")],
            ..RunSpec::default()
        };
        let mut run = resolve(&spec, None, 1).expect("resolve");
        run.apply(RunState::Scheduled, 2).expect("schedule");
        run.node = Some("n1".into());
        apply_report(&mut run, "n1", &NodeReport::RunnerReady, 3).expect("runner");
        let notes = vec!["cache /c: no entry".to_owned()];
        apply_report(
            &mut run,
            "n1",
            &NodeReport::CachesRestored {
                notes: notes.clone(),
            },
            5,
        )
        .expect("caches");
        assert_eq!(
            (run.times.caches_restored, &run.cache_notes),
            (Some(5), &notes)
        );
        // A retry starts without the lost attempt's notes.
        run.apply(RunState::Lost, 6).expect("lose");
        run.max_attempts = 2;
        run.apply(RunState::Queued, 7).expect("retry");
        assert!(run.cache_notes.is_empty() && run.times.caches_restored.is_none());
    }
}
