//! A fake Gitea on loopback: the `/api/v1` endpoints bot-bottle uses, over
//! in-memory repositories, issues, pull requests, comments, labels and org
//! members; git smart HTTP over real bare repositories; and signed webhook
//! deliveries.
//!
//! It is written from Gitea's published spec (`gitea-swagger.v1.json`), not from
//! bot-bottle's client, so a client bug is not mirrored here. [`ROUTES`] lists
//! every route it serves and every status each route may answer; a contract test
//! checks that table against the spec, and the server records any response whose
//! status is not in the table ([`FakeGitea::undeclared_statuses`]).
//!
//! Behaviour taken from the spec and Gitea's source:
//! - `PATCH /repos/{owner}/{repo}/issues/{index}` answers 201 with the issue;
//! - a body edit carrying a stale `content_version` answers 409;
//! - a pull request is an issue with the same number (`pull_request` is set on it);
//! - creating a pull request whose head or base is not a branch of the repository's
//!   git repository answers 404 (`parseCompareInfo`);
//! - org membership: 204 member, 404 not; in [`Membership::Hidden`] mode it answers
//!   303 to the public-members URL, as Gitea does when the token's user may not see
//!   private membership;
//! - git requests (`/{owner}/{repo}.git/info/refs`, `git-upload-pack`,
//!   `git-receive-pack`, with or without `.git`) are answered by `git http-backend`
//!   and need credentials (see [`FakeGitea::set_git_credentials`]); every repository
//!   is private, so a clone needs them too;
//! - webhooks: the event types, actions, payloads and headers of
//!   `services/webhook/notifier.go` and `deliver.go` (see [`FakeGitea::add_webhook`]).

mod git;
mod webhooks;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::serve::IncomingStream;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::server::{FixtureError, TlsIdentity};
pub use git::GitRequest;
use git::{BackendRun, GitCredentials, Service};
pub use webhooks::DeliveryRecord;
use webhooks::Hook;

/// Where the API lives below the server root (the spec's `basePath`).
pub const BASE_PATH: &str = "/api/v1";

/// One route the fake serves, with every status it may answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeRoute {
    pub method: &'static str,
    /// Path template as in the spec, below [`BASE_PATH`].
    pub path: &'static str,
    pub statuses: &'static [u16],
}

const ISSUE: &str = "/repos/{owner}/{repo}/issues/{index}";
const ISSUE_COMMENTS: &str = "/repos/{owner}/{repo}/issues/{index}/comments";
const ISSUE_LABELS: &str = "/repos/{owner}/{repo}/issues/{index}/labels";
const ISSUE_LABEL: &str = "/repos/{owner}/{repo}/issues/{index}/labels/{id}";
const PULL: &str = "/repos/{owner}/{repo}/pulls/{index}";
const PULLS: &str = "/repos/{owner}/{repo}/pulls";
const REPO_LABELS: &str = "/repos/{owner}/{repo}/labels";
const ORG_MEMBER: &str = "/orgs/{org}/members/{username}";
const CURRENT_USER: &str = "/user";

/// Every route served and the statuses each may answer.
pub const ROUTES: &[FakeRoute] = &[
    FakeRoute {
        method: "GET",
        path: ISSUE,
        statuses: &[200, 404],
    },
    // 409 is the `content_version` conflict the operation's description states.
    FakeRoute {
        method: "PATCH",
        path: ISSUE,
        statuses: &[201, 404, 409],
    },
    FakeRoute {
        method: "GET",
        path: ISSUE_COMMENTS,
        statuses: &[200, 404],
    },
    FakeRoute {
        method: "POST",
        path: ISSUE_COMMENTS,
        statuses: &[201, 404],
    },
    FakeRoute {
        method: "GET",
        path: ISSUE_LABELS,
        statuses: &[200, 404],
    },
    FakeRoute {
        method: "POST",
        path: ISSUE_LABELS,
        statuses: &[200, 404],
    },
    FakeRoute {
        method: "DELETE",
        path: ISSUE_LABEL,
        statuses: &[204, 404, 422],
    },
    FakeRoute {
        method: "GET",
        path: PULL,
        statuses: &[200, 404],
    },
    FakeRoute {
        method: "GET",
        path: PULLS,
        statuses: &[200, 404],
    },
    FakeRoute {
        method: "POST",
        path: PULLS,
        statuses: &[201, 404, 409, 422],
    },
    FakeRoute {
        method: "GET",
        path: REPO_LABELS,
        statuses: &[200, 404],
    },
    FakeRoute {
        method: "POST",
        path: REPO_LABELS,
        statuses: &[201, 404, 422],
    },
    FakeRoute {
        method: "GET",
        path: ORG_MEMBER,
        statuses: &[204, 303, 404],
    },
    FakeRoute {
        method: "GET",
        path: CURRENT_USER,
        statuses: &[200],
    },
];

/// How the membership endpoint behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Membership {
    /// 204 for a member, 404 otherwise.
    #[default]
    Visible,
    /// 303 to `/orgs/{org}/public_members/{username}`: the token's user is not in
    /// the org and may not see private membership.
    Hidden,
}

/// One request the fake answered.
#[derive(Debug, Clone, PartialEq)]
pub struct GiteaRequest {
    pub method: String,
    /// The concrete path, query included.
    pub uri: String,
    /// The matched spec template below [`BASE_PATH`] (empty when none matched).
    pub route: String,
    pub status: u16,
    pub authorization: Option<String>,
    pub body: Option<Value>,
}

/// A new issue for [`FakeGitea::add_issue`].
#[derive(Debug, Clone, Default)]
pub struct NewIssue {
    pub title: String,
    pub body: String,
    pub author: String,
    pub assignees: Vec<String>,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone)]
struct PullRec {
    head: String,
    head_sha: String,
    base: String,
    base_sha: String,
    merge_base: String,
    merged: bool,
}

impl PullRec {
    /// A pull request whose commit ids are stand-ins (the repository has no git
    /// repository, or its branches are not looked up).
    fn without_git(head: &str, base: &str) -> Self {
        Self {
            head: head.to_owned(),
            head_sha: fake_sha(head),
            base: base.to_owned(),
            base_sha: fake_sha(base),
            merge_base: fake_sha(base),
            merged: false,
        }
    }
}

#[derive(Debug, Clone)]
struct CommentRec {
    id: i64,
    user: String,
    body: String,
    created_at: String,
    updated_at: String,
}

#[derive(Debug, Clone)]
struct IssueRec {
    id: i64,
    number: u64,
    title: String,
    body: String,
    open: bool,
    user: String,
    assignees: Vec<String>,
    label_ids: Vec<i64>,
    content_version: i64,
    created_at: String,
    updated_at: String,
    comments: Vec<CommentRec>,
    pull: Option<PullRec>,
}

#[derive(Debug, Clone)]
struct LabelRec {
    id: i64,
    name: String,
    color: String,
    description: String,
}

#[derive(Debug, Default)]
struct Repo {
    id: i64,
    issues: BTreeMap<u64, IssueRec>,
    labels: Vec<LabelRec>,
    /// The bare git repository, once [`FakeGitea::add_git_repo`] made one.
    git: Option<PathBuf>,
}

#[derive(Debug)]
struct Inner {
    repos: BTreeMap<(String, String), Repo>,
    orgs: BTreeMap<String, BTreeSet<String>>,
    membership: Membership,
    next_id: i64,
    tick: u64,
    delay: Duration,
    requests: Vec<GiteaRequest>,
    undeclared: Vec<GiteaRequest>,
    /// `http(s)://127.0.0.1:PORT`, for the URLs in webhook payloads.
    base_url: String,
    /// The server's temp dir: `HOME` of its git processes, repositories in `repos/`.
    home: PathBuf,
    git_credentials: Option<GitCredentials>,
    git_requests: Vec<GitRequest>,
    hooks: Vec<Hook>,
    deliveries: Vec<DeliveryRecord>,
    /// Indices into `deliveries` for the delivery task, in order.
    queue: mpsc::UnboundedSender<usize>,
    /// How many deliveries have been attempted.
    delivered: watch::Sender<usize>,
}

/// What happened to an issue or pull request, for the webhook it causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Opened,
    Edited,
    Closed,
    Reopened,
    Labeled,
    Assigned,
    Synchronized,
}

impl Change {
    /// The event type for an issue, the one for a pull request, and the action, as
    /// `services/webhook/notifier.go` chooses them.
    fn hook(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Opened => ("issues", "pull_request", "opened"),
            Self::Edited => ("issues", "pull_request", "edited"),
            Self::Closed => ("issues", "pull_request", "closed"),
            Self::Reopened => ("issues", "pull_request", "reopened"),
            Self::Labeled => ("issue_label", "pull_request_label", "label_updated"),
            Self::Assigned => ("issue_assign", "pull_request_assign", "assigned"),
            Self::Synchronized => ("issues", "pull_request_sync", "synchronized"),
        }
    }
}

