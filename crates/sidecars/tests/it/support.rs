//! A fake forge that records calls, and a harness that runs a sidecar in a temporary
//! state dir and reaches it the way the bottle does: through a loopback TCP port
//! forwarded to its Unix socket (the shim's job in a bottle).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bot_bottle_egress::audit::{self, AuditEvent};
use bot_bottle_forge::{
    BranchRef, Comment, Forge, ForgeError, Issue, IssueState, Label, NewPullRequest, PullRequest,
};
use bot_bottle_sidecars::queue::{self, QueuedEvent};
use bot_bottle_sidecars::{FORGE_OPS_LOG, FORGE_SOCKET, ForgeContext, ForgeSidecar, QUEUE_DIR};

/// The token the fake forge "holds". It must never reach the op log or the queue.
pub const TOKEN: &str = "gta_5ecr3t0k3n_9f8e7d6c5b4a39281706f5e4d3c2b1a0";

pub const OWNER: &str = "acme";
pub const REPO: &str = "widgets";
pub const ISSUE: u64 = 17;
/// A pull request of someone else, readable but not writable.
pub const OTHER_PR: u64 = 5;
/// An issue of someone else, readable but not writable.
pub const OTHER_ISSUE: u64 = 99;
pub const BRANCH: &str = "bot-bottle/fix-login-k3j2";

#[derive(Default)]
struct State {
    issues: BTreeMap<u64, Issue>,
    pulls: BTreeMap<u64, PullRequest>,
    comments: BTreeMap<u64, Vec<Comment>>,
    /// Every call, as `operation #number` (writes only; reads are `read_* #n`).
    calls: Vec<String>,
    next_number: u64,
    next_comment: u64,
    write_delay: Option<Duration>,
}

/// An in-memory forge with issues #17 (assigned) and #99, and PR #5 from `feature`.
#[derive(Clone)]
pub struct FakeForge {
    state: Arc<Mutex<State>>,
}

fn issue(number: u64, title: &str, body: &str, is_pull: bool) -> Issue {
    Issue {
        number,
        title: title.into(),
        body: body.into(),
        state: IssueState::Open,
        author: "alice".into(),
        assignees: vec!["bot".into()],
        labels: vec!["bot-bottle:claude".into()],
        is_pull,
        updated_at: "2026-12-01T10:00:00Z".into(),
    }
}

impl FakeForge {
    pub fn new() -> Self {
        let mut state = State {
            next_number: 100,
            next_comment: 1000,
            ..State::default()
        };
        state.issues.insert(
            ISSUE,
            issue(
                ISSUE,
                "Login fails with an empty password",
                // A token-like string in forge content: the agent may read it, the log
                // must not hold it.
                &format!("Steps: log in with no password.\nOur CI uses {TOKEN}, see the wiki."),
                false,
            ),
        );
        state.issues.insert(
            OTHER_ISSUE,
            issue(OTHER_ISSUE, "Unrelated", "someone else's", false),
        );
        state.issues.insert(
            OTHER_PR,
            issue(OTHER_PR, "Someone's feature", "Adds a feature", true),
        );
        state.pulls.insert(
            OTHER_PR,
            PullRequest {
                number: OTHER_PR,
                title: "Someone's feature".into(),
                body: "Adds a feature".into(),
                state: IssueState::Open,
                merged: false,
                head: BranchRef {
                    name: "feature".into(),
                    sha: "abc".into(),
                },
                base: BranchRef {
                    name: "main".into(),
                    sha: "def".into(),
                },
                author: "carol".into(),
            },
        );
        state.comments.insert(
            ISSUE,
            vec![Comment {
                id: 1,
                user: "alice".into(),
                body: "Please fix soon".into(),
                created_at: "2026-12-01T10:05:00Z".into(),
            }],
        );
        Self {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The calls that reached the forge, in order.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// The calls that wrote (anything but `read_*`).
    pub fn writes(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|call| !call.starts_with("read_"))
            .collect()
    }

    pub fn comments(&self, number: u64) -> Vec<String> {
        self.lock()
            .comments
            .get(&number)
            .map(|comments| comments.iter().map(|c| c.body.clone()).collect())
            .unwrap_or_default()
    }

    pub fn body(&self, number: u64) -> Option<String> {
        self.lock().issues.get(&number).map(|i| i.body.clone())
    }

    /// Makes every write wait this long before it lands.
    pub fn set_write_delay(&self, delay: Duration) {
        self.lock().write_delay = Some(delay);
    }

    fn record(&self, call: String) {
        self.lock().calls.push(call);
    }

    async fn delay(&self) {
        let delay = self.lock().write_delay;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
    }

    fn not_found(operation: &'static str, number: u64) -> ForgeError {
        ForgeError::Other {
            operation,
            message: format!("#{number} does not exist"),
        }
    }
}

#[async_trait]
impl Forge for FakeForge {
    async fn read_issue(&self, number: u64) -> Result<Issue, ForgeError> {
        self.record(format!("read_issue #{number}"));
        self.lock()
            .issues
            .get(&number)
            .cloned()
            .ok_or_else(|| Self::not_found("read_issue", number))
    }

