//! Running the server: [`serve`] takes a bound listener, the config and a shutdown signal
//! from its caller (the binary, or a test on `127.0.0.1:0`).

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{AppState, app};
use crate::clock::now_ms;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::gateway::bus::{Bus, LocalBus};
use crate::gateway::cache::EventCache;
use crate::gateway::dispatch::{Dispatcher, Handoff};
use crate::gateway::hub::Hub;
use crate::gateway::nats::NatsBus;
use crate::gateway::reader::EventReader;
use crate::gateway::stats::Stats;
use crate::store::Store;
use crate::wire::protocol::close;

/// Opens the store under `config.data_dir` and serves the API on `listener` (and `/metrics`
/// on `config.metrics_listen`, if set) until `shutdown` resolves. Then it drains:
/// `/readyz` answers 503 at once; after `config.drain.delay` new connections are refused
/// and WebSocket clients are closed with 1012; in-flight requests get up to
/// `config.drain.timeout` to be answered; and the writer commits everything queued before
/// this returns. A write that was not answered by then was not acknowledged.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if config.hash_cost == crate::auth::HashCost::insecure_fast() {
        tracing::warn!(
            "password hashing uses insecure test parameters; never run real accounts like this"
        );
    }
    let stats = Arc::new(Stats::default());
    let hub = Arc::new(Hub::new(Arc::clone(&stats)));
    let cache = Arc::new(EventCache::new(config.gateway.cache_bytes));
    let (bus, dispatcher, cluster, dispatch_thread): (Arc<dyn Bus>, _, _, _) = match &config.bus {
        None => {
            let (dispatcher, thread) = Dispatcher::start(
                Arc::clone(&hub),
                cache.clone(),
                None,
                tokio::runtime::Handle::current(),
                Handoff::Inline,
            );
            (LocalBus::new(dispatcher.clone()), dispatcher, None, thread)
        }
        Some(urls) => {
            let (nats, thread) =
                NatsBus::start(urls, config.node_id, Arc::clone(&hub), cache.clone()).await?;
            let dispatcher = nats.dispatcher().clone();
            (nats.clone(), dispatcher, Some(nats), thread)
        }
    };
    let publish = Arc::clone(&bus);
    tracing::info!(store = %config.store_location().describe(), "opening the store");
    let store = crate::store::open(
        config.store_options(Some(Arc::new(move |events| publish.publish(events)))),
    )
    .await?;
    let reader = Arc::new(EventReader::new(
        cache,
        store.clone(),
        stats,
        Arc::clone(&config.features),
    ));
    dispatcher.set_reader(Arc::clone(&reader));
    // With other nodes, this one checks each second where the channels it follows stand.
    let check = cluster.as_ref().map(|nats| {
        tokio::spawn(crate::gateway::dispatch::check(
            Arc::clone(&hub),
            store.clone(),
            dispatcher.clone(),
            nats.recover(),
        ))
    });
    let presence =
        crate::gateway::presence::Presence::new(store.clone(), config.gateway.presence_grace);
    let presence_ticker = crate::gateway::presence::start_ticker(&presence);
    let pinger = crate::gateway::hub::start_pinger(&hub, config.gateway.ping_interval);
    bus.attach_presence(&presence);
    let drain_presence = Arc::clone(&presence);
    let gateway = Gateway {
        hub: Arc::clone(&hub),
        presence,
        bus,
        reader,
    };
    let drain = config.drain;
    let metrics_listen = config.metrics_listen;
    let http = config.http;
    let trusted = config.trusted_proxies.clone();
    let webhooks = config.webhooks.clone();
    let node_id = config.node_id;
    // Uploaded files: part files of interrupted uploads are dropped, and files a crash
    // left half-removed settled, before anything is served.
    let files_dir = config.files_dir();
    let files = Arc::new(
        crate::files::FileStore::open(&files_dir, node_id)
            .with_context(|| format!("open the files directory {}", files_dir.display()))?,
    );
    files.settle_trash(&*store).await?;
    let collector = tokio::spawn(crate::files::collect_forever(
        store.clone(),
        Arc::clone(&files),
        config.files.grace,
        config.files.collect_every,
    ));
    let sealer = config.sealer()?.map(Arc::new);
    let state = AppState::new(store.clone(), config, gateway, files, sealer);
    // Outgoing webhooks, delivered from this node (a lease per subscription keeps one
    // node at a time on each).
    let deliverer =
        crate::delivery::Deliverer::new(store.clone(), webhooks, node_id, state.delivery_stats())?;
    let delivery = tokio::spawn(Arc::clone(&deliverer).run());
    let addr = listener.local_addr()?;
    let purge = tokio::spawn(maintain(store.clone()));
    let metrics = match metrics_listen {
        Some(at) => {
            let listener = TcpListener::bind(at)
                .await
                .with_context(|| format!("listen for /metrics on {at}"))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics listening");
            let app = crate::api::metrics_app(state.clone());
            // Stopped gracefully after the main server, so a scraper's idle keep-alive
            // connection does not keep the app state (and the store) alive.
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await
            });
            Some((stop, task))
        }
        None => None,
    };
    tracing::info!(%addr, "natter listening");
    let drain_state = state.clone();
    let (begun_tx, begun_rx) = tokio::sync::oneshot::channel::<()>();
    // Connections are capped below the open-files limit, so the server always has
    // descriptors left for its database, its logs and `/healthz`.
    let max_connections = match crate::process::max_fds() {
        Some(fds) => http
            .max_connections
            .min((fds as usize).saturating_sub(64).max(1)),
        None => http.max_connections,
    };
    let limits = crate::conns::ConnLimits {
        max_connections,
        max_per_address: http.max_connections_per_address,
        header_timeout: http.header_timeout,
        idle_timeout: http.idle_timeout,
        trusted,
    };
    let conn_stats = Arc::clone(state.conn_stats());
    // No Nagle (set per connection): a small frame written while an earlier one is
    // unacknowledged would otherwise wait for the peer's delayed ACK, ~40 ms.
    let served = crate::conns::serve(listener, app(state), limits, conn_stats, async move {
        shutdown.await;
        drain_state.set_ready(false);
        tracing::info!(delay = ?drain.delay, "draining: /readyz answers 503");
        tokio::time::sleep(drain.delay).await;
        tracing::info!("draining: refusing new connections, finishing in-flight requests");
        drain_state
            .gateway()
            .hub
            .close_all(close::RESTARTING, "server restarting: reconnect and resume");
        let _ = begun_tx.send(());
    });
    // In-flight requests get `drain.timeout` from the moment the listener closes.
    let served = {
        let mut served = std::pin::pin!(served.into_future());
        tokio::select! {
            r = &mut served => r,
            Ok(()) = begun_rx => match tokio::time::timeout(drain.timeout, &mut served).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(timeout = ?drain.timeout, "draining: requests still in flight; not waiting longer");
                    Ok(())
                }
            },
        }
    };
    // Upgraded WebSockets outlive the HTTP server: give them a bounded time to write
    // their answers and the 1012 close.
    let deadline = tokio::time::Instant::now() + drain.timeout;
    while hub.stats().connections.load(Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    purge.abort();
    let _ = purge.await;
    collector.abort();
    let _ = collector.await;
    deliverer.stop(Duration::from_secs(2)).await;
    delivery.abort();
    let _ = delivery.await;
    presence_ticker.abort();
    let _ = presence_ticker.await;
    pinger.abort();
    let _ = pinger.await;
    // Users whose offline change was still waiting out its grace: record their time now.
    let seen = drain_presence.pending_offline();
    if !seen.is_empty()
        && let Err(e) = store.record_last_seen(&seen).await
    {
        tracing::warn!(users = seen.len(), error = %e, "record when users were last online");
    }
    if let Some(check) = check {
        check.abort();
        let _ = check.await;
    }
    if let Some((stop, mut task)) = metrics {
        let _ = stop.send(());
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    // Every handler is done (or its bounded wait ran out): commit everything queued.
    // A write queued after this is refused, never acknowledged.
    store.close().await;
    drop(store);
    // The writers are gone: the dispatcher hands on what they published, and stops.
    // (Off the async threads: the stop waits behind whatever the dispatcher has queued.)
    let joined = tokio::task::spawn_blocking(move || {
        dispatcher.stop();
        dispatch_thread.join()
    });
    if tokio::time::timeout(Duration::from_secs(5), joined)
        .await
        .is_err()
    {
        tracing::warn!("dispatcher thread still running at shutdown");
    }
    if let Some(nats) = cluster {
        // The other nodes get this node's last commits now rather than by their check.
        nats.close().await;
    }
    served?;
    tracing::info!("natter stopped");
    Ok(())
}

/// The store's upkeep (expired sessions deleted, …) at start and then hourly, so its
/// tables do not grow forever.
async fn maintain(store: Arc<dyn Store>) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        every.tick().await;
        match store.maintain(now_ms()).await {
            Ok(done) => tracing::debug!(%done, "store upkeep"),
            Err(e) => tracing::warn!(error = %e, "store upkeep failed; will retry in an hour"),
        }
        // Deleted accounts whose leaving their channels was cut short (a shard down, a
        // crash) leave them now.
        match store.departing().await {
            Ok(users) if !users.is_empty() => {
                if let Err(e) = crate::store::finish_deletion(&*store, &users).await {
                    tracing::warn!(error = %e, "finishing account deletions failed; will retry in an hour");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "read the accounts being deleted"),
        }
    }
}

/// The address in the line [`serve`] logs once it listens (`natter listening addr=…`, or
/// its JSON form):
/// how a parent process that started `natter serve --listen 127.0.0.1:0` learns its port.
pub fn listening_addr(log_line: &str) -> Option<SocketAddr> {
    if !log_line.contains("natter listening") {
        return None;
    }
    // Human lines say `addr=…`; JSON lines `"addr":"…"`.
    let (_, rest) = log_line
        .split_once("addr=")
        .or_else(|| log_line.split_once("\"addr\":\""))?;
    rest.split(|c: char| c.is_whitespace() || c == '"')
        .next()?
        .parse()
        .ok()
}
