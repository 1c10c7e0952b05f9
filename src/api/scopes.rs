//! What an API key may do. A session (a login) may do everything its user may; an API key
//! only what its scopes grant, checked for every authenticated route in one place: the
//! [`super::extract::Authed`] extractor looks the matched route up in [`required`]. A
//! route missing from the table is refused to every key (and a test checks that the
//! table names every route of the OpenAPI document), so a new route is closed to keys
//! until someone decides which scope it needs.

use axum::http::Method;

/// One permission of an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Look users up; see presence.
    UsersRead,
    /// Change the key's own profile and presence status.
    UsersWrite,
    /// List channels, read a channel and its members.
    ChannelsRead,
    /// Create channels and DMs, rename them, add and remove members.
    ChannelsWrite,
    /// Read history, the log, threads, reactions, mentions and search; open the
    /// WebSocket (which streams the channels' events); move read markers.
    MessagesRead,
    /// Send, reply, edit, delete, react; typing signals.
    MessagesWrite,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::UsersRead,
        Scope::UsersWrite,
        Scope::ChannelsRead,
        Scope::ChannelsWrite,
        Scope::MessagesRead,
        Scope::MessagesWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scope::UsersRead => "users:read",
            Scope::UsersWrite => "users:write",
            Scope::ChannelsRead => "channels:read",
            Scope::ChannelsWrite => "channels:write",
            Scope::MessagesRead => "messages:read",
            Scope::MessagesWrite => "messages:write",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.name() == name)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of scopes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn insert(&mut self, scope: Scope) {
        self.0 |= scope.bit();
    }

    /// The scopes named in a stored list (space-separated; an unknown name, from a newer
    /// build, grants nothing).
    pub fn parse_stored(list: &str) -> Self {
        let mut scopes = Self::default();
        for scope in list.split_ascii_whitespace().filter_map(Scope::parse) {
            scopes.insert(scope);
        }
        scopes
    }

    /// The names, in the order of [`Scope::ALL`].
    pub fn names(self) -> Vec<&'static str> {
        Scope::ALL
            .into_iter()
            .filter(|s| self.contains(*s))
            .map(Scope::name)
            .collect()
    }

    /// As stored: the names, space-separated.
    pub fn stored(self) -> String {
        self.names().join(" ")
    }
}

/// What a route asks of an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// This scope.
    Scope(Scope),
    /// A session: account management (sessions, keys, bots) is never done with a key,
    /// so a leaked key cannot mint more keys or lock its owner out.
    Session,
}

/// The scope a route asks of an API key, by method and route template (as axum matched
/// it). `None`: a route this table does not know, refused to keys.
pub fn required(method: &Method, route: &str) -> Option<Needs> {
    use Needs::{Scope as S, Session};
    use Scope::*;
    let m = method.as_str();
    Some(match (m, route) {
        ("GET", "/v1/users/me" | "/v1/users/{id}" | "/v1/users") => S(UsersRead),
        ("PATCH", "/v1/users/me") => S(UsersWrite),
        ("DELETE", "/v1/users/me") => Session,
        ("GET", "/v1/channels/{id}/presence") => S(UsersRead),
        ("GET", "/v1/channels" | "/v1/channels/{id}" | "/v1/channels/{id}/members") => {
            S(ChannelsRead)
        }
        ("POST", "/v1/channels" | "/v1/dms")
        | ("PATCH", "/v1/channels/{id}")
        | ("PUT" | "DELETE", "/v1/channels/{id}/members/{user_id}") => S(ChannelsWrite),
        (
            "GET",
            "/v1/channels/{id}/events"
            | "/v1/channels/{id}/messages"
            | "/v1/channels/{id}/messages/{message_id}"
            | "/v1/channels/{id}/messages/{message_id}/reactions"
            | "/v1/channels/{id}/messages/{message_id}/reactions/{emoji}"
            | "/v1/channels/{id}/threads/{root_id}/messages"
            | "/v1/mentions"
            | "/v1/search"
            | "/v1/files/{id}"
            | "/v1/files/{id}/thumbnail",
        ) => S(MessagesRead),
        ("POST", "/v1/uploads") => S(MessagesWrite),
        ("PUT", "/v1/channels/{id}/read") => S(MessagesRead),
        ("POST", "/v1/channels/{id}/messages")
        | ("PATCH" | "DELETE", "/v1/channels/{id}/messages/{message_id}")
        | ("PUT" | "DELETE", "/v1/channels/{id}/messages/{message_id}/reactions/{emoji}") => {
            S(MessagesWrite)
        }
        (
            _,
            "/v1/sessions"
            | "/v1/sessions/current"
            | "/v1/sessions/others"
            | "/v1/sessions/{id}"
            | "/v1/sessions/two-factor"
            | "/v1/users/me/two-factor"
            | "/v1/users/me/two-factor/confirm"
            | "/v1/users/me/two-factor/disable"
            | "/v1/users/me/two-factor/recovery-codes"
            | "/v1/users/me/password"
            | "/v1/users/me/export"
            | "/v1/keys"
            | "/v1/keys/{id}"
            | "/v1/bots"
            | "/v1/bots/{id}"
            | "/v1/channels/{id}/webhooks"
            | "/v1/channels/{id}/webhooks/{webhook_id}"
            | "/v1/channels/{id}/subscriptions"
            | "/v1/channels/{id}/subscriptions/{subscription_id}",
        ) => Session,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_scopes_are_the_scopes() {
        let names: Vec<&str> = Scope::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names, crate::wire::schema::SCOPE_NAMES);
    }

    #[test]
    fn scopes_round_trip_through_their_stored_form() {
        let mut s = Scopes::default();
        s.insert(Scope::MessagesWrite);
        s.insert(Scope::UsersRead);
        assert_eq!(s.stored(), "users:read messages:write");
        assert_eq!(Scopes::parse_stored(&s.stored()), s);
        assert!(!s.contains(Scope::MessagesRead));
        assert_eq!(
            Scopes::parse_stored("files:write messages:write"),
            Scopes::parse_stored("messages:write"),
            "an unknown name grants nothing"
        );
    }

    /// Every route of the API that takes a bearer token is in the table: a route added
    /// without deciding its scope would be closed to keys, and this says so first.
    #[test]
    fn every_authenticated_route_has_a_scope() {
        let spec = serde_json::to_value(crate::api::openapi()).unwrap();
        let mut missing = Vec::new();
        for (path, item) in spec["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if op.get("security").is_none() || path == "/v1/ws" {
                    continue;
                }
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
                if required(&method, path).is_none() {
                    missing.push(format!("{method} {path}"));
                }
            }
        }
        assert!(missing.is_empty(), "routes without a scope: {missing:?}");
    }
}
