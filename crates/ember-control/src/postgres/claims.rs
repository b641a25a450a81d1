//! Claims: fair claiming ([`crate::claim`] decides what is taken; this
//! locks rows with `FOR UPDATE SKIP LOCKED`), releases, assignment to a
//! node and the warm hand-off.

use super::*;

impl<C: GenericClient> Db<'_, C> {
    /// The warm hand-off of [`StateStore::claim_for_runner`], inside a
    /// write transaction.
    pub(super) fn hand_off(
        &mut self,
        node: &str,
        labels: &BTreeMap<String, String>,
        warm_key: &str,
        now: Millis,
    ) -> Result<Option<Run>, StoreError> {
        // Oldest first, skipping runs another replica is claiming, parsed
        // one at a time (usually the first fits; this runs once per
        // finished run in a burst). A few rows are locked first; only if
        // none fits the node's labels does a wider look follow.
        let mut after = 0_i64;
        let mut found = None;
        for page in [4_i64, 60] {
            let rows = self.query(
                "SELECT id, body FROM runs
                 WHERE state = 'queued' AND warm_key = $1 AND id > $2
                   AND (claimed_by IS NULL OR claim_expires <= $3)
                 ORDER BY id LIMIT $4
                 FOR UPDATE SKIP LOCKED",
                &[&warm_key, &after, &millis_sql(now), &page],
            )?;
            for row in &rows {
                after = row.get(0);
                let run: Run = parse(row.get::<_, &str>(1))?;
                if crate::selector::matches(&run.node_selector, labels) {
                    found = Some(run);
                    break;
                }
            }
            if found.is_some() || rows.len() < usize::try_from(page).unwrap_or(0) {
                break;
            }
        }
        let Some(mut run) = found else {
            return Ok(None);
        };
        self.mark_served(&run.queue_key())?;
        transitions::hand_off(&mut run, node, now)?;
        self.save_run(&run)?;
        Ok(Some(run))
    }

    /// Sends `queue_key`'s group to the back of the round-robin.
    /// [`Self::mark_served`] for several groups at once: each gets a
    /// later serving number than the one before it in `keys`, while the
    /// queue rows are written in key order, so that two claimers updating
    /// the same groups cannot deadlock.
    pub(super) fn mark_served_in_order(&mut self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let n = i64::try_from(keys.len()).unwrap_or(i64::MAX);
        let mut numbers: Vec<i64> = self
            .query(
                "SELECT nextval('queue_serve_seq') FROM generate_series(1::bigint, $1::bigint)",
                &[&n],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        numbers.sort_unstable();
        let mut rows: Vec<(&String, i64)> = keys.iter().zip(numbers).collect();
        rows.sort();
        for (key, number) in rows {
            self.execute(
                "INSERT INTO queues (queue_key, last_served) VALUES ($1, $2)
                 ON CONFLICT (queue_key) DO UPDATE SET last_served = excluded.last_served",
                &[key, &number],
            )?;
        }
        Ok(())
    }

    pub(super) fn mark_served(&mut self, queue_key: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO queues (queue_key, last_served) VALUES ($1, nextval('queue_serve_seq'))
             ON CONFLICT (queue_key) DO UPDATE SET last_served = excluded.last_served",
            &[&queue_key],
        )?;
        Ok(())
    }
}

pub(super) fn claim_runs(
    store: &PostgresStore,
    req: &ClaimRequest,
) -> Result<Vec<Run>, StoreError> {
    if req.limit == 0 {
        return Ok(Vec::new());
    }
    store.write(Commit::Relaxed, |db, now| {
        let now_sql = millis_sql(now);
        let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
        // The fairness is `claim`'s; this only reads and writes rows,
        // locking each group's oldest claimable runs and skipping rows
        // other replicas are claiming right now.
        let groups: Vec<String> = db
            .query(claim::GROUPS_SQL, &[&now_sql, &limit])?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut runs = claim::take_fairly(groups.len(), req.limit, |g, after, n| {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            db.query(
                "SELECT body FROM runs
                 WHERE queue_key = $1 AND id > $2 AND state = 'queued'
                   AND (claimed_by IS NULL OR claim_expires <= $3)
                 ORDER BY id LIMIT $4
                 FOR UPDATE SKIP LOCKED",
                &[&groups[g], &after, &now_sql, &n],
            )?
            .iter()
            .map(|row| parse(row.get::<_, &str>(0)))
            .collect()
        })?;
        db.mark_served_in_order(&claim::served_order(&runs))?;
        let expires = millis_sql(now.saturating_add(req.lease_ms));
        for run in &mut runs {
            run.times.claimed = Some(now);
            db.execute(
                "UPDATE runs SET claimed_by = $2, claim_expires = $3, body = $4 WHERE id = $1",
                &[
                    &run.id.0,
                    &req.owner,
                    &expires,
                    &serde_json::to_string(&*run)?,
                ],
            )?;
        }
        Ok(runs)
    })
}

pub(super) fn release_claims(
    store: &PostgresStore,
    owner: &str,
    ids: &[RunId],
) -> Result<(), StoreError> {
    let ids: Vec<i64> = ids.iter().map(|i| i.0).collect();
    store.write(Commit::Relaxed, |db, _| {
        let released = db.execute(
            "UPDATE runs SET claimed_by = NULL, claim_expires = NULL
             WHERE id = ANY($1) AND claimed_by = $2",
            &[&ids, &owner],
        )?;
        // This replica could not place them; another one may.
        if released > 0 {
            db.notify()?;
        }
        Ok(())
    })
}

pub(super) fn assign_run(
    store: &PostgresStore,
    owner: &str,
    id: RunId,
    node: &str,
) -> Result<Run, StoreError> {
    store.write(Commit::Relaxed, |db, now| {
        let row = db
            .query_opt(
                "SELECT claimed_by, body FROM runs WHERE id = $1 FOR UPDATE",
                &[&id.0],
            )?
            .ok_or(StoreError::RunNotFound(id))?;
        // An expired lease still owned by us is fine: nobody else took it.
        if row.get::<_, Option<&str>>(0) != Some(owner) {
            return Err(StoreError::NotClaimed {
                run: id,
                owner: owner.to_owned(),
            });
        }
        let mut run: Run = parse(row.get::<_, &str>(1))?;
        if db
            .query_opt("SELECT 1 FROM nodes WHERE id = $1", &[&node])?
            .is_none()
        {
            return Err(StoreError::NodeNotFound(node.to_owned()));
        }
        transitions::expect_state(&run, RunState::Queued)?;
        transitions::apply(&mut run, RunState::Scheduled, now)?;
        run.node = Some(node.to_owned());
        db.save_run(&run)?;
        Ok(run)
    })
}

pub(super) fn claim_for_runners(
    store: &PostgresStore,
    node: &str,
    warm_keys: &[String],
) -> Result<Vec<Option<Run>>, StoreError> {
    store.write(Commit::Relaxed, |db, now| {
        let labels = db.node_labels(node)?;
        warm_keys
            .iter()
            .map(|k| db.hand_off(node, &labels, k, now))
            .collect()
    })
}
