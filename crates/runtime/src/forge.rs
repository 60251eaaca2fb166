//! A forge run's host side for one session: what the plan gains (see
//! `bot_bottle_core::forge`) and the forge sidecar that serves the agent's forge tools on
//! `state/<slug>/run/forge.sock`.
//!
//! Everything here stays in the launching process: the forge client (which holds the
//! token) goes to the sidecar, the token's *source* goes to the gateway, and the bottle
//! gets neither.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bot_bottle_core::credential::CredentialSource;
use bot_bottle_core::forge::{FORGE_SOCKET, ForgeAttach};
use bot_bottle_core::provenance::{IssueRef, Trigger};
use bot_bottle_core::state::BottleDir;
use bot_bottle_forge::Forge;
use bot_bottle_sidecars::{ForgeContext, ForgeSidecar};

use crate::launch::RuntimeError;

/// The default prefix of a run's branch: `bot-bottle/<slug>`.
pub const DEFAULT_BRANCH_PREFIX: &str = "bot-bottle/";

/// Everything a forge-targeted session needs beyond the bottle itself (the seed's
/// `forge_env`). It reaches the sidecar and the gateway, never the agent.
#[derive(Clone)]
pub struct ForgeRun {
    /// The forge client, holding the token (unscoped: the sidecar scopes it).
    pub forge: Arc<dyn Forge>,
    pub owner: String,
    pub repo: String,
    /// The assigned issue.
    pub issue: u64,
    /// The run's pull requests known so far.
    pub prs: Vec<u64>,
    /// The branch pull requests target by default.
    pub base: String,
    /// The run's branch is this prefix followed by the bottle's slug.
    pub branch_prefix: String,
    /// The git host as the bottle names it, and its port when not 443.
    pub git_host: String,
    pub git_port: Option<u16>,
    /// The user name git authenticates as (the bot's login).
    pub username: String,
    /// Where the gateway reads the token it injects toward `git_host`.
    pub token: CredentialSource,
    /// What started this session, for its provenance.
    pub trigger: Trigger,
    /// Set by whoever stops the session because it was silent too long (the
    /// orchestrator's watchdog), before it stops it: the session's provenance says so.
    pub watchdog_fired: Arc<AtomicBool>,
}

impl std::fmt::Debug for ForgeRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgeRun")
            .field("owner", &self.owner)
            .field("repo", &self.repo)
            .field("issue", &self.issue)
            .field("prs", &self.prs)
            .field("git_host", &self.git_host)
            .finish_non_exhaustive()
    }
}

impl ForgeRun {
    /// The branch of the bottle `slug`.
    #[must_use]
    pub fn branch(&self, slug: &str) -> String {
        format!("{}{slug}", self.branch_prefix)
    }

    /// What the plan gains for the bottle `slug`.
    #[must_use]
    pub fn attach(&self, slug: &str) -> ForgeAttach {
        ForgeAttach {
            host: self.git_host.clone(),
            port: self.git_port,
            repo: format!("{}/{}", self.owner, self.repo),
            issue: self.issue,
            branch: self.branch(slug),
            username: self.username.clone(),
            token: self.token.clone(),
        }
    }

    #[must_use]
    pub fn issue_ref(&self) -> IssueRef {
        IssueRef {
            owner: self.owner.clone(),
            repo: self.repo.clone(),
            number: self.issue,
        }
    }

    /// Starts the bottle's forge sidecar on `run/forge.sock`; its op log is
    /// `forge-ops.jsonl` and its queue `queue/`, both in the bottle's state directory.
    pub async fn start_sidecar(&self, bottle: &BottleDir) -> Result<ForgeSidecar, RuntimeError> {
        let context = ForgeContext {
            forge: Arc::clone(&self.forge),
            owner: self.owner.clone(),
            repo: self.repo.clone(),
            issue: self.issue,
            prs: self.prs.clone(),
            branch: self.branch(bottle.slug()),
            base: self.base.clone(),
        };
        ForgeSidecar::start(
            context,
            &bottle.run_dir().join(FORGE_SOCKET),
            &forge_ops_log(bottle),
            &queue_dir(bottle),
        )
        .await
        .map_err(|err| RuntimeError::Sidecar {
            message: crate::gateway::error_chain(&err),
        })
    }
}

/// `state/<slug>/forge-ops.jsonl`.
#[must_use]
pub fn forge_ops_log(bottle: &BottleDir) -> std::path::PathBuf {
    bottle.path().join(bot_bottle_sidecars::FORGE_OPS_LOG)
}

/// `state/<slug>/queue/`.
#[must_use]
pub fn queue_dir(bottle: &BottleDir) -> std::path::PathBuf {
    bottle.path().join(bot_bottle_sidecars::QUEUE_DIR)
}
