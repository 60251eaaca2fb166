//! Forge access for bot-bottle: the provider-agnostic [`Forge`] trait, the
//! read-anywhere / write-scoped [`ScopedForge`], the Gitea (and Forgejo) client,
//! the SQLite forge state store, and webhook verification, parsing, targeting and
//! dedupe.
//!
//! See `docs/forge.md` for how these pieces make up the forge loop (DESIGN §5).

pub mod gitea;
pub mod model;
pub mod scoped;
pub mod store;
pub mod targeting;
pub mod webhook;

pub use gitea::{GiteaClient, GiteaConfig, GiteaError, GiteaForge};
pub use model::{
    BranchRef, Comment, Forge, ForgeError, Issue, IssueState, Label, NewPullRequest, PullRequest,
};
pub use scoped::{ScopeError, ScopedForge, WriteOperation};
pub use store::{ForgeState, ForgeStateStore, ForgeStatus, SqliteForgeStateStore, StoreError};
pub use targeting::{DEFAULT_FORGE_ORG, Target, TargetDecision, target_issue};
pub use webhook::{
    DedupeKeys, Delivery, WebhookError, WebhookEvent, WebhookHeaders, dedupe_keys, parse_event,
    receive, verify_signature,
};
