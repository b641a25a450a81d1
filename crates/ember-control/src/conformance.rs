//! The [`StateStore`] conformance suite (feature `testing`).
//!
//! Every implementation runs the same functions, so SQLite and PostgreSQL
//! are held to one contract. An implementation provides a [`Harness`] —
//! one fresh, empty database that can be opened any number of times, each
//! open being a new connection, like another control-plane replica or a
//! restart — and expands [`state_store_conformance!`](crate::state_store_conformance)
//! in a test file:
//!
//! ```ignore
//! ember_control::state_store_conformance!(SqliteHarness::new());
//! ```
//!
//! Tests use a [`ManualClock`]: nothing here depends on wall-clock time.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::model::{
    DeploymentSpec, LogStream, NodeReport, NodeSpec, PinnedImage, RunId, RunSpec, RunState,
    TransitionError,
};
use crate::store::{
    Appended, ClaimRequest, Clock, LogRetention, ManualClock, RunFilter, StateStore, StoreError,
};

/// One fresh database for one test.
pub trait Harness: Sync {
    /// Opens a new connection to this harness's database, using `clock`.
    /// Called several times per test: from several threads at once, and
    /// again after dropping earlier connections (a restart).
    fn open(&self, clock: Arc<dyn Clock>) -> Box<dyn StateStore>;
}

/// Expands to one `#[test]` per conformance function, each with a fresh
/// harness from `$make`.
#[macro_export]
macro_rules! state_store_conformance {
    ($make:expr) => {
        $crate::state_store_conformance!(@tests $make;
            deployments,
            idempotent_submit,
            invalid_submit_writes_nothing,
            cas_conflict,
            illegal_transitions_rejected,
            fair_claim_across_deployments,
            claims_follow_one_fairness_definition,
            claim_leases,
            concurrent_claimers_never_share_a_run,
            node_reports_and_start_times,
            lost_nodes_and_retries,
            runs_a_node_lost_are_retried_at_once,
            stale_attempts_are_fenced,
            late_reports_rejected,
            warm_handoff,
            list_filters,
            restart_durability,
            logs,
            batch_submit,
            batch_reports,
            batch_handoff,
            list_pages,
            log_limit,
            log_pruning,
            node_credentials
        );
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let harness = $make;
                $crate::conformance::$name(&harness);
            }
        )*
    };
}

const T0: u64 = 1_700_000_000_000;
const LEASE: u64 = 30_000;

fn clock() -> Arc<ManualClock> {
    ManualClock::new(T0)
}

fn digest(n: u64) -> String {
    format!("sha256:{n:064x}")
}

fn image(n: u64) -> PinnedImage {
    PinnedImage {
        reference: format!("registry.test/app{n}:latest"),
        digest: digest(n),
    }
}

fn deployment(name: &str, n: u64) -> DeploymentSpec {
    DeploymentSpec {
        caches: Vec::new(),
        name: name.to_owned(),
        image: image(n),
        command: vec!["/bin/true".into()],
        env: [("FROM".to_owned(), "deployment".to_owned())].into(),
        resources: Default::default(),
        recycle_key: None,
        readonly_rootfs: false,
        warm_runners: 1,
        node_selector: Default::default(),
        snapshot: false,
    }
}

fn of_deployment(name: &str) -> RunSpec {
    RunSpec {
        deployment: Some(name.to_owned()),
        ..RunSpec::default()
    }
}

fn node(id: &str, slots: u32) -> NodeSpec {
    NodeSpec {
        id: id.to_owned(),
        slots,
        labels: Default::default(),
        inventory: Default::default(),
    }
}

fn claim(owner: &str, limit: usize) -> ClaimRequest {
    ClaimRequest {
        owner: owner.to_owned(),
        limit,
        lease_ms: LEASE,
    }
}

fn all_runs(s: &dyn StateStore) -> Vec<crate::model::Run> {
    s.list_runs(&RunFilter::default()).expect("list runs")
}

/// Moves a queued run to `scheduled` on `node` through claim + assign.
fn schedule(s: &dyn StateStore, id: RunId, node: &str) {
    let claimed = s.claim_runs(&claim("sched", 10_000)).expect("claim");
    assert!(claimed.iter().any(|r| r.id == id), "{id} not claimable");
    s.assign_run("sched", id, node).expect("assign");
    let others: Vec<RunId> = claimed.iter().map(|r| r.id).filter(|i| *i != id).collect();
    s.release_claims("sched", &others).expect("release");
}

