//! Agent and bottle manifests: Markdown files with YAML front matter.
//!
//! An agent (`.bot-bottle/agents/<name>.md`) names its provider, model and default
//! bottles; its body is the agent's standing instructions. A bottle
//! (`.bot-bottle/bottles/<name>.md`) names its image, egress policy, credentials, env,
//! mounts and resources; its body is appended to the agent's instructions.
//!
//! Manifests are found in the nearest `.bot-bottle/` walking up from the working
//! directory, then in `$BOT_BOTTLE_HOME`; a nearer file wins by name.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::credential::CredentialSpec;
use crate::policy::EgressPolicy;

/// Which agent CLI runs in the bottle. A closed set: each variant's quirks live in
/// [`crate::provider`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Claude,
    Codex,
    Pi,
    Command,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 4] = [Self::Claude, Self::Codex, Self::Pi, Self::Command];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Claude => "claude",
            Self::Codex => "codex",
            Self::Pi => "pi",
            Self::Command => "command",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One name or a list of names (`bottles: dev` or `bottles: [dev, python]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    #[must_use]
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(name) => vec![name],
            Self::Many(names) => names,
        }
    }
}

/// The front matter of an agent manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFrontMatter {
    pub provider: ProviderKind,
    #[serde(default)]
    pub model: Option<String>,
    /// Default bottle(s), used when the caller names none.
    #[serde(default)]
    pub bottles: Option<OneOrMany>,
    /// The argv for `provider: command`.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Extra arguments appended to the provider's own.
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A parsed agent manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentManifest {
    pub name: String,
    pub provider: ProviderKind,
    pub model: Option<String>,
    pub default_bottles: Vec<String>,
    pub command: Option<Vec<String>>,
    pub args: Vec<String>,
    pub description: Option<String>,
    /// Standing instructions: the Markdown body.
    pub instructions: String,
    pub source: PathBuf,
    /// The line of the `bottles:` key, so an unknown default bottle can be pointed at.
    #[serde(skip)]
    pub bottles_line: Option<usize>,
}

/// How a bottle's image is made: the built-in base plus packages, or a Dockerfile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Debian packages added to the base image.
    #[serde(default)]
    pub packages: Vec<String>,
    /// A Dockerfile, relative to the manifest that names it. Replaces the base image.
    #[serde(default)]
    pub dockerfile: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// Host path; `~/` expands to the user's home.
    pub source: PathBuf,
    /// Absolute path inside the bottle.
    pub target: PathBuf,
    #[serde(default = "default_true")]
    pub readonly: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Memory limit, e.g. `2g`, `512m`.
    #[serde(default)]
    pub memory: Option<String>,
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default)]
    pub pids: Option<i64>,
}

/// The front matter of a bottle manifest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BottleFrontMatter {
    #[serde(default)]
    pub image: ImageSpec,
    #[serde(default)]
    pub egress: EgressPolicy,
    #[serde(default)]
    pub credentials: Vec<CredentialSpec>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub description: Option<String>,
    /// What happens when the gateway raises an alert (a DLP block, an exfiltration
    /// attempt, a denied approval).
    #[serde(default)]
    pub on_alert: Option<OnAlert>,
    /// Give the agent the supervise sidecar (`request_egress`, `ask_human`,
    /// `current_policy`).
    #[serde(default)]
    pub supervise: Option<bool>,
}

/// What a bottle does on an alert.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAlert {
    /// Block the request and go on (the default).
    #[default]
    Continue,
    /// Stop the agent and freeze the bottle for forensics.
    Freeze,
}

/// A parsed bottle manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BottleManifest {
    pub name: String,
    #[serde(flatten)]
    pub front: BottleFrontMatter,
    /// Notes appended to the agent's instructions.
    pub notes: String,
    pub source: PathBuf,
}

/// Everything wrong with a manifest, always naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}:1: no YAML front matter\nhint: start the file with a `---` line, the YAML keys, then another `---` line"
    )]
    NoFrontMatter { path: PathBuf },
    #[error(
        "{path}:{line}: front matter is not closed\nhint: add a `---` line after the YAML keys"
    )]
    UnclosedFrontMatter { path: PathBuf, line: usize },
    #[error("{path}:{line}: {message}\nhint: {hint}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
        hint: String,
    },
    #[error(
        "unknown agent `{name}`\nhint: known agents: {known}; add `.bot-bottle/agents/{name}.md` or run `bot-bottle agents`"
    )]
    UnknownAgent { name: String, known: String },
    #[error(
        "unknown bottle `{name}`{referrer}\nhint: known bottles: {known}; add `.bot-bottle/bottles/{name}.md` or run `bot-bottle bottles`"
    )]
    UnknownBottle {
        name: String,
        referrer: String,
        known: String,
    },
    #[error(
        "{path}: invalid name `{name}`\nhint: manifest file names use only a-z, 0-9, `-` and `_`"
    )]
    BadName { path: PathBuf, name: String },
}

const AGENT_KEYS: &str = "provider, model, bottles, command, args, description";
const BOTTLE_KEYS: &str = "image, egress, credentials, env, mounts, resources, description";

/// Splits `---\n<yaml>\n---\n<body>`. Returns (yaml, first yaml line number, body).
fn split_front_matter<'a>(path: &Path, text: &'a str) -> Result<(&'a str, &'a str), ManifestError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.split_inclusive('\n');
    let first = lines.next().unwrap_or("");
    if first.trim_end() != "---" {
        return Err(ManifestError::NoFrontMatter {
            path: path.to_owned(),
        });
    }
    let yaml_start = first.len();
    let mut offset = yaml_start;
    let mut line_no = 1;
    for line in lines {
        line_no += 1;
        if line.trim_end() == "---" {
            let yaml = &text[yaml_start..offset];
            let body = &text[offset + line.len()..];
            return Ok((yaml, body));
        }
        offset += line.len();
    }
    Err(ManifestError::UnclosedFrontMatter {
        path: path.to_owned(),
        line: line_no,
    })
}

fn parse_front<T: for<'de> Deserialize<'de>>(
    path: &Path,
    yaml: &str,
    known_keys: &str,
) -> Result<T, ManifestError> {
    // An empty front matter is an empty mapping, not a null document.
    let yaml = if yaml.trim().is_empty() { "{}" } else { yaml };
    serde_saphyr::from_str::<T>(yaml).map_err(|err| {
        // +1 for the opening `---` line.
        let line = err
            .location()
            .map_or(1, |loc| usize::try_from(loc.line()).unwrap_or(0) + 1);
        let message = first_line_of(&err.to_string());
        let hint = if message.contains("unknown field") {
            format!("known keys here: {known_keys}")
        } else {
            "see docs/manifests.md for the manifest format".to_owned()
        };
        ManifestError::Invalid {
            path: path.to_owned(),
            line,
            message,
            hint,
        }
    })
}

/// serde-saphyr renders a snippet under its message; the first line is the message.
fn first_line_of(rendered: &str) -> String {
    let line = rendered.lines().next().unwrap_or(rendered).trim();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

fn name_from_path(path: &Path) -> Result<String, ManifestError> {
    let name = path
        .file_stem()
        .and_then(|stem| stem.to_str())
        .unwrap_or_default()
        .to_owned();
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if valid {
        Ok(name)
    } else {
        Err(ManifestError::BadName {
            path: path.to_owned(),
            name,
        })
    }
}

impl AgentManifest {
    /// Parses an agent manifest's text; `path` names it in errors and gives its name.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ManifestError> {
        let name = name_from_path(path)?;
        let (yaml, body) = split_front_matter(path, text)?;
        let front: AgentFrontMatter = parse_front(path, yaml, AGENT_KEYS)?;
        let invalid = |message: String, hint: &str| ManifestError::Invalid {
            path: path.to_owned(),
            line: 2,
            message,
            hint: hint.to_owned(),
        };
        match (front.provider, &front.command) {
            (ProviderKind::Command, None) => {
                return Err(invalid(
                    "`provider: command` needs a `command:` list".to_owned(),
                    "add `command: [\"bash\", \"-lc\", \"make test\"]`",
                ));
            }
            (ProviderKind::Command, Some(argv)) if argv.is_empty() => {
                return Err(invalid(
                    "`command:` is empty".to_owned(),
                    "give the program and its arguments, e.g. `command: [\"true\"]`",
                ));
            }
            (kind, Some(_)) if kind != ProviderKind::Command => {
                return Err(invalid(
                    format!("`command:` is only valid with `provider: command`, not `{kind}`"),
                    "remove `command:`, or use `args:` to add arguments to the provider's CLI",
                ));
            }
            _ => {}
        }
        Ok(Self {
            name,
            provider: front.provider,
            model: front.model,
            default_bottles: front.bottles.map(OneOrMany::into_vec).unwrap_or_default(),
            command: front.command,
            args: front.args,
            description: front.description,
            instructions: body.trim().to_owned(),
            source: path.to_owned(),
            // +2: the opening `---` is line 1.
            bottles_line: yaml
                .lines()
                .position(|line| line.starts_with("bottles:"))
                .map(|index| index + 2),
        })
    }
}

