//! Docker: the real Claude Code CLI asks a human for egress through the supervise sidecar
//! (MCP), a human approves from the queue, and the agent's next request goes through.

use std::time::{Duration, Instant};

use bot_bottle_sidecars::approvals::{ApprovalStore, Decision};
use bot_bottle_testkit::Script;
use bot_bottle_testkit::script::Turn;
use serde_json::json;

use crate::agents::{CUSTODY_BOTTLE, tls_model};
use crate::common::{Project, slug_of, stderr};

#[test]
fn docker_claude_asks_for_egress_through_supervise_and_gets_it() {
    let real_key = "sk-ant-api03-SUPERVISETEST0123456789abcdefghijklmnopqrstuvwxyzABC-test";
    let mut project = Project::new();
    let (_model, _rt) = tls_model(
        &mut project,
        Script::new(vec![
            Turn::Tool {
                name: "mcp__supervise__current_policy".into(),
                input: json!({}),
            },
            Turn::Tool {
                name: "mcp__supervise__request_egress".into(),
                input: json!({"host": "echo.example", "methods": ["GET"], "reason": "fetch the fixture data"}),
            },
            Turn::Shell {
                command: "curl -s -o /dev/null -w 'echo:%{http_code}' https://echo.example/get > /workspace/result.txt".into(),
            },
            Turn::Text("done".into()),
        ]),
        real_key,
    );
    let bottle = CUSTODY_BOTTLE.replacen("---\n", "---\nsupervise: true\n", 1);
    project
        .agent(
            "asker",
            "---\nprovider: claude\nbottles: asking\n---\nYou ask before you reach out.\n",
        )
        .bottle("asking", &bottle);
    let home = project.home.path().to_owned();
    let human = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            assert!(Instant::now() < deadline, "no approval was filed");
            if let Ok(store) = ApprovalStore::open(ApprovalStore::default_path(&home))
                && let Some(pending) = store.list(true, None, 10).unwrap().into_iter().next()
            {
                store
                    .decide(&pending.id, &Decision::AllowOnce, "test-human")
                    .unwrap();
                return pending;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let out = project.run(&[
        "start",
        "asker",
        "--headless",
        "--prompt",
        "Fetch it",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let slug = slug_of(&out);
    let approval = human.join().unwrap();
    assert_eq!(approval.host.as_deref(), Some("echo.example"));
    assert_eq!(
        approval.agent_reason.as_deref(),
        Some("fetch the fixture data")
    );
    assert_eq!(
        std::fs::read_to_string(project.path().join("result.txt")).unwrap(),
        "echo:200"
    );
    let events = project.audit_lines(&slug);
    let supervise: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["kind"] == "supervise").collect();
    assert!(
        supervise.iter().any(|e| e["reason"] == "request_egress"
            && e["decision"] == "allow"
            && e["detail"].as_str().unwrap().contains("test-human")),
        "{events:#?}"
    );
    assert!(supervise.iter().any(|e| e["reason"] == "current_policy"));
    assert!(
        events.iter().any(|e| e["kind"] == "request"
            && e["host"] == "echo.example"
            && e["decision"] == "allow"),
        "{events:#?}"
    );
    assert!(events.iter().any(|e| e["kind"] == "policy-update"));
    let verify = project.run(&["audit", "verify", &slug]);
    assert_eq!(verify.status.code(), Some(0));
}
