//! bot-bottle's public library API: run agents in sealed bottles from Rust, headless.
//!
//! These four functions are what an orchestrator needs, and what `bot-bottle start
//! --headless`, `resume --headless`, `freeze` and `destroy` call:
//!
//! ```no_run
//! # async fn run() -> Result<(), bot_bottle::BottleError> {
//! use bot_bottle::{destroy, freeze, resume_headless, start_headless, StartOptions};
//!
//! // Runs the agent `implementer` in its default bottle until it exits.
//! let slug = start_headless("implementer", StartOptions::new("Fix issue #42")).await?;
//! freeze(&slug, None).await?;
//! // Later: continue the same conversation with its files as they were.
//! resume_headless(&slug, "Address the review comments", None).await?;
//! destroy(&slug, None).await?;
//! # Ok(())
//! # }
//! ```
//!
//! They read their settings from the environment (`BOT_BOTTLE_HOME`, `BOT_BOTTLE_SHIM`,
//! the gateway switches). A caller that runs several homes, or must not depend on its
//! environment, uses a [`Client`] with the same four methods:
//!
//! ```no_run
//! # async fn run() -> Result<(), bot_bottle::BottleError> {
//! use bot_bottle::{Client, StartOptions};
//!
//! let client = Client::new("/srv/bot-bottle", "/usr/local/bin/bot-bottle");
//! let slug = client
//!     .start_headless("implementer", StartOptions::new("Fix issue #42"))
//!     .await?;
//! client.destroy(&slug, None).await?;
//! # Ok(())
//! # }
//! ```
//!
//! A nonzero agent exit is an error whose [`BottleError::exit_code`] is the agent's own
//! code (and whose [`BottleError::slug`] names the bottle, which is kept); bot-bottle's
//! own failures use the codes in [`exit_codes`].

use std::path::PathBuf;

use bot_bottle_core::plan::BottleSpec;
use bot_bottle_core::state::Home;
use bot_bottle_runtime::launch::{self, LaunchOptions, RuntimeError};
use bot_bottle_runtime::progress::Progress;

pub use bot_bottle_runtime::forge::{DEFAULT_BRANCH_PREFIX, ForgeRun};
pub use bot_bottle_runtime::launch::{GatewaySettings, TripwireMode, exit_codes};

/// A failed bottle operation.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BottleError {
    message: String,
    exit_code: i32,
    slug: Option<String>,
    // Boxed: a runtime error is large, and every `Result` of this API carries the space.
    #[source]
    source: Option<Box<RuntimeError>>,
}

impl BottleError {
    /// The agent's exit code when the agent exited nonzero; otherwise one of
    /// [`exit_codes`].
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        self.exit_code
    }

    /// The bottle the agent ran in, when the agent itself exited nonzero: the bottle is
    /// kept, so it can be inspected, resumed or destroyed.
    #[must_use]
    pub fn slug(&self) -> Option<&str> {
        self.slug.as_deref()
    }

    /// The underlying runtime error, if the failure was bot-bottle's own.
    #[must_use]
    pub fn runtime_error(&self) -> Option<&RuntimeError> {
        self.source.as_deref()
    }

    fn agent_exit(slug: &str, code: i32, resuming: bool) -> Self {
        let message = if resuming {
            format!("agent exited {code} resuming `{slug}`")
        } else {
            format!("agent exited {code} (slug `{slug}`)")
        };
        Self {
            message,
            exit_code: code,
            slug: Some(slug.to_owned()),
            source: None,
        }
    }
}

impl From<RuntimeError> for BottleError {
    fn from(err: RuntimeError) -> Self {
        Self {
            message: err.to_string(),
            exit_code: err.exit_code(),
            slug: None,
            source: Some(Box::new(err)),
        }
    }
}

