//! The sidecar in front of the real Gitea client, against the fake Gitea: statuses the
//! forge answers reach the op log, and the token the client sends never does.

use std::sync::Arc;

use bot_bottle_forge::gitea::{GiteaClient, GiteaConfig, GiteaForge};
use bot_bottle_sidecars::{
    FORGE_OPS_LOG, FORGE_SOCKET, ForgeContext, ForgeSidecar, QUEUE_DIR, client,
};
use bot_bottle_testkit::gitea::{FakeGitea, NewIssue};
use serde_json::json;

use crate::support::{assert_no_token, forward_to, summary};

/// The fake Gitea takes `token <login>`; this login is the bot's.
const BOT_TOKEN: &str = "bot-login-7c1f0e";

#[tokio::test]
async fn gitea_statuses_reach_the_log_and_the_token_does_not() {
    let fake = FakeGitea::start().await.expect("fake gitea");
    fake.add_repo("acme", "widgets");
    let issue = fake.add_issue(
        "acme",
        "widgets",
        NewIssue {
            title: "Crash on start".into(),
            body: "It crashes.".into(),
            author: "alice".into(),
            ..NewIssue::default()
        },
    );
    let forge = GiteaForge::new(
        GiteaClient::new(GiteaConfig::new(
            fake.api_url(),
            "acme",
            "widgets",
            BOT_TOKEN,
        ))
        .expect("client"),
    );
    let home = tempfile::tempdir().expect("tempdir");
    let state = home.path().join("state/b");
    let sidecar = ForgeSidecar::start(
        ForgeContext {
            forge: Arc::new(forge),
            owner: "acme".into(),
            repo: "widgets".into(),
            issue,
            prs: Vec::new(),
            branch: "bot-bottle/crash-x1y2z".into(),
            base: "main".into(),
        },
        &state.join("run").join(FORGE_SOCKET),
        &state.join(FORGE_OPS_LOG),
        &state.join(QUEUE_DIR),
    )
    .await
    .expect("start");
    let (url, forward) = forward_to(&state.join("run").join(FORGE_SOCKET)).await;

    let read = client::call_tool(&url, "read_issue", json!({"number": issue}))
        .await
        .expect("read");
    assert!(!read.is_error, "{}", read.text);
    let missing = client::call_tool(&url, "read_issue", json!({"number": 404}))
        .await
        .expect("read missing");
    assert!(missing.is_error);
    assert!(
        missing.text.contains("hint: check the number"),
        "{}",
        missing.text
    );
    let posted = client::call_tool(
        &url,
        "post_comment",
        json!({"number": issue, "body": "On it"}),
    )
    .await
    .expect("post");
    assert!(!posted.is_error, "{}", posted.text);
    assert_eq!(fake.comment_bodies("acme", "widgets", issue), vec!["On it"]);
    let authorizations: Vec<Option<String>> = fake
        .requests()
        .into_iter()
        .map(|request| request.authorization)
        .collect();
    assert!(
        authorizations
            .iter()
            .all(|a| a.as_deref() == Some(&format!("token {BOT_TOKEN}"))),
        "{authorizations:?}"
    );

    forward.abort();
    sidecar.shutdown().await;
    let events = bot_bottle_egress::audit::read(&state.join(FORGE_OPS_LOG)).expect("read");
    assert_eq!(
        events.iter().map(|e| e.status).collect::<Vec<_>>(),
        vec![None, Some(404), None]
    );
    assert_eq!(
        summary(&events)[1],
        (
            "read_issue".into(),
            "allow".into(),
            Some("#404".into()),
            "read_issue on #404 failed: the forge answered 404".into()
        )
    );
    assert_no_token(home.path());
    let log = std::fs::read_to_string(state.join(FORGE_OPS_LOG)).expect("log");
    assert!(!log.contains(BOT_TOKEN));
}
