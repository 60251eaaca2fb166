//! Gitea (and Forgejo, which serves the same `/api/v1`) over HTTP.
//!
//! [`GiteaClient`] is the thin authenticated transport: one method per endpoint,
//! hand-written serde structs, a timeout on every call, and errors that carry the
//! status and body. [`GiteaForge`] maps it onto the [`Forge`] trait.
//!
//! Quirks taken from Gitea's spec and source, each with a test:
//! - `PATCH /repos/{owner}/{repo}/issues/{index}` answers **201**, not 200;
//! - body edits send `content_version`; a mismatch is **409** ([`GiteaError::Conflict`]);
//! - `GET /orgs/{org}/members/{username}` is 204 (member) or 404 (not); when the
//!   token's user cannot see private membership Gitea answers **303** to the
//!   public-members URL. Following it would turn "hidden" into "not a member", so
//!   redirects are never followed and the 303 is a configuration error;
//! - a pull request is also an issue with the same number.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::model::{
    BranchRef, Comment, Forge, ForgeError, Issue, IssueState, Label, NewPullRequest, PullRequest,
    body_closes_issue,
};

/// Bound on every Gitea call: a hung instance must not stall the sidecar.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Error bodies are kept for diagnosis, but a misbehaving server must not be
/// able to fill memory or logs.
const MAX_ERROR_BODY: usize = 4096;

/// Page size for list endpoints (Gitea's default maximum is 50).
const PAGE_LIMIT: usize = 50;

/// How many pages a PR search reads before giving up.
const MAX_PAGES: usize = 20;

/// Colour of labels the client creates (status labels).
const NEW_LABEL_COLOR: &str = "#5319e7";

/// Every endpoint the client calls, so the contract test can check each one
/// against Gitea's published spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    IssueGet,
    IssueEdit,
    IssueCommentsList,
    IssueCommentCreate,
    IssueLabelsList,
    IssueLabelsAdd,
    IssueLabelRemove,
    PullGet,
    PullsList,
    PullCreate,
    RepoLabelsList,
    RepoLabelCreate,
    OrgIsMember,
    CurrentUser,
}

impl Route {
    pub const ALL: &'static [Route] = &[
        Route::IssueGet,
        Route::IssueEdit,
        Route::IssueCommentsList,
        Route::IssueCommentCreate,
        Route::IssueLabelsList,
        Route::IssueLabelsAdd,
        Route::IssueLabelRemove,
        Route::PullGet,
        Route::PullsList,
        Route::PullCreate,
        Route::RepoLabelsList,
        Route::RepoLabelCreate,
        Route::OrgIsMember,
        Route::CurrentUser,
    ];

    #[must_use]
    pub fn method(self) -> &'static str {
        match self {
            Self::IssueEdit => "PATCH",
            Self::IssueCommentCreate | Self::IssueLabelsAdd | Self::PullCreate => "POST",
            Self::RepoLabelCreate => "POST",
            Self::IssueLabelRemove => "DELETE",
            _ => "GET",
        }
    }

    /// The path as written in the spec, below `/api/v1`.
    #[must_use]
    pub fn template(self) -> &'static str {
        match self {
            Self::IssueGet | Self::IssueEdit => "/repos/{owner}/{repo}/issues/{index}",
            Self::IssueCommentsList | Self::IssueCommentCreate => {
                "/repos/{owner}/{repo}/issues/{index}/comments"
            }
            Self::IssueLabelsList | Self::IssueLabelsAdd => {
                "/repos/{owner}/{repo}/issues/{index}/labels"
            }
            Self::IssueLabelRemove => "/repos/{owner}/{repo}/issues/{index}/labels/{id}",
            Self::PullGet => "/repos/{owner}/{repo}/pulls/{index}",
            Self::PullsList | Self::PullCreate => "/repos/{owner}/{repo}/pulls",
            Self::RepoLabelsList | Self::RepoLabelCreate => "/repos/{owner}/{repo}/labels",
            Self::OrgIsMember => "/orgs/{org}/members/{username}",
            Self::CurrentUser => "/user",
        }
    }

    fn reqwest_method(self) -> reqwest::Method {
        match self.method() {
            "PATCH" => reqwest::Method::PATCH,
            "POST" => reqwest::Method::POST,
            "DELETE" => reqwest::Method::DELETE,
            _ => reqwest::Method::GET,
        }
    }
}

