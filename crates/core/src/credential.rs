//! Credentials in custody: what a bottle manifest says about a secret, and the
//! placeholder the bottle holds instead of it.
//!
//! Resolving a source (reading the env, a file, running `pass show x`) is I/O and lives in
//! the egress crate, next to the only code that ever holds the real value.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One entry of a bottle's `credentials:` list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    /// The name shown in the preflight and written to the audit log (never the value).
    pub name: String,
    pub source: CredentialSource,
    /// Hosts the real value may go to: exact names or `*.suffix`, as in egress rules.
    pub hosts: Vec<String>,
    pub inject: Inject,
    /// The bottle environment variable that receives the placeholder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

/// Where the host process reads the real value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum CredentialSource {
    /// A variable of the launching process's environment.
    Env(String),
    /// A file on the host; surrounding whitespace is trimmed.
    File(PathBuf),
    /// A shell command whose trimmed stdout is the value, e.g. `pass show x`.
    Command(String),
}

/// How the real value goes on the wire toward the credential's hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Inject {
    /// `NAME: <value>`, e.g. `x-api-key`.
    Header(String),
    /// `Authorization: Bearer <value>`.
    Bearer,
    /// `Authorization: Basic base64(username:<value>)`, which is how git over HTTPS
    /// authenticates.
    Basic { username: String },
    /// `?PARAM=<value>`.
    Query(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("credential name `{name}` must be non-empty ASCII letters, digits, `-` or `_`")]
    BadName { name: String },
    #[error(
        "credential `{name}` has no `hosts`\nhint: list the hosts the secret is for, e.g. `hosts: [api.anthropic.com]`"
    )]
    NoHosts { name: String },
    #[error("credential `{name}`: host `{host}` is not a bare host name or `*.suffix`")]
    BadHost { name: String, host: String },
    #[error("credential `{name}`: `{what}` is empty")]
    Empty { name: String, what: &'static str },
    #[error("credential `{name}`: header name `{header}` is not an HTTP token")]
    BadHeader { name: String, header: String },
    #[error("credential `{name}`: env var `{var}` must match `[A-Za-z_][A-Za-z0-9_]*`")]
    BadEnvVar { name: String, var: String },
}

impl CredentialSpec {
    /// # Errors
    /// The first problem found, naming the credential.
    pub fn validate(&self) -> Result<(), CredentialError> {
        let name = &self.name;
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(CredentialError::BadName { name: name.clone() });
        }
        if self.hosts.is_empty() {
            return Err(CredentialError::NoHosts { name: name.clone() });
        }
        for host in &self.hosts {
            let probe = crate::policy::EgressPolicy {
                audit: None,
                rules: vec![crate::policy::EgressRule::host(host.clone())],
                ..crate::policy::EgressPolicy::default()
            };
            if probe.validate().is_err() {
                return Err(CredentialError::BadHost {
                    name: name.clone(),
                    host: host.clone(),
                });
            }
        }
        let empty = |what| CredentialError::Empty {
            name: name.clone(),
            what,
        };
        match &self.source {
            CredentialSource::Env(var) if var.is_empty() => return Err(empty("source.env")),
            CredentialSource::File(path) if path.as_os_str().is_empty() => {
                return Err(empty("source.file"));
            }
            CredentialSource::Command(cmd) if cmd.trim().is_empty() => {
                return Err(empty("source.command"));
            }
            _ => {}
        }
        match &self.inject {
            Inject::Header(header) => {
                let ok = !header.is_empty()
                    && header
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !ok {
                    return Err(CredentialError::BadHeader {
                        name: name.clone(),
                        header: header.clone(),
                    });
                }
            }
            Inject::Query(param) if param.is_empty() => return Err(empty("inject.query")),
            Inject::Basic { username } if username.is_empty() => {
                return Err(empty("inject.basic.username"));
            }
            _ => {}
        }
        if let Some(var) = &self.env {
            let ok = var
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(CredentialError::BadEnvVar {
                    name: name.clone(),
                    var: var.clone(),
                });
            }
        }
        Ok(())
    }

    /// Whether the real value may be sent to `host`.
    #[must_use]
    pub fn is_for_host(&self, host: &str) -> bool {
        self.hosts
            .iter()
            .any(|pattern| crate::policy::host_matches(pattern, host))
    }
}

