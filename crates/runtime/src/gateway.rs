//! The bottle's egress gateway, for the length of one session: started on
//! `state/<slug>/run/egress.sock` before the container, stopped after it.

use std::path::Path;

use bot_bottle_core::plan::BottlePlan;
use bot_bottle_core::policy::{DlpAction, DlpPolicy};
use bot_bottle_core::state::BottleDir;
use bot_bottle_egress::dlp::{Action, DlpRules};
use bot_bottle_egress::{
    CertificateAuthority, GatewayConfig, GatewayHandle, Listen, ResolvedCredential,
};

use crate::launch::{GatewaySettings, RuntimeError};

/// A running gateway and what the bottle needs from it.
pub struct SessionGateway {
    handle: GatewayHandle,
}

/// Everything the gateway needs, resolved, before anything listens: the bottle's
/// placeholders and CA are known here, so the container can be created while the gateway
/// starts.
pub struct PreparedGateway {
    config: GatewayConfig,
    socket: std::path::PathBuf,
    placeholder_env: Vec<(String, String)>,
    ca_pem: String,
    warnings: Vec<String>,
}

/// Resolves credentials (real values stay in this process; the bottle gets placeholders),
/// loads or creates the bottle's CA, and builds the gateway configuration.
pub fn prepare(
    plan: &BottlePlan,
    bottle: &BottleDir,
    socket: &Path,
    settings: &GatewaySettings,
    ca_dir: &Path,
) -> Result<PreparedGateway, RuntimeError> {
    let gateway_error = |message: String| RuntimeError::Gateway { message };
    let mut credentials = Vec::new();
    let mut placeholder_env = Vec::new();
    for spec in &plan.credentials {
        let resolved = ResolvedCredential::resolve(spec.clone(), bottle.slug())
            .map_err(|err| gateway_error(error_chain(&err)))?;
        if let Some(env) = &spec.env {
            placeholder_env.push((env.clone(), resolved.placeholder().to_owned()));
        }
        credentials.push(resolved);
    }
    placeholder_env.sort();
    // One CA per bottle, kept across freeze and resume (the bottle trusts its cert).
    let ca = CertificateAuthority::load_or_create(ca_dir, &format!("bot-bottle {}", bottle.slug()))
        .map_err(|err| gateway_error(error_chain(&err)))?;
    let ca_pem = ca.cert_pem().to_owned();
    let mut config = GatewayConfig::new(
        Listen::Unix(socket.to_owned()),
        plan.egress.clone(),
        bottle.egress_log(),
    );
    config.upstream_overrides = settings.upstream_overrides.clone();
    config.loopback_only = settings.loopback_only;
    config.ca = Some(std::sync::Arc::new(ca));
    config.credentials = credentials;
    let mut warnings = Vec::new();
    config.dlp_rules = dlp_rules(&plan.egress.dlp, &mut warnings)?;
    if let Some(path) = &settings.upstream_ca {
        let pem = std::fs::read(path).map_err(|source| RuntimeError::Io {
            path: path.clone(),
            source,
        })?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|err| gateway_error(format!("`{}`: {err}", path.display())))?;
            config.extra_upstream_roots.push(cert);
        }
    }
    Ok(PreparedGateway {
        config,
        socket: socket.to_owned(),
        placeholder_env,
        ca_pem,
        warnings,
    })
}

/// The DLP rules a bottle's policy asks for; `None` leaves the gateway its built-in set
/// (compiled on the gateway's own task).
fn dlp_rules(
    policy: &DlpPolicy,
    warnings: &mut Vec<String>,
) -> Result<Option<DlpRules>, RuntimeError> {
    if policy.is_default() {
        return Ok(None);
    }
    let invalid = |message: String| RuntimeError::Policy { message };
    let mut rules = match &policy.rules_file {
        Some(path) => {
            let text = fs_err::read_to_string(path).map_err(|source| RuntimeError::Io {
                path: path.clone(),
                source,
            })?;
            let (rules, skipped) = DlpRules::from_gitleaks_toml(&text).map_err(|err| {
                invalid(format!(
                    "DLP rules `{}`: {}",
                    path.display(),
                    error_chain(&err)
                ))
            })?;
            for rule in skipped {
                warnings.push(format!(
                    "DLP rule `{}` in `{}` is not used: {}",
                    rule.id,
                    path.display(),
                    rule.reason
                ));
            }
            rules
        }
        None => DlpRules::builtin(),
    };
    let action = |action: DlpAction| match action {
        DlpAction::Block => Action::Block,
        DlpAction::Log => Action::Log,
    };
    if let Some(default) = policy.default_action {
        rules = rules.with_default_action(action(default));
    }
    for (id, rule_action) in &policy.actions {
        rules.set_action(id, action(*rule_action)).map_err(|err| {
            invalid(format!(
                "{}\nhint: `egress.dlp.actions` names rules by their gitleaks id",
                error_chain(&err)
            ))
        })?;
    }
    Ok(Some(rules))
}

impl PreparedGateway {
    /// Environment variables that hold credential placeholders (never real values).
    #[must_use]
    pub fn placeholder_env(&self) -> &[(String, String)] {
        &self.placeholder_env
    }

    /// Things the user should know that do not stop the launch (unusable DLP rules).
    #[must_use]
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The CA certificate the bottle must trust.
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Starts listening on the bottle's socket.
    pub async fn serve(self) -> Result<SessionGateway, RuntimeError> {
        let socket = self.socket;
        let handle =
            bot_bottle_egress::start(self.config)
                .await
                .map_err(|err| RuntimeError::Gateway {
                    message: error_chain(&err),
                })?;
        // The bottle's user (another uid) connects through the bind mount; the state
        // directory above `run/` is private to this user, so nobody else reaches it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).map_err(
            |source| RuntimeError::Io {
                path: socket.clone(),
                source,
            },
        )?;
        Ok(SessionGateway { handle })
    }
}

pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl SessionGateway {
    /// Resolves, with the reason, when the gateway has failed; never while it serves.
    pub async fn failed(&self) -> String {
        self.handle.failed().await
    }

    /// What a host-side sidecar may do with the gateway (events, policy).
    pub fn event_recorder(&self) -> bot_bottle_egress::EventRecorder {
        self.handle.event_recorder()
    }

    /// Resolves with the first alert of the session (see `bot_bottle_egress::gateway`).
    pub async fn alerted(&self) -> String {
        self.handle.alerted().await
    }

    /// Where the tripwire's reports go: the same audit log, the same hash chain.
    pub fn attempt_recorder(&self) -> bot_bottle_egress::AttemptRecorder {
        self.handle.attempt_recorder()
    }

    pub async fn shutdown(self) {
        self.handle.shutdown().await;
    }
}
