//! The gateway: an HTTP/1.1 proxy on a Unix socket (what the in-bottle shim forwards
//! `127.0.0.1:3128` to) or a TCP address, deciding every CONNECT and absolute-form
//! request against the bottle's [`EgressPolicy`] and writing each decision to the audit log.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::tripwire::Attempt;
use bot_bottle_core::policy::{
    AuditLevel, EgressPolicy, METHOD_OVERRIDE_HEADERS, PATH_OVERRIDE_HEADERS, RequestFacts,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::audit::{AuditDecision, AuditError, AuditLog, EventDraft, EventKind};
use crate::custody::ResolvedCredential;
use crate::dlp::{DlpRules, Scanner};
use crate::tls::{CertificateAuthority, TlsError, UpstreamTls};
use crate::upstream::{Resolver, UpstreamError};
use rustls::pki_types::CertificateDer;

/// The header a block response carries, with a machine-readable reason.
pub const BLOCK_HEADER: &str = "x-bot-bottle-block";
/// The header a gateway error (502, 504) carries; not a policy decision.
pub const ERROR_HEADER: &str = "x-bot-bottle-error";

/// Timeouts and limits that keep slow or greedy clients from holding the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A client that sends no complete request head within this time is dropped
    /// (slowloris); it also bounds how long an idle keep-alive connection stays open.
    pub header_read_timeout: Duration,
    /// Each TLS handshake (client side, upstream side) must finish within this.
    pub handshake_timeout: Duration,
    /// A request body (up to the DLP cap) must arrive within this.
    pub body_read_timeout: Duration,
    /// Open client connections at most; past it new clients are dropped at once.
    pub max_connections: usize,
    /// Bytes of request bodies buffered for scanning at once, across all of the
    /// gateway's connections and HTTP/2 streams (one gateway serves one bottle).
    /// A body that would take it past this gets a 503 (`body-memory-budget`) and an audit
    /// line; a body's share is returned when it has been forwarded or dropped.
    /// Default 64 MiB.
    pub body_memory_budget: usize,
}

/// The default [`Limits::body_memory_budget`]: 64 MiB, eight bodies at the default scan
/// cap.
pub const DEFAULT_BODY_MEMORY_BUDGET: usize = 64 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(15),
            body_read_timeout: Duration::from_secs(120),
            max_connections: 1024,
            body_memory_budget: DEFAULT_BODY_MEMORY_BUDGET,
        }
    }
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket path; a stale socket file is replaced, a live one is an error.
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
            Listen::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: Listen,
    pub policy: EgressPolicy,
    /// `state/<slug>/egress.jsonl`: append-only, hash-chained.
    pub audit_path: PathBuf,
    /// Host (or `host:port`) → address to connect to instead of resolving the name.
    /// Tests route real host names to loopback origins with it.
    pub upstream_overrides: HashMap<String, SocketAddr>,
    /// Refuse every upstream address that is not loopback: the network-safety guard
    /// that every test turns on.
    pub loopback_only: bool,
    /// The bottle's interception CA; `None` makes a fresh in-memory one (the bottle must
    /// then be given [`GatewayHandle::ca_cert_pem`]). Use
    /// [`CertificateAuthority::load_or_create`] so the CA survives freeze and resume.
    pub ca: Option<Arc<CertificateAuthority>>,
    /// Credentials in custody; the bottle holds only their placeholders.
    pub credentials: Vec<ResolvedCredential>,
    /// DLP rules; `None` means the built-in set ([`DlpRules::builtin`]).
    pub dlp_rules: Option<DlpRules>,
    /// The most request-body bytes (encoded, and again decoded) buffered and scanned.
    pub dlp_body_cap: usize,
    /// What to do with a request body over `dlp_body_cap`.
    pub dlp_over_cap: OverCap,
    /// Roots trusted for upstream TLS besides (or, with `native_roots: false`, instead
    /// of) the system store; tests add their loopback origin's CA here.
    pub extra_upstream_roots: Vec<CertificateDer<'static>>,
    pub native_roots: bool,
    pub limits: Limits,
}