impl BottleManifest {
    /// Parses a bottle manifest's text; `path` names it in errors and gives its name.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ManifestError> {
        let name = name_from_path(path)?;
        let (yaml, body) = split_front_matter(path, text)?;
        let mut front: BottleFrontMatter = parse_front(path, yaml, BOTTLE_KEYS)?;
        // A Dockerfile path is relative to the manifest that names it.
        if let (Some(dockerfile), Some(dir)) = (&front.image.dockerfile, path.parent())
            && dockerfile.is_relative()
        {
            front.image.dockerfile = Some(dir.join(dockerfile));
        }
        if let (Some(rules), Some(dir)) = (&front.egress.dlp.rules_file, path.parent())
            && rules.is_relative()
        {
            front.egress.dlp.rules_file = Some(dir.join(rules));
        }
        for mount in &front.mounts {
            if !mount.target.is_absolute() {
                return Err(ManifestError::Invalid {
                    path: path.to_owned(),
                    line: 2,
                    message: format!(
                        "mount target `{}` is not an absolute path",
                        mount.target.display()
                    ),
                    hint: "mount targets are paths inside the bottle, e.g. `/data`".to_owned(),
                });
            }
        }
        front
            .egress
            .validate()
            .map_err(|err| ManifestError::Invalid {
                path: path.to_owned(),
                line: 2,
                message: err.to_string(),
                hint: "see docs/manifests.md, section `egress`".to_owned(),
            })?;
        Ok(Self {
            name,
            front,
            notes: body.trim().to_owned(),
            source: path.to_owned(),
        })
    }
}

