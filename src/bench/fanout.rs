//! `natter bench fanout`: one channel with M members online over WebSockets; one member
//! sends N messages (a window of sends in flight); every member checks that it receives
//! each message once, in seq order, and measures send→deliver latency from the send time
//! carried in the text. Reports deliveries/s, messages/s and the latency percentiles.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;

use super::{Scratch, bench_config, bench_username, histogram};
use crate::client::{Api, Frame, Incoming, Realtime};

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Members online in the channel (each its own WebSocket), the sender included.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Messages to send.
    #[arg(long, default_value_t = 2000)]
    pub messages: usize,
    /// Sends in flight at once.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Bytes of text per message (at least the timestamp's).
    #[arg(long, default_value_t = 64)]
    pub text_bytes: usize,
    /// A running server to measure (its send and sign-up limits must allow the run);
    /// without it one is started in this process.
    #[arg(long)]
    pub url: Option<String>,
}

/// What one member saw.
struct Received {
    count: usize,
    in_order: bool,
    latency_us: Histogram<u64>,
    last_at: Instant,
}

pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    let scratch = Scratch::new(None)?;
    let (base, _server) = match &args.url {
        Some(url) => (url.trim_end_matches('/').to_owned(), None),
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(crate::serve(
                listener,
                bench_config(&scratch.path),
                async move {
                    let _ = stopped.await;
                },
            ));
            (format!("http://{addr}"), Some((stop, task)))
        }
    };
    let members = args.members.max(1);
    eprintln!("registering {members} members…");
    let prefix = bench_username();
    let mut apis = Vec::with_capacity(members);
    for chunk in (0..members).collect::<Vec<_>>().chunks(32) {
        let signups = chunk.iter().map(|i| {
            let (base, name) = (base.clone(), format!("{prefix}-{i}"));
            async move {
                let mut api = Api::new(&base);
                let id = api.register(&name, "bench-password").await?;
                anyhow::Ok((api, id))
            }
        });
        for r in futures_util::future::join_all(signups).await {
            apis.push(r.context("register a member")?);
        }
    }
    let ids: Vec<i64> = apis.iter().map(|(_, id)| *id).collect();
    let sender_api = apis[0].0.clone();
    // A channel takes at most 1000 initial members; the rest are added one by one.
    let (initial, later) = ids[1..].split_at(ids.len().saturating_sub(1).min(999));
    let channel = sender_api
        .create_channel("fanout", "group", initial)
        .await?;
    for &user in later {
        sender_api.add_member(channel, user).await?;
    }

    eprintln!("connecting {members} WebSockets…");
    let start = Instant::now();
    let mut receivers = Vec::with_capacity(members);
    let mut sender = None;
    for (n, (api, _)) in apis.iter().enumerate() {
        let (rt, _) = Realtime::connect(api, HashMap::new())
            .await
            .with_context(|| format!("connect member {n}"))?;
        if n == 0 {
            sender = Some(rt);
            continue;
        }
        receivers.push(tokio::spawn(receive(rt, channel, args.messages, start)));
    }
    let mut sender = sender.expect("one member sends");

    eprintln!("sending {} messages…", args.messages);
    let pad = "x".repeat(args.text_bytes.saturating_sub(24));
    let send_start = Instant::now();
    let (mut acked, mut errors) = (0usize, 0usize);
    for i in 0..args.messages {
        let t = start.elapsed().as_micros();
        sender
            .send(channel, &format!("t{t} {pad}"), &format!("f{i}"))
            .await?;
        while i + 1 - (acked + errors) >= args.window
            || (i + 1 == args.messages && acked + errors < args.messages)
        {
            match tokio::time::timeout(Duration::from_secs(30), sender.next()).await {
                Ok(Ok(Incoming::Frame(Frame::Ack { .. }))) => acked += 1,
                Ok(Ok(Incoming::Frame(Frame::Error { .. }))) => errors += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("sender: {e}"),
                Err(_) => bail!("sender: no ack within 30 s"),
            }
        }
    }
    let sent_in = send_start.elapsed();

    let mut latency = histogram();
    let (mut deliveries, mut disordered, mut short) = (0usize, 0usize, 0usize);
    let mut last = send_start;
    for r in receivers {
        let r = tokio::time::timeout(Duration::from_secs(120), r)
            .await
            .context("members receive within 120 s")???;
        deliveries += r.count;
        disordered += usize::from(!r.in_order);
        short += usize::from(r.count < acked);
        latency.add(&r.latency_us)?;
        last = last.max(r.last_at);
    }
    let elapsed = last
        .duration_since(send_start)
        .max(Duration::from_micros(1));
    let q = |p: f64| latency.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "fanout: {members} members online, {} messages ({acked} acked, {errors} errors)",
        args.messages
    );
    println!(
        "  {deliveries} deliveries in {:.2} s: {:.0} deliveries/s, {:.0} msgs/s acked (sends took {:.2} s)",
        elapsed.as_secs_f64(),
        deliveries as f64 / elapsed.as_secs_f64(),
        acked as f64 / sent_in.as_secs_f64(),
        sent_in.as_secs_f64(),
    );
    println!(
        "  send→deliver ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        latency.max() as f64 / 1000.0
    );
    println!("  checks: {disordered} members out of order, {short} members missing messages");
    if disordered + short > 0 {
        bail!("delivery check failed: {disordered} out of order, {short} short");
    }
    Ok(())
}

/// Reads one member's stream until it has `expected` messages of the channel.
async fn receive(
    mut rt: Realtime,
    channel: i64,
    expected: usize,
    start: Instant,
) -> anyhow::Result<Received> {
    let mut r = Received {
        count: 0,
        in_order: true,
        latency_us: histogram(),
        last_at: Instant::now(),
    };
    let mut last_seq = None;
    while r.count < expected {
        match rt.next().await? {
            Incoming::Frame(Frame::Event(e)) if e.channel_id == channel => {
                if last_seq.is_some_and(|s| e.seq != s + 1) {
                    r.in_order = false;
                }
                last_seq = Some(e.seq);
                if let Some(m) = e.message.filter(|_| e.kind == "message.created") {
                    r.count += 1;
                    let now = start.elapsed().as_micros() as u64;
                    if let Some(sent) = m
                        .text
                        .split(' ')
                        .next()
                        .and_then(|t| t.strip_prefix('t'))
                        .and_then(|t| t.parse::<u64>().ok())
                    {
                        let _ = r.latency_us.record(now.saturating_sub(sent).max(1));
                    }
                    r.last_at = Instant::now();
                }
            }
            Incoming::Dropped { code } => bail!("a member was dropped ({code:?})"),
            _ => {}
        }
    }
    Ok(r)
}
