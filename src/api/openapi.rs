//! The OpenAPI 3.1 document of API v1: its frame ([`ApiDoc`]), the answers every
//! operation shares because its extractors give them ([`SharedAnswers`]), and the schemas
//! of values whose rules a derive cannot state (ids, enums kept as strings in the DTOs).

use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, ContentBuilder, Ref};
use utoipa::{OpenApi, ToSchema};

use super::dto;
use super::extract::MAX_BODY_BYTES;
pub use crate::wire::schema::*;

#[derive(OpenApi)]
#[openapi(
    info(title = "Natter API", version = "1", description = "Real-time messaging: accounts, channels, durable messages and each channel's gap-free event log.\n\nEvery error answer is an `ErrorBody`. Request bodies are JSON objects of at most 64 KiB that must arrive within the body timeout, and unknown fields are refused."),
    modifiers(&BearerAuth),
    components(schemas(dto::ErrorBody, dto::ErrorDetail, Id))
)]
pub(super) struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Adds to each operation the answers its extractors and the store give, so no handler's
/// annotation can forget them: `401` wherever a bearer token is required (`Authed`);
/// `400`, `408` and `413` wherever a JSON body is read (`JsonBody`); `503` wherever the
/// store is reached (a full write queue, or a server shutting down), and `507` where it is
/// written to (a disk below its reserve). Applied once the
/// routes are merged into the document (a modifier of [`ApiDoc`] would see no paths).
pub(super) struct SharedAnswers;

impl utoipa::Modify for SharedAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                (&mut item.get, false),
                (&mut item.put, true),
                (&mut item.post, true),
                (&mut item.delete, true),
                (&mut item.patch, true),
            ];
            for (op, writes) in operations {
                if let Some(op) = op {
                    add_shared_answers(path, op, writes);
                }
            }
        }
    }
}

fn add_shared_answers(path: &str, op: &mut Operation, op_writes: bool) {
    let authed = op
        .security
        .iter()
        .flatten()
        .any(|req| serde_json::to_value(req).is_ok_and(|v| v.get("bearer").is_some()));
    let has_body = op.request_body.is_some();
    let reaches_store = authed || (path.starts_with("/v1/") && path != "/v1/ws");
    let mut add = |status: &str, description: String| {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| error_answer(description).into());
    };
    if authed {
        add(
            "401",
            "`unauthorized`: no valid `Authorization: Bearer <token>`".into(),
        );
        add(
            "403",
            "`insufficient_scope`: an API key without the scope this route needs; \
             `session_required`: an API key used to manage sessions, keys or bots"
                .into(),
        );
    }
    if has_body {
        add(
            "400",
            "`invalid_json` or `invalid_field` (naming the field): the body breaks its schema"
                .into(),
        );
        add(
            "408",
            "`request_timeout`: the body did not arrive within the body timeout; the \
             connection is closed"
                .into(),
        );
        add(
            "413",
            format!("`payload_too_large`: the body is over {MAX_BODY_BYTES} bytes"),
        );
    }
    if reaches_store {
        add(
            "503",
            "`overloaded` (the write queue is full) or `unavailable` (the server is shutting \
             down), with `Retry-After`"
                .into(),
        );
        if op_writes {
            add(
                "507",
                "`insufficient_storage`: the data directory's disk is below its reserve \
                 (`--disk-reserve-mib`); writes are refused until space is freed, reads go on"
                    .into(),
            );
        }
    }
}

/// An error answer: its description and an `ErrorBody`.
fn error_answer(description: String) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content("application/json", error_content())
        .build()
}

fn error_content() -> Content {
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorBody")))
        .build()
}

/// The query of `GET /v1/channels` (read by `Params`; this type only describes it).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ChannelPage {
    /// Only channels with a larger id: the previous page's `next_after` (empty or absent
    /// for the first page).
    #[param(schema_with = after_cursor)]
    after: Option<String>,
    /// Channels per page, default 2000 (the default channel cap: a client that does not
    /// page gets them all).
    #[param(minimum = 1, maximum = 2000)]
    limit: Option<i64>,
}

/// The headers of a WebSocket opening handshake (RFC 6455), as `GET /v1/ws` checks them
/// (this type only describes them).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct WsHandshake {
    /// `websocket` (any letter case).
    #[param(rename = "Upgrade", inline)]
    upgrade: WsUpgrade,
    /// A list holding the token `Upgrade` (any letter case), e.g. `Upgrade` or
    /// `keep-alive, Upgrade`.
    #[param(rename = "Connection", inline)]
    connection: WsConnection,
    #[param(rename = "Sec-WebSocket-Version", inline)]
    version: WsVersion,
    /// The client's nonce (RFC 6455: 16 random bytes in base64); answered in
    /// `Sec-WebSocket-Accept`.
    #[param(rename = "Sec-WebSocket-Key")]
    key: String,
}

#[derive(ToSchema)]
#[allow(dead_code)]
enum WsUpgrade {
    #[schema(rename = "websocket")]
    Websocket,
}

#[derive(ToSchema)]
#[allow(dead_code)]
enum WsConnection {
    Upgrade,
}

#[derive(ToSchema)]
#[allow(dead_code)]
enum WsVersion {
    #[schema(rename = "13")]
    V13,
}
