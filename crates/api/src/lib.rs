//! The HTTP/JSON surface of Capstan: wire types (apart from the domain types, so the API can stay
//! stable while the core changes), stable error codes, and a client for the CLI, agents and tests; `serve`, the HTTP
//! server loop (connection caps and timeouts) the master and the agent share.

pub mod client;
pub mod serve;
pub mod wire;

pub use client::{ApiError, Client};
pub use wire::*;
