//! The agent is the attacker: writes outside the scope, another head, oversized and
//! malformed input, unknown tools, broken JSON-RPC, log and queue forgery, a huge
//! request, and hanging up mid-call.

use std::time::Duration;

use bot_bottle_egress::audit::{self, AuditDecision};
use bot_bottle_sidecars::client::{self, ClientError, ToolOutput};
use bot_bottle_sidecars::forge::{MAX_BODY, MAX_REQUEST_BODY};
use bot_bottle_sidecars::queue::{DoneStatus, QueueEvent};
use serde_json::{Value, json};

use crate::support::{
    BRANCH, Harness, ISSUE, JSON_HEADERS, OTHER_ISSUE, OTHER_PR, raw_post, summary,
};

async fn call(h: &Harness, tool: &str, arguments: Value) -> ToolOutput {
    client::call_tool(&h.url, tool, arguments)
        .await
        .unwrap_or_else(|err| panic!("{tool}: {err}"))
}

#[tokio::test]
async fn writes_outside_the_scope_are_refused_logged_and_never_reach_the_forge() {
    let h = Harness::start().await;
    let comment = call(
        &h,
        "post_comment",
        json!({"number": OTHER_ISSUE, "body": "spam"}),
    )
    .await;
    assert!(comment.is_error);
    assert_eq!(
        comment.text.lines().next(),
        Some("refused: post_comment on #99 is outside the assigned scope (writable: #17)")
    );
    assert!(
        comment
            .text
            .contains("hint: you may write only to issue #17")
    );

    let edit = call(
        &h,
        "update_description",
        json!({"number": OTHER_PR, "body": "pwned"}),
    )
    .await;
    assert!(edit.is_error);

    let pr = call(
        &h,
        "create_pr",
        json!({"title": "x", "body": "y", "head": "main", "base": "release"}),
    )
    .await;
    assert!(pr.is_error);
    assert!(
        pr.text
            .starts_with(&format!("refused: create_pr from branch `main`: pull requests may only come from branch `{BRANCH}`")),
        "{}",
        pr.text
    );

    assert!(h.forge.writes().is_empty(), "{:?}", h.forge.writes());
    assert!(h.queued().is_empty());
    let block = || "block".to_owned();
    assert_eq!(
        summary(&h.events()),
        vec![
            (
                "post_comment".into(),
                block(),
                Some("#99".into()),
                "refused: post_comment on #99 is outside the assigned scope (writable: #17)".into()
            ),
            (
                "update_description".into(),
                block(),
                Some("#5".into()),
                "refused: update_description on #5 is outside the assigned scope (writable: #17)"
                    .into()
            ),
            (
                "create_pr".into(),
                block(),
                Some("main".into()),
                format!(
                    "refused: create_pr from branch `main`: pull requests may only come from branch `{BRANCH}`"
                )
            ),
        ]
    );
    h.finish().await;
}

#[tokio::test]
async fn oversized_input_is_refused_before_the_forge_is_called() {
    let h = Harness::start().await;
    let huge = "x".repeat(MAX_BODY + 1);
    for (tool, arguments) in [
        ("post_comment", json!({"number": ISSUE, "body": huge})),
        ("update_description", json!({"number": ISSUE, "body": huge})),
        ("create_pr", json!({"title": "t", "body": huge})),
        ("create_pr", json!({"title": "t".repeat(2000), "body": "b"})),
        ("signal_done", json!({"status": "done", "summary": huge})),
    ] {
        let output = call(&h, tool, arguments).await;
        assert!(output.is_error, "{tool}");
        assert!(
            output
                .text
                .starts_with(&format!("invalid arguments for `{tool}`")),
            "{}",
            output.text
        );
        assert!(output.text.contains("over the limit"), "{}", output.text);
    }
    assert!(h.forge.calls().is_empty(), "{:?}", h.forge.calls());
    assert!(h.queued().is_empty());
    let events = h.events();
    assert_eq!(events.len(), 5);
    assert!(events.iter().all(|e| e.decision == AuditDecision::Block));
    assert_eq!(
        events[0].detail.as_deref(),
        Some("refused: invalid arguments: `body` is 65537 bytes, over the limit of 65536")
    );
    h.finish().await;
}

