//! `natter bench search`: search latency over a large store, in this process. Fills the
//! store (SQLite by default, or `--store` PostgreSQL shards) with `--messages` texts of
//! words drawn from a vocabulary with a Zipf distribution (a few words are in most
//! messages, most in few), spread over `--channels` channels; each of `--users` users is
//! a member of `--channels-per-user` of them. Then `--queries` searches of several kinds
//! by random users, `--concurrency` at once, each timed, and each result checked to be in
//! one of its user's channels.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;

use super::{Scratch, bench_config, bench_username, histogram, report};
use crate::model::ChannelKind;
use crate::search::Query;
use crate::store::{SearchOrder, SearchQuery, Store, StoreError};

#[derive(Debug, Clone, clap::Args)]
pub struct SearchArgs {
    /// Messages in the store.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: usize,
    /// Channels the messages are spread over.
    #[arg(long, default_value_t = 200)]
    pub channels: usize,
    /// Users who search.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Channels each user is a member of.
    #[arg(long, default_value_t = 20)]
    pub channels_per_user: usize,
    /// Searches to time (spread over the kinds).
    #[arg(long, default_value_t = 3000)]
    pub queries: usize,
    /// Searches at once.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
    /// Data directory (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub run: super::RunArgs,
}

/// Words in the vocabulary.
const VOCABULARY: usize = 20_000;

/// A small deterministic generator (xorshift64*): the same store for the same flags.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A word rank, Zipf-like (s = 1) over the vocabulary: the inverse of the harmonic
    /// CDF, so rank 0 takes ~5 % of draws and rank r about 1/(r+1) of that.
    pub(crate) fn zipf(&mut self) -> usize {
        // Inverse of the harmonic CDF, approximately: H(n) ≈ ln n + γ.
        let h = (VOCABULARY as f64).ln() + 0.5772;
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let rank = (u * h - 0.5772).exp();
        (rank as usize).min(VOCABULARY - 1)
    }
}

/// The vocabulary's word of rank `r`: pronounceable, distinct, 4–9 letters.
pub(crate) fn word(r: usize) -> String {
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    let mut n = r;
    let mut w = String::new();
    loop {
        w.push(C[n % C.len()] as char);
        n /= C.len();
        w.push(V[n % V.len()] as char);
        n /= V.len();
        if n == 0 && w.len() >= 4 {
            break;
        }
    }
    w
}

/// A message text of words, about `bytes` long.
pub(crate) fn words_text(rng: &mut Rng, bytes: usize) -> String {
    let mut text = String::new();
    while text.len() < bytes {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&word(rng.zipf()));
    }
    text
}

