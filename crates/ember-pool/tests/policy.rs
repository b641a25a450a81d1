//! The pool's policy on the recording fake runtime: which runner serves a
//! run (keys), what happens to it afterwards (recycling decisions), what
//! goes when the pool is over its budgets (least recently used first) and
//! when idle runners are frozen. No root, runc or agent needed: the same
//! policy runs on real runners in `tests/pool.rs`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use ember_pool::fake::{Call, FakeRuntime};
use ember_pool::{
    DiscardReason, ExecResult, Lease, Outcome, Pool, PoolConfig, PoolError, Released, RunnerShape,
    RunnerSpec,
};

/// Generous: background threads on a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

struct Fixture {
    pool: Pool,
    fake: FakeRuntime,
    _tmp: tempfile::TempDir,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // A test that failed while destroys were held must not leave the
        // pool's shutdown waiting for them.
        self.fake.release_destroys();
    }
}

fn pool(tweak: impl FnOnce(&mut PoolConfig)) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeRuntime::new();
    let mut cfg = FakeRuntime::config(tmp.path());
    // Off unless a test is about them: they would add calls on their own.
    cfg.pause_after = None;
    tweak(&mut cfg);
    let pool = Pool::with_runtime(cfg, Arc::new(fake.clone())).unwrap();
    Fixture {
        pool,
        fake,
        _tmp: tmp,
    }
}

fn spec(image: &str, recycle: Option<&str>) -> RunnerSpec {
    FakeRuntime::spec(image, recycle)
}

/// Acquires a runner of `spec` and releases it after a successful run;
/// returns its id.
fn use_once(pool: &Pool, spec: &RunnerSpec) -> String {
    let lease = pool.acquire(spec).unwrap();
    let id = lease.id().to_owned();
    assert_eq!(pool.release(lease, Outcome::Succeeded), Released::Recycled);
    id
}

fn exec(lease: &mut Lease) -> ExecResult {
    let req = lease.command(["true"]);
    lease.exec(&req, &mut |_, _| {}).unwrap()
}

fn wait_destroyed(f: &Fixture, id: &str) {
    assert!(
        f.fake
            .wait_for(WAIT, |c| c.contains(&Call::Destroy(id.to_owned()))),
        "runner {id} was not destroyed; calls: {:?}",
        f.fake.calls()
    );
}

#[test]
fn a_runner_serves_only_runs_of_its_image_shape_and_recycling_key() {
    let f = pool(|_| {});
    let a = use_once(&f.pool, &spec("busybox", Some("team-a")));
    // The same three again: the same runner, health-checked first.
    let lease = f.pool.acquire(&spec("busybox", Some("team-a"))).unwrap();
    assert_eq!(lease.id(), a);
    assert!(lease.info().reused);
    assert_eq!(lease.runs(), 1);
    f.pool.release(lease, Outcome::Succeeded);
    assert_eq!(
        f.fake.calls_of(&a),
        [
            Call::Create {
                id: a.clone(),
                recycle: Some("team-a".into())
            },
            Call::Reset(a.clone()),
            Call::HealthCheck(a.clone()),
            Call::Reset(a.clone()),
        ]
    );

    // Each differing part gives a runner of its own.
    let memory = RunnerShape {
        memory_bytes: Some(64 << 20),
        ..RunnerShape::default()
    };
    let others = [
        spec("busybox", Some("team-b")),
        spec("alpine", Some("team-a")),
        FakeRuntime::spec_with("busybox", memory, Some("team-a")),
    ];
    let mut ids = vec![a.clone()];
    for s in &others {
        let id = use_once(&f.pool, s);
        assert!(!ids.contains(&id), "{id} served another key");
        ids.push(id);
    }
    // And each of those is reused by its own key only.
    for (s, id) in others.iter().zip(&ids[1..]) {
        assert_eq!(&use_once(&f.pool, s), id);
    }
    assert_eq!(f.pool.stats().created, 4);
    assert_eq!(f.pool.stats().idle, 4);
    assert!(f.fake.destroyed().is_empty());
}

#[test]
fn single_use_runs_never_share_a_runner() {
    let f = pool(|_| {});
    let plain = spec("busybox", None);
    let lease = f.pool.acquire(&plain).unwrap();
    let first = lease.id().to_owned();
    assert_eq!(
        f.pool.release(lease, Outcome::Succeeded),
        Released::Discarded(DiscardReason::SingleUse)
    );
    wait_destroyed(&f, &first);
    let lease = f.pool.acquire(&plain).unwrap();
    assert_ne!(lease.id(), first);
    assert!(!lease.info().reused);
    // The discarded runner was never reset for another run.
    assert!(!f.fake.calls().contains(&Call::Reset(first)));
}

