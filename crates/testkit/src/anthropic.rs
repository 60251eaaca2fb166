//! A scripted stand-in for the Anthropic Messages API (`POST /v1/messages`), as claude and
//! pi use it. Wire format: <https://docs.anthropic.com/en/api/messages-streaming>.

use http::StatusCode;
use serde_json::{Value, json};

use crate::script::{self, Turn};
use crate::server::{
    self, Body, FixtureConfig, FixtureError, FixtureHandle, Kind, RecordedRequest, Shared,
};

/// Starts an Anthropic Messages fixture.
///
/// # Errors
/// When the address cannot be bound or the TLS identity is unusable.
pub async fn start(config: FixtureConfig) -> Result<FixtureHandle, FixtureError> {
    server::start(Kind::Anthropic, config).await
}

/// One content block of an answer.
#[derive(Debug, Clone, PartialEq)]
enum Block {
    Text(String),
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

fn error(status: StatusCode, kind: &str, message: &str) -> http::Response<Body> {
    server::json_response(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

pub(crate) fn respond(shared: &Shared, request: &RecordedRequest) -> http::Response<Body> {
    if request.method != "POST" {
        return error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "fixture: only POST is served",
        );
    }
    if let Err(present) = server::check_key(shared, request) {
        return if present {
            error(
                StatusCode::FORBIDDEN,
                "permission_error",
                "fixture: the API key does not match the expected key",
            )
        } else {
            error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "fixture: no API key (`x-api-key` or `authorization: Bearer`)",
            )
        };
    }
    let Some(body) = request.body.as_ref().filter(|body| body.is_object()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "fixture: the body is not a JSON object",
        );
    };
    match request.path_only() {
        "/v1/messages" => messages(shared, body),
        "/v1/messages/count_tokens" => server::json_response(
            StatusCode::OK,
            &json!({"input_tokens": estimate_tokens(body)}),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "fixture: unknown path",
        ),
    }
}

fn messages(shared: &Shared, body: &Value) -> http::Response<Body> {
    let script = &shared.config.script;
    let tools = script::tool_names(body);
    let turn = script.turn_for(script::turn_index(
        tool_results(body),
        resumed_prompts(body),
    ));
    let (block, stop_reason) = match &turn {
        Turn::Text(text) => (Block::Text(text.clone()), "end_turn"),
        // A request without tools is a side request (a title, a summary): answer in text so
        // it cannot consume the scripted tool call.
        _ if tools.is_empty() => (Block::Text(script.final_text()), "end_turn"),
        Turn::Tool { name, .. } if !script::has(&tools, name) => (
            Block::Text(script::unoffered_tool(name, &tools)),
            "end_turn",
        ),
        _ => {
            let cwd = script::working_directory(body).or_else(|| shared.config.workspace.clone());
            match script::anthropic_tool_call(&turn, &tools, cwd.as_deref()) {
                Ok(call) => (
                    Block::ToolUse {
                        id: shared.next_id("toolu"),
                        name: call.name,
                        input: call.input,
                    },
                    "tool_use",
                ),
                Err(message) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        &format!("fixture: {message}"),
                    );
                }
            }
        }
    };
    let message_id = shared.next_id("msg");
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(&shared.config.model)
        .to_owned();
    let input_tokens = estimate_tokens(body);
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        server::sse_response(stream_events(
            &message_id,
            &model,
            &block,
            stop_reason,
            input_tokens,
        ))
    } else {
        server::json_response(
            StatusCode::OK,
            &json!({
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [block_json(&block, true)],
                "stop_reason": stop_reason,
                "stop_sequence": null,
                "usage": usage(input_tokens, output_tokens(&block)),
            }),
        )
    }
}

/// How many `tool_result` blocks the conversation holds: the number of tool turns done.
fn tool_results(body: &Value) -> usize {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return 0;
    };
    messages
        .iter()
        .filter(|message| message.get("role").and_then(Value::as_str) == Some("user"))
        .filter_map(|message| message.get("content").and_then(Value::as_array))
        .flatten()
        .filter(|block| block.get("type").and_then(Value::as_str) == Some("tool_result"))
        .count()
}

/// How many user prompts follow the first assistant message: each is a resumed turn.
/// A user message is a prompt when it holds no `tool_result` and some text that is not
/// context the client added (`<system-reminder>` blocks).
fn resumed_prompts(body: &Value) -> usize {
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return 0;
    };
    let mut replied = false;
    let mut prompts = 0;
    for message in messages {
        match message.get("role").and_then(Value::as_str) {
            Some("assistant") => replied = true,
            Some("user") if replied && is_prompt(message.get("content")) => prompts += 1,
            _ => {}
        }
    }
    prompts
}

fn is_prompt(content: Option<&Value>) -> bool {
    match content {
        Some(Value::String(text)) => !script::is_context_text(text),
        Some(Value::Array(blocks)) => {
            let kind = |block: &Value| block.get("type").and_then(Value::as_str).map(str::to_owned);
            !blocks
                .iter()
                .any(|b| kind(b).as_deref() == Some("tool_result"))
                && blocks.iter().any(|b| {
                    kind(b).as_deref() == Some("text")
                        && b.get("text")
                            .and_then(Value::as_str)
                            .is_some_and(|text| !script::is_context_text(text))
                })
        }
        _ => false,
    }
}

