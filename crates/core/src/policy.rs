//! Egress policy: what a bottle may send out, as plain data, and the pure matcher the
//! gateway asks for every request.
//!
//! The policy is default deny: a request that no rule allows is blocked, and an empty rule
//! list blocks everything. Rules are a union, so their order never changes a decision; the
//! first allowing rule is only reported as the reason.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The `egress:` section of a bottle manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// What the audit log records. `None` means "not set here", so that composing
    /// bottles lets a later bottle that says nothing keep an earlier one's level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditLevel>,
    #[serde(default)]
    pub rules: Vec<EgressRule>,
    /// What the DLP scanner looks for and does on a finding.
    #[serde(default, skip_serializing_if = "DlpPolicy::is_default")]
    pub dlp: DlpPolicy,
}

/// The `egress.dlp:` section: which rules scan outbound traffic, and what a finding does.
/// Custody secrets and placeholders headed to the wrong host are always blocked,
/// whatever this says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlpPolicy {
    /// A rule file in the gitleaks v8 format; unset means the built-in rule set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules_file: Option<std::path::PathBuf>,
    /// What a finding of a rule without its own action does (default `block`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<DlpAction>,
    /// Per-rule actions, by gitleaks rule id.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub actions: std::collections::BTreeMap<String, DlpAction>,
}

impl DlpPolicy {
    #[must_use]
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What a DLP finding does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DlpAction {
    /// Refuse the request (403) and audit the finding.
    Block,
    /// Let the request through and audit the finding.
    Log,
}

/// How much of the traffic the audit log records. Blocks, DLP findings, placeholder
/// misuse, passthrough tunnels and policy updates are always recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditLevel {
    #[default]
    Blocks,
    All,
}

/// One allow rule. Fields left out mean "any" (ports: 80 and 443).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// An exact host name, or `*.suffix` for any subdomain of `suffix` (not `suffix` itself).
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Path globs: `*` matches any run of characters (including `/`), `?` one character.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Tunnel TLS without interception, for pinned or mTLS clients. The decision is by
    /// host and port only, and no body is inspected, so methods, paths and git rules are
    /// rejected beside it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub passthrough: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub dangerously_allow_private_upstreams: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitRule>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(value: &bool) -> bool {
    !*value
}

/// Git smart-HTTP access to one repository, fetch and push decided separately.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitRule {
    /// `owner/name`, matched case-insensitively (as Gitea and GitHub do), with or without
    /// a trailing `.git` in the request path.
    pub repo: String,
    #[serde(default = "default_true")]
    pub fetch: bool,
    #[serde(default)]
    pub push: bool,
    /// Globs over full ref names (`refs/heads/bot-bottle/*`) that a push may create or
    /// update. When any git rule for a repository sets them, the gateway reads the
    /// ref-update commands of every push to it and refuses the whole push if one command
    /// deletes a ref, names a ref no glob matches, or names a tag no `refs/tags/` glob
    /// names. Empty means `push: true` allows any ref.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push_refs: Vec<String>,
}

fn default_true() -> bool {
    true
}

/// Headers that frameworks (Express's `method-override`, Symfony, ASP.NET, Google APIs)
/// read as the request's method in place of the real one. See
/// [`EgressPolicy::decide_overridable`].
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Headers that servers behind URL-rewriting front ends (IIS URL Rewrite, older Symfony and
/// Zend request objects) read as the request's path in place of the real one. See
/// [`EgressPolicy::decide_with_overrides`].
pub const PATH_OVERRIDE_HEADERS: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// The one method all `values` name, upper-cased; `None` if one is empty or not a token,
/// or they name different methods.
fn override_method(values: &[&[u8]]) -> Option<String> {
    let mut method: Option<String> = None;
    for value in values {
        let token_ok = !value.is_empty() && value.iter().all(|&b| is_token_byte(b));
        if !token_ok {
            return None;
        }
        let upper = String::from_utf8_lossy(value).to_ascii_uppercase();
        match &method {
            Some(seen) if *seen != upper => return None,
            Some(_) => {}
            None => method = Some(upper),
        }
    }
    method
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What the gateway knows about one request when it asks the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    pub host: &'a str,
    pub port: u16,
    pub method: &'a str,
    /// The path without the query, e.g. `/v1/messages`.
    pub path: &'a str,
    /// The raw query string without `?`, if any.
    pub query: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Block,
}

/// Why a decision came out as it did; the kebab-case name is what the gateway puts in its
/// `x-bot-bottle-block` header and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    AllowedByRule,
    AllowedPassthrough,
    NotInAllowlist,
    PortNotAllowed,
    MethodNotAllowed,
    PathNotAllowed,
    GitRepoNotAllowed,
    GitFetchNotAllowed,
    GitPushNotAllowed,
    /// The path has dot segments (also `..;param`), encoded dots or slashes at any depth
    /// of encoding, backslashes or malformed escapes: the origin might normalise it to a
    /// path the rules never saw, so it is refused outright.
    AmbiguousPath,
    /// The real method is allowed, but a method-override header
    /// ([`METHOD_OVERRIDE_HEADERS`]) names one that is not.
    MethodOverrideNotAllowed,
    /// A method-override header is empty, not a method token, or the override headers
    /// name more than one method.
    BadMethodOverride,
    /// The real path is allowed, but a path-override header ([`PATH_OVERRIDE_HEADERS`])
    /// names one that is not.
    PathOverrideNotAllowed,
    /// A path-override header is not an origin-form path (`/…`).
    BadPathOverride,
}

