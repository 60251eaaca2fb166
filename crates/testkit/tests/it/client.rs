//! A minimal HTTP/1.1 client over plain TCP or rustls, enough to talk to a fixture.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("the reply is JSON")
    }

    /// `(event line, data JSON)` for each SSE event.
    pub fn events(&self) -> Vec<(Option<String>, Value)> {
        self.body
            .split("\n\n")
            .filter(|chunk| !chunk.trim().is_empty())
            .map(|chunk| {
                let event = chunk
                    .lines()
                    .find_map(|line| line.strip_prefix("event: "))
                    .map(str::to_owned);
                let data = chunk
                    .lines()
                    .find_map(|line| line.strip_prefix("data: "))
                    .expect("every event has a data line");
                (event, serde_json::from_str(data).expect("data is JSON"))
            })
            .collect()
    }
}

pub async fn post(base_url: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    send("POST", base_url, path, headers, body.to_string(), None).await
}

pub async fn send(
    method: &str,
    base_url: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
    root: Option<CertificateDer<'static>>,
) -> Reply {
    let authority = base_url
        .split("://")
        .nth(1)
        .expect("base url has a scheme")
        .to_owned();
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", &authority)
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    let tcp = TcpStream::connect(&authority)
        .await
        .expect("connect to fixture");
    let response = match root {
        None => {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .expect("http handshake");
            tokio::spawn(connection);
            sender.send_request(request).await.expect("response")
        }
        Some(root) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut roots = rustls::RootCertStore::empty();
            roots.add(root).expect("add root");
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let host = authority.split(':').next().expect("host").to_owned();
            let name = ServerName::try_from(host).expect("server name");
            let tls = connector.connect(name, tcp).await.expect("tls handshake");
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("http handshake");
            tokio::spawn(connection);
            sender.send_request(request).await.expect("response")
        }
    };
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().expect("ascii").to_owned())
        .unwrap_or_default();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        content_type,
        body: String::from_utf8(bytes.to_vec()).expect("utf-8 body"),
    }
}