impl Inner {
    fn new(base_url: String, home: PathBuf, queue: mpsc::UnboundedSender<usize>) -> Self {
        Self {
            repos: BTreeMap::new(),
            orgs: BTreeMap::new(),
            membership: Membership::default(),
            next_id: 0,
            tick: 0,
            delay: Duration::ZERO,
            requests: Vec::new(),
            undeclared: Vec::new(),
            base_url,
            home,
            git_credentials: None,
            git_requests: Vec::new(),
            hooks: Vec::new(),
            deliveries: Vec::new(),
            queue,
            delivered: watch::Sender::new(0),
        }
    }

    /// `GIT_PROJECT_ROOT`: repositories live at `<root>/<owner>/<repo>.git`.
    fn project_root(&self) -> PathBuf {
        self.home.join("repos")
    }

    fn id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    /// A monotonically increasing timestamp, so every edit changes `updated_at`.
    fn now(&mut self) -> String {
        self.tick += 1;
        let t = self.tick;
        format!(
            "2026-01-01T{:02}:{:02}:{:02}Z",
            (t / 3600) % 24,
            (t / 60) % 60,
            t % 60
        )
    }

    fn repo_mut(&mut self, owner: &str, repo: &str) -> &mut Repo {
        if !self
            .repos
            .contains_key(&(owner.to_owned(), repo.to_owned()))
        {
            let id = self.id();
            self.repos.insert(
                (owner.to_owned(), repo.to_owned()),
                Repo {
                    id,
                    ..Repo::default()
                },
            );
        }
        self.repos
            .get_mut(&(owner.to_owned(), repo.to_owned()))
            .expect("inserted above")
    }

    fn label_id(&mut self, owner: &str, repo: &str, name: &str) -> i64 {
        if let Some(found) = self
            .repo_mut(owner, repo)
            .labels
            .iter()
            .find(|l| l.name == name)
        {
            return found.id;
        }
        let id = self.id();
        self.repo_mut(owner, repo).labels.push(LabelRec {
            id,
            name: name.to_owned(),
            color: "ededed".to_owned(),
            description: String::new(),
        });
        id
    }

    fn create_issue(&mut self, owner: &str, repo: &str, new: NewIssue) -> u64 {
        let label_ids = new
            .labels
            .iter()
            .map(|name| self.label_id(owner, repo, name))
            .collect();
        let id = self.id();
        let now = self.now();
        let repo = self.repo_mut(owner, repo);
        // Issues and PRs share one number sequence, as in Gitea.
        let number = repo.issues.keys().next_back().copied().unwrap_or(0) + 1;
        repo.issues.insert(
            number,
            IssueRec {
                id,
                number,
                title: new.title,
                body: new.body,
                open: true,
                user: new.author,
                assignees: new.assignees,
                label_ids,
                content_version: 0,
                created_at: now.clone(),
                updated_at: now,
                comments: Vec::new(),
                pull: None,
            },
        );
        number
    }

    fn has_hooks(&self, owner: &str, repo: &str) -> bool {
        self.hooks
            .iter()
            .any(|hook| hook.owner == owner && hook.repo == repo)
    }

    /// Queues one delivery per webhook of the repository, each with its own id.
    fn deliver(
        &mut self,
        owner: &str,
        repo: &str,
        event_type: &str,
        action: &str,
        payload: &Value,
    ) {
        let hooks: Vec<Hook> = self
            .hooks
            .iter()
            .filter(|hook| hook.owner == owner && hook.repo == repo)
            .cloned()
            .collect();
        if hooks.is_empty() {
            return;
        }
        let body = webhooks::gitea_json(payload);
        for hook in hooks {
            let record = webhooks::new_delivery(
                &hook,
                webhooks::uuid_v4(),
                event_type,
                action,
                body.clone(),
            );
            self.enqueue(record);
        }
    }

    fn enqueue(&mut self, record: DeliveryRecord) {
        self.deliveries.push(record);
        // The receiver lives as long as the server; a send can only fail after it stopped.
        let _ = self.queue.send(self.deliveries.len() - 1);
    }

    /// Delivers the `IssuePayload` or `PullRequestPayload` webhook for `change`.
    fn notify(
        &mut self,
        owner: &str,
        repo: &str,
        number: u64,
        change: Change,
        sender: &str,
        changes: Option<Value>,
    ) {
        if !self.has_hooks(owner, repo) {
            return;
        }
        let Some(repo_rec) = self.repos.get(&(owner.to_owned(), repo.to_owned())) else {
            return;
        };
        let Some(rec) = repo_rec.issues.get(&number) else {
            return;
        };
        let repository = repository_json(&self.base_url, owner, repo, repo_rec);
        let (issue_type, pull_type, action) = change.hook();
        let (event_type, mut payload) = match &rec.pull {
            Some(pull) => (
                pull_type,
                json!({
                    "action": action,
                    "number": number,
                    "pull_request": pull_json(&self.base_url, owner, repo, repo_rec, rec, pull),
                    "requested_reviewer": null,
                    "repository": repository,
                    "sender": user_json(sender),
                    "commit_id": "",
                    "review": null,
                }),
            ),
            None => (
                issue_type,
                json!({
                    "action": action,
                    "number": number,
                    "issue": issue_json(owner, repo, repo_rec, rec),
                    "repository": repository,
                    "sender": user_json(sender),
                    "commit_id": "",
                }),
            ),
        };
        if let Some(changes) = changes {
            payload["changes"] = changes;
        }
        self.deliver(owner, repo, event_type, action, &payload);
    }

    /// Delivers the `IssueCommentPayload` webhook for a new comment: `issue_comment`,
    /// or `pull_request_comment` with `pull_request` and `is_pull` on a pull request.
    fn notify_comment(
        &mut self,
        owner: &str,
        repo: &str,
        number: u64,
        comment_id: i64,
        sender: &str,
    ) {
        if !self.has_hooks(owner, repo) {
            return;
        }
        let Some(repo_rec) = self.repos.get(&(owner.to_owned(), repo.to_owned())) else {
            return;
        };
        let Some(rec) = repo_rec.issues.get(&number) else {
            return;
        };
        let Some(comment) = rec.comments.iter().find(|c| c.id == comment_id) else {
            return;
        };
        let mut payload = json!({
            "action": "created",
            "issue": issue_json(owner, repo, repo_rec, rec),
            "comment": comment_json(owner, repo, number, comment),
            "repository": repository_json(&self.base_url, owner, repo, repo_rec),
            "sender": user_json(sender),
            "is_pull": rec.pull.is_some(),
        });
        let event_type = match &rec.pull {
            Some(pull) => {
                payload["pull_request"] =
                    pull_json(&self.base_url, owner, repo, repo_rec, rec, pull);
                "pull_request_comment"
            }
            None => "issue_comment",
        };
        self.deliver(owner, repo, event_type, "created", &payload);
    }

    /// After a push: moves each open pull request's head to its branch's new commit,
    /// and delivers `pull_request_sync` for each one that moved, as Gitea does.
    fn sync_pulls(
        &mut self,
        owner: &str,
        repo: &str,
        refs: &BTreeMap<String, String>,
        pusher: &str,
    ) {
        let now = self.now();
        let Some(repo_rec) = self.repos.get_mut(&(owner.to_owned(), repo.to_owned())) else {
            return;
        };
        let mut moved = Vec::new();
        for rec in repo_rec.issues.values_mut().filter(|rec| rec.open) {
            let Some(pull) = rec.pull.as_mut() else {
                continue;
            };
            if let Some(sha) = refs.get(&format!("refs/heads/{}", pull.head))
                && *sha != pull.head_sha
            {
                pull.head_sha.clone_from(sha);
                rec.updated_at.clone_from(&now);
                moved.push(rec.number);
            }
        }
        for number in moved {
            self.notify(owner, repo, number, Change::Synchronized, pusher, None);
        }
    }
}

