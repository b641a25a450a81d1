//! Run output: appends under the per-run limit, reads, pruning.

use super::*;

pub(super) fn append_log(
    store: &PostgresStore,
    node: &str,
    id: RunId,
    stream: LogStream,
    data: &[u8],
    max_bytes: u64,
) -> Result<Appended, StoreError> {
    store.write(Commit::Relaxed, |db, now| {
        // The run's row lock orders appends of one run: the sequence
        // value is drawn after it, so commits come in `seq` order and a
        // follower never finds an earlier chunk appear behind its cursor.
        // It also makes the size check and update below atomic.
        transitions::check_assigned(&db.load_run(id, true)?, node)?;
        if data.is_empty() {
            return Ok(Appended::Stored);
        }
        let (stored, truncated) = db
            .query_opt(
                "SELECT bytes, truncated FROM run_log_sizes WHERE run_id = $1",
                &[&id.0],
            )?
            .map_or((0, false), |r| (r.get::<_, i64>(0), r.get::<_, bool>(1)));
        let stored = u64::try_from(stored).unwrap_or(0);
        let plan = transitions::plan_append(stored, truncated, data.len(), max_bytes);
        if plan.outcome == Appended::Dropped {
            return Ok(Appended::Dropped);
        }
        if plan.keep > 0 {
            db.execute(
                "INSERT INTO run_logs (run_id, stream, data) VALUES ($1, $2, $3)",
                &[&id.0, &stream.as_str(), &&data[..plan.keep]],
            )?;
        }
        if plan.notice {
            db.execute(
                "INSERT INTO run_logs (run_id, stream, data) VALUES ($1, $2, $3)",
                &[
                    &id.0,
                    &transitions::MARKER_STREAM,
                    &transitions::truncation_notice(max_bytes),
                ],
            )?;
        }
        let kept = u64::try_from(plan.keep).unwrap_or(u64::MAX);
        let bytes = i64::try_from(stored.saturating_add(kept)).unwrap_or(i64::MAX);
        db.execute(
            "INSERT INTO run_log_sizes (run_id, bytes, last_append, truncated, pruned)
             VALUES ($1, $2, $3, $4, FALSE)
             ON CONFLICT (run_id) DO UPDATE SET bytes = excluded.bytes,
                 last_append = excluded.last_append, truncated = excluded.truncated,
                 pruned = FALSE",
            &[&id.0, &bytes, &millis_sql(now), &(truncated || plan.notice)],
        )?;
        db.execute(
            "SELECT pg_notify($1, $2)",
            &[&LOG_CHANNEL, &id.0.to_string()],
        )?;
        Ok(plan.outcome)
    })
}

pub(super) fn prune_logs(
    store: &PostgresStore,
    retention: &LogRetention,
) -> Result<Pruned, StoreError> {
    if retention.max_age_ms.is_none() && retention.max_total_bytes.is_none() {
        return Ok(Pruned::default());
    }
    store.write(Commit::Relaxed, |db, now| {
        // Candidates oldest first, locked so two replicas pruning at
        // once do not both count the same bytes.
        let rows = db.query(
            "SELECT s.run_id, s.bytes, s.last_append FROM run_log_sizes s
             JOIN runs r ON r.id = s.run_id
             WHERE NOT s.pruned
               AND r.state IN ('succeeded', 'failed', 'cancelled', 'lost')
             ORDER BY s.last_append, s.run_id
             FOR UPDATE OF s",
            &[],
        )?;
        let candidates: Vec<(i64, u64, Millis)> = rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                    u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                )
            })
            .collect();
        let total: i64 = db
            .query_opt(
                "SELECT COALESCE(SUM(bytes), 0)::bigint FROM run_log_sizes",
                &[],
            )?
            .map_or(0, |r| r.get(0));
        let victims = transitions::prune_victims(
            &candidates,
            u64::try_from(total).unwrap_or(0),
            retention,
            now,
        );
        let mut pruned = Pruned::default();
        for (id, bytes) in victims {
            db.execute("DELETE FROM run_logs WHERE run_id = $1", &[&id])?;
            db.execute(
                "INSERT INTO run_logs (run_id, stream, data) VALUES ($1, $2, $3)",
                &[
                    &id,
                    &transitions::MARKER_STREAM,
                    &transitions::PRUNED_NOTICE,
                ],
            )?;
            db.execute(
                "UPDATE run_log_sizes SET bytes = 0, pruned = TRUE WHERE run_id = $1",
                &[&id],
            )?;
            pruned.runs += 1;
            pruned.bytes += bytes;
        }
        Ok(pruned)
    })
}

pub(super) fn read_log(
    store: &PostgresStore,
    id: RunId,
    after: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<LogChunk>, StoreError> {
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
    store.read(|db| {
        // The running total stops the page at the byte budget in the
        // server, so the rows past it never cross the wire.
        let rows = db.query(
            "SELECT seq, stream, data FROM (
                 SELECT seq, stream, data,
                        SUM(octet_length(data)) OVER (ORDER BY seq) - octet_length(data)
                            AS before_it
                 FROM run_logs WHERE run_id = $1 AND seq > $2
                 ORDER BY seq LIMIT $3
             ) page
             WHERE before_it < $4
             ORDER BY seq",
            &[&id.0, &after, &limit, &max_bytes],
        )?;
        if rows.is_empty() {
            // Distinguish "no output yet" from "no such run".
            db.load_run(id, false)?;
        }
        rows.iter()
            .map(|r| transitions::log_chunk(r.get(0), r.get(1), r.get(2)))
            .collect()
    })
}
