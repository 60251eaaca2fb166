//! Custody against an origin that reflects what it is sent: the real value is written only
//! into the credential's `inject` slot, and every route back into the bottle (headers, a
//! `101`'s headers, a custom reason phrase, a compressed body) is scrubbed.

use std::io::Write as _;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bot_bottle_core::credential::Inject;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::mitm::{credential, read_head, sha256, switching_to_websocket, tls_through};
use crate::support::{Handler, TestGateway, TestPki, audit_lines, policy, tls_gateway, tls_origin};

/// Built at run time so no secret-shaped literal sits in the repository.
fn real_token() -> String {
    format!("sk-proj-{}", "CUSTODYechoREALvalue0123456789abcdef")
}

/// An httpbin-style origin: every request header comes back as an `x-echo-<name>` response
/// header and a body line, and the `authorization` it received becomes the reason phrase.
/// `/gzip` compresses the answer whatever the request accepted; `/bad-gzip` claims gzip
/// and sends garbage; `/ws` answers a websocket upgrade with the same echoes in its `101`.
fn reflecting_origin() -> Handler {
    std::sync::Arc::new(|mut req: hyper::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let mut lines = String::new();
            let mut echoes = Vec::new();
            for (name, value) in req.headers() {
                lines.push_str(&format!(
                    "{name}: {}\n",
                    String::from_utf8_lossy(value.as_bytes())
                ));
                echoes.push((format!("x-echo-{name}"), value.clone()));
            }
            let authorization = req
                .headers()
                .get("authorization")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default();
            let path = req.uri().path().to_string();
            let mut response = if path == "/ws" {
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(upgraded) = upgrade.await {
                        let mut io = hyper_util::rt::TokioIo::new(upgraded);
                        let mut sink = [0u8; 64];
                        while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
                    }
                });
                switching_to_websocket()
            } else if path == "/gzip" || path == "/identity-then-gzip" {
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                encoder.write_all(lines.as_bytes()).expect("gzip");
                let mut response =
                    hyper::Response::new(Full::new(Bytes::from(encoder.finish().expect("gzip"))));
                if path == "/identity-then-gzip" {
                    // Two lines: a scrubber that reads only the first sees `identity`.
                    response
                        .headers_mut()
                        .append("content-encoding", HeaderValue::from_static("identity"));
                }
                response
                    .headers_mut()
                    .append("content-encoding", HeaderValue::from_static("gzip"));
                response
            } else if path == "/gzip-bomb" {
                // 20 MiB of zeros in about 20 KB: over the 8 MiB cap once decoded.
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                let zeros = vec![0u8; 1 << 20];
                for _ in 0..20 {
                    encoder.write_all(&zeros).expect("gzip");
                }
                let mut response =
                    hyper::Response::new(Full::new(Bytes::from(encoder.finish().expect("gzip"))));
                response
                    .headers_mut()
                    .insert("content-encoding", HeaderValue::from_static("gzip"));
                response
            } else if path == "/bad-gzip" {
                let mut body = b"\x1f\x8b not really gzip ".to_vec();
                body.extend_from_slice(lines.as_bytes());
                let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
                response
                    .headers_mut()
                    .insert("content-encoding", HeaderValue::from_static("gzip"));
                response
            } else {
                hyper::Response::new(Full::new(Bytes::from(lines)))
            };
            for (name, value) in echoes {
                if let Ok(name) = hyper::header::HeaderName::from_bytes(name.as_bytes()) {
                    response.headers_mut().append(name, value);
                }
            }
            let digest = sha256(&String::from_utf8_lossy(&authorization));
            if let Ok(value) = HeaderValue::from_str(&digest) {
                response
                    .headers_mut()
                    .insert("x-authorization-sha256", value);
            }
            if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(authorization) {
                response.extensions_mut().insert(phrase);
            }
            response
        })
    })
}

