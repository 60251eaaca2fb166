//! The forge orchestrator (DESIGN §5): a Gitea webhook listener that turns targeted
//! issues into headless bottle runs, freezes them on `signal_done`, resumes them on
//! human comments, destroys them when their pull request closes, and fires a watchdog
//! on silent runs. See `docs/forge.md`.

pub mod config;
pub mod router;
pub mod server;
pub mod service;

pub use config::{Config, ConfigError};
pub use service::{Answer, Launcher, Orchestrator, OrchestratorError, StatusRow};