/// Options of [`start_headless`]. Only the prompt is required.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub prompt: String,
    /// Bottles in composition order; empty means the agent's default bottle.
    pub bottles: Vec<String>,
    /// Defaults to the agent name; a label in use by a running bottle gets `-2`, `-3`, ….
    pub label: Option<String>,
    pub color: Option<String>,
    pub backend: Option<String>,
    /// Copy the working directory into the bottle instead of bind-mounting it.
    pub copy_cwd: bool,
    /// Where manifests are looked up and the workspace is taken from; defaults to the
    /// current directory.
    pub cwd: Option<PathBuf>,
    /// No progress lines on stderr (also [`Client::quiet`]).
    pub quiet: bool,
    /// A forge run (the seed's `forge_env`): the forge client and token source reach the
    /// host-side sidecar and the gateway only, never the agent.
    pub forge: Option<ForgeRun>,
}

/// Options of [`Client::resume_headless_with`].
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    pub prompt: String,
    /// Defaults to the backend in the bottle's metadata.
    pub backend: Option<String>,
    /// The forge context again (a resumed forge run gets its sidecar back).
    pub forge: Option<ForgeRun>,
}

impl StartOptions {
    #[must_use]
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            ..Self::default()
        }
    }
}

/// Where bottles live and what runs inside them, for callers that pass settings
/// explicitly instead of through the environment. The free functions ([`start_headless`]
/// and the others) are [`Client::from_env`] followed by the method of the same name.
#[derive(Debug, Clone)]
pub struct Client {
    home: Home,
    shim: PathBuf,
    gateway: GatewaySettings,
    quiet: bool,
    trust_project_manifests: bool,
}

impl Client {
    /// A client for the bot-bottle home `home` (manifests, CA, keys, per-bottle state)
    /// that mounts the static `bot-bottle` binary at `shim` into bottles as their PID 1.
    /// The gateway runs with default settings; see [`Client::with_gateway`].
    #[must_use]
    pub fn new(home: impl Into<PathBuf>, shim: impl Into<PathBuf>) -> Self {
        Self {
            home: Home::new(home),
            shim: shim.into(),
            gateway: GatewaySettings::default(),
            quiet: false,
            trust_project_manifests: false,
        }
    }

    /// The settings the `bot-bottle` binary uses: `BOT_BOTTLE_HOME` (default
    /// `~/.bot-bottle`), the shim from `BOT_BOTTLE_SHIM`, this executable or `PATH`, and
    /// the gateway switches (`BOT_BOTTLE_UPSTREAM_OVERRIDES`, `BOT_BOTTLE_LOOPBACK_ONLY`,
    /// `BOT_BOTTLE_UPSTREAM_CA`).
    ///
    /// # Errors
    /// No home directory, no shim binary found, or malformed gateway settings.
    pub fn from_env() -> Result<Self, BottleError> {
        Ok(Self {
            home: Home::from_env().map_err(RuntimeError::from)?,
            shim: shim_binary()?,
            gateway: GatewaySettings::from_env()?,
            quiet: false,
            trust_project_manifests: launch::trust_project_manifests_from_env(),
        })
    }

    /// Replaces the gateway's test and operator switches (upstream overrides, the
    /// loopback-only guard, extra upstream roots).
    #[must_use]
    pub fn with_gateway(mut self, gateway: GatewaySettings) -> Self {
        self.gateway = gateway;
        self
    }

    /// Use project manifests without checking that the user trusted them as they are
    /// (`bot-bottle trust`). Off by default: a project's manifests decide egress, mounts
    /// and credential commands that run on this host, and a working tree can change them.
    #[must_use]
    pub fn trust_project_manifests(mut self, trust: bool) -> Self {
        self.trust_project_manifests = trust;
        self
    }

    /// No progress lines on stderr.
    #[must_use]
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    fn launch_options(&self, quiet: bool, forge: Option<ForgeRun>) -> LaunchOptions {
        LaunchOptions {
            home: self.home.clone(),
            progress: Progress::new(self.quiet || quiet),
            shim_binary: self.shim.clone(),
            gateway: self.gateway.clone(),
            confirm: None,
            agent_stdout_to_stderr: false,
            remove_after: false,
            trust_project_manifests: self.trust_project_manifests,
            forge,
        }
    }

