//! The API's one error type and its JSON body:
//! `{"error": {"code", "message", "field"?}}` with an HTTP status. Internal failures are
//! logged here, where they are handled, and never described in the body.

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: Cow<'static, str>,
    pub field: Option<String>,
    /// Seconds, for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn invalid_json(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    pub fn invalid_field(field: impl Into<String>, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_field", message)
        }
    }

    /// `400 invalid_query`: the search query `q` does not parse; the message says why.
    pub fn invalid_query(message: String) -> Self {
        Self {
            field: Some("q".into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_query", message)
        }
    }

    pub fn text_empty() -> Self {
        Self {
            field: Some("text".into()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "text_empty",
                "text must not be empty or only whitespace",
            )
        }
    }

    pub fn text_too_long(max: usize) -> Self {
        Self {
            field: Some("text".into()),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "text_too_long",
                format!("text must be at most {max} characters"),
            )
        }
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <token>` header is required",
        )
    }

    pub fn invalid_credentials() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "unknown username or wrong password",
        )
    }

    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// `403 insufficient_scope`: the API key lacks the scope the route needs.
    pub fn insufficient_scope(scope: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!("this API key lacks the `{scope}` scope"),
        )
    }

    /// `403 session_required`: sessions, keys and bots are managed from a login, never
    /// with an API key.
    pub fn session_required() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "session_required",
            "this needs a login session: API keys cannot manage accounts, sessions or keys",
        )
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }

    /// `404 not_found`, saying which part of the path names nothing.
    pub fn not_found_because(message: &'static str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this resource does not support that method",
        )
    }

    pub fn username_taken() -> Self {
        Self {
            field: Some("username".into()),
            ..Self::new(
                StatusCode::CONFLICT,
                "username_taken",
                "that username is taken",
            )
        }
    }

    /// A per-user bound of the store: `409 too_many_channels` or `too_many_edits`.
    pub fn too_many(which: crate::store::TooMany) -> Self {
        let code = match which {
            crate::store::TooMany::Channels(_) => "too_many_channels",
            crate::store::TooMany::Edits(_) => "too_many_edits",
            crate::store::TooMany::PendingDms(_) => "too_many_dms",
            crate::store::TooMany::Reactions(_) => "too_many_reactions",
            crate::store::TooMany::Bots(_) => "too_many_bots",
            crate::store::TooMany::ApiKeys(_) => "too_many_api_keys",
            crate::store::TooMany::Webhooks(_) => "too_many_webhooks",
        };
        Self::new(StatusCode::CONFLICT, code, which.to_string())
    }

    pub fn too_many_connections(max: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            format!("at most {max} real-time connections per user; close another one first"),
        )
    }

    /// A request to `/v1/ws` that is not a WebSocket opening handshake, with the status
    /// and reason axum gives (400; 426 on a connection that cannot be upgraded).
    pub fn invalid_handshake(status: StatusCode, reason: String) -> Self {
        Self::new(status, "invalid_handshake", reason)
    }

    /// A request body that did not arrive in time: 408, and the connection is closed.
    pub fn request_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s",
                limit.as_secs()
            ),
        )
    }

    /// Writes are refused for disk space: 507 with Retry-After; reads still work.
    pub fn insufficient_storage() -> Self {
        Self {
            retry_after: Some(30),
            ..Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                "the server is out of disk space and takes no writes for now; reads still work",
            )
        }
    }

    pub fn payload_too_large(max: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request bodies are limited to {max} bytes"),
        )
    }

    /// `409 too_many_watched`: a connection watches the presence of at most `max` users.
    pub fn too_many_watched(max: usize) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "too_many_watched",
            format!(
                "a connection may watch the presence of at most {max} users; unsubscribe some first"
            ),
        )
    }

    pub fn rate_limited(retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests; retry in {retry_after} s"),
            )
        }
    }

    pub fn overloaded() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the server is busy; retry shortly",
            )
        }
    }

    /// The body's `error` object, as a WebSocket error frame carries it too.
    pub fn detail(&self) -> super::dto::ErrorDetail {
        super::dto::ErrorDetail {
            code: self.code.to_owned(),
            message: self.message.to_string(),
            field: self.field.clone(),
        }
    }

    /// `413 upload_quota`: the caller's uploads would take more than their quota.
    pub fn upload_quota(quota: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload_quota",
            format!(
                "your uploads may take {quota} bytes together; uploads no message carries are deleted after their grace period"
            ),
        )
    }

    /// `422 image_too_large`: an image whose size would take too much to decode (a
    /// decompression bomb, or just too many pixels).
    pub fn image_too_large(why: String) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "image_too_large",
            format!("the image is too large to accept: {why}"),
        )
    }

    /// `429 too_many_uploads`: the caller has as many uploads in progress as allowed.
    pub fn too_many_uploads(max: u32) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_uploads",
                format!("at most {max} uploads at once per user"),
            )
        }
    }

    /// `401 invalid_code` when completing a login, `403 invalid_code` from a session
    /// (a 401 would read as the session's end): the two-factor code is wrong, was used
    /// already, or the recovery code is not one unused.
    pub fn invalid_code(status: StatusCode) -> Self {
        Self {
            field: Some("code".into()),
            ..Self::new(
                status,
                "invalid_code",
                "wrong or already used code: enter the current code of your authenticator app, or an unused recovery code",
            )
        }
    }

    /// `401 invalid_challenge`: a login challenge that expired, was altered, or was
    /// issued by another server.
    pub fn invalid_challenge() -> Self {
        Self {
            field: Some("challenge".into()),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_challenge",
                "the login challenge expired or is not valid; log in with your password again",
            )
        }
    }

    /// `403 wrong_password`: a session's re-authentication for a sensitive change failed.
    pub fn wrong_password(field: &'static str) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(
                StatusCode::FORBIDDEN,
                "wrong_password",
                "the password is wrong",
            )
        }
    }

    /// `409 <code>`: the account is not in the state the request needs.
    pub fn conflict(code: &'static str, message: &'static str) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// `503 two_factor_unavailable`: this server has no secret key to seal two-factor
    /// secrets and sign login challenges with (a cluster node started without
    /// `--secret-key-file`).
    pub fn two_factor_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "two_factor_unavailable",
            "two-factor login is not available: the server has no secret key configured",
        )
    }

    /// `429 export_in_progress`: the caller's previous export is still being sent.
    pub fn export_in_progress() -> Self {
        Self {
            retry_after: Some(5),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "export_in_progress",
                "your previous export is still running: one at a time",
            )
        }
    }

    pub fn unavailable() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the server is shutting down; retry shortly",
            )
        }
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred; it has been logged",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::not_found(),
            StoreError::Forbidden(why) => Self::forbidden(why),
            StoreError::UsernameTaken => Self::username_taken(),
            StoreError::Invalid { field, message } => Self::invalid_field(field, message),
            StoreError::TooMany(which) => Self::too_many(which),
            StoreError::DiskFull => Self::insufficient_storage(),
            StoreError::Overloaded => Self::overloaded(),
            StoreError::Unavailable => Self::unavailable(),
            StoreError::SearchTooBroad => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "search_too_broad",
                "the search matches too much to answer in time: add words, or search one channel",
            ),
            StoreError::Unreachable => Self {
                retry_after: Some(1),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the database holding this is unreachable; retry shortly",
                )
            },
            e @ StoreError::Internal { .. } => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "store call failed");
                Self::internal()
            }
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
