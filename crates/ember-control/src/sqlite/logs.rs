//! Run output: appends under the per-run limit, reads, pruning.

use super::*;

pub(super) fn append_log(
    store: &SqliteStore,
    node: &str,
    id: RunId,
    stream: LogStream,
    data: &[u8],
    max_bytes: u64,
) -> Result<Appended, StoreError> {
    store.write(Commit::Relaxed, |tx, now| {
        transitions::check_assigned(&must_load_run(tx, id)?, node)?;
        if data.is_empty() {
            return Ok(Appended::Stored);
        }
        let (stored, truncated): (i64, bool) = tx
            .prepare_cached("SELECT bytes, truncated FROM run_log_sizes WHERE run_id = ?1")?
            .query_row([id.0], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .unwrap_or((0, false));
        let stored = u64::try_from(stored).unwrap_or(0);
        let plan = transitions::plan_append(stored, truncated, data.len(), max_bytes);
        if plan.outcome == Appended::Dropped {
            return Ok(Appended::Dropped);
        }
        let mut insert =
            tx.prepare_cached("INSERT INTO run_logs (run_id, stream, data) VALUES (?1, ?2, ?3)")?;
        if plan.keep > 0 {
            insert.execute(params![id.0, stream.as_str(), &data[..plan.keep]])?;
        }
        if plan.notice {
            insert.execute(params![
                id.0,
                transitions::MARKER_STREAM,
                transitions::truncation_notice(max_bytes)
            ])?;
        }
        let kept = u64::try_from(plan.keep).unwrap_or(u64::MAX);
        tx.prepare_cached(
            "INSERT INTO run_log_sizes (run_id, bytes, last_append, truncated, pruned)
             VALUES (?1, ?2, ?3, ?4, 0)
             ON CONFLICT (run_id) DO UPDATE SET bytes = excluded.bytes,
                 last_append = excluded.last_append, truncated = excluded.truncated,
                 pruned = 0",
        )?
        .execute(params![
            id.0,
            i64::try_from(stored.saturating_add(kept)).unwrap_or(i64::MAX),
            millis_sql(now),
            truncated || plan.notice
        ])?;
        Ok(plan.outcome)
    })
}

pub(super) fn prune_logs(
    store: &SqliteStore,
    retention: &LogRetention,
) -> Result<Pruned, StoreError> {
    if retention.max_age_ms.is_none() && retention.max_total_bytes.is_none() {
        return Ok(Pruned::default());
    }
    store.write(Commit::Relaxed, |tx, now| {
        // Candidates oldest first: the age limit takes a prefix of
        // them, the budget as many more as it needs.
        let rows: Vec<(i64, i64, i64)> = tx
            .prepare_cached(
                "SELECT s.run_id, s.bytes, s.last_append FROM run_log_sizes s
                 JOIN runs r ON r.id = s.run_id
                 WHERE s.pruned = 0
                   AND r.state IN ('succeeded', 'failed', 'cancelled', 'lost')
                 ORDER BY s.last_append, s.run_id",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let total: i64 = tx
            .prepare_cached("SELECT COALESCE(SUM(bytes), 0) FROM run_log_sizes")?
            .query_row([], |r| r.get(0))?;
        let victims = transitions::prune_victims(
            &rows
                .iter()
                .map(|&(id, bytes, at)| {
                    (
                        id,
                        u64::try_from(bytes).unwrap_or(0),
                        u64::try_from(at).unwrap_or(0),
                    )
                })
                .collect::<Vec<_>>(),
            u64::try_from(total).unwrap_or(0),
            retention,
            now,
        );
        let mut pruned = Pruned::default();
        for (id, bytes) in victims {
            tx.prepare_cached("DELETE FROM run_logs WHERE run_id = ?1")?
                .execute([id])?;
            tx.prepare_cached("INSERT INTO run_logs (run_id, stream, data) VALUES (?1, ?2, ?3)")?
                .execute(params![
                    id,
                    transitions::MARKER_STREAM,
                    transitions::PRUNED_NOTICE
                ])?;
            tx.prepare_cached("UPDATE run_log_sizes SET bytes = 0, pruned = 1 WHERE run_id = ?1")?
                .execute([id])?;
            pruned.runs += 1;
            pruned.bytes += bytes;
        }
        Ok(pruned)
    })
}

pub(super) fn read_log(
    store: &SqliteStore,
    id: RunId,
    after: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<LogChunk>, StoreError> {
    let conn = store.lock()?;
    let mut stmt = conn.prepare_cached(
        "SELECT seq, stream, data FROM run_logs WHERE run_id = ?1 AND seq > ?2
         ORDER BY seq LIMIT ?3",
    )?;
    let mut rows = stmt.query(params![
        id.0,
        i64::try_from(after).unwrap_or(i64::MAX),
        i64::try_from(limit).unwrap_or(i64::MAX)
    ])?;
    // Rows are stepped one at a time: stopping at the byte budget
    // leaves the rest unread.
    let mut chunks = Vec::new();
    let mut bytes = 0usize;
    while bytes < max_bytes
        && let Some(row) = rows.next()?
    {
        let data: Vec<u8> = row.get(2)?;
        bytes = bytes.saturating_add(data.len());
        chunks.push(transitions::log_chunk(
            row.get(0)?,
            &row.get::<_, String>(1)?,
            data,
        )?);
    }
    drop(rows);
    drop(stmt);
    if chunks.is_empty() && load_run(&conn, id)?.is_none() {
        return Err(StoreError::RunNotFound(id));
    }
    Ok(chunks)
}
