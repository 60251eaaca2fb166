//! Test fixtures for what cannot run here: scripted model servers (Anthropic Messages,
//! OpenAI Responses), a reflecting origin for custody tests and a fake Gitea, all on
//! loopback and following the public wire formats. Used by the integration tests, the demo and later the orchestrator tests.
pub mod anthropic;
pub mod echo;
pub mod gitea;
pub mod openai;
pub mod script;
mod server;
pub use script::{Script, Turn};
pub use server::{FixtureConfig, FixtureError, FixtureHandle, RecordedRequest, TlsIdentity};