/// The policy for a request body larger than the DLP scan cap
/// (`GatewayConfig::dlp_body_cap`, by default [`crate::dlp::DEFAULT_MAX_DECODED`], 8 MiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OverCap {
    /// Refuse it (403 `dlp-body-too-large`). Fail closed: the default.
    #[default]
    Block,
    /// Scan the first cap bytes, send the rest unscanned; the audit event says so.
    Pass,
}

impl GatewayConfig {
    #[must_use]
    pub fn new(listen: Listen, policy: EgressPolicy, audit_path: impl Into<PathBuf>) -> Self {
        GatewayConfig {
            listen,
            policy,
            audit_path: audit_path.into(),
            upstream_overrides: HashMap::new(),
            loopback_only: false,
            ca: None,
            credentials: Vec::new(),
            dlp_rules: None,
            dlp_body_cap: crate::dlp::DEFAULT_MAX_DECODED,
            dlp_over_cap: OverCap::Block,
            extra_upstream_roots: Vec::new(),
            native_roots: true,
            limits: Limits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid egress policy")]
    Policy(#[from] bot_bottle_core::policy::PolicyError),
    #[error("cannot listen on `{listen}`")]
    Bind {
        listen: Listen,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another gateway is already listening on `{}`\nhint: stop the bottle that owns it, or remove the socket if nothing does",
        path.display()
    )]
    SocketInUse { path: PathBuf },
    #[error("audit log unavailable")]
    Audit(#[from] AuditError),
    #[error("TLS setup failed")]
    Tls(#[from] TlsError),
    #[error(
        "credentials `{first}` and `{second}` share a placeholder\nhint: give each credential its own name"
    )]
    DuplicateCredential { first: String, second: String },
}

pub(crate) struct Shared {
    policy: RwLock<Arc<EgressPolicy>>,
    pub(crate) audit: AuditLog,
    overrides: HashMap<String, SocketAddr>,
    loopback_only: bool,
    shutdown: watch::Receiver<bool>,
    pub(crate) ca: Arc<CertificateAuthority>,
    pub(crate) upstream_tls: UpstreamTls,
    pub(crate) credentials: Vec<ResolvedCredential>,
    pub(crate) scanner: Scanner,
    pub(crate) over_cap: OverCap,
    connections: Arc<tokio::sync::Semaphore>,
    pub(crate) limits: Limits,
    /// One permit per byte of [`Limits::body_memory_budget`].
    pub(crate) body_memory: Arc<tokio::sync::Semaphore>,
    /// Body scans running at once (each may hold the decoded body and its views, up to
    /// three times the scan cap), one per core: off the async workers, the blocking pool
    /// would otherwise run hundreds.
    pub(crate) scan_slots: Arc<tokio::sync::Semaphore>,
    /// hyper's header-read and keep-alive deadlines (see [`crate::timer`]).
    pub(crate) timer: crate::timer::CoarseTimer,
    /// Set once the audit log could not be written: why, with a hint, for
    /// [`GatewayHandle::failed`]. From then on nothing is let out.
    audit_failure: std::sync::OnceLock<String>,
    /// Rate limits on block events (see [`crate::audit::BlockLimiter`]): one for plain
    /// policy denials, one for blocks that carry evidence (DLP findings, a credential),
    /// so a flood of denials cannot use up the lines a leak attempt's evidence needs.
    blocks: std::sync::Mutex<[crate::audit::BlockLimiter; 2]>,
    /// Wakes [`GatewayHandle::failed`] when the gateway can no longer do its job.
    failure: tokio::sync::Notify,
    /// The first alert (see [`is_alert`]), for [`GatewayHandle::alerted`].
    alert: std::sync::OnceLock<String>,
    alerted: tokio::sync::Notify,
}

/// Whether a decision is an alert, one a bottle with `on_alert: freeze` stops for: a
/// block carrying DLP findings, a credential (or its placeholder) on its way to another
/// host, or a held request a human (or the timeout) denied.
#[must_use]
pub fn is_alert(draft: &EventDraft) -> bool {
    draft.decision == AuditDecision::Block
        && (!draft.dlp.is_empty()
            || draft.reason == "exfiltration-attempt"
            || draft.reason.starts_with("approval-denied"))
}

impl Shared {
    /// Replaces the policy in force (validated), with a `policy-updated` line.
    fn update_policy(&self, policy: EgressPolicy) -> Result<(), GatewayError> {
        policy.validate()?;
        let summary = policy_summary(&policy);
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
        let mut event = EventDraft::new(
            EventKind::PolicyUpdate,
            AuditDecision::Info,
            "policy-updated",
        );
        event.detail = Some(summary);
        self.audit.append(event)?;
        Ok(())
    }

    pub(crate) fn policy(&self) -> Arc<EgressPolicy> {
        self.policy
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Writes an event if the audit level asks for it. Blocks and anything that is not
    /// a plain allowed request are always written.
    pub(crate) fn record(&self, draft: EventDraft) {
        if is_alert(&draft) {
            let first = self.alert.set(format!(
                "{} {}{}",
                draft.reason,
                draft.host.as_deref().unwrap_or("-"),
                draft
                    .dlp
                    .first()
                    .map(|d| format!(" (DLP rule {})", d.rule))
                    .unwrap_or_default()
            ));
            if first.is_ok() {
                self.alerted.notify_waiters();
            }
        }
        // A detail on an allowed request marks something unusual (an unscanned body
        // remainder, a websocket, an upstream error): always worth a line.
        let always = draft.decision != AuditDecision::Allow
            || !draft.dlp.is_empty()
            || draft.detail.is_some()
            || draft.kind != EventKind::Request;
        if !(always || self.policy().audit_level() == AuditLevel::All) {
            return;
        }
        // Blocks of traffic are rate limited (tripwire attempts come limited already).
        if draft.decision == AuditDecision::Block
            && matches!(draft.kind, EventKind::Request | EventKind::Connect)
            && !self
                .blocks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                [usize::from(!draft.dlp.is_empty() || draft.credential.is_some())]
            .admit(&draft, Instant::now())
        {
            return;
        }
        self.write(draft);
    }

    /// Writes the count of block events the limiter held back, if it is due (`force`:
    /// now, whatever is pending).
    pub(crate) fn flush_held_back_blocks(&self, force: bool) {
        let now = Instant::now();
        let summaries: Vec<EventDraft> = self
            .blocks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter_mut()
            .filter_map(|limiter| limiter.summary(now, force))
            .collect();
        for draft in summaries {
            self.write(draft);
        }
    }

    fn write(&self, draft: EventDraft) {
        if let Err(err) = self.audit.append(draft) {
            // From now on nothing is allowed out: an unaudited decision is not made.
            let _ = self
                .audit_failure
                .set(crate::audit::describe_write_failure(&err));
            self.failure.notify_waiters();
            tracing::error!(error = %err, "audit write failed; refusing all egress");
        }
    }

    /// The 503 every request gets once the audit log cannot be written.
    pub(crate) fn audit_refusal(&self) -> Option<Response<ProxyBody>> {
        self.audit_failure.get().is_some().then(|| {
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit-unavailable",
                "the gateway cannot write its audit log, so it lets nothing out",
            )
        })
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    pub(crate) fn resolver<'a>(&'a self, policy: &EgressPolicy, host: &str) -> Resolver<'a> {
        Resolver {
            overrides: &self.overrides,
            loopback_only: self.loopback_only,
            allow_private: policy.allows_private_upstream(host),
        }
    }
}

/// A running gateway. Dropping it without [`GatewayHandle::shutdown`] leaves the tasks
/// running until the runtime stops.
#[derive(Debug)]
pub struct GatewayHandle {
    local: Listen,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

/// Starts a gateway. The policy is validated first: an invalid policy never runs.
///
/// # Errors
/// An invalid policy, an unusable audit log, or a listener that cannot be bound.
pub async fn start(config: GatewayConfig) -> Result<GatewayHandle, GatewayError> {
    config.policy.validate()?;
    for (i, a) in config.credentials.iter().enumerate() {
        for b in &config.credentials[i + 1..] {
            if a.placeholder() == b.placeholder() || a.spec.name == b.spec.name {
                return Err(GatewayError::DuplicateCredential {
                    first: a.spec.name.clone(),
                    second: b.spec.name.clone(),
                });
            }
        }
    }
    let ca = match config.ca {
        Some(ca) => ca,
        None => Arc::new(CertificateAuthority::generate("bot-bottle gateway CA")?),
    };
    let upstream_tls = UpstreamTls::new(&config.extra_upstream_roots, config.native_roots)?;
    let scanner = Scanner::with_placeholders(
        config.dlp_rules.unwrap_or_else(DlpRules::builtin),
        config
            .credentials
            .iter()
            .map(ResolvedCredential::custody_secret)
            .collect(),
        config
            .credentials
            .iter()
            .map(ResolvedCredential::placeholder_secret)
            .collect(),
    )
    .with_max_decoded(config.dlp_body_cap);
    let audit = AuditLog::open(&config.audit_path)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let listener = bind(&config.listen).await?;
    let local = listener.local();
    let shared = Arc::new(Shared {
        policy: RwLock::new(Arc::new(config.policy)),
        audit,
        overrides: config
            .upstream_overrides
            .into_iter()
            .map(|(k, v)| (k.trim_end_matches('.').to_ascii_lowercase(), v))
            .collect(),
        loopback_only: config.loopback_only,
        shutdown: shutdown_rx,
        ca,
        upstream_tls,
        credentials: config.credentials,
        scanner,
        over_cap: config.dlp_over_cap,
        connections: Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections)),
        body_memory: Arc::new(tokio::sync::Semaphore::new(
            config
                .limits
                .body_memory_budget
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        )),
        scan_slots: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
        )),
        limits: config.limits,
        timer: crate::timer::CoarseTimer::default(),
        audit_failure: std::sync::OnceLock::new(),
        blocks: std::sync::Mutex::new([
            crate::audit::BlockLimiter::default(),
            crate::audit::BlockLimiter::default(),
        ]),
        failure: tokio::sync::Notify::new(),
        alert: std::sync::OnceLock::new(),
        alerted: tokio::sync::Notify::new(),
    });
    let mut started = EventDraft::new(EventKind::Gateway, AuditDecision::Info, "gateway-started");
    started.detail = Some(format!(
        "listening on {local}; {}",
        policy_summary(&shared.policy())
    ));
    if let Err(err) = shared.audit.append(started) {
        if let Listen::Unix(path) = &local {
            let _ = std::fs::remove_file(path);
        }
        return Err(err.into());
    }
    let accept = tokio::spawn(accept_loop(listener, shared.clone()));
    tokio::spawn(held_back_blocks(shared.clone()));
    Ok(GatewayHandle {
        local,
        shared,
        shutdown: shutdown_tx,
        accept,
    })
}

