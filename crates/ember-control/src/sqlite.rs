//! The embedded [`StateStore`]: one SQLite file in WAL mode.
//!
//! Rows keep the whole record as JSON in `body` plus the few columns queries
//! filter on (`state`, `node`, `queue_key`, ...). Both are written by the
//! same `UPDATE`, so they never disagree, and adding a field to the model
//! needs no migration.
//!
//! Every commit appends to the WAL without an fsync (`synchronous=NORMAL`);
//! submits, cancels and deployments then fsync the WAL before they are
//! acknowledged, the run's progress through claims, placement and node
//! reports does not (see [`Commit`] and `SqliteStore::write`).
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction: SQLite then takes
//! the database's write lock at the start, so a read-check-write sequence
//! (compare-and-set, claiming) cannot interleave with another connection's,
//! whether that connection is in this process or another one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::claim;
use crate::model::{
    Deployment, DeploymentSpec, Millis, ModelError, Node, NodeId, NodeSpec, Run, RunId, RunSpec,
    RunState,
};
use crate::model::{LogChunk, LogStream};
use crate::store::{
    Appended, ClaimRequest, Clock, LogRetention, Pruned, RunFilter, RunReports, StateStore,
    StoreError, Submitted,
};
use crate::transitions::{self, Commit};

/// Schema migrations; `PRAGMA user_version` is the number applied. Append
/// only: a released migration is never edited.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deployments (
    name        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    body        TEXT NOT NULL
);
CREATE TABLE runs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    state           TEXT NOT NULL,
    queue_key       TEXT NOT NULL,
    -- Run::warm_key, for the warm hand-off
    warm_key        TEXT NOT NULL,
    deployment      TEXT,
    node            TEXT,
    idempotency_key TEXT UNIQUE,
    -- the spec as submitted, to tell a retried submit from a reused key
    spec            TEXT NOT NULL,
    claimed_by      TEXT,
    claim_expires   INTEGER,
    body            TEXT NOT NULL
);
-- claiming scans only queued runs, per group, in id order
CREATE INDEX runs_queued ON runs (queue_key, id) WHERE state = 'queued';
CREATE INDEX runs_warm ON runs (warm_key, id) WHERE state = 'queued';
CREATE INDEX runs_node ON runs (node, state);
CREATE INDEX runs_deployment ON runs (deployment, id);
-- round-robin memory: the claim sequence number a group was last served at
CREATE TABLE queues (
    queue_key   TEXT PRIMARY KEY,
    last_served INTEGER NOT NULL
);
CREATE TABLE nodes (
    id              TEXT PRIMARY KEY,
    last_heartbeat  INTEGER NOT NULL,
    body            TEXT NOT NULL
);
"#,
    r#"
-- run output, in append order
CREATE TABLE run_logs (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  INTEGER NOT NULL,
    stream  TEXT NOT NULL,
    data    BLOB NOT NULL
);
CREATE INDEX run_logs_run ON run_logs (run_id, seq);
-- the dispatcher counts active runs every round
CREATE INDEX runs_active ON runs (state) WHERE state IN ('scheduled', 'starting', 'running');
"#,
    r#"
-- per-node credentials: the SHA-256 of each bearer token, never the token
CREATE TABLE node_credentials (
    token_sha256    TEXT PRIMARY KEY,
    node            TEXT NOT NULL,
    created_at      INTEGER NOT NULL
);
CREATE INDEX node_credentials_node ON node_credentials (node);
"#,
    r#"
-- per-run log size, for the per-run limit and pruning by age or budget;
-- logs stored before this migration count as appended now
CREATE TABLE run_log_sizes (
    run_id      INTEGER PRIMARY KEY,
    bytes       INTEGER NOT NULL,
    last_append INTEGER NOT NULL,
    truncated   INTEGER NOT NULL DEFAULT 0,
    pruned      INTEGER NOT NULL DEFAULT 0
);
INSERT INTO run_log_sizes (run_id, bytes, last_append)
    SELECT run_id, SUM(length(data)), CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    FROM run_logs GROUP BY run_id;
