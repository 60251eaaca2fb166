use bot_bottle_testkit::{FixtureConfig, Script, TlsIdentity, anthropic};
use serde_json::{Value, json};

use crate::client::{self, Reply};

const KEY: &str = "test-key";

fn claude_tools() -> Value {
    json!([
        {"name": "Bash", "input_schema": {"type": "object"}},
        {"name": "Write", "input_schema": {"type": "object"}}
    ])
}

fn claude_first_request() -> Value {
    json!({
        "model": "claude-sonnet-x",
        "stream": true,
        "max_tokens": 100,
        "system": [{"type": "text", "text": "You are Claude Code."}],
        "tools": claude_tools(),
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "write hello.txt"}]},
            {"role": "system", "content": "<env>\nWorking directory: /home/u/ws\n</env>"}
        ]
    })
}

async fn fixture() -> bot_bottle_testkit::FixtureHandle {
    anthropic::start(
        FixtureConfig::new(Script::write_then_done("hello.txt", "hi\n")).with_expected_key(KEY),
    )
    .await
    .unwrap()
}

async fn messages(base_url: &str, body: &Value) -> Reply {
    client::post(
        base_url,
        "/v1/messages?beta=true",
        &[("x-api-key", KEY), ("anthropic-version", "2023-06-01")],
        body,
    )
    .await
}

/// Folds a message stream back into `(content blocks, stop_reason)`, as a client would.
fn assemble(reply: &Reply) -> (Vec<Value>, String) {
    let mut blocks: Vec<Value> = Vec::new();
    let mut partial_json = String::new();
    let mut stop_reason = String::new();
    for (event, data) in reply.events() {
        assert_eq!(
            event.as_deref(),
            data["type"].as_str(),
            "event line matches data type"
        );
        match data["type"].as_str().unwrap() {
            "content_block_start" => blocks.push(data["content_block"].clone()),
            "content_block_delta" => {
                let last = blocks.last_mut().unwrap();
                match data["delta"]["type"].as_str().unwrap() {
                    "text_delta" => {
                        let text = format!(
                            "{}{}",
                            last["text"].as_str().unwrap(),
                            data["delta"]["text"].as_str().unwrap()
                        );
                        last["text"] = json!(text);
                    }
                    "input_json_delta" => {
                        partial_json.push_str(data["delta"]["partial_json"].as_str().unwrap());
                    }
                    other => panic!("unexpected delta {other}"),
                }
            }
            "content_block_stop" if !partial_json.is_empty() => {
                blocks.last_mut().unwrap()["input"] = serde_json::from_str(&partial_json).unwrap();
                partial_json.clear();
            }
            "message_delta" => {
                stop_reason = data["delta"]["stop_reason"].as_str().unwrap().to_owned()
            }
            _ => {}
        }
    }
    (blocks, stop_reason)
}

