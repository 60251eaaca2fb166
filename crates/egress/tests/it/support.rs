use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::Digest as _;

use bot_bottle_core::policy::{AuditLevel, EgressPolicy};
use bot_bottle_egress::{GatewayConfig, GatewayHandle, Listen};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A loopback HTTP origin that answers `METHOD PATH` plus the Host header it saw, and
/// `/big/<n>` with `n` bytes.
pub async fn origin() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind origin");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        Ok::<_, Infallible>(answer(req).await)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn answer(req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if let Some(n) = path.strip_prefix("/big/") {
        let n: usize = n.parse().unwrap_or(0);
        return Response::new(Full::new(Bytes::from(vec![b'x'; n])));
    }
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let method = req.method().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Response::new(Full::new(Bytes::from(format!(
        "origin saw {method} {path} host={host} body={}",
        String::from_utf8_lossy(&body)
    ))))
}

pub fn policy(yaml: &str) -> EgressPolicy {
    serde_saphyr::from_str(yaml).expect("test policy parses")
}

pub struct TestGateway {
    pub handle: GatewayHandle,
    pub audit_path: PathBuf,
    pub _dir: tempfile::TempDir,
}

impl TestGateway {
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.handle.tcp_addr().expect("tcp gateway"))
    }
}

pub async fn gateway(policy: EgressPolicy, overrides: &[(&str, SocketAddr)]) -> TestGateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit_path = dir.path().join("state/test/egress.jsonl");
    let handle = start_at(
        Listen::Tcp("127.0.0.1:0".parse().expect("addr")),
        policy,
        &audit_path,
        overrides,
    )
    .await;
    TestGateway {
        handle,
        audit_path,
        _dir: dir,
    }
}

pub async fn start_at(
    listen: Listen,
    mut policy: EgressPolicy,
    audit_path: &Path,
    overrides: &[(&str, SocketAddr)],
) -> GatewayHandle {
    if policy.audit.is_none() {
        policy.audit = Some(AuditLevel::All);
    }
    let mut config = GatewayConfig::new(listen, policy, audit_path);
    config.upstream_overrides = overrides
        .iter()
        .map(|(host, addr)| ((*host).to_string(), *addr))
        .collect::<HashMap<_, _>>();
    config.loopback_only = true;
    bot_bottle_egress::start(config)
        .await
        .expect("gateway starts")
}

pub struct CurlResult {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl CurlResult {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().rev().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// Runs curl through `proxy` with `--noproxy ''` so that the environment cannot send it
/// elsewhere; returns the final status, headers and body.
pub async fn curl(proxy: &str, args: &[&str]) -> CurlResult {
    let dir = tempfile::tempdir().expect("tempdir");
    let headers_path = dir.path().join("headers");
    let output = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--noproxy",
            "",
            "-x",
            proxy,
            "-D",
        ])
        .arg(&headers_path)
        .args(["-w", "\n%{http_code} %{http_connect}"])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .await
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    CurlResult {
        // A refused CONNECT leaves `http_code` at 0 and reports in `http_connect`.
        status: code
            .split_whitespace()
            .filter_map(|c| c.parse::<u16>().ok())
            .find(|c| *c != 0)
            .unwrap_or(0),
        headers: std::fs::read_to_string(&headers_path).unwrap_or_default(),
        body: body.to_string(),
    }
}

pub fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("audit log exists")
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is json"))
        .collect()
}

/// The request and connect events (not gateway start/stop or policy updates).
pub fn traffic(path: &Path) -> Vec<serde_json::Value> {
    audit_lines(path)
        .into_iter()
        .filter(|e| e["kind"] == "request" || e["kind"] == "connect")
        .collect()
}

/// A test CA for loopback HTTPS origins (stands in for the public PKI).
pub struct TestPki {
    pub ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "egress test origin CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-signed");
        TestPki {
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    pub fn roots(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        bot_bottle_egress::tls::certs_from_pem(&self.ca_pem).expect("test CA parses")
    }

    fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>(),
        )
        .expect("params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
        );
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

pub type Handler = Arc<
    dyn Fn(
            Request<hyper::body::Incoming>,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// A loopback HTTPS origin (HTTP/1.1 and HTTP/2) with a certificate for `names`, running
/// `handler`, or the echo handler when `None`.
pub async fn tls_origin(pki: &TestPki, names: &[&str], handler: Option<Handler>) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(names));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind origin");
    let addr = listener.local_addr().expect("addr");
    let handler: Handler = handler.unwrap_or_else(|| Arc::new(|req| Box::pin(tls_echo(req))));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await;
            });
        }
    });
    addr
}

