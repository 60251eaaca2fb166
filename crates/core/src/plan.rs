//! `plan(spec, catalog, host) → BottlePlan`: everything a launch needs, resolved by a
//! pure function so `--dry-run`, the preflight and snapshot tests all see the same
//! thing the backend will do.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::credential::CredentialSpec;
use crate::manifest::{Catalog, ManifestError, ProviderKind, Resources, compose};
use crate::policy::EgressPolicy;
use crate::provider::{AGENT_HOME, Invocation, ProvisionedFile, WORKSPACE};

/// The loopback port inside the bottle that the shim forwards to the gateway socket.
pub const PROXY_PORT: u16 = 3128;
/// Where the state `run/` directory is mounted inside the bottle.
pub const BOTTLE_RUN_DIR: &str = "/run/bot-bottle";
/// Where the static bot-bottle binary (the shim) is mounted inside the bottle.
pub const BOTTLE_SHIM_PATH: &str = "/opt/bot-bottle/bot-bottle";
/// The gateway's socket file name inside `run/`.
pub const GATEWAY_SOCKET: &str = "egress.sock";

/// Debian suite of the base image. Trixie's Node 20 runs all three agent CLIs;
/// bookworm's Node 18 cannot run pi.
pub const BASE_SUITE: &str = "trixie";
/// Packages of the base image (`mmdebstrap --include`).
pub const BASE_PACKAGES: &[&str] = &[
    "ca-certificates",
    "nodejs",
    "npm",
    "git",
    "curl",
    "procps",
    "less",
    "python3",
    // useradd/groupadd for the agent user; `--variant=apt` leaves them out.
    "passwd",
];

/// What the caller asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BottleSpec {
    pub agent: String,
    /// Bottles in composition order; empty means the agent's default.
    pub bottles: Vec<String>,
    pub label: Option<String>,
    pub color: Option<String>,
    /// `Some` for a headless launch.
    pub prompt: Option<String>,
    pub cwd: PathBuf,
    /// Copy the working directory into the bottle instead of bind-mounting it.
    pub copy_cwd: bool,
    pub backend: Option<String>,
    /// Set when resuming: the identity to reuse.
    pub identity: Option<String>,
    /// Set when resuming from a frozen image.
    pub resume_image: Option<String>,
}

/// Facts about the host that shape the plan. Gathered by the caller, so `plan()`
/// stays pure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HostFacts {
    /// UID of the agent user in the bottle (the host user's, unless that is root).
    pub agent_uid: u32,
    /// Contents of each Dockerfile a bottle names, keyed by path.
    pub dockerfiles: BTreeMap<PathBuf, String>,
    pub default_backend: String,
    /// `<cwd>/.bot-bottle`, when it exists: mounted read-only over the workspace's copy so
    /// the agent cannot rewrite the manifests that decide its next session's policy.
    pub workspace_manifests: Option<PathBuf>,
    /// The tripwire is off (`BOT_BOTTLE_TRIPWIRE=off`): direct attempts fail unaudited.
    pub tripwire_off: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Workspace {
    /// The host directory is bind-mounted read-write at `/workspace`.
    Bind { host: PathBuf },
    /// The host directory is copied into the bottle at launch.
    Copy { host: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MountPlan {
    pub source: PathBuf,
    pub target: PathBuf,
    pub readonly: bool,
}

/// How the bottle image is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImagePlan {
    /// `bot-bottle/base:<hash>`, or `None` when a user Dockerfile replaces the base.
    pub base: Option<String>,
    /// The Dockerfile of the bottle image (generated, or the user's plus our layer).
    pub dockerfile: String,
    /// `bot-bottle/bottle:<hash of everything that shaped it>`.
    pub tag: String,
    /// When resuming, the frozen image to start from instead of `tag`.
    pub resume_from: Option<String>,
    /// The build context: the directory of the user's Dockerfile, if one is used.
    pub context: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BottlePlan {
    pub identity: Option<String>,
    pub label: String,
    pub color: Option<String>,
    pub agent: String,
    pub provider: ProviderKind,
    pub model: Option<String>,
    pub bottles: Vec<String>,
    pub headless: bool,
    pub resume: bool,
    /// Direct attempts (around the gateway) are refused and audited by the tripwire.
    pub tripwire: bool,
    pub image: ImagePlan,
    pub argv: Vec<String>,
    /// Environment of the agent. Never holds a secret: credential variables get
    /// placeholders at launch, and are listed in `credentials` by name.
    pub env: BTreeMap<String, String>,
    pub egress: EgressPolicy,
    pub credentials: Vec<CredentialSpec>,
    pub workspace: Workspace,
    pub mounts: Vec<MountPlan>,
    pub resources: Resources,
    pub backend: String,
    pub agent_uid: u32,
    pub files: Vec<ProvisionedFile>,
    /// Set (by the launcher, which reads the trust store) when the project manifests
    /// behind this plan are new or changed since the user last trusted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub untrusted_manifests: Option<PathBuf>,
    /// Loopback ports in the bottle that the shim forwards to host sockets, besides the
    /// gateway's (the sidecars).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<Forward>,
    /// The forge run this session belongs to (see [`BottlePlan::attach_forge`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forge: Option<crate::forge::ForgePlan>,
    /// What the launcher does when the gateway raises an alert.
    #[serde(default, skip_serializing_if = "is_continue")]
    pub on_alert: crate::manifest::OnAlert,
    /// The supervise sidecar runs beside the bottle (see [`BottlePlan::attach_supervise`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub supervise: bool,
}

fn is_continue(on_alert: &crate::manifest::OnAlert) -> bool {
    *on_alert == crate::manifest::OnAlert::Continue
}

/// One loopback port in the bottle forwarded by the shim to a socket in the run dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub port: u16,
    /// The socket's path inside the bottle.
    pub socket: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "agent `{agent}` has no default bottle\nhint: pass `--bottle NAME`, or set `bottles:` in `{source_path}`"
    )]
    NoDefaultBottle { agent: String, source_path: String },
    #[error("unknown color `{color}`\nhint: use one of the 16 ANSI color names: {}", COLORS.join(", "))]
    UnknownColor { color: String },
    #[error("unknown backend `{backend}`\nhint: known backends: `docker`")]
    UnknownBackend { backend: String },
    #[error("Dockerfile `{path}` was not read\nhint: check that the file exists")]
    MissingDockerfile { path: PathBuf },
}