/// Where a manifest came from, for `bot-bottle agents` and `bot-bottle bottles`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The nearest `.bot-bottle/` walking up from the working directory.
    Project,
    /// `$BOT_BOTTLE_HOME`.
    Home,
}

/// All agents and bottles visible from one working directory.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub agents: BTreeMap<String, (AgentManifest, Origin)>,
    pub bottles: BTreeMap<String, (BottleManifest, Origin)>,
    /// The manifest roots searched, nearest first.
    pub roots: Vec<(PathBuf, Origin)>,
}

/// The nearest `.bot-bottle/` directory at or above `cwd`, if any.
#[must_use]
pub fn find_project_root(cwd: &Path) -> Option<PathBuf> {
    cwd.ancestors()
        .map(|dir| dir.join(".bot-bottle"))
        .find(|candidate| candidate.is_dir())
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut entries = Vec::new();
    for entry in fs_err::read_dir(dir).map_err(|source| ManifestError::Read {
        path: dir.to_owned(),
        source,
    })? {
        let entry = entry.map_err(|source| ManifestError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "md") {
            entries.push(path);
        }
    }
    entries.sort();
    Ok(entries)
}

fn read_text(path: &Path) -> Result<String, ManifestError> {
    fs_err::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })
}

impl Catalog {
    /// Loads every manifest visible from `cwd`: the nearest `.bot-bottle/` first, then
    /// `home` (`$BOT_BOTTLE_HOME`). The nearer file wins by name. When the project root
    /// and home are the same directory it is read once, as the project.
    pub fn resolve(cwd: &Path, home: &Path) -> Result<Self, ManifestError> {
        let mut roots = Vec::new();
        if let Some(project) = find_project_root(cwd) {
            roots.push((project, Origin::Project));
        }
        let same_as_project = roots
            .first()
            .is_some_and(|(project, _)| project.canonicalize().ok() == home.canonicalize().ok());
        if !same_as_project {
            roots.push((home.to_owned(), Origin::Home));
        }
        Self::from_roots(roots)
    }

    /// Loads manifests from explicit roots, nearest first.
    pub fn from_roots(roots: Vec<(PathBuf, Origin)>) -> Result<Self, ManifestError> {
        let mut catalog = Catalog {
            roots: roots.clone(),
            ..Catalog::default()
        };
        // Farthest first, so a nearer file replaces a farther one of the same name.
        for (root, origin) in roots.iter().rev() {
            for path in read_dir_sorted(&root.join("agents"))? {
                let agent = AgentManifest::parse(&path, &read_text(&path)?)?;
                catalog.agents.insert(agent.name.clone(), (agent, *origin));
            }
            for path in read_dir_sorted(&root.join("bottles"))? {
                let bottle = BottleManifest::parse(&path, &read_text(&path)?)?;
                catalog
                    .bottles
                    .insert(bottle.name.clone(), (bottle, *origin));
            }
        }
        Ok(catalog)
    }