    async fn read_pr(&self, number: u64) -> Result<PullRequest, ForgeError> {
        self.record(format!("read_pr #{number}"));
        self.lock()
            .pulls
            .get(&number)
            .cloned()
            .ok_or_else(|| Self::not_found("read_pr", number))
    }

    async fn read_comments(&self, number: u64) -> Result<Vec<Comment>, ForgeError> {
        self.record(format!("read_comments #{number}"));
        Ok(self
            .lock()
            .comments
            .get(&number)
            .cloned()
            .unwrap_or_default())
    }

    async fn post_comment(&self, number: u64, body: &str) -> Result<Comment, ForgeError> {
        self.delay().await;
        self.record(format!("post_comment #{number}"));
        let mut state = self.lock();
        if !state.issues.contains_key(&number) {
            return Err(Self::not_found("post_comment", number));
        }
        state.next_comment += 1;
        let comment = Comment {
            id: state.next_comment,
            user: "bot".into(),
            body: body.into(),
            created_at: "2026-12-01T11:00:00Z".into(),
        };
        state
            .comments
            .entry(number)
            .or_default()
            .push(comment.clone());
        Ok(comment)
    }

    async fn update_description(&self, number: u64, body: &str) -> Result<(), ForgeError> {
        self.delay().await;
        self.record(format!("update_description #{number}"));
        let mut state = self.lock();
        let issue = state
            .issues
            .get_mut(&number)
            .ok_or_else(|| Self::not_found("update_description", number))?;
        issue.body = body.into();
        if let Some(pull) = state.pulls.get_mut(&number) {
            pull.body = body.into();
        }
        Ok(())
    }

    async fn is_org_member(&self, _org: &str, _username: &str) -> Result<bool, ForgeError> {
        Ok(true)
    }

    async fn get_pr_for_issue(&self, _number: u64) -> Result<Option<u64>, ForgeError> {
        Ok(None)
    }

    async fn is_pr_open(&self, number: u64) -> Result<bool, ForgeError> {
        Ok(self.lock().pulls.contains_key(&number))
    }

    async fn create_pr(&self, request: &NewPullRequest) -> Result<PullRequest, ForgeError> {
        self.delay().await;
        self.record(format!("create_pr {}", request.head));
        let mut state = self.lock();
        if let Some(open) = state
            .pulls
            .values()
            .find(|pr| pr.head.name == request.head && pr.base.name == request.base)
        {
            return Ok(open.clone());
        }
        let number = state.next_number;
        state.next_number += 1;
        let pr = PullRequest {
            number,
            title: request.title.clone(),
            body: request.body.clone(),
            state: IssueState::Open,
            merged: false,
            head: BranchRef {
                name: request.head.clone(),
                sha: "123".into(),
            },
            base: BranchRef {
                name: request.base.clone(),
                sha: "456".into(),
            },
            author: "bot".into(),
        };
        state.pulls.insert(number, pr.clone());
        state
            .issues
            .insert(number, issue(number, &request.title, &request.body, true));
        Ok(pr)
    }

    async fn list_labels(&self, _number: u64) -> Result<Vec<Label>, ForgeError> {
        Ok(Vec::new())
    }

    async fn add_label(&self, number: u64, name: &str) -> Result<(), ForgeError> {
        self.record(format!("add_label #{number} {name}"));
        Ok(())
    }