/// A kind of search timed: its name, order and query maker.
type Kind = (&'static str, SearchOrder, fn(&mut Rng) -> String);

/// The kinds of searches timed.
fn kinds() -> Vec<Kind> {
    vec![
        ("common word", SearchOrder::Newest, |r| word(r.below(5))),
        ("rare word", SearchOrder::Newest, |r| {
            word(2_000 + r.below(VOCABULARY - 2_000))
        }),
        ("two words", SearchOrder::Newest, |r| {
            format!("{} {}", word(r.below(20)), word(50 + r.below(500)))
        }),
        ("phrase", SearchOrder::Newest, |r| {
            format!("\"{} {}\"", word(r.below(10)), word(r.below(10)))
        }),
        ("prefix", SearchOrder::Newest, |r| {
            let w = word(100 + r.below(2_000));
            format!("{}*", &w[..3])
        }),
        ("common word, best first", SearchOrder::Relevance, |r| {
            word(r.below(5))
        }),
        ("rare word, best first", SearchOrder::Relevance, |r| {
            word(2_000 + r.below(VOCABULARY - 2_000))
        }),
    ]
}

pub async fn run(args: SearchArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    super::emit(&report, &args.run)
}

pub async fn measure(args: &SearchArgs) -> anyhow::Result<report::Report> {
    if !args.run.url.is_empty() {
        anyhow::bail!("`bench search` measures a store in this process; --url does not apply");
    }
    let scratch = Scratch::new(args.data_dir.clone())?;
    let mut config = bench_config(&scratch.path);
    if let Some(s) = &args.run.store {
        config.store = Some(
            crate::store::StoreLocation::parse(s).map_err(|e| anyhow::anyhow!("--store: {e}"))?,
        );
    }
    let store: Arc<dyn Store> = crate::store::open(config.store_options(None)).await?;
    let result = fill_and_search(args, &store).await;
    store.close().await;
    result
}

async fn fill_and_search(
    args: &SearchArgs,
    store: &Arc<dyn Store>,
) -> anyhow::Result<report::Report> {
    let mut rng = Rng::new(42);
    let prefix = bench_username();
    let mut users = Vec::new();
    for u in 0..args.users.max(1) {
        users.push(
            store
                .create_user(&format!("{prefix}{u}"), "-", None)
                .await?
                .id,
        );
    }
    // Each user in `channels_per_user` channels; every channel has a member.
    let n_channels = args.channels.max(1);
    let mut members: Vec<HashSet<usize>> = vec![HashSet::new(); users.len()];
    for c in 0..n_channels {
        members[c % users.len()].insert(c);
    }
    for m in members.iter_mut() {
        while m.len() < args.channels_per_user.min(n_channels) {
            m.insert(rng.below(n_channels));
        }
    }
    let mut channels = Vec::new();
    for c in 0..n_channels {
        let in_it: Vec<i64> = (0..users.len())
            .filter(|u| members[*u].contains(&c))
            .map(|u| users[u])
            .collect();
        let ch = store
            .create_channel(in_it[0], ChannelKind::Group, &format!("s{c}"), &in_it[1..])
            .await?;
        channels.push((ch.id, in_it[0]));
    }
    let mine: Vec<HashSet<i64>> = members
        .iter()
        .map(|m| m.iter().map(|c| channels[*c].0).collect())
        .collect();

    // Fill: 1024 sends in flight, like `bench store`.
    let bar = super::fanout::progress(args.run.quiet, args.messages as u64, "writing messages");
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let channels = Arc::new(channels);
    let writers: Vec<_> = (0..1024)
        .map(|_| {
            let (store, channels, next, bar) = (
                Arc::clone(store),
                Arc::clone(&channels),
                Arc::clone(&next),
                bar.clone(),
            );
            let total = args.messages;
            tokio::spawn(async move {
                let mut failed = 0u64;
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= total {
                        return failed;
                    }
                    let mut rng = Rng::new(n as u64 + 1);
                    let (ch, author) = channels[rng.below(channels.len())];
                    let text = words_text(&mut rng, 80);
                    if store.post_message(author, ch, &text, None).await.is_err() {
                        failed += 1;
                    }
                    bar.inc(1);
                }
            })
        })
        .collect();
    let mut failed = 0;
    for w in writers {
        failed += w.await?;
    }
    let fill = started.elapsed();
    bar.finish_and_clear();
    // The searches are measured apart from the writes: SQLite indexes on a thread of
    // its own, which may still be taking the last of them.
    let indexing = Instant::now();
    if !store
        .search_caught_up(std::time::Duration::from_secs(600))
        .await
    {
        anyhow::bail!("the search index did not take the messages written within 10 minutes");
    }
    let index_wait = indexing.elapsed();

    let kinds = kinds();
    let mut hists: Vec<Histogram<u64>> = kinds.iter().map(|_| histogram()).collect();
    let mut found: Vec<u64> = vec![0; kinds.len()];
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut outside = 0u64;
    let bar = super::fanout::progress(args.run.quiet, args.queries as u64, "searching");
    let started = Instant::now();
    let per_batch = args.concurrency.max(1);
    let mut q = 0;
    while q < args.queries {
        let batch: Vec<_> = (q..(q + per_batch).min(args.queries))
            .map(|i| {
                let mut rng = Rng::new(1_000_000 + i as u64);
                let k = i % kinds.len();
                let (_, order, make) = kinds[k];
                let u = rng.below(users.len());
                let query = SearchQuery {
                    query: Query::parse(&make(&mut rng)).expect("the bench's queries parse"),
                    channel_id: None,
                    order,
                    from: None,
                    limit: 20,
                };
                let (store, user) = (Arc::clone(store), users[u]);
                async move {
                    let t = Instant::now();
                    let got = store.search(user, &query).await;
                    (k, u, t.elapsed(), got)
                }
            })
            .collect();
        for (k, u, took, got) in futures_util::future::join_all(batch).await {
            bar.inc(1);
            match got {
                Ok(page) => {
                    let _ = hists[k].record(took.as_micros().max(1) as u64);
                    found[k] += page.items.len() as u64;
                    outside += page
                        .items
                        .iter()
                        .filter(|m| !mine[u].contains(&m.channel_id))
                        .count() as u64;
                }
                Err(StoreError::SearchTooBroad) => {
                    *errors
                        .entry(format!("{}: too broad", kinds[k].0))
                        .or_default() += 1
                }
                Err(e) => *errors.entry(format!("{}: {e}", kinds[k].0)).or_default() += 1,
            }
        }
        q += per_batch;
    }
    let searching = started.elapsed();
    bar.finish_and_clear();

    let mut report = report::Report::new("search");
    report.param("messages", args.messages);
    report.param("channels", n_channels);
    report.param("users", users.len());
    report.param("channels per user", args.channels_per_user);
    report.param("queries", args.queries);
    report.param("concurrency", per_batch);
    report.figure(
        "fill msgs/s",
        args.messages as f64 / fill.as_secs_f64(),
        "1/s",
    );
    report.figure(
        "index caught up after the fill",
        index_wait.as_secs_f64(),
        "s",
    );
    report.figure(
        "searches/s",
        args.queries as f64 / searching.as_secs_f64(),
        "1/s",
    );
    let mut table = report::Table {
        title: "results per search, by kind".into(),
        columns: vec!["kind".into(), "searches".into(), "mean results".into()],
        rows: Vec::new(),
    };
    for (k, (name, _, _)) in kinds.iter().enumerate() {
        report
            .latencies
            .push(report::Latency::from_micros(name, &hists[k]));
        let n = hists[k].len().max(1);
        table.rows.push(vec![
            (*name).to_owned(),
            hists[k].len().to_string(),
            format!("{:.1}", found[k] as f64 / n as f64),
        ]);
    }
    report.tables.push(table);
    if failed > 0 {
        errors.insert("failed sends".into(), failed);
    }
    if outside > 0 {
        errors.insert("results outside the user's channels".into(), outside);
    }
    report.passed = outside == 0 && failed == 0;
    report.errors = errors;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_distinct_and_ranks_zipf_distributed() {
        let words: HashSet<String> = (0..VOCABULARY).map(word).collect();
        assert_eq!(words.len(), VOCABULARY);
        let mut rng = Rng::new(7);
        let draws = 100_000;
        let top = (0..draws).filter(|_| rng.zipf() == 0).count();
        // Rank 0 takes γ/H(n) ≈ 5.5 % of draws.
        assert!((4_000..7_000).contains(&top), "{top}");
    }
}
