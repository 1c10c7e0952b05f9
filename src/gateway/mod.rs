//! The real-time gateway's moving parts, below the `/v1/ws` handler (`api::ws`): each
//! connection's bounded [`outbox`], the [`hub`] that fans committed events out to online
//! connections, the [`bus`] that carries events from the writers (of this node, and over
//! [`nats`] of the others) to the [`dispatch`]er, which keeps each followed channel in
//! order, the hot-channel [`cache`] and the [`reader`] in front of it, and the [`stats`]
//! counters.

pub mod bus;
pub mod cache;
pub mod dispatch;
pub mod hub;
pub mod nats;
pub mod outbox;
pub mod presence;
pub mod reader;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use self::bus::Bus;
use self::hub::Hub;
use self::reader::EventReader;

/// Limits and timers of WebSocket connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Without a hello within this, the server closes with 4003.
    pub hello_timeout: Duration,
    /// The server pings an idle connection this often.
    pub ping_interval: Duration,
    /// A connection silent this long (no frame, no pong) is dropped.
    pub idle_timeout: Duration,
    /// Bytes one connection may have queued before it is closed as a slow consumer (4008).
    pub queue_bytes: usize,
    /// Largest frame a client may send.
    pub max_frame_bytes: usize,
    /// Sends one connection may have waiting for commit; more wait before being read.
    pub max_in_flight: usize,
    /// Memory of the hot-channel cache.
    pub cache_bytes: usize,
    /// How long a user's last connection stays closed before they show offline.
    pub presence_grace: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            queue_bytes: 1 << 20,
            max_frame_bytes: 64 * 1024,
            max_in_flight: 256,
            cache_bytes: 64 << 20,
            presence_grace: Duration::from_secs(5),
        }
    }
}

/// What the `/v1/ws` handler shares.
#[derive(Clone)]
pub struct Gateway {
    pub hub: Arc<Hub>,
    pub presence: Arc<presence::Presence>,
    pub bus: Arc<dyn Bus>,
    pub reader: Arc<EventReader>,
}
