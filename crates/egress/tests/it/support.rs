use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bot_bottle_core::policy::{AuditLevel, EgressPolicy};
use bot_bottle_egress::{GatewayConfig, GatewayHandle, Listen};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

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