#[tokio::test]
async fn claude_conversation_writes_then_finishes() {
    let fixture = fixture().await;
    let base = fixture.base_url();

    let first = messages(&base, &claude_first_request()).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.content_type, "text/event-stream; charset=utf-8");
    let names: Vec<String> = first
        .events()
        .into_iter()
        .map(|(e, _)| e.unwrap())
        .collect();
    assert_eq!(
        names,
        vec![
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let (blocks, stop_reason) = assemble(&first);
    assert_eq!(stop_reason, "tool_use");
    assert_eq!(
        blocks,
        vec![json!({
            "type": "tool_use",
            "id": "toolu_fixture_0001",
            "name": "Write",
            "input": {"file_path": "/home/u/ws/hello.txt", "content": "hi\n"}
        })]
    );

    let mut second = claude_first_request();
    second["messages"] = json!([
        {"role": "user", "content": [{"type": "text", "text": "write hello.txt"}]},
        {"role": "assistant", "content": [blocks[0].clone()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_fixture_0001", "content": "ok"}]}
    ]);
    let (blocks, stop_reason) = assemble(&messages(&base, &second).await);
    assert_eq!(stop_reason, "end_turn");
    assert_eq!(blocks, vec![json!({"type": "text", "text": "done"})]);

    let recorded = fixture.requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].path, "/v1/messages?beta=true");
    assert_eq!(recorded[0].path_only(), "/v1/messages");
    assert_eq!(recorded[0].header("X-Api-Key"), Some(KEY));
    assert_eq!(recorded[0].header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(recorded[0].body.as_ref(), Some(&claude_first_request()));
    assert_eq!(recorded[1].body.as_ref(), Some(&second));
}

#[tokio::test]
async fn pi_gets_lowercase_write_with_a_relative_path() {
    let fixture = fixture().await;
    let body = json!({
        "model": "m",
        "stream": true,
        "tools": [{"name": "read"}, {"name": "bash"}, {"name": "write"}],
        "messages": [{"role": "user", "content": "write hello.txt"}]
    });
    let (blocks, stop_reason) = assemble(&messages(&fixture.base_url(), &body).await);
    assert_eq!(stop_reason, "tool_use");
    assert_eq!(blocks[0]["name"], "write");
    assert_eq!(
        blocks[0]["input"],
        json!({"path": "hello.txt", "content": "hi\n"})
    );
}

#[tokio::test]
async fn write_without_a_known_directory_uses_the_configured_workspace_or_fails() {
    let body = json!({"stream": false, "tools": claude_tools(), "messages": [{"role": "user", "content": "go"}]});

    let bare = fixture().await;
    let refused = messages(&bare.base_url(), &body).await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json()["error"]["type"], "invalid_request_error");

    let with_workspace = anthropic::start(
        FixtureConfig::new(Script::write_then_done("hello.txt", "hi")).with_workspace("/srv/ws"),
    )
    .await
    .unwrap();
    let answer = messages(&with_workspace.base_url(), &body).await.json();
    assert_eq!(
        answer["content"][0]["input"]["file_path"],
        "/srv/ws/hello.txt"
    );
}

#[tokio::test]
async fn non_streaming_answer_is_a_whole_message() {
    let fixture = fixture().await;
    let mut body = claude_first_request();
    body["stream"] = json!(false);
    let reply = messages(&fixture.base_url(), &body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.content_type, "application/json");
    let message = reply.json();
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["model"], "claude-sonnet-x");
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(
        message["content"],
        json!([{"type": "tool_use", "id": "toolu_fixture_0001", "name": "Write",
            "input": {"file_path": "/home/u/ws/hello.txt", "content": "hi\n"}}])
    );
}

#[tokio::test]
async fn side_request_without_tools_gets_the_final_text() {
    let fixture = fixture().await;
    let body = json!({"stream": false, "messages": [{"role": "user", "content": "title?"}]});
    let message = messages(&fixture.base_url(), &body).await.json();
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "done"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
}

#[tokio::test]
async fn key_check_answers_in_anthropic_error_shape() {
    let fixture = fixture().await;
    let base = fixture.base_url();
    let body = claude_first_request();

    let missing = client::post(&base, "/v1/messages", &[], &body).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["type"], "error");
    assert_eq!(missing.json()["error"]["type"], "authentication_error");

    let wrong = client::post(
        &base,
        "/v1/messages",
        &[("x-api-key", "placeholder")],
        &body,
    )
    .await;
    assert_eq!(wrong.status, 403);
    assert_eq!(wrong.json()["error"]["type"], "permission_error");

    let bearer = client::post(
        &base,
        "/v1/messages",
        &[("authorization", "Bearer test-key")],
        &body,
    )
    .await;
    assert_eq!(bearer.status, 200);

    // Refused requests are recorded too: a test can see what leaked.
    let recorded = fixture.requests();
    assert_eq!(recorded.len(), 3);
    assert_eq!(recorded[1].header("x-api-key"), Some("placeholder"));
}

#[tokio::test]
async fn unknown_path_is_404_and_count_tokens_answers() {
    let fixture = fixture().await;
    let base = fixture.base_url();
    let headers = [("x-api-key", KEY)];
    let unknown = client::post(&base, "/v1/complete", &headers, &json!({})).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["type"], "not_found_error");
    let count = client::post(
        &base,
        "/v1/messages/count_tokens",
        &headers,
        &claude_first_request(),
    )
    .await;
    assert_eq!(count.status, 200);
    assert!(count.json()["input_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn serves_https_with_the_given_identity() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let identity =
        TlsIdentity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
    let fixture = anthropic::start(
        FixtureConfig::new(Script::write_then_done("hello.txt", "hi"))
            .with_expected_key(KEY)
            .with_tls(identity),
    )
    .await
    .unwrap();
    assert!(fixture.base_url().starts_with("https://127.0.0.1:"));
    let base = fixture.base_url();
    let reply = client::send(
        "POST",
        &base,
        "/v1/messages",
        &[("x-api-key", KEY)],
        json!({"stream": false, "messages": []}).to_string(),
        Some(cert.der().clone()),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["content"][0]["text"], "done");
}

#[test]
fn pem_without_a_certificate_is_refused() {
    let err = TlsIdentity::from_pem(b"", b"").unwrap_err();
    assert_eq!(
        err.to_string(),
        "the fixture's PEM certificate file holds no certificate"
    );
}
