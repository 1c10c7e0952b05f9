//! A Rust client of Natter: [`Api`] for the REST calls a client needs to get going, and
//! [`Realtime`] for `/v1/ws` with automatic reconnect-and-resume. The CLI (`natter send`,
//! `natter tail`), the bench tool and the tests use it.
//!
//! [`Realtime`] remembers the last seq it has seen per channel and the sends not yet
//! acknowledged; after a drop (or a 1012/4008 close) it reconnects with backoff, resumes
//! from those positions and sends the unacknowledged ops again with their `client_id`, so
//! nothing is lost and, the server's idempotency permitting, nothing is doubled. It reports
//! what arrives as it arrives and does not drop duplicates itself: a caller can check the
//! server's exactly-once promise.

mod frame;
mod realtime;

pub use self::frame::{Event, Found, Frame, Msg, PresenceOf, parse_frame};
pub use self::realtime::{Incoming, Realtime};

use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("request: {0}")]
    Http(#[from] reqwest::Error),
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("the server closed the connection for good ({code}): {reason}")]
    Closed { code: u16, reason: String },
    #[error("gave up reconnecting after {0} attempts")]
    GaveUp(u32),
    #[error("unexpected frame: {0}")]
    Protocol(String),
    /// The password was right and the account has two-factor login on: complete the
    /// login with [`Api::complete_login`] and a code.
    #[error("this account needs a two-factor code to log in")]
    TwoFactorRequired { challenge: String },
}

