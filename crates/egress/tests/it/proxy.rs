use std::time::Duration;

use bot_bottle_core::policy::EgressPolicy;
use bot_bottle_egress::Listen;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{curl, gateway, origin, policy, start_at, traffic};

const RULES: &str = r#"
rules:
  - host: api.test
    methods: [GET, POST]
    paths: ["/v1/*"]
  - host: tunnel.test
    port: 9443
    passthrough: true
"#;

#[tokio::test]
async fn allows_absolute_form_requests_through_to_a_loopback_origin() {
    let origin = origin().await;
    let gw = gateway(policy(RULES), &[("api.test", origin)]).await;
    let result = curl(
        &gw.proxy_url(),
        &["-d", "hello", "http://api.test/v1/echo?x=secret"],
    )
    .await;
    assert_eq!(result.status, 200, "{}", result.body);
    assert_eq!(
        result.body,
        "origin saw POST /v1/echo host=api.test body=hello"
    );

    let events = traffic(&gw.audit_path);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["decision"], "allow");
    assert_eq!(e["reason"], "allowed-by-rule");
    assert_eq!(e["rule"], 0);
    assert_eq!(e["method"], "POST");
    assert_eq!(e["host"], "api.test");
    assert_eq!(e["port"], 80);
    // The query is left out of the log: it can carry credentials.
    assert_eq!(e["path"], "/v1/echo");
    assert_eq!(e["status"], 200);
    assert_eq!(e["bytes_up"], 5);
    assert_eq!(e["bytes_down"], result.body.len());
    assert_eq!(e["credential"], serde_json::Value::Null);
    assert_eq!(e["dlp"], serde_json::json!([]));
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn blocks_with_a_reason_header_and_audits_it() {
    let origin = origin().await;
    let gw = gateway(
        policy(RULES),
        &[("api.test", origin), ("other.test", origin)],
    )
    .await;
    let proxy = gw.proxy_url();

    let host = curl(&proxy, &["http://other.test/v1/x"]).await;
    assert_eq!(host.status, 403);
    assert_eq!(
        host.header("x-bot-bottle-block").as_deref(),
        Some("not-in-allowlist")
    );
    assert!(host.body.contains("not-in-allowlist"), "{}", host.body);

    let method = curl(&proxy, &["-X", "DELETE", "http://api.test/v1/x"]).await;
    assert_eq!(method.status, 403);
    assert_eq!(
        method.header("x-bot-bottle-block").as_deref(),
        Some("method-not-allowed")
    );

    let path = curl(&proxy, &["http://api.test/v2/x"]).await;
    assert_eq!(path.status, 403);
    assert_eq!(
        path.header("x-bot-bottle-block").as_deref(),
        Some("path-not-allowed")
    );

    let fronted = curl(&proxy, &["-H", "Host: other.test", "http://api.test/v1/x"]).await;
    assert_eq!(fronted.status, 403);
    assert_eq!(
        fronted.header("x-bot-bottle-block").as_deref(),
        Some("host-mismatch")
    );

    let reasons: Vec<String> = traffic(&gw.audit_path)
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["decision"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or(""),
                e["status"]
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            "block not-in-allowlist 403",
            "block method-not-allowed 403",
            "block path-not-allowed 403",
            "block host-mismatch 403",
        ]
    );
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn passthrough_tunnels_are_decided_by_host_and_port() {
    let origin = origin().await;
    let gw = gateway(
        policy(RULES),
        &[("tunnel.test", origin), ("api.test", origin)],
    )
    .await;
    let proxy = gw.proxy_url();

    // `-p` makes curl CONNECT even for http://, so the tunnel carries plain HTTP here:
    // the CONNECT is allowed, but a passthrough tunnel must start with a ClientHello
    // (end-to-end passthrough TLS is in `holes.rs` and `mitm.rs`).
    let tunnelled = curl(&proxy, &["-p", "http://tunnel.test:9443/anything"]).await;
    assert!(!tunnelled.body.contains("origin saw"), "{}", tunnelled.body);

    let wrong_port = curl(&proxy, &["-p", "http://tunnel.test:9444/"]).await;
    assert_eq!(wrong_port.status, 403);
    assert!(
        wrong_port
            .headers
            .contains("x-bot-bottle-block: port-not-allowed"),
        "{}",
        wrong_port.headers
    );

    let denied = curl(&proxy, &["-p", "http://nowhere.test:443/"]).await;
    assert_eq!(denied.status, 403);
    assert!(
        denied
            .headers
            .contains("x-bot-bottle-block: not-in-allowlist"),
        "{}",
        denied.headers
    );

    // The tunnel's event is written when it closes.
    let mut events = Vec::new();
    for _ in 0..50 {
        events = traffic(&gw.audit_path);
        if events.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let summary: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {} {}:{}",
                e["decision"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or(""),
                e["host"].as_str().unwrap_or(""),
                e["port"]
            )
        })
        .collect();
    assert!(
        summary.contains(&"block port-not-allowed tunnel.test:9444".to_string()),
        "{summary:?}"
    );
    assert!(
        summary.contains(&"block not-in-allowlist nowhere.test:443".to_string()),
        "{summary:?}"
    );
    assert!(
        summary.contains(&"block opaque-tunnel-refused tunnel.test:9443".to_string()),
        "{summary:?}"
    );
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn refuses_upstreams_outside_loopback_and_private_ones_unless_allowed() {
    let origin = origin().await;
    let far: std::net::SocketAddr = "192.0.2.10:80".parse().expect("addr");
    let rules = format!(
        "rules:\n  - host: far.test\n  - host: 127.0.0.1\n    port: {port}\n  - host: localhost\n    port: {port}\n    dangerously_allow_private_upstreams: true\n",
        port = origin.port()
    );
    let gw = gateway(policy(&rules), &[("far.test", far)]).await;
    let proxy = gw.proxy_url();

    let far = curl(&proxy, &["http://far.test/"]).await;
    assert_eq!(far.status, 403);
    assert_eq!(
        far.header("x-bot-bottle-block").as_deref(),
        Some("upstream-not-loopback")
    );

    let private = curl(&proxy, &[&format!("http://127.0.0.1:{}/", origin.port())]).await;
    assert_eq!(private.status, 403);
    assert_eq!(
        private.header("x-bot-bottle-block").as_deref(),
        Some("private-upstream")
    );

    let allowed = curl(&proxy, &[&format!("http://localhost:{}/ok", origin.port())]).await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn serves_plain_proxy_http_on_a_unix_socket() {
    let origin = origin().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("run/egress.sock");
    let audit = dir.path().join("egress.jsonl");
    let handle = start_at(
        Listen::Unix(socket.clone()),
        policy(RULES),
        &audit,
        &[("api.test", origin)],
    )
    .await;
    assert_eq!(handle.local_addr(), &Listen::Unix(socket.clone()));

    let mut stream = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("connect socket");
    stream
        .write_all(
            b"GET http://api.test/v1/unix HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.ends_with("origin saw GET /v1/unix host=api.test body="),
        "{response}"
    );

    // A second gateway on a live socket is refused rather than stealing it.
    let mut config = bot_bottle_egress::GatewayConfig::new(
        Listen::Unix(socket.clone()),
        EgressPolicy::default(),
        dir.path().join("b.jsonl"),
    );
    config.loopback_only = true;
    let err = bot_bottle_egress::start(config)
        .await
        .expect_err("socket in use");
    assert!(
        matches!(err, bot_bottle_egress::GatewayError::SocketInUse { .. }),
        "{err}"
    );

    handle.shutdown().await;
    assert!(!socket.exists(), "the socket is removed on shutdown");
    assert!(tokio::net::UnixStream::connect(&socket).await.is_err());
}

#[tokio::test]
async fn live_policy_updates_apply_and_are_audited_and_shutdown_fails_closed() {
    let origin = origin().await;
    let gw = gateway(EgressPolicy::default(), &[("api.test", origin)]).await;
    let proxy = gw.proxy_url();
    assert_eq!(curl(&proxy, &["http://api.test/v1/a"]).await.status, 403);

    let mut update = policy(RULES);
    update.audit = Some(bot_bottle_core::policy::AuditLevel::All);
    gw.handle.update_policy(update).expect("valid update");
    assert_eq!(curl(&proxy, &["http://api.test/v1/a"]).await.status, 200);

    let invalid = policy("rules:\n  - host: \"\"\n");
    assert!(gw.handle.update_policy(invalid).is_err());
    assert_eq!(
        curl(&proxy, &["http://api.test/v1/a"]).await.status,
        200,
        "the old policy stays in force"
    );

    let addr = gw.handle.tcp_addr().expect("tcp");
    let audit_path = gw.audit_path.clone();
    gw.handle.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens after shutdown"
    );

    let kinds: Vec<String> = crate::support::audit_lines(&audit_path)
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["kind"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            "gateway gateway-started",
            "request not-in-allowlist",
            "policy-update policy-updated",
            "request allowed-by-rule",
            "request allowed-by-rule",
            "gateway gateway-stopped",
        ]
    );
    bot_bottle_egress::audit::verify(&audit_path).expect("chain verifies");
}

#[tokio::test]
async fn an_invalid_policy_never_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = bot_bottle_egress::GatewayConfig::new(
        Listen::Tcp("127.0.0.1:0".parse().expect("addr")),
        policy("rules:\n  - host: a.test\n    paths: [nope]\n"),
        dir.path().join("egress.jsonl"),
    );
    let err = bot_bottle_egress::start(config)
        .await
        .expect_err("invalid policy");
    assert!(
        matches!(err, bot_bottle_egress::GatewayError::Policy(_)),
        "{err}"
    );
}

#[tokio::test]
async fn a_gateway_that_cannot_write_its_audit_log_does_not_start() {
    // Writes to /dev/full fail with ENOSPC, even for root.
    let config = bot_bottle_egress::GatewayConfig::new(
        Listen::Tcp("127.0.0.1:0".parse().expect("addr")),
        policy(RULES),
        "/dev/full",
    );
    let err = bot_bottle_egress::start(config)
        .await
        .expect_err("no audit, no gateway");
    assert!(
        matches!(err, bot_bottle_egress::GatewayError::Audit(_)),
        "{err}"
    );
}
