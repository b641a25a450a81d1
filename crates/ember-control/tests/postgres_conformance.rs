//! The state-store conformance suite against PostgreSQL: one private server
//! (Debian's package, started by the testkit) per test process, a fresh
//! database per test.

use std::sync::Arc;

use ember_control::conformance::Harness;
use ember_control::postgres::PostgresStore;
use ember_control::{Clock, StateStore};
use ember_testkit::postgres::Postgres;

/// One database; every `open` is a new store with its own connections, as
/// another replica or a restarted process would make.
struct PostgresDb {
    url: String,
}

impl PostgresDb {
    fn new() -> Self {
        let pg = Postgres::shared().expect("start postgres");
        PostgresDb {
            url: pg.create_database().expect("create database"),
        }
    }
}

impl Harness for PostgresDb {
    fn open(&self, clock: Arc<dyn Clock>) -> Box<dyn StateStore> {
        Box::new(PostgresStore::open(&self.url, clock).expect("open postgres"))
    }
}

ember_control::state_store_conformance!(PostgresDb::new());
