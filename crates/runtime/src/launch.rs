//! The launch core: prepare → preflight → launch → attach → capture → teardown, and
//! the lifecycle operations on a bottle afterwards (freeze, resume, destroy, ps).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bot_bottle_core::manifest::{Catalog, ManifestError, OnAlert, Origin};
use bot_bottle_core::plan::{
    BottlePlan, BottleSpec, GATEWAY_SOCKET, HostFacts, PlanError, Workspace, plan,
};
use bot_bottle_core::provider::{AGENT_HOME, BOTTLE_CA_PATH, SYSTEM_CA_BUNDLE, WORKSPACE};
use bot_bottle_core::slug::{new_identity, slugify, uniquify_label};
use bot_bottle_core::state::{BottleDir, Home, Metadata, StateError, Status};
use bot_bottle_core::trust::{ProjectManifests, TrustStore, project_manifests};
use serde::Serialize;
use time::OffsetDateTime;

use crate::container::{
    ConfigError, HostPaths, KIND_TRIPWIRE, Network, TRUST_BUNDLE_FILE, TRUST_CA_FILE,
    container_config, tripwire_config,
};
use crate::docker::{Archive, DockerEngine, DockerError};
use crate::images::ensure_bottle_image;
use crate::progress::Progress;

/// Exit codes of bot-bottle's own failures. The agent's own exit code passes through
/// unchanged, so these sit in a range agents rarely use; `--json` output tells the two
/// apart for machines.
pub mod exit_codes {
    /// Bad flags or arguments.
    pub const USAGE: i32 = 2;
    /// A manifest, plan or policy error: fix the input.
    pub const CONFIG: i32 = 78;
    /// The container backend is unreachable or failed.
    pub const BACKEND: i32 = 69;
    /// An image build failed.
    pub const BUILD: i32 = 73;
    /// Unknown slug, missing or unreadable state.
    pub const STATE: i32 = 66;
    /// The egress gateway failed; the bottle was stopped (fail closed).
    pub const GATEWAY: i32 = 76;
    /// The user declined the preflight.
    pub const DECLINED: i32 = 75;
    /// The gateway raised an alert and the bottle (`on_alert: freeze`) was stopped and
    /// frozen.
    pub const ALERT: i32 = 77;
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "egress gateway failed to start: {message}\nhint: check the bottle's egress policy; a bottle never runs without its gateway"
    )]
    Gateway { message: String },
    /// The gateway raised an alert and the bottle was frozen (`on_alert: freeze`).
    #[error(
        "alert in `{slug}`: {alert}; the agent was stopped and the bottle frozen (on_alert: freeze)\nhint: inspect it with `bot-bottle audit {slug}`; `bot-bottle resume {slug}` continues it, `bot-bottle destroy {slug}` removes it"
    )]
    Alerted { slug: String, alert: String },
    /// The gateway stopped doing its job during a session; the bottle was stopped.
    #[error("the egress gateway failed during the session, so the bottle was stopped: {message}")]
    GatewayFailed { message: String },
    #[error(
        "no state recorded for `{slug}`\nhint: run `bot-bottle ps` to list bottles, or `bot-bottle start` to create one"
    )]
    UnknownSlug { slug: String },
    #[error(
        "bottle `{slug}` has no container or frozen image to {action}\nhint: it may have been destroyed; run `bot-bottle ps`"
    )]
    NothingToResume { slug: String, action: String },
    #[error(
        "the workspace `{path}` is not writable by the bottle's user (uid {uid})\nhint: pass `--cwd` to copy the workspace into the bottle instead, or make the directory writable by uid {uid}"
    )]
    WorkspaceNotWritable { path: PathBuf, uid: u32 },
    #[error(
        "the tripwire did not come up: {message}\nhint: it needs `/dev/net/tun` on the Docker host; `BOT_BOTTLE_TRIPWIRE=off` runs bottles without it (direct attempts still fail, but are not audited)"
    )]
    Tripwire { message: String },
    #[error(
        "the forge sidecar failed to start: {message}\nhint: a forge run never starts without its sidecar; check that the state directory is writable"
    )]
    Sidecar { message: String },
    /// The forge sidecar stopped doing its job during a session; the bottle was stopped.
    #[error("the forge sidecar failed during the session, so the bottle was stopped: {message}")]
    SidecarFailed { message: String },
    #[error(
        "the project manifests in `{root}` are not trusted as they are (new, or changed since they were trusted)\nhint: they decide the bottle's egress, mounts and credentials, whose `command` sources run on this host; read them, then run `bot-bottle trust` in that project (or start it interactively and answer y)"
    )]
    UntrustedManifests { root: PathBuf },
    #[error("launch cancelled")]
    Declined,
    #[error("{message}")]
    Policy { message: String },
    #[error(
        "interrupted by {signal}; bottle `{slug}` was stopped, its state and audit log kept\nhint: `bot-bottle resume {slug}` continues it, `bot-bottle destroy {slug}` removes it"
    )]
    Interrupted { signal: String, slug: String },
    #[error("cannot access `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RuntimeError {
    /// The documented exit code for this failure.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Manifest(_)
            | Self::Plan(_)
            | Self::Policy { .. }
            | Self::Config(_)
            | Self::WorkspaceNotWritable { .. }
            | Self::UntrustedManifests { .. } => exit_codes::CONFIG,
            Self::State(_) | Self::UnknownSlug { .. } | Self::NothingToResume { .. } => {
                exit_codes::STATE
            }
            Self::Docker(
                DockerError::Build { .. }
                | DockerError::Mmdebstrap { .. }
                | DockerError::NoMmdebstrap,
            ) => exit_codes::BUILD,
            Self::Docker(_) | Self::Io { .. } | Self::Tripwire { .. } => exit_codes::BACKEND,
            Self::Gateway { .. }
            | Self::GatewayFailed { .. }
            | Self::Sidecar { .. }
            | Self::SidecarFailed { .. } => exit_codes::GATEWAY,
            Self::Declined => exit_codes::DECLINED,
            Self::Alerted { .. } => exit_codes::ALERT,
            // The shell convention for "killed by a signal": 128 + SIGTERM.
            Self::Interrupted { .. } => 143,
        }
    }
}

/// Test and operator switches of the gateway. Every test turns both on, so a mistake
/// fails the test instead of reaching the internet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewaySettings {
    /// host → loopback address (`BOT_BOTTLE_UPSTREAM_OVERRIDES=host=127.0.0.1:port,…`).
    pub upstream_overrides: HashMap<String, SocketAddr>,
    /// Refuse every upstream that is not loopback (`BOT_BOTTLE_LOOPBACK_ONLY=1`).
    pub loopback_only: bool,
    /// Extra PEM roots the gateway trusts upstream (`BOT_BOTTLE_UPSTREAM_CA=path`).
    pub upstream_ca: Option<PathBuf>,
    /// Whether direct attempts are caught and audited (`BOT_BOTTLE_TRIPWIRE=off`).
    pub tripwire: TripwireMode,
}

/// The tripwire (see `tripwire.rs`) is on unless turned off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TripwireMode {
    #[default]
    On,
    /// The bottle gets a namespace of its own with loopback only: direct attempts still
    /// fail, in its kernel, and are not audited.
    Off,
}