/// Every way a Gitea call can fail.
#[derive(Debug, thiserror::Error)]
pub enum GiteaError {
    #[error(
        "gitea api url `{url}` is not an absolute http(s) url\nhint: set `FORGE_GITEA_API` like `https://gitea.example.com/api/v1`"
    )]
    InvalidUrl { url: String },
    #[error("cannot build the gitea http client")]
    Build(#[source] reqwest::Error),
    #[error(
        "`{method} {path}` timed out after {timeout:?}\nhint: check that the gitea instance is reachable"
    )]
    Timeout {
        method: &'static str,
        path: String,
        timeout: Duration,
    },
    #[error("`{method} {path}` failed")]
    Transport {
        method: &'static str,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("`{method} {path}` returned {status}: {body}")]
    Status {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    #[error("`{method} {path}` conflict (409): the content changed since it was read: {body}")]
    Conflict {
        method: &'static str,
        path: String,
        body: String,
    },
    #[error(
        "membership of `{username}` in org `{org}` is hidden from this token (gitea answered 303)\nhint: use a token whose user is a member of `{org}`, or make `{username}`'s membership public"
    )]
    MembershipHidden { org: String, username: String },
    #[error("`{method} {path}` returned a body that does not parse: {detail}")]
    Decode {
        method: &'static str,
        path: String,
        detail: String,
    },
}

impl GiteaError {
    /// The HTTP status, when the server answered.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            Self::Conflict { .. } => Some(409),
            Self::MembershipHidden { .. } => Some(303),
            _ => None,
        }
    }
}

/// Where and as whom the client talks to Gitea.
#[derive(Clone)]
pub struct GiteaConfig {
    /// API base including `/api/v1` (the `FORGE_GITEA_API` value).
    pub api_url: String,
    pub owner: String,
    pub repo: String,
    pub token: String,
    pub timeout: Duration,
    /// Extra trusted roots (PEM) for a forge whose certificate a private CA issued
    /// (`FORGE_CA_FILE`), added to the system's.
    pub extra_roots_pem: Option<Vec<u8>>,
}

