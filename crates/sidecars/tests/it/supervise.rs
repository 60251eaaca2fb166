//! The supervise sidecar through a real socket: the agent asks, a human (another
//! connection to the queue, as the CLI and the dashboard are) decides.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bot_bottle_core::policy::{EgressPolicy, EgressRule};
use bot_bottle_egress::audit::{AuditDecision, EventDraft, EventKind};
use bot_bottle_sidecars::approvals::{ApprovalStore, Decision, Kind, Status};
use bot_bottle_sidecars::client::call_tool;
use bot_bottle_sidecars::supervise::{PolicyControl, SuperviseContext, SuperviseSidecar};
use serde_json::json;

use crate::support::forward_to;

#[derive(Default)]
struct FakeControl {
    rules: Mutex<Vec<(EgressRule, bool)>>,
    lines: Mutex<Vec<EventDraft>>,
}

impl PolicyControl for FakeControl {
    fn current(&self) -> EgressPolicy {
        EgressPolicy {
            rules: self
                .rules
                .lock()
                .expect("lock")
                .iter()
                .map(|(r, _)| r.clone())
                .collect(),
            ..EgressPolicy::default()
        }
    }

    fn allow(&self, rule: EgressRule, always: bool) -> Result<(), String> {
        self.rules.lock().expect("lock").push((rule, always));
        Ok(())
    }

    fn record(&self, draft: EventDraft) -> Result<(), String> {
        self.lines.lock().expect("lock").push(draft);
        Ok(())
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    url: String,
    human: ApprovalStore,
    control: Arc<FakeControl>,
    sidecar: SuperviseSidecar,
}

async fn setup(timeout: Duration) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = ApprovalStore::default_path(dir.path());
    let control = Arc::new(FakeControl::default());
    let socket = dir.path().join("run/supervise.sock");
    let sidecar = SuperviseSidecar::start(
        SuperviseContext {
            slug: "b1".to_owned(),
            store: Arc::new(ApprovalStore::open(&db).expect("store")),
            control: control.clone(),
            timeout,
        },
        &socket,
    )
    .await
    .expect("start");
    let (url, _forward) = forward_to(&socket).await;
    Setup {
        url,
        human: ApprovalStore::open(&db).expect("human's connection"),
        control,
        sidecar,
        _dir: dir,
    }
}