fn estimate_tokens(body: &Value) -> u64 {
    u64::try_from(body.to_string().len() / 4).unwrap_or(u64::MAX)
}

fn output_tokens(block: &Block) -> u64 {
    let len = match block {
        Block::Text(text) => text.len(),
        Block::ToolUse { input, .. } => input.to_string().len(),
    };
    u64::try_from(len / 4 + 1).unwrap_or(u64::MAX)
}

fn usage(input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    })
}

/// The block as it appears in a complete message, or (when `complete` is false) as it
/// opens a streamed `content_block_start`, where text and tool input arrive in deltas.
fn block_json(block: &Block, complete: bool) -> Value {
    match block {
        Block::Text(text) => {
            json!({"type": "text", "text": if complete { text.as_str() } else { "" }})
        }
        Block::ToolUse { id, name, input } => json!({
            "type": "tool_use",
            "id": id,
            "name": name,
            "input": if complete { input.clone() } else { json!({}) },
        }),
    }
}

fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

/// The six events of one streamed message, each with its `event:` line.
///
/// Both claude and pi ignore `data:` without `event:`, and claude drops a block that has no
/// `content_block_stop`, so none of these is optional.
fn stream_events(
    message_id: &str,
    model: &str,
    block: &Block,
    stop_reason: &str,
    input_tokens: u64,
) -> Vec<String> {
    let mut events = vec![
        sse(
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": usage(input_tokens, 1),
                },
            }),
        ),
        sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": block_json(block, false)}),
        ),
    ];
    // Split each payload in two deltas so that clients must really concatenate them.
    let (delta_type, field, payload) = match block {
        Block::Text(text) => ("text_delta", "text", text.clone()),
        Block::ToolUse { input, .. } => ("input_json_delta", "partial_json", input.to_string()),
    };
    let middle = payload
        .char_indices()
        .nth(payload.chars().count() / 2)
        .map_or(payload.len(), |(i, _)| i);
    for part in [&payload[..middle], &payload[middle..]] {
        if part.is_empty() {
            continue;
        }
        events.push(sse(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": delta_type, field: part}}),
        ));
    }
    events.push(sse(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(sse(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": output_tokens(block)},
        }),
    ));
    events.push(sse("message_stop", &json!({"type": "message_stop"})));
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_names(events: &[String]) -> Vec<&str> {
        events
            .iter()
            .map(|event| event.lines().next().unwrap().trim_start_matches("event: "))
            .collect()
    }

    #[test]
    fn tool_use_stream_has_the_six_events_and_reassembles() {
        let block = Block::ToolUse {
            id: "toolu_1".to_owned(),
            name: "Write".to_owned(),
            input: json!({"file_path": "/w/hello.txt", "content": "hi"}),
        };
        let events = stream_events("msg_1", "m", &block, "tool_use", 10);
        assert_eq!(
            event_names(&events),
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
        let partial: String = events
            .iter()
            .filter(|event| event.starts_with("event: content_block_delta"))
            .map(|event| {
                let data: Value = serde_json::from_str(
                    event.lines().nth(1).unwrap().trim_start_matches("data: "),
                )
                .unwrap();
                data["delta"]["partial_json"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&partial).unwrap(),
            json!({"file_path": "/w/hello.txt", "content": "hi"})
        );
        assert!(events.iter().all(|event| event.ends_with("\n\n")));
    }

    #[test]
    fn counts_tool_results_in_user_messages_only() {
        let body = json!({"messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "Write", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "ok"}]},
            {"role": "system", "content": "env"}
        ]});
        assert_eq!(tool_results(&body), 1);
        assert_eq!(tool_results(&json!({"messages": []})), 0);
    }

    /// `claude --continue "next"`: the earlier session (prompt, tool call, result, final
    /// text) and then the new prompt.
    fn resumed_claude_body() -> Value {
        json!({"messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>\nctx\n</system-reminder>"},
                {"type": "text", "text": "write hello.txt"}
            ]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "Write", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "a", "content": "ok"},
                {"type": "text", "text": "a text beside a tool result is not a prompt"}
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "done"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>\nctx\n</system-reminder>"},
                {"type": "text", "text": "now add a test"}
            ]}
        ]})
    }

    #[test]
    fn a_resumed_conversation_gets_the_next_turn() {
        let fresh = json!({"messages": [
            {"role": "user", "content": "write hello.txt"}
        ]});
        assert_eq!(
            script::turn_index(tool_results(&fresh), resumed_prompts(&fresh)),
            0
        );
        let body = resumed_claude_body();
        assert_eq!((tool_results(&body), resumed_prompts(&body)), (1, 1));
        assert_eq!(script::turn_index(1, 1), 2);
        // A reminder-only user message after a reply is context, not a prompt.
        let mut reminder = resumed_claude_body();
        reminder["messages"][4]["content"] =
            json!([{"type": "text", "text": "<system-reminder>x</system-reminder>"}]);
        assert_eq!(resumed_prompts(&reminder), 0);
        // And the resumed session's own tool result moves it on once more.
        let mut later = resumed_claude_body();
        let messages = later["messages"].as_array_mut().unwrap();
        messages.push(json!({"role": "assistant", "content": [{"type": "tool_use", "id": "b", "name": "Bash", "input": {}}]}));
        messages.push(json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "b", "content": "ok"}]}));
        assert_eq!(
            script::turn_index(tool_results(&later), resumed_prompts(&later)),
            3
        );
    }
}