impl Reason {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AllowedByRule => "allowed-by-rule",
            Reason::AllowedPassthrough => "allowed-passthrough",
            Reason::NotInAllowlist => "not-in-allowlist",
            Reason::PortNotAllowed => "port-not-allowed",
            Reason::MethodNotAllowed => "method-not-allowed",
            Reason::PathNotAllowed => "path-not-allowed",
            Reason::GitRepoNotAllowed => "git-repo-not-allowed",
            Reason::GitFetchNotAllowed => "git-fetch-not-allowed",
            Reason::GitPushNotAllowed => "git-push-not-allowed",
            Reason::AmbiguousPath => "ambiguous-path",
            Reason::MethodOverrideNotAllowed => "method-override-not-allowed",
            Reason::BadMethodOverride => "bad-method-override",
            Reason::PathOverrideNotAllowed => "path-override-not-allowed",
            Reason::BadPathOverride => "bad-path-override",
        }
    }

    /// How close a non-matching rule came: the block reports the closest miss, so the
    /// agent learns "push not allowed" rather than "not in allowlist".
    fn specificity(self) -> u8 {
        match self {
            Reason::AllowedByRule | Reason::AllowedPassthrough => 9,
            Reason::NotInAllowlist => 0,
            Reason::PortNotAllowed => 1,
            Reason::MethodNotAllowed => 2,
            Reason::PathNotAllowed | Reason::GitRepoNotAllowed => 3,
            Reason::GitFetchNotAllowed | Reason::GitPushNotAllowed => 4,
            Reason::AmbiguousPath => 5,
            Reason::MethodOverrideNotAllowed
            | Reason::BadMethodOverride
            | Reason::PathOverrideNotAllowed
            | Reason::BadPathOverride => 6,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// Index into `EgressPolicy::rules` of the allowing rule, or of the closest miss.
    pub rule: Option<usize>,
    pub reason: Reason,
}

impl Decision {
    #[must_use]
    pub fn is_allow(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    fn block(reason: Reason, rule: Option<usize>) -> Self {
        Decision {
            verdict: Verdict::Block,
            rule,
            reason,
        }
    }
}

/// The host-level answer for a CONNECT: may a tunnel to `host:port` be opened at all,
/// and is it to be intercepted or passed through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectDecision {
    pub verdict: Verdict,
    pub rule: Option<usize>,
    pub reason: Reason,
    /// True when the allowing rule is `passthrough` (and no intercepting rule also
    /// allows the host, in which case interception wins: it keeps L7 checks).
    pub passthrough: bool,
}

impl ConnectDecision {
    #[must_use]
    pub fn is_allow(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "egress rule {index}: host is empty\nhint: set `host: api.example.com` or `host: \"*.example.com\"`"
    )]
    EmptyHost { index: usize },
    #[error(
        "egress rule {index}: host `{host}` is not a bare host name\nhint: write only the name, e.g. `api.example.com` or `*.example.com`; use `port:` for the port"
    )]
    BadHost { index: usize, host: String },
    #[error("egress rule {index}: port 0 is not a valid port")]
    BadPort { index: usize },
    #[error("egress rule {index}: method `{method}` is not an HTTP method token")]
    BadMethod { index: usize, method: String },
    #[error("egress rule {index}: path glob `{glob}` must start with `/` or be `*`")]
    BadGlob { index: usize, glob: String },
    #[error("egress rule {index}: git repo `{repo}` is not `owner/name`")]
    BadGitRepo { index: usize, repo: String },
    #[error(
        "egress rule {index}: git push_refs glob `{glob}` is not a ref glob\nhint: write a full ref name glob starting with `refs/`, e.g. `refs/heads/bot-bottle/*`"
    )]
    BadPushRef { index: usize, glob: String },
    #[error(
        "egress rule {index}: git push_refs is set but push is not\nhint: add `push: true` to the git rule, or drop `push_refs`"
    )]
    PushRefsWithoutPush { index: usize },
    #[error("egress rule {index}: `{field}` cannot be combined with `{other}`\nhint: {hint}")]
    Conflict {
        index: usize,
        field: &'static str,
        other: &'static str,
        hint: &'static str,
    },
}

impl EgressPolicy {
    /// The audit level in force (`blocks` unless some bottle set it).
    #[must_use]
    pub fn audit_level(&self) -> AuditLevel {
        self.audit.unwrap_or_default()
    }

    /// Composes a later bottle's policy onto this one: rules are a union (exact
    /// duplicates are dropped), and a later `audit:` wins.
    pub fn merge(&mut self, other: EgressPolicy) {
        if other.audit.is_some() {
            self.audit = other.audit;
        }
        if other.dlp.rules_file.is_some() {
            self.dlp.rules_file = other.dlp.rules_file;
        }
        if other.dlp.default_action.is_some() {
            self.dlp.default_action = other.dlp.default_action;
        }
        self.dlp.actions.extend(other.dlp.actions);
        for rule in other.rules {
            if !self.rules.contains(&rule) {
                self.rules.push(rule);
            }
        }
    }

    /// Checks every rule; the gateway refuses to start on an invalid policy.
    ///
    /// # Errors
    /// The first invalid rule, by index.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (index, rule) in self.rules.iter().enumerate() {
            rule.validate(index)?;
        }
        Ok(())
    }

    /// Decides one HTTP request (absolute-form, or one inside an intercepted tunnel).
    #[must_use]
    pub fn decide(&self, facts: &RequestFacts<'_>) -> Decision {
        if path_is_ambiguous(facts.path) {
            return Decision::block(Reason::AmbiguousPath, None);
        }
        let mut best = Decision::block(Reason::NotInAllowlist, None);
        for (index, rule) in self.rules.iter().enumerate() {
            if rule.passthrough {
                // Passthrough rules never see a request: the tunnel carries opaque TLS.
                continue;
            }
            match rule.check(facts) {
                Ok(()) => {
                    return Decision {
                        verdict: Verdict::Allow,
                        rule: Some(index),
                        reason: Reason::AllowedByRule,
                    };
                }
                Err(reason) if reason.specificity() > best.reason.specificity() => {
                    best = Decision::block(reason, Some(index));
                }
                Err(_) => {}
            }
        }
        best
    }

    /// Decides a request that may carry method-override headers: `overrides` holds every
    /// value of every [`METHOD_OVERRIDE_HEADERS`] header. Frameworks that honour them run
    /// the named method, so the request must be allowed both as its real method and as
    /// the one they name; values naming different methods, an empty value or one that is
    /// not a method token are refused, since origins disagree on which one wins.
    #[must_use]
    pub fn decide_overridable(&self, facts: &RequestFacts<'_>, overrides: &[&[u8]]) -> Decision {
        self.decide_with_overrides(facts, overrides, &[])
    }

    /// [`EgressPolicy::decide_overridable`], and also every value of every
    /// [`PATH_OVERRIDE_HEADERS`] header in `paths`: a server that honours one serves the
    /// path it names, so that path (with its query) must be allowed too, under the same
    /// method, with the same ambiguity checks. A value that is not an origin-form path is
    /// refused.
    #[must_use]
    pub fn decide_with_overrides(
        &self,
        facts: &RequestFacts<'_>,
        overrides: &[&[u8]],
        paths: &[&[u8]],
    ) -> Decision {
        let decision = self.decide_methods(facts, overrides);
        if !decision.is_allow() {
            return decision;
        }
        for value in paths {
            let Some(named) = std::str::from_utf8(value)
                .ok()
                .filter(|v| v.starts_with('/') && !v.starts_with("//"))
                .filter(|v| !v.bytes().any(|b| b.is_ascii_control() || b == b' '))
            else {
                return Decision::block(Reason::BadPathOverride, decision.rule);
            };
            let (path, query) = match named.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (named, None),
            };
            let overridden = self.decide(&RequestFacts {
                path,
                query,
                ..*facts
            });
            if !overridden.is_allow() {
                let reason = if overridden.reason == Reason::AmbiguousPath {
                    Reason::AmbiguousPath
                } else {
                    Reason::PathOverrideNotAllowed
                };
                return Decision::block(reason, overridden.rule);
            }
        }
        decision
    }

    fn decide_methods(&self, facts: &RequestFacts<'_>, overrides: &[&[u8]]) -> Decision {
        let decision = self.decide(facts);
        if !decision.is_allow() || overrides.is_empty() {
            return decision;
        }
        let Some(method) = override_method(overrides) else {
            return Decision::block(Reason::BadMethodOverride, decision.rule);
        };
        if method.eq_ignore_ascii_case(facts.method) {
            return decision;
        }
        let overridden = self.decide(&RequestFacts {
            method: &method,
            ..*facts
        });
        if overridden.is_allow() {
            decision
        } else {
            Decision::block(Reason::MethodOverrideNotAllowed, overridden.rule)
        }
    }

    /// Decides a CONNECT by host and port only. Requests inside an intercepted tunnel are
    /// decided again, one by one, with [`EgressPolicy::decide`].
    #[must_use]
    pub fn decide_connect(&self, host: &str, port: u16) -> ConnectDecision {
        let mut passthrough = None;
        let mut best = (Reason::NotInAllowlist, None);
        for (index, rule) in self.rules.iter().enumerate() {
            if !host_matches(&rule.host, host) {
                continue;
            }
            if !rule.port_matches(port) {
                if Reason::PortNotAllowed.specificity() > best.0.specificity() {
                    best = (Reason::PortNotAllowed, Some(index));
                }
                continue;
            }
            if rule.passthrough {
                passthrough.get_or_insert(index);
            } else {
                return ConnectDecision {
                    verdict: Verdict::Allow,
                    rule: Some(index),
                    reason: Reason::AllowedByRule,
                    passthrough: false,
                };
            }
        }
        match passthrough {
            Some(index) => ConnectDecision {
                verdict: Verdict::Allow,
                rule: Some(index),
                reason: Reason::AllowedPassthrough,
                passthrough: true,
            },
            None => ConnectDecision {
                verdict: Verdict::Block,
                rule: best.1,
                reason: best.0,
                passthrough: false,
            },
        }
    }

    /// Whether some rule naming `host` sets `dangerously_allow_private_upstreams`.
    #[must_use]
    pub fn allows_private_upstream(&self, host: &str) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.dangerously_allow_private_upstreams && host_matches(&rule.host, host))
    }
}

