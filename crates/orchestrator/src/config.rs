//! The orchestrator's settings, under the seed's names (`FORGE_GITEA_API`, `FORGE_ORG`,
//! `FORGE_WATCHDOG_TIMEOUT`, …), from the environment or an `orchestrator.toml` whose
//! keys are the same names. The environment wins. Secrets are never values in the file:
//! the token and the webhook secret come from a credential source (an env variable, a
//! file or a command), as bottle credentials do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bot_bottle_core::credential::CredentialSource;

/// Every setting the orchestrator reads.
pub const KEYS: &[&str] = &[
    "FORGE_GITEA_API",
    "FORGE_ORG",
    "FORGE_BOT_USER",
    "FORGE_TOKEN",
    "FORGE_TOKEN_FILE",
    "FORGE_TOKEN_COMMAND",
    "FORGE_WEBHOOK_SECRET",
    "FORGE_WEBHOOK_SECRET_FILE",
    "FORGE_WEBHOOK_SECRET_COMMAND",
    "FORGE_WATCHDOG_TIMEOUT",
    "FORGE_LISTEN",
    "FORGE_MAX_CONCURRENT",
    "FORGE_BRANCH_PREFIX",
    "FORGE_BASE_BRANCH",
    "FORGE_GIT_URL",
    "FORGE_CA_FILE",
    "FORGE_REPOS",
];

const DEFAULT_WATCHDOG: Duration = Duration::from_secs(30 * 60);
const DEFAULT_LISTEN: &str = "127.0.0.1:8787";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "`{key}` is not set\nhint: export {key}=… or put it in {file}; `bot-bottle orchestrate --help` lists every setting"
    )]
    Missing { key: &'static str, file: String },
    #[error("`{key}` = `{value}` is invalid: {why}\nhint: {hint}")]
    Invalid {
        key: String,
        value: String,
        why: String,
        hint: String,
    },
    #[error(
        "more than one of {keys} is set\nhint: the {what} comes from exactly one source; unset the others"
    )]
    Ambiguous { keys: String, what: &'static str },
    #[error(
        "`{key}` holds a secret and may not be written in {file}\nhint: export it in the environment, or use `{key}_FILE` (a file) or `{key}_COMMAND` (e.g. `pass show gitea/bot`)"
    )]
    SecretInFile { key: &'static str, file: String },
    #[error("cannot read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` is not valid TOML: {message}\nhint: write `KEY = \"value\"` lines using the FORGE_* names", path.display())]
    Toml { path: PathBuf, message: String },
    #[error("`{}`: unknown setting `{key}`\nhint: known settings: {}", path.display(), KEYS.join(", "))]
    UnknownKey { path: PathBuf, key: String },
}

/// The orchestrator's settings, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// `FORGE_GITEA_API`: the API base including `/api/v1`.
    pub api_url: String,
    /// `FORGE_ORG` (default `bot-bottle`): assignees must be members for an issue to start a run.
    pub org: String,
    /// `FORGE_BOT_USER`: the bot's login. Its own comments never resume a run, and git
    /// authenticates as it.
    pub bot_user: String,
    /// `FORGE_TOKEN` (env only), `FORGE_TOKEN_FILE` or `FORGE_TOKEN_COMMAND`.
    pub token: CredentialSource,
    /// `FORGE_WEBHOOK_SECRET` (env only), `_FILE` or `_COMMAND`. Needed by `serve` only.
    pub webhook_secret: Option<CredentialSource>,
    /// `FORGE_WATCHDOG_TIMEOUT` (default 30 min): a running bottle silent this long is frozen.
    pub watchdog_timeout: Duration,
    /// `FORGE_LISTEN` (default 127.0.0.1:8787): the webhook listener.
    pub listen: SocketAddr,
    /// `FORGE_MAX_CONCURRENT` (default 2): sessions that run at once.
    pub max_concurrent: usize,
    /// `FORGE_BRANCH_PREFIX` (default `bot-bottle/`): a run pushes `<prefix><slug>` only.
    pub branch_prefix: String,
    /// `FORGE_BASE_BRANCH` (default `main`): what pull requests target.
    pub base_branch: String,
    /// `FORGE_GIT_URL`: where bottles clone from (default: the API URL's origin).
    pub git_url: String,
    /// `FORGE_CA_FILE`: extra roots (PEM) for a forge with a privately issued certificate.
    pub ca_file: Option<PathBuf>,
    /// `FORGE_REPOS`: `owner/name` list (comma-separated); empty means any repository
    /// whose webhook carries a valid signature.
    pub repos: Vec<String>,
}