    pub fn agent(&self, name: &str) -> Result<&AgentManifest, ManifestError> {
        self.agents
            .get(name)
            .map(|(agent, _)| agent)
            .ok_or_else(|| ManifestError::UnknownAgent {
                name: name.to_owned(),
                known: known_list(self.agents.keys()),
            })
    }

    pub fn bottle(
        &self,
        name: &str,
        referrer: Option<(&Path, Option<usize>)>,
    ) -> Result<&BottleManifest, ManifestError> {
        self.bottles
            .get(name)
            .map(|(bottle, _)| bottle)
            .ok_or_else(|| ManifestError::UnknownBottle {
                name: name.to_owned(),
                referrer: match referrer {
                    Some((path, Some(line))) => format!(" (named at `{}:{line}`)", path.display()),
                    Some((path, None)) => format!(" (named in `{}`)", path.display()),
                    None => String::new(),
                },
                known: known_list(self.bottles.keys()),
            })
    }
}

fn known_list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<String> = names.map(|name| format!("`{name}`")).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// Bottles composed in order: scalars last-wins, lists append, maps merge with later
/// keys winning, egress rules union.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ComposedBottle {
    pub names: Vec<String>,
    pub packages: Vec<String>,
    pub dockerfile: Option<PathBuf>,
    pub egress: EgressPolicy,
    pub credentials: Vec<CredentialSpec>,
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<MountSpec>,
    pub resources: Resources,
    pub notes: Vec<String>,
    /// The last bottle's `on_alert` wins.
    pub on_alert: OnAlert,
    /// The last bottle's `supervise` wins.
    pub supervise: bool,
}

