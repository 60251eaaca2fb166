//! `GiteaClient` / `GiteaForge` against the fake Gitea (and, for malformed
//! answers, a raw loopback stub).

use std::time::Duration;

use bot_bottle_forge::gitea::{GiteaClient, GiteaConfig, GiteaError, GiteaForge};
use bot_bottle_forge::{Forge, ForgeError, IssueState, NewPullRequest};
use bot_bottle_testkit::gitea::{FakeGitea, Membership, NewIssue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const OWNER: &str = "didericis";
const REPO: &str = "bot-bottle";

struct Setup {
    fake: FakeGitea,
    forge: GiteaForge,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_eq!(
                Vec::<bot_bottle_testkit::gitea::GiteaRequest>::new(),
                self.fake.undeclared_statuses(),
                "the fake answered a status its route table does not declare"
            );
        }
    }
}

fn config(api_url: &str) -> GiteaConfig {
    GiteaConfig::new(api_url, OWNER, REPO, "test-token")
}

async fn setup() -> Setup {
    let fake = FakeGitea::start().await.expect("fake gitea");
    fake.add_repo(OWNER, REPO);
    let forge = GiteaForge::new(GiteaClient::new(config(&fake.api_url())).expect("client"));
    Setup { fake, forge }
}

fn issue(title: &str, body: &str) -> NewIssue {
    NewIssue {
        title: title.to_owned(),
        body: body.to_owned(),
        author: "alice".to_owned(),
        ..NewIssue::default()
    }
}

/// A one-shot loopback HTTP server answering every request with `status` and `body`.
async fn stub(status: u16, reason: &str, body: &'static str) -> String {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = vec![0u8; 8192];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        }
    });
    format!("http://{addr}/api/v1")
}

fn stub_forge(url: &str) -> GiteaForge {
    GiteaForge::new(GiteaClient::new(config(url)).expect("client"))
}

#[tokio::test]
async fn member_is_true_on_204_and_false_on_404() {
    let s = setup().await;
    s.fake.add_org_member("bot-bottle", "alice");
    assert!(
        s.forge
            .is_org_member("bot-bottle", "alice")
            .await
            .expect("member")
    );
    assert!(
        !s.forge
            .is_org_member("bot-bottle", "stranger")
            .await
            .expect("not")
    );
    let requests = s.fake.requests();
    assert_eq!("/api/v1/orgs/bot-bottle/members/alice", requests[0].uri);
    assert_eq!(204, requests[0].status);
    assert_eq!(404, requests[1].status);
}

#[tokio::test]
async fn hidden_membership_303_is_a_config_error_and_not_followed() {
    let s = setup().await;
    s.fake.add_org_member("bot-bottle", "alice");
    s.fake.set_membership(Membership::Hidden);
    let error = s
        .forge
        .is_org_member("bot-bottle", "alice")
        .await
        .expect_err("hidden");
    assert!(matches!(
        error,
        ForgeError::Gitea(GiteaError::MembershipHidden { .. })
    ));
    assert!(
        error
            .to_string()
            .contains("hint: use a token whose user is a member")
    );
    let uris: Vec<String> = s.fake.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(
        vec!["/api/v1/orgs/bot-bottle/members/alice".to_owned()],
        uris
    );
}