/// The bottle colors: the 16 ANSI color names.
pub const COLORS: [&str; 16] = [
    "black",
    "red",
    "green",
    "yellow",
    "blue",
    "magenta",
    "cyan",
    "white",
    "bright-black",
    "bright-red",
    "bright-green",
    "bright-yellow",
    "bright-blue",
    "bright-magenta",
    "bright-cyan",
    "bright-white",
];

/// The backends this build knows.
pub const BACKENDS: &[&str] = &["docker"];

fn short_hash(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}

/// The content-hash tag of the base image.
#[must_use]
pub fn base_image_tag() -> String {
    let mut parts = vec!["base-v1", BASE_SUITE];
    parts.extend(BASE_PACKAGES);
    format!("bot-bottle/base:{}", short_hash(&parts))
}

fn quote_list(items: &[String]) -> String {
    items
        .iter()
        .map(|item| format!("'{}'", item.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The layer bot-bottle adds on top of a base: packages, the agent user, the CLI.
fn bottle_layer(packages: &[String], provider: ProviderKind, agent_uid: u32) -> String {
    let mut out = String::new();
    out.push_str("USER root\n");
    if !packages.is_empty() {
        // Retries and a timeout: a flaky mirror must not hang or fail a build.
        let _ = writeln!(
            out,
            "RUN apt-get -o Acquire::Retries=5 -o Acquire::http::Timeout=60 update \\\n && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get -o Acquire::Retries=5 install -y --no-install-recommends {} \\\n && rm -rf /var/lib/apt/lists/*",
            quote_list(packages)
        );
    }
    let _ = writeln!(
        out,
        "RUN (getent passwd {agent_uid} >/dev/null && userdel -r \"$(getent passwd {agent_uid} | cut -d: -f1)\" || true) \\\n && (getent group {agent_uid} >/dev/null || groupadd -g {agent_uid} agent) \\\n && useradd -m -d {AGENT_HOME} -u {agent_uid} -g {agent_uid} -s /bin/bash agent \\\n && mkdir -p {WORKSPACE} /etc/bot-bottle && chown {agent_uid}:{agent_uid} {WORKSPACE}"
    );
    if let Some(package) = provider.npm_package() {
        let _ = writeln!(
            out,
            "RUN for attempt in 1 2 3 4 5; do timeout 600 npm install -g --no-fund --no-audit --loglevel=error {package} && break; \\\n      [ \"$attempt\" = 5 ] && exit 1; echo \"npm install failed, retrying ($attempt)\" >&2; sleep $((attempt * 5)); done"
        );
    }
    let _ = writeln!(out, "USER {agent_uid}\nWORKDIR {WORKSPACE}");
    out
}

/// Resolves a spec against the manifests and host facts.
pub fn plan(
    spec: &BottleSpec,
    catalog: &Catalog,
    host: &HostFacts,
) -> Result<BottlePlan, PlanError> {
    let agent = catalog.agent(&spec.agent)?;
    let bottle_names = if spec.bottles.is_empty() {
        if agent.default_bottles.is_empty() {
            return Err(PlanError::NoDefaultBottle {
                agent: agent.name.clone(),
                source_path: agent.source.display().to_string(),
            });
        }
        agent.default_bottles.clone()
    } else {
        spec.bottles.clone()
    };
    let referrer = spec
        .bottles
        .is_empty()
        .then_some((agent.source.as_path(), agent.bottles_line));
    let bottles = bottle_names
        .iter()
        .map(|name| catalog.bottle(name, referrer))
        .collect::<Result<Vec<_>, _>>()?;
    let composed = compose(&bottles);

    let backend = spec
        .backend
        .clone()
        .unwrap_or_else(|| host.default_backend.clone());
    let backend = if backend.is_empty() {
        "docker".to_owned()
    } else {
        backend
    };
    if !BACKENDS.contains(&backend.as_str()) {
        return Err(PlanError::UnknownBackend { backend });
    }
    if let Some(color) = &spec.color
        && !COLORS.contains(&color.as_str())
    {
        return Err(PlanError::UnknownColor {
            color: color.clone(),
        });
    }

    let layer = bottle_layer(&composed.packages, agent.provider, host.agent_uid);
    let (base, dockerfile) = match &composed.dockerfile {
        Some(path) => {
            let user = host
                .dockerfiles
                .get(path)
                .ok_or_else(|| PlanError::MissingDockerfile { path: path.clone() })?;
            (None, format!("{}\n{layer}", user.trim_end()))
        }
        None => {
            let base = base_image_tag();
            (Some(base.clone()), format!("FROM {base}\n{layer}"))
        }
    };
    let tag = format!(
        "bot-bottle/bottle:{}",
        short_hash(&["bottle-v1", &dockerfile])
    );

    let invocation = match &spec.prompt {
        Some(prompt) => Invocation::Headless { prompt },
        None => Invocation::Interactive,
    };
    let resume = spec.resume_image.is_some();
    let argv = agent.provider.argv(
        agent.command.as_deref(),
        agent.model.as_deref(),
        &agent.args,
        &invocation,
        resume,
    );

    let mut env = BTreeMap::new();
    let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
    for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.insert(key.to_owned(), proxy.clone());
    }
    // Loopback only: everything else must go through the gateway.
    for key in ["NO_PROXY", "no_proxy"] {
        env.insert(key.to_owned(), "localhost,127.0.0.1,::1".to_owned());
    }
    env.insert("HOME".to_owned(), AGENT_HOME.to_owned());
    env.insert("BOT_BOTTLE".to_owned(), "1".to_owned());
    env.extend(agent.provider.env(&invocation));
    env.extend(composed.env.clone());

    let mut instructions = agent.instructions.clone();
    for note in &composed.notes {
        if !instructions.is_empty() {
            instructions.push_str("\n\n");
        }
        instructions.push_str(note);
    }
    let files = agent.provider.provisioned_files(&instructions);

    let workspace = if spec.copy_cwd {
        Workspace::Copy {
            host: spec.cwd.clone(),
        }
    } else {
        Workspace::Bind {
            host: spec.cwd.clone(),
        }
    };
    let mut mounts: Vec<MountPlan> = composed
        .mounts
        .iter()
        .map(|mount| MountPlan {
            source: mount.source.clone(),
            target: mount.target.clone(),
            readonly: mount.readonly,
        })
        .collect();
    if let (Workspace::Bind { .. }, Some(manifests)) = (&workspace, &host.workspace_manifests) {
        mounts.push(MountPlan {
            source: manifests.clone(),
            target: PathBuf::from(WORKSPACE).join(".bot-bottle"),
            readonly: true,
        });
    }

    let mut plan = BottlePlan {
        identity: spec.identity.clone(),
        label: spec.label.clone().unwrap_or_else(|| agent.name.clone()),
        color: spec.color.clone(),
        agent: agent.name.clone(),
        provider: agent.provider,
        model: agent.model.clone(),
        bottles: bottle_names,
        headless: spec.prompt.is_some(),
        resume,
        tripwire: !host.tripwire_off,
        image: ImagePlan {
            base,
            dockerfile,
            tag,
            resume_from: spec.resume_image.clone(),
            context: composed
                .dockerfile
                .as_ref()
                .and_then(|path| path.parent().map(PathBuf::from)),
        },
        argv,
        env,
        egress: composed.egress,
        credentials: composed.credentials,
        workspace,
        mounts,
        resources: composed.resources,
        backend,
        agent_uid: host.agent_uid,
        files,
        untrusted_manifests: None,
        forwards: Vec::new(),
        forge: None,
        on_alert: composed.on_alert,
        supervise: false,
    };
    if composed.supervise {
        plan.attach_supervise();
    }
    Ok(plan)
}

impl BottlePlan {
    /// The human rendering shown by `--dry-run` and the preflight. Credential values
    /// never appear: only names and the hosts they are for.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(root) = &self.untrusted_manifests {
            let _ = writeln!(
                out,
                "WARNING    the project manifests in {} are new or changed since you last trusted them;\n           they decide this bottle's egress, mounts and credentials (whose commands run on this host).\n           Read them before you answer y: going on trusts them.",
                root.display()
            );
        }
        let identity = self.identity.as_deref().unwrap_or("(assigned at launch)");
        let _ = writeln!(out, "bottle     {identity}");
        let _ = writeln!(out, "label      {}", self.label);
        let model = self
            .model
            .as_deref()
            .map(|m| format!(", model {m}"))
            .unwrap_or_default();
        let _ = writeln!(out, "agent      {} ({}{model})", self.agent, self.provider);
        let _ = writeln!(out, "bottles    {}", self.bottles.join(" + "));
        let _ = writeln!(out, "backend    {}", self.backend);
        let image = self.image.resume_from.as_deref().unwrap_or(&self.image.tag);
        let _ = writeln!(out, "image      {image}");
        let mode = match (self.headless, self.resume) {
            (true, true) => "headless, resuming",
            (true, false) => "headless",
            (false, true) => "interactive, resuming",
            (false, false) => "interactive",
        };
        let _ = writeln!(out, "mode       {mode}");
        let direct = if self.tripwire {
            "direct attempts refused and audited by the tripwire"
        } else {
            "tripwire off: direct attempts fail unaudited"
        };
        let _ = writeln!(
            out,
            "network    none (only the egress gateway, via 127.0.0.1:{PROXY_PORT}; {direct})"
        );
        if let Some(forge) = &self.forge {
            let _ = writeln!(
                out,
                "forge      {}#{}: tools through the forge sidecar (127.0.0.1:{}); git push only to `{}`",
                forge.repo,
                forge.issue,
                crate::forge::FORGE_PORT,
                forge.branch
            );
        }
        let audit = format!("{:?}", self.egress.audit_level()).to_lowercase();
        let _ = writeln!(out, "egress     default deny, audit {audit}");
        if self.supervise {
            let _ = writeln!(
                out,
                "supervise  request_egress, ask_human, current_policy (127.0.0.1:{}); decided with `bot-bottle approvals`",
                crate::forge::SUPERVISE_PORT
            );
        }
        if self.on_alert == crate::manifest::OnAlert::Freeze {
            let _ = writeln!(
                out,
                "on alert   freeze: a DLP block, an exfiltration attempt or a denied approval stops the agent and freezes the bottle"
            );
        }
        if self.egress.rules.is_empty() {
            let _ = writeln!(out, "  (no rules: every request is blocked)");
        }
        for rule in &self.egress.rules {
            let _ = writeln!(out, "  allow    {}", rule_summary(rule));
        }
        let _ = writeln!(out, "credentials");
        if self.credentials.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        for credential in &self.credentials {
            let _ = writeln!(
                out,
                "  {:<12} for {} (the bottle sees a placeholder)",
                credential.name,
                credential.hosts.join(", ")
            );
        }
        let _ = writeln!(out, "mounts");
        match &self.workspace {
            Workspace::Bind { host } => {
                let _ = writeln!(out, "  {} -> {WORKSPACE} (read-write)", host.display());
            }
            Workspace::Copy { host } => {
                let _ = writeln!(out, "  {} copied to {WORKSPACE}", host.display());
            }
        }
        for mount in &self.mounts {
            let access = if mount.readonly {
                "read-only"
            } else {
                "read-write"
            };
            let _ = writeln!(
                out,
                "  {} -> {} ({access})",
                mount.source.display(),
                mount.target.display()
            );
        }
        let r = &self.resources;
        let _ = writeln!(
            out,
            "resources  memory {}, cpus {}, pids {}",
            r.memory.as_deref().unwrap_or("default"),
            r.cpus
                .map_or_else(|| "default".to_owned(), |c| c.to_string()),
            r.pids
                .map_or_else(|| "default".to_owned(), |p| p.to_string()),
        );
        let _ = writeln!(out, "command    {}", shell_words(&self.argv));
        out
    }
}