#[test]
fn the_run_decides_whether_its_runner_is_recycled() {
    let f = pool(|_| {});
    let s = spec("busybox", Some("k"));
    type Setup = fn(&FakeRuntime, &str);
    let cases: [(&str, Setup, Outcome, Released); 8] = [
        ("success", |_, _| {}, Outcome::Succeeded, Released::Recycled),
        (
            "failed",
            |_, _| {},
            Outcome::Failed,
            Released::Discarded(DiscardReason::Failed),
        ),
        (
            "no-recycle",
            |_, _| {},
            Outcome::NoRecycle,
            Released::Discarded(DiscardReason::NoRecycle),
        ),
        (
            "timed out",
            |fake, id| {
                fake.script_exec(
                    id,
                    ExecResult {
                        exit_code: Some(0),
                        timed_out: true,
                        ..ExecResult::default()
                    },
                )
            },
            Outcome::Succeeded,
            Released::Discarded(DiscardReason::TimedOut),
        ),
        (
            "cancelled",
            |fake, id| {
                fake.script_exec(
                    id,
                    ExecResult {
                        exit_code: Some(0),
                        cancelled: true,
                        ..ExecResult::default()
                    },
                )
            },
            Outcome::Succeeded,
            Released::Discarded(DiscardReason::Cancelled),
        ),
        (
            "memory limit",
            |fake, id| fake.hit_memory_limit(id),
            Outcome::Succeeded,
            Released::Discarded(DiscardReason::MemoryLimit {
                failcnt: 1,
                oom_kill: 0,
            }),
        ),
        (
            "reset fails",
            |fake, id| fake.fail_reset(id),
            Outcome::Succeeded,
            Released::Discarded(DiscardReason::ResetFailed("scripted reset failure".into())),
        ),
        (
            "agent lost",
            |fake, id| fake.kill_agent(id),
            Outcome::Succeeded,
            Released::Discarded(DiscardReason::AgentLost),
        ),
    ];
    for (name, setup, outcome, expected) in cases {
        let mut lease = f.pool.acquire(&s).unwrap();
        let id = lease.id().to_owned();
        setup(&f.fake, &id);
        let req = lease.command(["true"]);
        let ran = lease.exec(&req, &mut |_, _| {});
        assert_eq!(ran.is_err(), name == "agent lost", "{name}: {ran:?}");
        assert_eq!(f.pool.release(lease, outcome), expected, "{name}");
        if expected == Released::Recycled {
            assert_eq!(f.pool.idle_runners()[0].id, id, "{name}");
            // The next case gets a new runner.
            let lease = f.pool.acquire(&s).unwrap();
            assert_eq!(lease.id(), id);
            f.pool.release(lease, Outcome::Failed);
        }
        wait_destroyed(&f, &id);
        assert!(f.pool.idle_runners().is_empty(), "{name}");
    }
    // A lease dropped without release discards its runner too.
    let lease = f.pool.acquire(&s).unwrap();
    let id = lease.id().to_owned();
    drop(lease);
    wait_destroyed(&f, &id);
    assert_eq!(f.fake.live(), 0);
}

#[test]
fn a_dead_idle_runner_is_replaced_without_failing_the_acquire() {
    let f = pool(|_| {});
    let s = spec("busybox", Some("k"));
    let dead = use_once(&f.pool, &s);
    let alive = {
        // A second idle runner of the key, used less recently.
        let l1 = f.pool.acquire(&s).unwrap();
        let l2 = f.pool.acquire(&s).unwrap();
        assert_eq!(l1.id(), dead);
        let other = l2.id().to_owned();
        f.pool.release(l2, Outcome::Succeeded);
        f.pool.release(l1, Outcome::Succeeded);
        other
    };
    // Most recently used first: `dead`, found dead, then `alive`.
    f.fake.kill_agent(&dead);
    let mut lease = f.pool.acquire(&s).unwrap();
    assert_eq!(lease.id(), alive);
    assert_eq!(lease.info().replaced, 1);
    assert!(exec(&mut lease).success());
    wait_destroyed(&f, &dead);
    assert_eq!(f.pool.stats().unhealthy, 1);
    // With none left healthy, a new one is made.
    f.fake.kill_agent(&alive);
    f.pool.release(lease, Outcome::Succeeded);
    let lease = f.pool.acquire(&s).unwrap();
    assert!(!lease.info().reused);
    assert_eq!(lease.info().replaced, 1);
    assert!(![dead, alive].contains(&lease.id().to_owned()));
}