impl GatewaySettings {
    /// Reads the settings from the environment.
    pub fn from_env() -> Result<Self, RuntimeError> {
        let mut settings = Self::default();
        if let Ok(text) = std::env::var("BOT_BOTTLE_UPSTREAM_OVERRIDES") {
            settings.upstream_overrides =
                parse_overrides(&text).map_err(|message| RuntimeError::Gateway { message })?;
        }
        settings.loopback_only =
            std::env::var("BOT_BOTTLE_LOOPBACK_ONLY").is_ok_and(|v| v == "1" || v == "true");
        settings.upstream_ca = std::env::var_os("BOT_BOTTLE_UPSTREAM_CA").map(PathBuf::from);
        settings.tripwire = match std::env::var("BOT_BOTTLE_TRIPWIRE").as_deref() {
            Err(_) | Ok("" | "on" | "1" | "true") => TripwireMode::On,
            Ok("off" | "0" | "false") => TripwireMode::Off,
            Ok(other) => {
                return Err(RuntimeError::Policy {
                    message: format!(
                        "`BOT_BOTTLE_TRIPWIRE={other}` is not `on` or `off`\nhint: unset it (the tripwire is on by default) or set it to `off`"
                    ),
                });
            }
        };
        Ok(settings)
    }
}

/// Parses `host=127.0.0.1:port,host2=[::1]:port`.
pub fn parse_overrides(text: &str) -> Result<HashMap<String, SocketAddr>, String> {
    let mut map = HashMap::new();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let (host, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("upstream override `{item}` is not HOST=ADDR:PORT"))?;
        let addr: SocketAddr = addr.parse().map_err(|_| {
            format!("upstream override `{item}`: `{addr}` is not an address with a port")
        })?;
        map.insert(host.to_ascii_lowercase(), addr);
    }
    Ok(map)
}

/// Asked with the rendered plan before launching; returns whether to go on.
pub type Confirm = Box<dyn Fn(&BottlePlan) -> bool + Send + Sync>;

/// How to launch.
pub struct LaunchOptions {
    pub home: Home,
    pub progress: Progress,
    /// The static bot-bottle binary mounted into the bottle as its shim.
    pub shim_binary: PathBuf,
    pub gateway: GatewaySettings,
    /// Asked with the rendered plan before launching; `None` launches without asking
    /// (headless). Returns whether to go on.
    pub confirm: Option<Confirm>,
    /// Send the agent's stdout to this process's stderr, keeping stdout for `--json`.
    pub agent_stdout_to_stderr: bool,
    /// Remove the bottle after its session (container, state; the audit log is archived)
    /// instead of keeping it for `freeze`/`resume`.
    pub remove_after: bool,
    /// Use project manifests without checking the trust store
    /// (`BOT_BOTTLE_TRUST_PROJECT_MANIFESTS=1`: CI and hosts whose repositories are
    /// trusted by other means).
    pub trust_project_manifests: bool,
    /// A forge run: the session gets the forge sidecar, git access to the run's
    /// branch, and the forge instructions (see `crate::forge`).
    pub forge: Option<crate::forge::ForgeRun>,
}

/// `BOT_BOTTLE_TRUST_PROJECT_MANIFESTS=1`.
#[must_use]
pub fn trust_project_manifests_from_env() -> bool {
    std::env::var("BOT_BOTTLE_TRUST_PROJECT_MANIFESTS").is_ok_and(|v| v == "1" || v == "true")
}

/// The result of one agent session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionOutcome {
    pub slug: String,
    pub exit_code: i32,
    pub audit_log: PathBuf,
    /// The log's head after this session: keep it elsewhere, and `bot-bottle audit
    /// verify --expect SEQ:HASH` shows later whether lines were cut from the end.
    pub audit_head: Option<bot_bottle_egress::audit::AuditHead>,
    /// The session's signed provenance (`state/<slug>/provenance.json`, or beside the
    /// archived audit log after `--rm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provenance: Option<PathBuf>,
    /// Why no provenance was written, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provenance_error: Option<String>,
}

/// The agent uid: the host user's, so bind-mounted files keep their owner; 1000 when
/// the host user is root, because the agent never runs as root.
#[must_use]
pub fn agent_uid_for_host() -> u32 {
    match nix::unistd::getuid().as_raw() {
        0 => 1000,
        uid => uid,
    }
}

/// The manifests a bottle was started with, copied into its state: `resume` reads these,
/// not the workspace, because the agent can write the workspace (and with it any
/// `.bot-bottle/` there) and must not widen its own policy for the next session.
fn manifest_snapshot(bottle: &BottleDir) -> PathBuf {
    bottle.path().join("manifests")
}

/// The manifests a launch resolves against: a resumed bottle's own snapshot when it has
/// one, else the nearest `.bot-bottle/` and `$BOT_BOTTLE_HOME`.
fn load_catalog(spec: &BottleSpec, home: &Home) -> Result<Catalog, RuntimeError> {
    if let Some(slug) = &spec.identity {
        let snapshot = manifest_snapshot(&home.bottle(slug)?);
        if snapshot.is_dir() {
            return Ok(Catalog::from_roots(vec![(snapshot, Origin::Project)])?);
        }
    }
    Ok(Catalog::resolve(&spec.cwd, home.root())?)
}

/// Loads the manifests and resolves the plan (pure apart from reading files).
/// `check_trust` marks the plan when its project manifests are not trusted as they are.
pub fn make_plan(
    spec: &BottleSpec,
    home: &Home,
    tripwire: TripwireMode,
    check_trust: bool,
) -> Result<BottlePlan, RuntimeError> {
    let catalog = load_catalog(spec, home)?;
    let mut plan = plan_with(spec, &catalog, tripwire)?;
    if check_trust {
        untrusted_manifests(spec, &catalog, home, &mut plan)?;
    }
    Ok(plan)
}

/// Marks the plan when the project manifests it came from are not trusted as they are,
/// and returns them (to trust once the user agrees). A resumed bottle runs on the
/// manifests snapshotted when it started, which were decided on then.
fn untrusted_manifests(
    spec: &BottleSpec,
    catalog: &Catalog,
    home: &Home,
    plan: &mut BottlePlan,
) -> Result<Option<ProjectManifests>, RuntimeError> {
    if spec.identity.is_some() {
        return Ok(None);
    }
    let Some(project) = project_manifests(catalog)? else {
        return Ok(None);
    };
    if TrustStore::new(home).is_trusted(&project)? {
        return Ok(None);
    }
    plan.untrusted_manifests = Some(project.root.clone());
    Ok(Some(project))
}

/// Trusts the project manifests of the working directory `cwd` as they are now
/// (`bot-bottle trust`); returns them, or `None` when there are none.
///
/// # Errors
/// The manifests do not parse, or the store cannot be written.
pub fn trust_manifests(
    cwd: &Path,
    home: &Home,
) -> Result<Option<(ProjectManifests, Vec<String>)>, RuntimeError> {
    let catalog = Catalog::resolve(cwd, home.root())?;
    let Some(project) = project_manifests(&catalog)? else {
        return Ok(None);
    };
    TrustStore::new(home).trust(&project)?;
    Ok(Some((project, trust_summary(&catalog))))
}

