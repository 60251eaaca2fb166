//! Every tool through the real socket, the op log they leave, the queue events, and a
//! restart that continues the chain.

use bot_bottle_egress::audit::{self, AuditDecision, EventKind};
use bot_bottle_sidecars::client::{self, ToolOutput};
use bot_bottle_sidecars::queue::{DoneStatus, QueueEvent};
use serde_json::{Value, json};

use crate::support::{BRANCH, Harness, ISSUE, OTHER_PR, TOKEN, summary};

async fn call(h: &Harness, tool: &str, arguments: Value) -> ToolOutput {
    client::call_tool(&h.url, tool, arguments)
        .await
        .unwrap_or_else(|err| panic!("{tool}: {err}"))
}

fn ok(output: &ToolOutput) -> Value {
    assert!(!output.is_error, "{}", output.text);
    output.raw.clone()
}

#[tokio::test]
async fn tools_list_names_every_tool_with_a_strict_schema() {
    let h = Harness::start().await;
    let listed = client::list_tools(&h.url).await.expect("tools/list");
    let tools = listed["tools"].as_array().expect("tools");
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(
        names,
        vec![
            "read_issue",
            "read_pr",
            "read_comments",
            "post_comment",
            "update_description",
            "create_pr",
            "signal_done"
        ]
    );
    for tool in tools {
        let schema = &tool["inputSchema"];
        assert_eq!(schema["type"], "object", "{tool}");
        assert_eq!(schema["additionalProperties"], false, "{tool}");
        let description = tool["description"].as_str().expect("description");
        assert!(
            !description.is_empty() && !description.contains('\n'),
            "{tool}"
        );
    }
    assert_eq!(
        tools[5]["inputSchema"]["properties"]["head"]["const"],
        json!(BRANCH)
    );
    assert_eq!(
        tools[6]["inputSchema"]["properties"]["status"]["enum"],
        json!(["done", "blocked", "needs_input"])
    );
    assert!(
        tools[3]["description"]
            .as_str()
            .is_some_and(|d| d.contains("#17")),
        "{}",
        tools[3]
    );
    h.finish().await;
}

#[tokio::test]
async fn every_tool_works_and_leaves_one_line_and_its_queue_events() {
    let h = Harness::start().await;

    let issue = call(&h, "read_issue", json!({"number": ISSUE})).await;
    ok(&issue);
    assert!(issue.text.contains("Login fails with an empty password"));
    // Forge content reaches the agent as it is, token-like strings included; it is the
    // op log that must never hold them.
    assert!(issue.text.contains(TOKEN));

    let other = call(&h, "read_pr", json!({"number": OTHER_PR})).await;
    ok(&other);
    assert!(other.text.contains("\"feature\""), "{}", other.text);

    let comments = call(&h, "read_comments", json!({"number": ISSUE})).await;
    ok(&comments);
    assert!(comments.text.contains("Please fix soon"));

    let posted = call(
        &h,
        "post_comment",
        json!({"number": ISSUE, "body": "Looking into it."}),
    )
    .await;
    ok(&posted);
    assert_eq!(
        h.forge.comments(ISSUE),
        vec!["Please fix soon", "Looking into it."]
    );

    let created = call(
        &h,
        "create_pr",
        json!({"title": "Fix empty password login", "body": "Closes #17"}),
    )
    .await;
    ok(&created);
    let pr: u64 = 100;
    assert!(
        created.text.starts_with(&format!(
            "pull request #{pr} is open from `{BRANCH}` into `main`"
        )),
        "{}",
        created.text
    );
    assert_eq!(h.sidecar().writable(), vec![ISSUE, pr]);

    // The new PR joined the writable scope.
    ok(&call(
        &h,
        "post_comment",
        json!({"number": pr, "body": "Ready for review"}),
    )
    .await);
    ok(&call(
        &h,
        "update_description",
        json!({"number": pr, "body": "Closes #17\n\nNow with tests."}),
    )
    .await);
    assert_eq!(
        h.forge.body(pr).as_deref(),
        Some("Closes #17\n\nNow with tests.")
    );
    // Asking again for the same head and base finds the open PR.
    ok(&call(
        &h,
        "create_pr",
        json!({"title": "Fix", "body": "again", "head": BRANCH, "base": "main"}),
    )
    .await);

    let done = call(
        &h,
        "signal_done",
        json!({"status": "done", "summary": "Fixed the login; PR #100 is ready."}),
    )
    .await;
    ok(&done);
    assert!(done.text.starts_with("recorded: done."), "{}", done.text);
    assert!(done.text.contains("Stop working now"), "{}", done.text);

    let queued: Vec<QueueEvent> = h.queued().into_iter().map(|q| q.event).collect();
    assert_eq!(
        queued,
        vec![
            QueueEvent::PrCreated { number: pr },
            QueueEvent::PrCreated { number: pr },
            QueueEvent::SignalDone {
                status: DoneStatus::Done,
                summary: "Fixed the login; PR #100 is ready.".into()
            },
        ]
    );

    let events = h.events();
    assert!(events.iter().all(|e| e.kind == EventKind::Forge));
    let allow = || "allow".to_owned();
    let at = |n: u64| Some(format!("#{n}"));
    assert_eq!(
        summary(&events),
        vec![
            (
                "read_issue".into(),
                allow(),
                at(ISSUE),
                "read issue #17".into()
            ),
            ("read_pr".into(), allow(), at(OTHER_PR), "read PR #5".into()),
            (
                "read_comments".into(),
                allow(),
                at(ISSUE),
                "read 1 comment of #17".into()
            ),
            (
                "post_comment".into(),
                allow(),
                at(ISSUE),
                "posted comment to #17 (16 bytes)".into()
            ),
            (
                "create_pr".into(),
                allow(),
                Some(BRANCH.into()),
                format!(
                    "PR #100 is open from `{BRANCH}` into `main`: \"Fix empty password login\""
                )
            ),
            (
                "post_comment".into(),
                allow(),
                at(pr),
                "posted comment to #100 (16 bytes)".into()
            ),
            (
                "update_description".into(),
                allow(),
                at(pr),
                "replaced the description of #100 (27 bytes)".into()
            ),
            (
                "create_pr".into(),
                allow(),
                Some(BRANCH.into()),
                format!("PR #100 is open from `{BRANCH}` into `main`: \"Fix\"")
            ),
            (
                "signal_done".into(),
                allow(),
                at(ISSUE),
                "signalled done: done — Fixed the login; PR #100 is ready.".into()
            ),
        ]
    );
    let rendered = audit::format_event(&events[3]);
    assert!(
        rendered.ends_with("allow forge post_comment #17 — posted comment to #17 (16 bytes)"),
        "{rendered}"
    );
    h.finish().await;
}