/// Sends one raw HTTP/1.1 request through an intercepted tunnel and returns every byte
/// that came back into the "bottle".
async fn exchange(proxy: std::net::SocketAddr, ca: &std::path::Path, request: &str) -> String {
    let mut tls = tls_through(proxy, "allowed.test", ca).await;
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut received)).await;
    dechunk(&String::from_utf8_lossy(&received))
}

/// The head as received, then a chunked body joined back together (so a line the
/// scrubber's chunking split is one line again).
fn dechunk(raw: &str) -> String {
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        return raw.to_string();
    };
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return raw.to_string();
    }
    let mut out = format!("{head}\r\n\r\n");
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// Every form in which `secret` could come back and be recovered by the agent: raw, and
/// base64 of it behind any short prefix (all three alignments).
fn assert_no_trace(received: &str, secret: &str, what: &str) {
    assert!(!received.contains(secret), "{what}: raw secret: {received}");
    for prefix in ["", "z", "zz", "zz:", "bot:"] {
        let encoded = STANDARD.encode(format!("{prefix}{secret}"));
        // The stable middle of the encoding, whatever follows it.
        let middle = &encoded[4..encoded.len() - 4];
        assert!(
            !received.contains(middle),
            "{what}: base64 of `{prefix}`+secret came back: {received}"
        );
    }
}

/// A gateway whose bearer credential `model` is for `allowed.test`, a reflecting origin.
struct Reflecting {
    gw: TestGateway,
    ca: std::path::PathBuf,
    token: String,
    placeholder: String,
    proxy: std::net::SocketAddr,
}

async fn reflecting_gateway() -> Reflecting {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["allowed.test"], Some(reflecting_origin())).await;
    let token = real_token();
    let bearer = credential("model", "allowed.test", Inject::Bearer, &token);
    let placeholder = bearer.placeholder().to_string();
    let (gw, ca) = tls_gateway(
        policy("rules:\n  - host: allowed.test\n"),
        &[("allowed.test", origin)],
        &pki,
        vec![bearer],
    )
    .await;
    let proxy = gw.handle.tcp_addr().expect("tcp");
    Reflecting {
        gw,
        ca,
        token,
        placeholder,
        proxy,
    }
}