    async fn remove_label(&self, number: u64, name: &str) -> Result<(), ForgeError> {
        self.record(format!("remove_label #{number} {name}"));
        Ok(())
    }
}

pub fn context(forge: Arc<dyn Forge>, prs: Vec<u64>) -> ForgeContext {
    ForgeContext {
        forge,
        owner: OWNER.into(),
        repo: REPO.into(),
        issue: ISSUE,
        prs,
        branch: BRANCH.into(),
        base: "main".into(),
    }
}

/// A sidecar in `state/<slug>/` of a temporary home, reached through a TCP forward.
pub struct Harness {
    pub home: tempfile::TempDir,
    pub forge: FakeForge,
    pub sidecar: Option<ForgeSidecar>,
    pub url: String,
    forward: tokio::task::JoinHandle<()>,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_in(
            tempfile::tempdir().expect("tempdir"),
            FakeForge::new(),
            Vec::new(),
        )
        .await
    }

    /// Starts a sidecar over `home` (which may hold a previous session's files).
    pub async fn start_in(home: tempfile::TempDir, forge: FakeForge, prs: Vec<u64>) -> Self {
        let state = home.path().join("state/bottle-ab12c");
        let socket = state.join("run").join(FORGE_SOCKET);
        let sidecar = ForgeSidecar::start(
            context(Arc::new(forge.clone()), prs),
            &socket,
            &state.join(FORGE_OPS_LOG),
            &state.join(QUEUE_DIR),
        )
        .await
        .expect("sidecar starts");
        let (url, forward) = forward_to(&socket).await;
        Self {
            home,
            forge,
            sidecar: Some(sidecar),
            url,
            forward,
        }
    }

    pub fn state(&self) -> PathBuf {
        self.home.path().join("state/bottle-ab12c")
    }

    pub fn socket(&self) -> PathBuf {
        self.state().join("run").join(FORGE_SOCKET)
    }

    pub fn ops_log(&self) -> PathBuf {
        self.state().join(FORGE_OPS_LOG)
    }

    pub fn queue(&self) -> PathBuf {
        self.state().join(QUEUE_DIR)
    }

    pub fn sidecar(&self) -> &ForgeSidecar {
        self.sidecar.as_ref().expect("running")
    }

    /// The op log's events; the chain must verify.
    pub fn events(&self) -> Vec<AuditEvent> {
        audit::verify(&self.ops_log()).expect("the op log verifies");
        audit::read(&self.ops_log()).expect("the op log reads")
    }

    pub fn queued(&self) -> Vec<QueuedEvent> {
        queue::pending(&self.queue())
            .expect("pending")
            .into_iter()
            .map(|(_, event)| event)
            .collect()
    }

    /// Stops the sidecar and returns the home (for a restart).
    pub async fn stop(mut self) -> (tempfile::TempDir, FakeForge) {
        self.forward.abort();
        if let Some(sidecar) = self.sidecar.take() {
            sidecar.shutdown().await;
        }
        assert_no_token(self.home.path());
        (self.home, self.forge)
    }

    /// Stops the sidecar and checks that nothing it wrote holds the token.
    pub async fn finish(self) {
        let _ = self.stop().await;
    }
}

/// Asserts that no file under `dir` (op log, head, queue, quarantined events) holds
/// the forge token.
pub fn assert_no_token(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let entry = entry.expect("entry");
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                files += 1;
                let bytes = std::fs::read(entry.path()).expect("read file");
                assert!(
                    !String::from_utf8_lossy(&bytes).contains(TOKEN),
                    "the token is in `{}`",
                    entry.path().display()
                );
            }
        }
    }
    assert!(files > 0, "no files to check under {}", dir.display());
}

/// What the shim does in the bottle: a loopback port whose connections go to `socket`.
pub async fn forward_to(socket: &Path) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let socket = socket.to_path_buf();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    (format!("http://127.0.0.1:{port}/mcp"), task)
}

/// One raw HTTP/1.1 exchange over the sidecar's Unix socket; returns status and body.
pub async fn raw_post(
    socket: &Path,
    host: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method("POST")
        .uri("/mcp")
        .header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(
            request
                .body(Full::new(bytes::Bytes::from(body)))
                .expect("request"),
        )
        .await
        .expect("response");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    (status, body)
}

/// The headers a well-behaved streamable-HTTP client sends with a POST.
pub const JSON_HEADERS: &[(&str, &str)] = &[
    ("content-type", "application/json"),
    ("accept", "application/json, text/event-stream"),
];

/// `(reason, decision, path, detail)` of each line, for whole-value comparisons.
pub fn summary(events: &[AuditEvent]) -> Vec<(String, String, Option<String>, String)> {
    events
        .iter()
        .map(|e| {
            (
                e.reason.clone(),
                serde_json::to_value(e.decision)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                e.path.clone(),
                e.detail.clone().unwrap_or_default(),
            )
        })
        .collect()
}
