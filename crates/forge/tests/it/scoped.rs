//! `ScopedForge`: read anywhere, write only to the assigned issue and its PRs.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bot_bottle_forge::{
    BranchRef, Comment, Forge, ForgeError, Issue, IssueState, Label, NewPullRequest, PullRequest,
    ScopedForge, WriteOperation,
};

/// In-memory forge that records every write it receives.
#[derive(Default)]
struct RecordingForge {
    writes: Mutex<Vec<(String, u64, String)>>,
}

impl RecordingForge {
    fn writes(&self) -> Vec<(String, u64, String)> {
        self.writes.lock().expect("lock").clone()
    }

    fn record(&self, op: &str, number: u64, body: &str) {
        self.writes
            .lock()
            .expect("lock")
            .push((op.to_owned(), number, body.to_owned()));
    }
}

fn pr(number: u64, head: &str) -> PullRequest {
    PullRequest {
        number,
        title: "pr".to_owned(),
        body: "b".to_owned(),
        state: IssueState::Open,
        merged: false,
        head: BranchRef {
            name: head.to_owned(),
            sha: String::new(),
        },
        base: BranchRef {
            name: "main".to_owned(),
            sha: String::new(),
        },
        author: "bot".to_owned(),
    }
}

#[async_trait]
impl Forge for RecordingForge {
    async fn read_issue(&self, number: u64) -> Result<Issue, ForgeError> {
        Ok(Issue {
            number,
            title: "t".to_owned(),
            body: "b".to_owned(),
            state: IssueState::Open,
            author: "alice".to_owned(),
            assignees: vec![],
            labels: vec![],
            is_pull: false,
            updated_at: String::new(),
        })
    }

    async fn read_pr(&self, number: u64) -> Result<PullRequest, ForgeError> {
        Ok(pr(number, "feature"))
    }

    async fn read_comments(&self, _number: u64) -> Result<Vec<Comment>, ForgeError> {
        Ok(vec![Comment {
            id: 1,
            user: "alice".to_owned(),
            body: "hi".to_owned(),
            created_at: String::new(),
        }])
    }

    async fn post_comment(&self, number: u64, body: &str) -> Result<Comment, ForgeError> {
        self.record("post_comment", number, body);
        Ok(Comment {
            id: 2,
            user: "bot".to_owned(),
            body: body.to_owned(),
            created_at: String::new(),
        })
    }

    async fn update_description(&self, number: u64, body: &str) -> Result<(), ForgeError> {
        self.record("update_description", number, body);
        Ok(())
    }

    async fn is_org_member(&self, _org: &str, username: &str) -> Result<bool, ForgeError> {
        Ok(username == "member")
    }

    async fn get_pr_for_issue(&self, number: u64) -> Result<Option<u64>, ForgeError> {
        Ok(match number {
            17 => Some(99),
            500 => Some(501),
            _ => None,
        })
    }

    async fn is_pr_open(&self, _number: u64) -> Result<bool, ForgeError> {
        Ok(true)
    }

    async fn create_pr(&self, request: &NewPullRequest) -> Result<PullRequest, ForgeError> {
        self.record("create_pr", 0, &request.head);
        Ok(pr(77, &request.head))
    }

    async fn list_labels(&self, _number: u64) -> Result<Vec<Label>, ForgeError> {
        Ok(vec![])
    }

    async fn add_label(&self, number: u64, name: &str) -> Result<(), ForgeError> {
        self.record("add_label", number, name);
        Ok(())
    }

    async fn remove_label(&self, number: u64, name: &str) -> Result<(), ForgeError> {
        self.record("remove_label", number, name);
        Ok(())
    }
}

fn scoped() -> (Arc<RecordingForge>, ScopedForge) {
    let inner = Arc::new(RecordingForge::default());
    let scoped = ScopedForge::new(inner.clone(), 17, [42]);
    (inner, scoped)
}

#[tokio::test]
async fn reads_pass_through_to_any_number() {
    let (_, scoped) = scoped();
    assert_eq!(123, scoped.read_issue(123).await.expect("issue").number);
    assert_eq!(
        "alice",
        scoped.read_comments(500).await.expect("comments")[0].user
    );
    let read = scoped.read_pr(999).await.expect("pr");
    assert_eq!(999, read.number);
    assert!(!read.merged);
    assert!(scoped.list_labels(500).await.expect("labels").is_empty());
}

#[tokio::test]
async fn membership_and_pr_lookups_delegate() {
    let (_, scoped) = scoped();
    assert!(
        scoped
            .is_org_member("bot-bottle", "member")
            .await
            .expect("m")
    );
    assert!(
        !scoped
            .is_org_member("bot-bottle", "stranger")
            .await
            .expect("s")
    );
    assert!(scoped.is_pr_open(8000).await.expect("open"));
}

