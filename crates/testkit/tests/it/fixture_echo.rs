use bot_bottle_testkit::{FixtureConfig, Script, echo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut out),
    )
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn the_echo_origin_reflects_headers_in_body_headers_and_handshake() {
    let fixture = echo::start(FixtureConfig::new(Script::write_then_done("x", "y")))
        .await
        .unwrap();
    let reply = raw(
        fixture.addr(),
        "GET /anything?a=1 HTTP/1.1\r\nHost: echo.test\r\nX-Probe: value 1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("x-echo-x-probe: value 1\r\n"), "{reply}");
    let body = reply.split("\r\n\r\n").nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["headers"]["x-probe"], "value 1");
    assert_eq!(json["path"], "/anything?a=1");
    assert_eq!(json["method"], "GET");

    let handshake = raw(
        fixture.addr(),
        "GET /ws HTTP/1.1\r\nHost: echo.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Protocol: chosen, other\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(handshake.starts_with("HTTP/1.1 101"), "{handshake}");
    assert!(
        handshake.contains("sec-websocket-protocol: chosen\r\n"),
        "{handshake}"
    );
    assert!(
        handshake.contains("x-echo-sec-websocket-protocol: chosen, other\r\n"),
        "{handshake}"
    );
    assert_eq!(fixture.requests().len(), 2);
}