type Shared = Arc<Mutex<Inner>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Errors of the fake Gitea's setup and inspection helpers.
#[derive(Debug, thiserror::Error)]
pub enum FakeGiteaError {
    #[error("cannot start the fake Gitea: {what}")]
    Start {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the fake Gitea's TLS identity is unusable")]
    Tls(#[source] FixtureError),
    #[error(
        "`{name}` is not a usable {what} name\nhint: use ASCII letters, digits, `-`, `_` and `.`, not starting with `.`"
    )]
    BadName { what: &'static str, name: String },
    #[error(
        "repository `{owner}/{repo}` already has a git repository\nhint: call `add_git_repo` once per repository"
    )]
    GitRepoExists { owner: String, repo: String },
    #[error(
        "repository `{owner}/{repo}` has no git repository\nhint: create it with `FakeGitea::add_git_repo`"
    )]
    NoGitRepo { owner: String, repo: String },
    #[error(
        "`{owner}/{repo}` has no issue or pull request #{number}\nhint: create it first with `add_issue` or `add_pull`"
    )]
    NoIssue {
        owner: String,
        repo: String,
        number: u64,
    },
    #[error("cannot run `git`\nhint: install git and make sure it is on `PATH`")]
    GitSpawn {
        #[source]
        source: std::io::Error,
    },
    #[error("`git {args}` failed in `{}`: {stderr}", dir.display())]
    Git {
        args: String,
        dir: PathBuf,
        stderr: String,
    },
    #[error(
        "webhook url `{url}` is not plain http to a loopback address\nhint: point the webhook at a receiver the test started, like `http://127.0.0.1:PORT/hook`"
    )]
    WebhookUrl { url: String },
    #[error(
        "waited {waited:?} for {wanted} webhook deliveries to be attempted, {attempted} were\nhint: check that the action under test causes the event, and that a webhook is registered for its repository"
    )]
    DeliveryTimeout {
        wanted: usize,
        attempted: usize,
        waited: Duration,
    },
}

