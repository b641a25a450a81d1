//! Runs: submit (one transaction per batch), read, list, compare-and-set
//! transitions, node reports and lost nodes. The state changes themselves
//! are made by `crate::transitions`; this reads and writes the rows.

use super::*;

impl<C: GenericClient> Db<'_, C> {
    /// One submit inside the caller's transaction. Errors other than
    /// [`StoreError::Backend`] happen before anything is written, so a batch
    /// can report them per run and still commit the others.
    pub(super) fn submit(&mut self, spec: &RunSpec, now: Millis) -> Result<Submitted, StoreError> {
        let spec_json = serde_json::to_string(spec)?;
        if let Some(key) = &spec.idempotency_key
            && let Some(found) = self.earlier_submit(key, &spec_json)?
        {
            return Ok(found);
        }
        let deployment = match &spec.deployment {
            Some(name) => self.load_deployment(name)?,
            None => None,
        };
        let mut run = transitions::resolve(spec, deployment, now)?;
        let id: i64 = self.query("SELECT nextval('runs_id_seq')", &[])?[0].get(0);
        run.id = RunId(id);
        let inserted = self.execute(
            "INSERT INTO runs (id, state, queue_key, warm_key, deployment, idempotency_key,
                               spec, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (idempotency_key) DO NOTHING",
            &[
                &id,
                &run.state.as_str(),
                &run.queue_key(),
                &run.warm_key(),
                &run.deployment,
                &run.idempotency_key,
                &spec_json,
                &serde_json::to_string(&run)?,
            ],
        )?;
        if inserted == 0 {
            // Another replica inserted the same key between our check and
            // our insert (and has committed: the insert waited for it).
            let key = spec
                .idempotency_key
                .as_ref()
                .ok_or_else(|| StoreError::Backend("insert without a key conflicted".into()))?;
            return self
                .earlier_submit(key, &spec_json)?
                .ok_or_else(|| StoreError::Backend("conflicting run vanished".into()));
        }
        Ok(Submitted { run, created: true })
    }

    /// The run an earlier submit with idempotency key `key` made, or an
    /// error if the key was used for a different spec.
    pub(super) fn earlier_submit(
        &mut self,
        key: &String,
        spec_json: &str,
    ) -> Result<Option<Submitted>, StoreError> {
        let Some(row) = self.query_opt(
            "SELECT id, spec FROM runs WHERE idempotency_key = $1",
            &[key],
        )?
        else {
            return Ok(None);
        };
        let id = RunId(row.get(0));
        if row.get::<_, &str>(1) != spec_json {
            return Err(StoreError::IdempotencyMismatch {
                key: key.clone(),
                existing: id,
            });
        }
        Ok(Some(Submitted {
            run: self.load_run(id, false)?,
            created: false,
        }))
    }
}

pub(super) fn submit_runs(
    store: &PostgresStore,
    specs: &[RunSpec],
) -> Result<Vec<Result<Submitted, StoreError>>, StoreError> {
    store.write(Commit::Synced, |db, now| {
        let mut out = Vec::with_capacity(specs.len());
        for spec in specs {
            match db.submit(spec, now) {
                Err(e @ StoreError::Backend(_)) => return Err(e),
                other => out.push(other),
            }
        }
        if out.iter().any(|r| r.as_ref().is_ok_and(|s| s.created)) {
            db.notify()?;
        }
        Ok(out)
    })
}

pub(super) fn get_run(store: &PostgresStore, id: RunId) -> Result<Option<Run>, StoreError> {
    store.read(|db| match db.load_run(id, false) {
        Ok(run) => Ok(Some(run)),
        Err(StoreError::RunNotFound(_)) => Ok(None),
        Err(e) => Err(e),
    })
}

pub(super) fn list_runs(store: &PostgresStore, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
    let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
    let limit = filter.limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX));
    let before = filter.before.map(|b| b.0);
    // NULL parameters switch a filter off, so one prepared statement
    // serves every combination.
    store.read(|db| {
        db.runs(
            "SELECT body FROM runs
             WHERE (cardinality($1::text[]) = 0 OR state = ANY($1))
               AND ($2::text IS NULL OR deployment = $2)
               AND ($3::text IS NULL OR node = $3)
               AND ($5::bigint IS NULL OR id < $5)
             ORDER BY id DESC
             LIMIT $4",
            &[&states, &filter.deployment, &filter.node, &limit, &before],
        )
    })
}

pub(super) fn transition_run(
    store: &PostgresStore,
    id: RunId,
    expected: RunState,
    to: RunState,
) -> Result<Run, StoreError> {
    store.write(Commit::Synced, |db, now| {
        let mut run = db.load_run(id, true)?;
        transitions::expect_state(&run, expected)?;
        transitions::apply(&mut run, to, now)?;
        db.save_run(&run)?;
        if to == RunState::Queued {
            db.notify()?;
        }
        Ok(run)
    })
}

pub(super) fn report_batch(
    store: &PostgresStore,
    node: &str,
    batch: &[RunReports],
) -> Result<Vec<Result<Run, StoreError>>, StoreError> {
    // Rows are locked in the batch's order; another transaction that
    // locks several of them in another order (mark_lost_runs) may
    // deadlock with this one, and then `write` retries it.
    store.write(Commit::Relaxed, |db, now| {
        let mut requeued = false;
        let out = batch
            .iter()
            .map(|b| {
                let mut run = match db.load_run(b.run, true) {
                    Ok(run) => run,
                    Err(e @ StoreError::RunNotFound(_)) => return Ok(Err(e)),
                    Err(e) => return Err(e),
                };
                let (changed, res) = transitions::apply_reports(&mut run, node, b, now);
                if changed {
                    db.save_run(&run)?;
                    // A run its node lost is queued again: other
                    // replicas' dispatchers may place it.
                    requeued |= run.state == RunState::Queued;
                }
                Ok(res.map(|()| run))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        if requeued {
            db.notify()?;
        }
        Ok(out)
    })
}

pub(super) fn mark_lost_runs(
    store: &PostgresStore,
    stale_after_ms: Millis,
) -> Result<Vec<Run>, StoreError> {
    store.write(Commit::Relaxed, |db, now| {
        let cutoff = millis_sql(now.saturating_sub(stale_after_ms));
        // Waits for rows being reported on; PostgreSQL re-checks the
        // state on the row version it locks, so a run that finished
        // meanwhile drops out.
        let mut runs = db.runs(
            "SELECT r.body FROM runs r JOIN nodes n ON n.id = r.node
             WHERE r.state IN ('scheduled', 'starting', 'running') AND n.last_heartbeat < $1
             ORDER BY r.id
             FOR UPDATE OF r",
            &[&cutoff],
        )?;
        for run in &mut runs {
            transitions::mark_lost(run, now)?;
            db.save_run(run)?;
        }
        Ok(runs)
    })
}
