use std::time::{Duration, Instant};

use bot_bottle_egress::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{TestPki, curl, policy, tls_gateway_with, tls_origin, traffic};

fn short_limits() -> Limits {
    Limits {
        header_read_timeout: Duration::from_millis(400),
        handshake_timeout: Duration::from_millis(400),
        body_read_timeout: Duration::from_millis(400),
        max_connections: 1024,
        ..Limits::default()
    }
}

/// Reads until the peer closes; returns how long that took.
async fn time_to_close(stream: &mut tokio::net::TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the gateway kept a slow client open for 10 s"),
        }
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_the_connection_limit_holds() {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test"], None).await;
    let (gw, ca) = tls_gateway_with(
        policy("rules:\n  - host: api.test\n"),
        &[("api.test", origin)],
        &pki,
        vec![],
        |config| config.limits = short_limits(),
    )
    .await;
    let addr = gw.handle.tcp_addr().expect("tcp");

    // A request head that never finishes.
    let mut slow_head = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow_head
        .write_all(b"GET http://api.test/ HTTP/1.1\r\nHost: api")
        .await
        .expect("write");
    assert!(time_to_close(&mut slow_head).await < Duration::from_secs(5));

    // A CONNECT whose tunnel never starts TLS.
    let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    silent
        .write_all(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
        .await
        .expect("write");
    assert!(time_to_close(&mut silent).await < Duration::from_secs(5));
    let timeouts: Vec<serde_json::Value> = traffic(&gw.audit_path)
        .into_iter()
        .filter(|e| e["reason"] == "tls-handshake-timeout")
        .collect();
    assert_eq!(timeouts.len(), 1, "{:?}", traffic(&gw.audit_path));

    // A body that trickles in too slowly.
    let mut trickle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    trickle
        .write_all(
            b"POST http://api.test/x HTTP/1.1\r\nHost: api.test\r\nContent-Length: 100\r\n\r\nabc",
        )
        .await
        .expect("write");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");

    let ok = curl(
        &gw.proxy_url(),
        &[
            "--cacert",
            ca.to_str().expect("utf8"),
            "https://api.test/fine",
        ],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn past_the_connection_limit_new_clients_are_dropped_at_once() {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test"], None).await;
    // Idle clients are held for 10 s, so only the limit can explain a quick close.
    let (gw, ca) = tls_gateway_with(
        policy("rules:\n  - host: api.test\n"),
        &[("api.test", origin)],
        &pki,
        vec![],
        |config| {
            config.limits = Limits {
                header_read_timeout: Duration::from_secs(10),
                max_connections: 3,
                ..Limits::default()
            };
        },
    )
    .await;
    let addr = gw.handle.tcp_addr().expect("tcp");
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
    assert!(time_to_close(&mut extra).await < Duration::from_secs(5));
    // Closing the idle ones frees their slots (as soon as the gateway sees the EOFs).
    drop(idle);
    let mut status = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = curl(
            &gw.proxy_url(),
            &[
                "--cacert",
                ca.to_str().expect("utf8"),
                "https://api.test/fine",
            ],
        )
        .await
        .status;
        if status == 200 {
            break;
        }
    }
    assert_eq!(status, 200);
    gw.handle.shutdown().await;
}