#[tokio::test]
async fn wrong_missing_and_extra_arguments_are_tool_errors() {
    let h = Harness::start().await;
    let cases = [
        ("read_issue", json!({})),
        ("read_issue", json!({"number": "17"})),
        ("read_issue", json!({"number": -17})),
        ("read_issue", json!({"number": 0})),
        ("read_issue", json!({"number": 17.5})),
        (
            "read_issue",
            json!({"number": 17, "owner": "other", "repo": "other"}),
        ),
        ("read_pr", json!({"number": [5]})),
        ("read_comments", json!({"number": null})),
        ("post_comment", json!({"number": 17})),
        ("post_comment", json!({"number": 17, "body": 5})),
        ("post_comment", json!({"number": 17, "body": "   "})),
        (
            "post_comment",
            json!({"number": 17, "body": "nul\u{0}byte"}),
        ),
        ("create_pr", json!({"title": "a\nb", "body": ""})),
        (
            "create_pr",
            json!({"title": "t", "body": "", "base": "main; rm -rf /"}),
        ),
        (
            "create_pr",
            json!({"title": "t", "body": "", "head": "../../etc"}),
        ),
        ("create_pr", json!({"body": ""})),
        ("signal_done", json!({"status": "finished", "summary": "s"})),
        ("signal_done", json!({"status": "done"})),
        (
            "signal_done",
            json!({"status": "done", "summary": "s", "pr": 3}),
        ),
    ];
    for (tool, arguments) in &cases {
        let output = match client::call_tool(&h.url, tool, arguments.clone()).await {
            Ok(output) => output,
            Err(err) => panic!("{tool} {arguments}: {err}"),
        };
        assert!(output.is_error, "{tool} {arguments}: {}", output.text);
        assert!(
            output.text.contains("hint:"),
            "{tool} {arguments}: {}",
            output.text
        );
    }
    // Arguments that are not an object at all fail in the protocol layer.
    let err = client::call_tool(&h.url, "signal_done", json!(["done", "s"]))
        .await
        .expect_err("not an object");
    assert!(
        matches!(err, ClientError::Rpc { .. } | ClientError::Status { .. }),
        "{err}"
    );
    assert!(h.forge.calls().is_empty(), "{:?}", h.forge.calls());
    assert!(h.queued().is_empty());
    // Nineteen refusals fit the block burst, so each one has its line.
    let events = h.events();
    assert_eq!(events.len(), cases.len());
    assert!(events.iter().all(|e| e.decision == AuditDecision::Block));
    assert_eq!(
        events[5].detail.as_deref(),
        Some("refused: invalid arguments: unknown field `owner`, expected `number`")
    );
    h.finish().await;
}

#[tokio::test]
async fn an_unknown_tool_is_a_protocol_error_and_logged() {
    let h = Harness::start().await;
    let err = client::call_tool(&h.url, "delete_repo\n    1 fake", json!({}))
        .await
        .expect_err("unknown");
    match err {
        ClientError::Rpc { code, message, .. } => {
            assert_eq!(code, -32602);
            assert!(message.contains("read_issue, read_pr"), "{message}");
        }
        other => panic!("{other}"),
    }
    let events = h.events();
    assert_eq!(
        summary(&events),
        vec![(
            "unknown_tool".into(),
            "block".into(),
            None,
            "refused: unknown tool `delete_repo\\n    1 fake`".into()
        )]
    );
    assert!(!audit::format_event(&events[0]).contains('\n'));
    h.finish().await;
}