/// A new two-factor secret: add it to an authenticator app, then confirm with a code.
#[derive(Debug, Clone)]
pub struct Enrolment {
    /// Base32, for typing into an app.
    pub secret: String,
    /// The `otpauth://` URI a QR code carries.
    pub uri: String,
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The REST calls a client needs: accounts, channels, members, history.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    /// `base` is the server's root, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            token: None,
        }
    }

    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `ws://…/v1/ws` for this server.
    pub fn ws_url(&self) -> String {
        let rest = self
            .base
            .strip_prefix("https://")
            .map(|r| format!("wss://{r}"))
            .or_else(|| {
                self.base
                    .strip_prefix("http://")
                    .map(|r| format!("ws://{r}"))
            })
            .unwrap_or_else(|| self.base.clone());
        format!("{rest}/v1/ws")
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            return Ok(value);
        }
        Err(ClientError::Api {
            status: status.as_u16(),
            code: value["error"]["code"]
                .as_str()
                .unwrap_or("unknown")
                .to_owned(),
            message: value["error"]["message"].as_str().unwrap_or("").to_owned(),
        })
    }

    async fn session(&mut self, path: &str, username: &str, password: &str) -> Result<i64> {
        let v = self
            .call(
                reqwest::Method::POST,
                path,
                Some(json!({"username": username, "password": password})),
            )
            .await?;
        if v["two_factor_required"] == true {
            let challenge = v["challenge"].as_str().unwrap_or_default().to_owned();
            return Err(ClientError::TwoFactorRequired { challenge });
        }
        self.token = v["token"].as_str().map(str::to_owned);
        id(&v["user"]["id"])
    }

    /// Completes a login that answered [`ClientError::TwoFactorRequired`], with a code
    /// of the authenticator app or a recovery code; returns the user id.
    pub async fn complete_login(&mut self, challenge: &str, code: &str) -> Result<i64> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/v1/sessions/two-factor",
                Some(json!({"challenge": challenge, "code": code})),
            )
            .await?;
        self.token = v["token"].as_str().map(str::to_owned);
        id(&v["user"]["id"])
    }

    /// Logs in with the password and, if the account asks for one, `code`.
    pub async fn login_with_code(
        &mut self,
        username: &str,
        password: &str,
        code: &str,
    ) -> Result<i64> {
        match self.login(username, password).await {
            Err(ClientError::TwoFactorRequired { challenge }) => {
                self.complete_login(&challenge, code).await
            }
            other => other,
        }
    }

    /// Begins enrolling in two-factor login (the password is asked again).
    pub async fn begin_two_factor(&self, password: &str) -> Result<Enrolment> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/v1/users/me/two-factor",
                Some(json!({"password": password})),
            )
            .await?;
        let field = |name: &str| {
            v[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| ClientError::Protocol(format!("an enrolment without `{name}`")))
        };
        Ok(Enrolment {
            secret: field("secret")?,
            uri: field("uri")?,
        })
    }

    /// Confirms an enrolment with a code: two-factor login is on; returns the recovery
    /// codes (shown this once).
    pub async fn confirm_two_factor(&self, code: &str) -> Result<Vec<String>> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/v1/users/me/two-factor/confirm",
                Some(json!({"code": code})),
            )
            .await?;
        Ok(v["recovery_codes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect())
    }

    /// Turns two-factor login off (the password and a code are asked).
    pub async fn disable_two_factor(&self, password: &str, code: &str) -> Result<()> {
        self.call(
            reqwest::Method::POST,
            "/v1/users/me/two-factor/disable",
            Some(json!({"password": password, "code": code})),
        )
        .await
        .map(drop)
    }

    /// Deletes this account (the password, and a code while two-factor login is on):
    /// every session and key of it ends; its messages stay as a deleted user's.
    pub async fn delete_account(&mut self, password: &str, code: Option<&str>) -> Result<()> {
        let mut body = json!({"password": password});
        if let Some(code) = code {
            body["code"] = json!(code);
        }
        self.call(reqwest::Method::DELETE, "/v1/users/me", Some(body))
            .await?;
        self.token = None;
        Ok(())
    }

    /// Writes this account's export (NDJSON: profile, memberships, every message it
    /// wrote, then an `end` line) to `out` as it arrives; returns the bytes written.
    /// An export without its `end` line was cut short: an error.
    pub async fn export(&self, mut out: impl tokio::io::AsyncWrite + Unpin) -> Result<u64> {
        use tokio::io::AsyncWriteExt;
        let mut req = self.http.get(format!("{}/v1/users/me/export", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let mut resp = req.send().await?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let value: Value = resp.json().await.unwrap_or(Value::Null);
            return Err(ClientError::Api {
                status,
                code: value["error"]["code"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_owned(),
                message: value["error"]["message"].as_str().unwrap_or("").to_owned(),
            });
        }
        let (mut written, mut last_line) = (0u64, Vec::new());
        while let Some(chunk) = resp.chunk().await? {
            out.write_all(&chunk)
                .await
                .map_err(|e| ClientError::Protocol(format!("write the export: {e}")))?;
            written += chunk.len() as u64;
            // The last complete line so far (a line may span chunks).
            last_line.extend_from_slice(&chunk);
            if let Some(end) = last_line[..last_line.len().saturating_sub(1)]
                .iter()
                .rposition(|&b| b == b'\n')
            {
                last_line.drain(..=end);
            }
        }
        out.flush()
            .await
            .map_err(|e| ClientError::Protocol(format!("write the export: {e}")))?;
        let last: Value = serde_json::from_slice(&last_line).unwrap_or(Value::Null);
        if last["type"] != "end" {
            return Err(ClientError::Protocol("the export was cut short".into()));
        }
        Ok(written)
    }

    /// Changes the password (with a code while two-factor login is on); every other
    /// session ends.
    pub async fn change_password(
        &self,
        current: &str,
        new: &str,
        code: Option<&str>,
    ) -> Result<()> {
        let mut body = json!({"current_password": current, "new_password": new});
        if let Some(code) = code {
            body["code"] = json!(code);
        }
        self.call(reqwest::Method::POST, "/v1/users/me/password", Some(body))
            .await
            .map(drop)
    }

    /// Creates an account and logs in as it; returns the user id.
    pub async fn register(&mut self, username: &str, password: &str) -> Result<i64> {
        self.session("/v1/users", username, password).await
    }

    /// Logs in; returns the user id.
    pub async fn login(&mut self, username: &str, password: &str) -> Result<i64> {
        self.session("/v1/sessions", username, password).await
    }

    /// Creates a group (or broadcast) channel; returns its id.
    pub async fn create_channel(&self, name: &str, kind: &str, members: &[i64]) -> Result<i64> {
        let members: Vec<String> = members.iter().map(i64::to_string).collect();
        let v = self
            .call(
                reqwest::Method::POST,
                "/v1/channels",
                Some(json!({"name": name, "kind": kind, "members": members})),
            )
            .await?;
        id(&v["id"])
    }

    pub async fn add_member(&self, channel_id: i64, user_id: i64) -> Result<()> {
        let path = format!("/v1/channels/{channel_id}/members/{user_id}");
        self.call(reqwest::Method::PUT, &path, Some(json!({})))
            .await?;
        Ok(())
    }

    pub async fn remove_member(&self, channel_id: i64, user_id: i64) -> Result<()> {
        let path = format!("/v1/channels/{channel_id}/members/{user_id}");
        self.call(reqwest::Method::DELETE, &path, None).await?;
        Ok(())
    }

    /// Sends over REST; returns the message.
    pub async fn send(&self, channel_id: i64, text: &str, client_id: Option<&str>) -> Result<Msg> {
        let path = format!("/v1/channels/{channel_id}/messages");
        let v = self
            .call(
                reqwest::Method::POST,
                &path,
                Some(json!({"text": text, "client_id": client_id})),
            )
            .await?;
        Msg::from_value(&v)
    }

    /// Sends a reply in the thread of `root_id` over REST; returns the message.
    pub async fn reply(
        &self,
        channel_id: i64,
        root_id: i64,
        text: &str,
        client_id: Option<&str>,
    ) -> Result<Msg> {
        let path = format!("/v1/channels/{channel_id}/messages");
        let body =
            json!({"text": text, "client_id": client_id, "thread_root_id": root_id.to_string()});
        let v = self.call(reqwest::Method::POST, &path, Some(body)).await?;
        Msg::from_value(&v)
    }

    /// Reacts to a message with one emoji (`add`), or takes the reaction back.
    pub async fn react(
        &self,
        channel_id: i64,
        message_id: i64,
        emoji: &str,
        add: bool,
    ) -> Result<()> {
        // Percent-encoded: `#️⃣` would otherwise start the URL's fragment.
        let emoji =
            percent_encoding::utf8_percent_encode(emoji, percent_encoding::NON_ALPHANUMERIC);
        let path = format!("/v1/channels/{channel_id}/messages/{message_id}/reactions/{emoji}");
        let method = if add {
            reqwest::Method::PUT
        } else {
            reqwest::Method::DELETE
        };
        self.call(method, &path, None).await?;
        Ok(())
    }

    /// The first page (newest first) of what a search finds in the caller's channels, or
    /// in `channel_id`'s.
    pub async fn search(&self, q: &str, channel_id: Option<i64>) -> Result<Vec<Found>> {
        let q = percent_encoding::utf8_percent_encode(q, percent_encoding::NON_ALPHANUMERIC);
        let mut path = format!("/v1/search?q={q}");
        if let Some(ch) = channel_id {
            path.push_str(&format!("&channel_id={ch}"));
        }
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        v["results"]
            .as_array()
            .ok_or_else(|| ClientError::Protocol(format!("search: no results in {v}")))?
            .iter()
            .map(Found::from_value)
            .collect()
    }

    pub async fn logout(&self) -> Result<()> {
        self.call(reqwest::Method::DELETE, "/v1/sessions/current", None)
            .await?;
        Ok(())
    }
}

fn id(v: &Value) -> Result<i64> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("expected a decimal id, got {v}")))
}
