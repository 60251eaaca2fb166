//! CONNECT: decided by host and port, then intercepted, or for a `passthrough` rule
//! tunnelled as is.

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::audit::{AuditDecision, EventDraft, EventKind};
use crate::gateway::{ProxyBody, Shared, block_response, full_body, upstream_failure};

fn connect_draft(decision: AuditDecision, reason: &str, host: &str, port: u16) -> EventDraft {
    let mut draft = EventDraft::new(EventKind::Connect, decision, reason);
    draft.method = Some("CONNECT".into());
    draft.host = Some(host.to_string());
    draft.port = Some(port);
    draft
}

pub(crate) async fn handle_connect(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let Some(authority) = req.uri().authority().cloned() else {
        let mut draft = EventDraft::new(
            EventKind::Connect,
            AuditDecision::Block,
            "bad-connect-target",
        );
        draft.method = Some("CONNECT".into());
        draft.status = Some(400);
        shared.record(draft);
        let mut response = block_response("bad-connect-target", "CONNECT needs host:port");
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(443);
    if let Some(refusal) = shared.audit_refusal() {
        return refusal;
    }
    let policy = shared.policy();
    let decision = policy.decide_connect(&host, port);
    if !decision.is_allow() {
        let reason = decision.reason.as_str();
        let mut draft = connect_draft(AuditDecision::Block, reason, &host, port);
        draft.rule = decision.rule;
        draft.status = Some(403);
        shared.record(draft);
        return block_response(reason, &format!("CONNECT {host}:{port} is not allowed"));
    }
    let mut draft = connect_draft(AuditDecision::Allow, decision.reason.as_str(), &host, port);
    draft.rule = decision.rule;
    let upstream = match shared.resolver(&policy, &host).connect(&host, port).await {
        Ok(stream) => stream,
        Err(err) => return upstream_failure(&shared, &err, draft),
    };
    let upgrade = hyper::upgrade::on(req);
    if !decision.passthrough {
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    crate::mitm::intercept(shared, upgraded, host, port, upstream).await
                }
                Err(err) => tracing::debug!(error = %err, "CONNECT upgrade failed"),
            }
        });
        return Response::new(full_body(""));
    }
    let mut shutdown = shared.shutdown_signal();
    tokio::spawn(async move {
        let tunnel = async {
            match upgrade.await {
                Ok(upgraded) => {
                    crate::body::splice(
                        TokioIo::new(upgraded),
                        upstream,
                        crate::forward::SPLICE_GRACE,
                    )
                    .await
                }
                Err(_) => (0, 0),
            }
        };
        let (up, down) = tokio::select! {
            counts = tunnel => counts,
            _ = shutdown.changed() => (0, 0),
        };
        draft.status = Some(200);
        draft.bytes_up = up;
        draft.bytes_down = down;
        draft.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        draft.detail = Some("passthrough: not intercepted".into());
        shared.record(draft);
    });
    Response::new(full_body(""))
}