/// Reports held-back block events once a second is quiet (or every
/// [`crate::audit::BLOCK_SUMMARY_EVERY`] during a flood), until shutdown.
async fn held_back_blocks(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown_signal();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => shared.flush_held_back_blocks(false),
            _ = shutdown.changed() => return,
        }
    }
}

/// What a host-side sidecar (the supervise sidecar) may do with the running gateway:
/// write events into its audit log, in the same hash chain as its own decisions, and read
/// and replace its policy.
#[derive(Clone)]
pub struct EventRecorder {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EventRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRecorder").finish_non_exhaustive()
    }
}

impl EventRecorder {
    /// The policy in force.
    #[must_use]
    pub fn policy(&self) -> Arc<EgressPolicy> {
        self.shared.policy()
    }

    /// Replaces the policy in force, as [`GatewayHandle::update_policy`] does.
    ///
    /// # Errors
    /// An invalid policy, or an audit log that cannot be written.
    pub fn update_policy(&self, policy: EgressPolicy) -> Result<(), GatewayError> {
        self.shared.update_policy(policy)
    }

    /// Appends `draft` (blocks are rate limited like the gateway's own). Fails when the
    /// log can no longer be written; the gateway has failed then, too.
    ///
    /// # Errors
    /// The audit log cannot be written.
    pub fn record(&self, draft: EventDraft) -> Result<(), String> {
        if let Some(why) = self.shared.audit_failure.get() {
            return Err(why.clone());
        }
        self.shared.record(draft);
        match self.shared.audit_failure.get() {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }
}

/// Writes the tripwire's attempts into the gateway's audit log, in the same hash chain as
/// its own decisions. A failed write fails the gateway as any other audit failure does.
#[derive(Clone)]
pub struct AttemptRecorder {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AttemptRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptRecorder").finish_non_exhaustive()
    }
}

