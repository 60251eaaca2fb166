//! The forge sidecar: an MCP server (streamable HTTP on a Unix socket) that gives the
//! agent seven tools on one repository while the forge token stays in this process.
//!
//! Every call goes through one [`ScopedForge`]: reads reach any issue or pull request of
//! the repository, writes only the assigned issue and the run's pull requests, and a new
//! pull request only from the run's branch. Every call and every refusal is one line of
//! the op log (`forge-ops.jsonl`), the egress audit format with
//! [`EventKind::Forge`]: `reason` is the tool, `path` the target, `detail` a short
//! sentence. Bodies, titles and summaries are never written there whole, only their size
//! or (for `signal_done`) a one-line excerpt.
//!
//! The server is stateless (no MCP session; each POST is answered with JSON), so a
//! restarted sidecar serves a client that knew the old one, and a client that never
//! closes anything costs no memory. Each call runs on its own task, so a client that
//! hangs up mid-call cannot stop a forge write between the forge and its log line.
//!
//! Fail closed: when a log line (or a queue event) cannot be written, the call fails,
//! every later call is refused, and [`ForgeSidecar::failed`] resolves so the launcher
//! stops the bottle.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bot_bottle_egress::audit::{
    AuditDecision, AuditError, AuditLog, BLOCK_BURST, BLOCK_PER_SECOND, BlockLimiter, EventDraft,
    EventKind, describe_write_failure,
};
use bot_bottle_forge::{Forge, ForgeError, GiteaError, NewPullRequest, ScopeError, ScopedForge};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::mcp::bind;
use crate::queue::{self, DoneStatus, QueueEvent};
use crate::{FORGE_PORT, MCP_PATH};

/// The longest `body` (`post_comment`, `update_description`, `create_pr`), in bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// The longest `summary` of `signal_done`, in bytes.
pub const MAX_SUMMARY: usize = 64 * 1024;
/// The longest pull request title, in bytes.
pub const MAX_TITLE: usize = 1024;
/// The longest branch name (`head`, `base`), in bytes.
pub const MAX_BRANCH: usize = 255;
/// The largest HTTP request body the server reads; a larger one is refused (413) while
/// it streams in, so memory stays bounded. A body of [`MAX_BODY`] control characters
/// escapes to six times its size, which still fits.
pub const MAX_REQUEST_BODY: usize = 512 * 1024;
/// How much of a `signal_done` summary the op log keeps.
const SUMMARY_EXCERPT: usize = 200;
/// How long [`ForgeSidecar::shutdown`] waits for calls in flight and open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Issue numbers are `int64` in Gitea's API.
const MAX_NUMBER: u64 = i64::MAX as u64;

/// What the sidecar serves: one repository, one assigned issue, one run.
#[derive(Clone)]
pub struct ForgeContext {
    /// The unscoped client holding the token; every call is wrapped in a [`ScopedForge`].
    pub forge: Arc<dyn Forge>,
    pub owner: String,
    pub repo: String,
    /// The assigned issue.
    pub issue: u64,
    /// The run's pull requests known so far (a resumed run passes them).
    pub prs: Vec<u64>,
    /// The run's branch, e.g. `bot-bottle/fix-login-k3j2`; `create_pr`'s head must be it.
    pub branch: String,
    /// The default base of a new pull request, e.g. `main`.
    pub base: String,
}

