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
//! reports does not (see `Commit` and `SqliteStore::write`).
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction: SQLite then takes
//! the database's write lock at the start, so a read-check-write sequence
//! (compare-and-set, claiming) cannot interleave with another connection's,
//! whether that connection is in this process or another one.
//!
//! This file holds the schema, the connection and the transaction
//! wrapper, and the [`StateStore`] impl, which hands each call to the file
//! of its concern: `runs.rs`, `claims.rs`, `nodes.rs`, `deployments.rs`,
//! `logs.rs`.

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

mod claims;
mod deployments;
mod logs;
mod nodes;
mod runs;

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

impl StateStore for SqliteStore {
    fn create_deployment(&self, spec: &DeploymentSpec) -> Result<Deployment, StoreError> {
        deployments::create_deployment(self, spec)
    }

    fn get_deployment(&self, name: &str) -> Result<Option<Deployment>, StoreError> {
        deployments::get_deployment(self, name)
    }

    fn list_deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        deployments::list_deployments(self)
    }

    fn delete_deployment(&self, name: &str) -> Result<Deployment, StoreError> {
        deployments::delete_deployment(self, name)
    }

    fn submit_runs(
        &self,
        specs: &[RunSpec],
    ) -> Result<Vec<Result<Submitted, StoreError>>, StoreError> {
        runs::submit_runs(self, specs)
    }

    fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        runs::get_run(self, id)
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        runs::list_runs(self, filter)
    }

    fn transition_run(
        &self,
        id: RunId,
        expected: RunState,
        to: RunState,
    ) -> Result<Run, StoreError> {
        runs::transition_run(self, id, expected, to)
    }

    fn claim_runs(&self, req: &ClaimRequest) -> Result<Vec<Run>, StoreError> {
        claims::claim_runs(self, req)
    }

    fn release_claims(&self, owner: &str, ids: &[RunId]) -> Result<(), StoreError> {
        claims::release_claims(self, owner, ids)
    }

    fn assign_run(&self, owner: &str, id: RunId, node: &str) -> Result<Run, StoreError> {
        claims::assign_run(self, owner, id, node)
    }

    fn claim_for_runners(
        &self,
        node: &str,
        warm_keys: &[String],
    ) -> Result<Vec<Option<Run>>, StoreError> {
        claims::claim_for_runners(self, node, warm_keys)
    }

    fn report_batch(
        &self,
        node: &str,
        batch: &[RunReports],
    ) -> Result<Vec<Result<Run, StoreError>>, StoreError> {
        runs::report_batch(self, node, batch)
    }

    fn upsert_node(&self, spec: &NodeSpec) -> Result<Node, StoreError> {
        nodes::upsert_node(self, spec)
    }

    fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        nodes::list_nodes(self)
    }

    fn append_log(
        &self,
        node: &str,
        id: RunId,
        stream: LogStream,
        data: &[u8],
        max_bytes: u64,
    ) -> Result<Appended, StoreError> {
        logs::append_log(self, node, id, stream, data, max_bytes)
    }

    fn prune_logs(&self, retention: &LogRetention) -> Result<Pruned, StoreError> {
        logs::prune_logs(self, retention)
    }

    fn read_log(
        &self,
        id: RunId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>, StoreError> {
        logs::read_log(self, id, after, limit, max_bytes)
    }

    fn add_node_credential(&self, node: &str, token_sha256: &str) -> Result<(), StoreError> {
        nodes::add_node_credential(self, node, token_sha256)
    }

    fn revoke_node_credentials(&self, node: &str) -> Result<usize, StoreError> {
        nodes::revoke_node_credentials(self, node)
    }

    fn node_credentials(&self) -> Result<Vec<(String, NodeId)>, StoreError> {
        nodes::node_credentials(self)
    }

    fn mark_lost_runs(&self, stale_after_ms: Millis) -> Result<Vec<Run>, StoreError> {
        runs::mark_lost_runs(self, stale_after_ms)
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
        assert!(
            ember_error::chain(&err)
                .to_string()
                .contains("newer than this ember"),
            "{err}"
        );
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