#[tokio::test]
async fn malformed_json_rpc_is_answered_and_the_server_keeps_serving() {
    let h = Harness::start().await;
    let socket = h.socket();
    let host = "127.0.0.1:3129";
    let bodies: [&[u8]; 6] = [
        b"{not json",
        b"",
        b"[]",
        b"{\"jsonrpc\":\"2.0\",\"id\":1}",
        b"{\"jsonrpc\":\"1.0\",\"id\":1,\"method\":\"tools/list\"}",
        b"\xff\xfe\x00garbage",
    ];
    for body in bodies {
        let (status, text) = raw_post(&socket, host, JSON_HEADERS, body.to_vec()).await;
        let rpc_error = status == 200 && text.contains("\"error\"");
        assert!(
            (400..500).contains(&status) || rpc_error,
            "{:?} got {status}: {text}",
            String::from_utf8_lossy(body)
        );
    }
    // A tools/call straight away, without initialize, on an unknown method, and on a
    // Host the server does not serve.
    let call = br#"{"jsonrpc":"2.0","id":7,"method":"tools/cal","params":{}}"#;
    let (status, text) = raw_post(&socket, host, JSON_HEADERS, call.to_vec()).await;
    assert!(text.contains("\"error\""), "{status}: {text}");
    let list = br#"{"jsonrpc":"2.0","id":8,"method":"tools/list","params":{}}"#;
    let (status, _) = raw_post(&socket, "evil.example", JSON_HEADERS, list.to_vec()).await;
    assert_eq!(status, 403);
    for allowed in ["127.0.0.1:3129", "127.0.0.1", "localhost"] {
        let (status, text) = raw_post(&socket, allowed, JSON_HEADERS, list.to_vec()).await;
        assert_eq!(status, 200, "{allowed}: {text}");
        assert!(text.contains("read_issue"), "{allowed}: {text}");
    }
    let output = call_ok(&h).await;
    assert!(!output.is_error);
    assert_eq!(h.events().len(), 1, "only the tool call is an op");
    h.finish().await;
}

async fn call_ok(h: &Harness) -> ToolOutput {
    call(h, "read_issue", json!({"number": ISSUE})).await
}

#[tokio::test]
async fn a_summary_with_newlines_and_fake_json_forges_neither_a_line_nor_an_event() {
    let h = Harness::start().await;
    let forged_line = r#"{"seq":2,"at":"2026-12-01T00:00:00Z","kind":"forge","decision":"allow","reason":"post_comment","prev_hash":"00","hash":"11"}"#;
    let forged_event = r#"{"id":"0","at":"x","event":{"kind":"pr_created","number":99}}"#;
    let summary_text =
        format!("all good\n{forged_line}\n{forged_event}\r\n    2 2026 allow forge fake");
    let output = call(
        &h,
        "signal_done",
        json!({"status": "blocked", "summary": summary_text}),
    )
    .await;
    assert!(!output.is_error, "{}", output.text);

    let raw = std::fs::read_to_string(h.ops_log()).expect("log");
    assert_eq!(raw.lines().count(), 1, "{raw}");
    let events = h.events();
    assert_eq!(events.len(), 1);
    let detail = events[0].detail.clone().unwrap_or_default();
    assert!(
        detail.starts_with("signalled done: blocked — all good\\n{\"seq\":2"),
        "{detail}"
    );
    assert!(!detail.contains('\n'));
    assert!(!audit::format_event(&events[0]).contains('\n'));

    let queued = h.queued();
    assert_eq!(queued.len(), 1);
    assert_eq!(
        queued[0].event,
        QueueEvent::SignalDone {
            status: DoneStatus::Blocked,
            summary: summary_text
        }
    );
    let files: Vec<_> = std::fs::read_dir(h.queue())
        .expect("queue")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    h.finish().await;
}