/// Prefixes that clients (or servers) check before sending a key, longest first so that
/// `sk-ant-api03-` wins over `sk-`.
const KNOWN_PREFIXES: &[&str] = &[
    "sk-ant-admin01-",
    "sk-ant-api03-",
    "sk-ant-oat01-",
    "sk-svcacct-",
    "github_pat_",
    "sk-proj-",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "pypi-",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "npm_",
    "AKIA",
    "hf_",
    "sk-",
];

/// Below this many generated characters a placeholder could turn up by chance in
/// ordinary traffic, so shorter secrets get a longer placeholder.
const MIN_RANDOM_CHARS: usize = 24;

/// The value a bottle holds instead of the real secret.
///
/// It keeps a known prefix (`sk-ant-api03-`, `ghp_`, …) and the length of the real value,
/// so that clients which check the shape accept it; nothing else of the real value leaks
/// into it (the rest is hex if the real tail is hex, else alphanumeric). It is a pure
/// function of the bottle identity, the credential name and that shape, so a resumed
/// bottle gets the same placeholder, and two bottles never share one.
#[must_use]
pub fn placeholder(bottle: &str, credential: &str, real: &str) -> String {
    let prefix = KNOWN_PREFIXES
        .iter()
        .find(|p| real.starts_with(**p) && real.len() > p.len())
        .copied()
        .unwrap_or("");
    let tail = &real[prefix.len()..];
    let hex = !tail.is_empty() && tail.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let alphabet: &[u8] = if hex {
        b"0123456789abcdef"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    };
    let want = tail.len().max(MIN_RANDOM_CHARS);
    for attempt in 0u32.. {
        let mut out = String::with_capacity(prefix.len() + want);
        out.push_str(prefix);
        let mut block = 0u32;
        while out.len() < prefix.len() + want {
            let digest = Sha256::new()
                .chain_update(b"bot-bottle placeholder v1\0")
                .chain_update(bottle.as_bytes())
                .chain_update(b"\0")
                .chain_update(credential.as_bytes())
                .chain_update(b"\0")
                .chain_update(prefix.as_bytes())
                .chain_update(attempt.to_be_bytes())
                .chain_update(block.to_be_bytes())
                .finalize();
            for byte in digest {
                // Rejection sampling keeps the characters uniform over the alphabet.
                let limit = 256 - (256 % alphabet.len());
                if usize::from(byte) < limit && out.len() < prefix.len() + want {
                    out.push(char::from(alphabet[usize::from(byte) % alphabet.len()]));
                }
            }
            block += 1;
        }
        if out != real && !out.contains(real) {
            return out;
        }
    }
    unreachable!("a SHA-256 stream cannot equal one fixed value for every attempt")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_yaml() -> &'static str {
        r"
- name: anthropic
  source: {env: ANTHROPIC_API_KEY}
  hosts: [api.anthropic.com]
  inject: {header: x-api-key}
  env: ANTHROPIC_API_KEY
- name: gitea
  source: {command: pass show gitea}
  hosts: [gitea.example.com]
  inject: {basic: {username: bot}}
- name: openai
  source: {file: /run/secrets/openai}
  hosts: ['*.openai.com']
  inject: bearer
- name: maps
  source: {env: MAPS}
  hosts: [maps.example.com]
  inject: {query: key}
"
    }

    #[test]
    fn parses_every_source_and_injection_form() {
        let specs: Vec<CredentialSpec> = serde_saphyr::from_str(spec_yaml()).expect("parses");
        assert_eq!(
            specs[0],
            CredentialSpec {
                name: "anthropic".into(),
                source: CredentialSource::Env("ANTHROPIC_API_KEY".into()),
                hosts: vec!["api.anthropic.com".into()],
                inject: Inject::Header("x-api-key".into()),
                env: Some("ANTHROPIC_API_KEY".into()),
            }
        );
        assert_eq!(
            specs[1].source,
            CredentialSource::Command("pass show gitea".into())
        );
        assert_eq!(
            specs[1].inject,
            Inject::Basic {
                username: "bot".into()
            }
        );
        assert_eq!(
            specs[2].source,
            CredentialSource::File("/run/secrets/openai".into())
        );
        assert_eq!(specs[2].inject, Inject::Bearer);
        assert_eq!(specs[3].inject, Inject::Query("key".into()));
        for spec in &specs {
            assert_eq!(spec.validate(), Ok(()));
        }
        assert!(specs[2].is_for_host("api.openai.com"));
        assert!(!specs[2].is_for_host("openai.com.evil.example"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let typo = "name: a\nsource: {env: A}\nhosts: [a.example]\ninject: bearer\nenvv: A\n";
        serde_saphyr::from_str::<CredentialSpec>(typo).expect_err("unknown key");
        let bad_source = "name: a\nsource: {vault: A}\nhosts: [a.example]\ninject: bearer\n";
        serde_saphyr::from_str::<CredentialSpec>(bad_source).expect_err("unknown source");
        let bad_basic =
            "name: a\nsource: {env: A}\nhosts: [a.example]\ninject: {basic: {user: x}}\n";
        serde_saphyr::from_str::<CredentialSpec>(bad_basic).expect_err("unknown basic key");
    }

    #[test]
    fn validation() {
        let good = CredentialSpec {
            name: "a".into(),
            source: CredentialSource::Env("A".into()),
            hosts: vec!["a.example".into()],
            inject: Inject::Bearer,
            env: None,
        };
        assert_eq!(good.validate(), Ok(()));
        let with = |f: &dyn Fn(&mut CredentialSpec)| {
            let mut spec = good.clone();
            f(&mut spec);
            spec.validate()
        };
        assert!(matches!(
            with(&|s| s.name = "a b".into()),
            Err(CredentialError::BadName { .. })
        ));
        assert!(matches!(
            with(&|s| s.hosts.clear()),
            Err(CredentialError::NoHosts { .. })
        ));
        assert!(matches!(
            with(&|s| s.hosts = vec!["https://a.example/".into()]),
            Err(CredentialError::BadHost { .. })
        ));
        assert!(matches!(
            with(&|s| s.source = CredentialSource::Command("  ".into())),
            Err(CredentialError::Empty { .. })
        ));
        assert!(matches!(
            with(&|s| s.inject = Inject::Header("x key".into())),
            Err(CredentialError::BadHeader { .. })
        ));
        assert!(matches!(
            with(&|s| s.env = Some("1BAD".into())),
            Err(CredentialError::BadEnvVar { .. })
        ));
    }

    #[test]
    fn placeholders_keep_shape_and_are_unique() {
        let real = "sk-ant-api03-Zz9xQ1w2e3r4t5y6u7i8o9p0aSdFgHjKlZxCvBnM-1234567890AA";
        let a = placeholder("bottle-abcde", "anthropic", real);
        assert!(a.starts_with("sk-ant-api03-"), "{a}");
        assert_eq!(a.len(), real.len());
        assert_ne!(a, real);
        assert!(
            a["sk-ant-api03-".len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        );
        // Deterministic, so a resumed bottle keeps it.
        assert_eq!(a, placeholder("bottle-abcde", "anthropic", real));
        assert_ne!(a, placeholder("bottle-fghij", "anthropic", real));
        assert_ne!(a, placeholder("bottle-abcde", "anthropic-2", real));

        let gh = placeholder("b", "gh", "ghp_0123456789abcdefABCDEF0123456789abcd");
        assert!(gh.starts_with("ghp_") && gh.len() == 40, "{gh}");

        let hex = placeholder("b", "h", "0123456789abcdef0123456789abcdef");
        assert_eq!(hex.len(), 32);
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );

        // A short secret still gets enough randomness not to appear by chance.
        let short = placeholder("b", "s", "hunter2");
        assert_eq!(short.len(), MIN_RANDOM_CHARS);
        // The bare prefix is not treated as a prefix of itself.
        assert_eq!(placeholder("b", "x", "sk-").len(), MIN_RANDOM_CHARS);
    }
}
