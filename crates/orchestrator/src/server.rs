//! `bot-bottle orchestrate serve`: the webhook listener (axum) beside the watcher.

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bot_bottle_forge::WebhookHeaders;

use crate::service::Orchestrator;

/// The largest webhook body accepted. Gitea's payloads carry the issue body, which it
/// caps well below this.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// The router: `POST /webhook` (also `/`), `GET /healthz`.
pub fn router(orchestrator: Orchestrator) -> Router {
    Router::new()
        .route("/webhook", post(webhook))
        .route("/", post(webhook))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(orchestrator)
}

async fn webhook(
    State(orchestrator): State<Orchestrator>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let lookup = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let parsed = WebhookHeaders::from_lookup(lookup);
    let answer = orchestrator.handle_delivery(&parsed, &body).await;
    tracing::info!(status = answer.status, message = %answer.message, "webhook");
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, format!("{}\n", answer.message))
}

/// Serves webhooks on `listener` and watches running sessions, after reconciling the
/// store with the bottles. Returns when `shutdown` resolves.
///
/// # Errors
/// Reconciling or serving fails.
pub async fn serve(
    orchestrator: Orchestrator,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), crate::service::OrchestratorError> {
    for action in orchestrator.reconcile().await? {
        eprintln!("bot-bottle: orchestrate: {action}");
    }
    let watcher = {
        let orchestrator = orchestrator.clone();
        tokio::spawn(async move { orchestrator.watch().await })
    };
    let app = router(orchestrator);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    watcher.abort();
    served.map_err(|source| crate::service::OrchestratorError::Io {
        path: std::path::PathBuf::from("webhook listener"),
        source,
    })
}

/// Whether an address may be bound without `--allow-remote`.
#[must_use]
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}
