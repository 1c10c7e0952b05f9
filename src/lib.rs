//! Natter: a self-hostable real-time messaging backend.
//!
//! The binary (`src/main.rs`) is a thin shell over this library: [`server::serve`] takes a
//! bound listener, a [`config::Config`] and a shutdown future, so tests run real servers on
//! `127.0.0.1:0`. See `ARCHITECTURE.md` for the code map and the invariants.

pub mod api;
pub mod auth;
pub mod bench;
pub mod chars;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod conns;
pub mod delivery;
pub mod files;
pub mod gateway;
pub mod id;
pub mod mac;
pub mod metrics;
pub mod model;
pub mod process;
pub mod ratelimit;
pub mod sealing;
pub mod search;
pub mod server;
pub mod store;
pub mod totp;
pub mod username;
pub mod wire;

pub use config::Config;
pub use server::serve;
