use std::time::Duration;

use base64::Engine as _;
use bot_bottle_core::credential::{CredentialSource, CredentialSpec, Inject};
use bot_bottle_egress::ResolvedCredential;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    TestPki, audit_lines, curl, policy, raw_connect, tls_gateway, tls_origin, traffic,
    wait_for_reason,
};

const RULES: &str = r#"
rules:
  - host: api.test
    methods: [GET, POST]
    paths: ["/v1/*"]
  - host: other.test
  - host: pinned.test
    passthrough: true
"#;

fn curl_tls<'a>(ca: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--cacert", ca];
    args.extend_from_slice(extra);
    args
}

#[tokio::test]
async fn intercepts_https_over_http1_and_http2_under_the_l7_policy() {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test", "other.test"], None).await;
    let (gw, ca) = tls_gateway(
        policy(RULES),
        &[("api.test", origin), ("other.test", origin)],
        &pki,
        vec![],
    )
    .await;
    let ca = ca.to_str().expect("utf8 path").to_string();
    let proxy = gw.proxy_url();

    let h1 = curl(
        &proxy,
        &curl_tls(&ca, &["--http1.1", "https://api.test/v1/models?limit=2"]),
    )
    .await;
    assert_eq!(h1.status, 200, "{}", h1.body);
    assert!(
        h1.body
            .starts_with("HTTP/1.1 GET /v1/models query=limit=2 authority=api.test"),
        "{}",
        h1.body
    );

    let h2 = curl(
        &proxy,
        &curl_tls(
            &ca,
            &["--http2", "-d", "hi", "https://api.test/v1/messages"],
        ),
    )
    .await;
    assert_eq!(h2.status, 200, "{}", h2.body);
    assert!(
        h2.body.starts_with("HTTP/2.0 POST /v1/messages"),
        "{}",
        h2.body
    );
    assert!(h2.body.ends_with("body=hi"), "{}", h2.body);

    let path = curl(&proxy, &curl_tls(&ca, &["https://api.test/v2/secret"])).await;
    assert_eq!(path.status, 403);
    assert_eq!(
        path.header("x-bot-bottle-block").as_deref(),
        Some("path-not-allowed")
    );

    let method = curl(
        &proxy,
        &curl_tls(&ca, &["--http2", "-X", "DELETE", "https://api.test/v1/x"]),
    )
    .await;
    assert_eq!(method.status, 403);
    assert_eq!(
        method.header("x-bot-bottle-block").as_deref(),
        Some("method-not-allowed")
    );

    let host = curl(&proxy, &curl_tls(&ca, &["https://denied.test/"])).await;
    assert_eq!(host.status, 403);
    assert!(
        host.headers
            .contains("x-bot-bottle-block: not-in-allowlist"),
        "{}",
        host.headers
    );

    let fronted = curl(
        &proxy,
        &curl_tls(
            &ca,
            &[
                "--http1.1",
                "-H",
                "Host: other.test",
                "https://api.test/v1/x",
            ],
        ),
    )
    .await;
    assert_eq!(fronted.status, 403);
    assert_eq!(
        fronted.header("x-bot-bottle-block").as_deref(),
        Some("domain-fronting")
    );

    // `/v1/../v2/secret` would pass the `/v1/*` glob and reach `/v2/secret` at the origin.
    let dotted = curl(
        &proxy,
        &curl_tls(&ca, &["--path-as-is", "https://api.test/v1/../v2/secret"]),
    )
    .await;
    assert_eq!(dotted.status, 403);
    assert_eq!(
        dotted.header("x-bot-bottle-block").as_deref(),
        Some("ambiguous-path")
    );

    let events = traffic(&gw.audit_path);
    let summary: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {}",
                e["decision"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or(""),
                e["method"].as_str().unwrap_or(""),
                e["path"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            "allow allowed-by-rule GET /v1/models",
            "allow allowed-by-rule POST /v1/messages",
            "block path-not-allowed GET /v2/secret",
            "block method-not-allowed DELETE /v1/x",
            "block not-in-allowlist CONNECT ",
            "block domain-fronting GET /v1/x",
            "block ambiguous-path GET /v1/../v2/secret",
        ]
    );
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn refuses_opaque_tunnels_and_sni_fronting_but_passes_passthrough_hosts() {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test", "other.test", "pinned.test"], None).await;
    let plain = crate::support::origin().await;
    let (gw, ca) = tls_gateway(
        policy(RULES),
        &[
            ("api.test", plain),
            ("other.test", origin),
            ("pinned.test", origin),
        ],
        &pki,
        vec![],
    )
    .await;
    let proxy = gw.handle.tcp_addr().expect("tcp");

    // Plain HTTP inside a CONNECT to an intercepted host is cut off, not tunnelled.
    let mut tunnel = raw_connect(proxy, "api.test:443").await;
    tunnel
        .write_all(b"GET /v1/x HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("origin saw"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    wait_for_reason(&gw.audit_path, "opaque-tunnel-refused").await;

    // A TLS client that CONNECTs to one host and names another in its SNI is cut off.
    let tunnel = raw_connect(proxy, "other.test:443").await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in bot_bottle_egress::tls::certs_from_pem(&std::fs::read_to_string(&ca).expect("ca"))
        .expect("ca")
    {
        roots.add(cert).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("api.test").expect("name");
    assert!(
        connector.connect(name, tunnel).await.is_err(),
        "SNI fronting must fail"
    );
    let event = wait_for_reason(&gw.audit_path, "sni-mismatch").await;
    assert_eq!(event["host"], "other.test");

    // A passthrough host gets the origin's own certificate, end to end.
    let pinned = curl(
        &gw.proxy_url(),
        &[
            "--cacert",
            &pki_path(&pki, &gw),
            "https://pinned.test/anything",
        ],
    )
    .await;
    assert_eq!(pinned.status, 200, "{}", pinned.body);
    assert!(pinned.body.contains("GET /anything"), "{}", pinned.body);
    let event = wait_for_reason(&gw.audit_path, "allowed-passthrough").await;
    assert_eq!(event["detail"], "passthrough: not intercepted");
    gw.handle.shutdown().await;
}

fn pki_path(pki: &TestPki, gw: &crate::support::TestGateway) -> String {
    let path = gw.audit_path.with_file_name("origin-ca.pem");
    std::fs::write(&path, &pki.ca_pem).expect("write");
    path.to_str().expect("utf8").to_string()
}

pub(crate) fn credential(
    name: &str,
    host: &str,
    inject: Inject,
    value: &str,
) -> ResolvedCredential {
    ResolvedCredential::with_value(
        CredentialSpec {
            name: name.into(),
            source: CredentialSource::Env("UNUSED".into()),
            hosts: vec![host.into()],
            inject,
            env: None,
        },
        "bottle-test1",
        value.into(),
    )
    .expect("credential")
}

const API_KEY: &str =
    "sk-ant-api03-REALtestKEYvalue0123456789abcdefghijklmnopqrstuvwxyzABCDEF-0123456789AA";
const GIT_TOKEN: &str = "realgittoken0123456789abcdefghij";
const BEARER_TOKEN: &str = "sk-proj-REALbearerTOKEN0123456789abcdefghijklmnop";

#[tokio::test]
async fn injects_credentials_only_toward_their_hosts_and_scrubs_echoes() {
    let pki = TestPki::new();
    let origin = tls_origin(
        &pki,
        &["api.test", "git.test", "other.test", "bearer.test"],
        None,
    )
    .await;
    let rules = policy(
        "rules:\n  - host: api.test\n  - host: git.test\n  - host: other.test\n  - host: bearer.test\n",
    );
    let openai = credential("openai", "bearer.test", Inject::Bearer, BEARER_TOKEN);
    let bearer_placeholder = openai.placeholder().to_string();
    let anthropic = credential(
        "anthropic",
        "api.test",
        Inject::Header("x-api-key".into()),
        API_KEY,
    );
    let gitea = credential(
        "gitea",
        "git.test",
        Inject::Basic {
            username: "bot".into(),
        },
        GIT_TOKEN,
    );
    let key_placeholder = anthropic.placeholder().to_string();
    let git_placeholder = gitea.placeholder().to_string();
    assert!(key_placeholder.starts_with("sk-ant-api03-"));
    let (gw, ca) = tls_gateway(
        rules,
        &[
            ("api.test", origin),
            ("git.test", origin),
            ("other.test", origin),
            ("bearer.test", origin),
        ],
        &pki,
        vec![anthropic, gitea, openai],
    )
    .await;
    let ca = ca.to_str().expect("utf8").to_string();
    let proxy = gw.proxy_url();

    // Header: the placeholder becomes the key on the wire, and the echo comes back scrubbed.
    let header = format!("x-api-key: {key_placeholder}");
    let sent = curl(
        &proxy,
        &curl_tls(&ca, &["-H", &header, "https://api.test/v1/messages"]),
    )
    .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    assert!(
        sent.body
            .contains(&format!("x-api-key-sha256={}", sha256(API_KEY))),
        "origin must receive the real key: {}",
        sent.body
    );
    assert!(
        sent.body.contains(&format!("x-api-key={key_placeholder}")),
        "echo not scrubbed: {}",
        sent.body
    );
    assert!(!sent.body.contains(API_KEY));
    assert_eq!(
        sent.header("x-echo-key").as_deref(),
        Some(key_placeholder.as_str())
    );

    // Basic, as git sends it: user:placeholder inside base64.
    let basic = curl(
        &proxy,
        &curl_tls(
            &ca,
            &[
                "-u",
                &format!("bot:{git_placeholder}"),
                "https://git.test/owner/name.git/info/refs",
            ],
        ),
    )
    .await;
    assert_eq!(basic.status, 200, "{}", basic.body);
    let real_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("bot:{GIT_TOKEN}"))
    );
    // The origin received the real value; the echo that comes back into the bottle is
    // scrubbed to the placeholder, in its base64 form too.
    let placeholder_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("bot:{git_placeholder}"))
    );
    assert!(
        basic
            .body
            .contains(&format!("authorization-sha256={}", sha256(&real_basic))),
        "origin must receive the real Basic value: {}",
        basic.body
    );
    assert!(
        basic
            .body
            .contains(&format!("authorization={placeholder_basic} ")),
        "{}",
        basic.body
    );
    assert!(!basic.body.contains(&real_basic[6..]), "{}", basic.body);

    // Responses from a credential's host come back uncompressed, so they can be scrubbed.
    let compressed = curl(
        &proxy,
        &curl_tls(&ca, &["--compressed", "https://api.test/v1/models"]),
    )
    .await;
    assert!(
        compressed.body.contains("accept-encoding=identity "),
        "{}",
        compressed.body
    );

    // Nothing sent at all: the credential is injected in its configured form.
    let bare = curl(&proxy, &curl_tls(&ca, &["https://api.test/v1/models"])).await;
    assert!(
        bare.body
            .contains(&format!("x-api-key-sha256={}", sha256(API_KEY))),
        "{}",
        bare.body
    );

    // Bearer: `Authorization: Bearer <placeholder>` becomes the real token.
    let bearer = curl(
        &proxy,
        &curl_tls(
            &ca,
            &[
                "-H",
                &format!("Authorization: Bearer {bearer_placeholder}"),
                "https://bearer.test/v1/chat",
            ],
        ),
    )
    .await;
    assert!(
        bearer.body.contains(&format!(
            "authorization-sha256={}",
            sha256(&format!("Bearer {BEARER_TOKEN}"))
        )),
        "{}",
        bearer.body
    );
    assert!(
        bearer
            .body
            .contains(&format!("authorization=Bearer {bearer_placeholder} ")),
        "{}",
        bearer.body
    );

    // The placeholder on its way to another host is an exfiltration attempt.
    let exfil = curl(
        &proxy,
        &curl_tls(&ca, &["-H", &header, "https://other.test/collect"]),
    )
    .await;
    assert_eq!(exfil.status, 403);
    assert_eq!(
        exfil.header("x-bot-bottle-block").as_deref(),
        Some("exfiltration-attempt")
    );
    let in_body = curl(
        &proxy,
        &curl_tls(
            &ca,
            &[
                "-d",
                &format!("{{\"k\":\"{git_placeholder}\"}}"),
                "https://other.test/collect",
            ],
        ),
    )
    .await;
    assert_eq!(
        in_body.header("x-bot-bottle-block").as_deref(),
        Some("exfiltration-attempt")
    );

    let events = traffic(&gw.audit_path);
    let credentials: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["reason"].as_str().unwrap_or(""),
                e["credential"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(
        credentials,
        vec![
            "allowed-by-rule anthropic",
            "allowed-by-rule gitea",
            "allowed-by-rule anthropic",
            "allowed-by-rule anthropic",
            "allowed-by-rule openai",
            "exfiltration-attempt -",
            "exfiltration-attempt -",
        ]
    );
    assert_eq!(events[5]["dlp"][0]["rule"], "exfiltration-attempt");
    assert_eq!(events[5]["dlp"][0]["credential"], "anthropic");
    assert_eq!(events[5]["dlp"][0]["location"], "header:x-api-key");
    let audit = std::fs::read_to_string(&gw.audit_path).expect("audit");
    assert!(
        !audit.contains(API_KEY) && !audit.contains(GIT_TOKEN) && !audit.contains(BEARER_TOKEN),
        "a real secret reached the audit log"
    );
    assert!(
        !audit.contains(&key_placeholder),
        "the audit log holds redacted excerpts only"
    );
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn dlp_blocks_planted_secrets_including_a_custody_secret_in_gzip_json() {
    use std::io::Write as _;
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test", "other.test"], None).await;
    let rules = policy("rules:\n  - host: api.test\n  - host: other.test\n");
    let gitea = credential("gitea", "git.test", Inject::Bearer, GIT_TOKEN);
    let (gw, ca) = tls_gateway(
        rules,
        &[("api.test", origin), ("other.test", origin)],
        &pki,
        vec![gitea],
    )
    .await;
    let ca = ca.to_str().expect("utf8").to_string();
    let proxy = gw.proxy_url();

    let aws = curl(
        &proxy,
        &curl_tls(
            &ca,
            &[
                "-d",
                "key=AKIAZ7VRSQ2XMPLE4GHB&x=1",
                "https://api.test/upload",
            ],
        ),
    )
    .await;
    assert_eq!(aws.status, 403, "{}", aws.body);
    assert_eq!(
        aws.header("x-bot-bottle-block").as_deref(),
        Some("dlp-blocked")
    );

    let github = curl(
        &proxy,
        &curl_tls(
            &ca,
            &[
                "-d",
                "token=ghp_R7x2Lm9Qa4Vb8Nc3Kd6Hf1Js5Tw0Yz2Pq4Ue",
                "https://api.test/upload",
            ],
        ),
    )
    .await;
    assert_eq!(
        github.header("x-bot-bottle-block").as_deref(),
        Some("dlp-blocked")
    );

    let encoded = base64::engine::general_purpose::STANDARD.encode(GIT_TOKEN);
    let json = format!("{{\"note\":\"{encoded}\"}}");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(json.as_bytes()).expect("gzip");
    let gz_path = gw.audit_path.with_file_name("body.gz");
    std::fs::write(&gz_path, gz.finish().expect("gzip")).expect("write");
    let custody = curl(
        &proxy,
        &curl_tls(
            &ca,
            &[
                "-H",
                "content-encoding: gzip",
                "-H",
                "content-type: application/json",
                "--data-binary",
                &format!("@{}", gz_path.display()),
                "https://other.test/upload",
            ],
        ),
    )
    .await;
    assert_eq!(custody.status, 403, "{}", custody.body);
    assert_eq!(
        custody.header("x-bot-bottle-block").as_deref(),
        Some("exfiltration-attempt")
    );

    let clean = curl(
        &proxy,
        &curl_tls(&ca, &["-d", "hello=world", "https://api.test/upload"]),
    )
    .await;
    assert_eq!(clean.status, 200, "{}", clean.body);

    let events = traffic(&gw.audit_path);
    let rules_hit: Vec<String> = events
        .iter()
        .map(|e| {
            e["dlp"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .map(|f| {
                            format!(
                                "{}@{}",
                                f["rule"].as_str().unwrap_or(""),
                                f["location"].as_str().unwrap_or("")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        })
        .collect();
    assert!(rules_hit[0].contains("aws"), "{rules_hit:?}");
    assert!(rules_hit[1].contains("github"), "{rules_hit:?}");
    assert_eq!(rules_hit[2], "custody-secret@body");
    assert_eq!(events[2]["dlp"][0]["credential"], "gitea");
    assert_eq!(rules_hit[3], "");
    let audit = std::fs::read_to_string(&gw.audit_path).expect("audit");
    assert!(
        !audit.contains("AKIAZ7VRSQ2XMPLE4GHB")
            && !audit.contains(GIT_TOKEN)
            && !audit.contains(&encoded)
    );
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn refuses_a_private_upstream_not_named_by_a_dangerous_rule() {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["127.0.0.1", "localhost", "127.0.0.3"], None).await;
    let rules = policy(&format!(
        "rules:\n  - host: 127.0.0.1\n    port: {p}\n  - host: localhost\n    port: {p}\n    dangerously_allow_private_upstreams: true\n  - host: 127.0.0.3\n    port: {p}\n",
        p = origin.port()
    ));
    // The override map is the launcher's configuration, so it is not subject to the
    // private-address refusal (the loopback-only guard still applies).
    let (gw, ca) = tls_gateway(rules, &[("127.0.0.3", origin)], &pki, vec![]).await;
    let ca = ca.to_str().expect("utf8").to_string();
    let refused = curl(
        &gw.proxy_url(),
        &curl_tls(&ca, &[&format!("https://127.0.0.1:{}/", origin.port())]),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert!(
        refused
            .headers
            .contains("x-bot-bottle-block: private-upstream"),
        "{}",
        refused.headers
    );
    let allowed = curl(
        &gw.proxy_url(),
        &curl_tls(&ca, &[&format!("https://localhost:{}/ok", origin.port())]),
    )
    .await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    // A CONNECT to an IP literal gets a leaf with that IP as its subject name.
    let by_ip = curl(
        &gw.proxy_url(),
        &curl_tls(&ca, &[&format!("https://127.0.0.3:{}/ip", origin.port())]),
    )
    .await;
    assert_eq!(by_ip.status, 200, "{}", by_ip.body);
    assert!(by_ip.body.contains("GET /ip"), "{}", by_ip.body);
    gw.handle.shutdown().await;
}

pub(crate) fn sha256(s: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// An origin that upgrades `/v1/ws` and echoes every byte back. It refuses an upgrade
/// that offers extensions: the gateway must have removed them.
fn websocket_echo() -> crate::support::Handler {
    std::sync::Arc::new(|mut req: hyper::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            if req.headers().contains_key("sec-websocket-extensions") {
                let mut refused =
                    hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                *refused.status_mut() = hyper::StatusCode::BAD_REQUEST;
                return refused;
            }
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let mut io = hyper_util::rt::TokioIo::new(upgraded);
                    let mut buf = [0u8; 256];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            switching_to_websocket()
        })
    })
}

/// An origin's `101 Switching Protocols` answer to a websocket upgrade.
pub(crate) fn switching_to_websocket() -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
    *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        "upgrade",
        hyper::header::HeaderValue::from_static("websocket"),
    );
    headers.insert(
        "connection",
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        "sec-websocket-accept",
        hyper::header::HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    );
    response
}

/// A client frame, masked as RFC 6455 requires (short payloads only).
fn ws_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![
        if fin { 0x80 } else { 0 } | opcode,
        0x80 | u8::try_from(payload.len()).expect("short payload"),
    ];
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

pub(crate) async fn tls_through(
    proxy: std::net::SocketAddr,
    host: &str,
    ca: &std::path::Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tunnel = raw_connect(proxy, &format!("{host}:443")).await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in bot_bottle_egress::tls::certs_from_pem(&std::fs::read_to_string(ca).expect("ca"))
        .expect("ca")
    {
        roots.add(cert).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).expect("name");
    connector
        .connect(name, tunnel)
        .await
        .expect("TLS through the gateway")
}

pub(crate) async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if stream.read_exact(&mut byte).await.is_err() {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_string()
}

#[tokio::test]
async fn websockets_are_decided_by_policy_and_their_messages_scanned() {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test"], Some(websocket_echo())).await;
    let (gw, ca) = tls_gateway(
        policy("rules:\n  - host: api.test\n    paths: [\"/v1/*\"]\n"),
        &[("api.test", origin)],
        &pki,
        vec![],
    )
    .await;
    let proxy = gw.handle.tcp_addr().expect("tcp");
    let upgrade = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: api.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        )
    };

    let mut ws = tls_through(proxy, "api.test", &ca).await;
    ws.write_all(upgrade("/v1/ws").as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut ws).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    let frame = ws_frame(true, 0x1, b"frames go both ways");
    ws.write_all(&frame).await.expect("write");
    let mut echoed = vec![0u8; frame.len()];
    ws.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(echoed, frame);
    drop(ws);

    // A secret split over two fragments of one message: the message is scanned whole,
    // never reaches the origin (which would echo it), and the bottle gets a 1008 close.
    let mut leaky = tls_through(proxy, "api.test", &ca).await;
    leaky
        .write_all(upgrade("/v1/ws").as_bytes())
        .await
        .expect("write");
    assert!(read_head(&mut leaky).await.starts_with("HTTP/1.1 101"));
    let mut message = ws_frame(false, 0x1, b"{\"key\":\"AKIAQYLPMN");
    message.extend(ws_frame(true, 0x0, b"5HHHFPZAM2\"}"));
    leaky.write_all(&message).await.expect("write");
    let mut close = [0u8; 4];
    leaky.read_exact(&mut close).await.expect("a close frame");
    assert_eq!(close[0], 0x88, "{close:?}");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1008);
    drop(leaky);

    let mut denied = tls_through(proxy, "api.test", &ca).await;
    denied
        .write_all(upgrade("/admin/ws").as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut denied).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.contains("x-bot-bottle-block: path-not-allowed"),
        "{head}"
    );

    let mut event = None;
    for _ in 0..100 {
        event = traffic(&gw.audit_path)
            .into_iter()
            .find(|e| e["path"] == "/v1/ws");
        if event.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let event = event.expect("websocket audited when it closes");
    assert_eq!(event["status"], 101);
    assert_eq!(event["bytes_up"], 25);
    assert_eq!(event["bytes_down"], 25);
    let mut blocked = None;
    for _ in 0..100 {
        blocked = audit_lines(&gw.audit_path)
            .into_iter()
            .find(|e| e["reason"] == "dlp-blocked" && e["path"] == "/v1/ws");
        if blocked.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let blocked = blocked.expect("the blocked message is audited");
    assert_eq!(blocked["decision"], "block");
    assert!(
        blocked.to_string().contains("aws-access-key-id"),
        "{blocked}"
    );
    assert!(
        !blocked.to_string().contains("AKIAQYLPMN5HHHFPZAM2"),
        "{blocked}"
    );
    gw.handle.shutdown().await;
}

/// An origin that upgrades and then echoes the injected `x-api-key` back in a server
/// message split over two frames, as a careless API might.
fn websocket_key_echo() -> crate::support::Handler {
    std::sync::Arc::new(|mut req: hyper::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let key = req
                .headers()
                .get("x-api-key")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default();
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let mut io = hyper_util::rt::TokioIo::new(upgraded);
                    let mut text = b"{\"echo\":\"".to_vec();
                    text.extend_from_slice(&key);
                    text.extend_from_slice(b"\"}");
                    let (first, second) = text.split_at(text.len() / 2);
                    let frame = |fin: bool, opcode: u8, payload: &[u8]| {
                        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
                        f.push(u8::try_from(payload.len()).expect("short"));
                        f.extend_from_slice(payload);
                        f
                    };
                    let mut bytes = frame(false, 0x1, first);
                    bytes.extend(frame(true, 0x0, second));
                    let _ = io.write_all(&bytes).await;
                    let mut sink = [0u8; 64];
                    while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
                }
            });
            switching_to_websocket()
        })
    })
}

