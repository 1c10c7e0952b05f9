//! Limits and schemas of the values the wire carries: the bounds and patterns of ids,
//! names and text that both the API's input rules and its OpenAPI document state, and the
//! schemas of values a derive cannot describe (ids as strings, enums kept as strings).

use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaFormat, SchemaType, Type};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::username;

pub const MAX_TEXT_CHARS: usize = 4000;
pub const MAX_CLIENT_ID_CHARS: usize = 64;
pub const MAX_CHANNEL_NAME_CHARS: usize = 100;
pub const MAX_INITIAL_MEMBERS: usize = 1000;

/// The rules above as JSON Schema patterns for the OpenAPI document, so a client can check
/// a value before sending it. Written for ECMA-262, Python's `re` and the `regex` crate
/// alike: BMP characters as `\uXXXX`, the two supplementary ranges of invisible characters
/// (tags, variation selectors) as literal characters, no look-around. The tests hold each
/// to its rule.
pub mod pattern {
    /// A positive decimal id (1 to 2^63 − 1), without sign or leading zeros.
    pub const ID: &str = "^(?:[1-9][0-9]{0,17}|[1-8][0-9]{18}|9[0-1][0-9]{17}|92[0-1][0-9]{16}\
        |922[0-2][0-9]{15}|9223[0-2][0-9]{14}|92233[0-6][0-9]{13}|922337[0-1][0-9]{12}\
        |92233720[0-2][0-9]{10}|922337203[0-5][0-9]{9}|9223372036[0-7][0-9]{8}\
        |92233720368[0-4][0-9]{7}|922337203685[0-3][0-9]{6}|9223372036854[0-6][0-9]{5}\
        |92233720368547[0-6][0-9]{4}|922337203685477[0-4][0-9]{3}|9223372036854775[0-7][0-9]{2}\
        |922337203685477580[0-6]|9223372036854775807)$";

    /// A new username as typed in ASCII: letters (any case), digits and single `_ . -`
    /// between them, with at least one letter. (Compatible forms such as fullwidth letters
    /// fold into such a name and are accepted too.)
    pub const USERNAME: &str = "^(?:[0-9]+[._-])*[0-9]*[A-Za-z][A-Za-z0-9]*(?:[._-][A-Za-z0-9]+)*$";

    /// Message text: no control character but newline and tab, no bidi override or
    /// isolate, and at least one character that is neither whitespace nor invisible.
    pub const TEXT: &str = concat!(
        "^[\\t\\n \\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000",
        "\\u00AD\\u034F\\u115F\\u1160\\u17B4\\u17B5\\u180B-\\u180F\\u200B-\\u200F\\u2060-\\u2064",
        "\\u3164\\uFE00-\\uFE0F\\uFEFF\\uFFA0\\u061C\u{E0000}-\u{E007F}\u{E0100}-\u{E01EF}]*",
        "[^\\u0000-\\u0020\\u007F-\\u00A0\\u202A-\\u202E\\u2066-\\u2069",
        "\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000",
        "\\u00AD\\u034F\\u115F\\u1160\\u17B4\\u17B5\\u180B-\\u180F\\u200B-\\u200F\\u2060-\\u2064",
        "\\u3164\\uFE00-\\uFE0F\\uFEFF\\uFFA0\\u061C\u{E0000}-\u{E007F}\u{E0100}-\u{E01EF}]",
        "[^\\u0000-\\u0008\\u000B-\\u001F\\u007F-\\u009F\\u202A-\\u202E\\u2066-\\u2069]*$",
    );

    /// A channel name: no control character, line or paragraph separator or bidi control
    /// (override, isolate or mark), and at least one character that is neither whitespace
    /// nor invisible.
    pub const CHANNEL_NAME: &str = concat!(
        "^[ \\u00A0\\u1680\\u2000-\\u200A\\u202F\\u205F\\u3000",
        "\\u00AD\\u034F\\u115F\\u1160\\u17B4\\u17B5\\u180B-\\u180F\\u200B-\\u200D\\u2060-\\u2064",
        "\\u3164\\uFE00-\\uFE0F\\uFEFF\\uFFA0\u{E0000}-\u{E007F}\u{E0100}-\u{E01EF}]*",
        "[^\\u0000-\\u0020\\u007F-\\u00A0\\u061C\\u200E\\u200F\\u2028\\u2029\\u202A-\\u202E",
        "\\u2066-\\u2069\\u1680\\u2000-\\u200A\\u202F\\u205F\\u3000",
        "\\u00AD\\u034F\\u115F\\u1160\\u17B4\\u17B5\\u180B-\\u180F\\u200B-\\u200D\\u2060-\\u2064",
        "\\u3164\\uFE00-\\uFE0F\\uFEFF\\uFFA0\u{E0000}-\u{E007F}\u{E0100}-\u{E01EF}]",
        "[^\\u0000-\\u001F\\u007F-\\u009F\\u061C\\u200E\\u200F\\u2028\\u2029\\u202A-\\u202E",
        "\\u2066-\\u2069]*$",
    );
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

/// A display name, or `null` to clear it: a channel name's rules, 1–64 characters.
pub fn display_name() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::String,
            Type::Null,
        ]))
        .min_length(Some(1))
        .max_length(Some(64))
        .pattern(Some(pattern::CHANNEL_NAME))
        .description(Some(
            "1–64 characters (Unicode scalar values), not only whitespace or invisible ones, \
             with no control character, line separator or bidi control; `null` clears it.",
        ))
}

/// An about text, or `null` to clear it: a message text's rules, 1–1000 characters.
pub fn about() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::String,
            Type::Null,
        ]))
        .min_length(Some(1))
        .max_length(Some(1000))
        .pattern(Some(pattern::TEXT))
        .description(Some(
            "1–1000 characters with a message text's rules (newlines allowed); `null` \
             clears it.",
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

/// The scopes an API key may have (`api::scopes::Scope`'s names; a test there checks
/// the two agree).
pub const SCOPE_NAMES: [&str; 6] = [
    "users:read",
    "users:write",
    "channels:read",
    "channels:write",
    "messages:read",
    "messages:write",
];

/// An API key's scopes: at least one.
pub fn scopes() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(string_enum(&SCOPE_NAMES))
        .min_items(Some(1))
        .max_items(Some(64))
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

pub fn presence_status() -> ObjectBuilder {
    string_enum(&["online", "idle", "offline"])
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
    string_enum(&EVENT_TYPES)
}

/// Every type of a channel's log events.
pub const EVENT_TYPES: [&str; 9] = [
    "message.created",
    "message.edited",
    "message.deleted",
    "member.added",
    "member.updated",
    "member.removed",
    "channel.updated",
    "reaction.added",
    "reaction.removed",
];

/// A subscription's status.
pub fn subscription_status() -> ObjectBuilder {
    string_enum(&["active", "paused", "dead"])
}

/// A status an admin may set.
pub fn settable_subscription_status() -> ObjectBuilder {
    string_enum(&["active", "paused"])
}

/// A subscription's event types: absent or empty for every type.
pub fn event_types() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(string_enum(&EVENT_TYPES))
        .max_items(Some(EVENT_TYPES.len() * 2))
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
