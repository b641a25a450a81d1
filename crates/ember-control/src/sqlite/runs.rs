//! Runs: submit (one transaction per batch), read, list, compare-and-set
//! transitions, node reports and lost nodes. The state changes themselves
//! are made by `crate::transitions`; this reads and writes the rows.

use super::deployments::load_deployment;
use super::*;

/// One submit inside the caller's transaction. Errors other than
/// [`StoreError::Backend`] happen before anything is written, so a batch can
/// report them per run and still commit the others.
pub(super) fn submit_in(
    tx: &Transaction<'_>,
    spec: &RunSpec,
    now: Millis,
) -> Result<Submitted, StoreError> {
    let spec_json = serde_json::to_string(spec)?;
    if let Some(key) = &spec.idempotency_key {
        let existing: Option<(i64, String)> = tx
            .prepare_cached("SELECT id, spec FROM runs WHERE idempotency_key = ?1")?
            .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((id, existing_spec)) = existing {
            if existing_spec != spec_json {
                return Err(StoreError::IdempotencyMismatch {
                    key: key.clone(),
                    existing: RunId(id),
                });
            }
            return Ok(Submitted {
                run: must_load_run(tx, RunId(id))?,
                created: false,
            });
        }
    }
    let deployment = match &spec.deployment {
        Some(name) => load_deployment(tx, name)?,
        None => None,
    };
    let mut run = transitions::resolve(spec, deployment, now)?;
    tx.prepare_cached(
        "INSERT INTO runs (state, queue_key, warm_key, deployment, idempotency_key, spec, body)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, '')",
    )?
    .execute(params![
        run.state.as_str(),
        run.queue_key(),
        run.warm_key(),
        run.deployment,
        run.idempotency_key,
        spec_json
    ])?;
    run.id = RunId(tx.last_insert_rowid());
    save_run(tx, &run)?;
    Ok(Submitted { run, created: true })
}

pub(super) fn query_runs(
    conn: &Connection,
    sql: &str,
    args: Vec<Value>,
) -> Result<Vec<Run>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let bodies = stmt
        .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    bodies
        .iter()
        .map(|b| serde_json::from_str(b).map_err(StoreError::from))
        .collect()
}

pub(super) fn submit_runs(
    store: &SqliteStore,
    specs: &[RunSpec],
) -> Result<Vec<Result<Submitted, StoreError>>, StoreError> {
    store.write(Commit::Synced, |tx, now| {
        specs
            .iter()
            .map(|spec| match submit_in(tx, spec, now) {
                Err(e @ StoreError::Backend(_)) => Err(e),
                other => Ok(other),
            })
            .collect()
    })
}

pub(super) fn get_run(store: &SqliteStore, id: RunId) -> Result<Option<Run>, StoreError> {
    let conn = store.lock()?;
    load_run(&conn, id)
}

pub(super) fn list_runs(store: &SqliteStore, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
    let mut sql = String::from("SELECT body FROM runs WHERE 1 = 1");
    let mut args: Vec<Value> = Vec::new();
    if !filter.states.is_empty() {
        sql.push_str(" AND state IN (");
        for (i, st) in filter.states.iter().enumerate() {
            sql.push_str(if i == 0 { "?" } else { ", ?" });
            args.push(Value::Text(st.as_str().to_owned()));
        }
        sql.push(')');
    }
    if let Some(d) = &filter.deployment {
        sql.push_str(" AND deployment = ?");
        args.push(Value::Text(d.clone()));
    }
    if let Some(n) = &filter.node {
        sql.push_str(" AND node = ?");
        args.push(Value::Text(n.clone()));
    }
    if let Some(before) = filter.before {
        sql.push_str(" AND id < ?");
        args.push(Value::Integer(before.0));
    }
    sql.push_str(" ORDER BY id DESC");
    if let Some(limit) = filter.limit {
        sql.push_str(" LIMIT ?");
        args.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
    }
    let conn = store.lock()?;
    query_runs(&conn, &sql, args)
}

pub(super) fn transition_run(
    store: &SqliteStore,
    id: RunId,
    expected: RunState,
    to: RunState,
) -> Result<Run, StoreError> {
    store.write(Commit::Synced, |tx, now| {
        let mut run = must_load_run(tx, id)?;
        transitions::expect_state(&run, expected)?;
        transitions::apply(&mut run, to, now)?;
        save_run(tx, &run)?;
        Ok(run)
    })
}

pub(super) fn report_batch(
    store: &SqliteStore,
    node: &str,
    batch: &[RunReports],
) -> Result<Vec<Result<Run, StoreError>>, StoreError> {
    store.write(Commit::Relaxed, |tx, now| {
        batch
            .iter()
            .map(|b| {
                let Some(mut run) = load_run(tx, b.run)? else {
                    return Ok(Err(StoreError::RunNotFound(b.run)));
                };
                let (changed, res) = transitions::apply_reports(&mut run, node, b, now);
                if changed {
                    save_run(tx, &run)?;
                }
                Ok(res.map(|()| run))
            })
            .collect()
    })
}

pub(super) fn mark_lost_runs(
    store: &SqliteStore,
    stale_after_ms: Millis,
) -> Result<Vec<Run>, StoreError> {
    store.write(Commit::Relaxed, |tx, now| {
        let cutoff = millis_sql(now.saturating_sub(stale_after_ms));
        let mut runs = query_runs(
            tx,
            "SELECT r.body FROM runs r JOIN nodes n ON n.id = r.node
             WHERE r.state IN ('scheduled', 'starting', 'running') AND n.last_heartbeat < ?1
             ORDER BY r.id",
            vec![Value::Integer(cutoff)],
        )?;
        for run in &mut runs {
            transitions::mark_lost(run, now)?;
            save_run(tx, run)?;
        }
        Ok(runs)
    })
}