CREATE INDEX run_log_sizes_age ON run_log_sizes (last_append, run_id) WHERE pruned = 0;
"#,
];

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

/// A [`StateStore`] on SQLite. One connection per `SqliteStore`; open one
/// per thread (or process) for parallel writers, they coordinate through
/// the file's locks.
pub struct SqliteStore {
    /// rusqlite connections are not `Sync`; the mutex makes the store
    /// shareable, and holding it across a transaction is what keeps this
    /// connection's transactions from nesting.
    conn: Mutex<Connection>,
    clock: Arc<dyn Clock>,
    /// The database's write-ahead log, which a `Synced` write fsyncs after
    /// it has let go of `conn`; `None` for in-memory databases, where
    /// syncing means nothing.
    wal: Option<std::fs::File>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database file at `path`.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        // Other connections (replicas, the claim threads in tests) hold the
        // write lock briefly; wait for them rather than failing.
        conn.busy_timeout(Duration::from_secs(30))?;
        // WAL: readers don't block the writer, and a commit is one append.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL: commits append to the WAL without an fsync. Writes that
        // must survive a power cut (submits, cancels, deployments) fsync
        // the WAL themselves once they have let go of the connection (see
        // `write`), so a slow disk delays the caller that asked for it and
        // not every transaction queued behind it.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // A 64 MiB page cache (the default is 2 MiB) and reads through
        // mmap: under a burst the control plane spent a sixth of its CPU
        // refilling the page cache (malloc and first-touch page faults);
        // with these a run cost 0.75 instead of 0.86 ms of its CPU.
        conn.execute_batch("PRAGMA cache_size = -65536; PRAGMA mmap_size = 268435456;")?;
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        Self::init(conn, clock, Some(PathBuf::from(wal_path)))
    }

    /// A private in-memory database, for tests; gone when dropped.
    pub fn open_in_memory(clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?, clock, None)
    }

    fn init(
        mut conn: Connection,
        clock: Arc<dyn Clock>,
        wal: Option<PathBuf>,
    ) -> Result<Self, StoreError> {
        migrate(&mut conn)?;
        // The migration's transaction created the log; it stays (the same
        // file, truncated at most) while this connection is open.
        let wal = wal
            .map(|p| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&p)
                    .map_err(|e| {
                        StoreError::Backend(format!("opening {}: {e}", p.display()).into())
                    })
            })
            .transpose()?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            clock,
            wal,
        })
    }

    /// Runs `f` in an immediate transaction; commits on `Ok`, rolls back
    /// (by dropping the transaction) on `Err`.
    ///
    /// Every commit appends to the WAL without an fsync
    /// (`synchronous=NORMAL`). A `Synced` write then fsyncs the WAL after
    /// releasing the connection, which makes its commit (and every commit
    /// before it) durable before it returns, while other transactions go
    /// on. Frames a checkpoint has already moved into the database file
    /// were synced by that checkpoint (SQLite syncs the log before and the
    /// database after each one). If that fsync fails the transaction is
    /// committed but may not be durable, and the call fails.
    fn write<T>(
        &self,
        commit: Commit,
        f: impl FnOnce(&Transaction<'_>, Millis) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let out = {
            let mut conn = self.lock()?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Read the clock after taking the write lock, so times stored by
            // successive transactions never go backwards between replicas
            // sharing one clock.
            let now = self.clock.now();
            let out = f(&tx, now)?;
            tx.commit()?;
            out
        };
        if commit == Commit::Synced
            && let Some(wal) = &self.wal
        {
            wal.sync_data()
                .map_err(|e| StoreError::Backend(format!("syncing the WAL: {e}").into()))?;
        }
        Ok(out)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn
            .lock()
            .map_err(|_| StoreError::Backend("sqlite connection mutex poisoned".into()))
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    // Immediate: two processes opening a fresh file at once must not both
    // run migration 1.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let applied = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Backend(
            format!(
                "database schema version {applied} is newer than this ember ({})",
                MIGRATIONS.len()
            )
            .into(),
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn millis_sql(ms: Millis) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// A node's labels, for matching runs' selectors.
fn node_labels(conn: &Connection, node: &str) -> Result<BTreeMap<String, String>, StoreError> {
    let body: Option<String> = conn
        .prepare_cached("SELECT body FROM nodes WHERE id = ?1")?
        .query_row([node], |r| r.get(0))
        .optional()?;
    let body = body.ok_or_else(|| StoreError::NodeNotFound(node.to_owned()))?;
    Ok(serde_json::from_str::<Node>(&body)?.spec.labels)
}

/// The warm hand-off of [`StateStore::claim_for_runner`], inside a write
/// transaction.
fn hand_off_in(
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

fn load_run(conn: &Connection, id: RunId) -> Result<Option<Run>, StoreError> {
    let body: Option<String> = conn
        .prepare_cached("SELECT body FROM runs WHERE id = ?1")?
        .query_row([id.0], |r| r.get(0))
        .optional()?;
    body.map(|b| serde_json::from_str(&b).map_err(StoreError::from))
        .transpose()
}

fn must_load_run(conn: &Connection, id: RunId) -> Result<Run, StoreError> {
    load_run(conn, id)?.ok_or(StoreError::RunNotFound(id))
}

/// Writes the run's body and indexed columns; a run going back to the queue
/// or leaving it also drops any claim on it.
fn save_run(conn: &Connection, run: &Run) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE runs SET state = ?2, node = ?3, body = ?4, claimed_by = NULL, claim_expires = NULL
         WHERE id = ?1",
    )?
    .execute(params![
        run.id.0,
        run.state.as_str(),
        run.node,
        serde_json::to_string(run)?
    ])?;
    Ok(())
}

