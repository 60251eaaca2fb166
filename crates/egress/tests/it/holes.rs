//! Smaller holes: method-override headers, IPv6 forms that embed a private IPv4
//! address, and passthrough tunnels whose ClientHello names another host.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    TestPki, curl, gateway, origin, policy, raw_connect, tls_gateway, tls_origin, traffic,
    wait_for_reason,
};

/// Waits until `n` events have `reason` (a passthrough tunnel's event is written when
/// it closes, which may be after the test has moved on).
async fn wait_for_count(path: &std::path::Path, reason: &str, n: usize) {
    for _ in 0..250 {
        if traffic(path)
            .iter()
            .filter(|e| e["reason"] == reason)
            .count()
            >= n
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} `{reason}` events in {:?}", traffic(path));
}

#[tokio::test]
async fn path_override_headers_are_decided_as_the_path_they_name() {
    let origin = origin().await;
    let rules = "rules:\n  - host: api.test\n    paths: [\"/v1/*\"]\n";
    let gw = gateway(policy(rules), &[("api.test", origin)]).await;
    let proxy = gw.proxy_url();

    // IIS URL Rewrite and older Symfony serve X-Original-URL / X-Rewrite-URL, not the path.
    for header in ["X-Original-URL: /admin/keys", "X-Rewrite-URL: /v2/secret"] {
        let rewritten = curl(&proxy, &["-H", header, "http://api.test/v1/items"]).await;
        assert_eq!(rewritten.status, 403, "{header}: {}", rewritten.body);
        assert_eq!(
            rewritten.header("x-bot-bottle-block").as_deref(),
            Some("path-override-not-allowed"),
            "{header}"
        );
        assert!(!rewritten.body.contains("origin saw"), "{}", rewritten.body);
    }
    let full_url = curl(
        &proxy,
        &[
            "-H",
            "X-Original-URL: http://evil.test/x",
            "http://api.test/v1/items",
        ],
    )
    .await;
    assert_eq!(
        full_url.header("x-bot-bottle-block").as_deref(),
        Some("bad-path-override")
    );
    // Naming an allowed path is harmless.
    let same = curl(
        &proxy,
        &[
            "-H",
            "X-Original-URL: /v1/other?x=1",
            "http://api.test/v1/items",
        ],
    )
    .await;
    assert_eq!(same.status, 200, "{}", same.body);
    let event = wait_for_reason(&gw.audit_path, "path-override-not-allowed").await;
    assert_eq!(event["path"], "/v1/items");
    assert!(
        event["detail"]
            .as_str()
            .is_some_and(|d| d.contains("path override [\"/admin/keys\"]")),
        "{event}"
    );
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn method_override_headers_are_decided_as_the_method_they_name() {
    let origin = origin().await;
    let rules = "rules:\n  - host: api.test\n    methods: [POST]\n    paths: [\"/v1/*\"]\n";
    let gw = gateway(policy(rules), &[("api.test", origin)]).await;
    let proxy = gw.proxy_url();

    let plain = curl(&proxy, &["-d", "x", "http://api.test/v1/items/1"]).await;
    assert_eq!(plain.status, 200, "{}", plain.body);

    for header in [
        "X-HTTP-Method-Override: DELETE",
        "X-HTTP-Method: delete",
        "X-Method-Override: PUT",
    ] {
        let overridden = curl(
            &proxy,
            &["-d", "x", "-H", header, "http://api.test/v1/items/1"],
        )
        .await;
        assert_eq!(overridden.status, 403, "{header}: {}", overridden.body);
        assert_eq!(
            overridden.header("x-bot-bottle-block").as_deref(),
            Some("method-override-not-allowed"),
            "{header}"
        );
        assert!(
            !overridden.body.contains("origin saw"),
            "{}",
            overridden.body
        );
    }

    // Naming the real method is harmless; naming two methods is refused.
    let same = curl(
        &proxy,
        &[
            "-d",
            "x",
            "-H",
            "X-HTTP-Method-Override: POST",
            "http://api.test/v1/items/1",
        ],
    )
    .await;
    assert_eq!(same.status, 200, "{}", same.body);
    let two = curl(
        &proxy,
        &[
            "-d",
            "x",
            "-H",
            "X-HTTP-Method-Override: POST",
            "-H",
            "X-HTTP-Method: DELETE",
            "http://api.test/v1/items/1",
        ],
    )
    .await;
    assert_eq!(two.status, 403);
    assert_eq!(
        two.header("x-bot-bottle-block").as_deref(),
        Some("bad-method-override")
    );

    let blocks: Vec<serde_json::Value> = traffic(&gw.audit_path)
        .into_iter()
        .filter(|e| e["decision"] == "block")
        .collect();
    assert_eq!(blocks.len(), 4, "{blocks:?}");
    let first = &blocks[0];
    assert_eq!(first["reason"], "method-override-not-allowed");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/v1/items/1");
    assert_eq!(first["status"], 403);
    assert_eq!(first["detail"], "method override [\"DELETE\"]");
    assert_eq!(blocks[3]["reason"], "bad-method-override");
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn path_parameters_and_double_encoded_dots_are_ambiguous_paths() {
    let origin = origin().await;
    let rules = "rules:\n  - host: api.test\n    paths: [\"/v1/*\"]\n";
    let gw = gateway(policy(rules), &[("api.test", origin)]).await;
    let proxy = gw.proxy_url();
    for path in ["/v1/..;/admin", "/v1/%252e%252e/admin", "/v1/%252E./admin"] {
        let result = curl(&proxy, &["--path-as-is", &format!("http://api.test{path}")]).await;
        assert_eq!(result.status, 403, "{path}: {}", result.body);
        assert_eq!(
            result.header("x-bot-bottle-block").as_deref(),
            Some("ambiguous-path"),
            "{path}"
        );
    }
    let events = traffic(&gw.audit_path);
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0]["path"], "/v1/..;/admin");
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn ipv6_forms_that_embed_a_private_ipv4_address_are_private_upstreams() {
    let origin = origin().await;
    let port = origin.port();
    // Written as curl sends them (inet_ntop's spelling), which rules match textually.
    let hosts = [
        "::ffff:0:7f00:1",             // SIIT ::ffff:0:127.0.0.1
        "::127.0.0.1",                 // IPv4-compatible
        "64:ff9b::7f00:1",             // NAT64
        "2002:7f00:1::1",              // 6to4
        "2001:0:4136:e378::80ff:fffe", // Teredo, client 127.0.0.1
    ];
    let mut rules = String::from("rules:\n");
    for host in hosts {
        rules.push_str(&format!("  - host: \"{host}\"\n    port: {port}\n"));
    }
    let gw = gateway(policy(&rules), &[]).await;
    let proxy = gw.proxy_url();
    for host in hosts {
        let result = curl(&proxy, &["--globoff", &format!("http://[{host}]:{port}/")]).await;
        assert_eq!(result.status, 403, "{host}: {}", result.body);
        assert_eq!(
            result.header("x-bot-bottle-block").as_deref(),
            Some("private-upstream"),
            "{host}"
        );
    }
    // The same through CONNECT.
    let result = curl(
        &proxy,
        &[
            "--globoff",
            "-k",
            &format!("https://[::ffff:0:7f00:1]:{port}/"),
        ],
    )
    .await;
    assert_eq!(result.status, 403, "{}", result.body);
    let refused: Vec<String> = traffic(&gw.audit_path)
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(refused, vec!["private-upstream"; hosts.len() + 1]);
    gw.handle.shutdown().await;
}

/// A TLS client that trusts the test PKI (the origin's own, as a pinned client would).
fn tls_client(pki: &TestPki) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in pki.roots() {
        roots.add(cert).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Sends one HTTP/1.1 GET over `tls` and returns the whole answer.
async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut tls: S,
    host: &str,
) -> String {
    tls.write_all(
        format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write request");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn passthrough_tunnels_must_name_the_connect_host_in_their_client_hello() {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["pinned.test", "other.test", "127.0.0.1"], None).await;
    let rules = format!(
        "rules:\n  - host: pinned.test\n    passthrough: true\n  - host: 127.0.0.1\n    port: {}\n    passthrough: true\n    dangerously_allow_private_upstreams: true\n",
        origin.port()
    );
    let (gw, _ca) = tls_gateway(
        policy(&rules),
        &[("pinned.test", origin), ("other.test", origin)],
        &pki,
        vec![],
    )
    .await;
    let proxy = gw.handle.tcp_addr().expect("tcp");
    let connector = tls_client(&pki);
    let name = |n: &str| rustls::pki_types::ServerName::try_from(n.to_owned()).expect("name");

    // The matching name works end to end, with the origin's own certificate.
    let tunnel = raw_connect(proxy, "pinned.test:443").await;
    let tls = connector
        .connect(name("pinned.test"), tunnel)
        .await
        .expect("TLS to the passthrough host");
    let answer = get(tls, "pinned.test").await;
    assert!(answer.contains("GET /hello"), "{answer}");
    let allowed = wait_for_reason(&gw.audit_path, "allowed-passthrough").await;
    assert_eq!(allowed["detail"], "passthrough: not intercepted");
    assert!(allowed["bytes_up"].as_u64().unwrap_or(0) > 0, "{allowed}");

    // A ClientHello naming another host (which the origin would serve) is cut off.
    let tunnel = raw_connect(proxy, "pinned.test:443").await;
    assert!(
        connector.connect(name("other.test"), tunnel).await.is_err(),
        "SNI fronting through a passthrough tunnel must fail"
    );
    let fronted = wait_for_reason(&gw.audit_path, "sni-mismatch").await;
    assert_eq!(fronted["decision"], "block");
    assert_eq!(fronted["host"], "pinned.test");
    assert_eq!(fronted["rule"], 0);
    assert!(
        fronted["detail"]
            .as_str()
            .unwrap_or("")
            .contains("\"other.test\""),
        "{fronted}"
    );

    // No server name at all, for a named host: cut off too.
    let tunnel = raw_connect(proxy, "pinned.test:443").await;
    assert!(
        connector.connect(name("127.0.0.1"), tunnel).await.is_err(),
        "a ClientHello without SNI must fail"
    );

    // An IP-literal CONNECT takes a ClientHello without a server name …
    let target = format!("127.0.0.1:{}", origin.port());
    let tunnel = raw_connect(proxy, &target).await;
    let tls = connector
        .connect(name("127.0.0.1"), tunnel)
        .await
        .expect("TLS to the IP-literal passthrough host");
    assert!(get(tls, "127.0.0.1").await.contains("GET /hello"));
    wait_for_count(&gw.audit_path, "allowed-passthrough", 2).await;
    // … but not one naming a host.
    let tunnel = raw_connect(proxy, &target).await;
    assert!(connector.connect(name("other.test"), tunnel).await.is_err());

    // Bytes that are not a ClientHello never reach the origin.
    let mut tunnel = raw_connect(proxy, "pinned.test:443").await;
    tunnel
        .write_all(b"GET / HTTP/1.1\r\nHost: pinned.test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut buf)).await;
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    let opaque = wait_for_reason(&gw.audit_path, "opaque-tunnel-refused").await;
    assert_eq!(opaque["host"], "pinned.test");

    let reasons: Vec<String> = traffic(&gw.audit_path)
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["decision"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            "allow allowed-passthrough",
            "block sni-mismatch",
            "block sni-mismatch",
            "allow allowed-passthrough",
            "block sni-mismatch",
            "block opaque-tunnel-refused",
        ]
    );
    gw.handle.shutdown().await;
}
