//! The fan-out [`Rig`]: registers the users, creates the channels and connects every
//! WebSocket once, then drives the senders through phases and collects each phase's
//! shares from the receivers, and at the end their checks and series.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use super::members;
use super::phase::{End, Pace, PhaseResult};
use super::workers::{Control, Progress, Seen, SendPlan, Share, Tallies, send};
use super::{MAX_PHASE_MESSAGES, SAMPLE_EVERY, SETTLE, Shape, merge, progress};
use crate::bench::alarm::Alarm;
use crate::bench::check::Violations;
use crate::bench::timeline::Timeline;
use crate::bench::{RunArgs, Sample, Target, bench_username, histogram};
use crate::client::{Api, Realtime};

/// Users, channels and open connections, driven through phases.
pub(crate) struct Rig {
    pub target: Target,
    owner: Api,
    channel_ids: Vec<i64>,
    senders: Vec<Option<Realtime>>,
    control: watch::Sender<Control>,
    shares: mpsc::UnboundedReceiver<Share>,
    tallies: Arc<Tallies>,
    /// Messages sent and delivered over the run: a closed loop sends no faster than the
    /// members are delivered to.
    progress: Arc<Progress>,
    /// Members of each channel.
    members: usize,
    receivers: Vec<tokio::task::JoinHandle<anyhow::Result<Seen>>>,
    start: Instant,
    phases: u32,
    pad: String,
    quiet: bool,
    /// Wakes the senders of an open-loop phase on time.
    alarm: Alarm,
    // Accumulated over phases, for the final report.
    acks_per_bucket: Vec<u64>,
    ack_by_second: Timeline,
    samples: Vec<(f64, Sample)>,
}

