//! placeholder
pub mod gitea;
pub mod anthropic;
pub mod openai;
pub mod script;
mod server;
pub use script::{Script, Turn};
pub use server::{FixtureConfig, FixtureError, FixtureHandle, RecordedRequest, TlsIdentity};
