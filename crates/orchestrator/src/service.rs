//! The forge loop (DESIGN §5): a targeted issue starts a headless run, `signal_done`
//! freezes it and posts the summary, a human comment resumes it, a closed PR destroys
//! it, and the watchdog freezes a run that went silent. The SQLite store is the truth;
//! after a restart, [`Orchestrator::reconcile`] rebuilds the work from it and from the
//! bottles on disk, so no run is lost, run twice or left unwatched.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bot_bottle_core::manifest::Catalog;
use bot_bottle_core::plan::BottleSpec;
use bot_bottle_core::provenance::Trigger;
use bot_bottle_core::state::Home;
use bot_bottle_forge::{
    Forge, ForgeState, ForgeStateStore, ForgeStatus, GiteaClient, GiteaConfig, GiteaForge,
    SqliteForgeStateStore, TargetDecision, WebhookHeaders, dedupe_keys, receive, target_issue,
};
use bot_bottle_runtime::forge::ForgeRun;
use bot_bottle_runtime::launch::{self, GatewaySettings, LaunchOptions, SessionOutcome};
use bot_bottle_runtime::progress::Progress;
use bot_bottle_sidecars::queue::{self, DoneStatus, QueueEvent};
use serde::Serialize;

use crate::config::Config;
use crate::router::{self, Route};

/// How long a run may keep going after `signal_done` before it is stopped.
const DONE_GRACE: Duration = Duration::from_secs(20);
/// How often running sessions are checked (watchdog, `signal_done`, check-ins).
const WATCH_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] bot_bottle_forge::StoreError),
    #[error(transparent)]
    Forge(#[from] bot_bottle_forge::ForgeError),
    #[error("cannot read the forge token: {0}")]
    Token(String),
    #[error(transparent)]
    Runtime(#[from] launch::RuntimeError),
    #[error("{0}")]
    Refused(String),
    #[error("cannot access `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl OrchestratorError {
    /// The exit code the CLI reports.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Runtime(err) => err.exit_code(),
            Self::Config(_) | Self::Token(_) | Self::Refused(_) => launch::exit_codes::CONFIG,
            Self::Store(_) | Self::Io { .. } => launch::exit_codes::STATE,
            Self::Forge(_) => launch::exit_codes::BACKEND,
        }
    }
}

/// What the orchestrator needs to launch bottles: the same settings `bot-bottle start`
/// uses.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub home: Home,
    pub shim_binary: PathBuf,
    pub gateway: GatewaySettings,
    pub trust_project_manifests: bool,
    pub quiet: bool,
}

/// One row of `orchestrate status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusRow {
    pub repo: String,
    pub issue: u64,
    pub issue_url: String,
    pub pr: Option<u64>,
    pub pr_url: Option<String>,
    pub slug: String,
    pub agent: String,
    pub state: ForgeStatus,
    pub last_checkin: String,
    pub watchdog_fired: bool,
    pub resume_rounds: u32,
    pub note: Option<String>,
}

/// What the webhook endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub message: String,
}

