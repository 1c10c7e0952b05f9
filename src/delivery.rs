//! Outgoing webhooks: each subscription's channel events POSTed to its URL, one event per
//! request, in seq order, at least once, from a durable cursor in the store.
//!
//! A worker polls the store for active subscriptions that are due (no backoff pending, no
//! other node's lease) and behind their channel. It takes the subscription's lease (so one
//! node at a time delivers it, in order), reads the channel's log after the cursor and
//! posts each event, signed with HMAC-SHA256 over `"{timestamp}.{body}"`. The cursor is
//! recorded after every [`WINDOW`] events and at the end of a run, so a crash re-sends at
//! most that many (the receiver tells them apart by the idempotency key, the event's
//! channel and seq). A failure (a non-2xx answer, a timeout, a refused connection)
//! records the error and backs off exponentially with jitter; a subscription failing for
//! longer than `dead_after` turns dead until an admin resumes it.
//!
//! Requests go only to addresses the [`AddressPolicy`] permits: loopback, private,
//! link-local and other non-public addresses are refused unless an allow-list names them
//! (server-side request forgery), checked on every connection by the resolver, and for
//! literal addresses before the request. Redirects are not followed.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::mac::hmac_sha256;

use crate::clock::now_ms;
use crate::model::{Event, Role};
use crate::store::{DeliveryFailure, DeliveryReport, ReadFence, Store, Subscription};

/// Events delivered between two records of the cursor: the most a crash re-sends.
pub const WINDOW: i64 = 20;
/// How long a lease lasts at least without a record renewing it (another node then
/// takes over). It is at least three request timeouts, and a run renews it once a third
/// of it has passed, so it never runs out under a run that is still going.
const LEASE_MS: i64 = 30_000;
/// How often the store is asked for due subscriptions.
const POLL: Duration = Duration::from_millis(200);
/// Subscriptions delivered at once by one node.
const AT_ONCE: usize = 32;
/// Events read from a channel's log at a time.
const PAGE: u32 = 100;

/// How deliveries behave (`--webhook-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// One request's limit, connecting included.
    pub timeout: Duration,
    /// The longest backoff between tries.
    pub max_backoff: Duration,
    /// Failing this long turns a subscription dead.
    pub dead_after: Duration,
    /// Networks requests may go to although they are not public.
    pub allow: Vec<Network>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            dead_after: Duration::from_secs(24 * 3600),
            allow: Vec::new(),
        }
    }
}

/// An address range, `192.168.0.0/16` or `::1/128` (an address alone is its own /32 or
/// /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an address or a network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix must be 0 to {max}"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 network written in its IPv6-mapped form is the IPv4 network.
        let (net, prefix) = match self.addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && self.prefix >= 96 => (
                IpAddr::V4(v6.to_ipv4_mapped().expect("mapped")),
                self.prefix - 96,
            ),
            addr => (addr, self.prefix),
        };
        let this = Self { addr: net, prefix };
        this.contains_canonical(ip.to_canonical())
    }

    fn contains_canonical(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Which addresses webhook requests may reach.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allow: Vec<Network>,
}

impl AddressPolicy {
    pub fn new(allow: Vec<Network>) -> Self {
        Self { allow }
    }

    /// Public unicast addresses, and anything the allow-list names.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow.iter().any(|n| n.contains(ip)) || is_public(ip)
    }
}

/// Not loopback, private, link-local, shared (CGNAT), documentation, benchmarking,
/// multicast, broadcast, unspecified or reserved.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_unspecified()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            // Beside the IPv6 special ranges: IPv4-compatible (::/96), site-local
            // (fec0::/10) and 6to4 (2002::/16), which can name any IPv4 address.
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
                || first == 0x2002
                || v6.segments()[..6].iter().all(|s| *s == 0)
                || first == 0x2001 && v6.segments()[1] == 0x0db8
                || first == 0x0064)
        }
    }
}

