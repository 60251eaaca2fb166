//! The supervise sidecar: an MCP server (streamable HTTP on `state/<slug>/run/supervise.sock`)
//! through which the agent asks a human, instead of guessing or failing:
//! - `request_egress(host, methods?, paths?, reason)` files an egress approval with the
//!   agent's reason and waits for the decision; an approval adds the rule to the running
//!   gateway's policy (allow always: kept for later sessions too);
//! - `ask_human(question)` files a question and waits for the answer;
//! - `current_policy()` says what the bottle may reach now.
//!
//! Every call is a line in the bottle's egress audit chain (`kind: supervise`). The
//! decisions come from the approval queue ([`crate::approvals`]), which the CLI and the
//! dashboard write.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bot_bottle_core::policy::{EgressPolicy, EgressRule};
use bot_bottle_egress::audit::{AuditDecision, EventDraft, EventKind};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::MCP_PATH;
use crate::approvals::{Approval, ApprovalStore, Decision, NewApproval, Status};
use crate::forge::SidecarError;
use crate::mcp::bind;

/// The supervise sidecar's socket in `state/<slug>/run/`.
pub const SUPERVISE_SOCKET: &str = bot_bottle_core::forge::SUPERVISE_SOCKET;
/// The loopback port in the bottle that the shim forwards to [`SUPERVISE_SOCKET`].
pub const SUPERVISE_PORT: u16 = bot_bottle_core::forge::SUPERVISE_PORT;
/// The longest reason or question, in bytes.
pub const MAX_TEXT: usize = 4096;
/// How often a waiting call looks at the queue (a decision reaches it within this).
const POLL: Duration = Duration::from_millis(50);
/// The largest request body the server reads.
const MAX_REQUEST_BODY: usize = 64 * 1024;

/// What the sidecar may do to the running gateway.
pub trait PolicyControl: Send + Sync {
    /// The policy in force now.
    fn current(&self) -> EgressPolicy;
    /// Adds `rule` to the running gateway's policy; `always`: keep it for later sessions
    /// of the bottle too.
    ///
    /// # Errors
    /// The rule cannot be added (the reason is told to the agent).
    fn allow(&self, rule: EgressRule, always: bool) -> Result<(), String>;
    /// Appends a line to the bottle's audit chain.
    ///
    /// # Errors
    /// The log cannot be written.
    fn record(&self, draft: EventDraft) -> Result<(), String>;
}

/// What one bottle's supervise sidecar works with.
#[derive(Clone)]
pub struct SuperviseContext {
    pub slug: String,
    pub store: Arc<ApprovalStore>,
    pub control: Arc<dyn PolicyControl>,
    /// How long a call waits for a human before it is answered "no decision".
    pub timeout: Duration,
}

/// A running supervise sidecar.
pub struct SuperviseSidecar {
    socket: PathBuf,
    stop: CancellationToken,
    server: Option<JoinHandle<()>>,
    ctx: SuperviseContext,
}

impl Drop for SuperviseSidecar {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl SuperviseSidecar {
    /// Binds `socket` and serves the supervise tools until [`SuperviseSidecar::shutdown`].
    ///
    /// # Errors
    /// The socket is in use or cannot be bound.
    pub async fn start(ctx: SuperviseContext, socket: &Path) -> Result<Self, SidecarError> {
        let listener = bind(socket).await?;
        let stop = CancellationToken::new();
        let config = StreamableHttpServerConfig::default()
            .with_legacy_session_mode(false)
            .with_json_response(true)
            .with_sse_keep_alive(None)
            .with_allowed_hosts([
                format!("127.0.0.1:{SUPERVISE_PORT}"),
                "127.0.0.1".to_owned(),
                "localhost".to_owned(),
            ])
            .with_max_request_body_bytes(MAX_REQUEST_BODY)
            .with_cancellation_token(stop.child_token());
        let handler = SuperviseServer {
            ctx: Arc::new(ctx.clone()),
        };
        let service = StreamableHttpService::new(
            move || Ok(handler.clone()),
            Arc::new(NeverSessionManager::default()),
            config,
        );
        let app = axum::Router::new().nest_service(MCP_PATH, service);
        let server = tokio::spawn({
            let stop = stop.clone();
            async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
            }
        });
        Ok(Self {
            socket: socket.to_path_buf(),
            stop,
            server: Some(server),
            ctx,
        })
    }

    /// Stops serving; what is still pending for this bottle is denied (nobody waits for
    /// it any more), and the socket is removed.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
        let _ = std::fs::remove_file(&self.socket);
        if let Err(err) = self
            .ctx
            .store
            .deny_pending(&self.ctx.slug, "gateway-stopped")
        {
            tracing::warn!(error = %err, "cannot deny the bottle's pending approvals");
        }
    }
}

