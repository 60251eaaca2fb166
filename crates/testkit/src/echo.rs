//! An httpbin-style reflecting origin: it answers every request with what it received,
//! as the kind of endpoint (httpbin's `/anything`, an error page that quotes a header, a
//! websocket server that confirms the chosen subprotocol) that would hand a credential
//! back to whoever sent it. The custody tests point a credential's host at it.
//!
//! - Any request: `200` with a JSON body `{"method", "path", "headers": {name: value}}`
//!   and each request header repeated as an `x-echo-<name>` response header.
//! - A websocket upgrade: `101` whose `Sec-WebSocket-Protocol` is the first subprotocol
//!   the client offered (as a server that accepts it answers), with the same `x-echo-*`
//!   headers. The connection ends after the `101`: only the handshake is reflected.

use http::header::{HeaderName, HeaderValue};
use http::{Response, StatusCode, header};
use serde_json::{Map, Value, json};

use crate::server::{
    self, Body, FixtureConfig, FixtureError, FixtureHandle, Kind, RecordedRequest,
};

/// Starts a reflecting origin (the script in `config` is not used).
///
/// # Errors
/// When the address cannot be bound or the TLS identity is unusable.
pub async fn start(config: FixtureConfig) -> Result<FixtureHandle, FixtureError> {
    server::start(Kind::Echo, config).await
}

pub(crate) fn respond(request: &RecordedRequest) -> Response<Body> {
    let mut headers = Map::new();
    for (name, value) in &request.headers {
        headers.insert(name.clone(), Value::String(value.clone()));
    }
    let mut response = if server::wants_websocket(request) {
        let mut response = server::json_response(StatusCode::SWITCHING_PROTOCOLS, &json!({}));
        let out = response.headers_mut();
        out.remove(header::CONTENT_TYPE);
        out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(protocol) = request
            .header("sec-websocket-protocol")
            .and_then(|offered| offered.split(',').next())
            .and_then(|first| HeaderValue::from_str(first.trim()).ok())
        {
            out.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        response
    } else {
        server::json_response(
            StatusCode::OK,
            &json!({"method": request.method, "path": request.path, "headers": headers}),
        )
    };
    for (name, value) in &request.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(format!("x-echo-{name}").as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}