#[test]
fn a_failed_create_fails_the_acquire_and_leaves_nothing_counted() {
    let f = pool(|_| {});
    let s = spec("busybox", Some("k"));
    f.fake.fail_next_create("exit code 1");
    let err = f.pool.acquire(&s).unwrap_err();
    assert!(matches!(err, PoolError::Create(_)), "{err:?}");
    let st = f.pool.stats();
    assert_eq!((st.creating, st.leased, st.created), (0, 0, 0));
    let lease = f.pool.acquire(&s).unwrap();
    assert_eq!(f.pool.stats().created, 1);
    f.pool.release(lease, Outcome::Succeeded);
}

#[test]
fn the_count_budget_evicts_the_least_recently_used_idle_runner() {
    let f = pool(|c| c.max_runners = 3);
    let a = use_once(&f.pool, &spec("a", Some("k")));
    let b = use_once(&f.pool, &spec("b", Some("k")));
    let c = use_once(&f.pool, &spec("c", Some("k")));
    // Reusing `a` makes `b` the least recently used.
    assert_eq!(use_once(&f.pool, &spec("a", Some("k"))), a);
    let d = use_once(&f.pool, &spec("d", Some("k")));
    wait_destroyed(&f, &b);
    let e = use_once(&f.pool, &spec("e", Some("k")));
    wait_destroyed(&f, &c);
    assert_eq!(f.fake.destroyed(), [b, c]);
    let idle: Vec<String> = f.pool.idle_runners().into_iter().map(|i| i.id).collect();
    assert_eq!(idle, [a, d, e]);
    assert_eq!(f.pool.stats().evicted_count, 2);
}

#[test]
fn leased_runners_are_never_evicted_for_the_count_budget() {
    let f = pool(|c| c.max_runners = 1);
    let l1 = f.pool.acquire(&spec("a", Some("k"))).unwrap();
    let l2 = f.pool.acquire(&spec("b", Some("k"))).unwrap();
    // Over budget while both are out; nothing was destroyed.
    assert_eq!(f.pool.stats().leased, 2);
    assert!(f.fake.destroyed().is_empty());
    let (first, second) = (l1.id().to_owned(), l2.id().to_owned());
    // Back idle while the second is still out: over the budget, so the
    // idle one goes at once, and the leased one stays.
    f.pool.release(l1, Outcome::Succeeded);
    wait_destroyed(&f, &first);
    f.pool.release(l2, Outcome::Succeeded);
    wait_destroyed(&f, &first);
    let idle: Vec<String> = f.pool.idle_runners().into_iter().map(|i| i.id).collect();
    assert_eq!(idle, [second]);
}

#[test]
fn the_memory_budget_evicts_idle_runners_oldest_first_until_under_it() {
    // The reaper checks often; checks run one after another, so however
    // many see the usage below, the same two runners go.
    let f = pool(|c| {
        c.max_memory_bytes = Some(100);
        c.budget_interval = Duration::from_millis(10);
    });
    let ids: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|i| use_once(&f.pool, &spec(i, Some("k"))))
        .collect();
    let leased = f.pool.acquire(&spec("d", Some("k"))).unwrap();
    for id in ids.iter().chain([&leased.id().to_owned()]) {
        f.fake.set_memory_usage(id, 40);
    }
    // 160 in use: a (120), then b (80) go; c stays, the leased d too.
    // (Two checks may evict them, each destroying on its own thread, so
    // the order of the destroys themselves is not the policy's.)
    wait_destroyed(&f, &ids[0]);
    wait_destroyed(&f, &ids[1]);
    // A few more checks, which must find nothing more to do (a slow
    // machine runs fewer of them, which weakens but never fails this).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(f.pool.enforce_memory_budget(), 0);
    let mut destroyed = f.fake.destroyed();
    destroyed.sort();
    let mut oldest = ids[..2].to_vec();
    oldest.sort();
    assert_eq!(destroyed, oldest);
    let idle: Vec<String> = f.pool.idle_runners().into_iter().map(|i| i.id).collect();
    assert_eq!(idle, ids[2..]);
    assert_eq!(f.pool.stats().evicted_memory, 2);
    assert_eq!(f.pool.stats().leased, 1);
    f.pool.release(leased, Outcome::Succeeded);
}