#[derive(Clone)]
struct SuperviseServer {
    ctx: Arc<SuperviseContext>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressArgs {
    host: String,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuestionArgs {
    question: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

fn schema(properties: &Value, required: &[&str]) -> Arc<JsonObject> {
    match json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    }) {
        Value::Object(object) => Arc::new(object),
        _ => Arc::new(JsonObject::new()),
    }
}

fn tools() -> Vec<Tool> {
    let text = |what: &str| json!({"type": "string", "maxLength": MAX_TEXT, "description": what});
    let list = |what: &str| json!({"type": "array", "items": {"type": "string"}, "maxItems": 32, "description": what});
    vec![
        Tool::new(
            Cow::Borrowed("request_egress"),
            "Ask the human to let this bottle reach a host it may not reach now. Say why in `reason`: the human reads it. Waits for the decision; on approval the host is reachable at once.",
            schema(
                &json!({
                    "host": {"type": "string", "maxLength": 253, "description": "an exact host name, or *.suffix"},
                    "methods": list("HTTP methods, e.g. [\"GET\"]; omitted: any"),
                    "paths": list("path globs, e.g. [\"/v1/*\"]; omitted: any"),
                    "reason": text("why you need it"),
                }),
                &["host", "reason"],
            ),
        ),
        Tool::new(
            Cow::Borrowed("ask_human"),
            "Ask the human a question and wait for the answer (or for the wait to end without one).",
            schema(&json!({"question": text("the question")}), &["question"]),
        ),
        Tool::new(
            Cow::Borrowed("current_policy"),
            "What this bottle may reach now: the egress rules in force, and what happens to a request no rule allows.",
            schema(&json!({}), &[]),
        ),
    ]
}

/// One call's result and its audit line.
struct Outcome {
    decision: AuditDecision,
    host: Option<String>,
    detail: String,
    text: String,
    is_error: bool,
}

impl Outcome {
    fn refused(host: Option<String>, problem: String, hint: &str) -> Self {
        Self {
            decision: AuditDecision::Block,
            host,
            detail: format!("refused: {}", one_line(&problem)),
            text: format!("{problem}\nhint: {hint}"),
            is_error: true,
        }
    }
}

fn one_line(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.len() <= 200 {
        flat
    } else {
        let mut end = 200;
        while !flat.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &flat[..end])
    }
}

fn check_text(field: &str, text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        return Err(format!("`{field}` is empty"));
    }
    if text.len() > MAX_TEXT {
        return Err(format!(
            "`{field}` is {} bytes, over {MAX_TEXT}",
            text.len()
        ));
    }
    if text.contains('\0') {
        return Err(format!("`{field}` contains a NUL byte"));
    }
    Ok(())
}

impl SuperviseServer {
    async fn call(&self, name: &str, arguments: Option<JsonObject>) -> Outcome {
        let arguments = Value::Object(arguments.unwrap_or_default());
        match name {
            "request_egress" => match serde_json::from_value::<EgressArgs>(arguments) {
                Ok(args) => self.request_egress(args).await,
                Err(err) => Outcome::refused(
                    None,
                    format!("invalid arguments for `request_egress`: {err}"),
                    "pass {\"host\": \"api.example.com\", \"reason\": \"…\"}, optionally \"methods\" and \"paths\"",
                ),
            },
            "ask_human" => match serde_json::from_value::<QuestionArgs>(arguments) {
                Ok(args) => self.ask_human(args).await,
                Err(err) => Outcome::refused(
                    None,
                    format!("invalid arguments for `ask_human`: {err}"),
                    "pass {\"question\": \"…\"}",
                ),
            },
            "current_policy" => match serde_json::from_value::<NoArgs>(arguments) {
                Ok(NoArgs {}) => self.current_policy(),
                Err(err) => Outcome::refused(
                    None,
                    format!("invalid arguments for `current_policy`: {err}"),
                    "pass {}",
                ),
            },
            other => Outcome::refused(
                None,
                format!("unknown tool `{}`", one_line(other)),
                "the supervise tools are request_egress, ask_human and current_policy",
            ),
        }
    }