/// The peer of a connection, for `REMOTE_ADDR`.
#[derive(Debug, Clone, Copy)]
struct PeerAddr(SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// Accepts TCP connections and completes their TLS handshakes on their own tasks, so a
/// slow client cannot hold up the others, then hands them to `axum::serve`.
struct TlsListener {
    addr: SocketAddr,
    incoming: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accept_task: JoinHandle<()>,
}

impl TlsListener {
    fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (ready, incoming) = mpsc::channel(64);
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let acceptor = acceptor.clone();
                let ready = ready.clone();
                tokio::spawn(async move {
                    let handshake = acceptor.accept(tcp);
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), handshake).await
                    {
                        let _ = ready.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            incoming,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(connection) => connection,
            // The accept task is gone: nothing will ever arrive.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// A running fake Gitea. Dropping it stops the server and the webhook deliveries,
/// and removes its git repositories.
pub struct FakeGitea {
    addr: SocketAddr,
    tls: bool,
    shared: Shared,
    task: JoinHandle<()>,
    deliveries_task: JoinHandle<()>,
    _home: tempfile::TempDir,
}

impl Drop for FakeGitea {
    fn drop(&mut self) {
        self.task.abort();
        self.deliveries_task.abort();
    }
}

/// The state of a new server, its temp dir and its delivery task.
fn new_state(base_url: String) -> std::io::Result<(Shared, tempfile::TempDir, JoinHandle<()>)> {
    let home = tempfile::Builder::new().prefix("fake-gitea-").tempdir()?;
    std::fs::create_dir_all(home.path().join("repos"))?;
    let (queue, receiver) = mpsc::unbounded_channel();
    let shared: Shared = Arc::new(Mutex::new(Inner::new(
        base_url,
        home.path().to_owned(),
        queue,
    )));
    let deliveries_task = tokio::spawn(webhooks::deliver_queue(shared.clone(), receiver));
    Ok((shared, home, deliveries_task))
}

/// Accepts ASCII letters, digits, `-`, `_` and `.`, not starting with `.`: safe as a
/// path component and in a URL.
fn check_name(what: &'static str, name: &str) -> Result<(), FakeGiteaError> {
    let usable = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if usable {
        Ok(())
    } else {
        Err(FakeGiteaError::BadName {
            what,
            name: name.to_owned(),
        })
    }
}

impl FakeGitea {
    /// Start on `127.0.0.1:0`, serving plain HTTP.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (shared, home, deliveries_task) = new_state(format!("http://{addr}"))?;
        let app = router(shared.clone()).into_make_service_with_connect_info::<PeerAddr>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            tls: false,
            shared,
            task,
            deliveries_task,
            _home: home,
        })
    }

    /// Start on `127.0.0.1:0`, serving HTTPS (HTTP/1.1 and HTTP/2) with `identity`.
    ///
    /// # Errors
    /// When the identity is unusable, or the port or the temp dir cannot be had.
    pub async fn start_tls(identity: TlsIdentity) -> Result<Self, FakeGiteaError> {
        let acceptor = crate::server::tls_acceptor(&identity).map_err(FakeGiteaError::Tls)?;
        let start_error = |what| move |source| FakeGiteaError::Start { what, source };
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(start_error("cannot bind `127.0.0.1:0`"))?;
        let listener = TlsListener::new(listener, acceptor)
            .map_err(start_error("cannot read the bound address"))?;
        let addr = listener.addr;
        let (shared, home, deliveries_task) = new_state(format!("https://{addr}"))
            .map_err(start_error("cannot create its temp dir"))?;
        let app = router(shared.clone()).into_make_service_with_connect_info::<PeerAddr>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            tls: true,
            shared,
            task,
            deliveries_task,
            _home: home,
        })
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>` (or `https://` after [`FakeGitea::start_tls`]).
    #[must_use]
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// `http(s)://127.0.0.1:<port>/api/v1`, the value of `FORGE_GITEA_API`.
    #[must_use]
    pub fn api_url(&self) -> String {
        format!("{}{BASE_PATH}", self.base_url())
    }

    /// `http(s)://127.0.0.1:<port>/<owner>/<repo>.git`, as Gitea's `clone_url`.
    #[must_use]
    pub fn clone_url(&self, owner: &str, repo: &str) -> String {
        format!("{}/{owner}/{repo}.git", self.base_url())
    }

    /// Make sure a repository exists (issue creation does this too).
    pub fn add_repo(&self, owner: &str, repo: &str) {
        lock(&self.shared).repo_mut(owner, repo);
    }

    /// Open an issue; returns its number. Labels are created in the repo as needed.
    pub fn add_issue(&self, owner: &str, repo: &str, issue: NewIssue) -> u64 {
        lock(&self.shared).create_issue(owner, repo, issue)
    }

    /// Open a pull request as some user (not through the API, and without a webhook);
    /// returns its number. When the repository has a git repository and both branches
    /// exist there, the pull request carries their real commit ids.
    pub fn add_pull(
        &self,
        owner: &str,
        repo: &str,
        issue: NewIssue,
        head: &str,
        base: &str,
    ) -> u64 {
        let git_dir = self.git_dir(owner, repo);
        let home = lock(&self.shared).home.clone();
        let pull = git_dir
            .and_then(|dir| pull_from_git(&home, &dir, head, base))
            .unwrap_or_else(|| PullRec::without_git(head, base));
        let mut inner = lock(&self.shared);
        let number = inner.create_issue(owner, repo, issue);
        if let Some(rec) = inner.repo_mut(owner, repo).issues.get_mut(&number) {
            rec.pull = Some(pull);
        }
        number
    }

    /// Close (and optionally merge) an issue or PR as the repository owner would; see
    /// [`FakeGitea::close_as`].
    pub fn close(&self, owner: &str, repo: &str, number: u64, merged: bool) {
        let _ = self.close_as(owner, repo, number, merged, owner);
    }

    /// Close (and, for a pull request, optionally merge) as `sender`, and deliver
    /// `issues` or `pull_request` with action `closed` (`merged` set on a merged pull
    /// request, as Gitea's merge notification sends it). The git branches are left as
    /// they are.
    ///
    /// # Errors
    /// When there is no such issue.
    pub fn close_as(
        &self,
        owner: &str,
        repo: &str,
        number: u64,
        merged: bool,
        sender: &str,
    ) -> Result<(), FakeGiteaError> {
        let mut inner = lock(&self.shared);
        let now = inner.now();
        let rec = issue_mut(&mut inner, owner, repo, number)?;
        rec.open = false;
        rec.updated_at = now;
        if let Some(pull) = rec.pull.as_mut() {
            pull.merged = merged;
        }
        inner.notify(owner, repo, number, Change::Closed, sender, None);
        Ok(())
    }

    /// Edit a body as a human would: bumps `content_version`.
    pub fn edit_body(&self, owner: &str, repo: &str, number: u64, body: &str) {
        let mut inner = lock(&self.shared);
        let now = inner.now();
        if let Some(rec) = inner.repo_mut(owner, repo).issues.get_mut(&number) {
            rec.body = body.to_owned();
            rec.content_version += 1;
            rec.updated_at = now;
        }
    }

    /// Post a comment as some user (not through the API, and without a webhook); returns
    /// its id. [`FakeGitea::comment_as`] is the same with the webhook.
    pub fn add_comment(&self, owner: &str, repo: &str, number: u64, user: &str, body: &str) -> i64 {
        let mut inner = lock(&self.shared);
        let id = inner.id();
        let now = inner.now();
        if let Some(rec) = inner.repo_mut(owner, repo).issues.get_mut(&number) {
            rec.comments.push(CommentRec {
                id,
                user: user.to_owned(),
                body: body.to_owned(),
                created_at: now.clone(),
                updated_at: now,
            });
        }
        id
    }

    pub fn add_org_member(&self, org: &str, username: &str) {
        lock(&self.shared)
            .orgs
            .entry(org.to_owned())
            .or_default()
            .insert(username.to_owned());
    }

    pub fn set_membership(&self, membership: Membership) {
        lock(&self.shared).membership = membership;
    }

    /// Delay every response, to exercise client timeouts.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared).delay = delay;
    }

    /// The issue (or PR) as `GET /repos/{owner}/{repo}/issues/{index}` returns it.
    #[must_use]
    pub fn issue(&self, owner: &str, repo: &str, number: u64) -> Option<Value> {
        let inner = lock(&self.shared);
        let repo_rec = inner.repos.get(&(owner.to_owned(), repo.to_owned()))?;
        let rec = repo_rec.issues.get(&number)?;
        Some(issue_json(owner, repo, repo_rec, rec))
    }

    /// Bodies of the comments on an issue, oldest first.
    #[must_use]
    pub fn comment_bodies(&self, owner: &str, repo: &str, number: u64) -> Vec<String> {
        let inner = lock(&self.shared);
        inner
            .repos
            .get(&(owner.to_owned(), repo.to_owned()))
            .and_then(|r| r.issues.get(&number))
            .map(|rec| rec.comments.iter().map(|c| c.body.clone()).collect())
            .unwrap_or_default()
    }

    /// The comments on an issue or pull request, oldest first, as (user, body).
    #[must_use]
    pub fn issue_comments(&self, owner: &str, repo: &str, number: u64) -> Vec<(String, String)> {
        let inner = lock(&self.shared);
        inner
            .repos
            .get(&(owner.to_owned(), repo.to_owned()))
            .and_then(|r| r.issues.get(&number))
            .map(|rec| {
                rec.comments
                    .iter()
                    .map(|c| (c.user.clone(), c.body.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Names of the labels on an issue.
    #[must_use]
    pub fn label_names(&self, owner: &str, repo: &str, number: u64) -> Vec<String> {
        let inner = lock(&self.shared);
        let Some(repo_rec) = inner.repos.get(&(owner.to_owned(), repo.to_owned())) else {
            return Vec::new();
        };
        repo_rec
            .issues
            .get(&number)
            .map(|rec| {
                rec.label_ids
                    .iter()
                    .filter_map(|id| repo_rec.labels.iter().find(|l| l.id == *id))
                    .map(|l| l.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Numbers of the pull requests in a repository.
    #[must_use]
    pub fn pull_numbers(&self, owner: &str, repo: &str) -> Vec<u64> {
        let inner = lock(&self.shared);
        inner
            .repos
            .get(&(owner.to_owned(), repo.to_owned()))
            .map(|r| {
                r.issues
                    .values()
                    .filter(|i| i.pull.is_some())
                    .map(|i| i.number)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every request answered so far.
    #[must_use]
    pub fn requests(&self) -> Vec<GiteaRequest> {
        lock(&self.shared).requests.clone()
    }

    /// Responses whose status is not in [`ROUTES`] for their route. A correct
    /// fake leaves this empty; tests assert that it is.
    #[must_use]
    pub fn undeclared_statuses(&self) -> Vec<GiteaRequest> {
        lock(&self.shared).undeclared.clone()
    }

    fn git_dir(&self, owner: &str, repo: &str) -> Option<PathBuf> {
        lock(&self.shared)
            .repos
            .get(&(owner.to_owned(), repo.to_owned()))
            .and_then(|r| r.git.clone())
    }

    fn require_git_dir(
        &self,
        owner: &str,
        repo: &str,
    ) -> Result<(PathBuf, PathBuf), FakeGiteaError> {
        let home = lock(&self.shared).home.clone();
        match self.git_dir(owner, repo) {
            Some(dir) => Ok((home, dir)),
            None => Err(FakeGiteaError::NoGitRepo {
                owner: owner.to_owned(),
                repo: repo.to_owned(),
            }),
        }
    }

    /// Create a bare git repository for `owner/repo` in the server's temp dir, with one
    /// commit on `main` holding `files` (`(path, content)`; paths may contain `/`). The
    /// commit's author and date are fixed, so its id is the same on every run. Pushes
    /// are allowed (`http.receivepack`), and the repository exists for the API too.
    /// Returns the repository's directory.
    ///
    /// # Errors
    /// When a name is unusable, the repository already has one, or git fails.
    pub fn add_git_repo(
        &self,
        owner: &str,
        repo: &str,
        files: &[(&str, &str)],
    ) -> Result<PathBuf, FakeGiteaError> {
        check_name("owner", owner)?;
        check_name("repository", repo)?;
        if self.git_dir(owner, repo).is_some() {
            return Err(FakeGiteaError::GitRepoExists {
                owner: owner.to_owned(),
                repo: repo.to_owned(),
            });
        }
        let (home, root) = {
            let inner = lock(&self.shared);
            (inner.home.clone(), inner.project_root())
        };
        let dir = root.join(owner).join(format!("{repo}.git"));
        git::create_repo(&home, &dir, files)?;
        lock(&self.shared).repo_mut(owner, repo).git = Some(dir.clone());
        Ok(dir)
    }

    /// The user and token git requests must present (replacing earlier ones). Until this
    /// is called, every git request is refused with 401.
    pub fn set_git_credentials(&self, username: &str, token: &str) {
        lock(&self.shared).git_credentials = Some(GitCredentials {
            username: username.to_owned(),
            token: token.to_owned(),
        });
    }

    /// Every ref of the repository and the commit it points at, e.g.
    /// `refs/heads/main → 40 hex digits`.
    ///
    /// # Errors
    /// When the repository has no git repository, or git fails.
    pub fn git_refs(
        &self,
        owner: &str,
        repo: &str,
    ) -> Result<BTreeMap<String, String>, FakeGiteaError> {
        let (home, dir) = self.require_git_dir(owner, repo)?;
        git::refs(&home, &dir)
    }

    /// The content of `path` at `rev` (a branch, a ref or a commit id), or `None` when
    /// there is no such file there.
    ///
    /// # Errors
    /// When the repository has no git repository, or git fails.
    pub fn git_file(
        &self,
        owner: &str,
        repo: &str,
        rev: &str,
        path: &str,
    ) -> Result<Option<String>, FakeGiteaError> {
        let (home, dir) = self.require_git_dir(owner, repo)?;
        git::file(&home, &dir, rev, path)
    }

    /// Every git request answered so far (refused ones included), oldest first.
    #[must_use]
    pub fn git_requests(&self) -> Vec<GitRequest> {
        lock(&self.shared).git_requests.clone()
    }

    /// Register a webhook on `owner/repo` that gets every event, signed with `secret`
    /// (an empty secret sends empty signatures, as Gitea does). `url` must be plain
    /// `http://` to a loopback address.
    ///
    /// # Errors
    /// When `url` is not such a URL.
    pub fn add_webhook(
        &self,
        owner: &str,
        repo: &str,
        url: &str,
        secret: &str,
    ) -> Result<(), FakeGiteaError> {
        webhooks::check_url(url)?;
        let mut inner = lock(&self.shared);
        inner.repo_mut(owner, repo);
        inner.hooks.push(Hook {
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            url: url.to_owned(),
            secret: secret.to_owned(),
        });
        Ok(())
    }

    /// Add `label` (created in the repository when missing) as `sender` would in the
    /// web UI, and deliver `issue_label` (`X-Gitea-Event: issues`) with action
    /// `label_updated`; on a pull request, `pull_request_label`.
    ///
    /// # Errors
    /// When there is no such issue.
    pub fn label_issue(
        &self,
        owner: &str,
        repo: &str,
        number: u64,
        label: &str,
        sender: &str,
    ) -> Result<(), FakeGiteaError> {
        let mut inner = lock(&self.shared);
        issue_mut(&mut inner, owner, repo, number)?;
        let label_id = inner.label_id(owner, repo, label);
        let now = inner.now();
        let rec = issue_mut(&mut inner, owner, repo, number)?;
        if !rec.label_ids.contains(&label_id) {
            rec.label_ids.push(label_id);
        }
        rec.updated_at = now;
        inner.notify(owner, repo, number, Change::Labeled, sender, None);
        Ok(())
    }

    /// Assign `assignee` as `sender` would, and deliver `issue_assign`
    /// (`X-Gitea-Event: issues`) with action `assigned`; on a pull request,
    /// `pull_request_assign`.
    ///
    /// # Errors
    /// When there is no such issue.
    pub fn assign_issue(
        &self,
        owner: &str,
        repo: &str,
        number: u64,
        assignee: &str,
        sender: &str,
    ) -> Result<(), FakeGiteaError> {
        let mut inner = lock(&self.shared);
        let now = inner.now();
        let rec = issue_mut(&mut inner, owner, repo, number)?;
        if !rec.assignees.iter().any(|a| a == assignee) {
            rec.assignees.push(assignee.to_owned());
        }
        rec.updated_at = now;
        inner.notify(owner, repo, number, Change::Assigned, sender, None);
        Ok(())
    }

    /// Post a comment as `user` (a human in the web UI) and deliver `issue_comment` with
    /// action `created`; on a pull request the event type is `pull_request_comment`, the
    /// payload has `is_pull: true` and `pull_request`. Returns the comment's id.
    ///
    /// # Errors
    /// When there is no such issue.
    pub fn comment_as(
        &self,
        owner: &str,
        repo: &str,
        number: u64,
        user: &str,
        body: &str,
    ) -> Result<i64, FakeGiteaError> {
        let mut inner = lock(&self.shared);
        issue_mut(&mut inner, owner, repo, number)?;
        let id = inner.id();
        let now = inner.now();
        let rec = issue_mut(&mut inner, owner, repo, number)?;
        rec.comments.push(CommentRec {
            id,
            user: user.to_owned(),
            body: body.to_owned(),
            created_at: now.clone(),
            updated_at: now.clone(),
        });
        rec.updated_at = now;
        inner.notify_comment(owner, repo, number, id, user);
        Ok(id)
    }

    /// Every delivery so far (redeliveries included), in the order they were queued.
    #[must_use]
    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        lock(&self.shared).deliveries.clone()
    }

    /// Gitea's "Redeliver": send the body of delivery `id` again, byte for byte with the
    /// same signature, as a new delivery with a new id (Gitea's `ReplayHookTask` copies
    /// the payload into a new task with a new UUID). Returns the new id, or `None` when
    /// no delivery has id `id`.
    pub fn redeliver(&self, id: &str) -> Option<String> {
        let new_id = webhooks::uuid_v4();
        let mut inner = lock(&self.shared);
        let mut record = inner.deliveries.iter().find(|d| d.id == id)?.clone();
        record.id.clone_from(&new_id);
        for (name, value) in &mut record.headers {
            if name.ends_with("-Delivery") {
                value.clone_from(&new_id);
            }
        }
        reset(&mut record);
        inner.enqueue(record);
        Some(new_id)
    }

    /// Send delivery `id` again exactly as it was, delivery id included: what a receiver
    /// sees when the same delivery reaches it twice (Gitea itself gives a redelivery a
    /// new id, see [`FakeGitea::redeliver`]). Returns whether such a delivery exists.
    pub fn resend(&self, id: &str) -> bool {
        let mut inner = lock(&self.shared);
        let Some(mut record) = inner.deliveries.iter().find(|d| d.id == id).cloned() else {
            return false;
        };
        reset(&mut record);
        inner.enqueue(record);
        true
    }

    /// Wait until at least `count` deliveries have been attempted, then return them all.
    ///
    /// # Errors
    /// When fewer than `count` were attempted within `timeout`.
    pub async fn wait_deliveries(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<DeliveryRecord>, FakeGiteaError> {
        let mut attempted = lock(&self.shared).delivered.subscribe();
        let reached = tokio::time::timeout(timeout, attempted.wait_for(|n| *n >= count))
            .await
            .is_ok_and(|waited| waited.is_ok());
        if reached {
            return Ok(self.deliveries());
        }
        Err(FakeGiteaError::DeliveryTimeout {
            wanted: count,
            attempted: *attempted.borrow(),
            waited: timeout,
        })
    }
}

/// A copy of a delivery, not yet attempted.
fn reset(record: &mut DeliveryRecord) {
    record.attempted = false;
    record.status = None;
    record.error = None;
}

fn issue_mut<'a>(
    inner: &'a mut Inner,
    owner: &str,
    repo: &str,
    number: u64,
) -> Result<&'a mut IssueRec, FakeGiteaError> {
    inner
        .repos
        .get_mut(&(owner.to_owned(), repo.to_owned()))
        .and_then(|r| r.issues.get_mut(&number))
        .ok_or_else(|| FakeGiteaError::NoIssue {
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            number,
        })
}

/// A pull request from `head` to `base` with the commit ids of its branches, or `None`
/// when either branch is missing.
fn pull_from_git(
    home: &std::path::Path,
    dir: &std::path::Path,
    head: &str,
    base: &str,
) -> Option<PullRec> {
    let refs = git::refs(home, dir).ok()?;
    let head_sha = refs.get(&format!("refs/heads/{head}"))?.clone();
    let base_sha = refs.get(&format!("refs/heads/{base}"))?.clone();
    let merge_base =
        git::merge_base(home, dir, &base_sha, &head_sha).unwrap_or_else(|| base_sha.clone());
    Some(PullRec {
        head: head.to_owned(),
        head_sha,
        base: base.to_owned(),
        base_sha,
        merge_base,
        merged: false,
    })
}

/// A stable 40-hex-digit stand-in for a commit SHA.
fn fake_sha(seed: &str) -> String {
    let mut out = String::new();
    for round in 0u8..3 {
        let mut hasher = DefaultHasher::new();
        (seed, round).hash(&mut hasher);
        out.push_str(&format!("{:016x}", hasher.finish()));
    }
    out.truncate(40);
    out
}

/// The router is built from [`ROUTES`], so it cannot serve a route the table
/// (and so the contract test) does not know.
fn router(shared: Shared) -> Router {
    let mut by_path: BTreeMap<&'static str, MethodRouter<Shared>> = BTreeMap::new();
    for route in ROUTES {
        let methods = by_path.remove(route.path).unwrap_or_default();
        let methods = match (route.method, route.path) {
            ("GET", ISSUE) => methods.get(get_issue),
            ("PATCH", ISSUE) => methods.patch(edit_issue),
            ("GET", ISSUE_COMMENTS) => methods.get(list_comments),
            ("POST", ISSUE_COMMENTS) => methods.post(create_comment),
            ("GET", ISSUE_LABELS) => methods.get(list_issue_labels),
            ("POST", ISSUE_LABELS) => methods.post(add_issue_labels),
            ("DELETE", ISSUE_LABEL) => methods.delete(remove_issue_label),
            ("GET", PULL) => methods.get(get_pull),
            ("GET", PULLS) => methods.get(list_pulls),
            ("POST", PULLS) => methods.post(create_pull),
            ("GET", REPO_LABELS) => methods.get(list_repo_labels),
            ("POST", REPO_LABELS) => methods.post(create_repo_label),
            ("GET", ORG_MEMBER) => methods.get(org_is_member),
            ("GET", CURRENT_USER) => methods.get(current_user),
            _ => methods,
        };
        by_path.insert(route.path, methods);
    }
    let api = by_path
        .into_iter()
        .fold(Router::new(), |api, (path, methods)| {
            api.route(path, methods)
        });
    // Git requests skip the API's recording layer (which buffers bodies and applies the
    // delay): they are recorded in `git_requests` instead.
    let git = Router::new()
        .route("/{owner}/{repo}/info/refs", get(git_info_refs))
        .route("/{owner}/{repo}/git-upload-pack", post(git_upload_pack))
        .route("/{owner}/{repo}/git-receive-pack", post(git_receive_pack));
    Router::new()
        .nest(BASE_PATH, api)
        .layer(middleware::from_fn_with_state(shared.clone(), record))
        .merge(git)
        .with_state(shared)
}

type GitPath = Path<(String, String)>;

async fn git_info_refs(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<PeerAddr>,
    Path((owner, repo)): GitPath,
    request: Request,
) -> Response {
    git_request(shared, peer.0, owner, repo, Service::InfoRefs, request).await
}

async fn git_upload_pack(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<PeerAddr>,
    Path((owner, repo)): GitPath,
    request: Request,
) -> Response {
    git_request(shared, peer.0, owner, repo, Service::UploadPack, request).await
}

async fn git_receive_pack(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<PeerAddr>,
    Path((owner, repo)): GitPath,
    request: Request,
) -> Response {
    git_request(shared, peer.0, owner, repo, Service::ReceivePack, request).await
}

/// One git request: credentials first (every repository is private, so Gitea asks for
/// them before it says whether the repository exists), then `git http-backend`.
async fn git_request(
    shared: Shared,
    peer: SocketAddr,
    owner: String,
    repo_segment: String,
    service: Service,
    request: Request,
) -> Response {
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path().to_owned(), ToString::to_string);
    let repo = repo_segment
        .strip_suffix(".git")
        .unwrap_or(&repo_segment)
        .to_owned();
    let (user, found) = {
        let inner = lock(&shared);
        let user = git::authenticate(
            inner.git_credentials.as_ref(),
            request.headers().get(header::AUTHORIZATION),
        );
        let found = inner
            .repos
            .get(&(owner.clone(), repo.clone()))
            .and_then(|r| r.git.clone())
            .map(|dir| (inner.home.clone(), inner.project_root(), dir));
        (user, found)
    };
    let (response, pushed) = match (&user, found) {
        (None, _) => (git::unauthorized(), None),
        (Some(_), None) => (
            git::plain(StatusCode::NOT_FOUND, "Repository not found\n"),
            None,
        ),
        (Some(user), Some((home, project_root, dir))) => {
            let run = BackendRun {
                home: home.clone(),
                project_root,
                owner: owner.clone(),
                repo: repo.clone(),
                service,
                user: user.clone(),
                peer,
            };
            let response = git::run_backend(run, request).await;
            let pushed = (service == Service::ReceivePack && response.status() == StatusCode::OK)
                .then_some((home, dir, user.clone()));
            (response, pushed)
        }
    };
    if let Some((home, dir, pusher)) = pushed {
        let refs = tokio::task::spawn_blocking(move || git::refs(&home, &dir)).await;
        if let Ok(Ok(refs)) = refs {
            lock(&shared).sync_pulls(&owner, &repo, &refs, &pusher);
        }
    }
    lock(&shared).git_requests.push(GitRequest {
        method,
        path,
        user,
        status: response.status().as_u16(),
    });
    response
}

async fn record(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let uri = request.uri().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|m| {
            m.as_str()
                .strip_prefix(BASE_PATH)
                .unwrap_or(m.as_str())
                .to_owned()
        })
        .unwrap_or_default();
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let body_json = serde_json::from_slice::<Value>(&bytes).ok();
    let delay = lock(&shared).delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let response = next
        .run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await;
    let status = response.status().as_u16();
    let entry = GiteaRequest {
        method: method.clone(),
        uri,
        route: route.clone(),
        status,
        authorization,
        body: body_json,
    };
    let declared = ROUTES
        .iter()
        .any(|r| r.method == method && r.path == route && r.statuses.contains(&status));
    let mut inner = lock(&shared);
    if !declared && !route.is_empty() {
        inner.undeclared.push(entry.clone());
    }
    inner.requests.push(entry);
    response
}

fn api_error(status: StatusCode, message: &str) -> Response {
    // Gitea's `APIError` shape.
    (
        status,
        axum::Json(json!({ "message": message, "url": "https://docs.gitea.com/api" })),
    )
        .into_response()
}

fn not_found() -> Response {
    api_error(StatusCode::NOT_FOUND, "The target couldn't be found.")
}

fn json_status(status: StatusCode, value: Value) -> Response {
    (status, axum::Json(value)).into_response()
}

fn user_json(login: &str) -> Value {
    let mut hasher = DefaultHasher::new();
    login.hash(&mut hasher);
    let id = i64::try_from(hasher.finish() % 100_000).unwrap_or(1) + 1;
    json!({
        "id": id,
        "login": login,
        "login_name": "",
        "source_id": 0,
        "full_name": "",
        "email": format!("{login}@noreply.localhost"),
        "avatar_url": "",
        "html_url": format!("http://127.0.0.1/{login}"),
        "language": "",
        "is_admin": false,
        "restricted": false,
        "active": true,
        "prohibit_login": false,
        "visibility": "public",
    })
}

fn label_json(owner: &str, repo: &str, label: &LabelRec) -> Value {
    json!({
        "id": label.id,
        "name": label.name,
        "exclusive": false,
        "is_archived": false,
        "color": label.color,
        "description": label.description,
        "url": format!("http://127.0.0.1{BASE_PATH}/repos/{owner}/{repo}/labels/{}", label.id),
    })
}

fn issue_labels_json(owner: &str, repo: &str, repo_rec: &Repo, rec: &IssueRec) -> Vec<Value> {
    rec.label_ids
        .iter()
        .filter_map(|id| repo_rec.labels.iter().find(|l| l.id == *id))
        .map(|l| label_json(owner, repo, l))
        .collect()
}

fn assignees_json(rec: &IssueRec) -> Value {
    // Gitea sends `null`, not `[]`, when nobody is assigned.
    if rec.assignees.is_empty() {
        Value::Null
    } else {
        Value::Array(rec.assignees.iter().map(|a| user_json(a)).collect())
    }
}

fn issue_json(owner: &str, repo: &str, repo_rec: &Repo, rec: &IssueRec) -> Value {
    let html = format!("http://127.0.0.1/{owner}/{repo}/issues/{}", rec.number);
    json!({
        "id": rec.id,
        "url": format!("http://127.0.0.1{BASE_PATH}/repos/{owner}/{repo}/issues/{}", rec.number),
        "html_url": html,
        "number": rec.number,
        "user": user_json(&rec.user),
        "original_author": "",
        "original_author_id": 0,
        "title": rec.title,
        "body": rec.body,
        "ref": "",
        "assets": [],
        "labels": issue_labels_json(owner, repo, repo_rec, rec),
        "milestone": null,
        "assignee": rec.assignees.first().map(|a| user_json(a)),
        "assignees": assignees_json(rec),
        "state": if rec.open { "open" } else { "closed" },
        "is_locked": false,
        "comments": rec.comments.len(),
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "closed_at": if rec.open { Value::Null } else { Value::String(rec.updated_at.clone()) },
        "due_date": null,
        "pull_request": rec.pull.as_ref().map(|p| json!({
            "merged": p.merged,
            "merged_at": if p.merged { Value::String(rec.updated_at.clone()) } else { Value::Null },
            "draft": false,
            "html_url": format!("http://127.0.0.1/{owner}/{repo}/pulls/{}", rec.number),
        })),
        "repository": {
            "id": repo_rec.id,
            "name": repo,
            "owner": owner,
            "full_name": format!("{owner}/{repo}"),
        },
        "pin_order": 0,
        "content_version": rec.content_version,
    })
}

/// The repository as Gitea's `Repository` (a subset of its fields, all from the spec).
fn repository_json(base_url: &str, owner: &str, repo: &str, repo_rec: &Repo) -> Value {
    let open_issues = repo_rec
        .issues
        .values()
        .filter(|i| i.open && i.pull.is_none())
        .count();
    let open_pulls = repo_rec
        .issues
        .values()
        .filter(|i| i.open && i.pull.is_some())
        .count();
    let mut repository = json!({
        "id": repo_rec.id,
        "owner": user_json(owner),
        "name": repo,
        "full_name": format!("{owner}/{repo}"),
        "description": "",
        "empty": repo_rec.git.is_none(),
        "private": true,
        "fork": false,
        "template": false,
        "parent": null,
        "mirror": false,
        "size": 0,
        "language": "",
        "languages_url": format!("{base_url}{BASE_PATH}/repos/{owner}/{repo}/languages"),
        "html_url": format!("{base_url}/{owner}/{repo}"),
        "url": format!("{base_url}{BASE_PATH}/repos/{owner}/{repo}"),
        "link": "",
        "ssh_url": "",
        "clone_url": format!("{base_url}/{owner}/{repo}.git"),
        "original_url": "",
        "website": "",
        "stars_count": 0,
        "forks_count": 0,
        "watchers_count": 0,
        "open_issues_count": open_issues,
        "open_pr_counter": open_pulls,
        "release_counter": 0,
    });
    // Two `json!` calls: one would exceed the macro's recursion limit.
    let settings = json!({
        "default_branch": "main",
        "archived": false,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "archived_at": "1970-01-01T00:00:00Z",
        "permissions": { "admin": true, "push": true, "pull": true },
        "has_code": true,
        "has_issues": true,
        "has_wiki": false,
        "has_pull_requests": true,
        "has_projects": false,
        "has_releases": false,
        "has_packages": false,
        "has_actions": false,
        "internal": false,
        "object_format_name": "sha1",
        "mirror_interval": "",
        "mirror_updated": "0001-01-01T00:00:00Z",
        "repo_transfer": null,
        "topics": null,
        "licenses": null,
        "avatar_url": "",
    });
    if let (Some(fields), Value::Object(more)) = (repository.as_object_mut(), settings) {
        fields.extend(more);
    }
    repository
}

fn branch_json(
    base_url: &str,
    repo_rec: &Repo,
    owner: &str,
    repo: &str,
    name: &str,
    sha: &str,
) -> Value {
    json!({
        "label": name,
        "ref": name,
        "sha": sha,
        "repo_id": repo_rec.id,
        "repo": repository_json(base_url, owner, repo, repo_rec),
    })
}

fn pull_json(
    base_url: &str,
    owner: &str,
    repo: &str,
    repo_rec: &Repo,
    rec: &IssueRec,
    pull: &PullRec,
) -> Value {
    let html = format!("http://127.0.0.1/{owner}/{repo}/pulls/{}", rec.number);
    json!({
        "id": rec.id,
        "url": html,
        "number": rec.number,
        "user": user_json(&rec.user),
        "title": rec.title,
        "body": rec.body,
        "labels": issue_labels_json(owner, repo, repo_rec, rec),
        "milestone": null,
        "assignee": rec.assignees.first().map(|a| user_json(a)),
        "assignees": assignees_json(rec),
        "requested_reviewers": null,
        "requested_reviewers_teams": null,
        "state": if rec.open { "open" } else { "closed" },
        "draft": false,
        "is_locked": false,
        "comments": rec.comments.len(),
        "review_comments": 0,
        "additions": 0,
        "deletions": 0,
        "changed_files": 0,
        "html_url": html,
        "diff_url": format!("{html}.diff"),
        "patch_url": format!("{html}.patch"),
        "mergeable": rec.open,
        "merged": pull.merged,
        "merged_at": if pull.merged { Value::String(rec.updated_at.clone()) } else { Value::Null },
        "merge_commit_sha": if pull.merged { Value::String(pull.head_sha.clone()) } else { Value::Null },
        "merged_by": null,
        "allow_maintainer_edit": false,
        "base": branch_json(base_url, repo_rec, owner, repo, &pull.base, &pull.base_sha),
        "head": branch_json(base_url, repo_rec, owner, repo, &pull.head, &pull.head_sha),
        "merge_base": pull.merge_base,
        "due_date": null,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
        "closed_at": if rec.open { Value::Null } else { Value::String(rec.updated_at.clone()) },
        "pin_order": 0,
        "content_version": rec.content_version,
    })
}

fn comment_json(owner: &str, repo: &str, number: u64, c: &CommentRec) -> Value {
    json!({
        "id": c.id,
        "html_url": format!("http://127.0.0.1/{owner}/{repo}/issues/{number}#issuecomment-{}", c.id),
        "pull_request_url": "",
        "issue_url": format!("http://127.0.0.1/{owner}/{repo}/issues/{number}"),
        "user": user_json(&c.user),
        "original_author": "",
        "original_author_id": 0,
        "body": c.body,
        "assets": [],
        "created_at": c.created_at,
        "updated_at": c.updated_at,
    })
}

/// The login behind a token: tests use `token <login>` so that writes are
/// attributed to someone.
/// The user an API request acts as: the owner of its token, as Gitea resolves it. The
/// token of [`FakeGitea::set_git_credentials`] belongs to that user; any other token
/// stands for a user named after it, and no token for `bot`.
fn doer(credentials: Option<&GitCredentials>, headers: &axum::http::HeaderMap) -> String {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("token "))
        .filter(|t| !t.is_empty());
    match (token, credentials) {
        (Some(token), Some(known)) if token == known.token => known.username.clone(),
        (Some(token), _) => token.to_owned(),
        (None, _) => "bot".to_owned(),
    }
}

fn page_of<T: Clone>(items: &[T], query: &HashMap<String, String>) -> Vec<T> {
    let page = query
        .get("page")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(30)
        .clamp(1, 50);
    items
        .iter()
        .skip((page - 1) * limit)
        .take(limit)
        .cloned()
        .collect()
}

async fn get_issue(
    State(shared): State<Shared>,
    Path((owner, repo, index)): Path<(String, String, u64)>,
) -> Response {
    let inner = lock(&shared);
    let Some(repo_rec) = inner.repos.get(&(owner.clone(), repo.clone())) else {
        return not_found();
    };
    match repo_rec.issues.get(&index) {
        Some(rec) => json_status(StatusCode::OK, issue_json(&owner, &repo, repo_rec, rec)),
        None => not_found(),
    }
}

async fn edit_issue(
    State(shared): State<Shared>,
    Path((owner, repo, index)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(option) = serde_json::from_slice::<Value>(&body) else {
        return api_error(StatusCode::BAD_REQUEST, "invalid json");
    };
    let mut inner = lock(&shared);
    let doer_name = doer(inner.git_credentials.as_ref(), &headers);
    let now = inner.now();
    let Some(repo_rec) = inner.repos.get_mut(&(owner.clone(), repo.clone())) else {
        return not_found();
    };
    let Some(rec) = repo_rec.issues.get_mut(&index) else {
        return not_found();
    };
    // Webhooks in the order Gitea's EditIssue causes them: title, body, state.
    let mut changes = Vec::new();
    if let Some(new_body) = option.get("body").and_then(Value::as_str) {
        if let Some(expected) = option.get("content_version").and_then(Value::as_i64)
            && expected != rec.content_version
        {
            return api_error(StatusCode::CONFLICT, "the issue is already changed");
        }
        if new_body != rec.body {
            let old = std::mem::replace(&mut rec.body, new_body.to_owned());
            rec.content_version += 1;
            changes.push((Change::Edited, Some(json!({ "body": { "from": old } }))));
        }
    }
    if let Some(title) = option.get("title").and_then(Value::as_str)
        && title != rec.title
    {
        let old = std::mem::replace(&mut rec.title, title.to_owned());
        changes.insert(
            0,
            (Change::Edited, Some(json!({ "title": { "from": old } }))),
        );
    }
    if let Some(state) = option.get("state").and_then(Value::as_str) {
        let open = state == "open";
        if open != rec.open {
            rec.open = open;
            let change = if open {
                Change::Reopened
            } else {
                Change::Closed
            };
            changes.push((change, None));
        }
    }
    rec.updated_at = now;
    let sender = doer_name.clone();
    for (change, detail) in changes {
        inner.notify(&owner, &repo, index, change, &sender, detail);
    }
    let repo_rec = &inner.repos[&(owner.clone(), repo.clone())];
    let Some(rec) = repo_rec.issues.get(&index) else {
        return not_found();
    };
    // Gitea answers an edit with 201 Created (spec: issueEditIssue).
    json_status(
        StatusCode::CREATED,
        issue_json(&owner, &repo, repo_rec, rec),
    )
}

async fn list_comments(
    State(shared): State<Shared>,
    Path((owner, repo, index)): Path<(String, String, u64)>,
) -> Response {
    let inner = lock(&shared);
    let Some(rec) = inner
        .repos
        .get(&(owner.clone(), repo.clone()))
        .and_then(|r| r.issues.get(&index))
    else {
        return not_found();
    };
    let comments: Vec<Value> = rec
        .comments
        .iter()
        .map(|c| comment_json(&owner, &repo, index, c))
        .collect();
    json_status(StatusCode::OK, Value::Array(comments))
}

async fn create_comment(
    State(shared): State<Shared>,
    Path((owner, repo, index)): Path<(String, String, u64)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(option) = serde_json::from_slice::<Value>(&body) else {
        return api_error(StatusCode::BAD_REQUEST, "invalid json");
    };
    let text = option
        .get("body")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut inner = lock(&shared);
    let doer_name = doer(inner.git_credentials.as_ref(), &headers);
    let id = inner.id();
    let now = inner.now();
    let Some(rec) = inner
        .repos
        .get_mut(&(owner.clone(), repo.clone()))
        .and_then(|r| r.issues.get_mut(&index))
    else {
        return not_found();
    };
    let comment = CommentRec {
        id,
        user: doer_name.clone(),
        body: text,
        created_at: now.clone(),
        updated_at: now.clone(),
    };
    rec.comments.push(comment.clone());
    rec.updated_at = now;
    inner.notify_comment(&owner, &repo, index, id, &comment.user);
    json_status(
        StatusCode::CREATED,
        comment_json(&owner, &repo, index, &comment),
    )
}

async fn list_issue_labels(
    State(shared): State<Shared>,
    Path((owner, repo, index)): Path<(String, String, u64)>,
) -> Response {
    let inner = lock(&shared);
    let Some(repo_rec) = inner.repos.get(&(owner.clone(), repo.clone())) else {
        return not_found();
    };
    let Some(rec) = repo_rec.issues.get(&index) else {
        return not_found();
    };
    json_status(
        StatusCode::OK,
        Value::Array(issue_labels_json(&owner, &repo, repo_rec, rec)),
    )
}

async fn add_issue_labels(
    State(shared): State<Shared>,
    Path((owner, repo, index)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(option) = serde_json::from_slice::<Value>(&body) else {
        return api_error(StatusCode::BAD_REQUEST, "invalid json");
    };
    let wanted = option
        .get("labels")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut inner = lock(&shared);
    let doer_name = doer(inner.git_credentials.as_ref(), &headers);
    let now = inner.now();
    let Some(repo_rec) = inner.repos.get_mut(&(owner.clone(), repo.clone())) else {
        return not_found();
    };
    // IssueLabelsOption: label ids, or label names.
    let mut ids = Vec::new();
    for item in &wanted {
        let found = repo_rec.labels.iter().find(|l| match item {
            Value::Number(n) => n.as_i64() == Some(l.id),
            Value::String(s) => *s == l.name,
            _ => false,
        });
        match found {
            Some(label) => ids.push(label.id),
            None => return not_found(),
        }
    }
    let Some(rec) = repo_rec.issues.get_mut(&index) else {
        return not_found();
    };
    let mut added = false;
    for id in ids {
        if !rec.label_ids.contains(&id) {
            rec.label_ids.push(id);
            added = true;
        }
    }
    rec.updated_at = now;
    if added {
        inner.notify(
            &owner,
            &repo,
            index,
            Change::Labeled,
            &doer_name.clone(),
            None,
        );
    }
    let repo_rec = &inner.repos[&(owner.clone(), repo.clone())];
    let Some(rec) = repo_rec.issues.get(&index) else {
        return not_found();
    };
    json_status(
        StatusCode::OK,
        Value::Array(issue_labels_json(&owner, &repo, repo_rec, rec)),
    )
}

async fn remove_issue_label(
    State(shared): State<Shared>,
    Path((owner, repo, index, id)): Path<(String, String, u64, i64)>,
    headers: HeaderMap,
) -> Response {
    let mut inner = lock(&shared);
    let doer_name = doer(inner.git_credentials.as_ref(), &headers);
    let now = inner.now();
    let Some(repo_rec) = inner.repos.get_mut(&(owner.clone(), repo.clone())) else {
        return not_found();
    };
    if !repo_rec.labels.iter().any(|l| l.id == id) {
        return api_error(StatusCode::UNPROCESSABLE_ENTITY, "label does not exist");
    }
    let Some(rec) = repo_rec.issues.get_mut(&index) else {
        return not_found();
    };
    let before = rec.label_ids.len();
    rec.label_ids.retain(|l| *l != id);
    rec.updated_at = now;
    if rec.label_ids.len() != before {
        inner.notify(
            &owner,
            &repo,
            index,
            Change::Labeled,
            &doer_name.clone(),
            None,
        );
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn get_pull(
    State(shared): State<Shared>,
    Path((owner, repo, index)): Path<(String, String, u64)>,
) -> Response {
    let inner = lock(&shared);
    let Some(repo_rec) = inner.repos.get(&(owner.clone(), repo.clone())) else {
        return not_found();
    };
    match repo_rec.issues.get(&index) {
        Some(rec) => match &rec.pull {
            Some(pull) => json_status(
                StatusCode::OK,
                pull_json(&inner.base_url, &owner, &repo, repo_rec, rec, pull),
            ),
            None => not_found(),
        },
        None => not_found(),
    }
}

async fn list_pulls(
    State(shared): State<Shared>,
    Path((owner, repo)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let inner = lock(&shared);
    let Some(repo_rec) = inner.repos.get(&(owner.clone(), repo.clone())) else {
        return not_found();
    };
    let state = query.get("state").map_or("open", String::as_str);
    // Newest first, as Gitea sorts by default.
    let all: Vec<Value> = repo_rec
        .issues
        .values()
        .rev()
        .filter_map(|rec| rec.pull.as_ref().map(|pull| (rec, pull)))
        .filter(|(rec, _)| match state {
            "closed" => !rec.open,
            "all" => true,
            _ => rec.open,
        })
        .map(|(rec, pull)| pull_json(&inner.base_url, &owner, &repo, repo_rec, rec, pull))
        .collect();
    json_status(StatusCode::OK, Value::Array(page_of(&all, &query)))
}

async fn create_pull(
    State(shared): State<Shared>,
    Path((owner, repo)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(option) = serde_json::from_slice::<Value>(&body) else {
        return api_error(StatusCode::BAD_REQUEST, "invalid json");
    };
    let field = |name: &str| {
        option
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (head, base, title) = (field("head"), field("base"), field("title"));
    if head.is_empty() || base.is_empty() || title.is_empty() || head == base {
        return api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "head, base and title are required and head must differ from base",
        );
    }
    // With a git repository, head and base must be branches there (Gitea's
    // `parseCompareInfo` answers 404 otherwise), and the commit ids are real.
    let git = {
        let inner = lock(&shared);
        let Some(repo_rec) = inner.repos.get(&(owner.clone(), repo.clone())) else {
            return not_found();
        };
        repo_rec.git.clone().map(|dir| (inner.home.clone(), dir))
    };
    let pull = match git {
        Some((home, dir)) => {
            let (head, base) = (head.clone(), base.clone());
            let found =
                tokio::task::spawn_blocking(move || pull_from_git(&home, &dir, &head, &base)).await;
            match found {
                Ok(Some(pull)) => pull,
                _ => return not_found(),
            }
        }
        None => PullRec::without_git(&head, &base),
    };
    let mut inner = lock(&shared);
    let doer_name = doer(inner.git_credentials.as_ref(), &headers);
    let Some(repo_rec) = inner.repos.get(&(owner.clone(), repo.clone())) else {
        return not_found();
    };
    let exists = repo_rec.issues.values().any(|rec| {
        rec.open
            && rec
                .pull
                .as_ref()
                .is_some_and(|p| p.head == head && p.base == base)
    });
    if exists {
        return api_error(
            StatusCode::CONFLICT,
            "pull request already exists for these targets",
        );
    }
    let sender = doer_name.clone();
    let number = inner.create_issue(
        &owner,
        &repo,
        NewIssue {
            title,
            body: field("body"),
            author: sender.clone(),
            ..NewIssue::default()
        },
    );
    let repo_rec = inner.repo_mut(&owner, &repo);
    let Some(rec) = repo_rec.issues.get_mut(&number) else {
        return not_found();
    };
    rec.pull = Some(pull);
    inner.notify(&owner, &repo, number, Change::Opened, &sender, None);
    let repo_rec = &inner.repos[&(owner.clone(), repo.clone())];
    match repo_rec.issues.get(&number) {
        Some(
            rec @ IssueRec {
                pull: Some(pull), ..
            },
        ) => json_status(
            StatusCode::CREATED,
            pull_json(&inner.base_url, &owner, &repo, repo_rec, rec, pull),
        ),
        _ => not_found(),
    }
}

async fn list_repo_labels(
    State(shared): State<Shared>,
    Path((owner, repo)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let inner = lock(&shared);
    let Some(repo_rec) = inner.repos.get(&(owner.clone(), repo.clone())) else {
        return not_found();
    };
    let all: Vec<Value> = repo_rec
        .labels
        .iter()
        .map(|l| label_json(&owner, &repo, l))
        .collect();
    json_status(StatusCode::OK, Value::Array(page_of(&all, &query)))
}

async fn create_repo_label(
    State(shared): State<Shared>,
    Path((owner, repo)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(option) = serde_json::from_slice::<Value>(&body) else {
        return api_error(StatusCode::BAD_REQUEST, "invalid json");
    };
    let name = option
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let color = option
        .get("color")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim_start_matches('#')
        .to_owned();
    if name.is_empty() || color.is_empty() {
        return api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name and color are required",
        );
    }
    let mut inner = lock(&shared);
    if !inner.repos.contains_key(&(owner.clone(), repo.clone())) {
        return not_found();
    }
    let id = inner.id();
    let label = LabelRec {
        id,
        name,
        color,
        description: option
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    };
    inner.repo_mut(&owner, &repo).labels.push(label.clone());
    json_status(StatusCode::CREATED, label_json(&owner, &repo, &label))
}

/// `GET /user`: the token's owner.
async fn current_user(State(shared): State<Shared>, headers: axum::http::HeaderMap) -> Response {
    let inner = lock(&shared);
    let login = doer(inner.git_credentials.as_ref(), &headers);
    (StatusCode::OK, axum::Json(user_json(&login))).into_response()
}

async fn org_is_member(
    State(shared): State<Shared>,
    Path((org, username)): Path<(String, String)>,
) -> Response {
    let inner = lock(&shared);
    if inner.membership == Membership::Hidden {
        let location = format!("{BASE_PATH}/orgs/{org}/public_members/{username}");
        let mut response = StatusCode::SEE_OTHER.into_response();
        if let Ok(value) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, value);
        }
        return response;
    }
    let member = inner
        .orgs
        .get(&org)
        .is_some_and(|members| members.contains(&username));
    if member {
        StatusCode::NO_CONTENT.into_response()
    } else {
        not_found()
    }
}
