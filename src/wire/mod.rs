//! What travels on the wire, below the API layer: the JSON shapes of API v1 ([`dto`]),
//! the bounds and schemas of their values ([`schema`]) and the `/v1/ws` frames
//! ([`protocol`]). The API's handlers and the real-time gateway both use them; neither
//! imports the other for them.

pub mod dto;
pub mod protocol;
pub mod schema;
