//! One request, from decision to response: policy, DLP over URL, headers and body,
//! credential injection, the upstream exchange, scrubbing and the audit event. The same
//! pipeline serves absolute-form `http://` requests and requests inside an intercepted
//! TLS tunnel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::audit::{AuditDecision, DlpRecord};
use crate::body::{Metered, Prefixed};
use crate::custody::{ResolvedCredential, Scrubbed, scrub_header_map, scrub_reason};
use crate::dlp::{Action, Finding, FindingKind, Location, ScanOutcome};
use crate::gateway::{
    OverCap, ProxyBody, Shared, Target, block_response, decide_request, error_response, full_body,
    request_draft, strip_hop_by_hop, upstream_failure,
};
use crate::mitm::TunnelUpstream;

/// After one side of a spliced connection closes, how long the other may keep sending.
pub(crate) const SPLICE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Where the request goes once it is allowed.
pub(crate) enum Route<'a> {
    /// Plain HTTP: a fresh upstream connection. Credentials are never injected here,
    /// since the real value would cross the network in clear text.
    Plain,
    /// The upstream TLS connection of an intercepted tunnel.
    Tunnel(&'a TunnelUpstream),
}

enum Collected<B> {
    Whole(Bytes, OwnedSemaphorePermit),
    Over(Bytes, B, OwnedSemaphorePermit),
    /// The gateway's body memory budget ran out (how many bytes were buffered then).
    OverBudget(usize),
}

/// Buffers a body (a request's, or a compressed response that must be decoded to be
/// scrubbed) up to the scan cap, taking a share of the gateway's body memory budget for
/// every byte it holds. It never waits for memory: a body that does not fit now is
/// refused, so a bottle cannot park the gateway on its own bodies.
async fn collect_capped<B>(
    mut body: B,
    cap: usize,
    budget: &Arc<Semaphore>,
) -> Result<Collected<B>, String>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = BytesMut::new();
    let mut held = Arc::clone(budget)
        .try_acquire_many_owned(0)
        .map_err(|_| "the body memory budget is closed".to_owned())?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        // Request trailers are dropped: nothing the gateway forwards relies on them, and
        // they would be one more unscanned channel.
        if let Ok(data) = frame.into_data() {
            let more = u32::try_from(data.len())
                .ok()
                .and_then(|n| Arc::clone(budget).try_acquire_many_owned(n).ok());
            match more {
                Some(permit) => held.merge(permit),
                None => return Ok(Collected::OverBudget(buf.len() + data.len())),
            }
            buf.extend_from_slice(&data);
            if buf.len() > cap {
                return Ok(Collected::Over(buf.freeze(), body, held));
            }
        }
    }
    Ok(Collected::Whole(buf.freeze(), held))
}

/// Every value of a header, joined with `,` as RFC 9110 says lists may be; a value that is
/// not text stays in (lossily), so it cannot pass as empty.
fn joined(headers: &hyper::HeaderMap, name: header::HeaderName) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// Decodes and scans a request body on the blocking pool, so a slow scan never stalls the
/// async workers (and the other connections on them). At most `scan_slots` run at once.
async fn scan_off_workers(
    shared: &Arc<Shared>,
    body: Bytes,
    encoding: Option<String>,
    content_types: Vec<String>,
    host: String,
    prefix_only: bool,
) -> ScanOutcome {
    let slot = Arc::clone(&shared.scan_slots).acquire_owned().await;
    let shared = Arc::clone(shared);
    let scan = tokio::task::spawn_blocking(move || {
        // Held until the scan ends, even when the request is dropped meanwhile.
        let _slot = slot;
        #[cfg(test)]
        tests::scan_gate(&host);
        let types: Vec<&str> = content_types.iter().map(String::as_str).collect();
        shared.scanner.scan_request_body(
            &body,
            encoding.as_deref(),
            &types,
            Some(&host),
            prefix_only,
        )
    });
    match scan.await {
        Ok(outcome) => outcome,
        Err(error) => ScanOutcome::Undecodable {
            reason: format!("the body scan failed: {error}"),
        },
    }
}