impl Config {
    /// Reads the settings from `lookup` (the environment) and then the optional file;
    /// `lookup` wins. `need_secret`: the webhook secret is required (`serve`).
    ///
    /// # Errors
    /// A missing or invalid setting, with a hint.
    pub fn load(
        file: Option<&Path>,
        lookup: &dyn Fn(&str) -> Option<String>,
        need_secret: bool,
    ) -> Result<Self, ConfigError> {
        let from_file = match file {
            Some(path) if path.exists() => read_file(path)?,
            _ => BTreeMap::new(),
        };
        let file_name = file.map_or_else(
            || "orchestrator.toml".to_owned(),
            |p| format!("`{}`", p.display()),
        );
        for secret in ["FORGE_TOKEN", "FORGE_WEBHOOK_SECRET"] {
            if from_file.contains_key(secret) {
                return Err(ConfigError::SecretInFile {
                    key: secret,
                    file: file_name,
                });
            }
        }
        let get = |key: &str| -> Option<String> {
            lookup(key)
                .filter(|v| !v.trim().is_empty())
                .or_else(|| from_file.get(key).cloned())
                .map(|v| v.trim().to_owned())
        };
        let required = |key: &'static str| {
            get(key).ok_or_else(|| ConfigError::Missing {
                key,
                file: file_name.clone(),
            })
        };
        let invalid = |key: &str, value: &str, why: &str, hint: &str| ConfigError::Invalid {
            key: key.to_owned(),
            value: value.to_owned(),
            why: why.to_owned(),
            hint: hint.to_owned(),
        };

        let api_url = required("FORGE_GITEA_API")?;
        let origin = url_origin(&api_url).ok_or_else(|| {
            invalid(
                "FORGE_GITEA_API",
                &api_url,
                "not an http(s) URL",
                "write the API base, e.g. https://gitea.example.com/api/v1",
            )
        })?;
        let git_url = get("FORGE_GIT_URL").unwrap_or_else(|| origin.clone());
        if git_host(&git_url).is_none() || !git_url.starts_with("https://") {
            return Err(invalid(
                "FORGE_GIT_URL",
                &git_url,
                "bottles clone over HTTPS through the gateway",
                "write an https:// origin, e.g. https://gitea.example.com",
            ));
        }
        let bot_user = required("FORGE_BOT_USER")?;
        let token = source(&get, "FORGE_TOKEN", "forge token")?.ok_or(ConfigError::Missing {
            key: "FORGE_TOKEN",
            file: file_name.clone(),
        })?;
        let webhook_secret = source(&get, "FORGE_WEBHOOK_SECRET", "webhook secret")?;
        if need_secret && webhook_secret.is_none() {
            return Err(ConfigError::Missing {
                key: "FORGE_WEBHOOK_SECRET",
                file: file_name,
            });
        }
        let watchdog_timeout = match get("FORGE_WATCHDOG_TIMEOUT") {
            Some(value) => parse_duration(&value).ok_or_else(|| {
                invalid(
                    "FORGE_WATCHDOG_TIMEOUT",
                    &value,
                    "not a duration",
                    "write seconds (`1800`) or a number with s, m or h (`30m`)",
                )
            })?,
            None => DEFAULT_WATCHDOG,
        };
        let listen_text = get("FORGE_LISTEN").unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(
                "FORGE_LISTEN",
                &listen_text,
                "not an address:port",
                "write e.g. 127.0.0.1:8787",
            )
        })?;
        let max_text = get("FORGE_MAX_CONCURRENT").unwrap_or_else(|| "2".to_owned());
        let max_concurrent = max_text
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                invalid(
                    "FORGE_MAX_CONCURRENT",
                    &max_text,
                    "not a positive number",
                    "write how many sessions may run at once, e.g. 2",
                )
            })?;
        let branch_prefix = get("FORGE_BRANCH_PREFIX").unwrap_or_else(|| "bot-bottle/".to_owned());
        if branch_prefix.is_empty()
            || branch_prefix.contains(['*', '?', ' ', '~', '^', ':', '\\', '['])
            || branch_prefix.starts_with('/')
        {
            return Err(invalid(
                "FORGE_BRANCH_PREFIX",
                &branch_prefix,
                "not a plain branch-name prefix",
                "write e.g. `bot-bottle/`",
            ));
        }
        let repos: Vec<String> = get("FORGE_REPOS")
            .map(|v| {
                v.split(',')
                    .map(|r| r.trim().to_owned())
                    .filter(|r| !r.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(bad) = repos.iter().find(|r| r.split('/').count() != 2) {
            return Err(invalid(
                "FORGE_REPOS",
                bad,
                "not owner/name",
                "write a comma-separated list like `acme/widget, acme/gadget`",
            ));
        }
        Ok(Self {
            api_url: api_url.trim_end_matches('/').to_owned(),
            org: get("FORGE_ORG").unwrap_or_else(|| bot_bottle_forge::DEFAULT_FORGE_ORG.to_owned()),
            bot_user,
            token,
            webhook_secret,
            watchdog_timeout,
            listen,
            max_concurrent,
            branch_prefix,
            base_branch: get("FORGE_BASE_BRANCH").unwrap_or_else(|| "main".to_owned()),
            git_url: git_url.trim_end_matches('/').to_owned(),
            ca_file: get("FORGE_CA_FILE").map(PathBuf::from),
            repos,
        })
    }

    /// The git host and port (when not 443) bottles clone from.
    #[must_use]
    pub fn git_host(&self) -> (String, Option<u16>) {
        git_host(&self.git_url).unwrap_or_default()
    }

    /// The web origin of the forge (the API URL without `/api/v1`).
    #[must_use]
    pub fn web_url(&self) -> String {
        self.api_url
            .strip_suffix("/api/v1")
            .unwrap_or(&self.api_url)
            .to_owned()
    }

    /// Whether events for `owner/repo` are handled.
    #[must_use]
    pub fn repo_allowed(&self, owner: &str, repo: &str) -> bool {
        self.repos.is_empty()
            || self
                .repos
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&format!("{owner}/{repo}")))
    }
}