#[tokio::test]
async fn a_websocket_server_echoing_the_injected_key_is_scrubbed() {
    const KEY: &str = "sk-ant-api03-WSECHOREALVALUE0123456789abcdefghij";
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test"], Some(websocket_key_echo())).await;
    let anthropic = credential(
        "anthropic",
        "api.test",
        Inject::Header("x-api-key".into()),
        KEY,
    );
    let placeholder = anthropic.placeholder().to_owned();
    let (gw, ca) = tls_gateway(
        policy("rules:\n  - host: api.test\n"),
        &[("api.test", origin)],
        &pki,
        vec![anthropic],
    )
    .await;
    let proxy = gw.handle.tcp_addr().expect("tcp");
    let mut ws = tls_through(proxy, "api.test", &ca).await;
    ws.write_all(
        format!("GET /ws HTTP/1.1\r\nHost: api.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nx-api-key: {placeholder}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    assert!(read_head(&mut ws).await.starts_with("HTTP/1.1 101"));
    let mut received = Vec::new();
    let mut buf = [0u8; 512];
    while !received.ends_with(b"\"}") {
        let n = tokio::time::timeout(Duration::from_secs(5), ws.read(&mut buf))
            .await
            .expect("frames arrive")
            .expect("read");
        assert!(n > 0, "closed early: {received:?}");
        received.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&received);
    assert!(
        !text.contains(KEY),
        "the real key reached the bottle: {text}"
    );
    assert!(text.contains(&placeholder), "{text}");
    drop(ws);
    gw.handle.shutdown().await;
}

/// An origin that closes the connection after every response.
fn closing_origin() -> crate::support::Handler {
    std::sync::Arc::new(|req: hyper::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let mut response = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                format!("served {}", req.uri().path()),
            )));
            response.headers_mut().insert(
                "connection",
                hyper::header::HeaderValue::from_static("close"),
            );
            response
        })
    })
}

