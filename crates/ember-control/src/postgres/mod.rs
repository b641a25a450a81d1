//! The [`StateStore`] on PostgreSQL, for several `ember control` replicas
//! sharing one database.
//!
//! Same row layout as [`sqlite`](crate::sqlite): the whole record as JSON
//! in `body` plus the columns queries filter on, written together. What
//! differs is concurrency. SQLite has one writer at a time; here replicas
//! write at once, so:
//!
//! - a read-check-write on one run locks its row (`SELECT ... FOR UPDATE`)
//!   for the rest of the transaction, which makes every state change a true
//!   compare-and-set;
//! - claiming takes each queue group's oldest runs with
//!   `FOR UPDATE SKIP LOCKED`, and the crate's `claim` interleaves the groups
//!   (the fair round-robin both stores share): a row another replica is claiming is skipped, not
//!   waited for, and one it claimed a moment ago fails the re-check
//!   PostgreSQL makes on the locked row. Two replicas never get the same
//!   run, never wait on each other, and one finds nothing only when every
//!   claimable run is being claimed by others;
//! - the round-robin counter is a sequence, so concurrent claims don't
//!   compute the same "next" value; a claim takes its groups' numbers in
//!   serving order but writes their rows in key order, so two claimers
//!   cannot deadlock on them;
//! - a deadlock or serialization failure (PostgreSQL aborts one side) is
//!   retried a few times, as the transaction had no effect.
//!
//! Connections come from a small pool; each `postgres::Client` runs its own
//! single-threaded runtime, so methods (and [`PostgresStore::open`]) must be
//! called from blocking threads (the server uses `spawn_blocking`), never
//! from async code directly. Dropping the store is safe anywhere.
//! Connections are plain TCP or Unix socket (no TLS).
//!
//! This file holds the schema, the connection pool, the transaction
//! wrapper (`Db`, with the row helpers every concern uses), `LISTEN`, and
//! the [`StateStore`] impl, which hands each call to the file of its
//! concern: `runs.rs`, `claims.rs`, `nodes.rs`, `deployments.rs`,
//! `logs.rs`.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Config, GenericClient, NoTls, Statement};

use crate::claim;
use crate::model::{
    Deployment, DeploymentSpec, Millis, ModelError, Node, NodeId, NodeSpec, Run, RunId, RunSpec,
    RunState,
};
use crate::model::{LogChunk, LogStream};
use crate::store::{
    Appended, ClaimRequest, Clock, LogRetention, Pruned, RunFilter, RunReports, StateStore,
    StoreError, StoreEvent, Submitted,
};
use crate::transitions::{self, Commit};

mod claims;
mod deployments;
mod logs;
mod nodes;
mod runs;

/// Schema migrations; `ember_schema.version` is the number applied. Append
/// only: a released migration is never edited.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deployments (
    name        TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    body        TEXT NOT NULL
);
CREATE SEQUENCE runs_id_seq;
CREATE TABLE runs (
    id              BIGINT PRIMARY KEY,
    state           TEXT NOT NULL,
    queue_key       TEXT NOT NULL,
    warm_key        TEXT NOT NULL,
    deployment      TEXT,
    node            TEXT,
    idempotency_key TEXT UNIQUE,
    spec            TEXT NOT NULL,
    claimed_by      TEXT,
    claim_expires   BIGINT,
    body            TEXT NOT NULL
);
CREATE INDEX runs_queued ON runs (queue_key, id) WHERE state = 'queued';
CREATE INDEX runs_warm ON runs (warm_key, id) WHERE state = 'queued';
CREATE INDEX runs_node ON runs (node, state);
CREATE INDEX runs_deployment ON runs (deployment, id);
CREATE SEQUENCE queue_serve_seq;
CREATE TABLE queues (
    queue_key   TEXT PRIMARY KEY,
    last_served BIGINT NOT NULL
);
CREATE TABLE nodes (
    id              TEXT PRIMARY KEY,
    last_heartbeat  BIGINT NOT NULL,
    body            TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE run_logs (
    seq     BIGSERIAL PRIMARY KEY,
    run_id  BIGINT NOT NULL,
    stream  TEXT NOT NULL,
    data    BYTEA NOT NULL
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
    created_at      BIGINT NOT NULL
);
CREATE INDEX node_credentials_node ON node_credentials (node);
"#,
    r#"
-- per-run log size, for the per-run limit and pruning by age or budget;
-- logs stored before this migration count as appended now
CREATE TABLE run_log_sizes (
    run_id      BIGINT PRIMARY KEY,
    bytes       BIGINT NOT NULL,
    last_append BIGINT NOT NULL,
    truncated   BOOLEAN NOT NULL DEFAULT FALSE,
    pruned      BOOLEAN NOT NULL DEFAULT FALSE
);
INSERT INTO run_log_sizes (run_id, bytes, last_append)
    SELECT run_id, SUM(octet_length(data)), (extract(epoch FROM clock_timestamp()) * 1000)::bigint
    FROM run_logs GROUP BY run_id;
CREATE INDEX run_log_sizes_age ON run_log_sizes (last_append, run_id) WHERE NOT pruned;
"#,
];