/// What trusting a project's manifests allows, one line per bottle: what it can reach,
/// which host secrets it reads (and how), and which host paths it mounts.
fn trust_summary(catalog: &Catalog) -> Vec<String> {
    use bot_bottle_core::credential::CredentialSource;
    let mut lines = Vec::new();
    for (name, (bottle, origin)) in &catalog.bottles {
        if *origin != Origin::Project {
            continue;
        }
        let hosts: Vec<&str> = bottle
            .front
            .egress
            .rules
            .iter()
            .map(|rule| rule.host.as_str())
            .collect();
        let mut line = format!(
            "bottle {name}: egress to {}",
            if hosts.is_empty() {
                "nothing".to_owned()
            } else {
                hosts.join(", ")
            }
        );
        for credential in &bottle.front.credentials {
            let source = match &credential.source {
                CredentialSource::Env(var) => format!("env {var}"),
                CredentialSource::File(path) => format!("file {}", path.display()),
                CredentialSource::Command(command) => {
                    format!("RUNS ON THIS HOST: {command}")
                }
            };
            line.push_str(&format!(
                "; credential {} ({source}) for {}",
                credential.name,
                credential.hosts.join(", ")
            ));
        }
        for mount in &bottle.front.mounts {
            line.push_str(&format!(
                "; mounts {} ({})",
                mount.source.display(),
                if mount.readonly {
                    "read-only"
                } else {
                    "read-write"
                }
            ));
        }
        lines.push(line);
    }
    lines
}

fn plan_with(
    spec: &BottleSpec,
    catalog: &Catalog,
    tripwire: TripwireMode,
) -> Result<BottlePlan, RuntimeError> {
    let manifests = spec.cwd.join(".bot-bottle");
    let mut host = HostFacts {
        agent_uid: agent_uid_for_host(),
        default_backend: "docker".to_owned(),
        workspace_manifests: manifests.is_dir().then_some(manifests),
        tripwire_off: tripwire == TripwireMode::Off,
        ..HostFacts::default()
    };
    for (bottle, _) in catalog.bottles.values() {
        if let Some(path) = &bottle.front.image.dockerfile {
            let text = match fs_err::read_to_string(path) {
                Ok(text) => text,
                // A resumed bottle runs its frozen image; its Dockerfile only names the
                // original image, and a snapshot does not carry it.
                Err(_) if spec.resume_image.is_some() => String::new(),
                Err(source) => {
                    return Err(RuntimeError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            };
            host.dockerfiles.insert(path.clone(), text);
        }
    }
    Ok(plan(spec, catalog, &host)?)
}

/// Copies the manifests this plan used into the bottle's state (see
/// [`manifest_snapshot`]).
fn snapshot_manifests(
    bottle: &BottleDir,
    catalog: &Catalog,
    plan: &BottlePlan,
) -> Result<(), RuntimeError> {
    let root = manifest_snapshot(bottle);
    let mut sources = Vec::new();
    sources.push(("agents", catalog.agent(&plan.agent)?.source.clone()));
    for name in &plan.bottles {
        sources.push(("bottles", catalog.bottle(name, None)?.source.clone()));
    }
    for (kind, source) in sources {
        let dir = root.join(kind);
        fs_err::create_dir_all(&dir).map_err(|source| RuntimeError::Io {
            path: dir.clone(),
            source,
        })?;
        let text = fs_err::read(&source).map_err(|err| RuntimeError::Io {
            path: source.clone(),
            source: err,
        })?;
        let name = source.file_name().unwrap_or_default();
        bot_bottle_core::state::write_atomic(&dir.join(name), &text, 0o600)?;
    }
    Ok(())
}

/// The label slugs of bottles that are running now (for headless label uniquifying).
pub fn active_label_slugs(home: &Home) -> Result<Vec<String>, RuntimeError> {
    Ok(home
        .list()?
        .into_iter()
        .filter(|m| m.status == Status::Running)
        .map(|m| m.label_slug)
        .collect())
}

/// Picks a free label for a headless launch; says so when it changed.
pub fn unique_label(home: &Home, label: &str, progress: &Progress) -> Result<String, RuntimeError> {
    let (chosen, changed) = uniquify_label(label, &active_label_slugs(home)?);
    if changed {
        progress.step(&format!(
            "label `{label}` is in use by a running bottle; using `{chosen}`"
        ));
    }
    Ok(chosen)
}

fn container_name(slug: &str) -> String {
    format!("bot-bottle-{slug}")
}

fn check_workspace_writable(plan: &BottlePlan) -> Result<(), RuntimeError> {
    let Workspace::Bind { host } = &plan.workspace else {
        return Ok(());
    };
    use std::os::unix::fs::MetadataExt;
    let meta = fs_err::metadata(host).map_err(|source| RuntimeError::Io {
        path: host.clone(),
        source,
    })?;
    let writable = meta.uid() == plan.agent_uid
        || meta.mode() & 0o002 != 0
        || (meta.gid() == plan.agent_uid && meta.mode() & 0o020 != 0);
    if writable {
        Ok(())
    } else {
        Err(RuntimeError::WorkspaceNotWritable {
            path: host.clone(),
            uid: plan.agent_uid,
        })
    }
}

/// Writes the provider's files (instructions, config) into `run/home`, which the shim
/// copies into the agent's home before the agent starts. The directory is rewritten
/// each session so a resumed bottle gets the current manifests.
fn write_home_files(plan: &BottlePlan, run_dir: &Path) -> Result<(), RuntimeError> {
    let root = run_dir.join("home");
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| RuntimeError::Io { path, source }
    };
    match std::fs::remove_dir_all(&root) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(RuntimeError::Io { path: root, source }),
    }
    for file in &plan.files {
        // Only the agent's home: the shim runs as the agent and copies nothing else.
        let Ok(relative) = Path::new(&file.path).strip_prefix(AGENT_HOME) else {
            return Err(RuntimeError::Io {
                path: PathBuf::from(&file.path),
                source: std::io::Error::other("provisioned files must live in the agent's home"),
            });
        };
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            fs_err::create_dir_all(parent).map_err(io(parent))?;
        }
        fs_err::write(&path, &file.contents).map_err(io(&path))?;
    }
    // Readable by the agent's uid through the run/ mount; written only by this process.
    set_tree_mode(&root).map_err(io(&root))
}

