//! A fake Gitea on loopback: the `/api/v1` endpoints bot-bottle uses, over
//! in-memory repositories, issues, pull requests, comments, labels and org
//! members.
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
//! - org membership: 204 member, 404 not; in [`Membership::Hidden`] mode it answers
//!   303 to the public-members URL, as Gitea does when the token's user may not see
//!   private membership.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

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
    merged: bool,
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
}

#[derive(Debug, Default)]
struct Inner {
    repos: BTreeMap<(String, String), Repo>,
    orgs: BTreeMap<String, BTreeSet<String>>,
    membership: Membership,
    next_id: i64,
    tick: u64,
    delay: Duration,
    requests: Vec<GiteaRequest>,
    undeclared: Vec<GiteaRequest>,
}

impl Inner {
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
}

type Shared = Arc<Mutex<Inner>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running fake Gitea. Dropping it stops the server.
pub struct FakeGitea {
    addr: SocketAddr,
    shared: Shared,
    task: JoinHandle<()>,
}

impl Drop for FakeGitea {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGitea {
    /// Start on `127.0.0.1:0`.
    pub async fn start() -> std::io::Result<Self> {
        let shared: Shared = Arc::new(Mutex::new(Inner::default()));
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let app = router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>/api/v1`, the value of `FORGE_GITEA_API`.
    #[must_use]
    pub fn api_url(&self) -> String {
        format!("http://{}{BASE_PATH}", self.addr)
    }

    /// Make sure a repository exists (issue creation does this too).
    pub fn add_repo(&self, owner: &str, repo: &str) {
        lock(&self.shared).repo_mut(owner, repo);
    }

    /// Open an issue; returns its number. Labels are created in the repo as needed.
    pub fn add_issue(&self, owner: &str, repo: &str, issue: NewIssue) -> u64 {
        lock(&self.shared).create_issue(owner, repo, issue)
    }

    /// Open a pull request as some user (not through the API); returns its number.
    pub fn add_pull(
        &self,
        owner: &str,
        repo: &str,
        issue: NewIssue,
        head: &str,
        base: &str,
    ) -> u64 {
        let mut inner = lock(&self.shared);
        let number = inner.create_issue(owner, repo, issue);
        if let Some(rec) = inner.repo_mut(owner, repo).issues.get_mut(&number) {
            rec.pull = Some(PullRec {
                head: head.to_owned(),
                head_sha: fake_sha(head),
                base: base.to_owned(),
                merged: false,
            });
        }
        number
    }

    /// Close (and optionally merge) an issue or PR, as a human would.
    pub fn close(&self, owner: &str, repo: &str, number: u64, merged: bool) {
        let mut inner = lock(&self.shared);
        let now = inner.now();
        if let Some(rec) = inner.repo_mut(owner, repo).issues.get_mut(&number) {
            rec.open = false;
            rec.updated_at = now;
            if let Some(pull) = rec.pull.as_mut() {
                pull.merged = merged;
            }
        }
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

    /// Post a comment as some user (not through the API); returns its id.
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
            _ => methods,
        };
        by_path.insert(route.path, methods);
    }
    let api = by_path
        .into_iter()
        .fold(Router::new(), |api, (path, methods)| {
            api.route(path, methods)
        });
    Router::new()
        .nest(BASE_PATH, api)
        .layer(middleware::from_fn_with_state(shared.clone(), record))
        .with_state(shared)
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

fn branch_json(repo_rec: &Repo, owner: &str, repo: &str, name: &str, sha: &str) -> Value {
    json!({
        "label": name,
        "ref": name,
        "sha": sha,
        "repo_id": repo_rec.id,
        "repo": { "id": repo_rec.id, "name": repo, "full_name": format!("{owner}/{repo}") },
    })
}

fn pull_json(owner: &str, repo: &str, repo_rec: &Repo, rec: &IssueRec, pull: &PullRec) -> Value {
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
        "base": branch_json(repo_rec, owner, repo, &pull.base, &fake_sha(&pull.base)),
        "head": branch_json(repo_rec, owner, repo, &pull.head, &pull.head_sha),
        "merge_base": fake_sha(&pull.base),
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
fn doer(headers: &axum::http::HeaderMap) -> String {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("token "))
        .filter(|t| !t.is_empty())
        .unwrap_or("bot")
        .to_owned()
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
    body: Bytes,
) -> Response {
    let Ok(option) = serde_json::from_slice::<Value>(&body) else {
        return api_error(StatusCode::BAD_REQUEST, "invalid json");
    };
    let mut inner = lock(&shared);
    let now = inner.now();
    let Some(repo_rec) = inner.repos.get_mut(&(owner.clone(), repo.clone())) else {
        return not_found();
    };
    let Some(rec) = repo_rec.issues.get_mut(&index) else {
        return not_found();
    };
    if let Some(new_body) = option.get("body").and_then(Value::as_str) {
        if let Some(expected) = option.get("content_version").and_then(Value::as_i64)
            && expected != rec.content_version
        {
            return api_error(StatusCode::CONFLICT, "the issue is already changed");
        }
        if new_body != rec.body {
            rec.body = new_body.to_owned();
            rec.content_version += 1;
        }
    }
    if let Some(title) = option.get("title").and_then(Value::as_str) {
        title.clone_into(&mut rec.title);
    }
    if let Some(state) = option.get("state").and_then(Value::as_str) {
        rec.open = state == "open";
    }
    rec.updated_at = now;
    let rec = rec.clone();
    let repo_rec = &inner.repos[&(owner.clone(), repo.clone())];
    // Gitea answers an edit with 201 Created (spec: issueEditIssue).
    json_status(
        StatusCode::CREATED,
        issue_json(&owner, &repo, repo_rec, &rec),
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
        user: doer(&headers),
        body: text,
        created_at: now.clone(),
        updated_at: now.clone(),
    };
    rec.comments.push(comment.clone());
    rec.updated_at = now;
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
    for id in ids {
        if !rec.label_ids.contains(&id) {
            rec.label_ids.push(id);
        }
    }
    rec.updated_at = now;
    let rec = rec.clone();
    let repo_rec = &inner.repos[&(owner.clone(), repo.clone())];
    json_status(
        StatusCode::OK,
        Value::Array(issue_labels_json(&owner, &repo, repo_rec, &rec)),
    )
}

async fn remove_issue_label(
    State(shared): State<Shared>,
    Path((owner, repo, index, id)): Path<(String, String, u64, i64)>,
) -> Response {
    let mut inner = lock(&shared);
    let now = inner.now();
    let Some(repo_rec) = inner.repos.get_mut(&(owner, repo)) else {
        return not_found();
    };
    if !repo_rec.labels.iter().any(|l| l.id == id) {
        return api_error(StatusCode::UNPROCESSABLE_ENTITY, "label does not exist");
    }
    let Some(rec) = repo_rec.issues.get_mut(&index) else {
        return not_found();
    };
    rec.label_ids.retain(|l| *l != id);
    rec.updated_at = now;
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
                pull_json(&owner, &repo, repo_rec, rec, pull),
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
        .map(|(rec, pull)| pull_json(&owner, &repo, repo_rec, rec, pull))
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
    let mut inner = lock(&shared);
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
    let number = inner.create_issue(
        &owner,
        &repo,
        NewIssue {
            title,
            body: field("body"),
            author: doer(&headers),
            ..NewIssue::default()
        },
    );
    let repo_rec = inner.repo_mut(&owner, &repo);
    let Some(rec) = repo_rec.issues.get_mut(&number) else {
        return not_found();
    };
    let pull = PullRec {
        head_sha: fake_sha(&head),
        head,
        base,
        merged: false,
    };
    rec.pull = Some(pull.clone());
    let rec = rec.clone();
    json_status(
        StatusCode::CREATED,
        pull_json(&owner, &repo, repo_rec, &rec, &pull),
    )
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
