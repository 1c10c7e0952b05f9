//! Running the server: [`serve`] takes a bound listener, the config and a shutdown signal
//! from its caller (the binary, or a test on `127.0.0.1:0`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::{AppState, app};
use crate::config::Config;
use crate::store::sqlite::{SqliteOptions, SqliteStore};

/// Opens the store under `config.data_dir`, serves the API on `listener` until `shutdown`
/// resolves, then stops taking requests, lets in-flight ones finish, and waits until the
/// writer has committed everything queued.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = Arc::new(open_store(&config)?);
    let state = AppState::new(store.clone(), config);
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "natter listening");
    let drain_state = state.clone();
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        drain_state.set_ready(false);
        tracing::info!("shutting down: finishing in-flight requests");
    })
    .await?;
    // Every handler is done; the app state (and its store handle) is dropped with the
    // router, so ours is the last one and closing waits for the writer to drain.
    match Arc::try_unwrap(store) {
        Ok(store) => store.close(),
        Err(_) => {
            tracing::warn!("store still shared at shutdown; the writer drains when it is dropped")
        }
    }
    tracing::info!("natter stopped");
    Ok(())
}

/// Opens the embedded store the config names.
pub fn open_store(config: &Config) -> anyhow::Result<SqliteStore> {
    SqliteStore::open(&SqliteOptions {
        path: config.db_path(),
        node_id: config.node_id,
        write_queue: config.write_queue,
        read_connections: config.read_connections,
    })
}