impl EgressRule {
    /// A rule allowing any request to `host` on the default ports.
    #[must_use]
    pub fn host(host: impl Into<String>) -> Self {
        EgressRule {
            host: host.into(),
            ..EgressRule::default()
        }
    }

    fn validate(&self, index: usize) -> Result<(), PolicyError> {
        let host = self.host.as_str();
        if host.is_empty() {
            return Err(PolicyError::EmptyHost { index });
        }
        let name = host.strip_prefix("*.").unwrap_or(host);
        let name_ok = !name.is_empty()
            && !name.starts_with('.')
            && !name.ends_with('.')
            && !name.contains("..")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        // An IPv6 literal is allowed in brackets-free form, e.g. `::1`.
        let ipv6_ok = name.parse::<std::net::Ipv6Addr>().is_ok() && !host.starts_with("*.");
        if !name_ok && !ipv6_ok {
            return Err(PolicyError::BadHost {
                index,
                host: self.host.clone(),
            });
        }
        if self.port == Some(0) {
            return Err(PolicyError::BadPort { index });
        }
        for method in &self.methods {
            let token_ok = !method.is_empty() && method.bytes().all(is_token_byte);
            if !token_ok {
                return Err(PolicyError::BadMethod {
                    index,
                    method: method.clone(),
                });
            }
        }
        for glob in &self.paths {
            if !(glob.starts_with('/') || glob == "*") {
                return Err(PolicyError::BadGlob {
                    index,
                    glob: glob.clone(),
                });
            }
        }
        if let Some(git) = &self.git {
            let parts: Vec<&str> = git.repo.split('/').collect();
            let ok = parts.len() == 2
                && parts.iter().all(|part| {
                    !part.is_empty()
                        && *part != "."
                        && *part != ".."
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                });
            if !ok {
                return Err(PolicyError::BadGitRepo {
                    index,
                    repo: git.repo.clone(),
                });
            }
            if !git.push_refs.is_empty() && !git.push {
                return Err(PolicyError::PushRefsWithoutPush { index });
            }
            if let Some(glob) = git.push_refs.iter().find(|glob| !push_ref_glob_ok(glob)) {
                return Err(PolicyError::BadPushRef {
                    index,
                    glob: glob.clone(),
                });
            }
            if !self.paths.is_empty() || !self.methods.is_empty() {
                return Err(PolicyError::Conflict {
                    index,
                    field: "git",
                    other: if self.paths.is_empty() {
                        "methods"
                    } else {
                        "paths"
                    },
                    hint: "a git rule chooses its own smart-HTTP paths; put other paths in a separate rule",
                });
            }
        }
        if self.passthrough {
            let other = if !self.methods.is_empty() {
                Some("methods")
            } else if !self.paths.is_empty() {
                Some("paths")
            } else if self.git.is_some() {
                Some("git")
            } else {
                None
            };
            if let Some(other) = other {
                return Err(PolicyError::Conflict {
                    index,
                    field: "passthrough",
                    other,
                    hint: "a passthrough tunnel is not inspected, so it is decided by host and port only",
                });
            }
        }
        Ok(())
    }

    fn port_matches(&self, port: u16) -> bool {
        match self.port {
            Some(p) => p == port,
            None => port == 80 || port == 443,
        }
    }

