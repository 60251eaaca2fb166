//! Host-side sidecars a bottle reaches as MCP servers over Unix sockets in
//! `state/<slug>/run/` (DESIGN §3, §5).
//!
//! - [`forge`]: the forge sidecar. The agent reads the issue, opens its pull request and
//!   says it is done through it, while the forge token stays in this process. Every call
//!   goes through one [`bot_bottle_forge::ScopedForge`] (reads anywhere in the
//!   repository, writes only to the assigned issue and the run's pull requests) and is
//!   written to a hash-chained op log (`forge-ops.jsonl`, the egress audit format).
//! - [`queue`]: the queue dir through which the sidecar tells the orchestrator that the
//!   agent opened a pull request or signalled done.
//! - [`client`]: a small MCP client over loopback TCP, for the in-bottle
//!   `bot-bottle tool forge TOOL [JSON]` and for tests.

pub mod approvals;
pub mod client;
pub mod forge;
mod mcp;
pub mod queue;
pub mod supervise;

pub use forge::{ForgeContext, ForgeSidecar, SidecarError};

/// The forge sidecar's socket in `state/<slug>/run/`.
pub const FORGE_SOCKET: &str = bot_bottle_core::forge::FORGE_SOCKET;
/// The loopback port in the bottle that the shim forwards to [`FORGE_SOCKET`].
pub const FORGE_PORT: u16 = bot_bottle_core::forge::FORGE_PORT;
/// Where the sidecar serves MCP (streamable HTTP).
pub const MCP_PATH: &str = bot_bottle_core::forge::MCP_PATH;
/// The forge op log in `state/<slug>/`.
pub const FORGE_OPS_LOG: &str = "forge-ops.jsonl";
/// The queue dir in `state/<slug>/`.
pub const QUEUE_DIR: &str = "queue";
