//! A small MCP client for the streamable HTTP transport over plain TCP, without TLS:
//! what `bot-bottle tool forge TOOL [JSON]` uses in a bottle whose agent has no MCP
//! client (the URL is `$BOT_BOTTLE_FORGE_URL`, `http://127.0.0.1:3129/mcp`), and what
//! tests use.
//!
//! One exchange is `initialize`, `notifications/initialized`, then the request. A
//! response may come as JSON or as an SSE stream (`text/event-stream`, whose events may
//! include a priming event with no data and notifications before the answer); an
//! `Mcp-Session-Id` the server hands out is sent back, and the session is closed with a
//! `DELETE` at the end.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// The protocol version the client asks for; the server may answer with another.
pub const PROTOCOL_VERSION: &str = "2025-06-18";
/// How long one HTTP exchange may take (a forge call is bounded at 30 s on the host).
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// The largest response body read.
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// How much of an unexpected HTTP error body is quoted in an error.
const MAX_QUOTED: usize = 512;

/// What a tool call returned.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    /// The tool reported a failure (`isError`): a refusal, invalid arguments, a forge
    /// error.
    pub is_error: bool,
    /// The text blocks of the result, joined by newlines.
    pub text: String,
    /// The whole `result` object.
    pub raw: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "`{url}` is not an `http://HOST:PORT/PATH` url\nhint: the forge sidecar is at `$BOT_BOTTLE_FORGE_URL`, normally `http://127.0.0.1:3129/mcp`"
    )]
    Url { url: String },
    #[error(
        "cannot connect to the forge sidecar at `{authority}`\nhint: this works only inside a bottle started for a forge run, where the shim forwards the port"
    )]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP exchange with `{url}` failed")]
    Http {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("`{method}` to `{url}` was answered {status}: {body}")]
    Status {
        url: String,
        method: String,
        status: u16,
        body: String,
    },
    #[error("the answer to `{method}` is not a JSON-RPC response: {problem}")]
    Protocol { method: String, problem: String },
    #[error("the server refused `{method}` (JSON-RPC error {code}): {message}")]
    Rpc {
        method: String,
        code: i64,
        message: String,
    },
    #[error("`{method}` got no answer within {timeout:?}")]
    Timeout { method: String, timeout: Duration },
}

/// The tools the server offers: the `result` of `tools/list` (`{"tools": [...]}`).
///
/// # Errors
/// The URL is not plain http, the server cannot be reached, or it answers with an
/// HTTP or JSON-RPC error.
pub async fn list_tools(url: &str) -> Result<Value, ClientError> {
    let mut session = Session::open(url).await?;
    let result = session.request("tools/list", json!({})).await;
    session.close().await;
    result
}