    fn check(&self, facts: &RequestFacts<'_>) -> Result<(), Reason> {
        if !host_matches(&self.host, facts.host) {
            return Err(Reason::NotInAllowlist);
        }
        if !self.port_matches(facts.port) {
            return Err(Reason::PortNotAllowed);
        }
        if let Some(git) = &self.git {
            return git.check(facts);
        }
        if !self.methods.is_empty()
            && !self
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(facts.method))
        {
            return Err(Reason::MethodNotAllowed);
        }
        if !self.paths.is_empty() && !self.paths.iter().any(|g| glob_matches(g, facts.path)) {
            return Err(Reason::PathNotAllowed);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GitService {
    Fetch,
    Push,
}

impl GitRule {
    fn check(&self, facts: &RequestFacts<'_>) -> Result<(), Reason> {
        let Some((repo, service)) = git_request(facts) else {
            return Err(Reason::PathNotAllowed);
        };
        if !repo_matches(&self.repo, repo) {
            return Err(Reason::GitRepoNotAllowed);
        }
        match service {
            GitService::Fetch if self.fetch => Ok(()),
            GitService::Fetch => Err(Reason::GitFetchNotAllowed),
            GitService::Push if self.push => Ok(()),
            GitService::Push => Err(Reason::GitPushNotAllowed),
        }
    }
}

/// A `push_refs` glob: a ref name under `refs/` with `*` and `?` as wildcards, and
/// nothing git would refuse in a ref name besides them (no `..`, `//`, control
/// characters, spaces, `~^:[\`, `@{`).
fn push_ref_glob_ok(glob: &str) -> bool {
    glob.len() > "refs/".len()
        && glob.starts_with("refs/")
        && !glob.contains("..")
        && !glob.contains("//")
        && !glob.contains("@{")
        && glob
            .bytes()
            .all(|b| b > b' ' && b != 0x7f && !b"~^:[\\".contains(&b))
}

/// Which refs a `git-receive-pack` request may update, as the gateway must enforce it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushScope<'a> {
    /// Not a push that any `push_refs` binds: decided by the rules alone.
    Unrestricted,
    /// The union of the `push_refs` of every git rule for this host, port and
    /// repository (none, for a path no git rule can attribute); every ref-update command
    /// must fit them.
    Refs(Vec<&'a str>),
}

impl EgressPolicy {
    /// Hex SHA-256 of the policy's JSON: what the gateway's start event records and what
    /// a session's provenance names, so the two can be compared.
    #[must_use]
    pub fn sha256_hex(&self) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(
            serde_json::to_vec(self).unwrap_or_default(),
        ))
    }

    /// The ref scope of a request: [`PushScope::Refs`] when it is a smart-HTTP
    /// `git-receive-pack` request to a repository that some git rule for the same host and
    /// port restricts with `push_refs`. Such a rule binds every push to that repository,
    /// whichever rule allowed the request (a broad host rule, or a git rule without
    /// `push_refs`), so adding a rule never widens it. Repositories are compared without
    /// ASCII case or a `.git` suffix. A request whose decoded path ends in
    /// `git-receive-pack` but names no repository a git rule could match (an encoded
    /// name, an empty segment, a trailing slash), to a host where some git rule sets
    /// `push_refs`, is held to no ref at all: an origin might still route it to one.
    /// The method does not matter (a method-override header could make a `GET` a push).
    #[must_use]
    pub fn push_scope(&self, facts: &RequestFacts<'_>) -> PushScope<'_> {
        // Most policies scope no push: skip the path work every request would pay.
        let any_scoped = self.rules.iter().any(|rule| {
            rule.git
                .as_ref()
                .is_some_and(|git| !git.push_refs.is_empty())
        });
        if !any_scoped {
            return PushScope::Unrestricted;
        }
        let decoded = percent_decode(facts.path.as_bytes());
        let endpoint = decoded
            .split(|&b| b == b'/')
            .rfind(|segment| !segment.is_empty());
        if !endpoint.is_some_and(|e| e.eq_ignore_ascii_case(b"git-receive-pack")) {
            return PushScope::Unrestricted;
        }
        let as_post = RequestFacts {
            method: "POST",
            ..*facts
        };
        let repo = match git_request(&as_post) {
            Some((repo, GitService::Push)) => Some(repo),
            _ => None,
        };
        let mut restricted = false;
        let mut globs: Vec<&str> = Vec::new();
        let git_rules = self
            .rules
            .iter()
            .filter(|rule| host_matches(&rule.host, facts.host) && rule.port_matches(facts.port))
            .filter_map(|rule| rule.git.as_ref())
            .filter(|git| !git.push_refs.is_empty());
        for git in git_rules {
            match repo {
                Some(repo) if same_repo(&git.repo, repo) => {
                    restricted = true;
                    globs.extend(git.push_refs.iter().map(String::as_str));
                }
                Some(_) => {}
                None => restricted = true,
            }
        }
        if restricted {
            PushScope::Refs(globs)
        } else {
            PushScope::Unrestricted
        }
    }
}

/// Repository names as a forge reads them: ASCII case and one `.git` suffix aside.
fn same_repo(a: &str, b: &str) -> bool {
    let key = |repo: &str| {
        let lower = repo.to_ascii_lowercase();
        lower
            .strip_suffix(".git")
            .map(str::to_owned)
            .unwrap_or(lower)
    };
    key(a) == key(b)
}

fn repo_matches(rule_repo: &str, request_repo: &str) -> bool {
    let request_repo = request_repo.strip_suffix(".git").unwrap_or(request_repo);
    let rule_repo = rule_repo.strip_suffix(".git").unwrap_or(rule_repo);
    rule_repo.eq_ignore_ascii_case(request_repo)
}

/// Recognises the smart-HTTP protocol's three endpoints. Anything else under a repo
/// (the dumb protocol, LFS, the web UI) is not git access and needs an ordinary rule.
fn git_request<'a>(facts: &RequestFacts<'a>) -> Option<(&'a str, GitService)> {
    let path = facts.path.strip_prefix('/')?;
    let service_of = |name: &str| match name {
        "git-upload-pack" => Some(GitService::Fetch),
        "git-receive-pack" => Some(GitService::Push),
        _ => None,
    };
    if let Some(repo) = path.strip_suffix("/info/refs") {
        if !(facts.method.eq_ignore_ascii_case("GET") || facts.method.eq_ignore_ascii_case("HEAD"))
        {
            return None;
        }
        let mut service = None;
        for pair in facts.query.unwrap_or("").split('&') {
            if let Some(value) = pair.strip_prefix("service=") {
                // Two `service=` values could be read differently by the origin; refuse.
                if service.is_some() {
                    return None;
                }
                service = Some(service_of(value)?);
            }
        }
        return Some((valid_repo_path(repo)?, service?));
    }
    if !facts.method.eq_ignore_ascii_case("POST") {
        return None;
    }
    let (repo, endpoint) = path.rsplit_once('/')?;
    Some((valid_repo_path(repo)?, service_of(endpoint)?))
}

fn valid_repo_path(repo: &str) -> Option<&str> {
    let parts: Vec<&str> = repo.split('/').collect();
    let ok = parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != ".." && !p.contains('%'));
    ok.then_some(repo)
}

/// Whether an origin could read `path` as a different path than the rules see: dot
/// segments (`/../`, `/./`, also with `;parameters` as in `/..;/`, which Tomcat and
/// Spring drop before resolving dots), percent-encoded `.`, `/`, `\` or NUL at any depth
/// of encoding (`%2e`, `%252e`, `%25252e`, …), overlong UTF-8 for them, a literal
/// backslash, a `%` not followed by two hex digits, or a path that does not start with
/// `/`. Such paths are refused rather than normalised, because origins disagree on
/// normalisation (and some frameworks decode twice).
#[must_use]
pub fn path_is_ambiguous(path: &str) -> bool {
    if !path.starts_with('/') && path != "*" {
        return true;
    }
    let mut layer = path.as_bytes().to_vec();
    // The raw path must be well-formed percent-encoding; in a decoded layer a stray `%`
    // is a literal percent sign (`%25` decodes to it).
    if !percent_encoding_is_well_formed(&layer) {
        return true;
    }
    // Each round decodes one more layer of encoding, as an origin that decodes once
    // more than its router would; a path still changing after that many is refused.
    for _ in 0..4 {
        if layer_is_ambiguous(&layer) {
            return true;
        }
        let decoded = percent_decode(&layer);
        if decoded == layer {
            return false;
        }
        layer = decoded;
    }
    true
}