fn is_websocket(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

fn record_of(finding: &Finding, location: Option<&str>) -> DlpRecord {
    DlpRecord {
        rule: finding.rule_id.clone(),
        action: finding.action.to_string(),
        location: match (location, &finding.location) {
            (Some(l), _) => l.to_string(),
            (None, Location::Body) => "body".into(),
            (None, Location::Header(name)) => format!("header:{name}"),
        },
        excerpt: finding.excerpt.clone(),
        credential: match &finding.kind {
            FindingKind::Rule => None,
            FindingKind::CustodySecret { credential, .. }
            | FindingKind::Placeholder { credential, .. } => Some(credential.clone()),
        },
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

pub(crate) async fn process(
    shared: Arc<Shared>,
    target: Target,
    mut req: Request<Incoming>,
    route: Route<'_>,
    started: Instant,
) -> Response<ProxyBody> {
    let policy = shared.policy();
    let rule = match decide_request(
        &shared,
        &policy,
        req.method(),
        &target,
        req.uri(),
        req.headers(),
    ) {
        Ok(rule) => rule,
        Err(blocked) => return *blocked,
    };
    let websocket = is_websocket(req.headers()) && req.version() == Version::HTTP_11;
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let mut query = parts.uri.query().map(str::to_owned);
    let mut draft = request_draft(
        AuditDecision::Allow,
        "allowed-by-rule",
        &parts.method,
        &target,
        &path,
    );
    draft.rule = rule;

    let scanner = &shared.scanner;
    let mut findings: Vec<DlpRecord> = Vec::new();
    let mut blocking: Vec<Finding> = Vec::new();
    let mut note = |found: Vec<Finding>, location: Option<&str>| {
        for finding in found {
            findings.push(record_of(&finding, location));
            if finding.action == Action::Block {
                blocking.push(finding);
            }
        }
    };
    let url = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_string());
    note(
        scanner.scan_for_host(url.as_bytes(), &target.host),
        Some("url"),
    );
    note(
        scanner.scan_headers(&parts.headers, Some(&target.host)),
        None,
    );

    // A push held to a git rule's `push_refs` keeps the body's start for `gitpush::check`.
    let push_scopes = crate::gitpush::scope(
        &policy,
        &parts.method,
        &target.host,
        target.port,
        &parts.uri,
        &parts.headers,
    );
    let mut git_head: Option<Bytes> = None;

    let cap = scanner.max_decoded();
    let up = Arc::new(AtomicU64::new(0));
    let mut body_problem: Option<(&'static str, String)> = None;
    let body: ProxyBody = if body.is_end_stream() {
        full_body(Bytes::new())
    } else {
        // Every `Content-Encoding` line counts: the origin undoes them all.
        let encoding = joined(&parts.headers, header::CONTENT_ENCODING);
        let content_types: Vec<String> = parts
            .headers
            .get_all(header::CONTENT_TYPE)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        match tokio::time::timeout(
            shared.limits.body_read_timeout,
            collect_capped(body, cap, &shared.body_memory),
        )
        .await
        {
            Err(_) => {
                draft.decision = AuditDecision::Block;
                draft.reason = "request-body-timeout".into();
                draft.status = Some(408);
                shared.record(draft);
                let mut response = block_response(
                    "request-body-timeout",
                    "the request body did not arrive in time",
                );
                *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
                return response;
            }
            Ok(Err(err)) => {
                draft.reason = "client-body-error".into();
                draft.status = Some(400);
                draft.detail = Some(err);
                shared.record(draft);
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "client-body-error",
                    "the request body could not be read",
                );
            }
            Ok(Ok(Collected::OverBudget(buffered))) => {
                let detail = format!(
                    "request bodies buffered by this bottle's gateway reached the {}-byte memory budget ({buffered} bytes of this one)",
                    shared.limits.body_memory_budget
                );
                draft.decision = AuditDecision::Block;
                draft.reason = "body-memory-budget".into();
                draft.status = Some(503);
                draft.detail = Some(detail.clone());
                draft.duration_ms = elapsed_ms(started);
                shared.record(draft);
                let mut response = block_response("body-memory-budget", &detail);
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return response;
            }
            Ok(Ok(Collected::Whole(bytes, memory))) => {
                if !push_scopes.is_empty() {
                    git_head = Some(bytes.clone());
                }
                match scan_off_workers(
                    &shared,
                    bytes.clone(),
                    encoding,
                    content_types,
                    target.host.clone(),
                    false,
                )
                .await
                {
                    ScanOutcome::Scanned(found) => note(found, None),
                    ScanOutcome::TooLarge { findings, .. } => {
                        note(findings, None);
                        if shared.over_cap == OverCap::Block {
                            body_problem = Some((
                                "dlp-body-too-large",
                                format!(
                                    "decoded body (or its decoded views) is over the {cap}-byte scan cap"
                                ),
                            ));
                        } else {
                            draft.detail = Some(format!(
                                "decoded body (or its decoded views) over the {cap}-byte scan cap: only its start was scanned"
                            ));
                        }
                    }
                    ScanOutcome::Undecodable { reason } => {
                        body_problem = Some(("dlp-undecodable-body", reason));
                    }
                }
                up.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                // The budget share goes back once the body has been handed on (or dropped).
                let counted = Arc::new(AtomicU64::new(0));
                Metered::new(full_body(bytes), counted, move || drop(memory)).boxed_unsync()
            }
            Ok(Ok(Collected::Over(prefix, rest, memory))) => {
                if !push_scopes.is_empty() {
                    git_head = Some(prefix.clone());
                }
                if shared.over_cap == OverCap::Block {
                    body_problem = Some((
                        "dlp-body-too-large",
                        format!("body is over the {cap}-byte scan cap"),
                    ));
                } else {
                    draft.detail = Some(format!(
                        "body over the {cap}-byte scan cap: only its start was scanned, the rest passed unscanned"
                    ));
                    match scan_off_workers(
                        &shared,
                        prefix.clone(),
                        encoding,
                        content_types,
                        target.host.clone(),
                        true,
                    )
                    .await
                    {
                        ScanOutcome::Scanned(found)
                        | ScanOutcome::TooLarge {
                            findings: found, ..
                        } => note(found, None),
                        // A start that does not decode would let the whole body out unread.
                        ScanOutcome::Undecodable { reason } => {
                            body_problem = Some(("dlp-undecodable-body", reason));
                        }
                    }
                }
                // The meter counts the prefix too, as it is sent; the budget share goes
                // back when the body ends or is dropped.
                Metered::new(
                    Metered::counting(Prefixed::new(prefix, rest), up.clone()),
                    Arc::new(AtomicU64::new(0)),
                    move || drop(memory),
                )
                .boxed_unsync()
            }
        }
    };
    draft.dlp = findings;

    let exfiltration = blocking.iter().any(|f| {
        matches!(
            f.kind,
            FindingKind::Placeholder { .. } | FindingKind::CustodySecret { .. }
        )
    });
    let refusal = if exfiltration {
        Some((
            "exfiltration-attempt",
            "a credential (or its placeholder) was on its way to a host it is not for".to_string(),
        ))
    } else if !blocking.is_empty() {
        // Each rule once: a body of a million keys is one rule id, not a million.
        let mut ids: Vec<&str> = blocking.iter().map(|f| f.rule_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        Some((
            "dlp-blocked",
            format!("secret detected: {}", ids.join(", ")),
        ))
    } else {
        body_problem
    };
    if let Some((reason, detail)) = refusal {
        draft.decision = AuditDecision::Block;
        draft.reason = reason.into();
        draft.status = Some(403);
        draft.detail = Some(detail.clone());
        draft.duration_ms = elapsed_ms(started);
        shared.record(draft);
        return block_response(reason, &detail);
    }

    // Git push scope: every ref-update command must fit the rule's `push_refs`, or the
    // whole push is refused before a byte of it goes upstream.
    let encodings: Vec<&[u8]> = parts
        .headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    for globs in &push_scopes {
        match crate::gitpush::check(globs, git_head.as_deref().unwrap_or_default(), &encodings) {
            Ok(refs) => {
                draft.detail.get_or_insert(refs);
            }
            Err(refusal) => {
                draft.decision = AuditDecision::Block;
                draft.reason = refusal.reason.into();
                draft.status = Some(403);
                draft.detail = Some(refusal.detail.clone());
                draft.duration_ms = elapsed_ms(started);
                shared.record(draft);
                return block_response(refusal.reason, &refusal.detail);
            }
        }
    }
    drop(git_head);

    let injected: Vec<&ResolvedCredential> = match route {
        Route::Plain => Vec::new(),
        Route::Tunnel(_) => shared
            .credentials
            .iter()
            .filter(|c| c.spec.is_for_host(&target.host))
            .collect(),
    };
    let mut leftovers: Vec<String> = Vec::new();
    for credential in &injected {
        for place in credential.inject(&mut parts.headers, &mut query) {
            leftovers.push(format!("{place} ({})", credential.spec.name));
        }
    }
    if !leftovers.is_empty() {
        draft.detail = Some(format!(
            "placeholder left as is outside the credential's inject slot: {}",
            leftovers.join(", ")
        ));
    }
    if !injected.is_empty() {
        let names: Vec<&str> = injected.iter().map(|c| c.spec.name.as_str()).collect();
        draft.credential = Some(names.join(","));
        // An uncompressed response is one the scrubber can read, so a host that echoes
        // the real credential cannot slip it back into the bottle inside gzip.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }

    strip_hop_by_hop(&mut parts.headers);
    if websocket {
        // No compression extension: every message must stay readable to the scanner.
        parts.headers.remove("sec-websocket-extensions");
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    let default_port = match route {
        Route::Plain => 80,
        Route::Tunnel(_) => 443,
    };
    let authority = if target.port == default_port {
        target.host.clone()
    } else if target.host.contains(':') {
        format!("[{}]:{}", target.host, target.port)
    } else {
        format!("{}:{}", target.host, target.port)
    };
    let path_and_query = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    parts.version = Version::HTTP_11;
    let mut upstream_request = Request::from_parts(parts, body);

    let sent = match route {
        Route::Plain => {
            send_plain(
                &shared,
                &policy,
                &target,
                upstream_request,
                &authority,
                &path_and_query,
            )
            .await
        }
        Route::Tunnel(tunnel) => {
            // Origin form here; an HTTP/2 upstream gets the absolute form from `send`.
            *upstream_request.uri_mut() = path_and_query
                .parse()
                .unwrap_or_else(|_| hyper::Uri::from_static("/"));
            if let Ok(value) = HeaderValue::from_str(&authority) {
                upstream_request.headers_mut().insert(header::HOST, value);
            }
            tunnel
                .send(upstream_request)
                .await
                .map_err(SendError::Upstream)
        }
    };
    let mut response = match sent {
        Ok(response) => response,
        Err(SendError::Connect(err)) => return upstream_failure(&shared, &err, draft),
        Err(SendError::Upstream(message)) => {
            draft.reason = "upstream-error".into();
            draft.status = Some(502);
            draft.detail = Some(message.clone());
            draft.duration_ms = elapsed_ms(started);
            shared.record(draft);
            return error_response(StatusCode::BAD_GATEWAY, "upstream-error", &message);
        }
    };

    let upstream_upgrade = (response.status() == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| hyper::upgrade::on(&mut response));
    let (mut parts, body) = response.into_parts();
    draft.status = Some(parts.status.as_u16());
    let scrub: Vec<(Vec<u8>, Vec<u8>)> = injected.iter().flat_map(|c| c.scrub_pairs()).collect();
    if !scrub.is_empty() {
        // Every route back into the bottle: headers (a 101's included) and a custom
        // HTTP/1 reason phrase; the body and its trailers below.
        scrub_header_map(&mut parts.headers, &scrub);
        if let Some(phrase) = parts.extensions.remove::<hyper::ext::ReasonPhrase>()
            && let Some(scrubbed) = scrub_reason(&phrase, &scrub)
        {
            parts.extensions.insert(scrubbed);
        }
    }
    if let (Some(client_upgrade), Some(upstream_upgrade)) = (client_upgrade, upstream_upgrade) {
        let shared_ws = shared.clone();
        let mut shutdown = shared.shutdown_signal();
        let host = target.host.clone();
        tokio::spawn(async move {
            let relayed = async {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => Some(
                        crate::websocket::relay(
                            TokioIo::new(client),
                            TokioIo::new(upstream),
                            crate::websocket::MessageScan {
                                scanner: &shared_ws.scanner,
                                slots: &shared_ws.scan_slots,
                                over_cap: shared_ws.over_cap,
                            },
                            &host,
                            scrub,
                            SPLICE_GRACE,
                        )
                        .await,
                    ),
                    Err(_) => None,
                }
            };
            let outcome = tokio::select! {
                outcome = relayed => outcome.unwrap_or_default(),
                _ = shutdown.changed() => crate::websocket::Outcome::default(),
            };
            draft.bytes_up = outcome.bytes_up;
            draft.bytes_down = outcome.bytes_down;
            draft.duration_ms = elapsed_ms(started);
            draft.dlp = outcome
                .findings
                .iter()
                .map(|f| record_of(f, Some("websocket")))
                .collect();
            let mut detail = format!("websocket: {} outbound messages scanned", outcome.scanned);
            if outcome.scrubbed {
                detail.push_str("; server frames scrubbed of the injected credential");
            }
            if let Some(note) = &outcome.unscanned {
                detail.push_str("; ");
                detail.push_str(note);
            }
            if let Some((reason, why)) = outcome.refusal {
                draft.decision = AuditDecision::Block;
                draft.reason = reason.into();
                detail = format!("{why}; connection closed after {detail}");
            }
            draft.detail = Some(detail);
            shared_ws.record(draft);
        });
        return Response::from_parts(parts, full_body(Bytes::new()));
    }

    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        // Only websocket upgrades are forwarded; any other switch would leave the client
        // speaking a protocol the gateway is not inspecting.
        draft.decision = AuditDecision::Block;
        draft.reason = "unexpected-upgrade".into();
        draft.status = Some(502);
        shared.record(draft);
        return error_response(
            StatusCode::BAD_GATEWAY,
            "unexpected-upgrade",
            "the upstream switched protocols without a websocket request",
        );
    }
    strip_hop_by_hop(&mut parts.headers);
    let mut response_body: ProxyBody = body.map_err(crate::gateway::BoxError::from).boxed_unsync();
    if !injected.is_empty() {
        // Every line counts: `identity` on one must not hide `gzip` on the next.
        // (A coding that cannot be undone goes to the decoder, which refuses it.)
        let encoding = joined(&parts.headers, header::CONTENT_ENCODING).filter(|value| {
            crate::dlp::decode::codings(Some(value)).map_or(true, |codings| !codings.is_empty())
        });
        if let Some(encoding) = encoding {
            // The gateway asked for `identity`; an origin that compresses anyway is
            // decoded here so the scrubber can read what the bottle would.
            match decode_response(&shared, response_body, encoding).await {
                Ok(decoded) => {
                    parts.headers.remove(header::CONTENT_ENCODING);
                    parts.headers.remove(header::CONTENT_LENGTH);
                    response_body = decoded;
                }
                Err(why) => {
                    draft.decision = AuditDecision::Block;
                    draft.reason = "undecodable-response".into();
                    draft.status = Some(502);
                    draft.detail = Some(why.clone());
                    draft.duration_ms = elapsed_ms(started);
                    shared.record(draft);
                    return error_response(StatusCode::BAD_GATEWAY, "undecodable-response", &why);
                }
            }
        }
        let lengths_differ = injected
            .iter()
            .any(|c| c.placeholder().len() != c.secret().len());
        if lengths_differ {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        response_body = Scrubbed::new(response_body, scrub).boxed_unsync();
    }
    let down = Arc::new(AtomicU64::new(0));
    let down_read = down.clone();
    let metered = Metered::new(response_body, down, move || {
        draft.bytes_up = up.load(Ordering::Relaxed);
        draft.bytes_down = down_read.load(Ordering::Relaxed);
        draft.duration_ms = elapsed_ms(started);
        shared.record(draft);
    });
    Response::from_parts(parts, metered.boxed_unsync())
}

enum SendError {
    Connect(crate::upstream::UpstreamError),
    Upstream(String),
}

async fn send_plain(
    shared: &Shared,
    policy: &bot_bottle_core::policy::EgressPolicy,
    target: &Target,
    mut request: Request<ProxyBody>,
    authority: &str,
    path_and_query: &str,
) -> Result<Response<Incoming>, SendError> {
    let stream = shared
        .resolver(policy, &target.host)
        .connect(&target.host, target.port)
        .await
        .map_err(SendError::Connect)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Upstream(e.to_string()))?;
    tokio::spawn(connection.with_upgrades());
    *request.uri_mut() = path_and_query
        .parse()
        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
    if let Ok(value) = HeaderValue::from_str(authority) {
        request.headers_mut().insert(header::HOST, value);
    }
    sender
        .send_request(request)
        .await
        .map_err(|e| SendError::Upstream(e.to_string()))
}

/// Reads a compressed response whole (at most the scan cap, within the body timeout, its
/// bytes counted in the body memory budget until the decoded body has been sent) and
/// undoes its codings off the async workers. Anything that cannot be read back in full is
/// an error: a body the scrubber cannot read does not reach the bottle.
async fn decode_response(
    shared: &Arc<Shared>,
    body: ProxyBody,
    encoding: String,
) -> Result<ProxyBody, String> {
    let cap = shared.scanner.max_decoded();
    let collected = tokio::time::timeout(
        shared.limits.body_read_timeout,
        collect_capped(body, cap, &shared.body_memory),
    )
    .await
    .map_err(|_| "the compressed response did not arrive in time to be scrubbed".to_string())?
    .map_err(|e| format!("the upstream body failed: {e}"))?;
    let (raw, memory) = match collected {
        Collected::Whole(raw, memory) => (raw, memory),
        Collected::Over(..) => {
            return Err(format!(
                "a `{encoding}` response toward a credential's host is over the {cap}-byte cap, so it cannot be scrubbed"
            ));
        }
        Collected::OverBudget(_) => {
            return Err(format!(
                "the gateway's {}-byte body memory budget is in use, so a `{encoding}` response cannot be held to be scrubbed",
                shared.limits.body_memory_budget
            ));
        }
    };
    let slot = Arc::clone(&shared.scan_slots).acquire_owned().await;
    let decoded = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        match crate::dlp::decode::decode_with(&raw, Some(&encoding), cap, false) {
            crate::dlp::decode::Decoded::Complete(bytes) => Ok(Bytes::from(bytes.into_owned())),
            crate::dlp::decode::Decoded::Truncated(_) => Err(format!(
                "the `{encoding}` response decodes to more than the {cap}-byte cap, so it cannot be scrubbed"
            )),
            crate::dlp::decode::Decoded::Failed(reason) => Err(format!(
                "the response toward a credential's host cannot be decoded: {reason}"
            )),
        }
    })
    .await
    .map_err(|e| format!("decoding failed: {e}"))??;
    Ok(
        Metered::new(full_body(decoded), Arc::new(AtomicU64::new(0)), move || {
            drop(memory)
        })
        .boxed_unsync(),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::convert::Infallible;
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;

    use crate::gateway::{GatewayConfig, Listen};

    /// Bodies bound for this host wait in their scan until the test lets them go.
    const GATED_HOST: &str = "gated-scan.test";

    #[derive(Default)]
    struct Gate {
        host: String,
        entered: bool,
        released: bool,
        timed_out: bool,
    }

    /// Gates armed by tests, by host (tests run in parallel, each with its own host).
    static GATES: Mutex<Vec<Gate>> = Mutex::new(Vec::new());
    static WAKE: Condvar = Condvar::new();

    /// Called where a scan runs. A scan for an armed host waits there until the test
    /// releases it; on an async worker of a one-thread runtime that would hold up
    /// everything else for the full 10 s, and the gate says so.
    pub(crate) fn scan_gate(host: &str) {
        let mut gates = GATES.lock().expect("gates");
        let Some(gate) = gates.iter_mut().find(|gate| gate.host == host) else {
            return;
        };
        gate.entered = true;
        let (mut gates, waited) = WAKE
            .wait_timeout_while(gates, Duration::from_secs(10), |gates| {
                gates.iter().any(|gate| gate.host == host && !gate.released)
            })
            .expect("gates");
        if let Some(gate) = gates.iter_mut().find(|gate| gate.host == host) {
            gate.timed_out = waited.timed_out();
        }
    }

    pub(crate) fn arm_gate(host: &str) {
        GATES.lock().expect("gates").push(Gate {
            host: host.to_owned(),
            ..Gate::default()
        });
    }

    /// Whether a scan for `host` has reached the gate, and whether it gave up waiting.
    pub(crate) fn gate_state(host: &str) -> (bool, bool) {
        GATES
            .lock()
            .expect("gates")
            .iter()
            .find(|gate| gate.host == host)
            .map_or((false, false), |gate| (gate.entered, gate.timed_out))
    }

    pub(crate) fn release_gate(host: &str) {
        for gate in GATES.lock().expect("gates").iter_mut() {
            if gate.host == host {
                gate.released = true;
            }
        }
        WAKE.notify_all();
    }

    /// Waits (without blocking the runtime) until a scan for `host` reaches its gate.
    pub(crate) async fn wait_for_gate(host: &str) {
        for _ in 0..1000 {
            if gate_state(host).0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no scan for {host} reached its gate");
    }

    async fn origin() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("ok"))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    async fn curl(proxy: &str, args: &[&str]) -> String {
        let output = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "30", "--noproxy", "", "-x", proxy])
            .args(["-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .output()
            .await
            .expect("curl runs");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `#[tokio::test]` runs on one thread: the gateway, the origin and this test share it.
    #[tokio::test]
    async fn a_body_scan_does_not_stall_the_other_connections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let origin = origin().await;
        let policy = serde_saphyr::from_str(&format!(
            "rules:\n  - host: {GATED_HOST}\n  - host: fast.test\n"
        ))
        .expect("policy");
        let mut config = GatewayConfig::new(
            Listen::Tcp("127.0.0.1:0".parse().expect("addr")),
            policy,
            dir.path().join("egress.jsonl"),
        );
        config.loopback_only = true;
        config.upstream_overrides = [
            (GATED_HOST.to_owned(), origin),
            ("fast.test".to_owned(), origin),
        ]
        .into_iter()
        .collect();
        let gateway = crate::start(config).await.expect("gateway starts");
        let proxy = format!("http://{}", gateway.tcp_addr().expect("tcp"));

        arm_gate(GATED_HOST);
        let slow = tokio::spawn({
            let proxy = proxy.clone();
            async move { curl(&proxy, &["-d", "slow=1", &format!("http://{GATED_HOST}/")]).await }
        });
        wait_for_gate(GATED_HOST).await;
        // While that scan is held, a request with a body of its own goes through.
        let fast = curl(&proxy, &["-d", "fast=1", "http://fast.test/"]).await;
        assert!(
            !gate_state(GATED_HOST).1,
            "the scan held the runtime's only thread"
        );
        release_gate(GATED_HOST);
        assert_eq!(fast, "200");
        assert_eq!(slow.await.expect("slow request"), "200");
        assert!(!gate_state(GATED_HOST).1);
        gateway.shutdown().await;
    }
}