#[must_use]
pub fn compose(bottles: &[&BottleManifest]) -> ComposedBottle {
    let mut out = ComposedBottle::default();
    for bottle in bottles {
        let front = &bottle.front;
        out.names.push(bottle.name.clone());
        for package in &front.image.packages {
            if !out.packages.contains(package) {
                out.packages.push(package.clone());
            }
        }
        if front.image.dockerfile.is_some() {
            out.dockerfile.clone_from(&front.image.dockerfile);
        }
        out.egress.merge(front.egress.clone());
        out.credentials.extend(front.credentials.iter().cloned());
        out.env
            .extend(front.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.mounts.extend(front.mounts.iter().cloned());
        let resources = &front.resources;
        if resources.memory.is_some() {
            out.resources.memory.clone_from(&resources.memory);
        }
        if resources.cpus.is_some() {
            out.resources.cpus = resources.cpus;
        }
        if resources.pids.is_some() {
            out.resources.pids = resources.pids;
        }
        if !bottle.notes.is_empty() {
            out.notes.push(bottle.notes.clone());
        }
        if let Some(on_alert) = front.on_alert {
            out.on_alert = on_alert;
        }
        if let Some(supervise) = front.supervise {
            out.supervise = supervise;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(text: &str) -> Result<AgentManifest, ManifestError> {
        AgentManifest::parse(Path::new("/p/.bot-bottle/agents/impl.md"), text)
    }

    fn bottle(name: &str, text: &str) -> BottleManifest {
        BottleManifest::parse(
            Path::new(&format!("/p/.bot-bottle/bottles/{name}.md")),
            text,
        )
        .unwrap()
    }

    #[test]
    fn parses_agent_front_matter_and_body() {
        let parsed =
            agent("---\nprovider: claude\nmodel: m1\nbottles: dev\n---\nBe careful.\n").unwrap();
        assert_eq!(parsed.name, "impl");
        assert_eq!(parsed.provider, ProviderKind::Claude);
        assert_eq!(parsed.model.as_deref(), Some("m1"));
        assert_eq!(parsed.default_bottles, vec!["dev".to_owned()]);
        assert_eq!(parsed.instructions, "Be careful.");
    }

    #[test]
    fn bottles_may_be_a_list() {
        let parsed = agent("---\nprovider: pi\nbottles: [a, b]\n---\n").unwrap();
        assert_eq!(parsed.default_bottles, vec!["a".to_owned(), "b".to_owned()]);
    }

    #[test]
    fn unknown_key_names_file_line_and_known_keys() {
        let err = agent("---\nprovider: claude\nmodle: x\n---\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/p/.bot-bottle/agents/impl.md:3:"), "{err}");
        assert!(err.contains("modle"), "{err}");
        assert!(
            err.contains("hint: known keys here: provider, model"),
            "{err}"
        );
    }

    #[test]
    fn bad_provider_is_an_error_with_line() {
        let err = agent("---\nmodel: x\nprovider: gpt\n---\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/p/.bot-bottle/agents/impl.md:3:"), "{err}");
        assert!(err.contains("gpt"), "{err}");
    }

    #[test]
    fn missing_front_matter_has_a_hint() {
        let err = agent("provider: claude\n").unwrap_err().to_string();
        assert!(err.contains("no YAML front matter"), "{err}");
        assert!(err.contains("hint:"), "{err}");
        let err = agent("---\nprovider: claude\n").unwrap_err().to_string();
        assert!(err.contains("not closed"), "{err}");
    }

    #[test]
    fn command_provider_needs_argv() {
        let err = agent("---\nprovider: command\n---\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a `command:` list"), "{err}");
        let ok = agent("---\nprovider: command\ncommand: [\"true\"]\n---\n").unwrap();
        assert_eq!(ok.command, Some(vec!["true".to_owned()]));
        let err = agent("---\nprovider: claude\ncommand: [x]\n---\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("only valid with `provider: command`"), "{err}");
    }

    #[test]
    fn bottle_dockerfile_is_relative_to_manifest() {
        let parsed = bottle("py", "---\nimage:\n  dockerfile: ../Dockerfile\n---\n");
        assert_eq!(
            parsed.front.image.dockerfile,
            Some(PathBuf::from("/p/.bot-bottle/bottles/../Dockerfile"))
        );
    }

    #[test]
    fn dlp_section_parses_composes_and_resolves_its_file() {
        let a = bottle(
            "a",
            "---\negress:\n  dlp:\n    rules_file: rules/gitleaks.toml\n    actions: {generic-api-key: log}\n---\n",
        );
        let b = bottle(
            "b",
            "---\negress:\n  dlp:\n    default_action: log\n    actions: {aws-access-token: block}\n---\n",
        );
        let composed = compose(&[&a, &b]);
        let dlp = &composed.egress.dlp;
        assert_eq!(
            dlp.rules_file,
            Some(PathBuf::from("/p/.bot-bottle/bottles/rules/gitleaks.toml"))
        );
        assert_eq!(dlp.default_action, Some(crate::policy::DlpAction::Log));
        assert_eq!(dlp.actions.len(), 2);
        let err = BottleManifest::parse(
            Path::new("/p/.bot-bottle/bottles/c.md"),
            "---\negress:\n  dlp:\n    default_action: ignore\n---\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ignore"), "{err}");
    }

    #[test]
    fn relative_mount_target_is_rejected() {
        let err = BottleManifest::parse(
            Path::new("/p/.bot-bottle/bottles/m.md"),
            "---\nmounts:\n  - source: /tmp\n    target: data\n---\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not an absolute path"), "{err}");
    }

    #[test]
    fn compose_scalars_last_wins_lists_append_env_merges() {
        let a = bottle(
            "a",
            "---\nimage:\n  packages: [git, curl]\nenv: {A: '1', B: '1'}\nresources: {memory: 1g, pids: 100}\n---\nnote a\n",
        );
        let b = bottle(
            "b",
            "---\nimage:\n  packages: [curl, jq]\nenv: {B: '2'}\nresources: {memory: 2g}\n---\nnote b\n",
        );
        let composed = compose(&[&a, &b]);
        assert_eq!(composed.names, vec!["a", "b"]);
        assert_eq!(composed.packages, vec!["git", "curl", "jq"]);
        assert_eq!(composed.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(composed.env.get("B").map(String::as_str), Some("2"));
        assert_eq!(composed.resources.memory.as_deref(), Some("2g"));
        assert_eq!(composed.resources.pids, Some(100));
        assert_eq!(composed.notes, vec!["note a", "note b"]);
    }

    #[test]
    fn nearer_root_wins_and_origin_is_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let project = tmp.path().join("proj/.bot-bottle");
        for root in [&home, &project] {
            std::fs::create_dir_all(root.join("agents")).unwrap();
        }
        std::fs::write(home.join("agents/a.md"), "---\nprovider: pi\n---\nhome\n").unwrap();
        std::fs::write(home.join("agents/h.md"), "---\nprovider: pi\n---\n").unwrap();
        std::fs::write(
            project.join("agents/a.md"),
            "---\nprovider: codex\n---\nproject\n",
        )
        .unwrap();
        let cwd = tmp.path().join("proj/src/deep");
        std::fs::create_dir_all(&cwd).unwrap();
        let catalog = Catalog::resolve(&cwd, &home).unwrap();
        let (a, origin) = &catalog.agents["a"];
        assert_eq!(
            (a.provider, *origin),
            (ProviderKind::Codex, Origin::Project)
        );
        assert_eq!(catalog.agents["h"].1, Origin::Home);
        let err = catalog.agent("zzz").unwrap_err().to_string();
        assert!(err.contains("known agents: `a`, `h`"), "{err}");
    }
}