fn layer_is_ambiguous(layer: &[u8]) -> bool {
    if layer.contains(&b'\\') || layer.contains(&0) {
        return true;
    }
    let lower = layer.to_ascii_lowercase();
    let has = |needle: &[u8]| lower.windows(needle.len()).any(|w| w == needle);
    if [b"%2e", b"%2f", b"%5c", b"%00"].iter().any(|n| has(*n)) {
        return true;
    }
    if has_overlong_utf8(layer) {
        return true;
    }
    layer.split(|&b| b == b'/').any(|segment| {
        // `..;x` is `..` to servlet containers, which drop a segment's parameters.
        let name = segment.split(|&b| b == b';').next().unwrap_or_default();
        name == b"." || name == b".."
    })
}

fn percent_encoding_is_well_formed(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// Decodes every valid `%XX`; anything else, a stray `%` included, is kept.
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Lead bytes that only ever start an overlong (invalid) UTF-8 sequence, which lenient
/// decoders turn into `.` or `/` (`%c0%ae`, `%e0%80%ae`).
fn has_overlong_utf8(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, &b)| {
        let next = bytes.get(i + 1).copied().unwrap_or(0xff);
        b == 0xc0 || b == 0xc1 || (b == 0xe0 && next < 0xa0) || (b == 0xf0 && next < 0x90)
    })
}

/// `pattern` is `name` or `*.suffix`; comparison ignores ASCII case and a trailing dot.
#[must_use]
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if let Some(suffix) = pattern.strip_prefix("*.") {
        let Some(head_len) = host.len().checked_sub(suffix.len() + 1) else {
            return false;
        };
        host.is_char_boundary(head_len)
            && head_len > 0
            && host.as_bytes()[head_len] == b'.'
            && host[head_len + 1..].eq_ignore_ascii_case(suffix)
    } else {
        pattern.eq_ignore_ascii_case(host)
    }
}