/// Echoes what the origin received, so tests can see what the gateway sent upstream.
async fn tls_echo(req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let version = format!("{:?}", req.version());
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let authority = req
        .uri()
        .authority()
        .map(ToString::to_string)
        .or_else(|| {
            req.headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let authorization = header("authorization");
    let api_key = header("x-api-key");
    let accept_encoding = header("accept-encoding");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // Digests let a test check what the origin received without the response echoing
    // the credential itself (which the gateway would scrub).
    let digest = |s: &str| hex::encode(sha2::Sha256::digest(s.as_bytes()));
    let text = format!(
        "{version} {method} {path} query={query} authority={authority} authorization={authorization} x-api-key={api_key} authorization-sha256={} x-api-key-sha256={} query-sha256={} accept-encoding={accept_encoding} body={}",
        digest(&authorization),
        digest(&api_key),
        digest(&query),
        String::from_utf8_lossy(&body)
    );
    let mut response = Response::new(Full::new(Bytes::from(text)));
    if let Ok(value) = hyper::header::HeaderValue::from_str(&api_key) {
        response.headers_mut().insert("x-echo-key", value);
    }
    response
}

/// A gateway that intercepts TLS and trusts `pki` for upstreams (and nothing else).
pub async fn tls_gateway(
    policy: EgressPolicy,
    overrides: &[(&str, SocketAddr)],
    pki: &TestPki,
    credentials: Vec<bot_bottle_egress::ResolvedCredential>,
) -> (TestGateway, PathBuf) {
    tls_gateway_with(policy, overrides, pki, credentials, |_| {}).await
}

/// [`tls_gateway`] with a last say over the configuration.
pub async fn tls_gateway_with(
    policy: EgressPolicy,
    overrides: &[(&str, SocketAddr)],
    pki: &TestPki,
    credentials: Vec<bot_bottle_egress::ResolvedCredential>,
    tweak: impl FnOnce(&mut GatewayConfig),
) -> (TestGateway, PathBuf) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let audit_path = dir.path().join("state/test/egress.jsonl");
    let mut policy = policy;
    if policy.audit.is_none() {
        policy.audit = Some(AuditLevel::All);
    }
    let mut config = GatewayConfig::new(
        Listen::Tcp("127.0.0.1:0".parse().expect("addr")),
        policy,
        &audit_path,
    );
    config.upstream_overrides = overrides
        .iter()
        .map(|(host, addr)| ((*host).to_string(), *addr))
        .collect();
    config.loopback_only = true;
    config.native_roots = false;
    config.extra_upstream_roots = pki.roots();
    config.credentials = credentials;
    tweak(&mut config);
    let handle = bot_bottle_egress::start(config)
        .await
        .expect("gateway starts");
    let ca_path = dir.path().join("gateway-ca.pem");
    std::fs::write(&ca_path, handle.ca_cert_pem()).expect("write CA");
    (
        TestGateway {
            handle,
            audit_path,
            _dir: dir,
        },
        ca_path,
    )
}

/// Opens a CONNECT tunnel by hand and returns the stream after the 200.
pub async fn raw_connect(proxy: std::net::SocketAddr, target: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect gateway");
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .expect("write CONNECT");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .await
            .expect("read CONNECT response");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Waits (up to 2 s) for the first traffic event with `reason`, and returns it.
pub async fn wait_for_reason(path: &std::path::Path, reason: &str) -> serde_json::Value {
    for _ in 0..100 {
        if let Some(e) = traffic(path).into_iter().find(|e| e["reason"] == reason) {
            return e;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no `{reason}` event in {:?}", traffic(path));
}

/// Starts a gateway on an existing audit log (a later session of the same bottle), sends
/// one request that `rules` allows to `url` (routed to `origin` as `api.test`), expects a
/// 200, and stops the gateway.
pub async fn one_allowed_request_on(
    audit_path: &Path,
    rules: EgressPolicy,
    origin: SocketAddr,
    url: &str,
) {
    let handle = start_at(
        Listen::Tcp("127.0.0.1:0".parse().expect("addr")),
        rules,
        audit_path,
        &[("api.test", origin)],
    )
    .await;
    let proxy = format!("http://{}", handle.tcp_addr().expect("tcp"));
    assert_eq!(curl(&proxy, &[url]).await.status, 200);
    handle.shutdown().await;
}