/// Records that `queue_key`'s group was served just now: it gets the next
/// claim sequence number, which sends it to the back of the round-robin.
fn mark_served(conn: &Connection, queue_key: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO queues (queue_key, last_served)
         VALUES (?1, (SELECT COALESCE(MAX(last_served), 0) + 1 FROM queues))
         ON CONFLICT (queue_key) DO UPDATE SET last_served = excluded.last_served",
    )?
    .execute([queue_key])?;
    Ok(())
}

fn load_deployment(conn: &Connection, name: &str) -> Result<Option<Deployment>, StoreError> {
    let body: Option<String> = conn
        .prepare_cached("SELECT body FROM deployments WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?;
    body.map(|b| serde_json::from_str(&b).map_err(StoreError::from))
        .transpose()
}

/// One submit inside the caller's transaction. Errors other than
/// [`StoreError::Backend`] happen before anything is written, so a batch can
/// report them per run and still commit the others.
fn submit_in(tx: &Transaction<'_>, spec: &RunSpec, now: Millis) -> Result<Submitted, StoreError> {
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

fn query_runs(conn: &Connection, sql: &str, args: Vec<Value>) -> Result<Vec<Run>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let bodies = stmt
        .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    bodies
        .iter()
        .map(|b| serde_json::from_str(b).map_err(StoreError::from))
        .collect()
}

impl StateStore for SqliteStore {
    fn create_deployment(&self, spec: &DeploymentSpec) -> Result<Deployment, StoreError> {
        spec.validate()?;
        self.write(Commit::Synced, |tx, now| {
            if load_deployment(tx, &spec.name)?.is_some() {
                return Err(StoreError::DeploymentExists(spec.name.clone()));
            }
            let d = Deployment {
                spec: spec.clone(),
                created_at: now,
            };
            tx.prepare_cached(
                "INSERT INTO deployments (name, created_at, body) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![
                d.spec.name,
                millis_sql(now),
                serde_json::to_string(&d)?
            ])?;
            Ok(d)
        })
    }

    fn get_deployment(&self, name: &str) -> Result<Option<Deployment>, StoreError> {
        let conn = self.lock()?;
        load_deployment(&conn, name)
    }

    fn list_deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached("SELECT body FROM deployments ORDER BY name")?;
        let bodies = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        bodies
            .iter()
            .map(|b| serde_json::from_str(b).map_err(StoreError::from))
            .collect()
    }

    fn submit_runs(
        &self,
        specs: &[RunSpec],
    ) -> Result<Vec<Result<Submitted, StoreError>>, StoreError> {
        self.write(Commit::Synced, |tx, now| {
            specs
                .iter()
                .map(|spec| match submit_in(tx, spec, now) {
                    Err(e @ StoreError::Backend(_)) => Err(e),
                    other => Ok(other),
                })
                .collect()
        })
    }

    fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        let conn = self.lock()?;
        load_run(&conn, id)
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
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
        let conn = self.lock()?;
        query_runs(&conn, &sql, args)
    }

    fn transition_run(
        &self,
        id: RunId,
        expected: RunState,
        to: RunState,
    ) -> Result<Run, StoreError> {
        self.write(Commit::Synced, |tx, now| {
            let mut run = must_load_run(tx, id)?;
            transitions::expect_state(&run, expected)?;
            transitions::apply(&mut run, to, now)?;
            save_run(tx, &run)?;
            Ok(run)
        })
    }

    fn claim_runs(&self, req: &ClaimRequest) -> Result<Vec<Run>, StoreError> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        self.write(Commit::Relaxed, |tx, now| {
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

    fn release_claims(&self, owner: &str, ids: &[RunId]) -> Result<(), StoreError> {
        self.write(Commit::Relaxed, |tx, _| {
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

    fn assign_run(&self, owner: &str, id: RunId, node: &str) -> Result<Run, StoreError> {
        self.write(Commit::Relaxed, |tx, now| {
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

    fn claim_for_runners(
        &self,
        node: &str,
        warm_keys: &[String],
    ) -> Result<Vec<Option<Run>>, StoreError> {
        self.write(Commit::Relaxed, |tx, now| {
            let labels = node_labels(tx, node)?;
            warm_keys
                .iter()
                .map(|k| hand_off_in(tx, node, &labels, k, now))
                .collect()
        })
    }

    fn report_batch(
        &self,
        node: &str,
        batch: &[RunReports],
    ) -> Result<Vec<Result<Run, StoreError>>, StoreError> {
        self.write(Commit::Relaxed, |tx, now| {
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

    fn upsert_node(&self, spec: &NodeSpec) -> Result<Node, StoreError> {
        if spec.id.is_empty() {
            return Err(ModelError::Empty { what: "node id" }.into());
        }
        self.write(Commit::Relaxed, |tx, now| {
            let node = Node {
                spec: spec.clone(),
                last_heartbeat: now,
            };
            tx.prepare_cached(
                "INSERT INTO nodes (id, last_heartbeat, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat,
                                                body = excluded.body",
            )?
            .execute(params![
                spec.id,
                millis_sql(now),
                serde_json::to_string(&node)?
            ])?;
            Ok(node)
        })
    }

    fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached("SELECT body FROM nodes ORDER BY id")?;
        let bodies = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        bodies
            .iter()
            .map(|b| serde_json::from_str(b).map_err(StoreError::from))
            .collect()
    }

    fn append_log(
        &self,
        node: &str,
        id: RunId,
        stream: LogStream,
        data: &[u8],
        max_bytes: u64,
    ) -> Result<Appended, StoreError> {
        self.write(Commit::Relaxed, |tx, now| {
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
            let mut insert = tx.prepare_cached(
                "INSERT INTO run_logs (run_id, stream, data) VALUES (?1, ?2, ?3)",
            )?;
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

    fn prune_logs(&self, retention: &LogRetention) -> Result<Pruned, StoreError> {
        if retention.max_age_ms.is_none() && retention.max_total_bytes.is_none() {
            return Ok(Pruned::default());
        }
        self.write(Commit::Relaxed, |tx, now| {
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
                tx.prepare_cached(
                    "INSERT INTO run_logs (run_id, stream, data) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![
                    id,
                    transitions::MARKER_STREAM,
                    transitions::PRUNED_NOTICE
                ])?;
                tx.prepare_cached(
                    "UPDATE run_log_sizes SET bytes = 0, pruned = 1 WHERE run_id = ?1",
                )?
                .execute([id])?;
                pruned.runs += 1;
                pruned.bytes += bytes;
            }
            Ok(pruned)
        })
    }

    fn read_log(
        &self,
        id: RunId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>, StoreError> {
        let conn = self.lock()?;
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

    fn add_node_credential(&self, node: &str, token_sha256: &str) -> Result<(), StoreError> {
        transitions::check_credential(node, token_sha256)?;
        self.write(Commit::Synced, |tx, now| {
            tx.prepare_cached(
                "INSERT INTO node_credentials (token_sha256, node, created_at) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![token_sha256, node, millis_sql(now)])?;
            Ok(())
        })
    }

    fn revoke_node_credentials(&self, node: &str) -> Result<usize, StoreError> {
        self.write(Commit::Synced, |tx, _| {
            Ok(tx
                .prepare_cached("DELETE FROM node_credentials WHERE node = ?1")?
                .execute(params![node])?)
        })
    }

    fn node_credentials(&self) -> Result<Vec<(String, NodeId)>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT token_sha256, node FROM node_credentials ORDER BY token_sha256",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn mark_lost_runs(&self, stale_after_ms: Millis) -> Result<Vec<Run>, StoreError> {
        self.write(Commit::Relaxed, |tx, now| {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PinnedImage;
    use crate::store::ManualClock;

    fn clock() -> Arc<dyn Clock> {
        ManualClock::new(1_000)
    }

    #[test]
    fn in_memory_store_works_without_a_file() {
        let s = SqliteStore::open_in_memory(clock()).expect("open");
        let image = PinnedImage::new("app", format!("sha256:{}", "0".repeat(64))).expect("pin");
        let sub = s
            .submit_run(&RunSpec {
                image: Some(image),
                ..RunSpec::default()
            })
            .expect("submit");
        assert_eq!(sub.run.id, RunId(1));
        assert_eq!(s.get_run(RunId(1)).expect("get"), Some(sub.run));
    }

    #[test]
    fn file_store_uses_wal_and_records_its_schema_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        drop(SqliteStore::open(&path, clock()).expect("create"));
        // Reopening must not re-run migration 1 (it would fail: tables exist).
        let s = SqliteStore::open(&path, clock()).expect("reopen");
        let conn = s.lock().expect("lock");
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("journal_mode");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("user_version");
        assert_eq!(mode, "wal");
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn a_database_from_a_newer_ember_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.pragma_update(None, "user_version", 99)
                .expect("set version");
        }
        let err = SqliteStore::open(&path, clock()).expect_err("newer schema");
        assert!(err.to_string().contains("newer than this ember"), "{err}");
    }

    #[test]
    fn a_failed_transaction_leaves_nothing_behind() {
        let s = SqliteStore::open_in_memory(clock()).expect("open");
        let res: Result<(), StoreError> = s.write(Commit::Synced, |tx, now| {
            tx.execute(
                "INSERT INTO nodes (id, last_heartbeat, body) VALUES ('n', ?1, '{}')",
                [millis_sql(now)],
            )?;
            Err(StoreError::NodeNotFound("forced".into()))
        });
        assert!(res.is_err());
        assert!(s.list_nodes().expect("list").is_empty());
    }
}