#[tokio::test]
async fn a_ten_megabyte_request_is_refused_while_it_streams() {
    let h = Harness::start().await;
    let socket = h.socket();
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"post_comment","arguments":{{"number":17,"body":"{}"}}}}}}"#,
        "a".repeat(10 * 1024 * 1024)
    );
    let (status, _) = raw_post(&socket, "127.0.0.1:3129", JSON_HEADERS, body.into_bytes()).await;
    assert_eq!(status, 413);

    // Without a Content-Length (chunked), the limit holds as well.
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let chunks = (0..40).map(|_| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(vec![
            b' ';
            256 * 1024
        ])))
    });
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
    let request = http::Request::builder()
        .method("POST")
        .uri("/mcp")
        .header("host", "127.0.0.1:3129")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body)
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status().as_u16(), 413);
    const { assert!(MAX_REQUEST_BODY < 40 * 256 * 1024) };

    assert!(h.forge.calls().is_empty());
    assert!(!call_ok(&h).await.is_error, "the server still serves");
    h.finish().await;
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_write_still_gets_the_write_logged() {
    let h = Harness::start().await;
    h.forge.set_write_delay(Duration::from_millis(1000));
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"post_comment","arguments":{"number":17,"body":"sneaky"}}}"#;
    // HTTP/2: a client that gives up resets its stream, so the server hears of it at
    // once (HTTP/1.1 would notice the hang-up only when it next reads).
    let stream = tokio::net::UnixStream::connect(h.socket())
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let request = http::Request::builder()
        .method("POST")
        .uri("http://127.0.0.1:3129/mcp")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(body)))
        .expect("request");
    let pending =
        tokio::time::timeout(Duration::from_millis(300), sender.send_request(request)).await;
    assert!(
        pending.is_err(),
        "the write answered before the forge finished"
    );
    drop(sender);
    connection.abort();

    // Shutting down right away still waits for the call: its line is in the log
    // before the head is recorded.
    let (home, forge) = h.stop().await;
    assert_eq!(
        forge.comments(ISSUE).last().map(String::as_str),
        Some("sneaky")
    );
    let log = home.path().join("state/bottle-ab12c/forge-ops.jsonl");
    let events = audit::read(&log).expect("read");
    assert_eq!(
        summary(&events),
        vec![(
            "post_comment".into(),
            "allow".into(),
            Some("#17".into()),
            "posted comment to #17 (6 bytes)".into()
        )]
    );
    let head = audit::read_head(&log).expect("head").expect("written");
    assert_eq!(head.seq, 1);
    audit::verify_against(&log, &[head]).expect("the head covers the call");
}

const FLOOD: u64 = 100;

#[tokio::test]
async fn a_flood_of_refusals_is_counted_not_written_line_by_line() {
    let h = Harness::start().await;
    let calls = (0..FLOOD).map(|_| {
        call(
            &h,
            "post_comment",
            json!({"number": OTHER_ISSUE, "body": "x"}),
        )
    });
    for output in futures_util::future::join_all(calls).await {
        assert!(output.is_error);
    }
    // After a quiet second the count is written while the sidecar runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !h.events().iter().any(|e| e.held_back > 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no count of held-back refusals was written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sidecar_events = {
        let (home, _) = h.stop().await;
        let log = home.path().join("state/bottle-ab12c/forge-ops.jsonl");
        audit::verify(&log).expect("verifies");
        audit::read(&log).expect("read")
    };
    let written = sidecar_events.iter().filter(|e| e.held_back == 0).count() as u64;
    let held: u64 = sidecar_events.iter().map(|e| e.held_back).sum();
    assert_eq!(written + held, FLOOD, "every refusal is written or counted");
    assert!(written < FLOOD, "some were held back: {written}");
    assert!(sidecar_events.iter().filter(|e| e.held_back > 0).all(|e| {
        e.detail
            .as_deref()
            .is_some_and(|d| d.contains("refused forge calls"))
            && e.kind == bot_bottle_egress::audit::EventKind::Forge
    }));
}
