//! The bottle's egress gateway: a fail-closed HTTP proxy that decides every request
//! against the bottle's egress policy and records each decision in a hash-chained audit log.
//!
//! Start one with [`start`] and a [`GatewayConfig`]; see `docs/architecture.md`.

pub mod audit;
mod body;
mod custody;
pub mod dlp;
mod forward;
mod gateway;
mod gitpush;
mod mitm;
mod timer;
pub mod tls;
pub mod tripwire;
mod tunnel;
mod upstream;
mod websocket;

pub use custody::{CustodyError, ResolvedCredential, read_source};
pub use gitpush::{PUSH_DETAIL_PREFIX, pushed_ids};
pub use tls::{CertificateAuthority, TlsError};

/// Environment variables that point a tool at a CA bundle, all of which the bottle sets
/// to a bundle holding the system roots plus the bottle's gateway CA (system roots stay
/// because `passthrough` hosts present their real certificates).
/// `NODE_EXTRA_CA_CERTS` adds to Node's built-in roots, so it may point at the gateway
/// CA alone. `CODEX_CA_CERTIFICATE` is read by the Codex CLI.
pub const CA_ENV_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "NODE_EXTRA_CA_CERTS",
    "CODEX_CA_CERTIFICATE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "CARGO_HTTP_CAINFO",
    "AWS_CA_BUNDLE",
    "DENO_CERT",
];

pub use gateway::{
    AttemptRecorder, BLOCK_HEADER, ERROR_HEADER, EventRecorder, GatewayConfig, GatewayError,
    GatewayHandle, Limits, Listen, OverCap, start,
};

/// A small deterministic xorshift generator for the fuzz loops of the unit tests: no
/// dependency, the same inputs on every run.
#[cfg(test)]
pub(crate) fn xorshift() -> impl FnMut() -> u64 {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
