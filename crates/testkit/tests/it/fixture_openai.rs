use bot_bottle_testkit::{FixtureConfig, Script, openai};
use serde_json::{Value, json};

use crate::client::{self, Reply};

const KEY: &str = "test-key";

fn codex_request(input: Value) -> Value {
    json!({
        "model": "fixture-model",
        "stream": true,
        "store": false,
        "tool_choice": "auto",
        "tools": [{"type": "function", "name": "exec_command", "parameters": {"type": "object"}}],
        "input": input
    })
}

async fn fixture() -> bot_bottle_testkit::FixtureHandle {
    openai::start(
        FixtureConfig::new(Script::write_then_done("hello.txt", "hi\n")).with_expected_key(KEY),
    )
    .await
    .unwrap()
}

async fn responses(base_url: &str, body: &Value) -> Reply {
    client::post(
        base_url,
        "/v1/responses",
        &[("authorization", "Bearer test-key")],
        body,
    )
    .await
}

fn types(reply: &Reply) -> Vec<String> {
    reply
        .events()
        .into_iter()
        .map(|(event, data)| {
            assert_eq!(event.as_deref(), data["type"].as_str());
            data["type"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn done_item(reply: &Reply) -> Value {
    reply
        .events()
        .into_iter()
        .find(|(_, data)| data["type"] == "response.output_item.done")
        .map(|(_, data)| data["item"].clone())
        .unwrap()
}

#[tokio::test]
async fn codex_conversation_runs_a_command_then_answers() {
    let fixture = fixture().await;
    let base = fixture.base_url();
    let user = json!({"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "write hello.txt"}]});

    let first = responses(&base, &codex_request(json!([user.clone()]))).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        types(&first),
        vec![
            "response.created",
            "response.output_item.added",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let call = done_item(&first);
    assert_eq!(call["type"], "function_call");
    assert_eq!(call["name"], "exec_command");
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(
        arguments,
        json!({"cmd": "printf '%s' 'hi\n' > 'hello.txt'"})
    );

    let second = responses(
        &base,
        &codex_request(json!([
            user,
            {"type": "function_call", "call_id": call["call_id"], "name": "exec_command", "arguments": call["arguments"]},
            {"type": "function_call_output", "call_id": call["call_id"], "output": "ok"}
        ])),
    )
    .await;
    assert_eq!(
        types(&second),
        vec![
            "response.created",
            "response.output_item.added",
            "response.output_text.delta",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let message = done_item(&second);
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(
        message["content"],
        json!([{"type": "output_text", "text": "done", "annotations": []}])
    );
    let (_, completed) = second.events().pop().unwrap();
    assert_eq!(completed["response"]["status"], "completed");
    assert_eq!(completed["response"]["output"], json!([message]));

    let recorded = fixture.requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[0].path, "/v1/responses");
    assert_eq!(recorded[0].header("authorization"), Some("Bearer test-key"));
    assert_eq!(
        recorded[1].body.as_ref().unwrap()["input"][2]["output"],
        "ok"
    );
}

#[tokio::test]
async fn non_streaming_answer_is_a_response_object() {
    let fixture = fixture().await;
    let mut body = codex_request(json!([]));
    body["stream"] = json!(false);
    let response = responses(&fixture.base_url(), &body).await.json();
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    assert_eq!(response["output"][0]["type"], "function_call");
}

#[tokio::test]
async fn key_check_answers_in_openai_error_shape() {
    let fixture = fixture().await;
    let base = fixture.base_url();
    let body = codex_request(json!([]));

    let missing = client::post(&base, "/v1/responses", &[], &body).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"]["code"], "missing_api_key");

    let wrong = client::post(
        &base,
        "/v1/responses",
        &[("authorization", "Bearer nope")],
        &body,
    )
    .await;
    assert_eq!(wrong.status, 403);
    assert_eq!(wrong.json()["error"]["code"], "invalid_api_key");
    assert_eq!(wrong.json()["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn websocket_upgrade_is_refused_with_426() {
    let fixture = fixture().await;
    let reply = client::send(
        "GET",
        &fixture.base_url(),
        "/v1/responses",
        &[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("authorization", "Bearer test-key"),
        ],
        String::new(),
        None,
    )
    .await;
    assert_eq!(reply.status, 426);
    assert_eq!(reply.json()["error"]["code"], "websocket_unsupported");
    assert_eq!(fixture.requests()[0].method, "GET");
}

#[tokio::test]
async fn script_without_a_shell_tool_is_a_loud_400() {
    let fixture = fixture().await;
    let mut body = codex_request(json!([]));
    body["tools"] = json!([{"type": "function", "name": "view_image"}]);
    let reply = responses(&fixture.base_url(), &body).await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.json()["error"]["message"],
        "fixture: the request offers no `exec_command`-like tool (offered: view_image)"
    );
}
