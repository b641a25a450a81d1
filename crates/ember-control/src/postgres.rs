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
//!   `FOR UPDATE SKIP LOCKED` and interleaves the groups (the fair
//!   round-robin): a row another replica is claiming is skipped, not
//!   waited for, and one it claimed a moment ago fails the re-check
//!   PostgreSQL makes on the locked row. Two replicas never get the same
//!   run, never wait on each other, and one finds nothing only when every
//!   claimable run is being claimed by others;
//! - the round-robin counter is a sequence, so concurrent claims don't
//!   compute the same "next" value;
//! - a deadlock or serialization failure (PostgreSQL aborts one side) is
//!   retried a few times, as the transaction had no effect.
//!
//! Connections come from a small pool; each `postgres::Client` runs its own
//! single-threaded runtime, so methods (and [`PostgresStore::open`]) must be
//! called from blocking threads (the server uses `spawn_blocking`), never
//! from async code directly. Dropping the store is safe anywhere.
//! Connections are plain TCP or Unix socket (no TLS).

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

    /// The warm hand-off of [`StateStore::claim_for_runner`], inside a
    /// write transaction.
    fn hand_off(
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

    /// One submit inside the caller's transaction. Errors other than
    /// [`StoreError::Backend`] happen before anything is written, so a batch
    /// can report them per run and still commit the others.
    fn submit(&mut self, spec: &RunSpec, now: Millis) -> Result<Submitted, StoreError> {
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
    fn earlier_submit(
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

    /// Sends `queue_key`'s group to the back of the round-robin.
    /// [`Self::mark_served`] for several groups at once: each gets a
    /// later serving number than the one before it in `keys`, while the
    /// queue rows are written in key order, so that two claimers updating
    /// the same groups cannot deadlock.
    fn mark_served_in_order(&mut self, keys: &[String]) -> Result<(), StoreError> {
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

    fn mark_served(&mut self, queue_key: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO queues (queue_key, last_served) VALUES ($1, nextval('queue_serve_seq'))
             ON CONFLICT (queue_key) DO UPDATE SET last_served = excluded.last_served",
            &[&queue_key],
        )?;
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
        spec.validate()?;
        self.write(Commit::Synced, |db, now| {
            let d = Deployment {
                spec: spec.clone(),
                created_at: now,
            };
            let inserted = db.execute(
                "INSERT INTO deployments (name, created_at, body) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&d.spec.name, &millis_sql(now), &serde_json::to_string(&d)?],
            )?;
            if inserted == 0 {
                return Err(StoreError::DeploymentExists(spec.name.clone()));
            }
            Ok(d)
        })
    }

    fn get_deployment(&self, name: &str) -> Result<Option<Deployment>, StoreError> {
        self.read(|db| db.load_deployment(name))
    }

    fn list_deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        self.read(|db| {
            db.query("SELECT body FROM deployments ORDER BY name", &[])?
                .iter()
                .map(|r| parse(r.get::<_, &str>(0)))
                .collect()
        })
    }

    fn submit_runs(
        &self,
        specs: &[RunSpec],
    ) -> Result<Vec<Result<Submitted, StoreError>>, StoreError> {
        self.write(Commit::Synced, |db, now| {
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

    fn get_run(&self, id: RunId) -> Result<Option<Run>, StoreError> {
        self.read(|db| match db.load_run(id, false) {
            Ok(run) => Ok(Some(run)),
            Err(StoreError::RunNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        })
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>, StoreError> {
        let states: Vec<&str> = filter.states.iter().map(|s| s.as_str()).collect();
        let limit = filter.limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX));
        let before = filter.before.map(|b| b.0);
        // NULL parameters switch a filter off, so one prepared statement
        // serves every combination.
        self.read(|db| {
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

    fn transition_run(
        &self,
        id: RunId,
        expected: RunState,
        to: RunState,
    ) -> Result<Run, StoreError> {
        self.write(Commit::Synced, |db, now| {
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

    fn claim_runs(&self, req: &ClaimRequest) -> Result<Vec<Run>, StoreError> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        self.write(Commit::Relaxed, |db, now| {
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

    fn release_claims(&self, owner: &str, ids: &[RunId]) -> Result<(), StoreError> {
        let ids: Vec<i64> = ids.iter().map(|i| i.0).collect();
        self.write(Commit::Relaxed, |db, _| {
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

    fn assign_run(&self, owner: &str, id: RunId, node: &str) -> Result<Run, StoreError> {
        self.write(Commit::Relaxed, |db, now| {
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

    fn claim_for_runners(
        &self,
        node: &str,
        warm_keys: &[String],
    ) -> Result<Vec<Option<Run>>, StoreError> {
        self.write(Commit::Relaxed, |db, now| {
            let labels = db.node_labels(node)?;
            warm_keys
                .iter()
                .map(|k| db.hand_off(node, &labels, k, now))
                .collect()
        })
    }

    fn report_batch(
        &self,
        node: &str,
        batch: &[RunReports],
    ) -> Result<Vec<Result<Run, StoreError>>, StoreError> {
        // Rows are locked in the batch's order; another transaction that
        // locks several of them in another order (mark_lost_runs) may
        // deadlock with this one, and then `write` retries it.
        self.write(Commit::Relaxed, |db, now| {
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

    fn upsert_node(&self, spec: &NodeSpec) -> Result<Node, StoreError> {
        if spec.id.is_empty() {
            return Err(ModelError::Empty { what: "node id" }.into());
        }
        self.write(Commit::Relaxed, |db, now| {
            let node = Node {
                spec: spec.clone(),
                last_heartbeat: now,
            };
            db.execute(
                "INSERT INTO nodes (id, last_heartbeat, body) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat,
                                                body = excluded.body",
                &[&spec.id, &millis_sql(now), &serde_json::to_string(&node)?],
            )?;
            Ok(node)
        })
    }

    fn list_nodes(&self) -> Result<Vec<Node>, StoreError> {
        self.read(|db| {
            db.query("SELECT body FROM nodes ORDER BY id", &[])?
                .iter()
                .map(|r| parse(r.get::<_, &str>(0)))
                .collect()
        })
    }

    fn add_node_credential(&self, node: &str, token_sha256: &str) -> Result<(), StoreError> {
        transitions::check_credential(node, token_sha256)?;
        self.write(Commit::Synced, |db, now| {
            db.execute(
                "INSERT INTO node_credentials (token_sha256, node, created_at) VALUES ($1, $2, $3)",
                &[&token_sha256, &node, &millis_sql(now)],
            )?;
            Ok(())
        })
    }

    fn revoke_node_credentials(&self, node: &str) -> Result<usize, StoreError> {
        self.write(Commit::Synced, |db, _| {
            let n = db.execute("DELETE FROM node_credentials WHERE node = $1", &[&node])?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn node_credentials(&self) -> Result<Vec<(String, NodeId)>, StoreError> {
        self.read(|db| {
            Ok(db
                .query(
                    "SELECT token_sha256, node FROM node_credentials ORDER BY token_sha256",
                    &[],
                )?
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect())
        })
    }

    fn mark_lost_runs(&self, stale_after_ms: Millis) -> Result<Vec<Run>, StoreError> {
        self.write(Commit::Relaxed, |db, now| {
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

    fn append_log(
        &self,
        node: &str,
        id: RunId,
        stream: LogStream,
        data: &[u8],
        max_bytes: u64,
    ) -> Result<Appended, StoreError> {
        self.write(Commit::Relaxed, |db, now| {
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

    fn prune_logs(&self, retention: &LogRetention) -> Result<Pruned, StoreError> {
        if retention.max_age_ms.is_none() && retention.max_total_bytes.is_none() {
            return Ok(Pruned::default());
        }
        self.write(Commit::Relaxed, |db, now| {
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

    fn read_log(
        &self,
        id: RunId,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<LogChunk>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let max_bytes = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        self.read(|db| {
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
        assert!(err.to_string().contains("newer than this ember"), "{err}");
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