fn set_tree_mode(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.exists() {
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            set_tree_mode(&entry.path())?;
        } else {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}

/// The workspace, as an archive to upload (`--cwd`, first session only).
fn workspace_archive(host: &Path, uid: u32) -> Result<Vec<u8>, RuntimeError> {
    let io = |source| RuntimeError::Io {
        path: host.to_owned(),
        source,
    };
    let mut archive = Archive::new();
    archive.tree(host, WORKSPACE, u64::from(uid)).map_err(io)?;
    archive.finish().map_err(io)
}

/// Every per-tool CA variable the plan does not set already: Node's takes the gateway CA
/// alone (it adds to Node's own roots), the others replace their tool's roots and so get
/// the system bundle, which holds the gateway CA too.
fn ca_trust_env(plan: &BottlePlan) -> Vec<(String, String)> {
    bot_bottle_egress::CA_ENV_VARS
        .iter()
        .filter(|var| !plan.env.contains_key(**var))
        .map(|var| {
            let path = if *var == "NODE_EXTRA_CA_CERTS" {
                BOTTLE_CA_PATH
            } else {
                SYSTEM_CA_BUNDLE
            };
            ((*var).to_owned(), path.to_owned())
        })
        .collect()
}

/// The image's system trust store, read once per bottle image and cached on the host
/// (`cache/system-ca/<tag>.pem`): reading it takes a throwaway container, which a launch
/// should not pay for every time. The bottle image tag is a content hash, so the cache
/// never goes stale; a frozen image has the same store (the agent cannot write it).
async fn system_roots(
    engine: &DockerEngine,
    home: &Home,
    plan: &BottlePlan,
    image: &str,
) -> Result<Vec<u8>, RuntimeError> {
    let key = plan.image.tag.replace(['/', ':'], "_");
    let cache = home
        .root()
        .join("cache/system-ca")
        .join(format!("{key}.pem"));
    if let Ok(bundle) = std::fs::read(&cache) {
        return Ok(bundle);
    }
    let bundle = engine
        .read_image_file(image, SYSTEM_CA_BUNDLE)
        .await?
        .unwrap_or_default();
    if let Some(parent) = cache.parent() {
        fs_err::create_dir_all(parent).map_err(|source| RuntimeError::Io {
            path: parent.to_owned(),
            source,
        })?;
    }
    bot_bottle_core::state::write_atomic(&cache, &bundle, 0o644)?;
    Ok(bundle)
}

/// Writes `trust/gateway-ca.pem` and `trust/ca-bundle.pem` (system roots + gateway CA),
/// which the container mounts read-only.
fn write_trust_files(
    trust_dir: &Path,
    system_roots: &[u8],
    ca_pem: &str,
) -> Result<(), RuntimeError> {
    fs_err::create_dir_all(trust_dir).map_err(|source| RuntimeError::Io {
        path: trust_dir.to_owned(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    fs_err::set_permissions(trust_dir, std::fs::Permissions::from_mode(0o755)).map_err(
        |source| RuntimeError::Io {
            path: trust_dir.to_owned(),
            source,
        },
    )?;
    let mut bundle = system_roots.to_vec();
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(ca_pem.as_bytes());
    bot_bottle_core::state::write_atomic(&trust_dir.join(TRUST_CA_FILE), ca_pem.as_bytes(), 0o644)?;
    bot_bottle_core::state::write_atomic(&trust_dir.join(TRUST_BUNDLE_FILE), &bundle, 0o644)?;
    Ok(())
}

/// Resolves on SIGTERM, SIGHUP or SIGINT. An interactive session's terminal is in raw
/// mode, so Ctrl-C there reaches the agent as a key, not this process.
async fn interrupted() -> String {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM".to_owned(),
        _ = hup.recv() => "SIGHUP".to_owned(),
        _ = int.recv() => "SIGINT".to_owned(),
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Runs one agent session: a new bottle (`spec.identity == None`) or a resumed one.
pub async fn launch(
    spec: &BottleSpec,
    options: &LaunchOptions,
) -> Result<SessionOutcome, RuntimeError> {
    let progress = &options.progress;
    let catalog = load_catalog(spec, &options.home)?;
    let mut plan = plan_with(spec, &catalog, options.gateway.tripwire)?;
    let untrusted = if options.trust_project_manifests {
        None
    } else {
        untrusted_manifests(spec, &catalog, &options.home, &mut plan)?
    };
    check_workspace_writable(&plan)?;
    if let Some(project) = &untrusted
        && options.confirm.is_none()
    {
        return Err(RuntimeError::UntrustedManifests {
            root: project.root.clone(),
        });
    }
    if let Some(confirm) = &options.confirm
        && !confirm(&plan)
    {
        return Err(RuntimeError::Declined);
    }
    // The user read the plan, warning included, and went on.
    if let Some(project) = &untrusted {
        TrustStore::new(&options.home).trust(project)?;
    }
    let engine = DockerEngine::connect().await?;
    options.home.ensure()?;

    let slug = spec
        .identity
        .clone()
        .unwrap_or_else(|| new_identity(&plan.label));
    plan.identity = Some(slug.clone());
    if let Some(forge) = &options.forge {
        plan.attach_forge(&forge.attach(&slug));
    }
    let bottle = options.home.bottle(&slug)?;
    // What a human allowed for good in earlier sessions.
    for rule in crate::supervise::approved_rules(&bottle)? {
        if !plan.egress.rules.contains(&rule) {
            plan.egress.rules.push(rule);
        }
    }
    bottle.create()?;
    let previous = bottle.read_metadata()?;
    if previous.is_none() {
        snapshot_manifests(&bottle, &catalog, &plan)?;
    }
    let mut metadata = Metadata {
        identity: slug.clone(),
        label: plan.label.clone(),
        label_slug: slugify(&plan.label),
        color: plan.color.clone(),
        agent: plan.agent.clone(),
        provider: plan.provider.to_string(),
        bottles: plan.bottles.clone(),
        cwd: spec.cwd.clone(),
        copy_cwd: spec.copy_cwd,
        backend: plan.backend.clone(),
        image: plan.image.tag.clone(),
        frozen_image: plan.image.resume_from.clone(),
        container_id: None,
        created_at: previous.as_ref().map_or_else(now, |p| p.created_at),
        updated_at: now(),
        status: Status::Created,
        exit_code: None,
        sessions: previous.as_ref().map_or(0, |p| p.sessions),
        // A new session is a human's decision to go on after an alert.
        alert: None,
    };
    bottle.write_metadata(&metadata)?;
    // A session is kept until `destroy` (so `freeze` and `resume` can follow it) unless
    // the caller asked for `--rm`.
    if !options.remove_after {
        bottle.mark_preserved()?;
    }

    let session_number = u64::from(metadata.sessions) + 1;
    let started = now();
    let head_before = match &plan.workspace {
        Workspace::Bind { host } => crate::provenance::workspace_head(host, git_uid(&plan)).await,
        Workspace::Copy { .. } => None,
    };
    let seq_at_start = bot_bottle_egress::audit::read_head(&bottle.egress_log())
        .ok()
        .flatten()
        .map_or(0, |head| head.seq);
    let result = run_session(spec, &plan, &bottle, &engine, options, &mut metadata).await;
    let finished = now();
    metadata.updated_at = now();
    match &result {
        Ok(code) => {
            metadata.status = Status::Stopped;
            metadata.exit_code = Some(*code);
            metadata.sessions += 1;
        }
        Err(RuntimeError::Interrupted { .. }) => {
            metadata.status = Status::Stopped;
            metadata.sessions += 1;
        }
        Err(RuntimeError::Alerted { alert, .. }) => {
            metadata.status = Status::Stopped;
            metadata.sessions += 1;
            metadata.alert = Some(alert.clone());
        }
        Err(_) => metadata.status = Status::Failed,
    }
    bottle.write_metadata(&metadata)?;
    // After the gateway stopped and wrote its head: every session, however it ended.
    let session = SessionFacts {
        spec,
        plan: &plan,
        number: session_number,
        started,
        finished,
        head_before,
        seq_at_start,
    };
    let written = record_provenance(&engine, options, &bottle, &session, &result).await;
    let (mut provenance, provenance_error) = match written {
        Ok(path) => (Some(path), None),
        Err(message) => {
            eprintln!(
                "bot-bottle: warning: no provenance was written for this session of {slug}: {message}\nhint: check that {} is writable; `bot-bottle provenance export-key` shows whether the signing key loads",
                bottle.path().display()
            );
            (None, Some(message))
        }
    };
    if let Err(RuntimeError::Alerted { .. }) = &result {
        // Kept for forensics whatever `--rm` said: files, the agent's session, the audit.
        bottle.mark_preserved()?;
        freeze(&options.home, &slug, progress).await?;
    }
    let exit_code = result?;
    // `--rm`, or a bottle someone else marked to keep: never remove what is preserved.
    if !bottle.is_preserved() {
        destroy(&options.home, &slug, progress).await?;
        let audit_log = options.home.archived_audit(&slug)?;
        let audit_head = bot_bottle_egress::audit::read_head(&audit_log)
            .ok()
            .flatten();
        if provenance.is_some() {
            provenance = Some(archived_provenance(&audit_log));
        }
        progress.step(&format!("agent exited {exit_code}; bottle removed (--rm)"));
        return Ok(SessionOutcome {
            slug,
            exit_code,
            audit_log,
            audit_head,
            provenance,
            provenance_error,
        });
    }
    progress.step(&format!(
        "agent exited {exit_code}; audit log: {}",
        bottle.egress_log().display()
    ));
    progress.step(&format!(
        "resume with `bot-bottle resume {slug}`; freeze with `bot-bottle freeze {slug}`; remove with `bot-bottle destroy {slug}`"
    ));
    Ok(SessionOutcome {
        slug,
        exit_code,
        audit_head: bot_bottle_egress::audit::read_head(&bottle.egress_log())
            .ok()
            .flatten(),
        audit_log: bottle.egress_log(),
        provenance,
        provenance_error,
    })
}

/// Moves a hash-chained log and its recorded head to `archive`, when there is one.
fn archive_log(
    log: &Path,
    archive: &Path,
    what: &str,
    progress: &Progress,
) -> Result<(), RuntimeError> {
    if !log.exists() {
        return Ok(());
    }
    if let Some(dir) = archive.parent() {
        bot_bottle_core::state::create_private_dir(dir)?;
    }
    // Same filesystem (both under the home): renames, atomic; the head goes with it.
    let head = bot_bottle_egress::audit::head_path(log);
    if head.exists() {
        let archived_head = bot_bottle_egress::audit::head_path(archive);
        fs_err::rename(&head, &archived_head).map_err(|source| RuntimeError::Io {
            path: head.clone(),
            source,
        })?;
    }
    fs_err::rename(log, archive).map_err(|source| RuntimeError::Io {
        path: log.to_owned(),
        source,
    })?;
    progress.step(&format!("{what} kept at {}", archive.display()));
    Ok(())
}

/// Where `destroy` keeps a bottle's latest provenance: beside its archived audit log,
/// `audit/<slug>.provenance.json`.
#[must_use]
pub fn archived_provenance(archived_log: &Path) -> PathBuf {
    archived_log.with_extension(crate::provenance::LATEST_FILE)
}

/// What `launch` knew of a session before and after it ran.
struct SessionFacts<'a> {
    spec: &'a BottleSpec,
    plan: &'a BottlePlan,
    /// 1-based.
    number: u64,
    started: OffsetDateTime,
    finished: OffsetDateTime,
    /// The bind-mounted workspace's `HEAD` before the session.
    head_before: Option<String>,
    /// The audit log's head sequence number before the session (0 for a new log).
    seq_at_start: u64,
}

/// The uid `git` runs as on the workspace: the agent's when this process is root (see
/// `provenance::git`), else this process's own (which is the agent's).
fn git_uid(plan: &BottlePlan) -> Option<u32> {
    nix::unistd::getuid().is_root().then_some(plan.agent_uid)
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Builds, signs and writes the session's provenance (see docs/forge.md); returns the
/// latest envelope's path, or why it could not be written.
async fn record_provenance(
    engine: &DockerEngine,
    options: &LaunchOptions,
    bottle: &BottleDir,
    session: &SessionFacts<'_>,
    result: &Result<i32, RuntimeError>,
) -> Result<PathBuf, String> {
    use crate::provenance as prov;
    use bot_bottle_core::provenance::{
        DlpResult, LogHead, RunRecord, Trigger, sha256_digest, sign_run,
    };
    let plan = session.plan;
    let log = bottle.egress_log();
    let egress_audit_head = bot_bottle_egress::audit::read_head(&log)
        .map_err(|err| format!("cannot read the audit head: {err}"))?
        .map(|head| LogHead {
            seq: head.seq,
            hash: head.hash,
        });
    let tally = prov::tally_audit(&log, session.seq_at_start)
        .map_err(|err| format!("cannot read the audit log `{}`: {err}", log.display()))?;
    let manifests_digest = prov::manifests_digest(&manifest_snapshot(bottle))
        .map_err(|err| format!("cannot read the manifest snapshot: {err}"))?;
    let image = plan
        .image
        .resume_from
        .clone()
        .unwrap_or_else(|| plan.image.tag.clone());
    let images = match engine.image_id(&image).await {
        Ok(Some(id)) => vec![(image, id)],
        _ => Vec::new(),
    };
    let mut commits = Vec::new();
    if options.forge.is_some() {
        // A forge run's workspace lives in the bottle; its result is what it pushed.
        commits = prov::pushed_commits(&log, session.seq_at_start).unwrap_or_default();
    } else if let Workspace::Bind { host } = &plan.workspace
        && let Some(after) = prov::workspace_head(host, git_uid(plan)).await
        && session.head_before.as_deref() != Some(after.as_str())
    {
        commits =
            prov::commits_between(host, git_uid(plan), session.head_before.as_deref(), &after)
                .await
                .unwrap_or_default();
    }
    let (exit_code, outcome) = match result {
        Ok(code) => (Some(*code), "exited"),
        Err(RuntimeError::GatewayFailed { .. }) => (None, "gateway-failed"),
        Err(RuntimeError::Interrupted { .. }) => (None, "interrupted"),
        Err(_) => (None, "failed"),
    };
    let resumed = plan.resume;
    let forge = options.forge.as_ref();
    let forge_ops = forge.map(|_| crate::forge::forge_ops_log(bottle));
    let forge_ops_head = forge_ops
        .as_deref()
        .and_then(|path| bot_bottle_egress::audit::read_head(path).ok().flatten())
        .map(|head| LogHead {
            seq: head.seq,
            hash: head.hash,
        });
    let forge_ops_digest = forge_ops
        .as_deref()
        .and_then(|path| std::fs::read(path).ok())
        .map(|bytes| sha256_digest(&bytes));
    let run = RunRecord {
        slug: bottle.slug().to_owned(),
        agent: plan.agent.clone(),
        provider: plan.provider.to_string(),
        model: plan.model.clone(),
        bottles: plan.bottles.clone(),
        backend: plan.backend.clone(),
        policy_digest: prov::policy_digest(&plan.egress),
        prompt_digest: sha256_digest(session.spec.prompt.as_deref().unwrap_or("").as_bytes()),
        issue: forge.map(crate::forge::ForgeRun::issue_ref),
        trigger: forge.map_or_else(
            || Trigger {
                kind: if resumed { "resume" } else { "cli" }.to_owned(),
                delivery_id: None,
                comment_id: None,
            },
            |forge| forge.trigger.clone(),
        ),
        base_commit: session
            .head_before
            .clone()
            .map(|sha| ("workspace".to_owned(), sha)),
        images,
        started_at: rfc3339(session.started),
        finished_at: rfc3339(session.finished),
        exit_code,
        watchdog_fired: forge.is_some_and(|forge| {
            forge
                .watchdog_fired
                .load(std::sync::atomic::Ordering::SeqCst)
        }),
        egress_audit_digest: tally.as_ref().map(|t| t.digest.clone()),
        egress_summary: tally
            .as_ref()
            .map(|t| t.summary.clone())
            .unwrap_or_default(),
        dlp: tally
            .as_ref()
            .map_or(DlpResult::NotRun, prov::AuditTally::dlp),
        forge_ops_digest,
        forge_ops_head,
        cli: plan.provider.npm_package().map(str::to_owned),
        manifests_digest,
        outcome: Some(outcome.to_owned()),
        approvals: 0,
        subjects: prov::subjects(&commits, egress_audit_head.as_ref()),
        egress_audit_head,
        builder_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let envelope = sign_run(options.home.root(), &run).map_err(|err| err.to_string())?;
    prov::write_envelopes(
        bottle.path(),
        &prov::history_name(session.number, session.started),
        &envelope,
    )
    .map_err(|err| {
        format!(
            "{err}: {}",
            std::error::Error::source(&err).map_or_else(String::new, ToString::to_string)
        )
    })
}

async fn run_session(
    spec: &BottleSpec,
    plan: &BottlePlan,
    bottle: &BottleDir,
    engine: &DockerEngine,
    options: &LaunchOptions,
    metadata: &mut Metadata,
) -> Result<i32, RuntimeError> {
    let progress = &options.progress;
    let image = ensure_bottle_image(
        engine,
        &plan.image,
        plan.agent_uid,
        plan.image.context.as_deref(),
        progress,
    )
    .await?;

    let socket = bottle.run_dir().join(GATEWAY_SOCKET);
    let ca_dir = options.home.ca_dir().join(bottle.slug());
    let prepared = crate::gateway::prepare(plan, bottle, &socket, &options.gateway, &ca_dir)?;
    let ca_pem = prepared.ca_pem().to_owned();
    for warning in prepared.warnings() {
        progress.step(&format!("warning: {warning}"));
    }
    let mut launch_env = prepared.placeholder_env().to_vec();
    launch_env.extend(ca_trust_env(plan));

    let trust_dir = bottle.path().join("trust");
    let roots = system_roots(engine, &options.home, plan, &image).await?;
    write_trust_files(&trust_dir, &roots, &ca_pem)?;
    write_home_files(plan, &bottle.run_dir())?;
    let paths = HostPaths {
        run_dir: bottle.run_dir(),
        shim_binary: options.shim_binary.clone(),
        trust_dir,
    };
    let name = container_name(bottle.slug());
    progress.step(&format!(
        "starting bottle {} (no route out; egress via gateway only)",
        bottle.slug()
    ));
    // The forge sidecar is up before anything of the bottle exists.
    let sidecar = match &options.forge {
        Some(forge) => Some(forge.start_sidecar(bottle).await?),
        None => None,
    };
    let result = run_with_sidecar(
        spec,
        plan,
        bottle,
        engine,
        options,
        metadata,
        SessionParts {
            prepared,
            image,
            paths,
            launch_env,
            name,
        },
        sidecar.as_ref(),
    )
    .await;
    if let Some(sidecar) = sidecar {
        sidecar.shutdown().await;
    }
    result
}

/// What `run_session` prepared for the rest of the session.
struct SessionParts {
    prepared: crate::gateway::PreparedGateway,
    image: String,
    paths: HostPaths,
    launch_env: Vec<(String, String)>,
    name: String,
}

#[allow(clippy::too_many_arguments)]
async fn run_with_sidecar(
    spec: &BottleSpec,
    plan: &BottlePlan,
    bottle: &BottleDir,
    engine: &DockerEngine,
    options: &LaunchOptions,
    metadata: &mut Metadata,
    parts: SessionParts,
    sidecar: Option<&bot_bottle_sidecars::ForgeSidecar>,
) -> Result<i32, RuntimeError> {
    let progress = &options.progress;
    let SessionParts {
        prepared,
        image,
        paths,
        launch_env,
        name,
    } = parts;
    // The gateway starts on its own task (starting is CPU work: DLP rules compile) while
    // the engine starts the tripwire; the bottle starts only once both are up.
    let serving = tokio::spawn(prepared.serve());
    let tripwire = match options.gateway.tripwire {
        TripwireMode::On => match create_tripwire(engine, bottle, options).await {
            Ok(created) => Some(created),
            Err(err) => {
                abandon(serving).await;
                return Err(err);
            }
        },
        TripwireMode::Off => {
            progress.step(
                "warning: tripwire off (BOT_BOTTLE_TRIPWIRE=off): direct attempts fail but are not audited",
            );
            None
        }
    };
    let network = tripwire
        .as_ref()
        .map_or(Network::Sealed, |(id, _)| Network::Tripwire(id.clone()));
    let tripwire_id = tripwire.as_ref().map(|(id, _)| id.clone());
    let prepared_bottle = async {
        let config = container_config(plan, bottle.slug(), &image, &paths, &launch_env, &network)?;
        Ok::<_, RuntimeError>(engine.create(&name, config).await?)
    };
    let start_tripwire = async {
        match &tripwire_id {
            Some(id) => engine
                .start(id)
                .await
                .map_err(|err| RuntimeError::Tripwire {
                    message: err.to_string(),
                }),
            None => Ok(()),
        }
    };
    // Docker creates a container that joins the namespace of one not running yet (only
    // starting it must wait), so the bottle is created while the tripwire starts.
    let (created, started) = tokio::join!(prepared_bottle, start_tripwire);
    tracing::debug!("tripwire started, bottle created");
    let served = match serving.await {
        Ok(served) => served,
        Err(join) => Err(RuntimeError::Gateway {
            message: format!("the gateway task failed: {join}"),
        }),
    };
    let container_id = match (created, started) {
        (Ok(id), Ok(())) => Ok(id),
        (Ok(id), Err(err)) => {
            let _ = engine.remove_container(&id).await;
            Err(err)
        }
        (Err(err), _) => Err(err),
    };
    let (container_id, gateway) = match (container_id, served) {
        (Ok(id), Ok(gateway)) => (id, gateway),
        (Ok(id), Err(err)) => {
            let _ = engine.remove_container(&id).await;
            remove_tripwire(engine, tripwire_id.as_deref()).await;
            return Err(err);
        }
        (Err(err), served) => {
            remove_tripwire(engine, tripwire_id.as_deref()).await;
            if let Ok(gateway) = served {
                gateway.shutdown().await;
            }
            return Err(err);
        }
    };
    let supervise = if plan.supervise {
        match crate::supervise::start(options.home.root(), bottle, gateway.event_recorder()).await {
            Ok(sidecar) => Some(sidecar),
            Err(err) => {
                let _ = engine.remove_container(&container_id).await;
                remove_tripwire(engine, tripwire_id.as_deref()).await;
                gateway.shutdown().await;
                return Err(err);
            }
        }
    } else {
        None
    };
    let mut reports = None;
    if let Some((id, listener)) = tripwire {
        tracing::debug!("gateway serving");
        match await_tripwire(engine, &id, listener, &gateway, progress).await {
            Ok(flow) => {
                tracing::debug!("tripwire ready");
                reports = Some(flow);
            }
            Err(err) => {
                let _ = engine.remove_container(&container_id).await;
                let _ = engine.remove_container(&id).await;
                gateway.shutdown().await;
                return Err(err);
            }
        }
    }
    let session = attach_session(
        spec,
        plan,
        bottle,
        engine,
        options,
        metadata,
        container_id,
        &gateway,
        sidecar,
    )
    .await;
    tracing::debug!("agent exited");
    // The tripwire goes with the session (it exits when its socket closes, and Docker
    // removes it); its last reports are in before the gateway's final line.
    if let Some(reports) = reports {
        reports.finish().await;
    }
    tracing::debug!("tripwire finished");
    if let Some(supervise) = supervise {
        supervise.shutdown().await;
    }
    gateway.shutdown().await;
    tracing::debug!("gateway stopped");
    let code = session?;
    Ok(i32::try_from(code).unwrap_or(1))
}

async fn remove_tripwire(engine: &DockerEngine, id: Option<&str>) {
    if let Some(id) = id {
        let _ = engine.remove_container(id).await;
    }
}

/// Stops a gateway that was starting when the launch failed.
async fn abandon(
    serving: tokio::task::JoinHandle<Result<crate::gateway::SessionGateway, RuntimeError>>,
) {
    if let Ok(Ok(gateway)) = serving.await {
        gateway.shutdown().await;
    }
}

/// Binds the tripwire's socket and creates its container (started with the bottle's
/// creation, see `run_session`).
async fn create_tripwire(
    engine: &DockerEngine,
    bottle: &BottleDir,
    options: &LaunchOptions,
) -> Result<(String, crate::tripwire::Listener), RuntimeError> {
    let dir = bottle.path().join("tripwire");
    let listener = crate::tripwire::Listener::bind(&dir).map_err(|source| RuntimeError::Io {
        path: dir.clone(),
        source,
    })?;
    let image = crate::images::ensure_tripwire_image(engine).await?;
    let config = tripwire_config(bottle.slug(), &image, &options.shim_binary, &dir);
    // Numbered by session: the last session's tripwire may still be being removed.
    let session = bottle.read_metadata()?.map_or(0, |m| m.sessions);
    let name = format!(
        "{}-{KIND_TRIPWIRE}-{session}",
        container_name(bottle.slug())
    );
    let id = engine.create(&name, config).await?;
    Ok((id, listener))
}

/// Waits for the tripwire's device to be up, then lets its reports flow to the audit.
async fn await_tripwire(
    engine: &DockerEngine,
    id: &str,
    listener: crate::tripwire::Listener,
    gateway: &crate::gateway::SessionGateway,
    progress: &Progress,
) -> Result<crate::tripwire::Reports, RuntimeError> {
    let accepted = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        listener.accept(gateway.attempt_recorder()),
    )
    .await;
    let failure = match accepted {
        Ok(Ok((ready, reports))) => {
            if !ready.ipv6 {
                progress.step(&format!(
                    "warning: the tripwire routes IPv4 only ({}); IPv6 attempts fail unaudited",
                    ready.detail.as_deref().unwrap_or("no reason given")
                ));
            }
            return Ok(reports);
        }
        Ok(Err(err)) => err.to_string(),
        Err(_) => "it did not report ready within 20 s".to_owned(),
    };
    let output = engine.output_tail(id).await;
    Err(RuntimeError::Tripwire {
        message: if output.is_empty() {
            failure
        } else {
            format!("{failure}; it said: {output}")
        },
    })
}

/// Runs the created bottle container to its end, failing closed with the gateway.
#[allow(clippy::too_many_arguments)]
async fn attach_session(
    spec: &BottleSpec,
    plan: &BottlePlan,
    bottle: &BottleDir,
    engine: &DockerEngine,
    options: &LaunchOptions,
    metadata: &mut Metadata,
    container_id: String,
    gateway: &crate::gateway::SessionGateway,
    sidecar: Option<&bot_bottle_sidecars::ForgeSidecar>,
) -> Result<i64, RuntimeError> {
    let progress = &options.progress;
    metadata.container_id = Some(container_id.clone());
    metadata.status = Status::Running;
    metadata.updated_at = now();
    bottle.write_metadata(metadata)?;

    // The workspace is copied in on the first session only: later ones resume from the
    // frozen image, which already holds it.
    if spec.copy_cwd
        && plan.image.resume_from.is_none()
        && let Workspace::Copy { host } = &plan.workspace
    {
        engine
            .upload(&container_id, workspace_archive(host, plan.agent_uid)?)
            .await?;
    }
    tracing::debug!("bottle ready");

    let run = async {
        if plan.headless {
            engine
                .run_headless(&container_id, options.agent_stdout_to_stderr)
                .await
        } else {
            engine.run_interactive(&container_id).await
        }
    };
    // Fail closed: if the gateway dies, the agent is stopped and the launch reports it.
    let outcome = tokio::select! {
        code = run => code.map_err(RuntimeError::from),
        failure = gateway.failed() => {
            let _ = engine.stop(&container_id).await;
            Err(RuntimeError::GatewayFailed { message: failure })
        }
        failure = sidecar_failed(sidecar) => {
            let _ = engine.stop(&container_id).await;
            Err(RuntimeError::SidecarFailed { message: failure })
        }
        alert = gateway.alerted(), if plan.on_alert == OnAlert::Freeze => {
            progress.step(&format!("alert: {alert}; stopping the agent and freezing {}", bottle.slug()));
            let _ = engine.stop(&container_id).await;
            Err(RuntimeError::Alerted { slug: bottle.slug().to_owned(), alert })
        }
        signal = interrupted() => {
            // The bottle must not outlive its gateway: stop it, then keep the state and
            // the audit log so the session can be inspected or resumed.
            progress.step(&format!("{signal}: stopping bottle {}", bottle.slug()));
            let _ = engine.stop(&container_id).await;
            Err(RuntimeError::Interrupted { signal, slug: bottle.slug().to_owned() })
        }
    };
    outcome
}

/// Resolves with the reason when the forge sidecar fails; never without one.
async fn sidecar_failed(sidecar: Option<&bot_bottle_sidecars::ForgeSidecar>) -> String {
    match sidecar {
        Some(sidecar) => sidecar.failed().await,
        None => std::future::pending().await,
    }
}

/// Stops a bottle's running agent (its session then ends as the agent's exit does) and
/// removes tripwire containers a dead launcher left behind. A bottle with nothing
/// running is left as it is. Returns whether a bottle container was running.
///
/// # Errors
/// The engine is unreachable or refuses.
pub async fn stop(home: &Home, slug: &str) -> Result<bool, RuntimeError> {
    stop_with(home, slug, false).await
}

/// [`stop`] for a bottle whose launcher died: its session is over, so every tripwire
/// container goes too (a new session creates its own under the same name).
///
/// # Errors
/// As [`stop`].
pub async fn stop_stranded(home: &Home, slug: &str) -> Result<bool, RuntimeError> {
    stop_with(home, slug, true).await
}

async fn stop_with(home: &Home, slug: &str, stranded: bool) -> Result<bool, RuntimeError> {
    home.bottle(slug)?;
    let engine = DockerEngine::connect().await?;
    let mut was_running = false;
    for container in engine.containers(Some(slug)).await? {
        if container.kind == KIND_TRIPWIRE {
            if stranded || container.state != "running" {
                engine.remove_container(&container.id).await?;
            }
        } else if container.state == "running" {
            engine.stop(&container.id).await?;
            was_running = true;
        }
    }
    Ok(was_running)
}

/// Whether the bottle's agent container is running now.
///
/// # Errors
/// The engine is unreachable.
pub async fn is_running(slug: &str) -> Result<bool, RuntimeError> {
    let engine = DockerEngine::connect().await?;
    Ok(engine
        .containers(Some(slug))
        .await?
        .iter()
        .any(|c| c.kind != KIND_TRIPWIRE && c.state == "running"))
}

/// Freezes a bottle: commits its container to an image so `resume` continues with its
/// files and the agent's session, then removes the container.
pub async fn freeze(home: &Home, slug: &str, progress: &Progress) -> Result<String, RuntimeError> {
    let bottle = home.bottle(slug)?;
    let mut metadata = bottle
        .read_metadata()?
        .ok_or_else(|| RuntimeError::UnknownSlug {
            slug: slug.to_owned(),
        })?;
    let engine = DockerEngine::connect().await?;
    let containers = engine.containers(Some(slug)).await?;
    let Some(container) = containers.iter().find(|c| c.kind != KIND_TRIPWIRE) else {
        if let (Status::Frozen, Some(image)) = (metadata.status, &metadata.frozen_image) {
            progress.step(&format!("`{slug}` is already frozen as {image}"));
            return Ok(image.clone());
        }
        return Err(RuntimeError::NothingToResume {
            slug: slug.to_owned(),
            action: "freeze".to_owned(),
        });
    };
    engine.stop(&container.id).await?;
    let tag = format!("{}-{}", slug, metadata.sessions);
    progress.step(&format!("freezing {slug} to bot-bottle/frozen:{tag}"));
    engine
        .commit(&container.id, "bot-bottle/frozen", &tag, slug)
        .await?;
    let image = format!("bot-bottle/frozen:{tag}");
    engine.remove_container(&container.id).await?;
    if let Some(old) = metadata.frozen_image.as_ref().filter(|old| **old != image) {
        engine.remove_image(old).await?;
    }
    metadata.frozen_image = Some(image.clone());
    metadata.container_id = None;
    metadata.status = Status::Frozen;
    metadata.updated_at = now();
    bottle.write_metadata(&metadata)?;
    Ok(image)
}

/// Resumes a frozen or stopped bottle with a new session.
pub async fn resume(
    slug: &str,
    prompt: Option<String>,
    backend: Option<String>,
    options: &LaunchOptions,
) -> Result<SessionOutcome, RuntimeError> {
    let bottle = options.home.bottle(slug)?;
    let mut metadata = bottle
        .read_metadata()?
        .ok_or_else(|| RuntimeError::UnknownSlug {
            slug: slug.to_owned(),
        })?;
    if metadata.status != Status::Frozen || metadata.frozen_image.is_none() {
        // A stopped container cannot take a new command; freeze it first.
        freeze(&options.home, slug, &options.progress).await?;
        metadata = bottle
            .read_metadata()?
            .ok_or_else(|| RuntimeError::UnknownSlug {
                slug: slug.to_owned(),
            })?;
    }
    let spec = BottleSpec {
        agent: metadata.agent.clone(),
        bottles: metadata.bottles.clone(),
        label: Some(metadata.label.clone()),
        color: metadata.color.clone(),
        prompt,
        cwd: metadata.cwd.clone(),
        copy_cwd: metadata.copy_cwd,
        backend: backend.or(Some(metadata.backend.clone())),
        identity: Some(slug.to_owned()),
        resume_image: metadata.frozen_image.clone(),
    };
    launch(&spec, options).await
}

/// Removes a bottle's containers, frozen images and state. Idempotent: a missing
/// slug is not an error.
pub async fn destroy(home: &Home, slug: &str, progress: &Progress) -> Result<(), RuntimeError> {
    let bottle = home.bottle(slug)?;
    let engine = DockerEngine::connect().await?;
    for container in engine.containers(Some(slug)).await? {
        engine.remove_container(&container.id).await?;
    }
    for image in engine.frozen_images(slug).await? {
        engine.remove_image(&image).await?;
    }
    if bottle.exists() {
        progress.step(&format!("removing state of {slug}"));
    }
    let archived = home.archived_audit(slug)?;
    archive_log(&bottle.egress_log(), &archived, "audit log", progress)?;
    archive_log(
        &crate::forge::forge_ops_log(&bottle),
        &archived.with_extension(bot_bottle_sidecars::FORGE_OPS_LOG),
        "forge op log",
        progress,
    )?;
    let latest = bottle.path().join(crate::provenance::LATEST_FILE);
    if latest.exists() {
        let archive = archived_provenance(&home.archived_audit(slug)?);
        if let Some(dir) = archive.parent() {
            bot_bottle_core::state::create_private_dir(dir)?;
        }
        fs_err::rename(&latest, &archive).map_err(|source| RuntimeError::Io {
            path: latest.clone(),
            source,
        })?;
        progress.step(&format!("provenance kept at {}", archive.display()));
    }
    bottle.remove()?;
    let ca_dir = home.ca_dir().join(slug);
    match std::fs::remove_dir_all(&ca_dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RuntimeError::Io {
            path: ca_dir,
            source,
        }),
    }
}

/// One row of `bot-bottle ps`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PsRow {
    pub slug: String,
    /// Why an alert froze it (`on_alert: freeze`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<String>,
    pub agent: String,
    pub bottles: Vec<String>,
    pub backend: String,
    pub status: String,
    pub container: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub age_seconds: i64,
    pub exit_code: Option<i32>,
}

/// Every bottle with state, joined with what the engine says of its container.
pub async fn ps(home: &Home) -> Result<Vec<PsRow>, RuntimeError> {
    let engine = DockerEngine::connect().await?;
    let containers: BTreeMap<String, String> = engine
        .containers(None)
        .await?
        .into_iter()
        .filter(|c| c.kind != KIND_TRIPWIRE)
        .map(|c| (c.slug, c.state))
        .collect();
    let now = now();
    Ok(home
        .list()?
        .into_iter()
        .map(|m| PsRow {
            container: containers.get(&m.identity).cloned(),
            status: m.status.as_str().to_owned(),
            age_seconds: (now - m.created_at).whole_seconds(),
            slug: m.identity,
            agent: m.agent,
            bottles: m.bottles,
            backend: m.backend,
            created_at: m.created_at,
            exit_code: m.exit_code,
            alert: m.alert,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_and_reject_bad_input() {
        let map = parse_overrides("api.anthropic.com=127.0.0.1:4000, x.test=[::1]:5").unwrap();
        assert_eq!(map["api.anthropic.com"], "127.0.0.1:4000".parse().unwrap());
        assert_eq!(map["x.test"], "[::1]:5".parse().unwrap());
        assert!(parse_overrides("nohost").is_err());
        assert!(parse_overrides("a=localhost").is_err());
    }
}