/// `*` matches any run of characters (`/` included), `?` exactly one; all else literal.
#[must_use]
pub fn glob_matches(glob: &str, text: &str) -> bool {
    let glob = glob.as_bytes();
    let text = text.as_bytes();
    let (mut g, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if g < glob.len() && (glob[g] == b'?' || glob[g] == text[t]) {
            g += 1;
            t += 1;
        } else if g < glob.len() && glob[g] == b'*' {
            star = Some((g, t));
            g += 1;
        } else if let Some((star_g, star_t)) = star {
            g = star_g + 1;
            t = star_t + 1;
            star = Some((star_g, star_t + 1));
        } else {
            return false;
        }
    }
    glob[g..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(
        host: &'a str,
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
    ) -> RequestFacts<'a> {
        RequestFacts {
            host,
            port: 443,
            method,
            path,
            query,
        }
    }

    fn example_policy() -> EgressPolicy {
        let yaml = r#"
audit: all
rules:
  - host: api.anthropic.com
    methods: [POST]
    paths: ["/v1/messages*"]
  - host: "*.githubusercontent.com"
  - host: gitea.example.com
    git: {repo: owner/name, fetch: true, push: false}
  - host: gitea.example.com
    git: {repo: owner/scratch, push: true}
  - host: pinned.example.com
    passthrough: true
  - host: internal.example.com
    port: 8443
    dangerously_allow_private_upstreams: true
"#;
        serde_saphyr::from_str(yaml).expect("example policy parses")
    }

    #[test]
    fn parses_the_documented_shape() {
        let policy = example_policy();
        assert_eq!(policy.audit, Some(AuditLevel::All));
        assert_eq!(policy.rules.len(), 6);
        assert_eq!(
            policy.rules[2].git,
            Some(GitRule {
                repo: "owner/name".into(),
                fetch: true,
                push: false,
                push_refs: Vec::new(),
            })
        );
        assert_eq!(
            policy.rules[3].git,
            Some(GitRule {
                repo: "owner/scratch".into(),
                fetch: true,
                push: true,
                push_refs: Vec::new(),
            })
        );
        assert_eq!(policy.validate(), Ok(()));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = serde_saphyr::from_str::<EgressPolicy>(
            "rules:\n  - host: a.example\n    metods: [GET]\n",
        )
        .expect_err("typo must fail");
        assert!(err.to_string().contains("metods"), "{err}");
        serde_saphyr::from_str::<EgressPolicy>("audt: all\n").expect_err("typo must fail");
        serde_saphyr::from_str::<EgressPolicy>("audit: everything\n").expect_err("bad level");
    }

    #[test]
    fn empty_policy_denies_everything() {
        let policy = EgressPolicy::default();
        assert_eq!(policy.validate(), Ok(()));
        assert_eq!(
            policy.decide(&facts("api.anthropic.com", "GET", "/", None)),
            Decision::block(Reason::NotInAllowlist, None)
        );
        assert!(!policy.decide_connect("api.anthropic.com", 443).is_allow());
    }

    #[test]
    fn method_and_path_rules() {
        let policy = example_policy();
        assert_eq!(
            policy.decide(&facts("api.anthropic.com", "POST", "/v1/messages", None)),
            Decision {
                verdict: Verdict::Allow,
                rule: Some(0),
                reason: Reason::AllowedByRule
            }
        );
        assert!(
            policy
                .decide(&facts(
                    "API.Anthropic.com.",
                    "post",
                    "/v1/messages/count_tokens",
                    None
                ))
                .is_allow()
        );
        assert_eq!(
            policy.decide(&facts("api.anthropic.com", "GET", "/v1/messages", None)),
            Decision::block(Reason::MethodNotAllowed, Some(0))
        );
        assert_eq!(
            policy.decide(&facts("api.anthropic.com", "POST", "/v1/files", None)),
            Decision::block(Reason::PathNotAllowed, Some(0))
        );
        let mut on_80 = facts("api.anthropic.com", "POST", "/v1/messages", None);
        on_80.port = 80;
        assert!(policy.decide(&on_80).is_allow());
        on_80.port = 8080;
        assert_eq!(
            policy.decide(&on_80),
            Decision::block(Reason::PortNotAllowed, Some(0))
        );
        assert_eq!(
            policy.decide(&facts("evil.example", "GET", "/", None)),
            Decision::block(Reason::NotInAllowlist, None)
        );
    }

    #[test]
    fn wildcard_hosts_match_subdomains_only() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.EXAMPLE.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert!(!host_matches("*.example.com", ".example.com"));
        assert!(!host_matches("example.com", "a.example.com"));
        assert!(host_matches("example.com", "example.com."));
    }

    #[test]
    fn ambiguous_paths_are_refused_before_any_rule() {
        let policy = example_policy();
        for path in [
            "/v1/messages/../admin",
            "/v1/messages/./x",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2e/admin",
            "/v1/messages%2f..%2fadmin",
            "/v1/messages\\..\\admin",
            "/v1/..",
            "v1/messages",
        ] {
            assert_eq!(
                policy.decide(&facts("api.anthropic.com", "POST", path, None)),
                Decision::block(Reason::AmbiguousPath, None),
                "{path}"
            );
        }
        assert!(!path_is_ambiguous("/v1/messages/...hidden/x.y"));
        assert!(!path_is_ambiguous("/v1/mess%61ges"));
    }

    #[test]
    fn path_override_headers_are_decided_as_the_path_they_name() {
        let policy = example_policy();
        let post = facts("api.anthropic.com", "POST", "/v1/messages", None);
        let decide = |values: &[&str]| {
            let values: Vec<&[u8]> = values.iter().map(|v| v.as_bytes()).collect();
            policy.decide_with_overrides(&post, &[], &values)
        };
        assert!(decide(&[]).is_allow());
        // The rule allows only /v1/messages*: a rewrite header naming another path is refused.
        assert_eq!(
            decide(&["/v1/admin/keys"]),
            Decision::block(Reason::PathOverrideNotAllowed, Some(0))
        );
        assert_eq!(
            decide(&["/v1/messages", "/v2/other"]).reason,
            Reason::PathOverrideNotAllowed
        );
        // Naming an allowed path (with a query) changes nothing.
        assert!(decide(&["/v1/messages?beta=true"]).is_allow());
        // The ambiguity checks apply to the named path too.
        assert_eq!(
            decide(&["/v1/messages/../admin"]).reason,
            Reason::AmbiguousPath
        );
        // Not an origin-form path: refused.
        for value in [
            "",
            "v1/messages",
            "https://evil.example/x",
            "//evil.example/x",
            "/v1/messages x",
        ] {
            assert_eq!(
                decide(&[value]).reason,
                Reason::BadPathOverride,
                "{value:?}"
            );
        }
        assert_eq!(
            policy
                .decide_with_overrides(&post, &[], &[b"/v1/\xffmessages"])
                .reason,
            Reason::BadPathOverride
        );
        // A method override and a path override together: both must be allowed.
        assert_eq!(
            policy
                .decide_with_overrides(&post, &[b"DELETE"], &[b"/v1/messages"])
                .reason,
            Reason::MethodOverrideNotAllowed
        );
    }

    #[test]
    fn method_override_headers_are_decided_as_the_method_they_name() {
        let policy = example_policy();
        let post = facts("api.anthropic.com", "POST", "/v1/messages", None);
        let decide = |values: &[&str]| {
            let values: Vec<&[u8]> = values.iter().map(|v| v.as_bytes()).collect();
            policy.decide_overridable(&post, &values)
        };
        // No override: the real method decides.
        assert!(decide(&[]).is_allow());
        // The rule allows only POST: an override naming another method is refused.
        assert_eq!(
            decide(&["DELETE"]),
            Decision::block(Reason::MethodOverrideNotAllowed, Some(0))
        );
        assert_eq!(decide(&["get"]).reason, Reason::MethodOverrideNotAllowed);
        // Naming the real method (in any case) changes nothing.
        assert!(decide(&["POST"]).is_allow());
        assert!(decide(&["post", "POST"]).is_allow());
        // Several different methods, an empty value, a list or a non-token: refused.
        for values in [
            &["POST", "DELETE"][..],
            &[""],
            &[" "],
            &["POST, DELETE"],
            &["DEL ETE"],
            &["PO\tST"],
        ] {
            assert_eq!(
                decide(values).reason,
                Reason::BadMethodOverride,
                "{values:?}"
            );
        }
        assert_eq!(
            policy.decide_overridable(&post, &[b"\xffPOST"]).reason,
            Reason::BadMethodOverride
        );
        // A request the real method cannot make stays refused for its own reason.
        let get = facts("api.anthropic.com", "GET", "/v1/messages", None);
        assert_eq!(
            policy.decide_overridable(&get, &[b"POST"]),
            Decision::block(Reason::MethodNotAllowed, Some(0))
        );
        // A rule without methods allows any override.
        let any = facts("raw.githubusercontent.com", "POST", "/x", None);
        assert!(policy.decide_overridable(&any, &[b"DELETE"]).is_allow());
        assert_eq!(Reason::BadMethodOverride.as_str(), "bad-method-override");
        assert_eq!(
            Reason::MethodOverrideNotAllowed.as_str(),
            "method-override-not-allowed"
        );
    }

    #[test]
    fn path_parameters_and_double_encoding_are_ambiguous() {
        for path in [
            // Tomcat and Spring drop `;params` from a segment before resolving dots.
            "/a/..;/b",
            "/a/..;jsessionid=1/b",
            "/a/.;/b",
            "/a/..;",
            // Double (and triple) encoding: an origin or a framework decoding twice sees
            // a dot, a slash or a backslash the rules never saw.
            "/%252e%252e/admin",
            "/%252E./admin",
            "/a/.%252e/admin",
            "/a%252f..%252fadmin",
            "/a%255c..%255cadmin",
            "/a/%25252e%25252e/admin",
            "/a/%252500",
            // `%%32e` is `%2e` to a decoder that leaves the stray `%` alone.
            "/a/%%32e%%32e/admin",
            // An encoded `;` decoded before the parameters are dropped.
            "/a/..%3b/b",
            "/a/..%253B/b",
            // Not percent-encoding at all: decoders differ on what they do with it.
            "/a/%zz",
            "/a/%2",
            "/a/%",
            "/a/%u002e%u002e/b",
            // Overlong UTF-8 for `.` and `/`, which old decoders accept.
            "/a/%c0%ae%c0%ae/b",
            "/a/%C0%AF",
            "/a/%e0%80%ae",
        ] {
            assert!(path_is_ambiguous(path), "{path} should be ambiguous");
        }
        for path in [
            "/a;b/c",
            "/a/b;c=d",
            "/a/...;/b",
            "/a/%25",
            "/a/100%25done",
            "/a/%2541",
            "/a/%e2%82%ac",
            "/a/%e0%a4%85",
            "/a/.well-known/x",
        ] {
            assert!(!path_is_ambiguous(path), "{path} should be plain");
        }
    }

    #[test]
    fn globs() {
        assert!(glob_matches("/v1/*", "/v1/messages"));
        assert!(glob_matches("/v1/*", "/v1/a/b/c"));
        assert!(glob_matches("*", "/anything"));
        assert!(glob_matches("/a?c", "/abc"));
        assert!(!glob_matches("/a?c", "/abbc"));
        assert!(glob_matches("/*/x/*.json", "/repo/x/data.json"));
        assert!(!glob_matches("/*/x/*.json", "/repo/y/data.json"));
        assert!(!glob_matches("/v1", "/v1/messages"));
        assert!(glob_matches("/v1**", "/v1"));
    }

    #[test]
    fn git_fetch_and_push_are_decided_per_repo() {
        let policy = example_policy();
        let host = "gitea.example.com";
        let fetch_refs = facts(
            host,
            "GET",
            "/owner/name.git/info/refs",
            Some("service=git-upload-pack"),
        );
        assert_eq!(policy.decide(&fetch_refs).rule, Some(2));
        assert!(policy.decide(&fetch_refs).is_allow());
        assert!(
            policy
                .decide(&facts(host, "POST", "/Owner/Name/git-upload-pack", None))
                .is_allow()
        );
        assert_eq!(
            policy.decide(&facts(
                host,
                "GET",
                "/owner/name/info/refs",
                Some("service=git-receive-pack")
            )),
            Decision::block(Reason::GitPushNotAllowed, Some(2))
        );
        assert_eq!(
            policy.decide(&facts(
                host,
                "POST",
                "/owner/name.git/git-receive-pack",
                None
            )),
            Decision::block(Reason::GitPushNotAllowed, Some(2))
        );
        assert!(
            policy
                .decide(&facts(
                    host,
                    "POST",
                    "/owner/scratch.git/git-receive-pack",
                    None
                ))
                .is_allow()
        );
        assert_eq!(
            policy
                .decide(&facts(
                    host,
                    "POST",
                    "/other/repo.git/git-upload-pack",
                    None
                ))
                .reason,
            Reason::GitRepoNotAllowed
        );
        // The web UI and the dumb protocol are not git access.
        assert_eq!(
            policy
                .decide(&facts(host, "GET", "/owner/name", None))
                .reason,
            Reason::PathNotAllowed
        );
        assert_eq!(
            policy
                .decide(&facts(host, "GET", "/owner/name/info/refs", None))
                .reason,
            Reason::PathNotAllowed
        );
        assert_eq!(
            policy
                .decide(&facts(
                    host,
                    "GET",
                    "/owner/name/info/refs",
                    Some("service=git-upload-pack&service=git-receive-pack")
                ))
                .verdict,
            Verdict::Block
        );
        assert_eq!(
            policy
                .decide(&facts(
                    host,
                    "POST",
                    "/owner/name/info/refs",
                    Some("service=git-upload-pack")
                ))
                .verdict,
            Verdict::Block
        );
    }

    #[test]
    fn connect_decisions() {
        let policy = example_policy();
        let d = policy.decide_connect("pinned.example.com", 443);
        assert_eq!(
            d,
            ConnectDecision {
                verdict: Verdict::Allow,
                rule: Some(4),
                reason: Reason::AllowedPassthrough,
                passthrough: true
            }
        );
        let d = policy.decide_connect("api.anthropic.com", 443);
        assert!(d.is_allow() && !d.passthrough);
        assert_eq!(
            policy.decide_connect("internal.example.com", 443).reason,
            Reason::PortNotAllowed
        );
        assert!(
            policy
                .decide_connect("internal.example.com", 8443)
                .is_allow()
        );
        assert_eq!(
            policy.decide_connect("nope.example", 443).reason,
            Reason::NotInAllowlist
        );
        // A passthrough rule never allows a request it could not see.
        assert!(
            !policy
                .decide(&facts("pinned.example.com", "GET", "/", None))
                .is_allow()
        );
        assert!(policy.allows_private_upstream("internal.example.com"));
        assert!(!policy.allows_private_upstream("api.anthropic.com"));
    }

    #[test]
    fn merge_unions_rules_and_later_audit_wins() {
        let mut base = EgressPolicy {
            audit: Some(AuditLevel::All),
            rules: vec![EgressRule::host("a.example")],
            ..EgressPolicy::default()
        };
        base.merge(EgressPolicy {
            audit: None,
            rules: vec![EgressRule::host("a.example"), EgressRule::host("b.example")],
            ..EgressPolicy::default()
        });
        assert_eq!(
            base,
            EgressPolicy {
                audit: Some(AuditLevel::All),
                rules: vec![EgressRule::host("a.example"), EgressRule::host("b.example")],
                ..EgressPolicy::default()
            }
        );
        base.merge(EgressPolicy {
            audit: Some(AuditLevel::Blocks),
            rules: vec![],
            ..EgressPolicy::default()
        });
        assert_eq!(base.audit_level(), AuditLevel::Blocks);
        assert_eq!(EgressPolicy::default().audit_level(), AuditLevel::Blocks);
    }

    #[test]
    fn validation_errors() {
        let bad = |rule: EgressRule| {
            EgressPolicy {
                audit: None,
                rules: vec![EgressRule::host("ok.example"), rule],
                ..EgressPolicy::default()
            }
            .validate()
        };
        assert_eq!(
            bad(EgressRule::host("")),
            Err(PolicyError::EmptyHost { index: 1 })
        );
        assert!(matches!(
            bad(EgressRule::host("https://x.example")),
            Err(PolicyError::BadHost { index: 1, .. })
        ));
        assert!(matches!(
            bad(EgressRule::host("x.example:443")),
            Err(PolicyError::BadHost { .. })
        ));
        assert!(matches!(
            bad(EgressRule::host("*.")),
            Err(PolicyError::BadHost { .. })
        ));
        assert!(matches!(
            bad(EgressRule::host("a.*.example")),
            Err(PolicyError::BadHost { .. })
        ));
        assert_eq!(bad(EgressRule::host("::1")), Ok(()));
        assert_eq!(bad(EgressRule::host("127.0.0.1")), Ok(()));
        assert_eq!(
            bad(EgressRule {
                port: Some(0),
                ..EgressRule::host("x.example")
            }),
            Err(PolicyError::BadPort { index: 1 })
        );
        assert!(matches!(
            bad(EgressRule {
                methods: vec!["GE T".into()],
                ..EgressRule::host("x.example")
            }),
            Err(PolicyError::BadMethod { .. })
        ));
        assert!(matches!(
            bad(EgressRule {
                paths: vec!["v1/*".into()],
                ..EgressRule::host("x.example")
            }),
            Err(PolicyError::BadGlob { .. })
        ));
        let git = |repo: &str| {
            Some(GitRule {
                repo: repo.into(),
                fetch: true,
                push: false,
                push_refs: Vec::new(),
            })
        };
        assert!(matches!(
            bad(EgressRule {
                git: git("justname"),
                ..EgressRule::host("x.example")
            }),
            Err(PolicyError::BadGitRepo { .. })
        ));
        assert!(matches!(
            bad(EgressRule {
                git: git("a/../b"),
                ..EgressRule::host("x.example")
            }),
            Err(PolicyError::BadGitRepo { .. })
        ));
        assert!(matches!(
            bad(EgressRule {
                git: git("a/b"),
                paths: vec!["/x".into()],
                ..EgressRule::host("x.example")
            }),
            Err(PolicyError::Conflict {
                field: "git",
                other: "paths",
                ..
            })
        ));
        assert!(matches!(
            bad(EgressRule {
                passthrough: true,
                methods: vec!["GET".into()],
                ..EgressRule::host("x.example")
            }),
            Err(PolicyError::Conflict {
                field: "passthrough",
                other: "methods",
                ..
            })
        ));
    }

    #[test]
    fn push_refs_are_validated_with_hints() {
        let rule = |push: bool, globs: &[&str]| EgressPolicy {
            rules: vec![EgressRule {
                git: Some(GitRule {
                    repo: "owner/name".into(),
                    fetch: true,
                    push,
                    push_refs: globs.iter().map(|g| (*g).to_string()).collect(),
                }),
                ..EgressRule::host("git.example")
            }],
            ..EgressPolicy::default()
        };
        assert_eq!(rule(true, &["refs/heads/bot-bottle/*"]).validate(), Ok(()));
        assert_eq!(
            rule(true, &["refs/heads/a", "refs/tags/v?"]).validate(),
            Ok(())
        );
        let err = rule(false, &["refs/heads/bot-bottle/*"])
            .validate()
            .expect_err("push_refs needs push");
        assert_eq!(err, PolicyError::PushRefsWithoutPush { index: 0 });
        assert!(err.to_string().contains("hint: add `push: true`"), "{err}");
        for glob in [
            "",
            "refs/",
            "heads/main",
            "*",
            "/refs/heads/x",
            "refs/heads/../x",
            "refs/heads//x",
            "refs/heads/a b",
            "refs/heads/x\ty",
            "refs/heads/x\\y",
            "refs/heads/x:y",
            "refs/heads/x@{1}",
            "refs/heads/[ab]",
        ] {
            let err = rule(true, &["refs/heads/ok", glob])
                .validate()
                .expect_err(glob);
            assert_eq!(
                err,
                PolicyError::BadPushRef {
                    index: 0,
                    glob: glob.to_string()
                }
            );
            assert!(err.to_string().contains("hint: "), "{err}");
        }
        let parsed: EgressPolicy = serde_saphyr::from_str(
            "rules:\n  - host: git.example\n    git: {repo: owner/name, push: true, push_refs: [\"refs/heads/bot-bottle/*\"]}\n",
        )
        .expect("parses");
        assert_eq!(
            parsed.rules[0].git.as_ref().map(|g| g.push_refs.clone()),
            Some(vec!["refs/heads/bot-bottle/*".to_string()])
        );
        assert_eq!(parsed.validate(), Ok(()));
    }

    #[test]
    fn push_scope_binds_every_push_to_a_restricted_repo() {
        let policy: EgressPolicy = serde_saphyr::from_str(
            r#"
rules:
  - host: git.example
    git: {repo: owner/name, push: true, push_refs: ["refs/heads/bot-bottle/*"]}
  - host: git.example
    git: {repo: owner/name, push: true, push_refs: ["refs/heads/other/*"]}
  - host: git.example
    git: {repo: owner/name, push: true}
  - host: git.example
    git: {repo: owner/free, push: true}
  - host: "*.example"
"#,
        )
        .expect("parses");
        assert_eq!(policy.validate(), Ok(()));
        let scope = |method: &'static str, path: &'static str| {
            policy.push_scope(&facts("git.example", method, path, None))
        };
        let both = PushScope::Refs(vec!["refs/heads/bot-bottle/*", "refs/heads/other/*"]);
        // Every spelling of the repository, whichever rule allows the request.
        assert_eq!(scope("POST", "/owner/name.git/git-receive-pack"), both);
        assert_eq!(scope("post", "/Owner/Name/git-receive-pack"), both);
        // Whatever the method: an override header could make it a POST.
        assert_eq!(scope("GET", "/owner/name.git/git-receive-pack"), both);
        assert_eq!(scope("PUT", "/owner/name/git-receive-pack"), both);
        // Fetches, the ref advertisement and other repositories are not bound.
        assert_eq!(
            scope("POST", "/owner/name.git/git-upload-pack"),
            PushScope::Unrestricted
        );
        assert_eq!(
            policy.push_scope(&facts(
                "git.example",
                "GET",
                "/owner/name.git/info/refs",
                Some("service=git-receive-pack")
            )),
            PushScope::Unrestricted
        );
        assert_eq!(
            scope("POST", "/owner/free.git/git-receive-pack"),
            PushScope::Unrestricted
        );
        // Another host or port is another forge.
        assert_eq!(
            policy.push_scope(&facts(
                "other.example",
                "POST",
                "/owner/name.git/git-receive-pack",
                None
            )),
            PushScope::Unrestricted
        );
        let mut on_port = facts(
            "git.example",
            "POST",
            "/owner/name.git/git-receive-pack",
            None,
        );
        on_port.port = 8443;
        assert_eq!(policy.push_scope(&on_port), PushScope::Unrestricted);
        // Spellings a forge may route to the same repository.
        assert_eq!(scope("POST", "/OWNER/NAME.GIT/git-receive-pack"), both);
        // Paths the broad rule allows but no git rule can attribute to a repository:
        // held to no ref at all.
        for path in [
            "/owner/na%6de.git/git-receive-pack",
            "/owner/name.git//git-receive-pack",
            "/owner/name.git/git-receive-pack/",
            "/owner/name.git/git-receive-pac%6b",
            "/owner/name.git/GIT-RECEIVE-PACK",
            "/git-receive-pack",
        ] {
            assert_eq!(scope("POST", path), PushScope::Refs(Vec::new()), "{path}");
        }
        // A host without any push_refs rule keeps today's behaviour.
        let free: EgressPolicy = serde_saphyr::from_str(
            "rules:\n  - host: git.example\n  - host: git.example\n    git: {repo: owner/name, push: true}\n",
        )
        .expect("parses");
        assert_eq!(
            free.push_scope(&facts(
                "git.example",
                "POST",
                "/owner/na%6de/git-receive-pack",
                None
            )),
            PushScope::Unrestricted
        );
    }

    #[test]
    fn serializes_back_compactly() {
        let policy = EgressPolicy {
            audit: None,
            rules: vec![EgressRule::host("a.example")],
            ..EgressPolicy::default()
        };
        assert_eq!(
            serde_json::to_string(&policy).expect("serializes"),
            r#"{"rules":[{"host":"a.example"}]}"#
        );
    }
}