#[tokio::test]
async fn other_membership_status_is_an_error_with_status_and_body() {
    let url = stub(403, "Forbidden", r#"{"message":"forbidden"}"#).await;
    let error = stub_forge(&url)
        .is_org_member("bot-bottle", "alice")
        .await
        .expect_err("403");
    match error {
        ForgeError::Gitea(GiteaError::Status { status, body, .. }) => {
            assert_eq!(403, status);
            assert_eq!(r#"{"message":"forbidden"}"#, body);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn read_issue_maps_fields_and_sends_the_token() {
    let s = setup().await;
    let number = s.fake.add_issue(
        OWNER,
        REPO,
        NewIssue {
            assignees: vec!["alice".to_owned()],
            labels: vec!["bot-bottle:implementer".to_owned()],
            ..issue("Bug", "broken")
        },
    );
    let read = s.forge.read_issue(number).await.expect("issue");
    assert_eq!(
        (1, "Bug", "broken", IssueState::Open, false),
        (
            read.number,
            read.title.as_str(),
            read.body.as_str(),
            read.state,
            read.is_pull
        )
    );
    assert_eq!(vec!["alice".to_owned()], read.assignees);
    assert_eq!(vec!["bot-bottle:implementer".to_owned()], read.labels);
    let request = &s.fake.requests()[0];
    assert_eq!("/api/v1/repos/didericis/bot-bottle/issues/1", request.uri);
    assert_eq!(Some("token test-token".to_owned()), request.authorization);
}

#[tokio::test]
async fn read_issue_tolerates_a_null_body() {
    let url = stub(
        200,
        "OK",
        r#"{"number":17,"title":"T","body":null,"state":"open","user":null,"assignees":null,"labels":null}"#,
    )
    .await;
    let read = stub_forge(&url).read_issue(17).await.expect("issue");
    assert_eq!("", read.body);
    assert!(read.assignees.is_empty());
}

#[tokio::test]
async fn read_pr_merged_defaults_to_false() {
    let url = stub(200, "OK", r#"{"number":18,"state":"open"}"#).await;
    assert!(!stub_forge(&url).read_pr(18).await.expect("pr").merged);
}

#[tokio::test]
async fn missing_issue_is_a_404_with_the_body() {
    let s = setup().await;
    match s.forge.read_issue(999).await.expect_err("missing") {
        ForgeError::Gitea(GiteaError::Status {
            status, body, path, ..
        }) => {
            assert_eq!(404, status);
            assert!(body.contains("couldn't be found"), "{body}");
            assert_eq!("/repos/didericis/bot-bottle/issues/999", path);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn read_comments_maps_user_login() {
    let s = setup().await;
    let number = s.fake.add_issue(OWNER, REPO, issue("T", ""));
    let first = s.fake.add_comment(OWNER, REPO, number, "alice", "hi");
    let second = s.fake.add_comment(OWNER, REPO, number, "bob", "yo");
    let comments = s.forge.read_comments(number).await.expect("comments");
    assert_eq!(
        vec!["alice", "bob"],
        comments.iter().map(|c| c.user.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(
        vec![
            u64::try_from(first).expect("id"),
            u64::try_from(second).expect("id")
        ],
        comments.iter().map(|c| c.id).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn post_comment_sends_the_body_to_the_issue() {
    let s = setup().await;
    let number = s.fake.add_issue(OWNER, REPO, issue("T", ""));
    let posted = s.forge.post_comment(number, "done ✓").await.expect("post");
    assert_eq!("done ✓", posted.body);
    let request = s.fake.requests().pop().expect("request");
    assert_eq!("POST", request.method);
    assert_eq!(
        "/api/v1/repos/didericis/bot-bottle/issues/1/comments",
        request.uri
    );
    assert_eq!(Some(serde_json::json!({"body": "done ✓"})), request.body);
    assert_eq!(
        vec!["done ✓".to_owned()],
        s.fake.comment_bodies(OWNER, REPO, number)
    );
}

#[tokio::test]
async fn update_description_patches_the_issue_and_accepts_201() {
    let s = setup().await;
    let number = s.fake.add_issue(OWNER, REPO, issue("T", "old"));
    s.forge
        .update_description(number, "edited")
        .await
        .expect("edit");
    let patch = s
        .fake
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .expect("a PATCH");
    assert_eq!(201, patch.status);
    assert!(patch.uri.ends_with("/issues/1"));
    assert_eq!(
        Some(serde_json::json!({"body": "edited", "content_version": 0})),
        patch.body
    );
    assert_eq!(
        Some("edited"),
        s.fake.issue(OWNER, REPO, number).expect("issue")["body"].as_str()
    );
}

#[tokio::test]
async fn stale_content_version_is_a_409_conflict() {
    let s = setup().await;
    let number = s.fake.add_issue(OWNER, REPO, issue("T", "v0"));
    let read = s.forge.client().get_issue(number).await.expect("read");
    assert_eq!(Some(0), read.content_version);
    s.fake.edit_body(OWNER, REPO, number, "a human edit");
    let error = s
        .forge
        .client()
        .edit_issue_body(number, "agent edit", read.content_version)
        .await
        .expect_err("conflict");
    assert!(matches!(error, GiteaError::Conflict { .. }), "{error:?}");
    assert_eq!(Some(409), error.status());
    assert_eq!(
        Some("a human edit"),
        s.fake.issue(OWNER, REPO, number).expect("issue")["body"].as_str()
    );
    // A fresh read carries the new version, so the forge-level edit goes through.
    s.forge
        .update_description(number, "agent edit")
        .await
        .expect("edit");
}

#[tokio::test]
async fn a_pull_request_is_an_issue_with_the_same_number() {
    let s = setup().await;
    let issue_number = s.fake.add_issue(OWNER, REPO, issue("Bug", ""));
    let pr = s
        .forge
        .create_pr(&NewPullRequest {
            title: "Fix".to_owned(),
            body: "Closes #1".to_owned(),
            head: "bot-bottle/issue-1".to_owned(),
            base: "main".to_owned(),
        })
        .await
        .expect("create");
    assert_eq!(issue_number + 1, pr.number, "issues and PRs share numbers");
    let as_issue = s.forge.read_issue(pr.number).await.expect("issue view");
    assert!(as_issue.is_pull);
    assert_eq!("Fix", as_issue.title);
    assert_eq!(
        Some(pr.number),
        s.forge.get_pr_for_issue(pr.number).await.expect("pr")
    );
    assert_eq!(
        Some(pr.number),
        s.forge
            .get_pr_for_issue(issue_number)
            .await
            .expect("closing pr")
    );
    // Comments on a PR go through the issue endpoint.
    s.forge
        .post_comment(pr.number, "ready")
        .await
        .expect("comment");
    assert_eq!(
        vec!["ready".to_owned()],
        s.fake.comment_bodies(OWNER, REPO, pr.number)
    );
}

#[tokio::test]
async fn get_pr_for_issue_is_none_for_a_plain_issue() {
    let s = setup().await;
    let number = s.fake.add_issue(OWNER, REPO, issue("Bug", ""));
    s.fake
        .add_pull(OWNER, REPO, issue("Other", "see #1"), "feature", "main");
    assert_eq!(None, s.forge.get_pr_for_issue(number).await.expect("none"));
}

#[tokio::test]
async fn is_pr_open_follows_the_state() {
    let s = setup().await;
    let pr = s
        .fake
        .add_pull(OWNER, REPO, issue("PR", ""), "feature", "main");
    assert!(s.forge.is_pr_open(pr).await.expect("open"));
    s.fake.close(OWNER, REPO, pr, false);
    assert!(!s.forge.is_pr_open(pr).await.expect("closed"));
}

#[tokio::test]
async fn read_pr_maps_fields_including_merged() {
    let s = setup().await;
    let pr = s
        .fake
        .add_pull(OWNER, REPO, issue("Fix", "patch"), "feature", "main");
    s.fake.close(OWNER, REPO, pr, true);
    let read = s.forge.read_pr(pr).await.expect("pr");
    assert_eq!(
        (1, "Fix", "patch", IssueState::Closed, true),
        (
            read.number,
            read.title.as_str(),
            read.body.as_str(),
            read.state,
            read.merged
        )
    );
    assert_eq!("feature", read.head.name);
    assert_eq!(40, read.head.sha.len());
    assert_eq!("main", read.base.name);
    assert_eq!(
        "/api/v1/repos/didericis/bot-bottle/pulls/1",
        s.fake.requests()[0].uri
    );
    // An issue that is not a PR has no pull view.
    let plain = s.fake.add_issue(OWNER, REPO, issue("Bug", ""));
    assert!(matches!(
        s.forge.read_pr(plain).await,
        Err(ForgeError::Gitea(GiteaError::Status { status: 404, .. }))
    ));
}

#[tokio::test]
async fn create_pr_is_idempotent_for_the_same_head_and_base() {
    let s = setup().await;
    let request = NewPullRequest {
        title: "Fix".to_owned(),
        body: "Closes #1".to_owned(),
        head: "bot-bottle/issue-1".to_owned(),
        base: "main".to_owned(),
    };
    let first = s.forge.create_pr(&request).await.expect("first");
    let second = s.forge.create_pr(&request).await.expect("second");
    assert_eq!(first.number, second.number);
    assert_eq!(vec![first.number], s.fake.pull_numbers(OWNER, REPO));
    // The raw endpoint refuses a duplicate with 409.
    let duplicate = s
        .forge
        .client()
        .create_pull(&request)
        .await
        .expect_err("duplicate");
    assert!(matches!(duplicate, GiteaError::Conflict { .. }));
}

#[tokio::test]
async fn labels_are_created_added_listed_and_removed() {
    let s = setup().await;
    let number = s.fake.add_issue(OWNER, REPO, issue("Bug", ""));
    s.forge
        .add_label(number, "bot-bottle-status:running")
        .await
        .expect("add");
    s.forge
        .add_label(number, "bot-bottle-status:running")
        .await
        .expect("again");
    let names: Vec<String> = s
        .forge
        .list_labels(number)
        .await
        .expect("list")
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(vec!["bot-bottle-status:running".to_owned()], names);
    s.forge
        .remove_label(number, "bot-bottle-status:running")
        .await
        .expect("remove");
    s.forge
        .remove_label(number, "bot-bottle-status:running")
        .await
        .expect("removing a detached label is fine");
    assert!(s.fake.label_names(OWNER, REPO, number).is_empty());
}

#[tokio::test]
async fn every_call_is_bounded_by_the_timeout() {
    let fake = FakeGitea::start().await.expect("fake");
    fake.add_repo(OWNER, REPO);
    fake.set_delay(Duration::from_secs(3));
    let mut slow = config(&fake.api_url());
    slow.timeout = Duration::from_millis(200);
    let forge = GiteaForge::new(GiteaClient::new(slow).expect("client"));
    let started = std::time::Instant::now();
    let error = forge.read_issue(1).await.expect_err("timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(error, ForgeError::Gitea(GiteaError::Timeout { .. })),
        "{error:?}"
    );
}

#[tokio::test]
async fn scoped_gitea_writes_only_inside_the_scope_and_grows_with_its_pr() {
    let s = setup().await;
    let assigned = s.fake.add_issue(OWNER, REPO, issue("Assigned", ""));
    let other = s.fake.add_issue(OWNER, REPO, issue("Other", ""));
    let inner: std::sync::Arc<dyn Forge> = std::sync::Arc::new(s.forge.clone());
    let scoped = bot_bottle_forge::ScopedForge::new(inner, assigned, [])
        .with_allowed_head("bot-bottle/issue-1");

    // Reads anywhere.
    assert_eq!("Other", scoped.read_issue(other).await.expect("read").title);
    // Writes elsewhere never reach Gitea.
    let before = s.fake.requests().len();
    assert!(scoped.post_comment(other, "spam").await.is_err());
    assert!(scoped.update_description(other, "tamper").await.is_err());
    assert_eq!(
        before,
        s.fake.requests().len(),
        "a refused write made a request"
    );
    assert!(s.fake.comment_bodies(OWNER, REPO, other).is_empty());

    let pr = scoped
        .create_pr(&NewPullRequest {
            title: "Fix".to_owned(),
            body: format!("Closes #{assigned}"),
            head: "bot-bottle/issue-1".to_owned(),
            base: "main".to_owned(),
        })
        .await
        .expect("create");
    assert_eq!(vec![assigned, pr.number], scoped.writable());
    scoped
        .post_comment(pr.number, "ready for review")
        .await
        .expect("comment on own PR");
    scoped
        .post_comment(assigned, "opened a PR")
        .await
        .expect("comment on issue");
    assert_eq!(
        vec!["ready for review".to_owned()],
        s.fake.comment_bodies(OWNER, REPO, pr.number)
    );
}

#[tokio::test]
async fn scope_grows_when_the_issues_pr_is_discovered() {
    let s = setup().await;
    let assigned = s.fake.add_issue(OWNER, REPO, issue("Assigned", ""));
    let pr = s.fake.add_pull(
        OWNER,
        REPO,
        issue("Fix", &format!("Fixes #{assigned}")),
        "bot-bottle/issue-1",
        "main",
    );
    let inner: std::sync::Arc<dyn Forge> = std::sync::Arc::new(s.forge.clone());
    let scoped = bot_bottle_forge::ScopedForge::new(inner, assigned, []);
    assert!(scoped.post_comment(pr, "x").await.is_err());
    assert_eq!(
        Some(pr),
        scoped.get_pr_for_issue(assigned).await.expect("lookup")
    );
    scoped.post_comment(pr, "x").await.expect("now writable");
}