/// Regression: runners evicted for memory stayed in the budget's sum until
/// their destroy finished, so a check that came meanwhile (destroys take
/// tens of milliseconds; here they are held up for good) evicted the next
/// idle runner too, for memory already on its way out.
#[test]
fn runners_being_destroyed_no_longer_count_against_the_memory_budget() {
    let f = pool(|c| {
        c.max_memory_bytes = Some(50);
        // Many checks while `a`'s destroy is held up.
        c.budget_interval = Duration::from_millis(5);
    });
    let a = use_once(&f.pool, &spec("a", Some("k")));
    let b = use_once(&f.pool, &spec("b", Some("k")));
    f.fake.hold_destroys();
    f.fake.set_memory_usage(&b, 40);
    f.fake.set_memory_usage(&a, 40);
    // `a` goes, `b` (40 of 50) stays: `a`'s 40 no longer counts once it
    // is evicted, though its destroy has not even finished.
    assert!(
        f.fake
            .wait_for(WAIT, |_| f.pool.stats().evicted_memory >= 1)
    );
    // Checks that must find nothing more to do (a slow machine runs fewer
    // of them, which weakens but never fails this).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(f.pool.stats().evicted_memory, 1);
    let idle: Vec<String> = f.pool.idle_runners().into_iter().map(|i| i.id).collect();
    assert_eq!(idle, [b]);
    f.fake.release_destroys();
    wait_destroyed(&f, &a);
    assert_eq!(f.fake.destroyed(), [a]);
}

#[test]
fn idle_runners_freeze_after_the_pause_and_thaw_before_the_health_check() {
    let f = pool(|c| c.pause_after = Some(Duration::from_millis(50)));
    let a = use_once(&f.pool, &spec("a", Some("k")));
    let b = use_once(&f.pool, &spec("b", Some("k")));
    assert!(
        f.fake.wait_for(WAIT, |c| c
            .iter()
            .filter(|c| matches!(c, Call::Freeze(_)))
            .count()
            == 2),
        "not frozen: {:?}",
        f.fake.calls()
    );
    // In the order they went idle, each once.
    assert_eq!(f.fake.frozen_order(), [a.clone(), b.clone()]);
    assert_eq!(f.pool.stats().frozen, 2);

    let lease = f.pool.acquire(&spec("a", Some("k"))).unwrap();
    assert_eq!(lease.id(), a);
    assert!(lease.info().was_frozen);
    assert!(!f.fake.is_frozen(&a));
    let after_release = f.fake.calls_of(&a);
    assert_eq!(
        after_release[after_release.len() - 3..],
        [
            Call::Freeze(a.clone()),
            Call::Thaw(a.clone()),
            Call::HealthCheck(a.clone())
        ]
    );
    assert!(f.fake.is_frozen(&b));
    f.pool.release(lease, Outcome::Succeeded);
    assert_eq!(f.pool.stats().thaws, 1);
}

#[test]
fn a_runner_reused_within_the_pause_is_never_frozen() {
    let f = pool(|c| c.pause_after = Some(Duration::from_secs(3600)));
    let s = spec("a", Some("k"));
    let a = use_once(&f.pool, &s);
    assert_eq!(use_once(&f.pool, &s), a);
    assert_eq!(use_once(&f.pool, &s), a);
    assert!(f.fake.frozen_order().is_empty());
    // Freezing on demand works regardless.
    assert_eq!(f.pool.freeze_idle(), 1);
    assert_eq!(f.fake.frozen_order(), [a]);
}

#[test]
fn idle_runners_expire_after_the_ttl() {
    let f = pool(|c| c.idle_ttl = Duration::from_millis(50));
    let a = use_once(&f.pool, &spec("a", Some("k")));
    wait_destroyed(&f, &a);
    assert_eq!(f.pool.stats().expired, 1);
    assert!(f.pool.idle_runners().is_empty());
}

#[test]
fn a_prewarmed_runner_serves_the_first_run_and_spares_serve_single_use_runs() {
    let f = pool(|c| c.fresh_spares = 1);
    let warm = f.pool.prewarm(&spec("a", Some("k"))).unwrap();
    let lease = f.pool.acquire(&spec("a", Some("k"))).unwrap();
    assert_eq!(lease.id(), warm);
    assert!(lease.info().reused);
    f.pool.release(lease, Outcome::Succeeded);

    let plain = spec("b", None);
    let lease = f.pool.acquire(&plain).unwrap();
    let first = lease.id().to_owned();
    // A spare of the same image and shape is made in the background.
    assert!(
        f.fake.wait_for(WAIT, |c| c
            .iter()
            .filter(|c| matches!(c, Call::Create { recycle: None, .. }))
            .count()
            == 2),
        "no spare: {:?}",
        f.fake.calls()
    );
    assert!(f.fake.wait_for(WAIT, |_| f.pool.stats().spares == 1));
    f.pool.release(lease, Outcome::Succeeded);
    let lease = f.pool.acquire(&plain).unwrap();
    assert_ne!(lease.id(), first);
    assert!(lease.info().reused, "the spare serves the next plain run");
    assert_eq!(lease.runs(), 0);
}