#[tokio::test]
async fn a_restart_continues_the_chain_and_keeps_the_known_prs_writable() {
    let h = Harness::start().await;
    ok(&call(
        &h,
        "create_pr",
        json!({"title": "Fix", "body": "Closes #17"}),
    )
    .await);
    let (home, forge) = h.stop().await;
    let log = home.path().join("state/bottle-ab12c/forge-ops.jsonl");
    let head = audit::read_head(&log)
        .expect("head")
        .expect("a head was written");
    assert_eq!(head.seq, 1);

    // The orchestrator resumes the run with the PR it learned of from the queue.
    let h = Harness::start_in(home, forge, vec![100]).await;
    ok(&call(
        &h,
        "post_comment",
        json!({"number": 100, "body": "Addressed review"}),
    )
    .await);
    let denied = call(&h, "post_comment", json!({"number": 101, "body": "x"})).await;
    assert!(denied.is_error);
    let events = h.events();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(events[1].prev_hash, events[0].hash);
    assert_eq!(events[2].decision, AuditDecision::Block);
    audit::verify_against(&h.ops_log(), &[head]).expect("the log still reaches the old head");
    h.finish().await;
}

#[tokio::test]
async fn a_second_sidecar_on_a_live_socket_is_refused_and_a_stale_one_replaced() {
    let h = Harness::start().await;
    let err = bot_bottle_sidecars::ForgeSidecar::start(
        crate::support::context(std::sync::Arc::new(h.forge.clone()), Vec::new()),
        &h.socket(),
        &h.state().join("other.jsonl"),
        &h.queue(),
    )
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("is in use"), "{err}");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(h.socket())
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666);
    }
    let socket = h.socket();
    let (home, forge) = h.stop().await;
    assert!(!socket.exists(), "shutdown removes the socket");
    // A socket file left by a killed process (nobody listening) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&socket).expect("bind stale");
    drop(stale);
    assert!(socket.exists());
    let h = Harness::start_in(home, forge, Vec::new()).await;
    ok(&call(&h, "read_issue", json!({"number": ISSUE})).await);
    h.finish().await;
}

#[tokio::test]
async fn the_official_rmcp_client_works_over_the_socket() {
    use rmcp::ServiceExt;
    use rmcp::model::{CallToolRequestParams, ClientConfig};
    use rmcp::transport::StreamableHttpClientTransport;

    let h = Harness::start().await;
    let socket = h.socket();
    let transport = StreamableHttpClientTransport::from_unix_socket(
        socket.to_str().expect("utf-8 path"),
        "http://127.0.0.1:3129/mcp",
    );
    let client = ClientConfig::default()
        .serve(transport)
        .await
        .expect("initialize");
    let tools = client.list_all_tools().await.expect("tools/list");
    assert_eq!(tools.len(), 7);

    let arguments = json!({"number": ISSUE})
        .as_object()
        .cloned()
        .expect("object");
    let read = client
        .call_tool(CallToolRequestParams::new("read_issue").with_arguments(arguments))
        .await
        .expect("read_issue");
    assert_ne!(read.is_error, Some(true));

    let arguments = json!({"number": 99, "body": "hi"})
        .as_object()
        .cloned()
        .expect("object");
    let refused = client
        .call_tool(CallToolRequestParams::new("post_comment").with_arguments(arguments))
        .await
        .expect("post_comment answers");
    assert_eq!(refused.is_error, Some(true));
    let _ = client.cancel().await;
    assert!(h.forge.writes().is_empty(), "{:?}", h.forge.writes());
    h.finish().await;
}
