//! Loopback HTTP(S) plumbing shared by the model fixtures: accept loop, TLS, request
//! recording and the running-server handle.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::script::Script;

/// Requests larger than this are refused; agent requests are well below it.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// Errors of starting a fixture.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot bind the fixture to `{addr}`")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS certificate or key for the fixture")]
    Tls(#[source] rustls::Error),
    #[error("cannot parse the fixture's PEM {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the fixture's PEM certificate file holds no certificate")]
    NoCertificate,
}

/// A certificate chain and key the fixture presents when it serves HTTPS.
#[derive(Debug)]
pub struct TlsIdentity {
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    #[must_use]
    pub fn new(cert_chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        Self { cert_chain, key }
    }

    /// Reads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    /// When either PEM is malformed or the chain is empty.
    pub fn from_pem(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, FixtureError> {
        let cert_chain = CertificateDer::pem_slice_iter(cert_chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| FixtureError::Pem {
                what: "certificate",
                source,
            })?;
        if cert_chain.is_empty() {
            return Err(FixtureError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| FixtureError::Pem {
            what: "private key",
            source,
        })?;
        Ok(Self { cert_chain, key })
    }
}

/// How a fixture listens and what it answers.
#[derive(Debug, Clone)]
pub struct FixtureConfig {
    /// Where to listen; `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    /// The API key a request must carry; `None` accepts any request.
    pub expected_key: Option<String>,
    /// The conversation to play back.
    pub script: Script,
    /// Serve HTTPS with this identity instead of plain HTTP.
    pub tls: Option<TlsIdentity>,
    /// Resolves relative paths for tools that need absolute ones, when the client does not
    /// state its working directory itself.
    pub workspace: Option<PathBuf>,
    /// The model id echoed in answers.
    pub model: String,
}

impl FixtureConfig {
    /// Plain HTTP on a free loopback port, no key check.
    #[must_use]
    pub fn new(script: Script) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            expected_key: None,
            script,
            tls: None,
            workspace: None,
            model: "fixture-model".to_owned(),
        }
    }

    #[must_use]
    pub fn with_expected_key(mut self, key: impl Into<String>) -> Self {
        self.expected_key = Some(key.into());
        self
    }

    #[must_use]
    pub fn with_tls(mut self, identity: TlsIdentity) -> Self {
        self.tls = Some(identity);
        self
    }

    #[must_use]
    pub fn with_workspace(mut self, dir: impl Into<PathBuf>) -> Self {
        self.workspace = Some(dir.into());
        self
    }

    #[must_use]
    pub fn with_listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }
}

/// One request as the fixture received it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// Header names are lowercase, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON, or `None` when it is empty or not JSON.
    pub body: Option<Value>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The path without its query.
    #[must_use]
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or_default()
    }
}

/// The wire protocol a fixture speaks; a closed set, so dispatch is a `match`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Anthropic,
    OpenAi,
    Echo,
}

pub(crate) struct Shared {
    pub config: FixtureConfig,
    pub requests: Mutex<Vec<RecordedRequest>>,
    ids: AtomicU64,
}

impl Shared {
    /// A deterministic id such as `msg_fixture_0001`, so recorded runs are comparable.
    pub fn next_id(&self, prefix: &str) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{prefix}_fixture_{n:04}")
    }
}

/// A running fixture; dropping it stops the server.
#[derive(Debug)]
pub struct FixtureHandle {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl FixtureHandle {
    /// The bound address (with the real port when `0` was asked for).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` or `https://…`, without a trailing slash or `/v1`.
    #[must_use]
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Every request received so far, in order.
    #[must_use]
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops accepting connections.
    pub fn shutdown(self) {
        self.task.abort();
    }
}

impl Drop for FixtureHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn start(
    kind: Kind,
    config: FixtureConfig,
) -> Result<FixtureHandle, FixtureError> {
    let acceptor = match &config.tls {
        Some(identity) => Some(tls_acceptor(identity)?),
        None => None,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| FixtureError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| FixtureError::Bind {
        addr: config.listen,
        source,
    })?;
    let tls = acceptor.is_some();
    let shared = Arc::new(Shared {
        config,
        requests: Mutex::new(Vec::new()),
        ids: AtomicU64::new(0),
    });
    let task = tokio::spawn(accept_loop(kind, listener, acceptor, Arc::clone(&shared)));
    Ok(FixtureHandle {
        addr,
        tls,
        shared,
        task,
    })
}

pub(crate) fn tls_acceptor(identity: &TlsIdentity) -> Result<TlsAcceptor, FixtureError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(FixtureError::Tls)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

async fn accept_loop(
    kind: Kind,
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(kind, &shared, request).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            // A client that hangs up mid-stream is not the fixture's problem.
            match acceptor {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

async fn handle(kind: Kind, shared: &Shared, request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: serde_json::from_slice(&bytes).ok(),
    };
    shared
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(recorded.clone());
    match kind {
        Kind::Anthropic => crate::anthropic::respond(shared, &recorded),
        Kind::OpenAi => crate::openai::respond(shared, &recorded),
        Kind::Echo => crate::echo::respond(&recorded),
    }
}

/// Whether the request carries the expected key: `Ok` when it does (or none is expected),
/// `Err(true)` when a key is present but wrong, `Err(false)` when none is present.
pub(crate) fn check_key(shared: &Shared, request: &RecordedRequest) -> Result<(), bool> {
    let Some(expected) = shared.config.expected_key.as_deref() else {
        return Ok(());
    };
    let bearer = request.header("authorization").and_then(|value| {
        value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
    });
    let presented = request.header("x-api-key").or(bearer);
    match presented {
        Some(key) if key == expected => Ok(()),
        Some(_) => Err(true),
        None => Err(false),
    }
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(value.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A `text/event-stream` response that sends each event as its own body frame.
pub(crate) fn sse_response(events: Vec<String>) -> Response<Body> {
    let frames = futures_util::stream::iter(
        events
            .into_iter()
            .map(|event| Ok::<_, Infallible>(Frame::data(Bytes::from(event)))),
    );
    let mut response = Response::new(StreamBody::new(frames).boxed());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// Whether the client asked to upgrade to a WebSocket.
pub(crate) fn wants_websocket(request: &RecordedRequest) -> bool {
    request
        .header("upgrade")
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"))
}