#[test]
fn shutdown_destroys_idle_runners_and_discards_leased_ones_on_release() {
    let f = pool(|_| {});
    let idle = use_once(&f.pool, &spec("a", Some("k")));
    let lease = f.pool.acquire(&spec("b", Some("k"))).unwrap();
    f.pool.shutdown();
    assert_eq!(f.fake.destroyed(), [idle]);
    assert!(matches!(
        f.pool.acquire(&spec("a", Some("k"))),
        Err(PoolError::ShutDown)
    ));
    let leased = lease.id().to_owned();
    assert_eq!(
        f.pool.release(lease, Outcome::Succeeded),
        Released::Discarded(DiscardReason::ShutDown)
    );
    wait_destroyed(&f, &leased);
    assert_eq!(f.fake.live(), 0);
}

#[test]
fn recover_asks_the_runtime() {
    let f = pool(|_| {});
    f.pool.recover().unwrap();
    assert_eq!(f.fake.calls(), [Call::Recover]);
}

#[test]
fn retiring_idle_runners_destroys_only_the_idle_ones_named() {
    let f = pool(|_| {});
    let a = use_once(&f.pool, &spec("a", Some("k")));
    let b = use_once(&f.pool, &spec("b", Some("k")));
    let leased = f.pool.acquire(&spec("c", Some("k"))).unwrap();
    let c = leased.id().to_owned();
    // A leased runner is not retired even when named, an idle one not
    // named is kept, and the named idle one is gone when this returns.
    let retired = f.pool.retire_idle(&[a.clone(), c.clone()]);
    assert_eq!(retired, vec![a.clone()]);
    assert!(f.fake.destroyed().contains(&a), "{:?}", f.fake.destroyed());
    assert!(!f.fake.destroyed().contains(&b));
    assert!(!f.fake.destroyed().contains(&c));
    let idle: Vec<String> = f.pool.idle_runners().into_iter().map(|r| r.id).collect();
    assert_eq!(idle, vec![b]);
    assert_eq!(
        f.pool.release(leased, Outcome::Succeeded),
        Released::Recycled
    );
}

/// Runs `true` on a lease of `spec` (the fake exits 0 unless scripted)
/// and releases it as the node does; returns the runner's id and how the
/// release went.
fn run_once(f: &Fixture, spec: &RunnerSpec, outcome: Outcome) -> (String, Released) {
    let mut lease = f.pool.acquire(spec).unwrap();
    let id = lease.id().to_owned();
    let req = lease.command(["true"]);
    let _ = lease.exec(&req, &mut |_, _| {});
    (id, f.pool.release(lease, outcome))
}

#[test]
fn a_runner_whose_exec_just_ended_cleanly_is_reused_without_a_ping() {
    let f = pool(|_| {});
    let s = spec("busybox", Some("k"));
    let (a, released) = run_once(&f, &s, Outcome::Succeeded);
    assert_eq!(released, Released::Recycled);
    let lease = f.pool.acquire(&s).unwrap();
    assert_eq!(lease.id(), a);
    assert!(lease.info().reused);
    let calls = f.fake.calls_of(&a);
    // The clean exit proved the agent idle; only its process is checked.
    assert_eq!(calls.last(), Some(&Call::Alive(a.clone())), "{calls:?}");
    assert!(!calls.contains(&Call::HealthCheck(a.clone())), "{calls:?}");
    assert_eq!(f.pool.stats().proven, 1);
    // A lease that ran nothing proves nothing: the next acquire pings.
    f.pool.release(lease, Outcome::Succeeded);
    let lease = f.pool.acquire(&s).unwrap();
    assert_eq!(
        f.fake.calls_of(&a).last(),
        Some(&Call::HealthCheck(a.clone()))
    );
    assert_eq!(f.pool.stats().proven, 1);
    f.pool.release(lease, Outcome::Succeeded);
}

