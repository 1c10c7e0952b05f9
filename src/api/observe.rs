//! The middleware every request passes: a request id (the caller's `X-Request-Id` if it
//! is sane, else a new one) on a span over everything the request logs and in the
//! answer's `X-Request-Id` header; the request counted by route and status with its
//! latency; and one access-log line (target `natter::access`: debug, or warn for a 5xx).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::AppState;

pub const REQUEST_ID: &str = "x-request-id";

/// Longest request id taken from a caller.
const MAX_ID_LEN: usize = 128;

pub(super) async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = req.method().clone();
    let id = req
        .headers()
        .get(REQUEST_ID)
        .filter(|v| acceptable(v.as_bytes()))
        .cloned()
        .unwrap_or_else(new_id);
    // Only the id on the span (formatted once per request, so kept small); the access
    // line names the method and route.
    let span = tracing::info_span!("request", id = id.to_str().unwrap_or_default());
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    response.headers_mut().insert(REQUEST_ID, id);
    let took = started.elapsed();
    let route = route.as_ref().map_or("unmatched", |m| m.as_str());
    state
        .http
        .observe(method.as_str(), route, status.as_u16(), took);
    let _enter = span.enter();
    let (status, ms) = (status.as_u16(), took.as_secs_f64() * 1e3);
    if status >= 500 {
        tracing::warn!(target: "natter::access", %method, route, status, ms, "answered");
    } else {
        tracing::debug!(target: "natter::access", %method, route, status, ms, "answered");
    }
    response
}

/// A caller's id is kept if it is short and plain (letters, digits, `-_.:`), so it can
/// neither forge log lines nor grow them without bound.
fn acceptable(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// `<process prefix>-<counter>`: unique within a process and, by its random prefix,
/// across processes and restarts.
fn new_id() -> HeaderValue {
    static PREFIX: LazyLock<String> = LazyLock::new(|| {
        let mut b = [0u8; 4];
        let _ = getrandom::fill(&mut b);
        b.iter().map(|x| format!("{x:02x}")).collect()
    });
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    HeaderValue::from_str(&format!("{}-{n:x}", *PREFIX)).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_ids_must_be_short_and_plain() {
        assert!(acceptable(b"abc-123_x.y:z"));
        assert!(!acceptable(b""));
        assert!(!acceptable(b"a b"));
        assert!(!acceptable(b"line\nbreak"));
        assert!(!acceptable(&[b'a'; MAX_ID_LEN + 1]));
    }

    #[test]
    fn new_ids_differ() {
        assert_ne!(new_id(), new_id());
    }
}