#[tokio::test]
async fn a_tunnel_outlives_upstream_connections_that_close() {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test"], Some(closing_origin())).await;
    let (gw, ca) = tls_gateway(
        policy("rules:\n  - host: api.test\n"),
        &[("api.test", origin)],
        &pki,
        vec![],
    )
    .await;
    let ca = ca.to_str().expect("utf8").to_string();
    // One curl, one tunnel, three requests: the upstream closes after each.
    let result = curl(
        &gw.proxy_url(),
        &curl_tls(
            &ca,
            &[
                "--http1.1",
                "https://api.test/a",
                "https://api.test/b",
                "https://api.test/c",
            ],
        ),
    )
    .await;
    assert_eq!(result.status, 200, "{}", result.body);
    assert!(
        result.body.contains("served /a")
            && result.body.contains("served /b")
            && result.body.contains("served /c"),
        "{}",
        result.body
    );
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn bodies_over_the_scan_cap_follow_the_over_cap_policy() {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test"], None).await;
    let big = "a".repeat(4096);
    for (over_cap, expected) in [
        (bot_bottle_egress::OverCap::Block, 403),
        (bot_bottle_egress::OverCap::Pass, 200),
    ] {
        let mut rules = policy("rules:\n  - host: api.test\n");
        rules.audit = Some(bot_bottle_core::policy::AuditLevel::Blocks);
        let (gw, ca) = crate::support::tls_gateway_with(
            rules,
            &[("api.test", origin)],
            &pki,
            vec![],
            |config| {
                config.dlp_body_cap = 1024;
                config.dlp_over_cap = over_cap;
            },
        )
        .await;
        let ca = ca.to_str().expect("utf8").to_string();
        let result = curl(
            &gw.proxy_url(),
            &curl_tls(&ca, &["-d", &big, "https://api.test/upload"]),
        )
        .await;
        assert_eq!(result.status, expected, "{over_cap:?}: {}", result.body);
        let events = traffic(&gw.audit_path);
        assert_eq!(events.len(), 1, "{events:?}");
        if expected == 403 {
            assert_eq!(
                result.header("x-bot-bottle-block").as_deref(),
                Some("dlp-body-too-large")
            );
        } else {
            assert!(
                result.body.ends_with(&big),
                "the whole body reached the origin"
            );
            // Logged even at level `blocks`: part of the body went out unscanned.
            assert!(
                events[0]["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("unscanned")),
                "{events:?}"
            );
            assert_eq!(events[0]["bytes_up"], 4096);
        }
        gw.handle.shutdown().await;
    }
}