impl fmt::Debug for GiteaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GiteaConfig")
            .field("api_url", &self.api_url)
            .field("owner", &self.owner)
            .field("repo", &self.repo)
            .field("token", &"<redacted>")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl GiteaConfig {
    pub fn new(
        api_url: impl Into<String>,
        owner: impl Into<String>,
        repo: impl Into<String>,
        token: impl Into<String>,
    ) -> Self {
        Self {
            api_url: api_url.into(),
            owner: owner.into(),
            repo: repo.into(),
            token: token.into(),
            timeout: DEFAULT_TIMEOUT,
            extra_roots_pem: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiUser {
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub login: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiLabel {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub color: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiPullRequestMeta {
    #[serde(default)]
    pub merged: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiIssue {
    #[serde(default)]
    pub id: i64,
    pub number: u64,
    #[serde(default)]
    pub title: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub body: String,
    #[serde(default)]
    pub state: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub user: ApiUser,
    #[serde(default, deserialize_with = "null_as_default")]
    pub assignees: Vec<ApiUser>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: Vec<ApiLabel>,
    #[serde(default)]
    pub pull_request: Option<ApiPullRequestMeta>,
    #[serde(default)]
    pub updated_at: String,
    #[serde(default)]
    pub content_version: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiBranch {
    #[serde(rename = "ref", default)]
    pub ref_name: String,
    #[serde(default)]
    pub sha: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiPullRequest {
    #[serde(default)]
    pub id: i64,
    pub number: u64,
    #[serde(default)]
    pub title: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub body: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub merged: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub head: ApiBranch,
    #[serde(default, deserialize_with = "null_as_default")]
    pub base: ApiBranch,
    #[serde(default, deserialize_with = "null_as_default")]
    pub user: ApiUser,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiComment {
    pub id: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub user: ApiUser,
    #[serde(default, deserialize_with = "null_as_default")]
    pub body: String,
    #[serde(default)]
    pub created_at: String,
}

/// Which pull requests a listing returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullState {
    Open,
    Closed,
    All,
}

impl PullState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
            Self::All => "all",
        }
    }
}

/// Authenticated client for one repository's Gitea API.
#[derive(Clone)]
pub struct GiteaClient {
    http: reqwest::Client,
    api_url: String,
    owner: String,
    repo: String,
    token: String,
    timeout: Duration,
}

impl fmt::Debug for GiteaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GiteaClient")
            .field("api_url", &self.api_url)
            .field("owner", &self.owner)
            .field("repo", &self.repo)
            .finish_non_exhaustive()
    }
}

struct Response {
    status: u16,
    body: Vec<u8>,
}

impl GiteaClient {
    pub fn new(config: GiteaConfig) -> Result<Self, GiteaError> {
        let api_url = config.api_url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&api_url).map_err(|_| GiteaError::InvalidUrl {
            url: config.api_url.clone(),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(GiteaError::InvalidUrl {
                url: config.api_url,
            });
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            // A 303 from the membership endpoint means "hidden", not "ask the
            // public endpoint"; following redirects would hide that.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("bot-bottle/", env!("CARGO_PKG_VERSION")));
        if is_loopback(&parsed) {
            // A loopback forge (tests, a local Gitea) must never be sent through
            // an environment proxy.
            builder = builder.no_proxy();
        }
        if let Some(pem) = &config.extra_roots_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem).map_err(GiteaError::Build)?;
            for root in roots {
                builder = builder.add_root_certificate(root);
            }
        }
        let http = builder.build().map_err(GiteaError::Build)?;
        Ok(Self {
            http,
            api_url,
            owner: config.owner,
            repo: config.repo,
            token: config.token,
            timeout: config.timeout,
        })
    }

    #[must_use]
    pub fn owner(&self) -> &str {
        &self.owner
    }

    #[must_use]
    pub fn repo(&self) -> &str {
        &self.repo
    }

    /// Fill a route's template: `{owner}` and `{repo}` from the client, other
    /// placeholders from `params` in order. Every value is percent-encoded as one
    /// path segment, so a label or user name cannot add path segments.
    fn path(&self, route: Route, params: &[&str]) -> String {
        let mut out = String::new();
        let mut rest = route.template();
        let mut params = params.iter();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..].find('}').map_or(rest.len(), |i| open + i);
            let value = match &rest[open + 1..close] {
                "owner" => self.owner.as_str(),
                "repo" => self.repo.as_str(),
                _ => params.next().copied().unwrap_or_default(),
            };
            out.push_str(&encode_segment(value));
            rest = rest.get(close + 1..).unwrap_or_default();
        }
        out.push_str(rest);
        out
    }

    async fn send(
        &self,
        route: Route,
        path: &str,
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
    ) -> Result<Response, GiteaError> {
        let method = route.method();
        let mut url = format!("{}{path}", self.api_url);
        if !query.is_empty() {
            let pairs: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{k}={}", encode_segment(v)))
                .collect();
            url = format!("{url}?{}", pairs.join("&"));
        }
        let mut request = self
            .http
            .request(route.reqwest_method(), url)
            .header(
                reqwest::header::AUTHORIZATION,
                format!("token {}", self.token),
            )
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(&body);
        }
        let transport = |source: reqwest::Error| {
            if source.is_timeout() {
                GiteaError::Timeout {
                    method,
                    path: path.to_owned(),
                    timeout: self.timeout,
                }
            } else {
                GiteaError::Transport {
                    method,
                    path: path.to_owned(),
                    source,
                }
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(transport)?.to_vec();
        tracing::debug!(method, path, status, "gitea call");
        Ok(Response { status, body })
    }

    fn status_error(route: Route, path: &str, response: &Response) -> GiteaError {
        let body = truncate_body(&response.body);
        if response.status == 409 {
            GiteaError::Conflict {
                method: route.method(),
                path: path.to_owned(),
                body,
            }
        } else {
            GiteaError::Status {
                method: route.method(),
                path: path.to_owned(),
                status: response.status,
                body,
            }
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        route: Route,
        params: &[&str],
        query: &[(&str, String)],
        body: Option<serde_json::Value>,
        ok: &[u16],
    ) -> Result<T, GiteaError> {
        let path = self.path(route, params);
        let response = self.send(route, &path, query, body).await?;
        if !ok.contains(&response.status) {
            return Err(Self::status_error(route, &path, &response));
        }
        serde_json::from_slice(&response.body).map_err(|e| GiteaError::Decode {
            method: route.method(),
            path,
            detail: e.to_string(),
        })
    }

    /// The user the token belongs to.
    pub async fn current_user(&self) -> Result<ApiUser, GiteaError> {
        self.call(Route::CurrentUser, &[], &[], None, &[200]).await
    }

    pub async fn get_issue(&self, number: u64) -> Result<ApiIssue, GiteaError> {
        self.call(Route::IssueGet, &[&number.to_string()], &[], None, &[200])
            .await
    }

    /// Replace an issue's (or PR's) body. With `content_version`, Gitea refuses
    /// the edit with 409 when someone changed the body since that version.
    pub async fn edit_issue_body(
        &self,
        number: u64,
        body: &str,
        content_version: Option<i64>,
    ) -> Result<ApiIssue, GiteaError> {
        let mut payload = json!({ "body": body });
        if let Some(version) = content_version {
            payload["content_version"] = json!(version);
        }
        // The spec says 201 for an edit; 200 is tolerated for older servers.
        self.call(
            Route::IssueEdit,
            &[&number.to_string()],
            &[],
            Some(payload),
            &[201, 200],
        )
        .await
    }

    pub async fn list_comments(&self, number: u64) -> Result<Vec<ApiComment>, GiteaError> {
        self.call(
            Route::IssueCommentsList,
            &[&number.to_string()],
            &[],
            None,
            &[200],
        )
        .await
    }

    pub async fn create_comment(&self, number: u64, body: &str) -> Result<ApiComment, GiteaError> {
        self.call(
            Route::IssueCommentCreate,
            &[&number.to_string()],
            &[],
            Some(json!({ "body": body })),
            &[201],
        )
        .await
    }

    pub async fn get_pull(&self, number: u64) -> Result<ApiPullRequest, GiteaError> {
        self.call(Route::PullGet, &[&number.to_string()], &[], None, &[200])
            .await
    }

    pub async fn list_pulls(
        &self,
        state: PullState,
        page: usize,
    ) -> Result<Vec<ApiPullRequest>, GiteaError> {
        self.call(
            Route::PullsList,
            &[],
            &[
                ("state", state.as_str().to_owned()),
                ("page", page.to_string()),
                ("limit", PAGE_LIMIT.to_string()),
            ],
            None,
            &[200],
        )
        .await
    }

    pub async fn create_pull(
        &self,
        request: &NewPullRequest,
    ) -> Result<ApiPullRequest, GiteaError> {
        self.call(
            Route::PullCreate,
            &[],
            &[],
            Some(json!({
                "title": request.title,
                "body": request.body,
                "head": request.head,
                "base": request.base,
            })),
            &[201],
        )
        .await
    }

    pub async fn issue_labels(&self, number: u64) -> Result<Vec<ApiLabel>, GiteaError> {
        self.call(
            Route::IssueLabelsList,
            &[&number.to_string()],
            &[],
            None,
            &[200],
        )
        .await
    }

    pub async fn add_issue_labels(
        &self,
        number: u64,
        label_ids: &[u64],
    ) -> Result<Vec<ApiLabel>, GiteaError> {
        self.call(
            Route::IssueLabelsAdd,
            &[&number.to_string()],
            &[],
            Some(json!({ "labels": label_ids })),
            &[200],
        )
        .await
    }

    pub async fn remove_issue_label(&self, number: u64, label_id: u64) -> Result<(), GiteaError> {
        let path = self.path(
            Route::IssueLabelRemove,
            &[&number.to_string(), &label_id.to_string()],
        );
        let response = self.send(Route::IssueLabelRemove, &path, &[], None).await?;
        match response.status {
            204 => Ok(()),
            _ => Err(Self::status_error(
                Route::IssueLabelRemove,
                &path,
                &response,
            )),
        }
    }

    pub async fn repo_labels(&self) -> Result<Vec<ApiLabel>, GiteaError> {
        let mut all = Vec::new();
        for page in 1..=MAX_PAGES {
            let batch: Vec<ApiLabel> = self
                .call(
                    Route::RepoLabelsList,
                    &[],
                    &[
                        ("page", page.to_string()),
                        ("limit", PAGE_LIMIT.to_string()),
                    ],
                    None,
                    &[200],
                )
                .await?;
            let done = batch.len() < PAGE_LIMIT;
            all.extend(batch);
            if done {
                break;
            }
        }
        Ok(all)
    }

    pub async fn create_repo_label(&self, name: &str) -> Result<ApiLabel, GiteaError> {
        self.call(
            Route::RepoLabelCreate,
            &[],
            &[],
            Some(json!({ "name": name, "color": NEW_LABEL_COLOR })),
            &[201],
        )
        .await
    }

    /// 204: member; 404: not a member; 303: the token's user may not see
    /// private membership, reported as [`GiteaError::MembershipHidden`].
    pub async fn is_org_member(&self, org: &str, username: &str) -> Result<bool, GiteaError> {
        let path = self.path(Route::OrgIsMember, &[org, username]);
        let response = self.send(Route::OrgIsMember, &path, &[], None).await?;
        match response.status {
            204 => Ok(true),
            404 => Ok(false),
            303 => Err(GiteaError::MembershipHidden {
                org: org.to_owned(),
                username: username.to_owned(),
            }),
            _ => Err(Self::status_error(Route::OrgIsMember, &path, &response)),
        }
    }
}

/// [`Forge`] over a [`GiteaClient`].
#[derive(Debug, Clone)]
pub struct GiteaForge {
    client: GiteaClient,
}

impl GiteaForge {
    #[must_use]
    pub fn new(client: GiteaClient) -> Self {
        Self { client }
    }

    #[must_use]
    pub fn client(&self) -> &GiteaClient {
        &self.client
    }

    async fn find_open_pull(
        &self,
        head: &str,
        base: &str,
    ) -> Result<Option<ApiPullRequest>, GiteaError> {
        for page in 1..=MAX_PAGES {
            let batch = self.client.list_pulls(PullState::Open, page).await?;
            let done = batch.len() < PAGE_LIMIT;
            if let Some(found) = batch
                .into_iter()
                .find(|pr| pr.head.ref_name == head && pr.base.ref_name == base)
            {
                return Ok(Some(found));
            }
            if done {
                break;
            }
        }
        Ok(None)
    }
}

fn parse_state(state: &str) -> IssueState {
    if state == "open" {
        IssueState::Open
    } else {
        IssueState::Closed
    }
}

fn to_issue(raw: ApiIssue) -> Issue {
    Issue {
        number: raw.number,
        title: raw.title,
        body: raw.body,
        state: parse_state(&raw.state),
        author: raw.user.login,
        assignees: raw.assignees.into_iter().map(|u| u.login).collect(),
        labels: raw.labels.into_iter().map(|l| l.name).collect(),
        is_pull: raw.pull_request.is_some(),
        updated_at: raw.updated_at,
    }
}

fn to_pull(raw: ApiPullRequest) -> PullRequest {
    PullRequest {
        number: raw.number,
        title: raw.title,
        body: raw.body,
        state: parse_state(&raw.state),
        merged: raw.merged,
        head: BranchRef {
            name: raw.head.ref_name,
            sha: raw.head.sha,
        },
        base: BranchRef {
            name: raw.base.ref_name,
            sha: raw.base.sha,
        },
        author: raw.user.login,
    }
}

fn to_comment(raw: ApiComment) -> Comment {
    Comment {
        id: raw.id,
        user: raw.user.login,
        body: raw.body,
        created_at: raw.created_at,
    }
}

fn to_label(raw: ApiLabel) -> Label {
    Label {
        id: raw.id,
        name: raw.name,
        color: raw.color,
    }
}

#[async_trait]
impl Forge for GiteaForge {
    async fn read_issue(&self, number: u64) -> Result<Issue, ForgeError> {
        Ok(to_issue(self.client.get_issue(number).await?))
    }

    async fn read_pr(&self, number: u64) -> Result<PullRequest, ForgeError> {
        Ok(to_pull(self.client.get_pull(number).await?))
    }

    async fn read_comments(&self, number: u64) -> Result<Vec<Comment>, ForgeError> {
        let raw = self.client.list_comments(number).await?;
        Ok(raw.into_iter().map(to_comment).collect())
    }

    async fn post_comment(&self, number: u64, body: &str) -> Result<Comment, ForgeError> {
        Ok(to_comment(self.client.create_comment(number, body).await?))
    }

    async fn update_description(&self, number: u64, body: &str) -> Result<(), ForgeError> {
        // Send the version just read, so an edit made by a human in between is
        // reported as a conflict instead of silently overwritten.
        let current = self.client.get_issue(number).await?;
        self.client
            .edit_issue_body(number, body, current.content_version)
            .await?;
        Ok(())
    }

    async fn is_org_member(&self, org: &str, username: &str) -> Result<bool, ForgeError> {
        Ok(self.client.is_org_member(org, username).await?)
    }

    async fn get_pr_for_issue(&self, number: u64) -> Result<Option<u64>, ForgeError> {
        let issue = self.client.get_issue(number).await?;
        if issue.pull_request.is_some() {
            return Ok(Some(issue.number));
        }
        let mut closed_match = None;
        for page in 1..=MAX_PAGES {
            let batch = self.client.list_pulls(PullState::All, page).await?;
            let done = batch.len() < PAGE_LIMIT;
            for pr in batch {
                if body_closes_issue(&pr.body, number) {
                    // An open PR is the live one; a closed match is the fallback.
                    if pr.state == "open" {
                        return Ok(Some(pr.number));
                    }
                    closed_match.get_or_insert(pr.number);
                }
            }
            if done {
                break;
            }
        }
        Ok(closed_match)
    }

    async fn is_pr_open(&self, number: u64) -> Result<bool, ForgeError> {
        Ok(self.client.get_pull(number).await?.state == "open")
    }

    async fn create_pr(&self, request: &NewPullRequest) -> Result<PullRequest, ForgeError> {
        if let Some(existing) = self.find_open_pull(&request.head, &request.base).await? {
            return Ok(to_pull(existing));
        }
        match self.client.create_pull(request).await {
            Ok(created) => Ok(to_pull(created)),
            // Gitea answers 409 when a PR for this head and base already exists
            // (a concurrent create won the race): return that one.
            Err(conflict @ GiteaError::Conflict { .. }) => self
                .find_open_pull(&request.head, &request.base)
                .await?
                .map(to_pull)
                .ok_or_else(|| conflict.into()),
            Err(other) => Err(other.into()),
        }
    }

    async fn list_labels(&self, number: u64) -> Result<Vec<Label>, ForgeError> {
        let raw = self.client.issue_labels(number).await?;
        Ok(raw.into_iter().map(to_label).collect())
    }

    async fn add_label(&self, number: u64, name: &str) -> Result<(), ForgeError> {
        let existing = self
            .client
            .repo_labels()
            .await?
            .into_iter()
            .find(|l| l.name == name);
        let label = match existing {
            Some(label) => label,
            None => self.client.create_repo_label(name).await?,
        };
        self.client.add_issue_labels(number, &[label.id]).await?;
        Ok(())
    }

    async fn remove_label(&self, number: u64, name: &str) -> Result<(), ForgeError> {
        let attached = self.client.issue_labels(number).await?;
        if let Some(label) = attached.into_iter().find(|l| l.name == name) {
            self.client.remove_issue_label(number, label.id).await?;
        }
        Ok(())
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn encode_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn truncate_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.len() <= MAX_ERROR_BODY {
        return text.into_owned();
    }
    let mut end = MAX_ERROR_BODY;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], body.len())
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> GiteaClient {
        GiteaClient::new(GiteaConfig::new(
            "http://127.0.0.1:1/api/v1/",
            "didericis",
            "bot-bottle",
            "test-token",
        ))
        .expect("client")
    }

    #[test]
    fn paths_fill_placeholders_in_order_and_encode_segments() {
        let c = client();
        assert_eq!(
            "/repos/didericis/bot-bottle/issues/17",
            c.path(Route::IssueGet, &["17"])
        );
        assert_eq!(
            "/repos/didericis/bot-bottle/issues/17/labels/3",
            c.path(Route::IssueLabelRemove, &["17", "3"])
        );
        assert_eq!(
            "/orgs/bot-bottle/members/a%2F..%2Fb",
            c.path(Route::OrgIsMember, &["bot-bottle", "a/../b"])
        );
    }

    #[test]
    fn invalid_urls_are_refused_with_a_hint() {
        let error = GiteaClient::new(GiteaConfig::new("gitea.local", "o", "r", "t"))
            .expect_err("relative url");
        assert!(matches!(error, GiteaError::InvalidUrl { .. }));
        assert!(error.to_string().contains("hint: set `FORGE_GITEA_API`"));
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let config = GiteaConfig::new("http://127.0.0.1:1/api/v1", "o", "r", "sekrit-token");
        assert!(!format!("{config:?}").contains("sekrit"));
        let client = GiteaClient::new(config).expect("client");
        assert!(!format!("{client:?}").contains("sekrit"));
    }

    #[test]
    fn long_error_bodies_are_truncated() {
        let body = "é".repeat(5000);
        let truncated = truncate_body(body.as_bytes());
        assert!(truncated.len() < 4200);
        assert!(truncated.ends_with("(10000 bytes)"));
    }
}
