//! The supervise sidecar's host side for one session: its view of the running gateway
//! (policy and audit chain) and the rules a human allowed for good.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bot_bottle_core::policy::{EgressPolicy, EgressRule};
use bot_bottle_core::state::BottleDir;
use bot_bottle_egress::EventRecorder;
use bot_bottle_egress::audit::EventDraft;
use bot_bottle_sidecars::approvals::ApprovalStore;
use bot_bottle_sidecars::supervise::{
    PolicyControl, SUPERVISE_SOCKET, SuperviseContext, SuperviseSidecar,
};

use crate::launch::RuntimeError;

/// Rules a human allowed for the bottle for good (`allow always`), kept in its state and
/// added to its policy in every later session.
pub const APPROVED_RULES: &str = "approved-rules.json";

/// How long a supervise call waits for a human.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(300);

/// The rules a human allowed for good, in the order they were allowed.
///
/// # Errors
/// The file exists but cannot be read or parsed.
pub fn approved_rules(bottle: &BottleDir) -> Result<Vec<EgressRule>, RuntimeError> {
    let path = bottle.path().join(APPROVED_RULES);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| RuntimeError::Policy {
            message: format!(
                "`{}` is not a list of egress rules: {err}\nhint: fix or remove the file; it holds the rules a human allowed with `approve --always`",
                path.display()
            ),
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(RuntimeError::Io { path, source }),
    }
}

/// Adds `rule` to the bottle's approved rules (atomically; a rule already there is kept
/// once).
///
/// # Errors
/// The file cannot be read or written.
pub fn keep_approved_rule(bottle: &BottleDir, rule: &EgressRule) -> Result<(), RuntimeError> {
    let mut rules = approved_rules(bottle)?;
    if !rules.contains(rule) {
        rules.push(rule.clone());
    }
    let bytes = serde_json::to_vec_pretty(&rules).unwrap_or_default();
    bot_bottle_core::state::write_atomic(&bottle.path().join(APPROVED_RULES), &bytes, 0o600)?;
    Ok(())
}

/// The supervise sidecar's view of the running gateway.
struct GatewayControl {
    gateway: EventRecorder,
    bottle: BottleDir,
}

impl PolicyControl for GatewayControl {
    fn current(&self) -> EgressPolicy {
        (*self.gateway.policy()).clone()
    }

    fn allow(&self, rule: EgressRule, always: bool) -> Result<(), String> {
        let mut policy = self.current();
        if !policy.rules.contains(&rule) {
            policy.rules.push(rule.clone());
        }
        self.gateway
            .update_policy(policy)
            .map_err(|err| crate::gateway::error_chain(&err))?;
        if always {
            keep_approved_rule(&self.bottle, &rule)
                .map_err(|err| crate::gateway::error_chain(&err))?;
        }
        Ok(())
    }

    fn record(&self, draft: EventDraft) -> Result<(), String> {
        self.gateway.record(draft)
    }
}

/// Starts the bottle's supervise sidecar on `run/supervise.sock`, on the running gateway.
///
/// # Errors
/// The approval queue cannot be opened, or the socket cannot be bound.
pub async fn start(
    home_root: &std::path::Path,
    bottle: &BottleDir,
    gateway: EventRecorder,
) -> Result<SuperviseSidecar, RuntimeError> {
    let store = ApprovalStore::open(ApprovalStore::default_path(home_root)).map_err(|err| {
        RuntimeError::Sidecar {
            message: crate::gateway::error_chain(&err),
        }
    })?;
    // Left over from a session whose launcher died: nobody waits for them.
    let _ = store.deny_pending(bottle.slug(), "gateway-stopped");
    let socket: PathBuf = bottle.run_dir().join(SUPERVISE_SOCKET);
    SuperviseSidecar::start(
        SuperviseContext {
            slug: bottle.slug().to_owned(),
            store: Arc::new(store),
            control: Arc::new(GatewayControl {
                gateway,
                bottle: bottle.clone(),
            }),
            timeout: ASK_TIMEOUT,
        },
        &socket,
    )
    .await
    .map_err(|err| RuntimeError::Sidecar {
        message: crate::gateway::error_chain(&err),
    })
}