/// Calls `tool` with `arguments` (a JSON object). A tool that fails (a refusal,
/// invalid arguments) is a [`ToolOutput`] with `is_error`, not an error.
///
/// # Errors
/// As [`list_tools`]; an unknown tool is a [`ClientError::Rpc`].
pub async fn call_tool(url: &str, tool: &str, arguments: Value) -> Result<ToolOutput, ClientError> {
    let mut session = Session::open(url).await?;
    let result = session
        .request("tools/call", json!({"name": tool, "arguments": arguments}))
        .await;
    session.close().await;
    let raw = result?;
    let is_error = raw.get("isError").and_then(Value::as_bool).unwrap_or(false);
    let text = raw
        .get("content")
        .and_then(Value::as_array)
        .map(|blocks| {
            blocks
                .iter()
                .filter(|block| block.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|block| block.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .ok_or_else(|| ClientError::Protocol {
            method: "tools/call".into(),
            problem: "the result has no `content` list".into(),
        })?;
    Ok(ToolOutput {
        is_error,
        text,
        raw,
    })
}

struct Session {
    url: String,
    authority: String,
    path: String,
    session_id: Option<String>,
    protocol_version: Option<String>,
    next_id: u64,
}

impl Session {
    async fn open(url: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::Url { url: url.into() };
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("http") {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?;
        if authority.as_str().contains('@') {
            return Err(bad());
        }
        let authority = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.host()),
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let mut session = Session {
            url: url.to_owned(),
            authority,
            path,
            session_id: None,
            protocol_version: None,
            next_id: 1,
        };
        let init = session
            .request(
                "initialize",
                json!({
                    "protocolVersion": PROTOCOL_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "bot-bottle-tool", "version": env!("CARGO_PKG_VERSION")},
                }),
            )
            .await?;
        session.protocol_version = Some(
            init.get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or(PROTOCOL_VERSION)
                .to_owned(),
        );
        session
            .notify("notifications/initialized", json!({}))
            .await?;
        Ok(session)
    }

    /// Sends a request and returns its `result`.
    async fn request(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let (status, headers, bytes) = self.post(method, &body).await?;
        if !status.is_success() {
            return Err(self.status_error(method, status, &bytes));
        }
        if let Some(session_id) = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) {
            self.session_id = Some(session_id.to_owned());
        }
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let protocol = |problem: String| ClientError::Protocol {
            method: method.into(),
            problem,
        };
        let message = if content_type.starts_with("text/event-stream") {
            sse_data(&bytes)
                .into_iter()
                .filter_map(|data| serde_json::from_str::<Value>(&data).ok())
                .find(|message| message.get("id") == Some(&json!(id)))
                .ok_or_else(|| protocol("the event stream ended without the answer".into()))?
        } else if content_type.starts_with("application/json") {
            serde_json::from_slice::<Value>(&bytes)
                .map_err(|err| protocol(format!("the body is not JSON ({err})")))?
        } else {
            return Err(protocol(format!(
                "unexpected content type `{content_type}`"
            )));
        };
        if let Some(error) = message.get("error") {
            return Err(ClientError::Rpc {
                method: method.into(),
                code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: error
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("(no message)")
                    .to_owned(),
            });
        }
        message
            .get("result")
            .cloned()
            .ok_or_else(|| protocol("it has neither `result` nor `error`".into()))
    }

    async fn notify(&mut self, method: &str, params: Value) -> Result<(), ClientError> {
        let body = json!({"jsonrpc": "2.0", "method": method, "params": params});
        let (status, _, bytes) = self.post(method, &body).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(self.status_error(method, status, &bytes))
        }
    }

    /// Ends a session the server opened; the server forgets it after a while anyway,
    /// so failures are ignored.
    async fn close(self) {
        let Some(session_id) = self.session_id.clone() else {
            return;
        };
        let request = Request::builder()
            .method(Method::DELETE)
            .uri(&self.path)
            .header(header::HOST, &self.authority)
            .header("mcp-session-id", session_id)
            .body(Full::new(Bytes::new()));
        if let Ok(request) = request {
            let _ = self.send("DELETE", request).await;
        }
    }

    fn status_error(&self, method: &str, status: StatusCode, body: &[u8]) -> ClientError {
        let text = String::from_utf8_lossy(&body[..body.len().min(MAX_QUOTED)]).into_owned();
        ClientError::Status {
            url: self.url.clone(),
            method: method.into(),
            status: status.as_u16(),
            body: text,
        }
    }

    async fn post(
        &self,
        method: &str,
        body: &Value,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), ClientError> {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(&self.path)
            .header(header::HOST, &self.authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json, text/event-stream");
        if let Some(version) = &self.protocol_version {
            builder = builder.header("mcp-protocol-version", version);
        }
        if let Some(session_id) = &self.session_id {
            builder = builder.header("mcp-session-id", session_id);
        }
        let request = builder
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|err| ClientError::Protocol {
                method: method.into(),
                problem: format!("cannot build the request ({err})"),
            })?;
        self.send(method, request).await
    }

    async fn send(
        &self,
        method: &str,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), ClientError> {
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|source| ClientError::Connect {
                    authority: self.authority.clone(),
                    source,
                })?;
            let http_err = |source| ClientError::Http {
                url: self.url.clone(),
                source,
            };
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(http_err)?;
            let driver = tokio::spawn(connection);
            let response = sender.send_request(request).await.map_err(http_err)?;
            let (parts, body) = response.into_parts();
            let bytes = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|err| ClientError::Protocol {
                    method: method.into(),
                    problem: format!("cannot read the body ({err})"),
                })?
                .to_bytes();
            drop(sender);
            driver.abort();
            Ok((parts.status, parts.headers, bytes))
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                method: method.into(),
                timeout: TIMEOUT,
            })?
    }
}

/// The `data` of each event in an SSE body, in order; events without data (a priming
/// event, a keep-alive comment) are left out.
fn sse_data(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            if let Some(done) = data.take() {
                events.push(done);
            }
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            match data.as_mut() {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => data = Some(value.to_owned()),
            }
        }
    }
    if let Some(done) = data {
        events.push(done);
    }
    events.into_iter().filter(|data| !data.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_and_priming_skipped() {
        let body = b"id: 0\nretry: 3000\ndata:\n\n: keep-alive\n\nevent: message\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\ndata: last";
        assert_eq!(
            sse_data(body),
            vec!["{\"a\":\n1}".to_owned(), "last".to_owned()]
        );
    }
}