impl std::fmt::Debug for ForgeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgeContext")
            .field("owner", &self.owner)
            .field("repo", &self.repo)
            .field("issue", &self.issue)
            .field("prs", &self.prs)
            .field("branch", &self.branch)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Why a sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("the forge context is not usable: {problem}\nhint: {hint}")]
    Context { problem: String, hint: &'static str },
    #[error(
        "the sidecar socket `{path}` is in use by a running server\nhint: another bot-bottle process serves this bottle; stop it, or remove the socket if it is stale"
    )]
    SocketInUse { path: PathBuf },
    #[error("cannot bind the sidecar socket `{path}`")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the forge op log")]
    OpsLog(#[source] AuditError),
    #[error("cannot create the forge queue dir `{path}`")]
    Queue {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A running forge sidecar. Dropping it without [`ForgeSidecar::shutdown`] stops the
/// server too, but without waiting for calls in flight or recording the log's head.
pub struct ForgeSidecar {
    shared: Arc<Shared>,
    socket: PathBuf,
    stop: CancellationToken,
    server: Option<JoinHandle<()>>,
    ticker: JoinHandle<()>,
}

impl Drop for ForgeSidecar {
    fn drop(&mut self) {
        self.stop.cancel();
        self.ticker.abort();
    }
}

impl ForgeSidecar {
    /// Binds `socket` (removing a stale socket file first; mode 0666, because the
    /// bottle's uid connects through a bind mount), opens or continues the hash chain in
    /// `ops_log`, creates `queue_dir`, and serves MCP streamable HTTP at [`MCP_PATH`]
    /// until [`ForgeSidecar::shutdown`].
    ///
    /// # Errors
    /// The context names no issue or branch, the socket is served by someone else or
    /// cannot be bound, the op log cannot be opened (or its last line is broken), or the
    /// queue dir cannot be created.
    pub async fn start(
        ctx: ForgeContext,
        socket: &Path,
        ops_log: &Path,
        queue_dir: &Path,
    ) -> Result<Self, SidecarError> {
        check_context(&ctx)?;
        let log = AuditLog::open(ops_log).map_err(SidecarError::OpsLog)?;
        fs_err::create_dir_all(queue_dir).map_err(|source| SidecarError::Queue {
            path: queue_dir.to_path_buf(),
            source,
        })?;
        let listener = bind(socket).await?;

        let (failure, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            scoped: ScopedForge::new(ctx.forge.clone(), ctx.issue, ctx.prs.iter().copied())
                .with_allowed_head(ctx.branch.clone()),
            tools: tools(&ctx),
            instructions: instructions(&ctx),
            ctx,
            log,
            queue_dir: queue_dir.to_path_buf(),
            limiter: Mutex::new(BlockLimiter::default()),
            failure,
            calls: TaskTracker::new(),
        });

        let stop = CancellationToken::new();
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_sse_keep_alive(None)
            // The bottle reaches the sidecar as 127.0.0.1:3129 through the shim; the other
            // names are what an MCP client may send for the same loopback URL.
            .with_allowed_hosts([
                format!("127.0.0.1:{FORGE_PORT}"),
                "127.0.0.1".to_owned(),
                "localhost".to_owned(),
            ])
            .with_max_request_body_bytes(MAX_REQUEST_BODY)
            .with_cancellation_token(stop.child_token());
        let handler = ForgeServer {
            shared: shared.clone(),
        };
        let service = StreamableHttpService::new(
            move || Ok(handler.clone()),
            Arc::new(NeverSessionManager::default()),
            config,
        );
        let app = axum::Router::new().nest_service(MCP_PATH, service);

        let server = tokio::spawn({
            let shared = shared.clone();
            let stop = stop.clone();
            async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.clone().cancelled_owned())
                    .await;
                if !stop.is_cancelled() {
                    let why = match served {
                        Ok(()) => "the forge sidecar stopped accepting connections".to_owned(),
                        Err(err) => {
                            format!("the forge sidecar stopped accepting connections: {err}")
                        }
                    };
                    shared.fail(why);
                }
            }
        });
        let ticker = tokio::spawn({
            let shared = shared.clone();
            async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    shared.flush_held_back(false);
                }
            }
        });
        tracing::info!(
            socket = %socket.display(),
            repo = %format!("{}/{}", shared.ctx.owner, shared.ctx.repo),
            issue = shared.ctx.issue,
            "forge sidecar serving"
        );
        Ok(Self {
            shared,
            socket: socket.to_path_buf(),
            stop,
            server: Some(server),
            ticker,
        })
    }

    /// Resolves, with the reason, when the sidecar can no longer work: the op log or
    /// the queue cannot be written, or the server stopped accepting connections. Never
    /// resolves while the sidecar is healthy.
    pub async fn failed(&self) -> String {
        let mut failure = self.shared.failure.subscribe();
        // The guard `wait_for` returns is not `Send`: take the reason out of it before
        // the future can be held across another await.
        let reason = failure
            .wait_for(Option::is_some)
            .await
            .map(|reason| reason.clone().unwrap_or_default());
        match reason {
            Ok(reason) => reason,
            // The sender lives in `shared`, which `self` holds: this cannot happen while
            // `self` exists, so wait as a healthy sidecar would.
            Err(_) => std::future::pending().await,
        }
    }

    /// The op log's path.
    #[must_use]
    pub fn ops_log(&self) -> &Path {
        self.shared.log.path()
    }

    /// The issue and pull request numbers a write may target now, ascending.
    #[must_use]
    pub fn writable(&self) -> Vec<u64> {
        self.shared.scoped.writable()
    }

    /// Stops accepting connections, waits (a few seconds at most) for calls in flight
    /// to reach the log, writes the count of held-back refusals, records the log's head
    /// beside it, and removes the socket.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
                .await
                .is_err()
        {
            tracing::warn!("forge sidecar connections did not close in time; dropping them");
            server.abort();
        }
        self.shared.calls.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.shared.calls.wait())
            .await
            .is_err()
        {
            tracing::warn!("forge calls still running at shutdown; their lines may be missing");
        }
        self.ticker.abort();
        self.shared.flush_held_back(true);
        if let Err(err) = self.shared.log.write_head() {
            tracing::warn!(error = %err, "cannot record the forge op log's head");
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn check_context(ctx: &ForgeContext) -> Result<(), SidecarError> {
    let problem = if ctx.issue == 0 || ctx.issue > MAX_NUMBER {
        Some(format!("issue number {} is not a valid issue", ctx.issue))
    } else if let Some(pr) = ctx.prs.iter().find(|&&pr| pr == 0 || pr > MAX_NUMBER) {
        Some(format!("pull request number {pr} is not valid"))
    } else if let Err(problem) = check_branch("branch", &ctx.branch) {
        Some(problem)
    } else if let Err(problem) = check_branch("base", &ctx.base) {
        Some(problem)
    } else if ctx.owner.is_empty() || ctx.repo.is_empty() {
        Some("the repository owner or name is empty".to_owned())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(SidecarError::Context {
            problem,
            hint: "the launcher builds the context from the forge run; check its issue, branch and base",
        }),
        None => Ok(()),
    }
}

/// The state every call shares.
struct Shared {
    ctx: ForgeContext,
    scoped: ScopedForge,
    tools: Vec<Tool>,
    instructions: String,
    log: AuditLog,
    queue_dir: PathBuf,
    limiter: Mutex<BlockLimiter>,
    /// `Some(reason)` once the sidecar can no longer work.
    failure: watch::Sender<Option<String>>,
    calls: TaskTracker,
}

impl Shared {
    fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    fn fail(&self, reason: String) {
        tracing::error!(reason = %reason, "forge sidecar failed; the bottle must stop");
        self.failure.send_if_modified(|failure| {
            if failure.is_some() {
                return false;
            }
            *failure = Some(reason);
            true
        });
    }

    /// Appends one line; a refusal past the rate limit is counted instead. A failed
    /// append fails the sidecar and returns why.
    fn record(&self, draft: EventDraft) -> Result<(), String> {
        if draft.decision == AuditDecision::Block {
            let admitted = self
                .limiter
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .admit(&draft, Instant::now());
            if !admitted {
                return Ok(());
            }
        }
        self.append(draft)
    }

    /// Appends one line, past the rate limit; a failed append fails the sidecar.
    fn append(&self, draft: EventDraft) -> Result<(), String> {
        self.log.append(draft).map(drop).map_err(|err| {
            let reason = describe_write_failure(&err);
            self.fail(reason.clone());
            reason
        })
    }

    /// Writes the count of refusals the limiter held back, when it is due (`force`: now).
    fn flush_held_back(&self, force: bool) {
        let summary = self
            .limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .summary(Instant::now(), force);
        if let Some(mut draft) = summary {
            draft.kind = EventKind::Forge;
            draft.detail = Some(format!(
                "{} more refused forge calls (over {BLOCK_BURST} at once, then {BLOCK_PER_SECOND} a second) were counted, not logged one by one",
                draft.held_back
            ));
            // Straight to the log: the limiter would hold back its own summary.
            let _ = self.append(draft);
        }
    }

    fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|tool| tool.name == name)
    }

    /// Runs one call to the end, log line included.
    async fn call(&self, name: &str, arguments: Option<JsonObject>) -> CallOutcome {
        if let Some(reason) = self.failure() {
            return CallOutcome::Result(error_result(format!(
                "the forge sidecar has stopped and refuses every call: {reason}"
            )));
        }
        let Some(tool) = ToolName::parse(name) else {
            let mut draft = EventDraft::new(EventKind::Forge, AuditDecision::Block, "unknown_tool");
            draft.detail = Some(format!("refused: unknown tool `{}`", one_line(name, 64)));
            let message = format!(
                "unknown tool `{}`; the forge tools are {}",
                one_line(name, 64),
                ToolName::ALL.map(ToolName::as_str).join(", ")
            );
            return match self.record(draft) {
                Ok(()) => CallOutcome::UnknownTool(message),
                Err(reason) => CallOutcome::Result(error_result(reason)),
            };
        };
        let arguments = Value::Object(arguments.unwrap_or_default());
        let step = match tool {
            ToolName::ReadIssue => self.read_issue(arguments).await,
            ToolName::ReadPr => self.read_pr(arguments).await,
            ToolName::ReadComments => self.read_comments(arguments).await,
            ToolName::PostComment => self.post_comment(arguments).await,
            ToolName::UpdateDescription => self.update_description(arguments).await,
            ToolName::CreatePr => self.create_pr(arguments).await,
            ToolName::SignalDone => self.signal_done(arguments).await,
        };
        let mut draft = EventDraft::new(EventKind::Forge, step.decision, tool.as_str());
        draft.path = step.path;
        draft.status = step.status;
        draft.detail = Some(step.detail);
        if let Err(reason) = self.record(draft) {
            return CallOutcome::Result(error_result(format!(
                "{reason}\n(the call itself: {})",
                step.text
            )));
        }
        if let Some(reason) = step.failed {
            self.fail(reason);
        }
        CallOutcome::Result(if step.is_error {
            error_result(step.text)
        } else {
            CallToolResult::success(vec![ContentBlock::text(step.text)])
        })
    }

    async fn read_issue(&self, arguments: Value) -> Step {
        let tool = ToolName::ReadIssue;
        let args: NumberArgs = match parse(tool, arguments) {
            Ok(args) => args,
            Err(step) => return step,
        };
        let target = format!("#{}", args.number);
        match self.scoped.read_issue(args.number).await {
            Ok(issue) => Step::allow(
                target,
                format!("read issue #{}", args.number),
                to_json_text(&issue),
            ),
            Err(err) => self.forge_failed(tool, target, &err),
        }
    }

    async fn read_pr(&self, arguments: Value) -> Step {
        let tool = ToolName::ReadPr;
        let args: NumberArgs = match parse(tool, arguments) {
            Ok(args) => args,
            Err(step) => return step,
        };
        let target = format!("#{}", args.number);
        match self.scoped.read_pr(args.number).await {
            Ok(pr) => Step::allow(
                target,
                format!("read PR #{}", args.number),
                to_json_text(&pr),
            ),
            Err(err) => self.forge_failed(tool, target, &err),
        }
    }

    async fn read_comments(&self, arguments: Value) -> Step {
        let tool = ToolName::ReadComments;
        let args: NumberArgs = match parse(tool, arguments) {
            Ok(args) => args,
            Err(step) => return step,
        };
        let target = format!("#{}", args.number);
        match self.scoped.read_comments(args.number).await {
            Ok(comments) => Step::allow(
                target,
                format!(
                    "read {} comment{} of #{}",
                    comments.len(),
                    if comments.len() == 1 { "" } else { "s" },
                    args.number
                ),
                to_json_text(&comments),
            ),
            Err(err) => self.forge_failed(tool, target, &err),
        }
    }

    async fn post_comment(&self, arguments: Value) -> Step {
        let tool = ToolName::PostComment;
        let args: BodyArgs = match parse(tool, arguments) {
            Ok(args) => args,
            Err(step) => return step,
        };
        let target = format!("#{}", args.number);
        if let Err(problem) = check_text("body", &args.body, MAX_BODY, false, true) {
            return Step::invalid(tool, Some(target), problem);
        }
        match self.scoped.post_comment(args.number, &args.body).await {
            Ok(comment) => Step::allow(
                target,
                format!(
                    "posted comment to #{} ({} bytes)",
                    args.number,
                    args.body.len()
                ),
                format!(
                    "posted comment {} on #{}\n{}",
                    comment.id,
                    args.number,
                    to_json_text(&comment)
                ),
            ),
            Err(err) => self.forge_failed(tool, target, &err),
        }
    }

    async fn update_description(&self, arguments: Value) -> Step {
        let tool = ToolName::UpdateDescription;
        let args: BodyArgs = match parse(tool, arguments) {
            Ok(args) => args,
            Err(step) => return step,
        };
        let target = format!("#{}", args.number);
        if let Err(problem) = check_text("body", &args.body, MAX_BODY, true, true) {
            return Step::invalid(tool, Some(target), problem);
        }
        match self
            .scoped
            .update_description(args.number, &args.body)
            .await
        {
            Ok(()) => Step::allow(
                target,
                format!(
                    "replaced the description of #{} ({} bytes)",
                    args.number,
                    args.body.len()
                ),
                format!("replaced the description of #{}", args.number),
            ),
            Err(err) => self.forge_failed(tool, target, &err),
        }
    }

    async fn create_pr(&self, arguments: Value) -> Step {
        let tool = ToolName::CreatePr;
        let args: CreatePrArgs = match parse(tool, arguments) {
            Ok(args) => args,
            Err(step) => return step,
        };
        let head = args.head.unwrap_or_else(|| self.ctx.branch.clone());
        let base = args.base.unwrap_or_else(|| self.ctx.base.clone());
        let checks = check_text("title", &args.title, MAX_TITLE, false, false)
            .and_then(|()| check_text("body", &args.body, MAX_BODY, true, true))
            .and_then(|()| check_branch("head", &head))
            .and_then(|()| check_branch("base", &base));
        if let Err(problem) = checks {
            return Step::invalid(tool, Some(one_line(&head, MAX_BRANCH)), problem);
        }
        let request = NewPullRequest {
            title: args.title,
            body: args.body,
            head: head.clone(),
            base: base.clone(),
        };
        let pr = match self.scoped.create_pr(&request).await {
            Ok(pr) => pr,
            Err(err) => return self.forge_failed(tool, head, &err),
        };
        let detail = format!(
            "PR #{} is open from `{head}` into `{base}`: \"{}\"",
            pr.number,
            one_line(&request.title, SUMMARY_EXCERPT)
        );
        let text = format!(
            "pull request #{} is open from `{head}` into `{base}`; you may now write to it\n{}",
            pr.number,
            to_json_text(&pr)
        );
        match queue::push(&self.queue_dir, QueueEvent::PrCreated { number: pr.number }) {
            Ok(_) => Step::allow(head, detail, text),
            Err(err) => Step::queue_failed(head, detail, text, &err),
        }
    }

    async fn signal_done(&self, arguments: Value) -> Step {
        let tool = ToolName::SignalDone;
        let args: SignalDoneArgs = match parse(tool, arguments) {
            Ok(args) => args,
            Err(step) => return step,
        };
        let target = format!("#{}", self.ctx.issue);
        if let Err(problem) = check_text("summary", &args.summary, MAX_SUMMARY, false, true) {
            return Step::invalid(tool, Some(target), problem);
        }
        let detail = format!(
            "signalled done: {} — {}",
            args.status,
            one_line(&args.summary, SUMMARY_EXCERPT)
        );
        let event = QueueEvent::SignalDone {
            status: args.status,
            summary: args.summary,
        };
        let text = what_happens_next(args.status, self.ctx.issue);
        match queue::push(&self.queue_dir, event) {
            Ok(_) => Step::allow(target, detail, text),
            Err(err) => Step::queue_failed(target, detail, text, &err),
        }
    }

    /// The step for a call the forge (or the scope) refused.
    fn forge_failed(&self, tool: ToolName, target: String, err: &ForgeError) -> Step {
        if let Some(scope) = err.as_scope() {
            return self.scope_refused(tool, target, scope);
        }
        let (status, why) = describe_forge_error(err);
        Step {
            decision: AuditDecision::Allow,
            path: Some(target.clone()),
            status,
            detail: format!("{tool} on {target} failed: {why}"),
            text: format!(
                "{tool} on {target} failed: {err}\nhint: {}",
                match status {
                    Some(404) => "check the number: read_issue reads issues, read_pr pull requests",
                    Some(409) => "the content changed since it was read; read it again first",
                    _ =>
                        "the forge may be unavailable; try again later, or signal_done with status `blocked`",
                }
            ),
            is_error: true,
            failed: None,
        }
    }

    fn scope_refused(&self, tool: ToolName, target: String, scope: &ScopeError) -> Step {
        let detail = if tool == ToolName::CreatePr {
            format!(
                "refused: create_pr from branch `{}`: {}",
                one_line(&target, MAX_BRANCH),
                scope.reason
            )
        } else {
            format!("refused: {tool} on {} is {}", scope.target, scope.reason)
        };
        let hint = format!(
            "hint: you may write only to issue #{} and the pull requests of this run ({}), and open a pull request only from branch `{}`; reading any issue or pull request is allowed",
            self.ctx.issue,
            self.scoped
                .writable()
                .iter()
                .map(|n| format!("#{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.ctx.branch
        );
        Step {
            decision: AuditDecision::Block,
            path: Some(target),
            status: None,
            text: format!("{detail}\n{hint}"),
            detail,
            is_error: true,
            failed: None,
        }
    }
}

/// What a handled call becomes: its log line and its answer.
struct Step {
    decision: AuditDecision,
    path: Option<String>,
    status: Option<u16>,
    detail: String,
    text: String,
    is_error: bool,
    /// Set when the call worked but left the sidecar unable to go on.
    failed: Option<String>,
}

impl Step {
    fn allow(target: String, detail: String, text: String) -> Self {
        Step {
            decision: AuditDecision::Allow,
            path: Some(target),
            status: None,
            detail,
            text,
            is_error: false,
            failed: None,
        }
    }

    fn invalid(tool: ToolName, target: Option<String>, problem: String) -> Self {
        Step {
            decision: AuditDecision::Block,
            path: target,
            status: None,
            detail: format!("refused: invalid arguments: {}", one_line(&problem, 300)),
            text: format!(
                "invalid arguments for `{tool}`: {problem}\nhint: {}",
                tool.usage()
            ),
            is_error: true,
            failed: None,
        }
    }

    fn queue_failed(target: String, detail: String, text: String, err: &io::Error) -> Self {
        let reason = format!(
            "the forge queue cannot be written ({err}), so the orchestrator would not hear of this call; the bottle is stopped\nhint: free space on the filesystem that holds $BOT_BOTTLE_HOME, then resume the bottle"
        );
        Step {
            decision: AuditDecision::Allow,
            path: Some(target),
            status: None,
            detail: format!("{detail} (not queued: {})", one_line(&err.to_string(), 200)),
            text: format!("{text}\n{reason}"),
            is_error: true,
            failed: Some(reason),
        }
    }
}

enum CallOutcome {
    Result(CallToolResult),
    UnknownTool(String),
}

fn error_result(text: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(text)])
}