    async fn request_egress(&self, args: EgressArgs) -> Outcome {
        let host = Some(one_line(&args.host));
        if let Err(problem) = check_text("reason", &args.reason) {
            return Outcome::refused(host, problem, "say in a sentence why you need the host");
        }
        let rule = EgressRule {
            methods: args.methods.clone(),
            paths: args.paths.clone(),
            ..EgressRule::host(args.host.clone())
        };
        let probe = EgressPolicy {
            rules: vec![rule.clone()],
            ..EgressPolicy::default()
        };
        if let Err(err) = probe.validate() {
            return Outcome::refused(
                host,
                format!("not a rule the gateway can use: {err}"),
                "name one host (or *.suffix), HTTP methods like GET, and path globs starting with /",
            );
        }
        let filed = self.ctx.store.file(&NewApproval {
            slug: self.ctx.slug.clone(),
            host: Some(args.host.clone()),
            method: (!args.methods.is_empty()).then(|| args.methods.join(",")),
            path: (!args.paths.is_empty()).then(|| args.paths.join(",")),
            agent_reason: Some(args.reason.clone()),
            ..NewApproval::default()
        });
        let approval = match filed {
            Ok(approval) => approval,
            Err(err) => {
                return Outcome::refused(
                    host,
                    format!("the approval queue failed: {err}"),
                    "try again later; the request was not filed",
                );
            }
        };
        let decided = self.wait(&approval).await;
        match decided.status {
            Status::Allowed | Status::AllowedAlways => {
                let always = decided.status == Status::AllowedAlways;
                match self.ctx.control.allow(rule, always) {
                    Ok(()) => Outcome {
                        decision: AuditDecision::Allow,
                        host,
                        detail: format!(
                            "approval {} {} by {}",
                            approval.id,
                            decided.status,
                            decided.decided_by.as_deref().unwrap_or("?")
                        ),
                        text: format!(
                            "approved ({}): {} is reachable now{}",
                            decided.status,
                            args.host,
                            if always {
                                ", in later sessions too"
                            } else {
                                " for this session"
                            }
                        ),
                        is_error: false,
                    },
                    Err(why) => Outcome::refused(
                        host,
                        format!("approved, but the rule could not be added: {why}"),
                        "ask the human to add the rule to the bottle's manifest",
                    ),
                }
            }
            _ => Outcome {
                decision: AuditDecision::Block,
                host,
                detail: format!(
                    "approval {} denied by {}{}",
                    approval.id,
                    decided.decided_by.as_deref().unwrap_or("?"),
                    decided
                        .decision_reason
                        .as_deref()
                        .map(|r| format!(": {}", one_line(r)))
                        .unwrap_or_default()
                ),
                text: format!(
                    "denied by {}{}; do not retry the same request",
                    decided.decided_by.as_deref().unwrap_or("?"),
                    decided
                        .decision_reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
                is_error: true,
            },
        }
    }

    async fn ask_human(&self, args: QuestionArgs) -> Outcome {
        if let Err(problem) = check_text("question", &args.question) {
            return Outcome::refused(None, problem, "ask one question in plain text");
        }
        let filed = self.ctx.store.file(&NewApproval {
            slug: self.ctx.slug.clone(),
            question: Some(args.question.clone()),
            ..NewApproval::default()
        });
        let approval = match filed {
            Ok(approval) => approval,
            Err(err) => {
                return Outcome::refused(
                    None,
                    format!("the approval queue failed: {err}"),
                    "try again later",
                );
            }
        };
        let decided = self.wait(&approval).await;
        match (decided.status, decided.answer) {
            (Status::Answered, Some(answer)) => Outcome {
                decision: AuditDecision::Info,
                host: None,
                detail: format!(
                    "question {} answered by {}",
                    approval.id,
                    decided.decided_by.as_deref().unwrap_or("?")
                ),
                text: answer,
                is_error: false,
            },
            _ => Outcome {
                decision: AuditDecision::Info,
                host: None,
                detail: format!(
                    "question {} not answered ({})",
                    approval.id,
                    decided.decided_by.as_deref().unwrap_or("?")
                ),
                text: "no answer: the human declined or did not answer in time. Decide yourself, or stop and say what you need.".to_owned(),
                is_error: true,
            },
        }
    }

    fn current_policy(&self) -> Outcome {
        let policy = self.ctx.control.current();
        let text = serde_json::to_string_pretty(&json!({
            "rules": policy.rules,
            "note": "a request no rule allows is refused with 403; request_egress asks the human for a new rule",
        }))
        .unwrap_or_default();
        Outcome {
            decision: AuditDecision::Info,
            host: None,
            detail: format!("{} rules", policy.rules.len()),
            text,
            is_error: false,
        }
    }

    /// Waits for a decision on `approval`; past the timeout, denies it as `timeout`.
    async fn wait(&self, approval: &Approval) -> Approval {
        let deadline = Instant::now() + self.ctx.timeout;
        loop {
            if let Ok(Some(now)) = self.ctx.store.get(&approval.id)
                && now.status != Status::Pending
            {
                return now;
            }
            if Instant::now() >= deadline {
                let _ = self.ctx.store.decide(
                    &approval.id,
                    &Decision::Deny {
                        reason: Some("no decision in time".to_owned()),
                    },
                    "timeout",
                );
                if let Ok(Some(now)) = self.ctx.store.get(&approval.id) {
                    return now;
                }
                return approval.clone();
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl ServerHandler for SuperviseServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "bot-bottle-supervise",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(
                "Ask a human: request_egress for a host you may not reach, ask_human for a question, current_policy for what you may reach now.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools().into_iter().find(|t| t.name == name)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let name = request.name.to_string();
        let outcome = self.call(&name, request.arguments).await;
        let mut draft = EventDraft::new(EventKind::Supervise, outcome.decision, one_line(&name));
        draft.host = outcome.host;
        draft.detail = Some(outcome.detail);
        if let Err(why) = self.ctx.control.record(draft) {
            return Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                "the audit log cannot be written, so nothing was done: {why}"
            ))])
            .into());
        }
        let content = vec![ContentBlock::text(outcome.text)];
        Ok(if outcome.is_error {
            CallToolResult::error(content)
        } else {
            CallToolResult::success(content)
        }
        .into())
    }
}