#[tokio::test]
async fn a_placeholder_outside_the_inject_slot_stays_a_placeholder() {
    let Reflecting {
        gw,
        ca,
        token,
        placeholder,
        proxy,
    } = reflecting_gateway().await;

    // The attack: a Basic value holding the placeholder, in a header the bottle chose.
    let smuggled = format!("Basic {}", STANDARD.encode(format!("zz:{placeholder}")));
    let request = format!(
        "GET /anything?q={placeholder} HTTP/1.1\r\nHost: allowed.test\r\nAuthorization: Bearer {placeholder}\r\nX-E: {smuggled}\r\nX-Raw: {placeholder}\r\nConnection: close\r\n\r\n"
    );
    let received = exchange(proxy, &ca, &request).await;
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    assert_no_trace(&received, &token, "reflected request");
    assert!(
        received.contains(&sha256(&format!("Bearer {token}"))),
        "the origin received the token in the slot: {received}"
    );
    // The origin saw the placeholder, untouched, in every slot but Authorization.
    assert!(
        received.contains(&format!("x-e: {smuggled}\n")),
        "{received}"
    );
    assert!(
        received.contains(&format!("x-raw: {placeholder}\n")),
        "{received}"
    );
    // Authorization, the bearer slot, carried the real token: the echo of it comes back
    // as the placeholder in the body, the headers and the reason phrase alike.
    assert!(
        received.contains(&format!("authorization: Bearer {placeholder}\n")),
        "{received}"
    );
    assert!(
        received.starts_with(&format!("HTTP/1.1 200 Bearer {placeholder}\r\n")),
        "the reason phrase: {received}"
    );
    assert!(
        received.to_ascii_lowercase().contains(&format!(
            "x-echo-authorization: bearer {}",
            placeholder.to_ascii_lowercase()
        )),
        "{received}"
    );

    let events = audit_lines(&gw.audit_path);
    let event = events
        .iter()
        .find(|e| e["path"] == "/anything")
        .expect("audited");
    let detail = event["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("placeholder left as is")
            && detail.contains("header:x-e (model)")
            && detail.contains("header:x-raw (model)")
            && detail.contains("query (model)"),
        "{event}"
    );
    let log = std::fs::read_to_string(&gw.audit_path).expect("audit");
    assert!(!log.contains(&token), "the audit log holds the token");
    assert!(
        !log.contains(&placeholder),
        "the audit log holds a placeholder"
    );
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn a_compressed_echo_is_decoded_and_scrubbed_or_refused() {
    let Reflecting {
        gw,
        ca,
        token,
        placeholder,
        proxy,
    } = reflecting_gateway().await;

    let received = exchange(
        proxy,
        &ca,
        "GET /gzip HTTP/1.1\r\nHost: allowed.test\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    assert!(
        !received.to_ascii_lowercase().contains("content-encoding"),
        "the body comes back decoded: {received}"
    );
    assert!(
        received.contains(&format!("authorization: Bearer {placeholder}\n")),
        "the decoded body is scrubbed: {received}"
    );
    assert_no_trace(&received, &token, "gzip echo");

    let split = exchange(
        proxy,
        &ca,
        "GET /identity-then-gzip HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(split.starts_with("HTTP/1.1 200"), "{split}");
    assert!(
        split.contains(&format!("authorization: Bearer {placeholder}\n")),
        "both coding lines are undone before scrubbing: {split}"
    );
    assert_no_trace(&split, &token, "identity-then-gzip echo");

    let bomb = exchange(
        proxy,
        &ca,
        "GET /gzip-bomb HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(bomb.starts_with("HTTP/1.1 502"), "{bomb:.300}");
    assert!(
        bomb.to_ascii_lowercase()
            .contains("x-bot-bottle-error: undecodable-response"),
        "{bomb:.300}"
    );
    assert!(bomb.len() < 4096, "the bomb's bytes reached the bottle");

    let refused = exchange(
        proxy,
        &ca,
        "GET /bad-gzip HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 502"), "{refused}");
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("x-bot-bottle-error: undecodable-response"),
        "{refused}"
    );
    assert_no_trace(&refused, &token, "undecodable echo");
    let events = audit_lines(&gw.audit_path);
    assert!(
        events
            .iter()
            .any(|e| e["path"] == "/bad-gzip" && e["reason"] == "undecodable-response"),
        "{events:?}"
    );
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn a_switching_protocols_answer_is_scrubbed() {
    let Reflecting {
        gw,
        ca,
        token,
        placeholder,
        proxy,
    } = reflecting_gateway().await;
    let mut ws = tls_through(proxy, "allowed.test", &ca).await;
    ws.write_all(
        format!("GET /ws HTTP/1.1\r\nHost: allowed.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: {placeholder}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut ws))
        .await
        .expect("101 arrives");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_no_trace(&head, &token, "101 head");
    // The subprotocol was not the slot: it went out, and came back, as the placeholder.
    assert!(
        head.to_ascii_lowercase().contains(&format!(
            "x-echo-sec-websocket-protocol: {}",
            placeholder.to_ascii_lowercase()
        )),
        "{head}"
    );
    // Authorization was: its echo in the 101 is scrubbed.
    assert!(
        head.to_ascii_lowercase().contains(&format!(
            "x-echo-authorization: bearer {}",
            placeholder.to_ascii_lowercase()
        )),
        "{head}"
    );
    // The origin really received the token in the slot.
    assert!(head.contains(&sha256(&format!("Bearer {token}"))), "{head}");
    drop(ws);
    gw.handle.shutdown().await;
}
