//! `GET /v1/users/me/export`: the caller's data as NDJSON, streamed: their profile, their
//! channel memberships, and every live message they wrote. Read a page at a time and
//! sent as the client takes it, so memory stays bounded however long the history.

use std::collections::HashSet;
use std::sync::Mutex;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::dto::{self, ErrorBody};
use super::error::{ApiError, ApiResult};
use super::extract::{Authed, ClientIp};
use crate::clock::{now_ms, rfc3339};

/// Messages read from the store per page.
const PAGE: u32 = 500;
/// Chunks (a page's lines each) waiting for the client: what the export holds in memory.
const CHUNKS_AHEAD: usize = 2;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(export))
}

/// Users with an export running on this node: one at a time each.
#[derive(Default)]
pub(super) struct Exporting(Mutex<HashSet<i64>>);

/// A user's place in [`Exporting`], given back when the export ends (or is dropped).
struct ExportSlot {
    state: AppState,
    user_id: i64,
}

impl ExportSlot {
    fn take(state: &AppState, user_id: i64) -> Option<Self> {
        let mut running = state.exporting.0.lock().unwrap_or_else(|p| p.into_inner());
        running.insert(user_id).then(|| Self {
            state: state.clone(),
            user_id,
        })
    }
}

impl Drop for ExportSlot {
    fn drop(&mut self) {
        let mut running = self
            .state
            .exporting
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        running.remove(&self.user_id);
    }
}

/// The caller's data as NDJSON (`application/x-ndjson`), one JSON object a line, each
/// with a `type`: `export` (when, whose), `profile` (the user), `membership` (one per
/// channel they are in, as `GET /v1/channels` shows it), `message` (every live message
/// they wrote, in any channel, ones they left included, oldest first, as history shows
/// it), and last `end` with the number of messages. A download without the `end` line
/// was cut short (a store failure mid-way ends the body with an `error` line). One
/// export at a time per user.
#[utoipa::path(get, path = "/v1/users/me/export", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, content_type = "application/x-ndjson", body = String,
               description = "NDJSON lines: `export`, `profile`, `membership`…, `message`…, `end`"),
              (status = 401, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "`export_in_progress`: the caller's previous export is still running")))]
async fn export(
    State(state): State<AppState>,
    auth: Authed,
    ClientIp(ip): ClientIp,
) -> ApiResult<Response> {
    let slot = ExportSlot::take(&state, auth.user.id).ok_or_else(ApiError::export_in_progress)?;
    let user = state
        .store
        .user(auth.user.id)
        .await?
        .unwrap_or(auth.user.clone());
    let channels = state.store.channels(user.id).await?;
    let mut head = String::new();
    line(
        &mut head,
        &json!({"type": "export", "version": 1, "exported_at": rfc3339(now_ms()), "user_id": user.id.to_string()}),
    );
    line(
        &mut head,
        &json!({"type": "profile", "user": dto::User::from(&user)}),
    );
    for view in &channels {
        line(
            &mut head,
            &json!({"type": "membership", "channel": dto::Channel::from(view)}),
        );
    }
    super::security::audit("account.exported", &user, ip);
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(CHUNKS_AHEAD);
    let store = state.store.clone();
    let author = user.id;
    tokio::spawn(async move {
        let _slot = slot;
        if tx.send(Ok(Bytes::from(head))).await.is_err() {
            return;
        }
        let mut after = 0;
        let mut count = 0u64;
        loop {
            let page = match store.authored(author, after, PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(user_id = author, error = %e, "export cut short");
                    let mut last = String::new();
                    line(
                        &mut last,
                        &json!({"type": "error", "message": "the export could not be completed; try again"}),
                    );
                    let _ = tx.send(Ok(Bytes::from(last))).await;
                    let _ = tx
                        .send(Err(std::io::Error::other("export cut short")))
                        .await;
                    return;
                }
            };
            let mut chunk = String::with_capacity(page.items.len() * 256);
            for m in &page.items {
                line(
                    &mut chunk,
                    &json!({"type": "message", "message": dto::Message::from(m)}),
                );
            }
            count += page.items.len() as u64;
            if let Some(last) = page.items.last() {
                after = last.id;
            }
            if !page.has_more {
                line(&mut chunk, &json!({"type": "end", "messages": count}));
            }
            // The client went away: stop reading.
            if tx.send(Ok(Bytes::from(chunk))).await.is_err() || !page.has_more {
                return;
            }
        }
    });
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"natter-export.ndjson\""),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

fn line(out: &mut String, value: &serde_json::Value) {
    out.push_str(&value.to_string());
    out.push('\n');
}