/// Deployments: create, get, list, delete, duplicate names refused, unpinned images refused.
pub fn deployments(h: &dyn Harness) {
    let s = h.open(clock());
    let d = s.create_deployment(&deployment("web", 1)).expect("create");
    assert_eq!(d.created_at, T0);
    s.create_deployment(&deployment("api", 2)).expect("create");
    assert!(matches!(
        s.create_deployment(&deployment("web", 3)),
        Err(StoreError::DeploymentExists(n)) if n == "web"
    ));
    let mut bad = deployment("bad", 4);
    bad.image.digest = "latest".into();
    assert!(matches!(
        s.create_deployment(&bad),
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(s.get_deployment("web").expect("get"), Some(d.clone()));
    assert_eq!(s.get_deployment("nope").expect("get"), None);
    let names: Vec<String> = s
        .list_deployments()
        .expect("list")
        .into_iter()
        .map(|d| d.spec.name)
        .collect();
    assert_eq!(names, ["api", "web"]);

    // Deleted: gone from get and list, a second delete finds nothing, and
    // the name can be deployed again.
    assert_eq!(s.delete_deployment("web").expect("delete"), d);
    assert_eq!(s.get_deployment("web").expect("get"), None);
    assert!(matches!(
        s.delete_deployment("web"),
        Err(StoreError::DeploymentNotFound(n)) if n == "web"
    ));
    let names: Vec<String> = s
        .list_deployments()
        .expect("list")
        .into_iter()
        .map(|d| d.spec.name)
        .collect();
    assert_eq!(names, ["api"]);
    s.create_deployment(&deployment("web", 5))
        .expect("create again");
}

/// A second submit with the same idempotency key returns the first run;
/// the same key with another spec is refused; submits without a key are
/// independent.
pub fn idempotent_submit(h: &dyn Harness) {
    let s = h.open(clock());
    s.create_deployment(&deployment("web", 1)).expect("create");
    let spec = RunSpec {
        idempotency_key: Some("req-1".into()),
        env: [("X".to_owned(), "1".to_owned())].into(),
        ..of_deployment("web")
    };
    let first = s.submit_run(&spec).expect("submit");
    assert!(first.created);
    assert_eq!(first.run.state, RunState::Queued);
    assert_eq!(
        first.run.env.get("FROM").map(String::as_str),
        Some("deployment")
    );
    assert_eq!(first.run.env.get("X").map(String::as_str), Some("1"));
    // A retry from another replica, later: still the same run.
    let s2 = h.open(clock());
    let again = s2.submit_run(&spec).expect("resubmit");
    assert!(!again.created);
    assert_eq!(again.run, first.run);
    let other = RunSpec {
        command: vec!["other".into()],
        ..spec.clone()
    };
    assert!(matches!(
        s.submit_run(&other),
        Err(StoreError::IdempotencyMismatch { existing, .. }) if existing == first.run.id
    ));
    let a = s.submit_run(&of_deployment("web")).expect("submit");
    let b = s.submit_run(&of_deployment("web")).expect("submit");
    assert_ne!(a.run.id, b.run.id);
    assert_eq!(all_runs(&*s).len(), 3);
}

/// Malformed or dangling submits are refused and leave nothing behind.
pub fn invalid_submit_writes_nothing(h: &dyn Harness) {
    let s = h.open(clock());
    s.create_deployment(&deployment("web", 1)).expect("create");
    let both = RunSpec {
        image: Some(image(1)),
        ..of_deployment("web")
    };
    assert!(matches!(s.submit_run(&both), Err(StoreError::Invalid(_))));
    assert!(matches!(
        s.submit_run(&RunSpec::default()),
        Err(StoreError::Invalid(_))
    ));
    let unpinned = RunSpec {
        image: Some(PinnedImage {
            reference: "x".into(),
            digest: "sha256:short".into(),
        }),
        ..RunSpec::default()
    };
    assert!(matches!(
        s.submit_run(&unpinned),
        Err(StoreError::Invalid(_))
    ));
    let dangling = RunSpec {
        idempotency_key: Some("k".into()),
        ..of_deployment("missing")
    };
    assert!(matches!(
        s.submit_run(&dangling),
        Err(StoreError::DeploymentNotFound(_))
    ));
    assert!(all_runs(&*s).is_empty());
    // The failed submit did not reserve its idempotency key.
    let ok = RunSpec {
        idempotency_key: Some("k".into()),
        ..of_deployment("web")
    };
    assert!(s.submit_run(&ok).expect("submit").created);
}

/// Compare-and-set: of two replicas moving the same run from the same
/// state, exactly one wins; the other gets a conflict naming the real state.
pub fn cas_conflict(h: &dyn Harness) {
    let c = clock();
    let a = h.open(c.clone());
    let b = h.open(c.clone());
    let id = a
        .submit_run(&RunSpec {
            image: Some(image(1)),
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id;
    let cancelled = a
        .transition_run(id, RunState::Queued, RunState::Cancelled)
        .expect("cancel");
    assert_eq!(cancelled.state, RunState::Cancelled);
    assert_eq!(cancelled.times.finished, Some(T0));
    match b.transition_run(id, RunState::Queued, RunState::Cancelled) {
        Err(StoreError::Conflict {
            run,
            expected,
            actual,
        }) => {
            assert_eq!(
                (run, expected, actual),
                (id, RunState::Queued, RunState::Cancelled)
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A claim taken before a cancel cannot schedule the cancelled run.
    a.upsert_node(&node("n1", 4)).expect("node");
    let id2 = a
        .submit_run(&RunSpec {
            image: Some(image(1)),
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id;
    assert_eq!(a.claim_runs(&claim("r1", 10)).expect("claim").len(), 1);
    b.transition_run(id2, RunState::Queued, RunState::Cancelled)
        .expect("cancel");
    assert!(matches!(
        a.assign_run("r1", id2, "n1"),
        Err(StoreError::NotClaimed { .. } | StoreError::Conflict { .. })
    ));
    assert_eq!(
        a.get_run(id2).expect("get").map(|r| r.state),
        Some(RunState::Cancelled)
    );
    assert!(matches!(
        a.transition_run(RunId(999_999), RunState::Queued, RunState::Cancelled),
        Err(StoreError::RunNotFound(_))
    ));
}

/// Illegal edges are refused with the typed error and change nothing.
pub fn illegal_transitions_rejected(h: &dyn Harness) {
    let s = h.open(clock());
    let run = s
        .submit_run(&RunSpec {
            image: Some(image(1)),
            ..RunSpec::default()
        })
        .expect("submit")
        .run;
    for to in [
        RunState::Running,
        RunState::Succeeded,
        RunState::Lost,
        RunState::Queued,
    ] {
        match s.transition_run(run.id, RunState::Queued, to) {
            Err(StoreError::Transition {
                source: TransitionError::Illegal { from, to: t },
                ..
            }) => assert_eq!((from, t), (RunState::Queued, to)),
            other => panic!("queued -> {to} should be illegal, got {other:?}"),
        }
    }
    assert_eq!(s.get_run(run.id).expect("get"), Some(run.clone()));
    s.transition_run(run.id, RunState::Queued, RunState::Cancelled)
        .expect("cancel");
    assert!(matches!(
        s.transition_run(run.id, RunState::Cancelled, RunState::Queued),
        Err(StoreError::Transition { .. })
    ));
}

/// A burst of 500 runs of deployment A submitted before B's one run delays
/// B by at most one round: with one run claimed at a time, B's run is the
/// second claimed; claimed in batches, it is in the first batch. Within A,
/// runs come out in submission order.
pub fn fair_claim_across_deployments(h: &dyn Harness) {
    let s = h.open(clock());
    s.create_deployment(&deployment("a", 1)).expect("create");
    s.create_deployment(&deployment("b", 2)).expect("create");
    let a_ids: Vec<RunId> = (0..500)
        .map(|_| s.submit_run(&of_deployment("a")).expect("submit").run.id)
        .collect();
    let b_id = s.submit_run(&of_deployment("b")).expect("submit").run.id;

    // Batches: the first batch of 8 holds B's run.
    let first = s.claim_runs(&claim("x", 8)).expect("claim");
    assert!(
        first.iter().any(|r| r.id == b_id),
        "B missing from first batch"
    );
    let ids: Vec<RunId> = first.iter().map(|r| r.id).collect();
    s.release_claims("x", &ids).expect("release");

    // One at a time: A's oldest, then B, then A in order.
    let h2 = h.open(clock());
    s.create_deployment(&deployment("c", 3)).expect("create");
    let order: Vec<RunId> = (0..4)
        .map(|_| {
            let got = h2.claim_runs(&claim("y", 1)).expect("claim");
            assert_eq!(got.len(), 1);
            got[0].id
        })
        .collect();
    // The batch above served A's oldest and B's run and then A five times
    // more, so B's group is now the one served longest ago: it comes first
    // here. In any order, B must be within the first two single claims.
    assert!(
        order[..2].contains(&b_id),
        "B waited more than one round: {order:?}"
    );
    let a_order: Vec<RunId> = order.iter().copied().filter(|i| *i != b_id).collect();
    assert_eq!(a_order[..], a_ids[..a_order.len()]);

    // A newcomer joining mid-burst is served within one round too.
    let c_id = s.submit_run(&of_deployment("c")).expect("submit").run.id;
    let next: Vec<RunId> = (0..2)
        .map(|_| h2.claim_runs(&claim("y", 1)).expect("claim")[0].id)
        .collect();
    assert!(
        next.contains(&c_id),
        "C waited more than one round: {next:?}"
    );
}

/// Both stores claim by the one definition in `claim`: by rank (every
/// group's oldest before any group's second), groups in the order they
/// were last served (never: oldest run first), and a claim marks its
/// groups served in the order of each group's last run in it.
pub fn claims_follow_one_fairness_definition(h: &dyn Harness) {
    let s = h.open(clock());
    for (name, n) in [("a", 1), ("b", 2), ("c", 3)] {
        s.create_deployment(&deployment(name, n)).expect("create");
    }
    let id = |d: &str| s.submit_run(&of_deployment(d)).expect("submit").run.id;
    let (a1, a2, b1, a3, c1, c2) = (id("a"), id("a"), id("b"), id("a"), id("c"), id("c"));
    let ids = |runs: Vec<crate::model::Run>| runs.iter().map(|r| r.id).collect::<Vec<_>>();

    let first = ids(s.claim_runs(&claim("x", 4)).expect("claim"));
    assert_eq!(
        first,
        [a1, b1, c1, a2],
        "by rank, groups by their oldest run"
    );
    s.release_claims("x", &first).expect("release");
    // Served in the order b, c, a (a's last run came last): so b first now.
    let one = |s: &dyn StateStore| ids(s.claim_runs(&claim("y", 1)).expect("claim"));
    let singles: Vec<Vec<RunId>> = (0..6).map(|_| one(s.as_ref())).collect();
    assert_eq!(
        singles,
        [vec![b1], vec![c1], vec![a1], vec![c2], vec![a2], vec![a3]],
        "least recently served group first"
    );
    assert!(one(s.as_ref()).is_empty());
}

/// A claim is exclusive while its lease runs; after it lapses another
/// claimer may take the run and the first loses it; releasing makes it
/// claimable at once.
pub fn claim_leases(h: &dyn Harness) {
    let c = clock();
    let s = h.open(c.clone());
    s.upsert_node(&node("n1", 4)).expect("node");
    let id = s
        .submit_run(&RunSpec {
            image: Some(image(1)),
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id;
    assert_eq!(s.claim_runs(&claim("a", 10)).expect("claim").len(), 1);
    assert!(s.claim_runs(&claim("b", 10)).expect("claim").is_empty());
    c.advance(LEASE);
    let taken = s.claim_runs(&claim("b", 10)).expect("claim");
    assert_eq!(taken.iter().map(|r| r.id).collect::<Vec<_>>(), [id]);
    assert!(matches!(
        s.assign_run("a", id, "n1"),
        Err(StoreError::NotClaimed { .. })
    ));
    s.release_claims("b", &[id]).expect("release");
    assert_eq!(s.claim_runs(&claim("a", 10)).expect("claim").len(), 1);
    assert!(matches!(
        s.assign_run("a", id, "ghost"),
        Err(StoreError::NodeNotFound(_))
    ));
    let run = s.assign_run("a", id, "n1").expect("assign");
    assert_eq!((run.state, run.attempts), (RunState::Scheduled, 1));
    assert_eq!(run.node.as_deref(), Some("n1"));
    assert!(s.claim_runs(&claim("b", 10)).expect("claim").is_empty());
}

/// Four threads, each with its own connection, claim 300 runs of three
/// deployments at once, then assign them: every run is claimed exactly once.
pub fn concurrent_claimers_never_share_a_run(h: &dyn Harness) {
    let c = clock();
    let setup = h.open(c.clone());
    setup.upsert_node(&node("n1", 1_000)).expect("node");
    for d in ["a", "b", "c"] {
        setup.create_deployment(&deployment(d, 1)).expect("create");
    }
    for i in 0..300 {
        setup
            .submit_run(&of_deployment(["a", "b", "c"][i % 3]))
            .expect("submit");
    }
    // Claim everything first and assign only after all threads are done
    // claiming, so claims held by one thread are in the database while the
    // others claim: any overlap shows up as a duplicate or a failed assign.
    let barrier = std::sync::Barrier::new(4);
    let per_thread: Vec<Vec<RunId>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let c = c.clone();
                let barrier = &barrier;
                scope.spawn(move || {
                    let s = h.open(c);
                    let owner = format!("replica-{t}");
                    barrier.wait();
                    // Errors are carried past the second barrier instead of
                    // panicking before it, which would leave the other
                    // threads waiting forever: a broken store must fail the
                    // test, not hang it.
                    let mut mine = Vec::new();
                    let mut failure = None;
                    // The bound stops a broken store that hands out claimed
                    // runs again from looping forever.
                    while mine.len() <= 300 {
                        match s.claim_runs(&claim(&owner, 7)) {
                            Ok(got) if got.is_empty() => break,
                            Ok(got) => mine.extend(got.iter().map(|r| r.id)),
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        }
                        std::thread::yield_now();
                    }
                    barrier.wait();
                    if let Some(e) = failure {
                        panic!("{owner}: claim failed: {e}");
                    }
                    for id in &mine {
                        s.assign_run(&owner, *id, "n1").expect("assign own claim");
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|j| j.join().expect("claimer thread"))
            .collect()
    });
    let total: usize = per_thread.iter().map(Vec::len).sum();
    let unique: BTreeSet<RunId> = per_thread.iter().flatten().copied().collect();
    assert_eq!(total, 300, "claimed {total}");
    assert_eq!(unique.len(), 300, "a run was claimed twice");
    for run in all_runs(&*setup) {
        assert_eq!(
            (run.state, run.attempts),
            (RunState::Scheduled, 1),
            "{}",
            run.id
        );
    }
}

/// Node reports drive the run through its states and stamp the start-time
/// breakdown in order.
pub fn node_reports_and_start_times(h: &dyn Harness) {
    let c = clock();
    let s = h.open(c.clone());
    s.upsert_node(&node("n1", 2)).expect("node");
    let id = s
        .submit_run(&RunSpec {
            image: Some(image(1)),
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id;
    // Claimed at +1, placed at +3: the placement phase is visible.
    c.advance(1);
    let claimed = s.claim_runs(&claim("sched", 10)).expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].times.claimed, Some(T0 + 1));
    c.advance(2);
    s.assign_run("sched", id, "n1").expect("assign");
    let steps = [
        (NodeReport::Accepted, RunState::Starting),
        (NodeReport::ImageReady, RunState::Starting),
        (NodeReport::RunnerReady, RunState::Starting),
        (NodeReport::Started, RunState::Running),
        (
            NodeReport::Exited {
                code: 0,
                runner_idle: false,
            },
            RunState::Succeeded,
        ),
    ];
    for (report, state) in steps {
        c.advance(10);
        let run = s.report("n1", id, &report).expect("report");
        assert_eq!(run.state, state, "after {report:?}");
    }
    let run = s.get_run(id).expect("get").expect("exists");
    let t = &run.times;
    assert_eq!(
        [
            t.queued,
            t.claimed,
            t.scheduled,
            t.image_ready,
            t.runner_ready,
            t.process_started,
            t.finished
        ],
        [
            Some(T0),
            Some(T0 + 1),
            Some(T0 + 3),
            Some(T0 + 23),
            Some(T0 + 33),
            Some(T0 + 43),
            Some(T0 + 53)
        ]
    );
    assert_eq!(run.exit_code, Some(0));

    // Non-zero exit fails; a failure before start records why.
    for (report, state) in [
        (
            NodeReport::Exited {
                code: 3,
                runner_idle: false,
            },
            RunState::Failed,
        ),
        (
            NodeReport::Failed {
                error: "pull failed".into(),
            },
            RunState::Failed,
        ),
    ] {
        let id = s
            .submit_run(&RunSpec {
                image: Some(image(1)),
                ..RunSpec::default()
            })
            .expect("submit")
            .run
            .id;
        schedule(&*s, id, "n1");
        if matches!(report, NodeReport::Exited { .. }) {
            s.report("n1", id, &NodeReport::Started).expect("started");
        }
        assert_eq!(s.report("n1", id, &report).expect("report").state, state);
    }
}

/// Runs of a node that stops heartbeating become lost; a lost run with
/// attempts left is requeued (a fresh attempt, no node), one without is not.
pub fn lost_nodes_and_retries(h: &dyn Harness) {
    let c = clock();
    let s = h.open(c.clone());
    s.upsert_node(&node("n1", 4)).expect("node");
    s.upsert_node(&node("n2", 4)).expect("node");
    let submit = |max_attempts| {
        s.submit_run(&RunSpec {
            image: Some(image(1)),
            max_attempts,
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id
    };
    let retryable = submit(2);
    let once = submit(1);
    let elsewhere = submit(1);
    schedule(&*s, retryable, "n1");
    schedule(&*s, once, "n1");
    schedule(&*s, elsewhere, "n2");
    s.report("n1", retryable, &NodeReport::Started)
        .expect("started");

    c.advance(10_000);
    s.upsert_node(&node("n2", 4)).expect("heartbeat");
    assert!(s.mark_lost_runs(20_000).expect("sweep").is_empty());
    let lost = s.mark_lost_runs(5_000).expect("sweep");
    let lost_ids: Vec<RunId> = lost.iter().map(|r| r.id).collect();
    assert_eq!(lost_ids, [retryable, once]);
    assert!(lost.iter().all(|r| r.state == RunState::Lost));
    assert!(
        s.mark_lost_runs(5_000).expect("sweep").is_empty(),
        "lost twice"
    );
    assert_eq!(
        s.get_run(elsewhere).expect("get").map(|r| r.state),
        Some(RunState::Scheduled)
    );

    let requeued = s
        .transition_run(retryable, RunState::Lost, RunState::Queued)
        .expect("retry");
    assert_eq!(requeued.attempts, 1);
    assert_eq!(requeued.node, None);
    assert_eq!(requeued.times.queued, Some(T0 + 10_000));
    assert_eq!(requeued.times.scheduled, None);
    assert!(matches!(
        s.transition_run(once, RunState::Lost, RunState::Queued),
        Err(StoreError::Transition {
            source: TransitionError::NoAttemptsLeft {
                attempts: 1,
                max_attempts: 1
            },
            ..
        })
    ));

    schedule(&*s, retryable, "n2");
    s.report("n2", retryable, &NodeReport::Started)
        .expect("started");
    c.advance(10_000);
    s.upsert_node(&node("n1", 4)).expect("n1 is back");
    let lost = s.mark_lost_runs(5_000).expect("sweep");
    assert_eq!(
        lost.iter().map(|r| r.id).collect::<Vec<_>>(),
        [retryable, elsewhere]
    );
    assert!(matches!(
        s.transition_run(retryable, RunState::Lost, RunState::Queued),
        Err(StoreError::Transition {
            source: TransitionError::NoAttemptsLeft {
                attempts: 2,
                max_attempts: 2
            },
            ..
        })
    ));
}

/// A node that restarted reports the runs it no longer has as lost: each
/// goes back to the queue in the same transaction while attempts remain
/// (however recently the node heartbeated), counts its attempt, and can be
/// scheduled again, on the same node too; with no attempts left it stays
/// lost with the node's reason. Another node cannot lose a run for it.
pub fn runs_a_node_lost_are_retried_at_once(h: &dyn Harness) {
    let c = clock();
    let s = h.open(c.clone());
    s.upsert_node(&node("n1", 4)).expect("node");
    s.upsert_node(&node("n2", 4)).expect("node");
    let submit = |max_attempts| {
        s.submit_run(&RunSpec {
            image: Some(image(1)),
            max_attempts,
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id
    };
    let retryable = submit(3);
    let once = submit(1);
    schedule(&*s, retryable, "n1");
    schedule(&*s, once, "n1");
    s.report("n1", retryable, &NodeReport::Started)
        .expect("started");
    s.report("n1", once, &NodeReport::Accepted)
        .expect("accepted");
    let lost = |error: &str| NodeReport::Lost {
        error: error.to_owned(),
    };

    assert!(matches!(
        s.report("n2", retryable, &lost("not mine")),
        Err(StoreError::NotAssigned { .. })
    ));
    c.advance(100);
    s.upsert_node(&node("n1", 4))
        .expect("heartbeat: the node is back");
    let requeued = s
        .report("n1", retryable, &lost("the node restarted"))
        .expect("lost");
    assert_eq!(requeued.state, RunState::Queued);
    assert_eq!((requeued.attempts, requeued.node.as_deref()), (1, None));
    assert_eq!(requeued.times.queued, Some(T0 + 100));
    assert_eq!(requeued.times.scheduled, None);
    assert_eq!(s.get_run(retryable).expect("get"), Some(requeued));

    let gone = s
        .report("n1", once, &lost("the node restarted"))
        .expect("lost");
    assert_eq!(gone.state, RunState::Lost);
    assert_eq!(gone.error.as_deref(), Some("the node restarted"));
    assert!(
        s.mark_lost_runs(0).expect("sweep").is_empty(),
        "nothing left active to lose"
    );

    // The retry is an ordinary queued run: claimed, scheduled on the
    // restarted node, finished there, with its attempts counted.
    schedule(&*s, retryable, "n1");
    let done = s
        .report_batch(
            "n1",
            &[crate::store::RunReports::new(
                retryable,
                vec![
                    NodeReport::Started,
                    NodeReport::Exited {
                        code: 0,
                        runner_idle: false,
                    },
                ],
            )],
        )
        .expect("reports")
        .pop()
        .expect("one answer")
        .expect("applied");
    assert_eq!(
        (done.state, done.attempts, done.node.as_deref()),
        (RunState::Succeeded, 2, Some("n1"))
    );
}

/// Reports carrying the attempt they are about are refused for any other
/// attempt: when a lost attempt's retry comes back to the same node, the
/// old attempt's late exit is not recorded for the new one.
pub fn stale_attempts_are_fenced(h: &dyn Harness) {
    let s = h.open(clock());
    s.upsert_node(&node("n1", 4)).expect("node");
    let id = s
        .submit_run(&RunSpec {
            image: Some(image(1)),
            max_attempts: 2,
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id;
    let of = |attempt: u32, reports: Vec<NodeReport>| crate::store::RunReports {
        attempt: Some(attempt),
        ..crate::store::RunReports::new(id, reports)
    };
    let one = |b: crate::store::RunReports| {
        s.report_batch("n1", &[b])
            .expect("batch")
            .pop()
            .expect("one answer")
    };
    schedule(&*s, id, "n1");
    assert_eq!(
        one(of(1, vec![NodeReport::Started]))
            .expect("first attempt runs")
            .state,
        RunState::Running
    );
    let lost = NodeReport::Lost {
        error: "gone".into(),
    };
    assert_eq!(
        s.report("n1", id, &lost).expect("lost").state,
        RunState::Queued
    );
    schedule(&*s, id, "n1");
    let exited = NodeReport::Exited {
        code: 137,
        runner_idle: false,
    };
    assert!(matches!(
        one(of(1, vec![exited.clone()])),
        Err(StoreError::NotAssigned { .. })
    ));
    let run = s.get_run(id).expect("get").expect("run");
    assert_eq!(
        (run.state, run.attempts, run.exit_code),
        (RunState::Scheduled, 2, None)
    );
    assert_eq!(
        one(of(2, vec![NodeReport::Started]))
            .expect("second attempt")
            .state,
        RunState::Running
    );
}

/// Reports from a node for a run that is not (or no longer) its own are
/// refused and change nothing: after a loss, after a reassignment, after a
/// cancel, and from a node that never had it.
pub fn late_reports_rejected(h: &dyn Harness) {
    let c = clock();
    let s = h.open(c.clone());
    s.upsert_node(&node("n1", 4)).expect("node");
    s.upsert_node(&node("n2", 4)).expect("node");
    let id = s
        .submit_run(&RunSpec {
            image: Some(image(1)),
            max_attempts: 3,
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id;
    schedule(&*s, id, "n1");
    assert!(matches!(
        s.report("n2", id, &NodeReport::Accepted),
        Err(StoreError::NotAssigned { .. })
    ));
    c.advance(60_000);
    s.upsert_node(&node("n2", 4)).expect("heartbeat");
    assert_eq!(s.mark_lost_runs(30_000).expect("sweep").len(), 1);
    let late = NodeReport::Exited {
        code: 0,
        runner_idle: false,
    };
    assert!(matches!(
        s.report("n1", id, &late),
        Err(StoreError::NotAssigned { run, node }) if run == id && node == "n1"
    ));
    s.transition_run(id, RunState::Lost, RunState::Queued)
        .expect("retry");
    assert!(matches!(
        s.report("n1", id, &late),
        Err(StoreError::NotAssigned { .. })
    ));
    schedule(&*s, id, "n2");
    assert!(matches!(
        s.report("n1", id, &late),
        Err(StoreError::NotAssigned { .. })
    ));
    let run = s.get_run(id).expect("get").expect("exists");
    assert_eq!(
        (run.state, run.node.as_deref(), run.exit_code),
        (RunState::Scheduled, Some("n2"), None),
        "a rejected report changed the run"
    );
    s.transition_run(id, RunState::Scheduled, RunState::Cancelled)
        .expect("cancel");
    assert!(matches!(
        s.report("n2", id, &NodeReport::Started),
        Err(StoreError::NotAssigned { .. })
    ));
    assert_eq!(
        s.get_run(id).expect("get").map(|r| r.state),
        Some(RunState::Cancelled)
    );
}

/// A runner freed on a node takes the oldest queued run with its key at
/// once, skipping runs of other keys and runs whose selector the node
/// fails, and never a run another replica has claimed.
pub fn warm_handoff(h: &dyn Harness) {
    let c = clock();
    let s = h.open(c.clone());
    let mut n1 = node("n1", 4);
    n1.labels.insert("zone".into(), "a".into());
    s.upsert_node(&n1).expect("node");
    s.create_deployment(&deployment("web", 1)).expect("create");
    s.create_deployment(&deployment("api", 2)).expect("create");
    let api = s.submit_run(&of_deployment("api")).expect("submit").run;
    let elsewhere = s
        .submit_run(&RunSpec {
            node_selector: [("zone".to_owned(), "b".to_owned())].into(),
            ..of_deployment("web")
        })
        .expect("submit")
        .run;
    let claimed = s.submit_run(&of_deployment("web")).expect("submit").run;
    let first = s.submit_run(&of_deployment("web")).expect("submit").run;
    let second = s.submit_run(&of_deployment("web")).expect("submit").run;
    // Another replica holds `claimed`; the hand-off must not take it.
    let got = s.claim_runs(&claim("other", 3)).expect("claim");
    assert!(got.iter().any(|r| r.id == claimed.id), "{got:?}");
    let ids: Vec<RunId> = got
        .iter()
        .map(|r| r.id)
        .filter(|i| *i != claimed.id)
        .collect();
    s.release_claims("other", &ids).expect("release");
    c.advance(5);

    let key = first.warm_key();
    assert_ne!(key, api.warm_key());
    let run = s
        .claim_for_runner("n1", &key)
        .expect("hand-off")
        .expect("a web run is queued");
    assert_eq!(run.id, first.id);
    assert_eq!((run.state, run.attempts), (RunState::Scheduled, 1));
    // The hand-off is the claim (the released one before it does not
    // count): placement took no time.
    assert_eq!(run.times.claimed, Some(T0 + 5));
    assert_eq!(run.times.scheduled, Some(T0 + 5));
    assert_eq!(run.node.as_deref(), Some("n1"));
    let run = s.claim_for_runner("n1", &key).expect("hand-off");
    assert_eq!(run.map(|r| r.id), Some(second.id));
    assert_eq!(s.claim_for_runner("n1", &key).expect("hand-off"), None);
    assert_eq!(
        s.get_run(elsewhere.id).expect("get").map(|r| r.state),
        Some(RunState::Queued)
    );
    assert!(matches!(
        s.claim_for_runner("ghost", &key),
        Err(StoreError::NodeNotFound(_))
    ));
}

/// `list_runs` filters by state, deployment and node, newest first, limited.
pub fn list_filters(h: &dyn Harness) {
    let s = h.open(clock());
    s.upsert_node(&node("n1", 4)).expect("node");
    s.create_deployment(&deployment("a", 1)).expect("create");
    s.create_deployment(&deployment("b", 2)).expect("create");
    let a1 = s.submit_run(&of_deployment("a")).expect("submit").run.id;
    let b1 = s.submit_run(&of_deployment("b")).expect("submit").run.id;
    let a2 = s.submit_run(&of_deployment("a")).expect("submit").run.id;
    schedule(&*s, b1, "n1");
    let ids = |f: RunFilter| -> Vec<RunId> {
        s.list_runs(&f)
            .expect("list")
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    assert_eq!(ids(RunFilter::default()), [a2, b1, a1]);
    assert_eq!(
        ids(RunFilter {
            deployment: Some("a".into()),
            ..RunFilter::default()
        }),
        [a2, a1]
    );
    assert_eq!(
        ids(RunFilter {
            states: vec![RunState::Scheduled, RunState::Running],
            ..RunFilter::default()
        }),
        [b1]
    );
    assert_eq!(
        ids(RunFilter {
            node: Some("n1".into()),
            ..RunFilter::default()
        }),
        [b1]
    );
    assert_eq!(
        ids(RunFilter {
            limit: Some(1),
            ..RunFilter::default()
        }),
        [a2]
    );
}

/// Closing every connection and reopening loses nothing: deployments,
/// nodes, queued, scheduled and running runs, claims (until their lease
/// lapses) and the id sequence.
pub fn restart_durability(h: &dyn Harness) {
    let c = clock();
    let (before, claimed, queued) = {
        let s = h.open(c.clone());
        s.create_deployment(&deployment("web", 1)).expect("create");
        s.upsert_node(&node("n1", 4)).expect("node");
        let ids: Vec<RunId> = (0..4)
            .map(|_| s.submit_run(&of_deployment("web")).expect("submit").run.id)
            .collect();
        schedule(&*s, ids[0], "n1");
        s.report("n1", ids[0], &NodeReport::Started)
            .expect("started");
        schedule(&*s, ids[1], "n1");
        let claimed = s.claim_runs(&claim("old-replica", 1)).expect("claim");
        assert_eq!(claimed.len(), 1);
        (all_runs(&*s), claimed[0].id, ids[3])
    };
    let s = h.open(c.clone());
    assert_eq!(all_runs(&*s), before);
    assert_eq!(s.list_deployments().expect("list").len(), 1);
    assert_eq!(s.list_nodes().expect("list").len(), 1);
    let states: Vec<RunState> = before.iter().rev().map(|r| r.state).collect();
    assert_eq!(
        states,
        [
            RunState::Running,
            RunState::Scheduled,
            RunState::Queued,
            RunState::Queued
        ]
    );
    // The dead replica's claim holds until its lease lapses, then the run
    // is claimable again.
    let now: Vec<RunId> = s
        .claim_runs(&claim("new", 10))
        .expect("claim")
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(now, [queued]);
    c.advance(LEASE);
    let later: Vec<RunId> = s
        .claim_runs(&claim("new", 10))
        .expect("claim")
        .iter()
        .map(|r| r.id)
        .collect();
    assert!(later.contains(&claimed), "{later:?}");
    let newest = s.submit_run(&of_deployment("web")).expect("submit").run.id;
    assert!(
        before.iter().all(|r| r.id < newest),
        "ids reused after restart"
    );
}

/// Run output: appended by the run's node only while the run is active,
/// read back byte for byte in append order from any connection, paged by
/// position.
pub fn logs(h: &dyn Harness) {
    let c = clock();
    let s = h.open(c.clone());
    s.upsert_node(&node("n1", 4)).expect("node");
    s.upsert_node(&node("n2", 4)).expect("node");
    let id = s
        .submit_run(&RunSpec {
            image: Some(image(1)),
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id;
    assert!(s.read_log(id, 0, 10, usize::MAX).expect("read").is_empty());
    assert!(matches!(
        s.append_log("n1", id, LogStream::Stdout, b"queued", u64::MAX),
        Err(StoreError::NotAssigned { .. })
    ));
    schedule(&*s, id, "n1");
    // Not UTF-8, a NUL, and a character split between two appends.
    let parts: [(LogStream, &[u8]); 4] = [
        (LogStream::Stdout, b"\xff\x00\xfe"),
        (LogStream::Stderr, b"warn\n"),
        (LogStream::Stdout, b"\xe2\x82"),
        (LogStream::Stdout, b"\xac\n"),
    ];
    for (stream, data) in parts {
        s.append_log("n1", id, stream, data, u64::MAX)
            .expect("append");
    }
    assert!(matches!(
        s.append_log("n2", id, LogStream::Stdout, b"intruder", u64::MAX),
        Err(StoreError::NotAssigned { .. })
    ));
    // Another connection sees the same, in order.
    let other = h.open(c.clone());
    let all = other.read_log(id, 0, 100, usize::MAX).expect("read");
    let got: Vec<(LogStream, &[u8])> = all.iter().map(|c| (c.stream, &c.data[..])).collect();
    assert_eq!(got, parts.to_vec());
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "{all:?}");
    // Paging: after the second chunk, one at a time.
    let page = other.read_log(id, all[1].seq, 1, usize::MAX).expect("page");
    assert_eq!(page, vec![all[2].clone()]);
    assert_eq!(
        other.read_log(id, all[3].seq, 10, usize::MAX).expect("end"),
        Vec::new()
    );
    // A byte budget ends the page after the chunk that reaches it (3 + 5
    // bytes for a budget of 4), and never returns nothing when there is
    // something.
    assert_eq!(
        other.read_log(id, 0, 100, 4).expect("budget"),
        all[..2].to_vec()
    );
    assert_eq!(
        other.read_log(id, 0, 100, 1).expect("budget"),
        all[..1].to_vec()
    );
    // A finished run takes no more output; what it had stays.
    s.report("n1", id, &NodeReport::Started).expect("started");
    s.report(
        "n1",
        id,
        &NodeReport::Exited {
            code: 0,
            runner_idle: false,
        },
    )
    .expect("exit");
    assert!(matches!(
        s.append_log("n1", id, LogStream::Stdout, b"late", u64::MAX),
        Err(StoreError::NotAssigned { .. })
    ));
    assert_eq!(s.read_log(id, 0, 100, usize::MAX).expect("read").len(), 4);
    assert!(matches!(
        s.read_log(RunId(9_999), 0, 10, usize::MAX),
        Err(StoreError::RunNotFound(_))
    ));
}

/// A batch of submits commits together, each getting what a lone submit
/// would: bad ones fail alone and write nothing, a repeated idempotency key
/// within the batch returns the run the batch just made.
pub fn batch_submit(h: &dyn Harness) {
    let s = h.open(clock());
    s.create_deployment(&deployment("web", 1)).expect("create");
    let keyed = RunSpec {
        idempotency_key: Some("k".into()),
        ..of_deployment("web")
    };
    let other_spec_same_key = RunSpec {
        command: vec!["other".into()],
        ..keyed.clone()
    };
    let results = s
        .submit_runs(&[
            of_deployment("web"),
            of_deployment("missing"),
            keyed.clone(),
            RunSpec::default(),
            keyed.clone(),
            other_spec_same_key,
            of_deployment("web"),
        ])
        .expect("batch");
    assert_eq!(results.len(), 7);
    let ok = |i: usize| results[i].as_ref().expect("submitted");
    assert!(ok(0).created);
    assert!(matches!(results[1], Err(StoreError::DeploymentNotFound(_))));
    assert!(ok(2).created);
    assert!(matches!(results[3], Err(StoreError::Invalid(_))));
    assert!(!ok(4).created);
    assert_eq!(ok(4).run.id, ok(2).run.id);
    assert!(matches!(
        results[5],
        Err(StoreError::IdempotencyMismatch { .. })
    ));
    assert!(ok(6).created);
    let ids: BTreeSet<RunId> = [0, 2, 6].iter().map(|&i| ok(i).run.id).collect();
    assert_eq!(ids.len(), 3);
    let stored: BTreeSet<RunId> = s
        .list_runs(&RunFilter::default())
        .expect("list")
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(stored, ids, "exactly the good submits are stored");
    // They are claimable like any other.
    assert_eq!(s.claim_runs(&claim("a", 10)).expect("claim").len(), 3);
}

/// A node's reports on several runs in one call: each run's list applied
/// in order, a refused report ending only its own run's list (what came
/// before it stands), other nodes' runs and unknown runs refused one by
/// one, and the batch's results in the batch's order.
pub fn batch_reports(h: &dyn Harness) {
    use crate::store::RunReports;
    let c = clock();
    let s = h.open(c.clone());
    s.upsert_node(&node("n1", 4)).expect("node");
    s.upsert_node(&node("n2", 4)).expect("node");
    let submit = || {
        s.submit_run(&RunSpec {
            image: Some(image(1)),
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id
    };
    let (a, b, other, cancelled) = (submit(), submit(), submit(), submit());
    for id in [a, b, cancelled] {
        schedule(&*s, id, "n1");
    }
    schedule(&*s, other, "n2");
    s.transition_run(cancelled, RunState::Scheduled, RunState::Cancelled)
        .expect("cancel");
    c.advance(5);
    let exited = NodeReport::Exited {
        code: 3,
        runner_idle: true,
    };
    let batch = vec![
        // Dated by the node: 3, 2, 1 and 0 ms before the call.
        RunReports {
            attempt: None,
            ages_ms: vec![3, 2, 1, 0],
            run: a,
            reports: vec![
                NodeReport::ImageReady,
                NodeReport::RunnerReady,
                NodeReport::Started,
                exited.clone(),
            ],
        },
        // Started twice: the second is refused, the first stands. Its age
        // would date it before the run was scheduled: it is not.
        RunReports {
            attempt: None,
            ages_ms: vec![100],
            run: b,
            reports: vec![NodeReport::Started, NodeReport::Started, exited.clone()],
        },
        RunReports {
            attempt: None,
            ages_ms: Vec::new(),
            run: other,
            reports: vec![NodeReport::Started],
        },
        RunReports {
            attempt: None,
            ages_ms: Vec::new(),
            run: cancelled,
            reports: vec![NodeReport::Started],
        },
        RunReports {
            attempt: None,
            ages_ms: Vec::new(),
            run: RunId(999_999),
            reports: vec![NodeReport::Started],
        },
        RunReports {
            attempt: None,
            ages_ms: Vec::new(),
            run: a,
            reports: Vec::new(),
        },
    ];
    let out = s.report_batch("n1", &batch).expect("batch");
    assert_eq!(out.len(), batch.len());
    let ra = out[0].as_ref().expect("run a's reports apply");
    assert_eq!(
        (ra.id, ra.state, ra.exit_code),
        (a, RunState::Failed, Some(3))
    );
    let t = &ra.times;
    assert_eq!(
        (t.image_ready, t.runner_ready, t.process_started, t.finished),
        (Some(T0 + 2), Some(T0 + 3), Some(T0 + 4), Some(T0 + 5))
    );
    assert!(
        matches!(out[1], Err(StoreError::Transition { run, .. }) if run == b),
        "{:?}",
        out[1]
    );
    assert!(matches!(out[2], Err(StoreError::NotAssigned { run, .. }) if run == other));
    assert!(matches!(out[3], Err(StoreError::NotAssigned { run, .. }) if run == cancelled));
    assert!(matches!(
        out[4],
        Err(StoreError::RunNotFound(RunId(999_999)))
    ));
    assert!(
        matches!(out[5], Err(StoreError::Invalid(_))),
        "{:?}",
        out[5]
    );

    let get = |id| s.get_run(id).expect("get").expect("exists");
    assert_eq!(get(a).state, RunState::Failed);
    let rb = get(b);
    assert_eq!(
        (rb.state, rb.exit_code),
        (RunState::Running, None),
        "b's first report stands, its list ends at the refused one"
    );
    assert_eq!(rb.times.process_started, rb.times.scheduled);
    assert_eq!(get(other).state, RunState::Scheduled);
    assert_eq!(get(cancelled).state, RunState::Cancelled);
}

/// Several runners freed at once: each key takes its oldest queued run,
/// a repeated key the next one, and a key with nothing queued gets
/// nothing; all of it in one call.
pub fn batch_handoff(h: &dyn Harness) {
    let c = clock();
    let s = h.open(c.clone());
    s.upsert_node(&node("n1", 4)).expect("node");
    s.create_deployment(&deployment("web", 1)).expect("create");
    s.create_deployment(&deployment("api", 2)).expect("create");
    let web: Vec<_> = (0..3)
        .map(|_| s.submit_run(&of_deployment("web")).expect("submit").run)
        .collect();
    let api = s.submit_run(&of_deployment("api")).expect("submit").run;
    c.advance(5);
    let keys = vec![
        web[0].warm_key(),
        "nothing-queued".to_owned(),
        api.warm_key(),
        web[0].warm_key(),
        api.warm_key(),
    ];
    let got: Vec<Option<RunId>> = s
        .claim_for_runners("n1", &keys)
        .expect("hand-offs")
        .into_iter()
        .map(|r| r.map(|r| r.id))
        .collect();
    assert_eq!(
        got,
        vec![Some(web[0].id), None, Some(api.id), Some(web[1].id), None]
    );
    for id in [web[0].id, web[1].id, api.id] {
        let run = s.get_run(id).expect("get").expect("exists");
        assert_eq!(
            (run.state, run.node.as_deref(), run.times.scheduled),
            (RunState::Scheduled, Some("n1"), Some(T0 + 5))
        );
    }
    assert_eq!(
        s.get_run(web[2].id).expect("get").map(|r| r.state),
        Some(RunState::Queued)
    );
    assert!(matches!(
        s.claim_for_runners("ghost", &keys),
        Err(StoreError::NodeNotFound(_))
    ));
}

/// Node credentials: stored by hash for one node each, listed, a duplicate
/// hash refused, malformed ones refused, revoked per node (only that
/// node's), and durable across a reopen.
pub fn node_credentials(h: &dyn Harness) {
    let s = h.open(clock());
    let hash = |n: u8| format!("{:064x}", n);
    assert!(s.node_credentials().expect("list").is_empty());
    s.add_node_credential("a", &hash(1)).expect("a's first");
    s.add_node_credential("a", &hash(2)).expect("a's second");
    s.add_node_credential("b", &hash(3)).expect("b's");
    assert!(
        s.add_node_credential("b", &hash(1)).is_err(),
        "one token, two nodes"
    );
    for (node, bad) in [
        ("", hash(4)),
        ("c", "ab".to_owned()),
        ("c", hash(0xab).to_uppercase()),
    ] {
        assert!(matches!(
            s.add_node_credential(node, &bad),
            Err(StoreError::Invalid(_))
        ));
    }
    let want = |pairs: &[(u8, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, node)| (hash(*n), (*node).to_owned()))
            .collect()
    };
    assert_eq!(
        s.node_credentials().expect("list"),
        want(&[(1, "a"), (2, "a"), (3, "b")])
    );
    drop(s);
    let s = h.open(clock());
    assert_eq!(s.revoke_node_credentials("a").expect("revoke"), 2);
    assert_eq!(s.revoke_node_credentials("a").expect("revoke again"), 0);
    assert_eq!(s.node_credentials().expect("list"), want(&[(3, "b")]));
}

/// Paging newest first with `before`: every run exactly once, in order,
/// with the other filters applying within each page.
pub fn list_pages(h: &dyn Harness) {
    let s = h.open(clock());
    s.create_deployment(&deployment("a", 1)).expect("create");
    let mut all: Vec<RunId> = Vec::new();
    for i in 0..7 {
        let spec = if i % 2 == 0 {
            of_deployment("a")
        } else {
            RunSpec {
                image: Some(image(2)),
                ..RunSpec::default()
            }
        };
        all.push(s.submit_run(&spec).expect("submit").run.id);
    }
    all.reverse();
    let page = |before: Option<RunId>, deployment: Option<&str>| -> Vec<RunId> {
        s.list_runs(&RunFilter {
            limit: Some(3),
            before,
            deployment: deployment.map(str::to_owned),
            ..RunFilter::default()
        })
        .expect("list")
        .iter()
        .map(|r| r.id)
        .collect()
    };
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let p = page(cursor, None);
        assert!(p.len() <= 3);
        let Some(last) = p.last().copied() else { break };
        seen.extend(p);
        cursor = Some(last);
    }
    assert_eq!(seen, all, "pages cover every run once, newest first");
    let of_a: Vec<RunId> = all.iter().copied().step_by(2).collect();
    let first = page(None, Some("a"));
    assert_eq!(first, of_a[..3]);
    assert_eq!(page(first.last().copied(), Some("a")), of_a[3..]);
    assert!(page(Some(RunId(1)), None).is_empty());
}

/// The per-run log limit: what fits is stored, the append that crosses it
/// keeps its prefix and is followed by exactly one truncation notice,
/// later appends are dropped; the limit counts across streams and
/// connections.
pub fn log_limit(h: &dyn Harness) {
    let c = clock();
    let s = h.open(c.clone());
    s.upsert_node(&node("n1", 4)).expect("node");
    let id = s
        .submit_run(&RunSpec {
            image: Some(image(1)),
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id;
    schedule(&*s, id, "n1");
    let max = 10;
    assert_eq!(
        s.append_log("n1", id, LogStream::Stdout, b"123456", max)
            .expect("append"),
        Appended::Stored
    );
    let other = h.open(c.clone());
    assert_eq!(
        other
            .append_log("n1", id, LogStream::Stderr, b"7890abc", max)
            .expect("append"),
        Appended::Truncated
    );
    for _ in 0..3 {
        assert_eq!(
            s.append_log("n1", id, LogStream::Stdout, b"more", max)
                .expect("append"),
            Appended::Dropped
        );
    }
    // Still checked for the node: a stranger is refused, not "dropped".
    assert!(matches!(
        s.append_log("n2", id, LogStream::Stdout, b"x", max),
        Err(StoreError::NotAssigned { .. })
    ));
    let chunks = s.read_log(id, 0, 100, usize::MAX).expect("read");
    let output: Vec<u8> = chunks
        .iter()
        .filter(|c| !c.marker)
        .flat_map(|c| c.data.clone())
        .collect();
    assert_eq!(output, b"1234567890", "exactly the limit is kept");
    let markers: Vec<_> = chunks.iter().filter(|c| c.marker).collect();
    assert_eq!(markers.len(), 1, "{chunks:?}");
    assert!(std::ptr::eq(markers[0], chunks.last().expect("a chunk")));
    assert_eq!(markers[0].stream, LogStream::Stderr);
    let text = String::from_utf8_lossy(&markers[0].data).into_owned();
    assert!(
        text.contains("truncated") && text.contains("10 bytes"),
        "{text}"
    );
    // Reaching the limit exactly stores everything; the next append gets
    // the notice (and nothing else).
    let id2 = s
        .submit_run(&RunSpec {
            image: Some(image(1)),
            ..RunSpec::default()
        })
        .expect("submit")
        .run
        .id;
    schedule(&*s, id2, "n1");
    assert_eq!(
        s.append_log("n1", id2, LogStream::Stdout, b"0123456789", max)
            .expect("append"),
        Appended::Stored
    );
    assert_eq!(
        s.append_log("n1", id2, LogStream::Stdout, b"x", max)
            .expect("append"),
        Appended::Truncated
    );
    let chunks = s.read_log(id2, 0, 100, usize::MAX).expect("read");
    assert_eq!(chunks.len(), 2);
    assert!(!chunks[0].marker && chunks[1].marker);
}

/// Finished runs' logs are pruned by age and by a total budget, least
/// recently appended first, each leaving one notice; active runs' logs
/// are never pruned; pruning twice removes nothing more.
pub fn log_pruning(h: &dyn Harness) {
    let c = clock();
    let s = h.open(c.clone());
    s.upsert_node(&node("n1", 8)).expect("node");
    let mut runs = Vec::new();
    for i in 0..4u8 {
        let id = s
            .submit_run(&RunSpec {
                image: Some(image(1)),
                ..RunSpec::default()
            })
            .expect("submit")
            .run
            .id;
        schedule(&*s, id, "n1");
        s.report("n1", id, &NodeReport::Started).expect("started");
        s.append_log("n1", id, LogStream::Stdout, &[b'a' + i; 100], u64::MAX)
            .expect("append");
        runs.push(id);
        c.advance(60_000);
    }
    // runs[3] stays running; the others finish.
    for &id in &runs[..3] {
        s.report(
            "n1",
            id,
            &NodeReport::Exited {
                code: 0,
                runner_idle: false,
            },
        )
        .expect("exit");
    }
    let output = |id: RunId| -> Vec<u8> {
        s.read_log(id, 0, 100, usize::MAX)
            .expect("read")
            .iter()
            .filter(|c| !c.marker)
            .flat_map(|c| c.data.clone())
            .collect()
    };
    // Now = T0 + 4 min; runs appended at T0, +1, +2, +3 min.
    let nothing = s.prune_logs(&LogRetention::default()).expect("prune");
    assert_eq!(nothing.runs, 0);
    let by_age = s
        .prune_logs(&LogRetention {
            max_age_ms: Some(150_000),
            max_total_bytes: None,
        })
        .expect("prune");
    assert_eq!((by_age.runs, by_age.bytes), (2, 200));
    assert!(output(runs[0]).is_empty() && output(runs[1]).is_empty());
    let notice = s.read_log(runs[0], 0, 100, usize::MAX).expect("read");
    assert_eq!(notice.len(), 1);
    assert!(notice[0].marker);
    assert!(String::from_utf8_lossy(&notice[0].data).contains("pruned"));
    assert_eq!(output(runs[2]), vec![b'c'; 100]);
    // A budget of 150 bytes: 200 are left (runs 2 and 3); run 2 goes,
    // run 3 is running and stays even though the budget is still exceeded.
    let by_size = s
        .prune_logs(&LogRetention {
            max_age_ms: None,
            max_total_bytes: Some(50),
        })
        .expect("prune");
    assert_eq!((by_size.runs, by_size.bytes), (1, 100));
    assert!(output(runs[2]).is_empty());
    assert_eq!(output(runs[3]), vec![b'd'; 100]);
    let again = h
        .open(c.clone())
        .prune_logs(&LogRetention {
            max_age_ms: Some(0),
            max_total_bytes: Some(0),
        })
        .expect("prune");
    assert_eq!(
        again.runs, 0,
        "pruned logs and live runs are not pruned again"
    );
    assert_eq!(
        s.read_log(runs[1], 0, 100, usize::MAX).expect("read").len(),
        1
    );
}