impl AttemptRecorder {
    /// Records a count of attempts the tripwire refused but did not report one by one.
    pub fn record_held_back(&self, count: u64) {
        let mut event = EventDraft::new(
            EventKind::Direct,
            AuditDecision::Block,
            "direct-attempts-held-back",
        );
        event.held_back = count;
        event.detail = Some(format!(
            "{count} more direct attempts (repeats within 5 s, or over 20 a second) were refused by the tripwire and counted, not logged one by one"
        ));
        self.shared.record(event);
    }

    pub fn record(&self, attempt: &Attempt) {
        let mut event = EventDraft::new(
            EventKind::Direct,
            AuditDecision::Block,
            attempt.transport.reason(),
        );
        event.method = Some(attempt.transport.label().to_owned());
        event.host = Some(
            attempt
                .name
                .clone()
                .unwrap_or_else(|| attempt.destination.to_string()),
        );
        event.port = attempt.port;
        let mut detail = match (&attempt.name, attempt.port) {
            (Some(_), _) => format!(
                "query to {}; no route, refused by the tripwire",
                attempt.destination
            ),
            (None, Some(_)) => "no route; refused by the tripwire".to_owned(),
            (None, None) => format!(
                "ip protocol {}; no route, refused by the tripwire",
                attempt.protocol
            ),
        };
        if attempt.suppressed > 0 {
            detail.push_str(&format!(
                "; {} more attempts before this one were counted, not logged one by one",
                attempt.suppressed
            ));
        }
        event.detail = Some(detail);
        self.shared.record(event);
    }
}