/// Why a subscription's URL is refused.
#[derive(Debug, thiserror::Error)]
pub enum UrlRefused {
    #[error("url must be an absolute http or https URL: {0}")]
    Malformed(String),
    #[error(
        "url resolves to {0}, which is not a public address; an operator may allow it with --webhook-allow-networks"
    )]
    Private(IpAddr),
    #[error("url's host {0} does not resolve")]
    Unresolved(String),
}

/// Checks a subscription's URL: http(s), a host, no credentials, and every address it
/// resolves to now permitted. (Deliveries check again on every connection.)
pub async fn check_url(url: &str, policy: &AddressPolicy) -> Result<(), UrlRefused> {
    let parsed = reqwest::Url::parse(url).map_err(|e| UrlRefused::Malformed(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(UrlRefused::Malformed(
            "the scheme is not http or https".into(),
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlRefused::Malformed(
            "credentials in the URL are not kept secret; use the signature".into(),
        ));
    }
    let host = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => return permit(policy, IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => return permit(policy, IpAddr::V6(ip)),
        Some(url::Host::Domain(d)) => d.to_owned(),
        None => return Err(UrlRefused::Malformed("no host".into())),
    };
    let port = parsed.port_or_known_default().unwrap_or(80);
    let addrs: Vec<SocketAddr> = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(Iterator::collect)
    .unwrap_or_default();
    if addrs.is_empty() {
        return Err(UrlRefused::Unresolved(host));
    }
    for a in addrs {
        permit(policy, a.ip())?;
    }
    Ok(())
}

fn permit(policy: &AddressPolicy, ip: IpAddr) -> Result<(), UrlRefused> {
    if policy.permits(ip) {
        Ok(())
    } else {
        Err(UrlRefused::Private(ip))
    }
}

/// The resolver of the webhook client: the system's, keeping only permitted addresses,
/// so a name that resolves (or re-resolves) to an internal address is never connected to.
struct GuardedResolver {
    policy: AddressPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| policy.permits(a.ip()))
                .collect();
            if found.is_empty() {
                return Err(format!(
                    "{host} resolves to no public address (refused: server-side request forgery guard)"
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

/// The `Natter-Signature` header of a request with `body` sent at `unix_secs`:
/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the secret>`.
pub fn signature(secret: &str, unix_secs: i64, body: &[u8]) -> String {
    let mut signed = format!("{unix_secs}.").into_bytes();
    signed.extend_from_slice(body);
    let mac = hmac_sha256(secret.as_bytes(), &signed);
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={unix_secs},v1={hex}")
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    delivered: AtomicU64,
    failed: AtomicU64,
    died: AtomicU64,
    /// Events the subscriptions seen in the last poll were behind, at most.
    lag: AtomicU64,
    running: AtomicU64,
}

impl DeliveryStats {
    pub fn render(&self, out: &mut String) {
        use crate::metrics::{render_header, render_one, render_value};
        render_header(
            out,
            "natter_webhook_deliveries_total",
            "counter",
            "Outgoing webhook requests by outcome (a failed one is retried after a backoff).",
        );
        for (outcome, n) in [("delivered", &self.delivered), ("failed", &self.failed)] {
            render_value(
                out,
                "natter_webhook_deliveries_total",
                &format!("outcome=\"{outcome}\""),
                n.load(Ordering::Relaxed),
            );
        }
        render_one(
            out,
            "natter_webhook_subscriptions_died_total",
            "counter",
            "Subscriptions that failed past --webhook-dead-after and stopped being tried.",
            self.died.load(Ordering::Relaxed),
        );
        render_one(
            out,
            "natter_webhook_lag_events",
            "gauge",
            "The most events an active subscription due for delivery was behind its channel, at the last poll.",
            self.lag.load(Ordering::Relaxed),
        );
        render_one(
            out,
            "natter_webhook_deliveries_running",
            "gauge",
            "Subscriptions this node is delivering now.",
            self.running.load(Ordering::Relaxed),
        );
    }
}

/// The delivery worker of one node.
pub struct Deliverer {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    config: DeliveryConfig,
    /// The lease holder's name: stable across restarts of this node, so a restarted node
    /// takes its own leases back at once.
    node: String,
    running: Mutex<HashSet<i64>>,
    stats: Arc<DeliveryStats>,
    /// The lease's length (ms).
    lease_ms: i64,
    /// Set at shutdown: runs record where they are and end.
    stopping: std::sync::atomic::AtomicBool,
}

impl Deliverer {
    pub fn new(
        store: Arc<dyn Store>,
        config: DeliveryConfig,
        node_id: u16,
        stats: Arc<DeliveryStats>,
    ) -> anyhow::Result<Arc<Self>> {
        let lease_ms = LEASE_MS.max(3 * config.timeout.as_millis() as i64);
        let resolver = Arc::new(GuardedResolver {
            policy: AddressPolicy::new(config.allow.clone()),
        });
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(resolver)
            .user_agent(concat!("natter-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Arc::new(Self {
            store,
            client,
            config,
            node: format!("node-{node_id}"),
            running: Mutex::new(HashSet::new()),
            stats,
            lease_ms,
            stopping: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Ends the runs under way (each records its cursor and lets its lease go) and
    /// waits up to `within` for them.
    pub async fn stop(&self, within: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + within;
        while self.stats.running.load(Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls and delivers until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        while !self.stopping.load(Ordering::SeqCst) {
            if let Err(e) = self.poll().await {
                tracing::debug!(error = %e, "poll webhook subscriptions");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn poll(self: &Arc<Self>) -> crate::store::Result<()> {
        let now = now_ms();
        let mut after = 0;
        let mut lag = 0;
        // Every due subscription, a page at a time (none starves behind the others).
        loop {
            let page = self
                .store
                .due_subscriptions(&self.node, now, after, 500)
                .await?;
            let Some(last) = page.last() else {
                break;
            };
            after = last.id;
            let full = page.len() == 500;
            lag = lag.max(self.start_due(page, now).await?);
            if !full {
                break;
            }
        }
        self.stats.lag.store(lag.max(0) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Starts a run for each of `due` that is behind its channel and not running here;
    /// the most events one of them is behind.
    async fn start_due(
        self: &Arc<Self>,
        due: Vec<Subscription>,
        now: i64,
    ) -> crate::store::Result<i64> {
        let mut channels: Vec<i64> = due.iter().map(|s| s.channel_id).collect();
        channels.sort_unstable();
        channels.dedup();
        let last: std::collections::HashMap<i64, i64> =
            self.store.last_seqs(&channels).await?.into_iter().collect();
        let mut lag = 0;
        for sub in due {
            let Some(&last_seq) = last.get(&sub.channel_id) else {
                continue;
            };
            lag = lag.max(last_seq - sub.cursor);
            if last_seq <= sub.cursor {
                continue;
            }
            {
                let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                if running.len() >= AT_ONCE || !running.insert(sub.id) {
                    continue;
                }
            }
            let claimed = self
                .store
                .claim_subscription(sub.channel_id, sub.id, &self.node, now, now + self.lease_ms)
                .await;
            match claimed {
                Ok(Some(sub)) => {
                    let me = Arc::clone(self);
                    tokio::spawn(async move {
                        // Released however the run ends, a panic included, so the
                        // subscription is taken up again by a later poll.
                        let _running = Running::start(&me, sub.id);
                        me.deliver(sub).await;
                    });
                }
                Ok(None) | Err(_) => {
                    self.running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&sub.id);
                }
            }
        }
        Ok(lag)
    }

    /// One run: posts the subscription's events after its cursor until it is caught up
    /// or a request fails, recording the cursor every [`WINDOW`] events and at the end.
    async fn deliver(&self, sub: Subscription) {
        let types: Vec<&str> = sub.types.split_ascii_whitespace().collect();
        // The cursor as stored: a report whose `from` differs finds an admin's move.
        let mut recorded = sub.cursor;
        let mut cursor = sub.cursor;
        let mut unrecorded = 0i64;
        let mut renewed = now_ms();
        let mut delivered_in_run = 0i64;
        // Delivered under its creator's role: one who is no longer an owner or admin of
        // the channel (removed, demoted) pauses it until another admin resumes it.
        let creator = self.store.channel(sub.channel_id, sub.creator_id).await;
        if let Ok(found) = &creator
            && !found
                .as_ref()
                .is_some_and(|(_, role)| matches!(role, Role::Owner | Role::Admin))
        {
            let report = DeliveryReport {
                from: recorded,
                cursor,
                delivered: 0,
                failure: Some(DeliveryFailure {
                    error: "its creator is no longer an owner or admin of the channel; an admin may resume it"
                        .into(),
                    pause: true,
                    next_try_at: 0,
                    dead_after_ms: i64::MAX,
                }),
                lease_until: 0,
            };
            self.record(&sub, report).await;
            return;
        }
        let failure = 'run: loop {
            let page = match self
                .store
                .log(sub.channel_id, cursor, PAGE, ReadFence::PRIMARY)
                .await
            {
                Ok(page) => page,
                Err(e) => break 'run Some(format!("reading the channel's log: {e}")),
            };
            for event in &page.items {
                if self.stopping.load(Ordering::SeqCst) {
                    if delivered_in_run == 0 {
                        // Nothing happened: keep the record (and its failures) as it is;
                        // this node's lease is its own again when it restarts.
                        return;
                    }
                    break 'run None;
                }
                if !types.is_empty() && !types.contains(&event.body.kind()) {
                    cursor = event.seq;
                    continue;
                }
                if let Err(e) = self.post(&sub, event).await {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    break 'run Some(e);
                }
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                cursor = event.seq;
                unrecorded += 1;
                delivered_in_run += 1;
                // Recorded every WINDOW events, and often enough that the lease never
                // runs out under a slow endpoint.
                if unrecorded >= WINDOW || now_ms() - renewed >= self.lease_ms / 3 {
                    let report = DeliveryReport {
                        from: recorded,
                        cursor,
                        delivered: unrecorded,
                        failure: None,
                        lease_until: now_ms() + self.lease_ms,
                    };
                    if !self.record(&sub, report).await {
                        return;
                    }
                    recorded = cursor;
                    renewed = now_ms();
                    unrecorded = 0;
                }
            }
            if !page.has_more {
                break None;
            }
        };
        let failure = failure.map(|error| {
            let backoff = backoff(sub.failures, self.config.max_backoff);
            DeliveryFailure {
                error,
                pause: false,
                next_try_at: now_ms() + backoff.as_millis() as i64,
                dead_after_ms: self.config.dead_after.as_millis() as i64,
            }
        });
        if let Some(f) = &failure {
            let since = sub.failing_since.unwrap_or_else(now_ms);
            if now_ms() - since >= f.dead_after_ms {
                self.stats.died.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(subscription = sub.id, channel = sub.channel_id, error = %f.error,
                    "webhook subscription failed past its dead-after time; it stops until resumed");
            } else {
                tracing::info!(subscription = sub.id, channel = sub.channel_id, error = %f.error,
                    retry_in_ms = f.next_try_at - now_ms(), "webhook delivery failed; will retry");
            }
        }
        let report = DeliveryReport {
            from: recorded,
            cursor,
            delivered: unrecorded,
            failure,
            lease_until: 0,
        };
        self.record(&sub, report).await;
    }

    /// Records a report; `false` when the run must stop: the lease is gone (another node
    /// delivers now), the subscription was paused or deleted, or the store failed (the
    /// lease then runs out, and the next run re-sends from the last recorded cursor).
    async fn record(&self, sub: &Subscription, report: DeliveryReport) -> bool {
        match self
            .store
            .record_delivery(sub.channel_id, sub.id, &self.node, now_ms(), report)
            .await
        {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(subscription = sub.id, error = %e, "record a webhook delivery");
                false
            }
        }
    }

    async fn post(&self, sub: &Subscription, event: &Event) -> Result<(), String> {
        let body = serde_json::to_vec(&crate::wire::dto::Event::from(event))
            .map_err(|e| format!("encode the event: {e}"))?;
        let url = reqwest::Url::parse(&sub.url).map_err(|e| format!("url: {e}"))?;
        // A literal address is never resolved, so the resolver cannot refuse it.
        if let Some(ip) = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        } && !AddressPolicy::new(self.config.allow.clone()).permits(ip)
        {
            return Err(format!(
                "{ip} is not a public address (refused: server-side request forgery guard)"
            ));
        }
        let key = format!("{}:{}", event.channel_id, event.seq);
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header(
                "natter-signature",
                signature(&sub.secret, now_ms() / 1000, &body),
            )
            .header("natter-idempotency-key", &key)
            .header("idempotency-key", &key)
            .header("natter-subscription", sub.id.to_string())
            .header("natter-event", event.body.kind())
            .body(body)
            .send()
            .await
            .map_err(describe)?;
        let status = sent.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the endpoint answered {status}"))
        }
    }
}

/// A run in progress: counted, and its subscription marked as running on this node,
/// until dropped.
struct Running<'a> {
    deliverer: &'a Deliverer,
    id: i64,
}

impl<'a> Running<'a> {
    fn start(deliverer: &'a Deliverer, id: i64) -> Self {
        deliverer.stats.running.fetch_add(1, Ordering::Relaxed);
        Self { deliverer, id }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.deliverer.stats.running.fetch_sub(1, Ordering::Relaxed);
        self.deliverer
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// A request's failure in a line.
fn describe(e: reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The wait before the next try after `failures` failures in a row: 1 s doubling, at
/// most `max`, with full jitter over its upper half.
fn backoff(failures: i64, max: Duration) -> Duration {
    let base = Duration::from_secs(1)
        .saturating_mul(1u32 << failures.clamp(0, 20) as u32)
        .min(max);
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    let frac = f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX);
    base.mul_f64(0.5 + 0.5 * frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn only_public_addresses_pass_unless_allowed() {
        let policy = AddressPolicy::default();
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::",
            "::127.0.0.1",
            "fec0::1",
            "2002:7f00:1::1",
            "192.0.0.8",
        ] {
            assert!(!policy.permits(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(policy.permits(public.parse().unwrap()), "{public}");
        }
        let allowed = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(allowed.permits("127.0.0.9".parse().unwrap()));
        assert!(allowed.permits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!allowed.permits("10.0.0.1".parse().unwrap()));
        let mapped = AddressPolicy::new(vec!["::ffff:10.0.0.0/104".parse().unwrap()]);
        assert!(mapped.permits("10.1.2.3".parse().unwrap()));
        assert!(!mapped.permits("192.168.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Network>().is_err());
        assert!("nonsense".parse::<Network>().is_err());
        let one: Network = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let max = Duration::from_secs(300);
        for (failures, base) in [(0, 1), (1, 2), (3, 8), (30, 300)] {
            let b = backoff(failures, max);
            assert!(
                b >= Duration::from_secs(base) / 2 && b <= Duration::from_secs(base),
                "{failures}: {b:?}"
            );
        }
    }

    #[test]
    fn the_signature_is_stripe_like() {
        let s = signature("whsec_test", 1_700_000_000, b"{\"a\":1}");
        let mac = hmac_sha256(b"whsec_test", b"1700000000.{\"a\":1}");
        assert_eq!(s, format!("t=1700000000,v1={}", hex(&mac)));
    }
}
