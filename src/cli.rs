//! `natter send` and `natter tail`: try a server from a terminal, over the client library.

use std::collections::HashMap;

use anyhow::Context;

use crate::chars::escape_for_terminal;
use crate::client::{Api, Frame, Incoming, Realtime};

/// How the CLI reaches and logs in to a server.
#[derive(Debug, Clone, clap::Args)]
pub struct Login {
    /// The server's base URL.
    #[arg(long, env = "NATTER_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A session token (or log in with --username and --password).
    #[arg(long, env = "NATTER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long, env = "NATTER_USERNAME")]
    pub username: Option<String>,
    #[arg(long, env = "NATTER_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

impl Login {
    async fn api(&self) -> anyhow::Result<Api> {
        let api = Api::new(&self.url);
        match (&self.token, &self.username, &self.password) {
            (Some(t), _, _) => Ok(api.with_token(t)),
            (None, Some(u), Some(p)) => {
                let mut api = api;
                api.login(u, p).await.context("log in")?;
                Ok(api)
            }
            _ => anyhow::bail!("give --token, or --username and --password (or NATTER_TOKEN)"),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub login: Login,
    /// The channel's id.
    #[arg(long)]
    pub channel: i64,
    /// The message; several words are joined with spaces.
    #[arg(required = true)]
    pub text: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub login: Login,
    /// The channel's id.
    #[arg(long)]
    pub channel: i64,
    /// Start after this seq (default: only new events).
    #[arg(long)]
    pub after: Option<i64>,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

/// Sends one message over the WebSocket and prints the acknowledged message.
pub async fn send(args: SendArgs) -> anyhow::Result<()> {
    let api = args.login.api().await?;
    let (mut rt, _) = Realtime::connect(&api, HashMap::new())
        .await
        .context("connect")?;
    let client_id = crate::auth::new_token()[..16].to_owned();
    rt.send(args.channel, &args.text.join(" "), &client_id)
        .await?;
    loop {
        match rt.next().await? {
            Incoming::Frame(Frame::Ack {
                client_id: c,
                message,
            }) if c == client_id => {
                println!(
                    "sent: channel {} seq {} id {}",
                    message.channel_id, message.seq, message.id
                );
                rt.close().await;
                return Ok(());
            }
            Incoming::Frame(Frame::Error {
                client_id: Some(c),
                code,
                message,
            }) if c == client_id => {
                anyhow::bail!("{code}: {}", escape_for_terminal(&message));
            }
            _ => {}
        }
    }
}

/// Prints a channel's events as they arrive, one line each, resuming across drops. What
/// came from the server is printed through [`escape_for_terminal`]: a message's newlines,
/// ANSI escapes and bidi controls show as escapes instead of acting on the terminal.
pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let api = args.login.api().await?;
    let resume = args
        .after
        .map(|s| HashMap::from([(args.channel, s)]))
        .unwrap_or_default();
    let (mut rt, _) = Realtime::connect(&api, resume).await.context("connect")?;
    let mut seen = 0u64;
    while args.count.is_none_or(|n| seen < n) {
        match rt.next().await? {
            Incoming::Frame(Frame::Event(e)) if e.channel_id == args.channel => {
                seen += 1;
                match &e.message {
                    Some(m) if e.kind == "message.created" => {
                        let text = escape_for_terminal(&m.text);
                        println!(
                            "#{} {} {}: {text}",
                            e.seq,
                            escape_for_terminal(&e.kind),
                            m.author_id
                        )
                    }
                    Some(m) => println!("#{} {} {}", e.seq, escape_for_terminal(&e.kind), m.id),
                    None => println!(
                        "#{} {} {}",
                        e.seq,
                        escape_for_terminal(&e.kind),
                        e.user_id.unwrap_or_default()
                    ),
                }
            }
            Incoming::Frame(Frame::Typing {
                channel_id,
                user_id,
            }) if channel_id == args.channel => {
                eprintln!("({user_id} is typing)")
            }
            Incoming::Frame(Frame::Left { channel_id }) if channel_id == args.channel => {
                anyhow::bail!("you are not (or no longer) a member of channel {channel_id}")
            }
            Incoming::Dropped { code } => eprintln!("(connection dropped: {code:?}; resuming)"),
            _ => {}
        }
    }
    rt.close().await;
    Ok(())
}