#[tokio::test]
async fn writable_set_is_the_issue_plus_its_prs() {
    let (_, scoped) = scoped();
    assert_eq!(vec![17, 42], scoped.writable());
}

#[tokio::test]
async fn writes_to_the_assigned_issue_and_pr_are_allowed() {
    let (inner, scoped) = scoped();
    scoped.post_comment(17, "done").await.expect("comment");
    scoped
        .update_description(42, "new body")
        .await
        .expect("edit");
    scoped
        .add_label(17, "bot-bottle-status:frozen")
        .await
        .expect("label");
    scoped.remove_label(42, "x").await.expect("unlabel");
    assert_eq!(
        vec![
            ("post_comment".to_owned(), 17, "done".to_owned()),
            ("update_description".to_owned(), 42, "new body".to_owned()),
            (
                "add_label".to_owned(),
                17,
                "bot-bottle-status:frozen".to_owned()
            ),
            ("remove_label".to_owned(), 42, "x".to_owned()),
        ],
        inner.writes()
    );
}

#[tokio::test]
async fn writes_outside_the_scope_are_refused_and_never_reach_the_forge() {
    let (inner, scoped) = scoped();
    let error = scoped.post_comment(500, "spam").await.expect_err("refused");
    let scope = error.as_scope().expect("a scope error");
    assert_eq!(WriteOperation::PostComment, scope.operation);
    assert_eq!("#500", scope.target);
    assert!(
        scope.reason.contains("writable: #17, #42"),
        "{}",
        scope.reason
    );
    assert!(error.to_string().contains("#500"));
    for result in [
        scoped.update_description(500, "tamper").await,
        scoped.add_label(500, "x").await,
        scoped.remove_label(500, "x").await,
    ] {
        assert!(result.expect_err("refused").as_scope().is_some());
    }
    assert_eq!(Vec::<(String, u64, String)>::new(), inner.writes());
}

#[tokio::test]
async fn discovering_the_assigned_issues_pr_makes_it_writable() {
    let (inner, scoped) = scoped();
    assert!(scoped.post_comment(99, "early").await.is_err());
    assert_eq!(Some(99), scoped.get_pr_for_issue(17).await.expect("lookup"));
    assert_eq!(vec![17, 42, 99], scoped.writable());
    scoped.post_comment(99, "now").await.expect("allowed");
    assert_eq!(
        vec![("post_comment".to_owned(), 99, "now".to_owned())],
        inner.writes()
    );
}

#[tokio::test]
async fn discovering_another_issues_pr_does_not_grow_the_scope() {
    let (_, scoped) = scoped();
    assert_eq!(
        Some(501),
        scoped.get_pr_for_issue(500).await.expect("lookup")
    );
    assert_eq!(vec![17, 42], scoped.writable());
    assert!(scoped.post_comment(501, "x").await.is_err());
}

#[tokio::test]
async fn creating_a_pr_through_the_scope_makes_it_writable() {
    let (_, scoped) = scoped();
    let created = scoped
        .create_pr(&NewPullRequest {
            title: "Fix".to_owned(),
            body: "Closes #17".to_owned(),
            head: "bot/issue-17".to_owned(),
            base: "main".to_owned(),
        })
        .await
        .expect("create");
    assert_eq!(77, created.number);
    assert_eq!(vec![17, 42, 77], scoped.writable());
}

#[tokio::test]
async fn create_pr_from_another_branch_is_refused_when_the_head_is_pinned() {
    let inner = Arc::new(RecordingForge::default());
    let scoped = ScopedForge::new(inner.clone(), 17, []).with_allowed_head("bot/issue-17");
    let error = scoped
        .create_pr(&NewPullRequest {
            title: "Sneaky".to_owned(),
            body: String::new(),
            head: "other".to_owned(),
            base: "main".to_owned(),
        })
        .await
        .expect_err("refused");
    let scope = error.as_scope().expect("scope error");
    assert_eq!(WriteOperation::CreatePr, scope.operation);
    assert_eq!("branch other", scope.target);
    assert!(inner.writes().is_empty());
    assert_eq!(vec![17], scoped.writable());
}

/// Captures formatted tracing output for one test.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn refusals_are_logged_with_operation_target_and_reason() {
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // The test runtime is single-threaded, so the thread-local default covers
    // every poll of the future below.
    let _guard = tracing::subscriber::set_default(subscriber);
    let (_, scoped) = scoped();
    let _ = scoped.update_description(500, "tamper").await;
    let logged = String::from_utf8(capture.0.lock().expect("lock").clone()).expect("utf8");
    assert!(logged.contains("WARN"), "{logged}");
    assert!(
        logged.contains("operation=\"update_description\""),
        "{logged}"
    );
    assert!(logged.contains("target=#500"), "{logged}");
    assert!(
        logged.contains("reason=outside the assigned scope"),
        "{logged}"
    );
}