#[test]
fn a_runner_whose_exec_failed_or_was_killed_is_still_health_checked_before_reuse() {
    let f = pool(|_| {});
    let s = spec("busybox", Some("k"));
    let a = use_once(&f.pool, &s);
    // Results the node keeps the runner warm for (a non-zero exit), or a
    // caller might (a signal), and ones the pool discards on its own.
    let cases = [
        (
            "exit 1",
            ExecResult {
                exit_code: Some(1),
                ..ExecResult::default()
            },
            None,
        ),
        (
            "killed",
            ExecResult {
                signal: Some(9),
                ..ExecResult::default()
            },
            None,
        ),
        (
            "spawn error",
            ExecResult {
                exit_code: Some(127),
                spawn_error: Some("no such file".into()),
                ..ExecResult::default()
            },
            None,
        ),
        (
            "timed out",
            ExecResult {
                exit_code: Some(0),
                timed_out: true,
                ..ExecResult::default()
            },
            Some(DiscardReason::TimedOut),
        ),
        (
            "cancelled",
            ExecResult {
                exit_code: Some(0),
                cancelled: true,
                ..ExecResult::default()
            },
            Some(DiscardReason::Cancelled),
        ),
    ];
    let mut id = a;
    for (name, result, discarded) in cases {
        f.fake.script_exec(&id, result);
        let (ran_on, released) = run_once(&f, &s, Outcome::Succeeded);
        assert_eq!(ran_on, id, "{name}");
        match discarded {
            Some(r) => {
                assert_eq!(released, Released::Discarded(r), "{name}");
                wait_destroyed(&f, &id);
                id = use_once(&f.pool, &s);
            }
            None => {
                assert_eq!(released, Released::Recycled, "{name}");
                let lease = f.pool.acquire(&s).unwrap();
                assert_eq!(lease.id(), id, "{name}");
                assert_eq!(
                    f.fake.calls_of(&id).last(),
                    Some(&Call::HealthCheck(id.clone())),
                    "{name}: pinged before reuse"
                );
                f.pool.release(lease, Outcome::Succeeded);
            }
        }
    }
    assert_eq!(f.pool.stats().proven, 0);
}

#[test]
fn a_proven_runner_whose_agent_died_since_is_replaced_without_failing_the_acquire() {
    let f = pool(|_| {});
    let s = spec("busybox", Some("k"));
    let mut lease = f.pool.acquire(&s).unwrap();
    let dead = lease.id().to_owned();
    assert!(exec(&mut lease).success());
    // The agent dies after its clean exit, before the release.
    f.fake.kill_agent(&dead);
    assert_eq!(
        f.pool.release(lease, Outcome::Succeeded),
        Released::Recycled
    );
    let lease = f.pool.acquire(&s).unwrap();
    assert_ne!(lease.id(), dead);
    assert_eq!(lease.info().replaced, 1);
    assert!(!lease.info().reused);
    wait_destroyed(&f, &dead);
    assert_eq!(f.pool.stats().unhealthy, 1);
    assert_eq!(f.pool.stats().proven, 0);
}

#[test]
fn a_proof_runs_out_and_a_frozen_runner_is_always_pinged() {
    // health_proof zero: every reuse pings, clean exit or not.
    let f = pool(|c| c.health_proof = Duration::ZERO);
    let s = spec("busybox", Some("k"));
    let (a, _) = run_once(&f, &s, Outcome::Succeeded);
    let lease = f.pool.acquire(&s).unwrap();
    assert_eq!(
        f.fake.calls_of(&a).last(),
        Some(&Call::HealthCheck(a.clone()))
    );
    f.pool.release(lease, Outcome::Succeeded);
    assert_eq!(f.pool.stats().proven, 0);

    // Frozen since its clean exit: thawed and pinged.
    let f = pool(|c| c.pause_after = Some(Duration::ZERO));
    let (a, _) = run_once(&f, &s, Outcome::Succeeded);
    assert!(
        f.fake
            .wait_for(WAIT, |c| c.contains(&Call::Freeze(a.clone()))),
        "not frozen: {:?}",
        f.fake.calls()
    );
    let lease = f.pool.acquire(&s).unwrap();
    assert_eq!(lease.id(), a);
    let calls = f.fake.calls_of(&a);
    assert_eq!(
        calls[calls.len() - 2..],
        [Call::Thaw(a.clone()), Call::HealthCheck(a.clone())]
    );
    f.pool.release(lease, Outcome::Succeeded);
    assert_eq!(f.pool.stats().proven, 0);
}
