//! The OpenAPI 3.1 document of API v1: its frame ([`ApiDoc`]), the answers every
//! operation shares because its extractors give them ([`SharedAnswers`]), and the schemas
//! of values whose rules a derive cannot state (ids, enums kept as strings in the DTOs).

use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaFormat, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, ContentBuilder, Ref, RefOr, Schema};
use utoipa::{OpenApi, PartialSchema, ToSchema};

use super::dto;
use super::extract::MAX_BODY_BYTES;
use super::validate::{MAX_CHANNEL_NAME_CHARS, MAX_INITIAL_MEMBERS, MAX_TEXT_CHARS, pattern};
use crate::username;

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
/// store is reached (a full write queue, or a server shutting down). Applied once the
/// routes are merged into the document (a modifier of [`ApiDoc`] would see no paths).
pub(super) struct SharedAnswers;

impl utoipa::Modify for SharedAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                add_shared_answers(path, op);
            }
        }
    }
}

fn add_shared_answers(path: &str, op: &mut Operation) {
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

/// A snowflake id of a user, channel or message: a positive decimal integer below 2^63,
/// as a string.
pub struct Id;

impl PartialSchema for Id {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(pattern::ID))
            .description(Some(
                "A snowflake id: a positive decimal integer below 2^63, as a string.",
            ))
            .into()
    }
}

impl ToSchema for Id {}

/// A username as a request gives it.
pub fn username() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(username::MIN_CHARS))
        .max_length(Some(username::MAX_CHARS))
        .pattern(Some(pattern::USERNAME))
        .description(Some(
            "A new name: 3–32 characters of `a-z 0-9 _ . -` with at least one letter, \
             starting and ending with a letter or digit, no two of `_ . -` in a row. Names \
             are folded (NFKC, lower case) before they are checked, stored or compared, so \
             compatible forms (`ＡＬＩＣＥ` for `alice`) are accepted too. Logging in \
             answers 401 to any name that names no account.",
        ))
}

/// A channel name.
pub fn channel_name() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_CHANNEL_NAME_CHARS))
        .pattern(Some(pattern::CHANNEL_NAME))
        .description(Some(
            "1–100 characters (Unicode scalar values), not only whitespace or invisible \
             ones, with no control character, line separator or bidi control.",
        ))
}

/// Message text.
pub fn text() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_TEXT_CHARS))
        .pattern(Some(pattern::TEXT))
        .description(Some(
            "1–4000 characters (Unicode scalar values), not only whitespace or invisible \
             ones, with no control character but newline and tab and no bidi override or \
             isolate. Stored as sent.",
        ))
}

/// Initial members of a new channel: at most 1000 user ids.
pub fn member_ids() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(Ref::from_schema_name("Id"))
        .max_items(Some(MAX_INITIAL_MEMBERS))
}

/// A time.
pub fn time() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::DateTime,
        )))
        .description(Some("RFC 3339, UTC."))
}

fn string_enum(values: &[&str]) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.iter().copied()))
}

/// `group` or `broadcast`: the kinds `POST /v1/channels` creates.
pub fn new_channel_kind() -> ObjectBuilder {
    string_enum(&["group", "broadcast"])
}

pub fn channel_kind() -> ObjectBuilder {
    string_enum(&["group", "broadcast", "dm"])
}

pub fn role() -> ObjectBuilder {
    string_enum(&["owner", "admin", "member"])
}

/// The roles `PUT .../members/{user_id}` gives; `null` or absent keeps the member's.
pub fn granted_role() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some([
            serde_json::json!("member"),
            serde_json::json!("admin"),
            serde_json::Value::Null,
        ]))
}

pub fn event_type() -> ObjectBuilder {
    string_enum(&[
        "message.created",
        "message.edited",
        "message.deleted",
        "member.added",
        "member.updated",
        "member.removed",
        "channel.updated",
    ])
}

/// `after` of `GET /v1/channels`: empty (the first page) or a channel id.
pub fn after_cursor() -> utoipa::openapi::schema::OneOfBuilder {
    utoipa::openapi::schema::OneOfBuilder::new()
        .item(Ref::from_schema_name("Id"))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(0)),
        )
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
