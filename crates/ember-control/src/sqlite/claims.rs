//! Claims: fair claiming ([`crate::claim`] decides what is taken),
//! releases, assignment to a node and the warm hand-off.

use super::*;

/// The warm hand-off of [`StateStore::claim_for_runner`], inside a write
/// transaction.
pub(super) fn hand_off_in(
    tx: &Transaction<'_>,
    node: &str,
    labels: &BTreeMap<String, String>,
    warm_key: &str,
    now: Millis,
) -> Result<Option<Run>, StoreError> {
    // Oldest first, parsed one at a time: usually the first fits, and this
    // runs once per finished run in a burst. The bound keeps one call cheap
    // when many queued runs of the key want labels this node lacks.
    //
    // Claims are checked here rather than in the WHERE clause: with the
    // time as a bound parameter there, SQLite re-prepared the statement
    // on every call (a tenth of the control plane's CPU in a burst).
    let mut stmt = tx.prepare_cached(
        "SELECT claimed_by IS NULL, claim_expires, body FROM runs
         WHERE state = 'queued' AND warm_key = ?1
         ORDER BY id LIMIT 64",
    )?;
    let mut rows = stmt.query([warm_key])?;
    let now_sql = millis_sql(now);
    let mut found = None;
    while let Some(row) = rows.next()? {
        let unclaimed: bool = row.get(0)?;
        let expires: Option<i64> = row.get(1)?;
        if !unclaimed && expires.is_none_or(|t| t > now_sql) {
            // Another replica's scheduler holds it.
            continue;
        }
        let run: Run = serde_json::from_str(&row.get::<_, String>(2)?)?;
        if crate::selector::matches(&run.node_selector, labels) {
            found = Some(run);
            break;
        }
    }
    drop(rows);
    drop(stmt);
    let Some(mut run) = found else {
        return Ok(None);
    };
    mark_served(tx, &run.queue_key())?;
    transitions::hand_off(&mut run, node, now)?;
    save_run(tx, &run)?;
    Ok(Some(run))
}

/// Records that `queue_key`'s group was served just now: it gets the next
/// claim sequence number, which sends it to the back of the round-robin.
pub(super) fn mark_served(conn: &Connection, queue_key: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO queues (queue_key, last_served)
         VALUES (?1, (SELECT COALESCE(MAX(last_served), 0) + 1 FROM queues))
         ON CONFLICT (queue_key) DO UPDATE SET last_served = excluded.last_served",
    )?
    .execute([queue_key])?;
    Ok(())
}

/// A node's labels, for matching runs' selectors.
pub(super) fn node_labels(
    conn: &Connection,
    node: &str,
) -> Result<BTreeMap<String, String>, StoreError> {
    let body: Option<String> = conn
        .prepare_cached("SELECT body FROM nodes WHERE id = ?1")?
        .query_row([node], |r| r.get(0))
        .optional()?;
    let body = body.ok_or_else(|| StoreError::NodeNotFound(node.to_owned()))?;
    Ok(serde_json::from_str::<Node>(&body)?.spec.labels)
}

pub(super) fn claim_runs(store: &SqliteStore, req: &ClaimRequest) -> Result<Vec<Run>, StoreError> {
    if req.limit == 0 {
        return Ok(Vec::new());
    }
    store.write(Commit::Relaxed, |tx, now| {
        // The fairness is `claim`'s; this only reads and writes rows.
        let now_sql = millis_sql(now);
        let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
        let groups: Vec<String> = tx
            .prepare_cached(claim::GROUPS_SQL)?
            .query_map(params![now_sql, limit], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut oldest = tx.prepare_cached(
            "SELECT body FROM runs
             WHERE queue_key = ?1 AND id > ?2 AND state = 'queued'
               AND (claimed_by IS NULL OR claim_expires <= ?3)
             ORDER BY id LIMIT ?4",
        )?;
        let mut runs = claim::take_fairly(groups.len(), req.limit, |g, after, n| {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            let bodies: Vec<String> = oldest
                .query_map(params![groups[g], after, now_sql, n], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            bodies
                .iter()
                .map(|b| Ok(serde_json::from_str::<Run>(b)?))
                .collect()
        })?;
        drop(oldest);
        for key in claim::served_order(&runs) {
            mark_served(tx, &key)?;
        }
        let expires = millis_sql(now.saturating_add(req.lease_ms));
        let mut set = tx.prepare_cached(
            "UPDATE runs SET claimed_by = ?2, claim_expires = ?3, body = ?4 WHERE id = ?1",
        )?;
        for run in &mut runs {
            run.times.claimed = Some(now);
            set.execute(params![
                run.id.0,
                req.owner,
                expires,
                serde_json::to_string(&*run)?
            ])?;
        }
        Ok(runs)
    })
}

pub(super) fn release_claims(
    store: &SqliteStore,
    owner: &str,
    ids: &[RunId],
) -> Result<(), StoreError> {
    store.write(Commit::Relaxed, |tx, _| {
        let mut stmt = tx.prepare_cached(
            "UPDATE runs SET claimed_by = NULL, claim_expires = NULL
             WHERE id = ?1 AND claimed_by = ?2",
        )?;
        for id in ids {
            stmt.execute(params![id.0, owner])?;
        }
        Ok(())
    })
}

pub(super) fn assign_run(
    store: &SqliteStore,
    owner: &str,
    id: RunId,
    node: &str,
) -> Result<Run, StoreError> {
    store.write(Commit::Relaxed, |tx, now| {
        let claimed_by: Option<Option<String>> = tx
            .prepare_cached("SELECT claimed_by FROM runs WHERE id = ?1")?
            .query_row([id.0], |r| r.get(0))
            .optional()?;
        let claimed_by = claimed_by.ok_or(StoreError::RunNotFound(id))?;
        // An expired lease still owned by us is fine: nobody else took it.
        if claimed_by.as_deref() != Some(owner) {
            return Err(StoreError::NotClaimed {
                run: id,
                owner: owner.to_owned(),
            });
        }
        let node_known: bool = tx
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM nodes WHERE id = ?1)")?
            .query_row([node], |r| r.get(0))?;
        if !node_known {
            return Err(StoreError::NodeNotFound(node.to_owned()));
        }
        let mut run = must_load_run(tx, id)?;
        transitions::expect_state(&run, RunState::Queued)?;
        transitions::apply(&mut run, RunState::Scheduled, now)?;
        run.node = Some(node.to_owned());
        save_run(tx, &run)?;
        Ok(run)
    })
}

pub(super) fn claim_for_runners(
    store: &SqliteStore,
    node: &str,
    warm_keys: &[String],
) -> Result<Vec<Option<Run>>, StoreError> {
    store.write(Commit::Relaxed, |tx, now| {
        let labels = node_labels(tx, node)?;
        warm_keys
            .iter()
            .map(|k| hand_off_in(tx, node, &labels, k, now))
            .collect()
    })
}
