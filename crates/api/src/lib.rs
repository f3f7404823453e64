//! The HTTP/JSON surface of Capstan: wire types (apart from the domain types, so the API can stay
//! stable while the core changes), stable error codes, and a client for the CLI, agents and tests.

pub mod client;
pub mod wire;

pub use client::{ApiError, Client};
pub use wire::*;