fn to_json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|err| format!("(unprintable: {err})"))
}

/// The forge's HTTP status when it answered, and a short cause without its body.
fn describe_forge_error(err: &ForgeError) -> (Option<u16>, String) {
    match err {
        ForgeError::Gitea(gitea) => match (gitea.status(), gitea) {
            (Some(status), _) => (Some(status), format!("the forge answered {status}")),
            (None, GiteaError::Timeout { .. }) => (None, "the forge did not answer in time".into()),
            (None, GiteaError::Transport { .. }) => (None, "the forge could not be reached".into()),
            (None, _) => (None, "the forge client failed".into()),
        },
        ForgeError::Other { message, .. } => (None, one_line(message, 200)),
        ForgeError::Scope(scope) => (None, scope.reason.clone()),
    }
}

fn what_happens_next(status: DoneStatus, issue: u64) -> String {
    let opening = match status {
        DoneStatus::Done => "recorded: done",
        DoneStatus::Blocked => "recorded: blocked",
        DoneStatus::NeedsInput => "recorded: needs_input",
    };
    format!(
        "{opening}. The orchestrator now pauses this run: the bottle is frozen, not destroyed. A human comment on issue #{issue} or on your pull request resumes you, with the comment as your next prompt; closing the pull request ends the run. Stop working now."
    )
}