/// Key of the advisory lock that serializes migrations between replicas
/// starting at once ("ember" in ASCII).
const MIGRATION_LOCK: i64 = 0x0065_6d62_6572;
/// How often a transaction PostgreSQL aborted (deadlock, serialization
/// failure) is tried again before the error is returned.
const RETRIES: usize = 5;
/// Connections per store; more callers wait for one to be returned.
const DEFAULT_POOL: usize = 8;
/// The channel replicas `NOTIFY` when runs become claimable.
const CHANNEL: &str = "ember_queue";
/// The channel replicas `NOTIFY` (payload: the run id) when a run's output
/// was appended.
const LOG_CHANNEL: &str = "ember_log";
/// How often the listener thread checks whether its store was dropped,
/// and how long it waits before reconnecting after an error.
const LISTEN_TICK: Duration = Duration::from_secs(1);

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

/// A [`StateStore`] on PostgreSQL.
pub struct PostgresStore {
    pool: Pool,
    clock: Arc<dyn Clock>,
    /// Tells [`StateStore::watch`]'s listener thread to stop.
    closed: Arc<AtomicBool>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No URL: it may hold a password.
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`, or
    /// the key=value form), creating or migrating the schema if needed.
    pub fn open(url: &str, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        Self::open_with_pool(url, DEFAULT_POOL, clock)
    }

    /// [`PostgresStore::open`] with at most `size` connections.
    pub fn open_with_pool(
        url: &str,
        size: usize,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let config = Config::from_str(url)?;
        let store = PostgresStore {
            pool: Pool {
                config,
                size: size.max(1),
                state: Mutex::new(PoolState {
                    idle: Vec::new(),
                    open: 0,
                }),
                returned: Condvar::new(),
            },
            clock,
            closed: Arc::new(AtomicBool::new(false)),
        };
        {
            let mut conn = store.pool.get()?;
            migrate(&mut conn.client)?;
        }
        Ok(store)
    }

    /// Runs `f` in a transaction; commits on `Ok`, rolls back on `Err`, and
    /// tries again when PostgreSQL aborted it to break a deadlock.
    /// `Relaxed` commits run with `synchronous_commit = off` (the pool's
    /// sessions are set so): PostgreSQL acknowledges before its WAL is
    /// flushed. `Synced` ones switch it on for their transaction.
    fn write<T>(
        &self,
        commit: Commit,
        mut f: impl FnMut(&mut Db<'_, postgres::Transaction<'_>>, Millis) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.get()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = (|| {
                let Conn { client, cache } = &mut *conn;
                let mut tx = client.transaction()?;
                let mut db = Db { c: &mut tx, cache };
                // Sessions default to relaxed (set at connect): most writes
                // are, and this saves them a round trip.
                if commit == Commit::Synced {
                    db.execute("SET LOCAL synchronous_commit TO ON", &[])?;
                }
                let now = self.clock.now();
                let out = f(&mut db, now)?;
                tx.commit()?;
                Ok(out)
            })();
            match res {
                Err(e) if attempt < RETRIES && retryable(&e) => continue,
                other => return other,
            }
        }
    }

    /// Runs `f` outside a transaction (one statement reads a consistent
    /// snapshot by itself).
    fn read<T>(
        &self,
        f: impl FnOnce(&mut Db<'_, Client>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.get()?;
        let Conn { client, cache } = &mut *conn;
        f(&mut Db { c: client, cache })
    }
}

/// Whether PostgreSQL aborted the transaction to resolve a conflict, so
/// running it again may succeed.
fn retryable(e: &StoreError) -> bool {
    let StoreError::Backend(b) = e else {
        return false;
    };
    b.downcast_ref::<postgres::Error>()
        .and_then(|e| e.code())
        .is_some_and(|c| {
            *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
        })
}

/// A pooled connection with its prepared statements.
struct Conn {
    client: Client,
    /// Statements are per connection; preparing once saves a round trip
    /// per query.
    cache: HashMap<&'static str, Statement>,
}

struct PoolState {
    idle: Vec<Conn>,
    /// Connections that exist, idle or lent out.
    open: usize,
}

/// A fixed-size pool; a connection found closed is dropped and replaced
/// on the next `get`, which is how the store survives a database restart.
struct Pool {
    config: Config,
    size: usize,
    state: Mutex<PoolState>,
    returned: Condvar,
}

impl Pool {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, PoolState>, StoreError> {
        self.state
            .lock()
            .map_err(|_| StoreError::Backend("postgres pool mutex poisoned".into()))
    }

    fn get(&self) -> Result<Lease<'_>, StoreError> {
        let mut st = self.lock()?;
        loop {
            while let Some(conn) = st.idle.pop() {
                if !conn.client.is_closed() {
                    return Ok(Lease {
                        pool: self,
                        conn: Some(conn),
                    });
                }
                st.open -= 1;
            }
            if st.open < self.size {
                st.open += 1;
                drop(st);
                let connected = self.config.connect(NoTls).and_then(|mut c| {
                    c.batch_execute("SET synchronous_commit TO OFF")?;
                    Ok(c)
                });
                return match connected {
                    Ok(client) => Ok(Lease {
                        pool: self,
                        conn: Some(Conn {
                            client,
                            cache: HashMap::new(),
                        }),
                    }),
                    Err(e) => {
                        self.lock()?.open -= 1;
                        self.returned.notify_one();
                        Err(e.into())
                    }
                };
            }
            st = self
                .returned
                .wait(st)
                .map_err(|_| StoreError::Backend("postgres pool mutex poisoned".into()))?;
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Each `postgres::Client` owns a small tokio runtime, and tokio
        // panics when a runtime is dropped on an async worker — which is
        // where the last `Arc` of a server's store may go. A plain thread
        // is always a fine place.
        let idle = match self.state.get_mut() {
            Ok(st) => std::mem::take(&mut st.idle),
            Err(poisoned) => std::mem::take(&mut poisoned.into_inner().idle),
        };
        if !idle.is_empty() {
            let _ = std::thread::spawn(move || drop(idle)).join();
        }
    }
}

/// A connection lent out of the pool; going out of scope returns it.
struct Lease<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
}

impl std::ops::Deref for Lease<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a lease holds its connection until dropped")
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let (Some(conn), Ok(mut st)) = (self.conn.take(), self.pool.state.lock()) {
            if conn.client.is_closed() {
                st.open -= 1;
            } else {
                st.idle.push(conn);
            }
        }
        self.pool.returned.notify_one();
    }
}

/// A client or transaction with the connection's statement cache.
struct Db<'a, C: GenericClient> {
    c: &'a mut C,
    cache: &'a mut HashMap<&'static str, Statement>,
}

impl<C: GenericClient> Db<'_, C> {
    fn stmt(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.cache.get(sql) {
            return Ok(s.clone());
        }
        let s = self.c.prepare(sql)?;
        self.cache.insert(sql, s.clone());
        Ok(s)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.query(&s, params)?)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<postgres::Row>, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.query_opt(&s, params)?)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let s = self.stmt(sql)?;
        Ok(self.c.execute(&s, params)?)
    }

    /// Runs' bodies from a query returning `body` as its first column.
    fn runs(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Run>, StoreError> {
        self.query(sql, params)?
            .iter()
            .map(|r| parse(r.get::<_, &str>(0)))
            .collect()
    }

    fn load_run(&mut self, id: RunId, lock: bool) -> Result<Run, StoreError> {
        let row = if lock {
            self.query_opt("SELECT body FROM runs WHERE id = $1 FOR UPDATE", &[&id.0])?
        } else {
            self.query_opt("SELECT body FROM runs WHERE id = $1", &[&id.0])?
        };
        let row = row.ok_or(StoreError::RunNotFound(id))?;
        parse(row.get::<_, &str>(0))
    }

    /// A node's labels, for matching runs' selectors.
    fn node_labels(&mut self, node: &str) -> Result<BTreeMap<String, String>, StoreError> {
        let row = self
            .query_opt("SELECT body FROM nodes WHERE id = $1", &[&node])?
            .ok_or_else(|| StoreError::NodeNotFound(node.to_owned()))?;
        Ok(parse::<Node>(row.get::<_, &str>(0))?.spec.labels)
    }

    /// Writes the run's body and indexed columns; a run going back to the
    /// queue or leaving it also drops any claim on it.
    fn save_run(&mut self, run: &Run) -> Result<(), StoreError> {
        let body = serde_json::to_string(run)?;
        self.execute(
            "UPDATE runs SET state = $2, node = $3, body = $4, claimed_by = NULL,
                             claim_expires = NULL
             WHERE id = $1",
            &[&run.id.0, &run.state.as_str(), &run.node, &body],
        )?;
        Ok(())
    }

    fn load_deployment(&mut self, name: &str) -> Result<Option<Deployment>, StoreError> {
        self.query_opt("SELECT body FROM deployments WHERE name = $1", &[&name])?
            .map(|r| parse(r.get::<_, &str>(0)))
            .transpose()
    }

    /// Tells the other replicas' dispatchers (at commit) that runs may be
    /// claimable.
    fn notify(&mut self) -> Result<(), StoreError> {
        self.execute("SELECT pg_notify($1, '')", &[&CHANNEL])?;
        Ok(())
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, StoreError> {
    Ok(serde_json::from_str(body)?)
}

fn millis_sql(ms: Millis) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    // Two replicas starting on a fresh database must not both run
    // migration 1; the lock ends with the transaction.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS ember_schema (version INTEGER NOT NULL)")?;
    let applied = match tx.query_opt("SELECT version FROM ember_schema", &[])? {
        Some(row) => row.get::<_, i32>(0),
        None => {
            tx.execute("INSERT INTO ember_schema (version) VALUES (0)", &[])?;
            0
        }
    };
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
        tx.batch_execute(sql)?;
        let v = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute("UPDATE ember_schema SET version = $1", &[&v])?;
    }
    tx.commit()?;
    Ok(())
}

impl StateStore for PostgresStore {
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

    /// A thread with its own connection `LISTEN`s on the queue channel and
    /// calls `wake` per notification — and once after every (re)connect,
    /// for what it may have missed while disconnected. It ends soon after
    /// the store is dropped.
    fn watch(&self, wake: Box<dyn Fn(StoreEvent) + Send + Sync>) -> Result<(), StoreError> {
        let config = self.pool.config.clone();
        let closed = self.closed.clone();
        // Connect once here so a bad configuration is an error now, not a
        // log line later.
        let first = listen(&config)?;
        std::thread::Builder::new()
            .name("ember-pg-listen".into())
            .spawn(move || {
                let mut client = Some(first);
                wake(StoreEvent::Queue);
                while !closed.load(Ordering::Relaxed) {
                    let Some(c) = client.as_mut() else {
                        std::thread::sleep(LISTEN_TICK);
                        client = listen(&config).ok();
                        if client.is_some() {
                            wake(StoreEvent::Queue);
                        }
                        continue;
                    };
                    let failed = {
                        let mut notes = c.notifications();
                        let mut it = notes.timeout_iter(LISTEN_TICK);
                        loop {
                            match it.next() {
                                Ok(Some(n)) => wake(event(&n)),
                                Ok(None) => break false,
                                Err(e) => {
                                    tracing_free_log(&e);
                                    break true;
                                }
                            }
                        }
                    };
                    if failed || c.is_closed() {
                        client = None;
                    }
                }
            })
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        Ok(())
    }
}

/// What a notification means; anything unexpected counts as a queue
/// change (a spurious wake-up is harmless).
fn event(n: &postgres::Notification) -> StoreEvent {
    match n.payload().parse() {
        Ok(id) if n.channel() == LOG_CHANNEL => StoreEvent::Log(RunId(id)),
        _ => StoreEvent::Queue,
    }
}

/// A connection listening on the queue and log channels.
fn listen(config: &Config) -> Result<Client, StoreError> {
    let mut client = config.connect(NoTls)?;
    client.batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {LOG_CHANNEL}"))?;
    Ok(client)
}

/// The listener has no logger of its own (the library does not depend on
/// `tracing`); the error reaches stderr once per failure, and the thread
/// reconnects.
fn tracing_free_log(e: &postgres::Error) {
    eprintln!("ember: postgres listener: {e}; reconnecting");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManualClock;
    use ember_testkit::postgres::Postgres;

    fn clock() -> Arc<dyn Clock> {
        ManualClock::new(1_000)
    }

    #[test]
    fn reopening_does_not_migrate_twice_and_newer_schemas_are_refused() {
        let pg = Postgres::shared().expect("postgres");
        let url = pg.create_database().expect("database");
        drop(PostgresStore::open(&url, clock()).expect("create"));
        drop(PostgresStore::open(&url, clock()).expect("reopen"));
        let db = url.rsplit('/').next().expect("db name");
        pg.psql_in(db, "UPDATE ember_schema SET version = 99")
            .expect("bump version");
        let err = PostgresStore::open(&url, clock()).expect_err("newer schema");
        assert!(
            ember_error::chain(&err)
                .to_string()
                .contains("newer than this ember"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_url_or_unreachable_server_is_a_clear_error() {
        let err = PostgresStore::open("postgres://u@127.0.0.1:1/x", clock()).expect_err("refused");
        assert!(matches!(err, StoreError::Backend(_)), "{err}");
        assert!(PostgresStore::open("not a url at all ::", clock()).is_err());
    }

    #[test]
    fn a_submit_through_one_replica_wakes_the_others() {
        use crate::model::PinnedImage;
        let pg = Postgres::shared().expect("postgres");
        let url = pg.create_database().expect("database");
        let a = PostgresStore::open(&url, clock()).expect("replica a");
        let b = PostgresStore::open(&url, clock()).expect("replica b");
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        a.watch(Box::new(move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        }))
        .expect("watch");
        // The wake after connecting.
        rx.recv_timeout(Duration::from_secs(10))
            .expect("initial wake");
        let image = PinnedImage::new("app", format!("sha256:{}", "1".repeat(64))).expect("pin");
        b.submit_run(&RunSpec {
            image: Some(image),
            ..RunSpec::default()
        })
        .expect("submit");
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10))
                .expect("replica a hears of b's submit"),
            StoreEvent::Queue
        );
    }

    #[test]
    fn a_killed_connection_is_replaced() {
        let pg = Postgres::shared().expect("postgres");
        let url = pg.create_database().expect("database");
        let s = PostgresStore::open_with_pool(&url, 1, clock()).expect("open");
        let db = url.rsplit('/').next().expect("db name");
        pg.psql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
        ))
        .expect("terminate");
        // Termination is asynchronous: wait until the backend is gone, or
        // the first call below could still succeed on it and the second
        // find it dead.
        let count = format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'");
        for _ in 0..200 {
            if pg.psql(&count).expect("count").trim() == "0" {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        // The first call may see the dead connection; the next gets a new one.
        let _ = s.list_nodes();
        assert!(s.list_nodes().expect("reconnected").is_empty());
    }
}