fn policy_summary(policy: &EgressPolicy) -> String {
    format!(
        "policy: {} rules, audit {}, sha256 {}",
        policy.rules.len(),
        match policy.audit_level() {
            AuditLevel::Blocks => "blocks",
            AuditLevel::All => "all",
        },
        policy.sha256_hex()
    )
}

impl GatewayHandle {
    /// The bound address (with the real port when `Tcp` asked for port 0).
    #[must_use]
    pub fn local_addr(&self) -> &Listen {
        &self.local
    }

    /// The TCP address, for tests and benchmarks that listen on TCP.
    #[must_use]
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self.local {
            Listen::Tcp(addr) => Some(addr),
            Listen::Unix(_) => None,
        }
    }

    /// Replaces the policy for new decisions (requests already allowed run on). The
    /// update is audited with the new policy's digest.
    ///
    /// # Errors
    /// The new policy is invalid; the old one stays in force.
    pub fn update_policy(&self, policy: EgressPolicy) -> Result<(), GatewayError> {
        self.shared.update_policy(policy)
    }

    /// The CA certificate (PEM) the bottle must trust; its key never leaves the host.
    #[must_use]
    pub fn ca_cert_pem(&self) -> &str {
        self.shared.ca.cert_pem()
    }

    /// The placeholder of each credential, by name, for the bottle's environment.
    #[must_use]
    pub fn placeholders(&self) -> Vec<(String, String)> {
        self.shared
            .credentials
            .iter()
            .map(|c| (c.spec.name.clone(), c.placeholder().to_string()))
            .collect()
    }

    /// `(VAR, placeholder)` for each credential whose spec names a bottle env var: what
    /// the bottle's environment gets instead of the secret.
    #[must_use]
    pub fn placeholder_env(&self) -> Vec<(String, String)> {
        self.shared
            .credentials
            .iter()
            .filter_map(|c| {
                c.spec
                    .env
                    .as_ref()
                    .map(|var| (var.clone(), c.placeholder().to_string()))
            })
            .collect()
    }

    /// Records other host-side events (the supervise sidecar's) in this log's chain.
    #[must_use]
    pub fn event_recorder(&self) -> EventRecorder {
        EventRecorder {
            shared: self.shared.clone(),
        }
    }

    /// Records what the tripwire caught; it stays usable while the handle moves on.
    #[must_use]
    pub fn attempt_recorder(&self) -> AttemptRecorder {
        AttemptRecorder {
            shared: self.shared.clone(),
        }
    }

    /// The policy in force.
    #[must_use]
    pub fn policy(&self) -> Arc<EgressPolicy> {
        self.shared.policy()
    }

    /// Resolves with a short description of the first alert (a DLP block, an
    /// exfiltration attempt, a denied approval); never when there is none.
    pub async fn alerted(&self) -> String {
        loop {
            let notified = self.shared.alerted.notified();
            if let Some(what) = self.shared.alert.get() {
                return what.clone();
            }
            notified.await;
        }
    }

    /// Resolves, with the reason, once the gateway can no longer do its job: its audit
    /// log cannot be written (every request is then refused) or it stopped accepting
    /// without being shut down. Never resolves while it serves. The launching process
    /// waits on this to stop the bottle (fail closed, and said out loud).
    pub async fn failed(&self) -> String {
        loop {
            let notified = self.shared.failure.notified();
            if let Some(why) = self.shared.audit_failure.get() {
                return why.clone();
            }
            if self.accept.is_finished() && !*self.shutdown.borrow() {
                return "the gateway stopped accepting connections".to_owned();
            }
            // The accept loop has no waker of its own here; look again every second.
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }

    /// Stops accepting, cuts every open connection and tunnel (fail closed: nothing
    /// outlives the gateway), writes a final event, syncs the log and records its head
    /// beside it ([`crate::audit::head_path`]).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.accept.await;
        self.shared.flush_held_back_blocks(true);
        let stopped = EventDraft::new(EventKind::Gateway, AuditDecision::Info, "gateway-stopped");
        if let Err(err) = self.shared.audit.append(stopped) {
            tracing::error!(error = %err, "audit write failed");
        }
        if let Err(err) = self.shared.audit.write_head() {
            tracing::error!(error = %err, "audit head write failed");
        }
        if let Listen::Unix(path) = &self.local {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    fn local(&self) -> Listen {
        match self {
            Listener::Tcp(l) => {
                Listen::Tcp(l.local_addr().expect("a bound TCP listener has an address"))
            }
            Listener::Unix(_, path) => Listen::Unix(path.clone()),
        }
    }
}

async fn bind(listen: &Listen) -> Result<Listener, GatewayError> {
    let bind_err = |source| GatewayError::Bind {
        listen: listen.clone(),
        source,
    };
    match listen {
        Listen::Tcp(addr) => Ok(Listener::Tcp(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(bind_err)?,
        )),
        Listen::Unix(path) => {
            if path.exists() {
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    return Err(GatewayError::SocketInUse { path: path.clone() });
                }
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(bind_err)?;
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
            Ok(Listener::Unix(listener, path.clone()))
        }
    }
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept_one(&listener) => match accepted {
                Ok(accepted) => {
                    // Past the limit a new client is dropped at once rather than queued:
                    // one bottle's agent never needs that many connections.
                    let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
                        tracing::warn!("connection limit reached; dropping a client");
                        continue;
                    };
                    match accepted {
                        Accepted::Tcp(stream) => {
                            let _ = stream.set_nodelay(true);
                            connections.spawn(serve_client(stream, shared.clone(), permit));
                        }
                        Accepted::Unix(stream) => {
                            connections.spawn(serve_client(stream, shared.clone(), permit));
                        }
                    }
                }
                Err(err) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    connections.shutdown().await;
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept_one(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => Ok(Accepted::Tcp(l.accept().await?.0)),
        Listener::Unix(l, _) => Ok(Accepted::Unix(l.accept().await?.0)),
    }
}

async fn serve_client<S>(stream: S, shared: Arc<Shared>, _permit: tokio::sync::OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service_shared = shared.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = service_shared.clone();
        async move { Ok::<_, Infallible>(handle_proxy_request(shared, req).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(shared.timer.clone())
        .header_read_timeout(shared.limits.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut shutdown = shared.shutdown.clone();
    tokio::select! {
        result = connection => {
            if let Err(err) = result {
                tracing::debug!(error = %err, "client connection ended");
            }
        }
        _ = shutdown.changed() => {}
    }
}

/// Where a request is going, as the policy sees it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub host: String,
    pub port: u16,
}

pub(crate) fn full_body(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A 403 the agent can show its user, with the reason machine-readable in a header.
pub(crate) fn block_response(reason: &str, detail: &str) -> Response<ProxyBody> {
    let text = format!(
        "blocked by the bot-bottle egress gateway: {reason}\n{detail}\nThe bottle's egress policy decides what may leave; ask the user to change it if this request is needed.\n"
    );
    let mut response = Response::new(full_body(text));
    *response.status_mut() = StatusCode::FORBIDDEN;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(value) = HeaderValue::from_str(reason) {
        headers.insert(BLOCK_HEADER, value);
    }
    response
}

pub(crate) fn error_response(
    status: StatusCode,
    reason: &str,
    detail: &str,
) -> Response<ProxyBody> {
    let mut response = Response::new(full_body(format!(
        "bot-bottle egress gateway: {reason}\n{detail}\n"
    )));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(value) = HeaderValue::from_str(reason) {
        headers.insert(ERROR_HEADER, value);
    }
    response
}

pub(crate) fn request_draft(
    decision: AuditDecision,
    reason: &str,
    method: &Method,
    target: &Target,
    path: &str,
) -> EventDraft {
    let mut draft = EventDraft::new(EventKind::Request, decision, reason);
    draft.method = Some(method.as_str().to_string());
    draft.host = Some(target.host.clone());
    draft.port = Some(target.port);
    draft.path = Some(truncate(path, 1024));
    draft
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

async fn handle_proxy_request(shared: Arc<Shared>, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        return crate::tunnel::handle_connect(shared, req).await;
    }
    let started = Instant::now();
    let uri = req.uri().clone();
    let path = uri.path().to_string();
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        let target = Target {
            host: String::new(),
            port: 0,
        };
        let mut draft = request_draft(
            AuditDecision::Block,
            "not-a-proxy-request",
            req.method(),
            &target,
            &path,
        );
        draft.host = None;
        draft.port = None;
        draft.status = Some(400);
        shared.record(draft);
        let mut response = block_response(
            "not-a-proxy-request",
            "send requests in absolute form (http://host/path) or tunnel with CONNECT",
        );
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let target = Target {
        host: authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase(),
        port: authority
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 }),
    };
    if scheme != "http" {
        let mut draft = request_draft(
            AuditDecision::Block,
            "unsupported-scheme",
            req.method(),
            &target,
            &path,
        );
        draft.status = Some(403);
        shared.record(draft);
        return block_response(
            "unsupported-scheme",
            "only http:// is accepted in absolute form; use CONNECT for https",
        );
    }
    if let Some(host_header) = req.headers().get(header::HOST)
        && !host_header_matches(host_header, &target, 80)
    {
        {
            let mut draft = request_draft(
                AuditDecision::Block,
                "host-mismatch",
                req.method(),
                &target,
                &path,
            );
            draft.status = Some(403);
            // Cut before formatting: a bottle may send a header of hundreds of KB.
            let shown = truncate(&String::from_utf8_lossy(host_header.as_bytes()), 512);
            draft.detail = Some(format!(
                "Host header {shown:?} differs from the request target"
            ));
            shared.record(draft);
            return block_response(
                "host-mismatch",
                "the Host header must name the same host as the request target",
            );
        }
    }
    crate::forward::process(shared, target, req, crate::forward::Route::Plain, started).await
}

/// Whether a `Host` (or `:authority`) value names `target`; a missing port means
/// `default_port`.
pub(crate) fn host_header_matches(value: &HeaderValue, target: &Target, default_port: u16) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    // A Host has no userinfo; one with `@` is read differently by different servers.
    if value.contains('@') {
        return false;
    }
    let Ok(authority) = value.parse::<http::uri::Authority>() else {
        return false;
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let host = host.strip_suffix('.').unwrap_or(host);
    let target_host = target.host.strip_suffix('.').unwrap_or(&target.host);
    host.eq_ignore_ascii_case(target_host)
        && authority.port_u16().unwrap_or(default_port) == target.port
}

/// Decides a request against the policy; returns the block response if it is refused.
pub(crate) fn decide_request(
    shared: &Shared,
    policy: &EgressPolicy,
    method: &Method,
    target: &Target,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<Option<usize>, Box<Response<ProxyBody>>> {
    if let Some(refusal) = shared.audit_refusal() {
        return Err(Box::new(refusal));
    }
    let facts = RequestFacts {
        host: &target.host,
        port: target.port,
        method: method.as_str(),
        path: uri.path(),
        query: uri.query(),
    };
    let overrides: Vec<&[u8]> = METHOD_OVERRIDE_HEADERS
        .iter()
        .flat_map(|name| headers.get_all(*name))
        .map(HeaderValue::as_bytes)
        .collect();
    let paths: Vec<&[u8]> = PATH_OVERRIDE_HEADERS
        .iter()
        .flat_map(|name| headers.get_all(*name))
        .map(HeaderValue::as_bytes)
        .collect();
    let decision = policy.decide_with_overrides(&facts, &overrides, &paths);
    if decision.is_allow() {
        return Ok(decision.rule);
    }
    let reason = decision.reason.as_str();
    let mut draft = request_draft(AuditDecision::Block, reason, method, target, uri.path());
    draft.rule = decision.rule;
    draft.status = Some(403);
    let shown = |values: &[&[u8]]| {
        values
            .iter()
            .map(|v| truncate(&String::from_utf8_lossy(v), 256))
            .collect::<Vec<_>>()
    };
    let mut overridden = Vec::new();
    if !overrides.is_empty() {
        overridden.push(format!("method override {:?}", shown(&overrides)));
    }
    if !paths.is_empty() {
        overridden.push(format!("path override {:?}", shown(&paths)));
    }
    if !overridden.is_empty() {
        draft.detail = Some(overridden.join("; "));
    }
    shared.record(draft);
    Err(Box::new(block_response(
        reason,
        &format!(
            "{method} {}:{}{} is not allowed",
            target.host,
            target.port,
            uri.path()
        ),
    )))
}

/// Headers that describe one hop and must not be forwarded.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("proxy-connection");
    headers.remove("keep-alive");
}

pub(crate) fn upstream_failure(
    shared: &Shared,
    err: &UpstreamError,
    mut draft: EventDraft,
) -> Response<ProxyBody> {
    draft.reason = err.reason().to_string();
    draft.detail = Some(err.detail());
    if err.is_refusal() {
        draft.decision = AuditDecision::Block;
        draft.status = Some(403);
        shared.record(draft);
        block_response(err.reason(), &err.detail())
    } else {
        draft.status = Some(502);
        shared.record(draft);
        error_response(StatusCode::BAD_GATEWAY, err.reason(), &err.detail())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str, port: u16) -> Target {
        Target {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn host_headers_must_name_the_target() {
        let matches = |value: &str, t: &Target, default: u16| {
            host_header_matches(&HeaderValue::from_str(value).expect("value"), t, default)
        };
        let api = target("api.test", 443);
        assert!(matches("api.test", &api, 443));
        assert!(matches("API.test.", &api, 443));
        assert!(matches("api.test:443", &api, 443));
        assert!(!matches("api.test:8443", &api, 443));
        assert!(!matches("api.test", &api, 80));
        assert!(!matches("other.test", &api, 443));
        assert!(!matches("api.test.other.test", &api, 443));
        assert!(!matches("user@api.test", &api, 443));
        assert!(!matches("", &api, 443));
        let v6 = target("::1", 8080);
        assert!(matches("[::1]:8080", &v6, 443));
        assert!(!matches("[::1]", &v6, 443));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(
            headers.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            vec!["x-kept"]
        );
    }
}