fn read_file(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let text = fs_err::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|err| ConfigError::Toml {
        path: path.to_owned(),
        message: err.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (key, value) in table {
        if !KEYS.contains(&key.as_str()) {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                key,
            });
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        out.insert(key, text);
    }
    Ok(out)
}

/// Where a secret comes from: `KEY` (in the environment: its name is the source),
/// `KEY_FILE` or `KEY_COMMAND`; at most one.
fn source(
    get: &dyn Fn(&str) -> Option<String>,
    key: &str,
    what: &'static str,
) -> Result<Option<CredentialSource>, ConfigError> {
    let file_key = format!("{key}_FILE");
    let command_key = format!("{key}_COMMAND");
    let found: Vec<CredentialSource> = [
        get(key).map(|_| CredentialSource::Env(key.to_owned())),
        get(&file_key).map(|p| CredentialSource::File(PathBuf::from(p))),
        get(&command_key).map(CredentialSource::Command),
    ]
    .into_iter()
    .flatten()
    .collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.into_iter().next()),
        _ => Err(ConfigError::Ambiguous {
            keys: format!("`{key}`, `{file_key}`, `{command_key}`"),
            what,
        }),
    }
}

/// `1800`, `45s`, `30m`, `2h`.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let secs = match unit.trim() {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// `scheme://host[:port]` of an http(s) URL.
fn url_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = rest.split('/').next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    Some(format!("{scheme}://{authority}"))
}