impl Answer {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// A session the orchestrator runs right now.
struct Active {
    watchdog_fired: Arc<AtomicBool>,
    started: SystemTime,
    done_seen: Option<Instant>,
    stopping: bool,
}

enum Job {
    Start { prompt: String, trigger: Trigger },
    Resume { prompt: String, trigger: Trigger },
}

/// The orchestrator: cheap to clone, shared by the webhook server, the workers and the
/// watcher.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    launcher: Launcher,
    store: SqliteForgeStateStore,
    token: String,
    secret: Option<Vec<u8>>,
    extra_roots: Option<Vec<u8>>,
    permits: tokio::sync::Semaphore,
    active: Mutex<HashMap<String, Active>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn rfc3339(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Orchestrator {
    /// Resolves the token (and the webhook secret when configured) and opens the store
    /// in `$BOT_BOTTLE_HOME/bot-bottle.db`.
    ///
    /// # Errors
    /// An unreadable secret or CA file, or a store that cannot be opened.
    pub fn new(config: Config, launcher: Launcher) -> Result<Self, OrchestratorError> {
        let token = bot_bottle_egress::read_source("forge token", &config.token)
            .map_err(|err| OrchestratorError::Token(err.to_string()))?;
        if token.is_empty() {
            return Err(OrchestratorError::Token(
                "it is empty\nhint: check FORGE_TOKEN (or its _FILE/_COMMAND form)".to_owned(),
            ));
        }
        let secret = match &config.webhook_secret {
            Some(source) => {
                let secret = bot_bottle_egress::read_source("webhook secret", source)
                    .map_err(|err| OrchestratorError::Token(err.to_string()))?;
                if secret.is_empty() {
                    return Err(OrchestratorError::Refused(
                        "the webhook secret is empty\nhint: set FORGE_WEBHOOK_SECRET to the secret configured on the Gitea webhook".to_owned(),
                    ));
                }
                Some(secret.into_bytes())
            }
            None => None,
        };
        let extra_roots = match &config.ca_file {
            Some(path) => Some(fs_err::read(path).map_err(|source| OrchestratorError::Io {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        launcher.home.ensure().map_err(launch::RuntimeError::from)?;
        let store =
            SqliteForgeStateStore::open(SqliteForgeStateStore::default_path(launcher.home.root()))?;
        let permits = tokio::sync::Semaphore::new(config.max_concurrent);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                launcher,
                store,
                token,
                secret,
                extra_roots,
                permits,
                active: Mutex::new(HashMap::new()),
                tasks: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Checks that the token belongs to `FORGE_BOT_USER`. The orchestrator tells its own
    /// comments from humans' by that login; with another one, every comment it posts
    /// would resume the run that caused it, in a loop.
    ///
    /// # Errors
    /// The forge is unreachable, or the token is someone else's.
    pub async fn check_bot_user(&self) -> Result<(), OrchestratorError> {
        let mut config = GiteaConfig::new(
            self.inner.config.api_url.clone(),
            "-",
            "-",
            self.inner.token.clone(),
        );
        config.extra_roots_pem.clone_from(&self.inner.extra_roots);
        let client = GiteaClient::new(config).map_err(bot_bottle_forge::ForgeError::from)?;
        let user = client
            .current_user()
            .await
            .map_err(bot_bottle_forge::ForgeError::from)?;
        let expected = &self.inner.config.bot_user;
        if user.login.eq_ignore_ascii_case(expected) {
            Ok(())
        } else {
            Err(OrchestratorError::Refused(format!(
                "the forge token belongs to `{}`, not to FORGE_BOT_USER `{expected}`\nhint: set FORGE_BOT_USER={} (the orchestrator tells its own comments apart by this login; a wrong one would make it answer itself), or use the bot's token",
                user.login, user.login
            )))
        }
    }

    #[must_use]
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    fn active(&self) -> MutexGuard<'_, HashMap<String, Active>> {
        self.inner
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn store(&self) -> &SqliteForgeStateStore {
        &self.inner.store
    }

    fn home(&self) -> &Home {
        &self.inner.launcher.home
    }

    /// An unscoped forge client for one repository, holding the token.
    ///
    /// # Errors
    /// The API URL or the extra roots are unusable.
    pub fn forge_for(&self, owner: &str, repo: &str) -> Result<Arc<dyn Forge>, OrchestratorError> {
        self.forge(owner, repo)
    }

    /// An unscoped forge client for one repository (the sidecar scopes what the agent
    /// may do with it).
    fn forge(&self, owner: &str, repo: &str) -> Result<Arc<dyn Forge>, OrchestratorError> {
        let mut config = GiteaConfig::new(
            self.inner.config.api_url.clone(),
            owner,
            repo,
            self.inner.token.clone(),
        );
        config.extra_roots_pem.clone_from(&self.inner.extra_roots);
        let client = GiteaClient::new(config).map_err(bot_bottle_forge::ForgeError::from)?;
        Ok(Arc::new(GiteaForge::new(client)))
    }

    fn launch_options(&self, forge: ForgeRun) -> LaunchOptions {
        let launcher = &self.inner.launcher;
        LaunchOptions {
            home: launcher.home.clone(),
            progress: Progress::new(launcher.quiet),
            shim_binary: launcher.shim_binary.clone(),
            gateway: launcher.gateway.clone(),
            confirm: None,
            agent_stdout_to_stderr: true,
            remove_after: false,
            trust_project_manifests: launcher.trust_project_manifests,
            forge: Some(forge),
        }
    }

    fn forge_run(
        &self,
        record: &ForgeState,
        trigger: Trigger,
        watchdog: Arc<AtomicBool>,
    ) -> Result<ForgeRun, OrchestratorError> {
        let config = &self.inner.config;
        let (git_host, git_port) = config.git_host();
        Ok(ForgeRun {
            forge: self.forge(&record.owner, &record.repo)?,
            owner: record.owner.clone(),
            repo: record.repo.clone(),
            issue: record.issue_number,
            prs: record.pr_number.into_iter().collect(),
            base: config.base_branch.clone(),
            branch_prefix: config.branch_prefix.clone(),
            git_host,
            git_port,
            username: config.bot_user.clone(),
            token: config.token.clone(),
            trigger,
            watchdog_fired: watchdog,
        })
    }

    /// The agents a label may name: the manifests in the home.
    fn known_agents(&self) -> Result<Vec<String>, OrchestratorError> {
        let root = self.home().root();
        let catalog = Catalog::resolve(root, root)
            .map_err(|err| OrchestratorError::Runtime(launch::RuntimeError::from(err)))?;
        Ok(catalog.agents.keys().cloned().collect())
    }

    // ---- webhooks ------------------------------------------------------------------

    /// Verifies, dedupes and routes one delivery. Never panics on hostile input: every
    /// refusal is an answer.
    pub async fn handle_delivery(&self, headers: &WebhookHeaders, body: &[u8]) -> Answer {
        let Some(secret) = &self.inner.secret else {
            return Answer::new(503, "no webhook secret configured");
        };
        let delivery = match receive(secret, headers, body) {
            Ok(delivery) => delivery,
            Err(err) => {
                let signature = matches!(
                    err,
                    bot_bottle_forge::WebhookError::MissingSignature
                        | bot_bottle_forge::WebhookError::EmptySignature
                        | bot_bottle_forge::WebhookError::BadSignature
                        | bot_bottle_forge::WebhookError::MalformedSignature
                );
                tracing::warn!(error = %err, "webhook refused");
                return Answer::new(if signature { 401 } else { 400 }, err.to_string());
            }
        };
        if let Some(repository) = delivery.event.repository()
            && !self
                .inner
                .config
                .repo_allowed(&repository.owner.login, &repository.name)
        {
            return Answer::new(
                202,
                format!("ignored: `{}` is not in FORGE_REPOS", repository.full_name),
            );
        }
        let keys = dedupe_keys(&delivery.delivery_id, &delivery.event);
        match self.store().record_delivery(&keys.all()) {
            Ok(true) => {}
            Ok(false) => return Answer::new(200, "duplicate delivery: already handled"),
            Err(err) => return Answer::new(500, format!("state store: {err}")),
        }
        let route = router::classify(&delivery.event, &self.inner.config.bot_user);
        match self.route(route, &delivery.delivery_id).await {
            Ok(message) => Answer::new(202, message),
            Err(err) => {
                tracing::error!(error = %err, "webhook handling failed");
                Answer::new(500, err.to_string())
            }
        }
    }

    async fn route(&self, route: Route, delivery: &str) -> Result<String, OrchestratorError> {
        match route {
            Route::Ignore(why) => Ok(format!("ignored: {why}")),
            Route::Consider {
                owner,
                repo,
                issue,
                title,
                body,
                labels,
                assignees,
            } => {
                if let Some(existing) = self.store().get(&owner, &repo, issue)?
                    && existing.status != ForgeStatus::Destroyed
                {
                    return Ok(format!(
                        "ignored: issue already has run `{}` ({})",
                        existing.slug, existing.status
                    ));
                }
                let forge = self.forge(&owner, &repo)?;
                // Membership is checked now, at event time, for every assignee.
                let mut members = Vec::new();
                for login in &assignees {
                    if forge.is_org_member(&self.inner.config.org, login).await? {
                        members.push(login.clone());
                    }
                }
                let known = self.known_agents()?;
                match target_issue(
                    &labels,
                    &assignees,
                    |l| members.iter().any(|m| m == l),
                    &known,
                ) {
                    TargetDecision::Targeted(target) => {
                        let slug = self.start_run(
                            &owner,
                            &repo,
                            issue,
                            &target.agent,
                            target.bottle.as_deref(),
                            router::start_prompt(issue, &title, &body),
                            Trigger {
                                kind: "issue".to_owned(),
                                delivery_id: Some(delivery.to_owned()),
                                comment_id: None,
                            },
                        )?;
                        Ok(format!(
                            "started run `{slug}` for #{issue} (agent {})",
                            target.agent
                        ))
                    }
                    other => Ok(format!("not targeted: {other:?}")),
                }
            }
            Route::Comment {
                owner,
                repo,
                number,
                is_pull,
                author,
                body,
                comment_id,
            } => {
                let record = if is_pull {
                    self.store().find_by_pr(&owner, &repo, number)?
                } else {
                    self.store().get(&owner, &repo, number)?
                };
                let Some(record) = record else {
                    return Ok(format!("ignored: #{number} has no run"));
                };
                let prompt = router::comment_prompt(&author, number, &body);
                let trigger = Trigger {
                    kind: "comment".to_owned(),
                    delivery_id: Some(delivery.to_owned()),
                    comment_id: Some(comment_id),
                };
                self.resume_or_queue(&record, prompt, trigger)
            }
            Route::PrOpened {
                owner,
                repo,
                pr,
                head,
            } => {
                let Some(record) = self.record_for_branch(&owner, &repo, &head)? else {
                    return Ok(format!("ignored: `{head}` is no run's branch"));
                };
                self.store()
                    .update(&owner, &repo, record.issue_number, &mut |s| {
                        s.pr_number.get_or_insert(pr);
                    })?;
                Ok(format!("PR #{pr} belongs to run `{}`", record.slug))
            }
            Route::PrClosed {
                owner,
                repo,
                pr,
                head,
                merged,
            } => {
                let record = match self.store().find_by_pr(&owner, &repo, pr)? {
                    Some(record) => Some(record),
                    None => self.record_for_branch(&owner, &repo, &head)?,
                };
                let Some(record) = record else {
                    return Ok(format!("ignored: PR #{pr} has no run"));
                };
                let how = if merged { "merged" } else { "closed" };
                self.destroy_run(&record, &format!("PR #{pr} {how}"))
                    .await?;
                Ok(format!("run `{}` destroyed (PR #{pr} {how})", record.slug))
            }
            Route::IssueClosed { owner, repo, issue } => {
                let Some(record) = self.store().get(&owner, &repo, issue)? else {
                    return Ok(format!("ignored: #{issue} has no run"));
                };
                if let Some(pr) = record.pr_number
                    && self.forge(&owner, &repo)?.is_pr_open(pr).await?
                {
                    return Ok(format!(
                        "issue closed; PR #{pr} is still open, the run stays"
                    ));
                }
                self.destroy_run(&record, &format!("issue #{issue} closed"))
                    .await?;
                Ok(format!("run `{}` destroyed (issue closed)", record.slug))
            }
        }
    }

    fn record_for_branch(
        &self,
        owner: &str,
        repo: &str,
        head: &str,
    ) -> Result<Option<ForgeState>, OrchestratorError> {
        let Some(slug) = head.strip_prefix(&self.inner.config.branch_prefix) else {
            return Ok(None);
        };
        Ok(self
            .store()
            .all()?
            .into_iter()
            .find(|r| r.owner == owner && r.repo == repo && r.slug == slug))
    }

    // ---- runs ----------------------------------------------------------------------

    /// Records a new run as `running` and starts it on a worker. Refused when the issue
    /// already has a live run.
    ///
    /// # Errors
    /// The issue has a run, or the store fails.
    #[allow(clippy::too_many_arguments)]
    pub fn start_run(
        &self,
        owner: &str,
        repo: &str,
        issue: u64,
        agent: &str,
        bottle: Option<&str>,
        prompt: String,
        trigger: Trigger,
    ) -> Result<String, OrchestratorError> {
        if let Some(existing) = self.store().get(owner, repo, issue)?
            && existing.status != ForgeStatus::Destroyed
        {
            return Err(OrchestratorError::Refused(format!(
                "{owner}/{repo}#{issue} already has run `{}` ({})\nhint: `bot-bottle orchestrate resume {}` continues it",
                existing.slug, existing.status, existing.slug
            )));
        }
        let label = format!("{repo}-{issue}");
        let slug = bot_bottle_core::slug::new_identity(&bot_bottle_core::slug::slugify(&label));
        let record = ForgeState {
            owner: owner.to_owned(),
            repo: repo.to_owned(),
            issue_number: issue,
            slug: slug.clone(),
            agent_name: agent.to_owned(),
            bottle_names: bottle.map(str::to_owned).into_iter().collect(),
            backend_name: "docker".to_owned(),
            agent_git_user: self.inner.config.bot_user.clone(),
            pr_number: None,
            status: ForgeStatus::Running,
            last_checkin_at: now_rfc3339(),
            base_commit_sha: String::new(),
            resume_rounds: 0,
            watchdog_fired: false,
            pending_prompt: None,
            note: Some("starting".to_owned()),
        };
        // Recorded before anything runs: a restart finds it and starts it.
        self.store().upsert(&record)?;
        self.spawn(record, Job::Start { prompt, trigger });
        Ok(slug)
    }

    /// Resumes a frozen run with `prompt`, or keeps the prompt for when the running run
    /// is frozen.
    fn resume_or_queue(
        &self,
        record: &ForgeState,
        prompt: String,
        trigger: Trigger,
    ) -> Result<String, OrchestratorError> {
        match record.status {
            ForgeStatus::Destroyed => Ok(format!("ignored: run `{}` is destroyed", record.slug)),
            ForgeStatus::Running => {
                self.store().update(
                    &record.owner,
                    &record.repo,
                    record.issue_number,
                    &mut |s| {
                        let mut pending = s.pending_prompt.take().unwrap_or_default();
                        if !pending.is_empty() {
                            pending.push_str("\n\n---\n\n");
                        }
                        pending.push_str(&prompt);
                        s.pending_prompt = Some(pending);
                    },
                )?;
                Ok(format!(
                    "run `{}` is busy; the comment resumes it once it is frozen",
                    record.slug
                ))
            }
            ForgeStatus::Frozen => {
                let Some(updated) = self.store().update(
                    &record.owner,
                    &record.repo,
                    record.issue_number,
                    &mut |s| {
                        s.status = ForgeStatus::Running;
                        s.resume_rounds += 1;
                        s.watchdog_fired = false;
                        s.note = Some("resuming".to_owned());
                    },
                )?
                else {
                    return Ok("ignored: the run disappeared".to_owned());
                };
                self.spawn(updated, Job::Resume { prompt, trigger });
                Ok(format!("resuming run `{}`", record.slug))
            }
        }
    }

    /// Resumes the run `slug` with `prompt` (`orchestrate resume`).
    ///
    /// # Errors
    /// No such run, or it is destroyed.
    pub fn resume_slug(&self, slug: &str, prompt: String) -> Result<String, OrchestratorError> {
        let record = self.record_by_slug(slug)?;
        let trigger = trigger("resume");
        if record.status == ForgeStatus::Destroyed {
            return Err(OrchestratorError::Refused(format!(
                "run `{slug}` is destroyed\nhint: `bot-bottle orchestrate status` lists runs"
            )));
        }
        self.resume_or_queue(&record, prompt, trigger)
    }

    fn record_by_slug(&self, slug: &str) -> Result<ForgeState, OrchestratorError> {
        self.store()
            .all()?
            .into_iter()
            .find(|r| r.slug == slug)
            .ok_or_else(|| {
                OrchestratorError::Refused(format!(
                    "no orchestrated run `{slug}`\nhint: `bot-bottle orchestrate status` lists runs"
                ))
            })
    }

    /// Finishes, on a task, a run whose session ended while no orchestrator watched it.
    fn spawn_finish(&self, record: ForgeState, why: &'static str) {
        let this = self.clone();
        let handle = tokio::spawn(async move {
            let outcome = Err(OrchestratorError::Refused(why.to_owned()));
            if let Err(err) = this.finish(&record, outcome, false).await {
                tracing::error!(slug = %record.slug, error = %err, "finishing after a restart failed");
            }
        });
        self.track(handle);
    }

    fn track(&self, handle: tokio::task::JoinHandle<()>) {
        let mut tasks = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    fn spawn(&self, record: ForgeState, job: Job) {
        let this = self.clone();
        let handle = tokio::spawn(async move {
            let slug = record.slug.clone();
            if let Err(err) = this.run_job(record, job).await {
                tracing::error!(slug = %slug, error = %err, "orchestrated session failed");
                eprintln!("bot-bottle: orchestrated run {slug}: {err}");
            }
        });
        self.track(handle);
    }

    /// Waits until no session runs or waits to run.
    pub async fn idle(&self) {
        loop {
            let pending: Vec<_> = {
                let mut tasks = self
                    .inner
                    .tasks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                tasks.retain(|t| !t.is_finished());
                tasks.drain(..).collect()
            };
            if pending.is_empty() {
                return;
            }
            for task in pending {
                let _ = task.await;
            }
        }
    }

    async fn run_job(&self, record: ForgeState, job: Job) -> Result<(), OrchestratorError> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| OrchestratorError::Refused("shutting down".to_owned()))?;
        // A comment may have destroyed the run while it waited for a worker.
        let Some(record) = self
            .store()
            .get(&record.owner, &record.repo, record.issue_number)?
            .filter(|r| r.slug == record.slug && r.status == ForgeStatus::Running)
        else {
            return Ok(());
        };
        let watchdog = Arc::new(AtomicBool::new(false));
        self.active().insert(
            record.slug.clone(),
            Active {
                watchdog_fired: Arc::clone(&watchdog),
                started: SystemTime::now(),
                done_seen: None,
                stopping: false,
            },
        );
        self.note(&record, "running");
        let outcome = self.run_session(&record, job, Arc::clone(&watchdog)).await;
        self.active().remove(&record.slug);
        let fired = watchdog.load(Ordering::SeqCst);
        self.finish(&record, outcome, fired).await
    }

    async fn run_session(
        &self,
        record: &ForgeState,
        job: Job,
        watchdog: Arc<AtomicBool>,
    ) -> Result<SessionOutcome, OrchestratorError> {
        let home = self.home();
        match job {
            Job::Start { prompt, trigger } => {
                let forge = self.forge_run(record, trigger, watchdog)?;
                let workspace = home.root().join("forge/workspaces").join(&record.slug);
                bot_bottle_core::state::create_private_dir(&workspace)
                    .map_err(launch::RuntimeError::from)?;
                let spec = BottleSpec {
                    agent: record.agent_name.clone(),
                    bottles: record.bottle_names.clone(),
                    label: Some(format!("{}-{}", record.repo, record.issue_number)),
                    prompt: Some(prompt),
                    cwd: workspace,
                    copy_cwd: true,
                    identity: Some(record.slug.clone()),
                    ..BottleSpec::default()
                };
                Ok(launch::launch(&spec, &self.launch_options(forge)).await?)
            }
            Job::Resume { prompt, trigger } => {
                let forge = self.forge_run(record, trigger, watchdog)?;
                if home
                    .bottle(&record.slug)
                    .map_err(launch::RuntimeError::from)?
                    .read_metadata()
                    .map_err(launch::RuntimeError::from)?
                    .is_none()
                {
                    return Err(OrchestratorError::Refused(format!(
                        "run `{}` has no bottle to resume",
                        record.slug
                    )));
                }
                Ok(launch::resume(
                    &record.slug,
                    Some(prompt),
                    None,
                    &self.launch_options(forge),
                )
                .await?)
            }
        }
    }

    fn note(&self, record: &ForgeState, note: &str) {
        let _ = self
            .store()
            .update(&record.owner, &record.repo, record.issue_number, &mut |s| {
                s.note = Some(note.to_owned())
            });
    }

    /// After a session: take the sidecar's events, freeze the bottle, say why on the
    /// issue, attach the provenance, and resume with a comment that came in meanwhile.
    async fn finish(
        &self,
        record: &ForgeState,
        outcome: Result<SessionOutcome, OrchestratorError>,
        watchdog_fired: bool,
    ) -> Result<(), OrchestratorError> {
        let bottle = self
            .home()
            .bottle(&record.slug)
            .map_err(launch::RuntimeError::from)?;
        let queue_dir = bot_bottle_runtime::forge::queue_dir(&bottle);
        let mut done: Option<(PathBuf, DoneStatus, String)> = None;
        for (path, event) in queue::pending(&queue_dir).unwrap_or_default() {
            match event.event {
                QueueEvent::PrCreated { number } => {
                    self.store().update(
                        &record.owner,
                        &record.repo,
                        record.issue_number,
                        &mut |s| {
                            s.pr_number.get_or_insert(number);
                        },
                    )?;
                    let _ = queue::ack(&path);
                }
                QueueEvent::SignalDone { status, summary } => {
                    // The last one counts; earlier ones are answered by it.
                    if let Some((old, ..)) = done.take() {
                        let _ = queue::ack(&old);
                    }
                    done = Some((path, status, summary));
                }
            }
        }
        let Some(current) = self
            .store()
            .get(&record.owner, &record.repo, record.issue_number)?
            .filter(|r| r.slug == record.slug)
        else {
            return Ok(());
        };
        if current.status == ForgeStatus::Destroyed {
            // The PR closed while the session ran.
            launch::destroy(self.home(), &record.slug, &Progress::new(true)).await?;
            let workspace = self
                .home()
                .root()
                .join("forge/workspaces")
                .join(&record.slug);
            let _ = std::fs::remove_dir_all(workspace);
            self.store()
                .update(&record.owner, &record.repo, record.issue_number, &mut |s| {
                    let why = s.note.as_deref().unwrap_or_default();
                    s.note = Some(why.replacen("destroying", "destroyed", 1));
                })?;
            return Ok(());
        }
        let failure = outcome.as_ref().err().map(ToString::to_string);
        let frozen = launch::freeze(self.home(), &record.slug, &Progress::new(true)).await;
        let provenance = outcome.as_ref().ok().and_then(|o| o.provenance.clone());
        let exit = outcome.as_ref().ok().map(|o| o.exit_code);
        let note = match (&done, watchdog_fired, &failure) {
            (Some((_, status, _)), _, _) => format!("signalled {}", status_word(*status)),
            (None, true, _) => "frozen by the watchdog".to_owned(),
            (None, false, Some(err)) => format!("session failed: {}", first_line(err)),
            (None, false, None) => format!(
                "agent exited {} without signal_done",
                exit.unwrap_or_default()
            ),
        };
        let pending = self
            .store()
            .update(&record.owner, &record.repo, record.issue_number, &mut |s| {
                s.status = ForgeStatus::Frozen;
                s.watchdog_fired |= watchdog_fired;
                s.note = Some(note.clone());
                s.last_checkin_at = now_rfc3339();
            })?
            .and_then(|s| s.pending_prompt);
        if let Err(err) = &frozen {
            tracing::error!(slug = %record.slug, error = %err, "freeze failed");
        }

        let forge = self.forge(&record.owner, &record.repo)?;
        let comment = match &done {
            Some((_, status, summary)) => format!(
                "**bot-bottle** run `{}` signalled **{}**:\n\n{}\n\n_The run is frozen. Comment here or on its pull request to continue it._",
                record.slug,
                status_word(*status),
                summary
            ),
            None if watchdog_fired => format!(
                "**bot-bottle** run `{}` was silent for {} and the watchdog froze it (`watchdog_fired`).\n\n_Comment here to resume it._",
                record.slug,
                human_duration(self.inner.config.watchdog_timeout)
            ),
            None => format!(
                "**bot-bottle** run `{}` stopped without signalling done ({note}).\n\n_Comment here to resume it._",
                record.slug
            ),
        };
        forge.post_comment(record.issue_number, &comment).await?;
        if let Some((path, ..)) = &done {
            let _ = queue::ack(path);
        }
        if let Some(path) = provenance
            && let Ok(envelope) = fs_err::read_to_string(&path)
        {
            let target = current_pr(self, record)?.unwrap_or(record.issue_number);
            let body = provenance_comment(&record.slug, &envelope);
            if let Err(err) = forge.post_comment(target, &body).await {
                tracing::warn!(slug = %record.slug, error = %err, "provenance comment failed");
            }
        }
        if let Some(prompt) = pending
            && frozen.is_ok()
        {
            let updated = self.store().update(
                &record.owner,
                &record.repo,
                record.issue_number,
                &mut |s| s.pending_prompt = None,
            )?;
            if let Some(updated) = updated {
                self.resume_or_queue(&updated, prompt, trigger("comment"))?;
            }
        }
        Ok(())
    }

    async fn destroy_run(&self, record: &ForgeState, why: &str) -> Result<(), OrchestratorError> {
        self.store()
            .update(&record.owner, &record.repo, record.issue_number, &mut |s| {
                s.status = ForgeStatus::Destroyed;
                s.pending_prompt = None;
                s.note = Some(format!("destroying: {why}"));
            })?;
        let running = self.active().contains_key(&record.slug);
        if running {
            // The worker sees `destroyed` when the session ends and removes the bottle.
            launch::stop(self.home(), &record.slug).await?;
            return Ok(());
        }
        launch::destroy(self.home(), &record.slug, &Progress::new(true)).await?;
        let workspace = self
            .home()
            .root()
            .join("forge/workspaces")
            .join(&record.slug);
        let _ = std::fs::remove_dir_all(workspace);
        self.store()
            .update(&record.owner, &record.repo, record.issue_number, &mut |s| {
                s.note = Some(format!("destroyed: {why}"));
            })?;
        Ok(())
    }

    // ---- watching ------------------------------------------------------------------

    /// Checks running sessions once: records check-ins, stops a run that signalled done
    /// but keeps going, and fires the watchdog on a silent one.
    pub async fn watch_once(&self) {
        let slugs: Vec<(String, SystemTime, Option<Instant>, bool)> = self
            .active()
            .iter()
            .map(|(slug, a)| (slug.clone(), a.started, a.done_seen, a.stopping))
            .collect();
        for (slug, started, done_seen, stopping) in slugs {
            if stopping {
                continue;
            }
            let Ok(bottle) = self.home().bottle(&slug) else {
                continue;
            };
            let ops = bot_bottle_runtime::forge::forge_ops_log(&bottle);
            let last_call = std::fs::metadata(&ops).and_then(|m| m.modified()).ok();
            let last = last_call.map_or(started, |call| call.max(started));
            if let Some(call) = last_call.filter(|call| *call > started) {
                let at = rfc3339(call);
                if let Ok(record) = self.record_by_slug(&slug)
                    && record.last_checkin_at != at
                {
                    let _ = self.store().update(
                        &record.owner,
                        &record.repo,
                        record.issue_number,
                        &mut |s| s.last_checkin_at.clone_from(&at),
                    );
                }
            }
            let signalled = queue::pending(&bot_bottle_runtime::forge::queue_dir(&bottle))
                .unwrap_or_default()
                .iter()
                .any(|(_, e)| matches!(e.event, QueueEvent::SignalDone { .. }));
            let mut stop = false;
            if signalled {
                match done_seen {
                    None => {
                        if let Some(active) = self.active().get_mut(&slug) {
                            active.done_seen = Some(Instant::now());
                        }
                    }
                    Some(seen) if seen.elapsed() > DONE_GRACE => stop = true,
                    Some(_) => {}
                }
            }
            let silent = SystemTime::now().duration_since(last).unwrap_or_default();
            if !signalled && silent > self.inner.config.watchdog_timeout {
                tracing::warn!(slug = %slug, silent_secs = silent.as_secs(), "watchdog fired");
                eprintln!(
                    "bot-bottle: watchdog: run {slug} silent for {}s; freezing it",
                    silent.as_secs()
                );
                if let Some(active) = self.active().get(&slug) {
                    active.watchdog_fired.store(true, Ordering::SeqCst);
                }
                stop = true;
            }
            if stop {
                if let Some(active) = self.active().get_mut(&slug) {
                    active.stopping = true;
                }
                if let Err(err) = launch::stop(self.home(), &slug).await {
                    tracing::error!(slug = %slug, error = %err, "cannot stop the bottle");
                    if let Some(active) = self.active().get_mut(&slug) {
                        active.stopping = false;
                    }
                }
            }
        }
    }

    /// Runs [`Orchestrator::watch_once`] forever.
    pub async fn watch(&self) {
        loop {
            self.watch_once().await;
            tokio::time::sleep(WATCH_EVERY).await;
        }
    }

    /// Rebuilds the work after a start: a `running` run that nobody runs is stopped and
    /// resumed (or finished, when it had signalled done); a frozen run with events or a
    /// comment still to handle gets them handled.
    ///
    /// # Errors
    /// The store fails.
    pub async fn reconcile(&self) -> Result<Vec<String>, OrchestratorError> {
        let mut actions = Vec::new();
        for record in self.store().all()? {
            if self.active().contains_key(&record.slug) {
                continue;
            }
            let bottle = self
                .home()
                .bottle(&record.slug)
                .map_err(launch::RuntimeError::from)?;
            let queue_dir = bot_bottle_runtime::forge::queue_dir(&bottle);
            let events = queue::pending(&queue_dir).unwrap_or_default();
            let signalled = events
                .iter()
                .any(|(_, e)| matches!(e.event, QueueEvent::SignalDone { .. }));
            match record.status {
                ForgeStatus::Destroyed => {
                    // Destroying was under way when the last orchestrator stopped.
                    if let Some(why) = record
                        .note
                        .as_deref()
                        .and_then(|n| n.strip_prefix("destroying: "))
                    {
                        actions.push(format!("{}: finishing its destruction", record.slug));
                        self.destroy_run(&record, why).await?;
                    }
                }
                ForgeStatus::Running => {
                    // A session that never got its container (the launcher died while
                    // building the image, say) starts over; one that did is resumed.
                    let launched = bottle
                        .read_metadata()
                        .map_err(launch::RuntimeError::from)?
                        .is_some_and(|m| m.container_id.is_some() || m.frozen_image.is_some());
                    if !launched {
                        let issue = self
                            .forge(&record.owner, &record.repo)?
                            .read_issue(record.issue_number)
                            .await?;
                        actions.push(format!("{}: starting (it never ran)", record.slug));
                        self.spawn(
                            record.clone(),
                            Job::Start {
                                prompt: router::start_prompt(
                                    issue.number,
                                    &issue.title,
                                    &issue.body,
                                ),
                                trigger: trigger("issue"),
                            },
                        );
                        continue;
                    }
                    // Its launcher is gone, so its gateway is too: the bottle is stuck.
                    launch::stop_stranded(self.home(), &record.slug).await?;
                    if signalled {
                        actions.push(format!(
                            "{}: finishing (it had signalled done)",
                            record.slug
                        ));
                        self.spawn_finish(
                            record.clone(),
                            "the orchestrator restarted during the session",
                        );
                    } else {
                        actions.push(format!(
                            "{}: resuming (the orchestrator restarted)",
                            record.slug
                        ));
                        self.spawn(
                            record.clone(),
                            Job::Resume {
                                prompt: router::RESTART_PROMPT.to_owned(),
                                trigger: trigger("restart"),
                            },
                        );
                    }
                }
                ForgeStatus::Frozen => {
                    if signalled {
                        actions.push(format!("{}: handling its signal_done", record.slug));
                        self.spawn_finish(record.clone(), "handled after a restart");
                    } else if !events.is_empty() {
                        // Only pull requests to record: the run was already reported.
                        for (path, event) in &events {
                            if let QueueEvent::PrCreated { number } = event.event {
                                self.store().update(
                                    &record.owner,
                                    &record.repo,
                                    record.issue_number,
                                    &mut |s| {
                                        s.pr_number.get_or_insert(number);
                                    },
                                )?;
                            }
                            let _ = queue::ack(path);
                        }
                    } else if let Some(prompt) = record.pending_prompt.clone() {
                        actions.push(format!("{}: resuming with a waiting comment", record.slug));
                        self.store().update(
                            &record.owner,
                            &record.repo,
                            record.issue_number,
                            &mut |s| s.pending_prompt = None,
                        )?;
                        self.resume_or_queue(&record, prompt, trigger("comment"))?;
                    }
                }
            }
        }
        Ok(actions)
    }

    // ---- status --------------------------------------------------------------------

    /// Every run the store knows, for `orchestrate status`.
    ///
    /// # Errors
    /// The store fails.
    pub fn status(&self) -> Result<Vec<StatusRow>, OrchestratorError> {
        let web = self.inner.config.web_url();
        Ok(self
            .store()
            .all()?
            .into_iter()
            .map(|r| StatusRow {
                repo: format!("{}/{}", r.owner, r.repo),
                issue_url: format!("{web}/{}/{}/issues/{}", r.owner, r.repo, r.issue_number),
                pr_url: r
                    .pr_number
                    .map(|pr| format!("{web}/{}/{}/pulls/{pr}", r.owner, r.repo)),
                issue: r.issue_number,
                pr: r.pr_number,
                slug: r.slug,
                agent: r.agent_name,
                state: r.status,
                last_checkin: r.last_checkin_at,
                watchdog_fired: r.watchdog_fired,
                resume_rounds: r.resume_rounds,
                note: r.note,
            })
            .collect())
    }
}

fn current_pr(
    orchestrator: &Orchestrator,
    record: &ForgeState,
) -> Result<Option<u64>, OrchestratorError> {
    Ok(orchestrator
        .store()
        .get(&record.owner, &record.repo, record.issue_number)?
        .and_then(|r| r.pr_number))
}

/// A trigger with only its kind.
fn trigger(kind: &str) -> Trigger {
    Trigger {
        kind: kind.to_owned(),
        delivery_id: None,
        comment_id: None,
    }
}

fn status_word(status: DoneStatus) -> &'static str {
    match status {
        DoneStatus::Done => "done",
        DoneStatus::Blocked => "blocked",
        DoneStatus::NeedsInput => "needs_input",
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs.is_multiple_of(3600) {
        format!("{} h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// The PR comment that carries a session's signed provenance and how to check it.
#[must_use]
pub fn provenance_comment(slug: &str, envelope: &str) -> String {
    format!(
        "**bot-bottle** provenance of run `{slug}`: a DSSE envelope over an in-toto Statement (SLSA Provenance v1), signed with this host's ed25519 key.\n\n<details><summary>provenance.json</summary>\n\n```json\n{}\n```\n\n</details>\n\nVerify: save the JSON as `provenance.json`; on the orchestrator's host, `bot-bottle provenance export-key > host.pub` prints the key to pin; then run `bot-bottle provenance verify provenance.json --key host.pub`.",
        envelope.trim()
    )
}
