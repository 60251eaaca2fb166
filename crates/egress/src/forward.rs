//! Sending one allowed request upstream and streaming the response back.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::audit::AuditDecision;
use crate::body::Metered;
use crate::gateway::{
    Exchange, ProxyBody, Shared, Target, decide_request, error_response, request_draft,
    strip_hop_by_hop, upstream_failure,
};

pub(crate) struct Forward {
    pub shared: Arc<Shared>,
    pub target: Target,
    pub started: Instant,
}

impl Forward {
    /// An absolute-form `http://` request: decide, connect, forward in origin form.
    pub(crate) async fn run_plain(self, req: Request<Incoming>) -> Response<ProxyBody> {
        let Forward {
            shared,
            target,
            started,
        } = self;
        let policy = shared.policy();
        let rule = match decide_request(&shared, &policy, req.method(), &target, req.uri()) {
            Ok(rule) => rule,
            Err(blocked) => return *blocked,
        };
        let mut draft = request_draft(
            AuditDecision::Allow,
            "allowed-by-rule",
            req.method(),
            &target,
            req.uri().path(),
        );
        draft.rule = rule;
        let stream = match shared
            .resolver(&policy, &target.host)
            .connect(&target.host, target.port)
            .await
        {
            Ok(stream) => stream,
            Err(err) => return upstream_failure(&shared, &err, draft),
        };
        let (mut sender, connection) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(pair) => pair,
                Err(err) => {
                    draft.reason = "upstream-error".into();
                    draft.status = Some(502);
                    draft.detail = Some(err.to_string());
                    shared.record(draft);
                    return error_response(
                        StatusCode::BAD_GATEWAY,
                        "upstream-error",
                        &err.to_string(),
                    );
                }
            };
        tokio::spawn(connection);
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let host_value = if target.port == 80 {
            target.host.clone()
        } else {
            format!("{}:{}", target.host, target.port)
        };
        if let Ok(value) = HeaderValue::from_str(&host_value) {
            parts.headers.insert(header::HOST, value);
        }
        parts.uri = match parts.uri.path_and_query() {
            Some(pq) => pq
                .as_str()
                .parse()
                .unwrap_or_else(|_| hyper::Uri::from_static("/")),
            None => hyper::Uri::from_static("/"),
        };
        let body = Metered::counting(body, up.clone()).boxed_unsync();
        let upstream_request = Request::from_parts(parts, body);
        match sender.send_request(upstream_request).await {
            Ok(response) => Exchange {
                shared,
                draft,
                started,
                up,
                down,
            }
            .finish_with(response),
            Err(err) => {
                draft.reason = "upstream-error".into();
                draft.status = Some(502);
                draft.detail = Some(err.to_string());
                shared.record(draft);
                error_response(StatusCode::BAD_GATEWAY, "upstream-error", &err.to_string())
            }
        }
    }
}