    /// The backend to use for an existing bottle: `explicit`, else the one in its
    /// metadata. Checked before anything happens to the bottle. `None` when the bottle
    /// has no state (the operation reports that itself).
    fn backend_for(
        &self,
        slug: &str,
        explicit: Option<&str>,
    ) -> Result<Option<String>, BottleError> {
        let recorded = self
            .home
            .bottle(slug)
            .and_then(|bottle| bottle.read_metadata())
            .map_err(RuntimeError::from)?
            .map(|metadata| metadata.backend);
        let backend = explicit.map(str::to_owned).or(recorded);
        if let Some(backend) = &backend {
            check_backend(backend)?;
        }
        Ok(backend)
    }

    /// See [`start_headless`].
    ///
    /// # Errors
    /// As [`start_headless`].
    pub async fn start_headless(
        &self,
        agent: &str,
        options: StartOptions,
    ) -> Result<String, BottleError> {
        let launch_options = self.launch_options(options.quiet, options.forge.clone());
        let label = options.label.clone().unwrap_or_else(|| agent.to_owned());
        let label = launch::unique_label(&self.home, &label, &launch_options.progress)?;
        let cwd = match options.cwd {
            Some(cwd) => cwd,
            None => std::env::current_dir().map_err(|source| RuntimeError::Io {
                path: PathBuf::from("."),
                source,
            })?,
        };
        let spec = BottleSpec {
            agent: agent.to_owned(),
            bottles: options.bottles,
            label: Some(label),
            color: options.color,
            prompt: Some(options.prompt),
            cwd,
            copy_cwd: options.copy_cwd,
            backend: options.backend,
            identity: None,
            resume_image: None,
        };
        let outcome = launch::launch(&spec, &launch_options).await?;
        if outcome.exit_code != 0 {
            return Err(BottleError::agent_exit(
                &outcome.slug,
                outcome.exit_code,
                false,
            ));
        }
        Ok(outcome.slug)
    }

    /// See [`resume_headless`].
    ///
    /// # Errors
    /// As [`resume_headless`].
    pub async fn resume_headless(
        &self,
        slug: &str,
        prompt: &str,
        backend: Option<&str>,
    ) -> Result<(), BottleError> {
        self.resume_headless_with(
            slug,
            ResumeOptions {
                prompt: prompt.to_owned(),
                backend: backend.map(str::to_owned),
                forge: None,
            },
        )
        .await
    }

    /// [`resume_headless`] with every option, the forge context included.
    ///
    /// # Errors
    /// As [`resume_headless`].
    pub async fn resume_headless_with(
        &self,
        slug: &str,
        options: ResumeOptions,
    ) -> Result<(), BottleError> {
        let backend = self.backend_for(slug, options.backend.as_deref())?;
        let outcome = launch::resume(
            slug,
            Some(options.prompt),
            backend,
            &self.launch_options(false, options.forge),
        )
        .await?;
        if outcome.exit_code != 0 {
            return Err(BottleError::agent_exit(slug, outcome.exit_code, true));
        }
        Ok(())
    }

    /// See [`freeze`].
    ///
    /// # Errors
    /// As [`freeze`].
    pub async fn freeze(&self, slug: &str, backend: Option<&str>) -> Result<(), BottleError> {
        self.backend_for(slug, backend)?;
        launch::freeze(&self.home, slug, &Progress::new(self.quiet)).await?;
        Ok(())
    }

    /// See [`destroy`].
    ///
    /// # Errors
    /// As [`destroy`].
    pub async fn destroy(&self, slug: &str, backend: Option<&str>) -> Result<(), BottleError> {
        self.backend_for(slug, backend)?;
        launch::destroy(&self.home, slug, &Progress::new(self.quiet)).await?;
        Ok(())
    }
}

