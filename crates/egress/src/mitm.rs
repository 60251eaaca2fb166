//! Interception of an allowed CONNECT: read the ClientHello, refuse anything that is not
//! TLS for the CONNECT host, open TLS to the real upstream first (so the protocol the
//! client gets is the one the upstream chose), then present a leaf from the bottle's CA
//! and serve HTTP/1.1 or HTTP/2 over it, each request going through the full pipeline.
//!
//! Nothing here ever falls back to an opaque tunnel: a client that does not speak TLS, or
//! names another host in its SNI, is cut off and audited.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::header::{self, HeaderValue};
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use crate::audit::{AuditDecision, EventDraft, EventKind};
use crate::forward::{Route, process};
use crate::gateway::{
    ProxyBody, Shared, Target, block_response, error_response, host_header_matches, request_draft,
};
use crate::tls::{ALPN_H2, ALPN_HTTP11};

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

/// The upstream side of one intercepted tunnel: one TLS connection, reopened if the
/// upstream closes it while the client keeps the tunnel.
pub(crate) struct TunnelUpstream {
    shared: Arc<Shared>,
    host: String,
    port: u16,
    client_alpn: Vec<Vec<u8>>,
    slot: tokio::sync::Mutex<Option<Sender>>,
}

async fn handshake_sender(shared: &Shared, stream: TlsStream<TcpStream>) -> Result<Sender, String> {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
    let io = TokioIo::new(stream);
    let mut shutdown = shared.shutdown_signal();
    if h2 {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(shared.timer.clone())
            .handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = shutdown.changed() => {}
            }
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, connection) = http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = connection.with_upgrades() => {}
                _ = shutdown.changed() => {}
            }
        });
        Ok(Sender::H1(sender))
    }
}

async fn upstream_tls(
    shared: &Shared,
    host: &str,
    tcp: TcpStream,
    client_alpn: &[Vec<u8>],
) -> Result<TlsStream<TcpStream>, String> {
    let config = shared.upstream_tls.for_client_offer(client_alpn);
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    match tokio::time::timeout(
        shared.limits.handshake_timeout,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(err)) => Err(format!("TLS to `{host}` failed: {err}")),
        Err(_) => Err(format!("TLS to `{host}` timed out")),
    }
}