/// `text` on one line, cut to `max` characters: control characters (newlines, escape
/// sequences) are written escaped, so text from the agent can never start what looks
/// like a new line in `bot-bottle audit` output.
fn one_line(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == max {
            let _ = write!(out, "…[+{} bytes]", text.len() - text_len_until(text, max));
            break;
        }
        if c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Bytes taken by the first `chars` characters of `text`.
fn text_len_until(text: &str, chars: usize) -> usize {
    text.char_indices()
        .nth(chars)
        .map_or(text.len(), |(index, _)| index)
}

fn check_text(
    field: &str,
    text: &str,
    max: usize,
    may_be_empty: bool,
    multiline: bool,
) -> Result<(), String> {
    if text.len() > max {
        return Err(format!(
            "`{field}` is {} bytes, over the limit of {max}",
            text.len()
        ));
    }
    if !may_be_empty && text.trim().is_empty() {
        return Err(format!("`{field}` is empty"));
    }
    let bad =
        |c: char| c == '\0' || (c.is_control() && !(multiline && matches!(c, '\n' | '\r' | '\t')));
    if text.chars().any(bad) {
        return Err(format!(
            "`{field}` holds a control character{}",
            if multiline {
                " (other than newline and tab)"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

/// A branch name as git would take it for `refs/heads/<name>` (a conservative subset
/// of `git check-ref-format`).
fn check_branch(field: &str, name: &str) -> Result<(), String> {
    let problem = if name.is_empty() {
        Some("is empty")
    } else if name.len() > MAX_BRANCH {
        Some("is too long")
    } else if name.starts_with(['-', '/', '.'])
        || name.ends_with(['/', '.'])
        || name.ends_with(".lock")
        || name.contains("..")
        || name.contains("//")
        || name.contains("@{")
        || name.contains("/.")
        || name.chars().any(|c| {
            c.is_control()
                || c.is_whitespace()
                || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\')
        })
    {
        Some("is not a valid branch name")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(format!("`{field}` `{}` {problem}", one_line(name, 80))),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ToolName {
    ReadIssue,
    ReadPr,
    ReadComments,
    PostComment,
    UpdateDescription,
    CreatePr,
    SignalDone,
}

impl ToolName {
    const ALL: [ToolName; 7] = [
        Self::ReadIssue,
        Self::ReadPr,
        Self::ReadComments,
        Self::PostComment,
        Self::UpdateDescription,
        Self::CreatePr,
        Self::SignalDone,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::ReadIssue => "read_issue",
            Self::ReadPr => "read_pr",
            Self::ReadComments => "read_comments",
            Self::PostComment => "post_comment",
            Self::UpdateDescription => "update_description",
            Self::CreatePr => "create_pr",
            Self::SignalDone => "signal_done",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|tool| tool.as_str() == name)
    }

    /// The arguments in one line, for the hint of an invalid call.
    fn usage(self) -> &'static str {
        match self {
            Self::ReadIssue | Self::ReadPr | Self::ReadComments => {
                "pass {\"number\": N} with N a positive integer, and nothing else"
            }
            Self::PostComment | Self::UpdateDescription => {
                "pass {\"number\": N, \"body\": \"...\"} (body at most 65536 bytes), and nothing else"
            }
            Self::CreatePr => {
                "pass {\"title\": \"...\", \"body\": \"...\"}, optionally \"head\" (your branch) and \"base\", and nothing else"
            }
            Self::SignalDone => {
                "pass {\"status\": \"done\"|\"blocked\"|\"needs_input\", \"summary\": \"...\"}, and nothing else"
            }
        }
    }
}

impl std::fmt::Display for ToolName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NumberArgs {
    number: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BodyArgs {
    number: u64,
    body: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePrArgs {
    title: String,
    body: String,
    #[serde(default)]
    head: Option<String>,
    #[serde(default)]
    base: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalDoneArgs {
    status: DoneStatus,
    summary: String,
}

/// Reads a tool's arguments; numbers must lie in `1..=i64::MAX`.
fn parse<T: DeserializeOwned>(tool: ToolName, arguments: Value) -> Result<T, Step> {
    let number = arguments.get("number").and_then(Value::as_u64);
    let target = number.map(|n| format!("#{n}"));
    if let Some(n) = number
        && (n == 0 || n > MAX_NUMBER)
    {
        return Err(Step::invalid(
            tool,
            target,
            format!("`number` {n} is not an issue or pull request number"),
        ));
    }
    serde_json::from_value(arguments)
        .map_err(|err| Step::invalid(tool, target, one_line(&err.to_string(), 300)))
}

fn number_schema() -> Value {
    json!({
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_NUMBER,
        "description": "the issue or pull request number"
    })
}

fn schema(properties: Value, required: &[&str]) -> Arc<JsonObject> {
    let schema = json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    });
    match schema {
        Value::Object(object) => Arc::new(object),
        _ => Arc::new(JsonObject::new()),
    }
}

fn tools(ctx: &ForgeContext) -> Vec<Tool> {
    let repo = format!("{}/{}", ctx.owner, ctx.repo);
    let issue = ctx.issue;
    let branch = &ctx.branch;
    let base = &ctx.base;
    let body = |what: &str| json!({"type": "string", "maxLength": MAX_BODY, "description": what});
    let read = ToolAnnotations::new()
        .read_only(true)
        .destructive(false)
        .idempotent(true)
        .open_world(false);
    let write = ToolAnnotations::new().read_only(false).open_world(false);
    let tool = |name: ToolName,
                description: String,
                input: Arc<JsonObject>,
                annotations: &ToolAnnotations| {
        Tool::new(Cow::Borrowed(name.as_str()), description, input)
            .with_annotations(annotations.clone())
    };
    vec![
        tool(
            ToolName::ReadIssue,
            format!("Read issue N of {repo}: title, body, state, author, labels, assignees. Any issue may be read; yours is #{issue}."),
            schema(json!({"number": number_schema()}), &["number"]),
            &read,
        ),
        tool(
            ToolName::ReadPr,
            format!("Read pull request N of {repo}: title, body, state, merged, head and base branch."),
            schema(json!({"number": number_schema()}), &["number"]),
            &read,
        ),
        tool(
            ToolName::ReadComments,
            format!("Read the comments on issue or pull request N of {repo}, oldest first."),
            schema(json!({"number": number_schema()}), &["number"]),
            &read,
        ),
        tool(
            ToolName::PostComment,
            format!("Post a comment (markdown) on your issue #{issue} or one of your pull requests; other numbers are refused."),
            schema(
                json!({"number": number_schema(), "body": body("the comment, markdown")}),
                &["number", "body"],
            ),
            &write.clone().destructive(false).idempotent(false),
        ),
        tool(
            ToolName::UpdateDescription,
            format!("Replace the description (body) of your issue #{issue} or one of your pull requests; other numbers are refused."),
            schema(
                json!({"number": number_schema(), "body": body("the new description, markdown")}),
                &["number", "body"],
            ),
            &write.clone().destructive(true).idempotent(true),
        ),
        tool(
            ToolName::CreatePr,
            format!("Open a pull request from your branch `{branch}` (push it first) into `{base}`, or get the one already open; write `Closes #{issue}` in the body."),
            schema(
                json!({
                    "title": {"type": "string", "minLength": 1, "maxLength": MAX_TITLE, "description": "one line"},
                    "body": body("the description, markdown"),
                    "head": {"type": "string", "const": branch, "description": format!("your branch; defaults to `{branch}`, the only one allowed")},
                    "base": {"type": "string", "maxLength": MAX_BRANCH, "description": format!("the target branch; defaults to `{base}`")},
                }),
                &["title", "body"],
            ),
            &write.clone().destructive(false).idempotent(true),
        ),
        tool(
            ToolName::SignalDone,
            "Say that your unit of work has ended (done, blocked or needs_input) with a short summary for the humans; the run then pauses until a human answers.".to_owned(),
            schema(
                json!({
                    "status": {"type": "string", "enum": ["done", "blocked", "needs_input"]},
                    "summary": {"type": "string", "minLength": 1, "maxLength": MAX_SUMMARY, "description": "what was done, or what you need"},
                }),
                &["status", "summary"],
            ),
            &write.clone().destructive(false).idempotent(false),
        ),
    ]
}

fn instructions(ctx: &ForgeContext) -> String {
    format!(
        "Forge access to {}/{} for issue #{}. Reads reach any issue or pull request; writes only issue #{} and your own pull requests, opened from branch `{}`. When a unit of work is finished, call signal_done.",
        ctx.owner, ctx.repo, ctx.issue, ctx.issue, ctx.branch
    )
}

#[derive(Clone)]
struct ForgeServer {
    shared: Arc<Shared>,
}

impl ServerHandler for ForgeServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "bot-bottle-forge",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(self.shared.instructions.clone())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.shared.tools.clone()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.shared.tool(name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        // On a task of our own, tracked: a forge write must get its log line even when
        // the client hangs up and this future is dropped, and shutdown waits for it
        // before it records the log's head.
        let shared = self.shared.clone();
        let call = self
            .shared
            .calls
            .spawn(async move { shared.call(&request.name, request.arguments).await });
        match call.await {
            Ok(CallOutcome::Result(result)) => Ok(result.into()),
            Ok(CallOutcome::UnknownTool(message)) => Err(ErrorData::invalid_params(message, None)),
            Err(err) => Err(ErrorData::internal_error(
                format!("the forge call failed: {err}"),
                None,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_escapes_control_characters_and_cuts() {
        assert_eq!(
            one_line("a\nb\u{1b}[31m\u{202e}c", 100),
            "a\\nb\\u{1b}[31m\\u{202e}c"
        );
        assert_eq!(one_line("héllo world", 5), "héllo…[+6 bytes]");
        assert_eq!(one_line("short", 5), "short");
    }

    #[test]
    fn branch_names_are_checked_like_git() {
        for good in ["main", "bot-bottle/fix-login-k3j2", "release-1.2"] {
            assert_eq!(Ok(()), check_branch("head", good), "{good}");
        }
        for bad in [
            "", "-x", "a..b", "a b", "a\nb", "x.lock", "a/", "/a", "a//b", "a@{1}", "a:b", "a/.b",
        ] {
            assert!(check_branch("head", bad).is_err(), "{bad:?}");
        }
        assert!(check_branch("head", &"a".repeat(MAX_BRANCH + 1)).is_err());
    }

    #[test]
    fn text_bounds() {
        assert_eq!(
            Ok(()),
            check_text("body", "line\nline\ttab", 100, false, true)
        );
        assert!(check_text("body", "  \n", 100, false, true).is_err());
        assert_eq!(Ok(()), check_text("body", "", 100, true, true));
        assert!(check_text("title", "a\nb", 100, false, false).is_err());
        assert!(check_text("body", "nul\0", 100, false, true).is_err());
        assert!(check_text("body", &"x".repeat(101), 100, false, true).is_err());
    }

    #[test]
    fn arguments_are_strict() {
        let ok: Result<NumberArgs, _> = parse(ToolName::ReadIssue, json!({"number": 17}));
        assert_eq!(17, ok.map(|a| a.number).unwrap_or_default());
        for bad in [
            json!({}),
            json!({"number": 0}),
            json!({"number": -1}),
            json!({"number": 1.5}),
            json!({"number": "17"}),
            json!({"number": 17, "extra": true}),
            json!({"number": u64::MAX}),
        ] {
            let parsed: Result<NumberArgs, Step> = parse(ToolName::ReadIssue, bad.clone());
            let step = parsed.err().unwrap_or_else(|| panic!("accepted {bad}"));
            assert_eq!(AuditDecision::Block, step.decision, "{bad}");
            assert!(step.is_error);
            assert!(step.text.contains("hint:"), "{}", step.text);
        }
    }
}