/// Decides the first pending approval once it appears.
fn decide_when_filed(db: &ApprovalStore, decision: Decision) -> String {
    for _ in 0..200 {
        if let Some(pending) = db.list(true, None, 10).expect("list").into_iter().next() {
            db.decide(&pending.id, &decision, "alice").expect("decide");
            return pending
                .agent_reason
                .or(pending.question)
                .unwrap_or_default();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing was filed");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_egress_waits_for_the_human_and_adds_the_rule() {
    let setup = setup(Duration::from_secs(20)).await;
    let human = ApprovalStore::open(setup.human.path()).expect("open");
    let decider = std::thread::spawn(move || decide_when_filed(&human, Decision::AllowAlways));
    let output = call_tool(
        &setup.url,
        "request_egress",
        json!({"host": "docs.example.org", "methods": ["GET"], "reason": "read the API docs"}),
    )
    .await
    .expect("call");
    assert!(!output.is_error, "{}", output.text);
    assert!(
        output.text.contains("later sessions too"),
        "{}",
        output.text
    );
    assert_eq!(decider.join().expect("decider"), "read the API docs");
    let rules = setup.control.rules.lock().expect("lock").clone();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].0.host, "docs.example.org");
    assert_eq!(rules[0].0.methods, vec!["GET"]);
    assert!(rules[0].1, "allow-always keeps the rule");
    let policy = call_tool(&setup.url, "current_policy", json!({}))
        .await
        .expect("call");
    assert!(policy.text.contains("docs.example.org"), "{}", policy.text);
    let lines = setup.control.lines.lock().expect("lock").clone();
    assert!(lines.iter().all(|l| l.kind == EventKind::Supervise));
    assert_eq!(lines[0].decision, AuditDecision::Allow);
    assert!(
        lines[0]
            .detail
            .as_deref()
            .unwrap_or_default()
            .contains("by alice")
    );
    setup.sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denial_and_a_timeout_leave_the_policy_alone() {
    let setup = setup(Duration::from_secs(1)).await;
    let human = ApprovalStore::open(setup.human.path()).expect("open");
    let decider = std::thread::spawn(move || {
        decide_when_filed(
            &human,
            Decision::Deny {
                reason: Some("not needed".into()),
            },
        )
    });
    let denied = call_tool(
        &setup.url,
        "request_egress",
        json!({"host": "paste.example", "reason": "upload"}),
    )
    .await
    .expect("call");
    decider.join().expect("decider");
    assert!(denied.is_error);
    assert!(denied.text.contains("not needed"), "{}", denied.text);
    // Nobody answers: the call ends after the timeout, denied as `timeout`.
    let timed_out = call_tool(
        &setup.url,
        "ask_human",
        json!({"question": "which branch?"}),
    )
    .await
    .expect("call");
    assert!(timed_out.is_error);
    let all = setup.human.list(false, None, 10).expect("list");
    let question = all
        .iter()
        .find(|a| a.kind == Kind::Question)
        .expect("question");
    assert_eq!(question.status, Status::Denied);
    assert_eq!(question.decided_by.as_deref(), Some("timeout"));
    assert!(setup.control.rules.lock().expect("lock").is_empty());
    setup.sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn questions_get_answers_and_hostile_arguments_are_refused_unfiled() {
    let setup = setup(Duration::from_secs(20)).await;
    let human = ApprovalStore::open(setup.human.path()).expect("open");
    let decider =
        std::thread::spawn(move || decide_when_filed(&human, Decision::Answer("use main".into())));
    let answer = call_tool(
        &setup.url,
        "ask_human",
        json!({"question": "which branch?"}),
    )
    .await
    .expect("call");
    decider.join().expect("decider");
    assert_eq!(answer.text, "use main");
    let filed_before = setup.human.list(false, None, 100).expect("list").len();
    for (tool, arguments) in [
        ("request_egress", json!({"host": "x.example"})),
        (
            "request_egress",
            json!({"host": "x.example", "reason": "  "}),
        ),
        (
            "request_egress",
            json!({"host": "not a host/", "reason": "r"}),
        ),
        (
            "request_egress",
            json!({"host": "x.example", "reason": "r", "paths": ["no-slash"]}),
        ),
        (
            "request_egress",
            json!({"host": "x.example", "reason": "r", "extra": 1}),
        ),
        (
            "request_egress",
            json!({"host": "x.example", "reason": "r".repeat(5000)}),
        ),
        ("ask_human", json!({"question": "a\u{0}b"})),
        ("ask_human", json!({})),
        ("current_policy", json!({"sneaky": true})),
    ] {
        let out = call_tool(&setup.url, tool, arguments.clone())
            .await
            .expect("call");
        assert!(out.is_error, "{tool} {arguments}: {}", out.text);
        assert!(out.text.contains("hint:"), "{}", out.text);
    }
    assert_eq!(
        setup.human.list(false, None, 100).expect("list").len(),
        filed_before,
        "a refused call filed an approval"
    );
    let refused = setup
        .control
        .lines
        .lock()
        .expect("lock")
        .iter()
        .filter(|l| l.decision == AuditDecision::Block)
        .count();
    assert_eq!(refused, 9, "every refusal is audited");
    // The sidecar stops: whatever it filed and nobody decided is denied.
    setup
        .human
        .file(&bot_bottle_sidecars::approvals::NewApproval {
            slug: "b1".into(),
            question: Some("left over".into()),
            ..Default::default()
        })
        .expect("file");
    let human = ApprovalStore::open(setup.human.path()).expect("open");
    setup.sidecar.shutdown().await;
    assert_eq!(human.pending_count("b1").expect("count"), 0);
}