impl Rig {
    /// Registers the users, creates the channels and connects everyone.
    pub async fn start(shape: &Shape, run: &RunArgs) -> anyhow::Result<Self> {
        let target = Target::start(run, None).await?;
        let base = target.base.clone();
        let Shape {
            channels,
            members,
            senders,
            ..
        } = *shape;

        let receivers = register(&base, channels * members, "r", run.quiet).await?;
        let sending = register(&base, senders, "s", run.quiet).await?;
        let owner = sending[0].0.clone();
        let mut channel_ids = Vec::with_capacity(channels);
        for c in 0..channels {
            let mut ids: Vec<i64> = receivers[c * members..(c + 1) * members]
                .iter()
                .map(|r| r.1)
                .collect();
            ids.extend(
                sending
                    .iter()
                    .enumerate()
                    .filter(|(s, _)| s % channels == c)
                    .map(|(_, s)| s.1),
            );
            ids.retain(|&id| id != sending[0].1);
            // A channel takes at most 1000 initial members; the rest are added one by one.
            let (initial, later) = ids.split_at(ids.len().min(999));
            let channel = owner
                .create_channel(&format!("fanout{c}"), "group", initial)
                .await?;
            for &user in later {
                owner.add_member(channel, user).await?;
            }
            channel_ids.push(channel);
        }

        let bar = progress(
            run.quiet,
            (receivers.len() + senders) as u64,
            "connecting WebSockets",
        );
        let start = Instant::now();
        let (control, control_rx) = watch::channel(Control::Running);
        let (share_tx, shares) = mpsc::unbounded_channel();
        let tallies = Tallies::new();
        let mut receiving = Vec::with_capacity(receivers.len());
        // Clients are spread over the given nodes in turn (registered on the first: the
        // nodes of a cluster share their accounts).
        let on_node = |api: &Api, n: usize| {
            let node = &target.bases[n % target.bases.len()];
            Api::new(node).with_token(api.token().unwrap_or_default())
        };
        let mut specs = Vec::with_capacity(receivers.len());
        for (n, (api, _)) in receivers.iter().enumerate() {
            let node = on_node(api, n);
            let url = url::Url::parse(&node.ws_url()).context("a node's address")?;
            if url.scheme() != "ws" {
                anyhow::bail!("the receivers speak ws:// only (no TLS): {url}");
            }
            let host = url.host_str().context("a node's address without a host")?;
            let port = url.port_or_known_default().unwrap_or(80);
            let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
                .await?
                .next()
                .with_context(|| format!("resolve {host}"))?;
            specs.push(members::Spec {
                addr,
                host: format!("{host}:{port}"),
                path: url.path().to_owned(),
                token: node.token().unwrap_or_default().to_owned(),
                who: format!("receiver {n}"),
            });
        }
        let (connected_tx, mut connected) = mpsc::unbounded_channel();
        let progress = Arc::new(Progress::default());
        let shared = members::Shared {
            start,
            control: control_rx.clone(),
            shares: share_tx.clone(),
            tallies: tallies.clone(),
            progress: Arc::clone(&progress),
        };
        let outcomes = members::start(specs, &shared, connected_tx)?;
        for _ in 0..outcomes.len() {
            match connected.recv().await {
                Some(Ok(())) => bar.inc(1),
                Some(Err(e)) => return Err(e.context("connect the receivers")),
                None => anyhow::bail!("the receiving threads ended while connecting"),
            }
        }
        for outcome in outcomes {
            receiving.push(tokio::spawn(async move {
                outcome
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a receiving thread ended")))
            }));
        }
        let mut sender_sockets = Vec::with_capacity(senders);
        for (s, (api, _)) in sending.iter().enumerate() {
            let (rt, _) = Realtime::connect(&on_node(api, s), HashMap::new())
                .await
                .with_context(|| format!("connect sender {s}"))?;
            sender_sockets.push(Some(rt));
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(Self {
            target,
            owner,
            channel_ids,
            senders: sender_sockets,
            control,
            shares,
            tallies,
            progress,
            members,
            receivers: receiving,
            start,
            phases: 0,
            pad: "x".repeat(shape.text_bytes.saturating_sub(24)),
            quiet: run.quiet,
            alarm: Alarm::start()?,
            acks_per_bucket: Vec::new(),
            ack_by_second: Timeline::default(),
            samples: Vec::new(),
        })
    }

    /// Seconds since the rig started.
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Sends as `pace` says, waits for every answer and for every receiver to see the
    /// phase's last events, and reports what it measured.
    pub async fn phase(&mut self, pace: Pace, label: &str) -> anyhow::Result<PhaseResult> {
        let planned = pace.planned();
        if planned == 0 {
            anyhow::bail!("nothing to send: the rate times the duration is under one message");
        }
        if planned > MAX_PHASE_MESSAGES {
            anyhow::bail!(
                "a phase of {planned} messages is past the bench's limit of {MAX_PHASE_MESSAGES}: lower the rate, the duration or --messages"
            );
        }
        // Numbered once it runs: the receivers count phases by their ends.
        let phase = self.phases;
        self.phases += 1;
        let senders = self.senders.len();
        let answered = Arc::new(AtomicU64::new(0));
        let bar = progress(self.quiet, planned as u64, label);
        let nodes_before = self.target.sample_nodes().await;
        let before = Sample::sum(&nodes_before);
        self.samples.push((self.now(), before));
        let load_before = crate::process::cpu_seconds(None);
        // Phases start on a whole second of the rig's clock, so the per-second latency
        // timelines split exactly where a phase (or a spike's part) begins.
        let started_at = self.now().floor() + 1.0;
        let phase_start = self.start + Duration::from_secs_f64(started_at);
        tokio::time::sleep_until(phase_start.into()).await;
        let mut tasks = Vec::with_capacity(senders);
        for s in 0..senders {
            let rt = self.senders[s].take().context("a sender lost its socket")?;
            let plan = SendPlan {
                client_prefix: format!("p{phase}s{s}-"),
                channel: self.channel_ids[s % self.channel_ids.len()],
                times: pace.times(s, senders),
                count: match &pace {
                    Pace::Max { count, .. } => count / senders + usize::from(s < count % senders),
                    Pace::Schedule(_) => 0,
                },
                window: match &pace {
                    Pace::Max { window, .. } => *window,
                    Pace::Schedule(_) => usize::MAX,
                },
                behind: match &pace {
                    Pace::Max { lag, .. } => (lag * senders) as u64,
                    Pace::Schedule(_) => u64::MAX,
                },
                progress: Arc::clone(&self.progress),
                members: self.members as u64,
                pad: self.pad.clone(),
                answered: answered.clone(),
                clock: self.alarm.clock(),
            };
            tasks.push(tokio::spawn(send(rt, plan, self.start, phase_start)));
        }
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        let all_sent = futures_util::future::join_all(tasks);
        tokio::pin!(all_sent);
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        let results = loop {
            tokio::select! {
                results = &mut all_sent => break results,
                _ = tick.tick() => {
                    bar.set_position(answered.load(Ordering::Relaxed));
                    let sample = self.target.sample().await;
                    self.samples.push((self.now(), sample));
                    // A receiver that failed fails the phase now: a closed loop would
                    // wait for its deliveries.
                    if self.receivers.iter().any(|h| h.is_finished()) {
                        aborts.iter().for_each(|a| a.abort());
                        return Err(self.failed_receiver().await);
                    }
                }
            }
        };
        bar.finish_and_clear();
        let mut result = PhaseResult {
            planned,
            acked: 0,
            errors: BTreeMap::new(),
            ack_latency: histogram(),
            send_lateness: histogram(),
            deliveries: 0,
            deliver_latency: histogram(),
            send_time: Duration::ZERO,
            deliver_time: Duration::ZERO,
            server_cpu: None,
            load_cpu: None,
            nodes: Vec::new(),
            lagging: 0,
            drops: BTreeMap::new(),
            started_at,
        };
        for (s, r) in results.into_iter().enumerate() {
            let (rt, sent) = r.context("a sender task")??;
            self.senders[s] = Some(rt);
            result.acked += sent.acked;
            result.ack_latency.add(&sent.latency_us)?;
            result.send_lateness.add(&sent.late_us)?;
            for (code, n) in sent.errors {
                *result.errors.entry(code).or_default() += n;
            }
            merge(&mut self.acks_per_bucket, &sent.per_bucket);
            self.ack_by_second.add(&sent.by_second);
            if let Some(last) = sent.last_at {
                result.send_time = result.send_time.max(last.duration_since(phase_start));
            }
        }

        let mut expected = HashMap::new();
        for &c in &self.channel_ids {
            let v = self
                .owner
                .call(reqwest::Method::GET, &format!("/v1/channels/{c}"), None)
                .await?;
            expected.insert(c, v["last_seq"].as_i64().unwrap_or(0));
        }
        let _ = self.control.send(Control::PhaseEnd {
            phase,
            expected: Arc::new(expected),
        });
        let waiting = progress(
            self.quiet,
            self.receivers.len() as u64,
            "waiting for deliveries",
        );
        for _ in 0..self.receivers.len() {
            let share = self.next_share().await?;
            result.deliveries += share.deliveries;
            if let Some(last) = share.last_at {
                result.deliver_time = result.deliver_time.max(last.duration_since(phase_start));
            }
            result.lagging += usize::from(!share.caught_up);
            for (code, n) in share.drops {
                *result.drops.entry(code).or_default() += n;
            }
            waiting.inc(1);
        }
        waiting.finish_and_clear();
        result.deliver_latency = self.tallies.phase_latency(phase)?;
        let load_after = crate::process::cpu_seconds(None);
        let nodes_after = self.target.sample_nodes().await;
        let after = Sample::sum(&nodes_after);
        self.samples.push((self.now(), after));
        result.load_cpu = load_before.zip(load_after).map(|(a, b)| b - a);
        result.server_cpu = match (before.cpu_seconds, after.cpu_seconds) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        if self.target.bases.len() > 1 {
            let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
            result.nodes = self
                .target
                .bases
                .iter()
                .zip(nodes_before.iter().zip(&nodes_after))
                .map(|(node, (a, b))| {
                    (
                        node.clone(),
                        delta(a.cpu_seconds, b.cpu_seconds),
                        delta(a.delivered, b.delivered),
                    )
                })
                .collect();
        }
        Ok(result)
    }

    /// The next receiver's share of the phase. A receiver that failed (its connection
    /// could not be resumed) fails the phase with its own error.
    async fn next_share(&mut self) -> anyhow::Result<Share> {
        let deadline = tokio::time::Instant::now() + SETTLE + Duration::from_secs(10);
        loop {
            let wait = tokio::time::timeout(Duration::from_secs(1), self.shares.recv()).await;
            if let Ok(share) = wait {
                return share.context("every receiver ended");
            }
            if self.receivers.iter().any(|h| h.is_finished()) {
                return Err(self.failed_receiver().await);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("receivers did not report within the settle time");
            }
        }
    }

    /// The error of a receiver that ended (one must have).
    async fn failed_receiver(&mut self) -> anyhow::Error {
        let Some(i) = self.receivers.iter().position(|h| h.is_finished()) else {
            return anyhow::anyhow!("no receiver ended");
        };
        match self.receivers.swap_remove(i).await {
            Ok(Err(e)) => e.context("a receiver failed"),
            Ok(Ok(_)) => anyhow::anyhow!("a receiver ended before the phase did"),
            Err(e) => anyhow::Error::new(e).context("a receiver task panicked"),
        }
    }

    /// Closes every connection, collects the checks and series, and stops the server.
    pub async fn finish(mut self) -> anyhow::Result<End> {
        let _ = self.control.send(Control::Finish);
        let mut end = End {
            checks: Violations::default(),
            deliveries_per_bucket: Vec::new(),
            acks_per_bucket: std::mem::take(&mut self.acks_per_bucket),
            deliver_by_second: Timeline::default(),
            ack_by_second: std::mem::take(&mut self.ack_by_second),
            samples: std::mem::take(&mut self.samples),
        };
        for r in self.receivers.drain(..) {
            let seen = r.await??;
            end.checks.merge(&seen.violations);
        }
        (end.deliveries_per_bucket, end.deliver_by_second) = self.tallies.series();
        for rt in self.senders.drain(..).flatten() {
            rt.close().await;
        }
        self.target.stop().await?;
        Ok(end)
    }
}

/// Registers `n` users (32 at a time) on one shared HTTP client.
async fn register(
    base: &str,
    n: usize,
    role: &str,
    quiet: bool,
) -> anyhow::Result<Vec<(Api, i64)>> {
    let bar = progress(quiet, n as u64, "registering users");
    let prefix = format!("{}-{role}", bench_username());
    let api = Api::new(base);
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let signups = chunk.iter().map(|i| {
            let (mut api, name) = (api.clone(), format!("{prefix}{i}"));
            async move {
                // A server bounds the password hashes it runs at once: a busy answer is
                // retried after a pause, a bounded number of times.
                let mut tries = 0;
                let id = loop {
                    match api.register(&name, "bench-password").await {
                        Err(crate::client::ClientError::Api { status: 503, .. }) if tries < 100 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => break other?,
                    }
                };
                anyhow::Ok((api, id))
            }
        });
        for r in futures_util::future::join_all(signups).await {
            out.push(r.context("register a bench user")?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(out)
}
