//! The state-store conformance suite against SQLite files.

use std::path::PathBuf;
use std::sync::Arc;

use ember_control::conformance::Harness;
use ember_control::sqlite::SqliteStore;
use ember_control::{Clock, StateStore};

/// One SQLite file in a temporary directory; every `open` is a new
/// connection to it, as another replica or a restarted process would make.
struct SqliteFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl SqliteFile {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("control.db");
        SqliteFile { _dir: dir, path }
    }
}

impl Harness for SqliteFile {
    fn open(&self, clock: Arc<dyn Clock>) -> Box<dyn StateStore> {
        Box::new(SqliteStore::open(&self.path, clock).expect("open sqlite"))
    }
}

ember_control::state_store_conformance!(SqliteFile::new());