/// The options every launch of the `bot-bottle` binary shares: this binary as the
/// shim, gateway settings from the environment.
pub fn launch_options(home: Home, quiet: bool) -> Result<LaunchOptions, BottleError> {
    Ok(LaunchOptions {
        home,
        progress: Progress::new(quiet),
        shim_binary: shim_binary()?,
        gateway: GatewaySettings::from_env()?,
        confirm: None,
        agent_stdout_to_stderr: false,
        remove_after: false,
        trust_project_manifests: launch::trust_project_manifests_from_env(),
        forge: None,
    })
}

/// The static binary mounted into bottles. `BOT_BOTTLE_SHIM` overrides it (a library
/// caller's own executable is not bot-bottle).
pub fn shim_binary() -> Result<PathBuf, BottleError> {
    if let Some(path) = std::env::var_os("BOT_BOTTLE_SHIM") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|source| RuntimeError::Io {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let is_bot_bottle = exe
        .file_name()
        .is_some_and(|name| name.to_string_lossy().starts_with("bot-bottle"));
    if is_bot_bottle {
        return Ok(exe);
    }
    // A library caller: look for `bot-bottle` on PATH.
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("bot-bottle"))
                .find(|candidate| candidate.is_file())
        })
        .ok_or_else(|| BottleError {
            message: "cannot find the `bot-bottle` binary to use as the in-bottle shim\nhint: put `bot-bottle` on PATH, set `BOT_BOTTLE_SHIM` to its path, or use `Client::new`".to_owned(),
            exit_code: exit_codes::CONFIG,
            slug: None,
            source: None,
        })
}

/// Launches a new bottle for `agent` headlessly and runs the agent to completion.
/// Returns the bottle's slug, for [`freeze`], [`resume_headless`] and [`destroy`].
///
/// # Errors
/// Configuration errors (unknown agent, no default bottle, bad manifest, unknown
/// backend), backend errors, and a nonzero agent exit (with the agent's code; the
/// bottle is kept).
pub async fn start_headless(agent: &str, options: StartOptions) -> Result<String, BottleError> {
    Client::from_env()?.start_headless(agent, options).await
}

/// Resumes a frozen (or stopped) bottle with a new prompt and runs the agent to
/// completion. The backend is the one in the bottle's metadata unless `backend` is
/// given.
///
/// # Errors
/// No state for `slug` ([`exit_codes::STATE`]), an unknown backend, backend errors, and
/// a nonzero agent exit.
pub async fn resume_headless(
    slug: &str,
    prompt: &str,
    backend: Option<&str>,
) -> Result<(), BottleError> {
    Client::from_env()?
        .resume_headless(slug, prompt, backend)
        .await
}

/// Freezes a bottle so that [`resume_headless`] continues from its files and the
/// agent's session. The backend comes from the bottle's metadata unless given.
///
/// # Errors
/// No state for `slug`, nothing to freeze, an unknown backend, or a backend error.
pub async fn freeze(slug: &str, backend: Option<&str>) -> Result<(), BottleError> {
    Client::from_env()?.freeze(slug, backend).await
}

/// Destroys a bottle: its container, frozen images and state. Idempotent: a slug with
/// nothing left is not an error.
///
/// # Errors
/// An unknown backend, or a backend error.
pub async fn destroy(slug: &str, backend: Option<&str>) -> Result<(), BottleError> {
    Client::from_env()?.destroy(slug, backend).await
}

fn check_backend(backend: &str) -> Result<(), BottleError> {
    if bot_bottle_core::plan::BACKENDS.contains(&backend) {
        Ok(())
    } else {
        Err(
            RuntimeError::from(bot_bottle_core::plan::PlanError::UnknownBackend {
                backend: backend.to_owned(),
            })
            .into(),
        )
    }
}