/// Host and non-default port of an https URL.
fn git_host(url: &str) -> Option<(String, Option<u16>)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            let port: u16 = port.parse().ok()?;
            Some((host.to_owned(), (port != 443).then_some(port)))
        }
        _ => Some((authority.to_owned(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |key| map.get(key).cloned()
    }

    const BASE: &[(&str, &str)] = &[
        ("FORGE_GITEA_API", "https://gitea.example.com/api/v1"),
        ("FORGE_BOT_USER", "bot"),
        ("FORGE_TOKEN", "t0k3n"),
        ("FORGE_WEBHOOK_SECRET", "s3cret"),
    ];

    #[test]
    fn defaults_follow_the_seed() {
        let config = Config::load(None, &env(BASE), true).expect("valid");
        assert_eq!(config.org, "bot-bottle");
        assert_eq!(config.watchdog_timeout, Duration::from_secs(1800));
        assert_eq!(config.git_url, "https://gitea.example.com");
        assert_eq!(config.git_host(), ("gitea.example.com".to_owned(), None));
        assert_eq!(config.web_url(), "https://gitea.example.com");
        assert_eq!(
            config.token,
            CredentialSource::Env("FORGE_TOKEN".to_owned())
        );
        assert_eq!(config.branch_prefix, "bot-bottle/");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8787");
    }

    #[test]
    fn missing_and_invalid_settings_refuse_with_a_hint() {
        let err = Config::load(None, &env(&BASE[1..]), true).expect_err("no API");
        assert!(err.to_string().contains("FORGE_GITEA_API"), "{err}");
        assert!(err.to_string().contains("hint:"), "{err}");
        let mut pairs = BASE.to_vec();
        pairs.pop();
        let err = Config::load(None, &env(&pairs), true).expect_err("no secret");
        assert!(err.to_string().contains("FORGE_WEBHOOK_SECRET"), "{err}");
        assert!(Config::load(None, &env(&pairs), false).is_ok());
        for (key, value) in [
            ("FORGE_WATCHDOG_TIMEOUT", "soon"),
            ("FORGE_WATCHDOG_TIMEOUT", "0"),
            ("FORGE_LISTEN", "everywhere"),
            ("FORGE_MAX_CONCURRENT", "0"),
            ("FORGE_BRANCH_PREFIX", "refs/*"),
            ("FORGE_GIT_URL", "http://gitea.example.com"),
            ("FORGE_GITEA_API", "ftp://x"),
            ("FORGE_REPOS", "justaname"),
        ] {
            let mut pairs = BASE.to_vec();
            pairs.push((key, value));
            let err = Config::load(None, &env(&pairs), true).expect_err(key);
            assert!(err.to_string().contains(key), "{err}");
            assert!(err.to_string().contains("hint:"), "{err}");
        }
        let mut pairs = BASE.to_vec();
        pairs.push(("FORGE_TOKEN_FILE", "/x"));
        let err = Config::load(None, &env(&pairs), true).expect_err("two sources");
        assert!(err.to_string().contains("exactly one source"), "{err}");
    }

    #[test]
    fn the_file_gives_settings_but_never_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("orchestrator.toml");
        std::fs::write(
            &path,
            "FORGE_GITEA_API = \"https://git.example.org:3000/api/v1\"\nFORGE_BOT_USER = \"bot\"\nFORGE_TOKEN_COMMAND = \"pass show gitea\"\nFORGE_WATCHDOG_TIMEOUT = \"45s\"\nFORGE_MAX_CONCURRENT = 3\n",
        )
        .expect("write");
        let config = Config::load(Some(&path), &env(&[]), false).expect("valid");
        assert_eq!(
            config.git_host(),
            ("git.example.org".to_owned(), Some(3000))
        );
        assert_eq!(config.max_concurrent, 3);
        assert_eq!(config.watchdog_timeout, Duration::from_secs(45));
        assert_eq!(
            config.token,
            CredentialSource::Command("pass show gitea".to_owned())
        );
        // The environment wins over the file.
        let config = Config::load(Some(&path), &env(&[("FORGE_MAX_CONCURRENT", "5")]), false)
            .expect("valid");
        assert_eq!(config.max_concurrent, 5);
        std::fs::write(&path, "FORGE_TOKEN = \"plain\"\n").expect("write");
        let err = Config::load(Some(&path), &env(BASE), false).expect_err("secret in file");
        assert!(err.to_string().contains("may not be written"), "{err}");
        std::fs::write(&path, "FORGE_TYPO = \"x\"\n").expect("write");
        let err = Config::load(Some(&path), &env(BASE), false).expect_err("unknown key");
        assert!(err.to_string().contains("FORGE_TYPO"), "{err}");
    }
}
