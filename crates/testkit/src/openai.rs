//! A scripted stand-in for the OpenAI Responses API (`POST /v1/responses`), as codex uses
//! it. Wire format: <https://platform.openai.com/docs/api-reference/responses-streaming>.

use http::StatusCode;
use serde_json::{Value, json};

use crate::script::{self, Turn};
use crate::server::{
    self, Body, FixtureConfig, FixtureError, FixtureHandle, Kind, RecordedRequest, Shared,
};

/// Starts an OpenAI Responses fixture.
///
/// # Errors
/// When the address cannot be bound or the TLS identity is unusable.
pub async fn start(config: FixtureConfig) -> Result<FixtureHandle, FixtureError> {
    server::start(Kind::OpenAi, config).await
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> http::Response<Body> {
    server::json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

pub(crate) fn respond(shared: &Shared, request: &RecordedRequest) -> http::Response<Body> {
    // codex (built-in provider, or `supports_websockets = true`) tries a WebSocket first.
    // Observed with codex 0.169.0: 426 makes it fall back to POST at once, while 404 costs
    // seven retried handshakes (about 7 s) before the fallback.
    if server::wants_websocket(request) {
        return error(
            StatusCode::UPGRADE_REQUIRED,
            "invalid_request_error",
            "websocket_unsupported",
            "fixture: websockets are not served, use POST",
        );
    }
    if request.method != "POST" {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            "fixture: only POST is served",
        );
    }
    if let Err(present) = server::check_key(shared, request) {
        return if present {
            error(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                "invalid_api_key",
                "fixture: the API key does not match the expected key",
            )
        } else {
            error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing_api_key",
                "fixture: no API key (`authorization: Bearer`)",
            )
        };
    }
    let Some(body) = request.body.as_ref().filter(|body| body.is_object()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            "fixture: the body is not a JSON object",
        );
    };
    if request.path_only() != "/v1/responses" {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            "fixture: unknown path",
        );
    }
    responses(shared, body)
}

fn responses(shared: &Shared, body: &Value) -> http::Response<Body> {
    let script = &shared.config.script;
    let tools = script::tool_names(body);
    let turn = script.turn_for(script::turn_index(
        function_call_outputs(body),
        resumed_prompts(body),
    ));
    let item = match &turn {
        Turn::Text(text) => message_item(&shared.next_id("msg"), text),
        _ if tools.is_empty() => message_item(&shared.next_id("msg"), &script.final_text()),
        Turn::Tool { name, .. } if !script::has(&tools, name) => message_item(
            &shared.next_id("msg"),
            &script::unoffered_tool(name, &tools),
        ),
        _ => match script::openai_tool_call(&turn, &tools) {
            Ok(call) => {
                let mut item = json!({
                    "type": "function_call",
                    "id": shared.next_id("fc"),
                    "call_id": shared.next_id("call"),
                    "name": call.name,
                    "arguments": call.input.to_string(),
                    "status": "completed",
                });
                // A tool inside a namespace is called by its own name, with the namespace
                // beside it.
                if let Some((namespace, name)) = script::namespaced(body, &call.name) {
                    item["name"] = json!(name);
                    item["namespace"] = json!(namespace);
                }
                item
            }
            Err(message) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "fixture_script",
                    &format!("fixture: {message}"),
                );
            }
        },
    };
    let response_id = shared.next_id("resp");
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&shared.config.model)
        .to_owned();
    let input_tokens = u64::try_from(body.to_string().len() / 4).unwrap_or(u64::MAX);
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        server::sse_response(stream_events(&response_id, &model, &item, input_tokens))
    } else {
        server::json_response(
            StatusCode::OK,
            &response_object(&response_id, &model, "completed", &[item], input_tokens),
        )
    }
}

fn message_item(id: &str, text: &str) -> Value {
    json!({
        "type": "message",
        "id": id,
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    })
}

/// How many `function_call_output` items the input holds: the number of tool turns done.
fn function_call_outputs(body: &Value) -> usize {
    body.get("input")
        .and_then(Value::as_array)
        .map_or(0, |items| {
            items
                .iter()
                .filter(|item| {
                    item.get("type").and_then(Value::as_str) == Some("function_call_output")
                })
                .count()
        })
}

/// How many user prompts follow the first output of the model (a function call, an
/// assistant message, reasoning): each is a resumed turn. codex sends its environment
/// and instructions as user messages too; those are context, not prompts.
fn resumed_prompts(body: &Value) -> usize {
    let Some(items) = body.get("input").and_then(Value::as_array) else {
        return 0;
    };
    let mut replied = false;
    let mut prompts = 0;
    for item in items {
        let kind = item.get("type").and_then(Value::as_str);
        let role = item.get("role").and_then(Value::as_str);
        match (kind, role) {
            (Some("function_call" | "reasoning" | "local_shell_call" | "custom_tool_call"), _)
            | (_, Some("assistant")) => replied = true,
            (None | Some("message"), Some("user")) if replied && is_prompt(item.get("content")) => {
                prompts += 1;
            }
            _ => {}
        }
    }
    prompts
}

fn is_prompt(content: Option<&Value>) -> bool {
    match content {
        Some(Value::String(text)) => !script::is_context_text(text),
        Some(Value::Array(parts)) => parts.iter().any(|part| {
            part.get("type").and_then(Value::as_str) == Some("input_text")
                && part
                    .get("text")
                    .and_then(Value::as_str)
                    .is_some_and(|text| !script::is_context_text(text))
        }),
        _ => false,
    }
}