fn rule_summary(rule: &crate::policy::EgressRule) -> String {
    let mut out = rule.host.clone();
    if let Some(port) = rule.port {
        let _ = write!(out, ":{port}");
    }
    if !rule.methods.is_empty() {
        let _ = write!(out, " {}", rule.methods.join(","));
    }
    if !rule.paths.is_empty() {
        let _ = write!(out, " {}", rule.paths.join(" "));
    }
    if let Some(git) = &rule.git {
        let _ = write!(
            out,
            " git {} fetch={} push={}",
            git.repo, git.fetch, git.push
        );
        if !git.push_refs.is_empty() {
            let _ = write!(out, " push_refs={}", git.push_refs.join(","));
        }
    }
    if rule.passthrough {
        out.push_str(" (passthrough: not intercepted)");
    }
    if rule.dangerously_allow_private_upstreams {
        out.push_str(" (dangerously allows private upstreams)");
    }
    out
}

/// Renders an argv so a human can read (and paste) it.
#[must_use]
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|word| {
            let plain = !word.is_empty()
                && word
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+".contains(c));
            if plain {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{AgentManifest, BottleManifest, Origin};
    use std::path::Path;

    fn catalog() -> Catalog {
        let mut catalog = Catalog::default();
        let agent = AgentManifest::parse(
            Path::new("/p/.bot-bottle/agents/implementer.md"),
            "---\nprovider: claude\nbottles: dev\n---\nWrite code.\n",
        )
        .unwrap();
        let lonely = AgentManifest::parse(
            Path::new("/p/.bot-bottle/agents/lonely.md"),
            "---\nprovider: codex\n---\n",
        )
        .unwrap();
        let dev = BottleManifest::parse(
            Path::new("/p/.bot-bottle/bottles/dev.md"),
            "---\nimage:\n  packages: [jq]\nenv: {EDITOR: vi}\n---\nUse jq.\n",
        )
        .unwrap();
        catalog
            .agents
            .insert("implementer".into(), (agent, Origin::Project));
        catalog
            .agents
            .insert("lonely".into(), (lonely, Origin::Project));
        catalog.bottles.insert("dev".into(), (dev, Origin::Project));
        catalog
    }

    fn host() -> HostFacts {
        HostFacts {
            agent_uid: 1000,
            default_backend: "docker".into(),
            ..HostFacts::default()
        }
    }

    fn spec() -> BottleSpec {
        BottleSpec {
            agent: "implementer".into(),
            prompt: Some("Do the thing".into()),
            cwd: PathBuf::from("/w"),
            ..BottleSpec::default()
        }
    }

    #[test]
    fn default_bottle_comes_from_the_agent() {
        let plan = plan(&spec(), &catalog(), &host()).unwrap();
        assert_eq!(plan.bottles, vec!["dev"]);
        assert_eq!(plan.label, "implementer");
        assert!(plan.headless);
        assert_eq!(plan.argv.last().map(String::as_str), Some("Do the thing"));
        assert_eq!(plan.env["HTTPS_PROXY"], "http://127.0.0.1:3128");
        assert_eq!(plan.env["EDITOR"], "vi");
        assert_eq!(plan.files[0].contents, "Write code.\n\nUse jq.");
    }

    #[test]
    fn no_default_bottle_is_an_error_with_hint() {
        let mut spec = spec();
        spec.agent = "lonely".into();
        let err = plan(&spec, &catalog(), &host()).unwrap_err().to_string();
        assert!(
            err.starts_with("agent `lonely` has no default bottle"),
            "{err}"
        );
        assert!(err.contains("hint: pass `--bottle NAME`"), "{err}");
    }

    #[test]
    fn unknown_default_bottle_points_at_the_agent_line() {
        let mut catalog = catalog();
        let agent = AgentManifest::parse(
            Path::new("/p/.bot-bottle/agents/typo.md"),
            "---\nprovider: claude\nmodel: m\nbottles: dve\n---\n",
        )
        .unwrap();
        catalog
            .agents
            .insert("typo".into(), (agent, Origin::Project));
        let mut spec = spec();
        spec.agent = "typo".into();
        let err = plan(&spec, &catalog, &host()).unwrap_err().to_string();
        assert!(
            err.starts_with("unknown bottle `dve` (named at `/p/.bot-bottle/agents/typo.md:4`)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_bottle_and_backend_are_errors() {
        let mut bad = spec();
        bad.bottles = vec!["nope".into()];
        let err = plan(&bad, &catalog(), &host()).unwrap_err().to_string();
        assert!(err.contains("unknown bottle `nope`"), "{err}");
        let mut bad = spec();
        bad.backend = Some("vmware".into());
        let err = plan(&bad, &catalog(), &host()).unwrap_err().to_string();
        assert!(err.contains("unknown backend `vmware`"), "{err}");
    }

    #[test]
    fn color_must_be_an_ansi_name() {
        let mut bad = spec();
        bad.color = Some("chartreuse".into());
        let err = plan(&bad, &catalog(), &host()).unwrap_err().to_string();
        assert!(err.starts_with("unknown color `chartreuse`"), "{err}");
        assert!(err.contains("bright-magenta"), "{err}");
        let mut good = spec();
        good.color = Some("bright-cyan".into());
        assert_eq!(
            plan(&good, &catalog(), &host()).unwrap().color.as_deref(),
            Some("bright-cyan")
        );
    }

    #[test]
    fn workspace_manifests_are_mounted_read_only_over_a_bind_mounted_workspace() {
        let mut host = host();
        host.workspace_manifests = Some(PathBuf::from("/w/.bot-bottle"));
        let bound = plan(&spec(), &catalog(), &host).unwrap();
        assert_eq!(
            bound.mounts,
            vec![MountPlan {
                source: PathBuf::from("/w/.bot-bottle"),
                target: PathBuf::from("/workspace/.bot-bottle"),
                readonly: true,
            }]
        );
        let mut copied = spec();
        copied.copy_cwd = true;
        assert!(plan(&copied, &catalog(), &host).unwrap().mounts.is_empty());
    }

    #[test]
    fn image_tag_is_a_content_hash() {
        let a = plan(&spec(), &catalog(), &host()).unwrap();
        let b = plan(&spec(), &catalog(), &host()).unwrap();
        assert_eq!(a.image.tag, b.image.tag);
        let mut other_uid = host();
        other_uid.agent_uid = 1001;
        let c = plan(&spec(), &catalog(), &other_uid).unwrap();
        assert_ne!(a.image.tag, c.image.tag);
        assert!(a.image.dockerfile.contains("@anthropic-ai/claude-code@"));
        assert!(a.image.dockerfile.contains("'jq'"));
    }

    #[test]
    fn shell_words_quotes_only_when_needed() {
        let argv = vec!["claude".to_owned(), "-p".to_owned(), "it's done".to_owned()];
        assert_eq!(shell_words(&argv), "claude -p 'it'\\''s done'");
    }

    #[test]
    fn the_preflight_shows_a_git_rule_s_push_refs() {
        let mut rule = crate::policy::EgressRule::host("git.example");
        rule.git = Some(crate::policy::GitRule {
            repo: "owner/name".into(),
            fetch: true,
            push: true,
            push_refs: vec!["refs/heads/bot-bottle/*".into(), "refs/tags/v*".into()],
        });
        assert_eq!(
            rule_summary(&rule),
            "git.example git owner/name fetch=true push=true push_refs=refs/heads/bot-bottle/*,refs/tags/v*"
        );
        rule.git.as_mut().expect("git").push_refs.clear();
        assert_eq!(
            rule_summary(&rule),
            "git.example git owner/name fetch=true push=true"
        );
    }
}
