//! The bottle's egress gateway: a fail-closed HTTP proxy that decides every request
//! against the bottle's egress policy and records each decision in a hash-chained audit log.
//!
//! Start one with [`start`] and a [`GatewayConfig`]; see `docs/architecture.md`.

pub mod audit;
mod body;
pub mod dlp;
mod forward;
mod gateway;
mod tunnel;
mod upstream;

pub use gateway::{
    BLOCK_HEADER, ERROR_HEADER, GatewayConfig, GatewayError, GatewayHandle, Listen, start,
};
