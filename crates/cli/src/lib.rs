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
//! A nonzero agent exit is an error whose [`BottleError::exit_code`] is the agent's own
//! code; bot-bottle's own failures use the codes in [`exit_codes`].

use std::path::PathBuf;

use bot_bottle_core::plan::BottleSpec;
use bot_bottle_core::state::Home;
use bot_bottle_runtime::launch::{self, GatewaySettings, LaunchOptions, RuntimeError};
use bot_bottle_runtime::progress::Progress;

pub use bot_bottle_runtime::launch::exit_codes;

/// A failed bottle operation.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BottleError {
    message: String,
    exit_code: i32,
    #[source]
    source: Option<RuntimeError>,
}

impl BottleError {
    /// The agent's exit code when the agent exited nonzero; otherwise one of
    /// [`exit_codes`].
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        self.exit_code
    }

    /// The underlying runtime error, if the failure was bot-bottle's own.
    #[must_use]
    pub fn runtime_error(&self) -> Option<&RuntimeError> {
        self.source.as_ref()
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
            source: None,
        }
    }
}

impl From<RuntimeError> for BottleError {
    fn from(err: RuntimeError) -> Self {
        Self {
            message: err.to_string(),
            exit_code: err.exit_code(),
            source: Some(err),
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
    /// No progress lines on stderr.
    pub quiet: bool,
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

fn home() -> Result<Home, BottleError> {
    Home::from_env().map_err(|err| RuntimeError::from(err).into())
}

/// The options every launch shares: this binary as the shim, gateway settings from
/// the environment.
pub fn launch_options(home: Home, quiet: bool) -> Result<LaunchOptions, BottleError> {
    Ok(LaunchOptions {
        home,
        progress: Progress::new(quiet),
        shim_binary: shim_binary()?,
        gateway: GatewaySettings::from_env()?,
        confirm: None,
        agent_stdout_to_stderr: false,
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
            message: "cannot find the `bot-bottle` binary to use as the in-bottle shim\nhint: put `bot-bottle` on PATH, or set `BOT_BOTTLE_SHIM` to its path".to_owned(),
            exit_code: exit_codes::CONFIG,
            source: None,
        })
}

/// Launches a new bottle for `agent` headlessly and runs the agent to completion.
/// Returns the bottle's slug, for [`freeze`], [`resume_headless`] and [`destroy`].
///
/// # Errors
/// Configuration errors (unknown agent, no default bottle, bad manifest), backend
/// errors, and a nonzero agent exit (with the agent's code).
pub async fn start_headless(agent: &str, options: StartOptions) -> Result<String, BottleError> {
    let home = home()?;
    let launch_options = launch_options(home.clone(), options.quiet)?;
    let label = options.label.clone().unwrap_or_else(|| agent.to_owned());
    let label = launch::unique_label(&home, &label, &launch_options.progress)?;
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

/// Resumes a frozen (or stopped) bottle with a new prompt and runs the agent to
/// completion. The backend is the one in the bottle's metadata unless `backend` is
/// given.
///
/// # Errors
/// No state for `slug`, backend errors, and a nonzero agent exit.
pub async fn resume_headless(
    slug: &str,
    prompt: &str,
    backend: Option<&str>,
) -> Result<(), BottleError> {
    let launch_options = launch_options(home()?, false)?;
    let outcome = launch::resume(
        slug,
        Some(prompt.to_owned()),
        backend.map(str::to_owned),
        &launch_options,
    )
    .await?;
    if outcome.exit_code != 0 {
        return Err(BottleError::agent_exit(slug, outcome.exit_code, true));
    }
    Ok(())
}

/// Freezes a bottle so that [`resume_headless`] continues from its files and the
/// agent's session. The backend comes from the bottle's metadata unless given.
///
/// # Errors
/// No state for `slug`, nothing to freeze, or a backend error.
pub async fn freeze(slug: &str, backend: Option<&str>) -> Result<(), BottleError> {
    check_backend(backend)?;
    launch::freeze(&home()?, slug, &Progress::new(false)).await?;
    Ok(())
}

/// Destroys a bottle: its container, frozen images and state. Idempotent: a slug with
/// nothing left is not an error.
///
/// # Errors
/// A backend error.
pub async fn destroy(slug: &str, backend: Option<&str>) -> Result<(), BottleError> {
    check_backend(backend)?;
    launch::destroy(&home()?, slug, &Progress::new(false)).await?;
    Ok(())
}

fn check_backend(backend: Option<&str>) -> Result<(), BottleError> {
    match backend {
        None | Some("docker") => Ok(()),
        Some(other) => Err(
            RuntimeError::from(bot_bottle_core::plan::PlanError::UnknownBackend {
                backend: other.to_owned(),
            })
            .into(),
        ),
    }
}
