//! The store conformance suite against the embedded SQLite backend.

use natter::store::conformance::{self, CHECKS};
use natter::store::sqlite::{SqliteOptions, SqliteStore};

#[tokio::test]
async fn sqlite_passes_every_conformance_check() {
    for name in CHECKS {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&SqliteOptions::new(dir.path().join("natter.db"))).unwrap();
        conformance::run(name, &store).await;
        store.close();
    }
}
