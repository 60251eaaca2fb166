//! The bottle's egress gateway, for the length of one session: started on
//! `state/<slug>/run/egress.sock` before the container, stopped after it.

use std::path::Path;

use bot_bottle_core::plan::BottlePlan;
use bot_bottle_core::state::BottleDir;
use bot_bottle_egress::{
    CertificateAuthority, GatewayConfig, GatewayHandle, Listen, ResolvedCredential,
};

use crate::launch::{GatewaySettings, RuntimeError};

/// A running gateway and what the bottle needs from it.
pub struct SessionGateway {
    handle: GatewayHandle,
    placeholder_env: Vec<(String, String)>,
    ca_pem: Option<String>,
}

/// Starts the gateway of one bottle session.
pub async fn start(
    plan: &BottlePlan,
    bottle: &BottleDir,
    socket: &Path,
    settings: &GatewaySettings,
    ca_dir: &Path,
) -> Result<SessionGateway, RuntimeError> {
    let gateway_error = |message: String| RuntimeError::Gateway { message };
    // Real values are read here, in the host process, and never leave it except toward
    // their own hosts; the bottle gets placeholders.
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
    let mut config = GatewayConfig::new(
        Listen::Unix(socket.to_owned()),
        plan.egress.clone(),
        bottle.egress_log(),
    );
    config.upstream_overrides = settings.upstream_overrides.clone();
    config.loopback_only = settings.loopback_only;
    config.ca = Some(std::sync::Arc::new(ca));
    config.credentials = credentials;
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
    let handle = bot_bottle_egress::start(config)
        .await
        .map_err(|err| RuntimeError::Gateway {
            message: error_chain(&err),
        })?;
    // The bottle's user (another uid) connects through the bind mount; the state
    // directory above `run/` is private to this user, so nobody else reaches it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).map_err(|source| {
        RuntimeError::Io {
            path: socket.to_owned(),
            source,
        }
    })?;
    let ca_pem = handle.ca_cert_pem().to_owned();
    Ok(SessionGateway {
        handle,
        placeholder_env,
        ca_pem: Some(ca_pem),
    })
}

fn error_chain(err: &dyn std::error::Error) -> String {
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
    /// Environment variables that hold credential placeholders (never real values).
    #[must_use]
    pub fn placeholder_env(&self) -> Vec<(String, String)> {
        self.placeholder_env.clone()
    }

    /// The gateway CA certificate the bottle must trust, when it intercepts TLS.
    #[must_use]
    pub fn ca_pem(&self) -> Option<String> {
        self.ca_pem.clone()
    }

    /// Resolves, with the reason, when the gateway has failed; never while it serves.
    pub async fn failed(&self) -> String {
        self.handle.failed().await
    }

    pub async fn shutdown(self) {
        self.handle.shutdown().await;
    }
}