fn response_object(
    id: &str,
    model: &str,
    status: &str,
    output: &[Value],
    input_tokens: u64,
) -> Value {
    let output_tokens = u64::try_from(Value::from(output).to_string().len() / 4 + 1).unwrap_or(1);
    json!({
        "id": id,
        "object": "response",
        "created_at": 0,
        "status": status,
        "model": model,
        "output": output,
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens.saturating_add(output_tokens),
        },
    })
}

fn sse(data: &Value) -> String {
    // The `event:` line is optional for codex but real servers send it; keep both.
    let event = data
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    format!("event: {event}\ndata: {data}\n\n")
}

/// The events of one streamed response. codex takes the item from
/// `response.output_item.done` and needs `response.completed`, or it retries the request.
fn stream_events(response_id: &str, model: &str, item: &Value, input_tokens: u64) -> Vec<String> {
    let mut sequence = 0_u64;
    let mut next = |mut data: Value| {
        data["sequence_number"] = json!(sequence);
        sequence += 1;
        sse(&data)
    };
    let mut events = vec![
        next(json!({
            "type": "response.created",
            "response": response_object(response_id, model, "in_progress", &[], input_tokens),
        })),
        next(
            json!({"type": "response.output_item.added", "output_index": 0, "item": in_progress(item)}),
        ),
    ];
    if let Some(text) = item["content"][0]["text"].as_str() {
        events.push(next(json!({
            "type": "response.output_text.delta",
            "item_id": item["id"],
            "output_index": 0,
            "content_index": 0,
            "delta": text,
        })));
    }
    events.push(next(
        json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
    ));
    events.push(next(json!({
        "type": "response.completed",
        "response": response_object(response_id, model, "completed", std::slice::from_ref(item), input_tokens),
    })));
    events
}

fn in_progress(item: &Value) -> Value {
    let mut item = item.clone();
    item["status"] = json!("in_progress");
    if item["type"] == "message" {
        item["content"] = json!([]);
    } else {
        item["arguments"] = json!("");
    }
    item
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(event: &str) -> Value {
        let line = event
            .lines()
            .find_map(|line| line.strip_prefix("data: "))
            .unwrap();
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn function_call_stream_ends_with_output_item_done_then_completed() {
        let item = json!({"type": "function_call", "id": "fc_1", "call_id": "call_1",
            "name": "exec_command", "arguments": "{\"cmd\":\"true\"}", "status": "completed"});
        let events = stream_events("resp_1", "m", &item, 3);
        let types: Vec<String> = events
            .iter()
            .map(|event| data(event)["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            types,
            vec![
                "response.created",
                "response.output_item.added",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert_eq!(data(&events[2])["item"], item);
        assert_eq!(data(&events[3])["response"]["id"], "resp_1");
        assert_eq!(data(&events[3])["sequence_number"], 3);
        assert!(events[3].starts_with("event: response.completed\ndata: "));
    }

    #[test]
    fn message_stream_carries_a_text_delta() {
        let item = message_item("msg_1", "done");
        let events = stream_events("resp_1", "m", &item, 3);
        assert_eq!(data(&events[2])["type"], "response.output_text.delta");
        assert_eq!(data(&events[2])["delta"], "done");
        assert_eq!(data(&events[1])["item"]["content"], json!([]));
    }

    #[test]
    fn counts_function_call_outputs() {
        let body = json!({"input": [
            {"type": "message", "role": "user", "content": []},
            {"type": "function_call", "call_id": "c"},
            {"type": "function_call_output", "call_id": "c", "output": "ok"}
        ]});
        assert_eq!(function_call_outputs(&body), 1);
        assert_eq!(function_call_outputs(&json!({})), 0);
    }

    fn user(text: &str) -> Value {
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]})
    }

    #[test]
    fn a_resumed_responses_conversation_gets_the_next_turn() {
        // codex: instructions and environment as user messages, then the prompt.
        let fresh = json!({"input": [
            user("# AGENTS.md instructions for /w\n\n<INSTRUCTIONS>\nbe brief\n</INSTRUCTIONS>"),
            user("<environment_context>\n  <cwd>/w</cwd>\n</environment_context>"),
            user("write hello.txt")
        ]});
        assert_eq!(
            script::turn_index(function_call_outputs(&fresh), resumed_prompts(&fresh)),
            0
        );
        // `codex exec resume --last "next"`: the earlier turn, then the new prompt (and a
        // repeated environment block, which is context).
        let mut resumed = fresh.clone();
        let items = resumed["input"].as_array_mut().unwrap();
        items.push(json!({"type": "reasoning", "summary": []}));
        items.push(json!({"type": "function_call", "call_id": "c", "name": "exec_command", "arguments": "{}"}));
        items.push(json!({"type": "function_call_output", "call_id": "c", "output": "ok"}));
        items.push(json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "done"}]}));
        items.push(user(
            "<environment_context>\n  <cwd>/w</cwd>\n</environment_context>",
        ));
        items.push(json!({"role": "user", "content": "now add a test"}));
        assert_eq!(
            (function_call_outputs(&resumed), resumed_prompts(&resumed)),
            (1, 1)
        );
        assert_eq!(script::turn_index(1, 1), 2);
    }
}