impl TunnelUpstream {
    /// Sends `request`, which carries an origin-form URI and the `Host` to use.
    pub(crate) async fn send(
        &self,
        mut request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, String> {
        let mut slot = self.slot.lock().await;
        // An upstream may close an idle keep-alive connection at any moment; a request
        // that hyper hands back unsent is retried once on a fresh connection.
        for attempt in 0..2 {
            if slot.as_ref().is_none_or(Sender::is_closed) {
                *slot = Some(self.reconnect().await?);
            }
            match slot.as_mut() {
                Some(Sender::H2(sender)) => {
                    let mut sender = sender.clone();
                    drop(slot);
                    // HTTP/2 carries the authority in the URI; a Host header would be a
                    // second, possibly different, copy.
                    let authority = request
                        .headers_mut()
                        .remove(header::HOST)
                        .and_then(|host| host.to_str().ok().map(str::to_owned))
                        .unwrap_or_else(|| self.host.clone());
                    let path_and_query =
                        request.uri().path_and_query().map_or("/", |pq| pq.as_str());
                    *request.uri_mut() = format!("https://{authority}{path_and_query}")
                        .parse()
                        .unwrap_or_else(|_| hyper::Uri::from_static("/"));
                    *request.version_mut() = Version::HTTP_2;
                    return sender
                        .send_request(request)
                        .await
                        .map_err(|e| e.to_string());
                }
                Some(Sender::H1(sender)) => {
                    if sender.ready().await.is_err() {
                        *slot = None;
                        continue;
                    }
                    // Held until the response head arrives: HTTP/1.1 is one exchange at a
                    // time.
                    match sender.try_send_request(request).await {
                        Ok(response) => return Ok(response),
                        Err(mut err) => match err.take_message() {
                            Some(unsent) if attempt == 0 => {
                                request = unsent;
                                *slot = None;
                            }
                            _ => return Err(err.into_error().to_string()),
                        },
                    }
                }
                None => return Err("no upstream connection".into()),
            }
        }
        Err("the upstream closed the connection twice".into())
    }

    async fn reconnect(&self) -> Result<Sender, String> {
        let policy = self.shared.policy();
        let tcp = self
            .shared
            .resolver(&policy, &self.host)
            .connect(&self.host, self.port)
            .await
            .map_err(|e| e.detail())?;
        let stream = upstream_tls(&self.shared, &self.host, tcp, &self.client_alpn).await?;
        handshake_sender(&self.shared, stream).await
    }
}

fn connect_event(reason: &str, host: &str, port: u16, detail: String) -> EventDraft {
    let mut draft = EventDraft::new(EventKind::Connect, AuditDecision::Block, reason);
    draft.method = Some("CONNECT".into());
    draft.host = Some(host.to_string());
    draft.port = Some(port);
    draft.detail = Some(detail);
    draft
}

/// Runs an allowed, non-passthrough tunnel to its end.
pub(crate) async fn intercept(
    shared: Arc<Shared>,
    upgraded: Upgraded,
    host: String,
    port: u16,
    tcp: TcpStream,
) {
    let acceptor =
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), TokioIo::new(upgraded));
    let start = match tokio::time::timeout(shared.limits.handshake_timeout, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(err)) => {
            shared.record(connect_event(
                "opaque-tunnel-refused",
                &host,
                port,
                format!("the tunnel did not start with a TLS ClientHello ({err}); only `passthrough` rules allow uninspected tunnels"),
            ));
            return;
        }
        Err(_) => {
            shared.record(connect_event(
                "tls-handshake-timeout",
                &host,
                port,
                "no ClientHello in time".into(),
            ));
            return;
        }
    };
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    let client_alpn: Vec<Vec<u8>> = hello
        .alpn()
        .map(|protocols| protocols.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    let sni_ok = match &sni {
        Some(name) => name.trim_end_matches('.').eq_ignore_ascii_case(&host),
        None => host.parse::<IpAddr>().is_ok(),
    };
    if !sni_ok {
        shared.record(connect_event(
            "sni-mismatch",
            &host,
            port,
            format!(
                "TLS server name {:?} differs from the CONNECT host (domain fronting)",
                sni.as_deref().unwrap_or("<none>")
            ),
        ));
        return;
    }

    let (sender, failure) = match upstream_tls(&shared, &host, tcp, &client_alpn).await {
        Ok(stream) => match handshake_sender(&shared, stream).await {
            Ok(sender) => (Some(sender), None),
            Err(err) => (None, Some(err)),
        },
        Err(err) => (None, Some(err)),
    };
    let alpn: Vec<Vec<u8>> = match &sender {
        Some(Sender::H2(_)) => vec![ALPN_H2.to_vec()],
        _ if client_alpn.iter().any(|p| p == ALPN_HTTP11) => vec![ALPN_HTTP11.to_vec()],
        _ => Vec::new(),
    };
    if let Some(reason) = &failure {
        shared.record(connect_event(
            "upstream-tls-failed",
            &host,
            port,
            reason.clone(),
        ));
    }
    let server_config = match shared.ca.server_config(&host, alpn) {
        Ok(config) => config,
        Err(err) => {
            shared.record(connect_event(
                "leaf-certificate-failed",
                &host,
                port,
                err.to_string(),
            ));
            return;
        }
    };
    let tls = match tokio::time::timeout(
        shared.limits.handshake_timeout,
        start.into_stream(server_config),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            // Usually the client does not trust the bottle's CA.
            shared.record(connect_event(
                "client-tls-failed",
                &host,
                port,
                format!("{err}; is the bottle's CA installed for this client?"),
            ));
            return;
        }
        Err(_) => {
            shared.record(connect_event(
                "tls-handshake-timeout",
                &host,
                port,
                "client handshake".into(),
            ));
            return;
        }
    };
    let client_h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
    let tunnel = Arc::new(TunnelUpstream {
        shared: shared.clone(),
        host: host.clone(),
        port,
        client_alpn,
        slot: tokio::sync::Mutex::new(sender),
    });
    let failure = failure.map(Arc::new);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let tunnel = tunnel.clone();
        let failure = failure.clone();
        async move { Ok::<_, Infallible>(handle_inner(tunnel, failure, req).await) }
    });
    let io = TokioIo::new(tls);
    let mut shutdown = shared.shutdown_signal();
    if client_h2 {
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(shared.timer.clone())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .max_concurrent_streams(128)
            .serve_connection(io, service);
        tokio::select! {
            _ = connection => {}
            _ = shutdown.changed() => {}
        }
    } else {
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(shared.timer.clone())
            .header_read_timeout(shared.limits.header_read_timeout)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::select! {
            _ = connection => {}
            _ = shutdown.changed() => {}
        }
    }
}

async fn handle_inner(
    tunnel: Arc<TunnelUpstream>,
    failure: Option<Arc<String>>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let shared = tunnel.shared.clone();
    let target = Target {
        host: tunnel.host.clone(),
        port: tunnel.port,
    };
    // The CONNECT host, the SNI (checked above), and the Host / :authority of every
    // request must name the same server, or the tunnel could front for another one.
    let authority_ok = {
        let uri_ok = req.uri().authority().is_none_or(|authority| {
            HeaderValue::from_str(authority.as_str())
                .is_ok_and(|value| host_header_matches(&value, &target, 443))
        });
        let host_ok = match req.headers().get(header::HOST) {
            Some(value) => host_header_matches(value, &target, 443),
            None => req.version() == Version::HTTP_2 && req.uri().authority().is_some(),
        };
        uri_ok && host_ok
    };
    if !authority_ok {
        let mut draft = request_draft(
            AuditDecision::Block,
            "domain-fronting",
            req.method(),
            &target,
            req.uri().path(),
        );
        draft.status = Some(403);
        draft.detail = Some(format!(
            "request names {:?} inside a tunnel to {}:{}",
            req.headers()
                .get(header::HOST)
                .map(|v| {
                    // Cut before formatting: the header may be hundreds of KB.
                    let bytes = v.as_bytes();
                    String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).to_string()
                })
                .or_else(|| req.uri().authority().map(ToString::to_string))
                .unwrap_or_default(),
            target.host,
            target.port
        ));
        shared.record(draft);
        return block_response(
            "domain-fronting",
            "the Host header must name the host the tunnel was opened to",
        );
    }
    if let Some(reason) = failure {
        let mut draft = request_draft(
            AuditDecision::Block,
            "upstream-tls-failed",
            req.method(),
            &target,
            req.uri().path(),
        );
        draft.status = Some(502);
        draft.detail = Some(reason.to_string());
        shared.record(draft);
        return error_response(StatusCode::BAD_GATEWAY, "upstream-tls-failed", &reason);
    }
    process(shared, target, req, Route::Tunnel(&tunnel), started).await
}
