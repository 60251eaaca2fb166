//! Data-loss prevention for what leaves a bottle.
//!
//! The pieces, in the order the gateway uses them:
//!
//! 1. [`DlpRules`]: secret-detection rules in the gitleaks v8 TOML format, either the
//!    project's own set ([`DlpRules::builtin`]) or any gitleaks file
//!    ([`DlpRules::from_gitleaks_toml`]). Go RE2 patterns are translated to the `regex`
//!    crate's dialect; a rule that still cannot compile is reported as a [`SkippedRule`],
//!    never silently dropped.
//! 2. [`Scanner`]: runs the rules over bytes. A rule with `keywords` only runs when one of
//!    them occurs in the input (ASCII case-insensitive, one aho-corasick pass for all rules).
//!    Then the regex, `secretGroup`, the Shannon-entropy threshold and the allowlists decide,
//!    as gitleaks does. The scanner also always looks for the custody secrets
//!    ([`CustodySecret`]) and, separately, their placeholders, in raw, base64 (standard and
//!    URL-safe, all three alignments), percent-encoded and hex forms.
//! 3. [`Scanner::scan_body`]: undoes `Content-Encoding` (gzip, deflate, br, zstd) with a hard
//!    cap on the decoded size ([`DEFAULT_MAX_DECODED`], 8 MiB), so a decompression bomb
//!    costs at most the cap. Above the cap the result is [`ScanOutcome::TooLarge`]; the
//!    gateway's policy turns that into a block or a log line.
//!
//! A [`Finding`] never holds the secret: it carries the rule id, the action, the byte
//! offset and length, and a redacted excerpt (at most four leading characters, then `…`
//! and the length).
//!
//! Differences from gitleaks, because the input is an HTTP message rather than a file in
//! a repository: rules scoped by `path` do not run on bodies (they are loaded, and listed
//! by [`DlpRules::path_scoped`]); allowlist `paths` and `commits` never match, so an `AND`
//! allowlist that lists paths never applies; a `line` target is the line of the scanned
//! buffer that holds the match.

mod custody;
pub(crate) mod decode;
mod gitleaks;
mod scanner;
mod views;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

pub use custody::{CustodySecret, EncodedForm, PlaceholderSecret};
pub use decode::{DEFAULT_MAX_DECODED, MAX_CODINGS};
pub use scanner::{Scanner, VIEW_BUDGET_FACTOR};

/// The rule file this project ships; see [`DlpRules::builtin`].
const BUILTIN_RULES: &str = include_str!("default-rules.toml");

/// What the gateway does when a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Refuse the request (403) and audit the finding.
    Block,
    /// Let the request through and audit the finding.
    Log,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Block => "block",
            Action::Log => "log",
        })
    }
}

/// Errors from loading a rule file.
#[derive(Debug, thiserror::Error)]
pub enum DlpError {
    #[error("invalid gitleaks rule file")]
    Toml(#[from] toml::de::Error),
    #[error("rule {index} has no `id`")]
    MissingId { index: usize },
    #[error("rule `{id}` is defined twice\nhint: rule ids must be unique within one file")]
    DuplicateId { id: String },
    #[error(
        "rule `{id}` has neither `regex` nor `path`\nhint: a gitleaks rule needs at least one of them"
    )]
    EmptyRule { id: String },
    #[error("rule `{id}` has `secretGroup = {group}` but its regex has {groups} groups")]
    SecretGroupOutOfRange {
        id: String,
        group: usize,
        groups: usize,
    },
    #[error("allowlist of {owner} has an invalid `{field}`: `{value}`\nhint: {hint}")]
    InvalidAllowlist {
        owner: String,
        field: &'static str,
        value: String,
        hint: &'static str,
    },
    #[error("global allowlist regex `{pattern}` does not compile: {reason}")]
    GlobalAllowlistRegex { pattern: String, reason: String },
    #[error("unknown rule id `{id}` in action override")]
    UnknownRule { id: String },
}

/// A rule from a gitleaks file that the loader could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRule {
    pub id: String,
    pub reason: String,
}

/// Which part of a match an allowlist regex is tested against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum RegexTarget {
    #[default]
    Secret,
    Match,
    Line,
}

/// How the checks of one allowlist combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Condition {
    #[default]
    Or,
    And,
}

/// One compiled allowlist (gitleaks `[allowlist]` or `[[rules.allowlists]]`).
#[derive(Debug, Clone)]
pub(crate) struct Allowlist {
    pub(crate) condition: Condition,
    pub(crate) regex_target: RegexTarget,
    pub(crate) regexes: Vec<regex::bytes::Regex>,
    /// Stopwords, lowercased; matched as substrings of the lowercased secret.
    pub(crate) stopwords: Option<aho_corasick::AhoCorasick>,
    /// Paths and commits cannot match an HTTP message; kept only so `AND` stays honest.
    pub(crate) has_paths_or_commits: bool,
}

/// One compiled detection rule.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) id: String,
    pub(crate) description: String,
    pub(crate) regex: Option<LazyRegex>,
    pub(crate) secret_group: Option<usize>,
    pub(crate) entropy: Option<f64>,
    /// Lowercased.
    pub(crate) keywords: Vec<String>,
    pub(crate) path_scoped: bool,
    /// When the regex starts with a bounded class repetition (gitleaks' common
    /// `(?i)[\w.-]{0,50}?(?:keyword…)…`), the rest of the regex alone plus that bound.
    /// Searching for the rest is several times faster; see `Scanner::run_rule`.
    pub(crate) split: Option<SplitRegex>,
    pub(crate) allowlists: Vec<Allowlist>,
    pub(crate) action: Option<Action>,
}

/// A rule regex `P` written as `FLAGS CLASS{0,max_prefix} REST`, with `REST` compiled as
/// `FLAGS REST`. Every match of `P` starting at `q` contains a match of `REST` starting in
/// `q..=q + max_prefix`, and `P` matches wherever `REST` does.
#[derive(Debug, Clone)]
pub(crate) struct SplitRegex {
    pub(crate) rest: LazyRest,
    pub(crate) max_prefix: usize,
    /// Lowercased literals one of which starts every match of `REST` (ASCII
    /// case-insensitively), when `REST` has such a finite set without an empty literal.
    /// The scanner then finds candidate starts in its keyword pass and checks `REST`
    /// anchored there, instead of searching the whole buffer once per rule.
    pub(crate) prefixes: Option<Vec<Vec<u8>>>,
}

/// The `REST` of a [`SplitRegex`], compiled on first use like [`LazyRegex`], as a
/// `regex-automata` regex because the scanner also runs it anchored at a position.
#[derive(Debug, Clone)]
pub(crate) struct LazyRest {
    pattern: String,
    compiled: std::sync::OnceLock<regex_automata::meta::Regex>,
}

impl LazyRest {
    pub(crate) fn checked(pattern: String) -> Result<LazyRest, String> {
        gitleaks::build_rest(&pattern)?;
        Ok(LazyRest {
            pattern,
            compiled: std::sync::OnceLock::new(),
        })
    }

    pub(crate) fn get(&self) -> &regex_automata::meta::Regex {
        self.compiled.get_or_init(|| {
            gitleaks::build_rest(&self.pattern)
                .expect("the pattern compiled when the rules were loaded")
        })
    }

    /// The translated pattern.
    #[cfg(test)]
    pub(crate) fn as_str(&self) -> &str {
        &self.pattern
    }
}

/// A rule regex that is checked when the rules are loaded but compiled only when a scan
/// first needs it.
///
/// A compiled gitleaks set holds about 13 MiB of automata, while a typical request
/// triggers a handful of rules through their keywords, so the gateway keeps only the
/// programs it has used. The loader compiles every pattern once (and drops it) so a
/// pattern that cannot compile is still reported at load time; compiling is
/// deterministic, so the later compile succeeds too.
#[derive(Debug, Clone)]
pub(crate) struct LazyRegex {
    /// Already translated from Go's dialect.
    pattern: String,
    compiled: std::sync::OnceLock<regex::bytes::Regex>,
}

impl LazyRegex {
    /// Compiles `pattern` (already in the `regex` dialect) to check it, then keeps only
    /// the text; also returns the number of capture groups (group 0 included).
    pub(crate) fn checked(pattern: String) -> Result<(LazyRegex, usize), String> {
        let groups = gitleaks::build_regex(&pattern)?.captures_len();
        Ok((
            LazyRegex {
                pattern,
                compiled: std::sync::OnceLock::new(),
            },
            groups,
        ))
    }

    pub(crate) fn get(&self) -> &regex::bytes::Regex {
        self.compiled.get_or_init(|| {
            gitleaks::build_regex(&self.pattern)
                .expect("the pattern compiled when the rules were loaded")
        })
    }

    /// True once a scan has compiled the pattern.
    #[cfg(test)]
    pub(crate) fn is_compiled(&self) -> bool {
        self.compiled.get().is_some()
    }
}

/// A compiled rule set plus the action each rule takes.
///
/// Cheap to clone: the compiled parts are shared.
#[derive(Debug, Clone)]
pub struct DlpRules {
    pub(crate) rules: Arc<Vec<Rule>>,
    pub(crate) global_allowlists: Arc<Vec<Allowlist>>,
    pub(crate) default_action: Action,
    pub(crate) overrides: HashMap<String, Action>,
}

impl DlpRules {
    /// Loads a gitleaks v8 TOML rule file.
    ///
    /// Rules whose regex does not compile, even after translation from Go's dialect, are
    /// returned in the second element by id with the reason; every other rule is kept.
    /// The file itself being malformed (bad TOML, a rule without an id, a duplicate id,
    /// an invalid allowlist) is an error, because a half-read policy must not run.
    ///
    /// # Errors
    ///
    /// [`DlpError`] when the file is not a valid gitleaks configuration.
    pub fn from_gitleaks_toml(text: &str) -> Result<(DlpRules, Vec<SkippedRule>), DlpError> {
        gitleaks::load(text)
    }

    /// The project's own default rule set (`default-rules.toml` beside this module).
    ///
    /// It covers cloud and model-provider keys, forge and chat tokens, private key blocks
    /// and generic high-entropy assignments. Every rule compiles; a test holds that.
    #[must_use]
    pub fn builtin() -> DlpRules {
        let (rules, skipped) =
            gitleaks::load(BUILTIN_RULES).expect("the built-in rule file is valid TOML");
        debug_assert!(skipped.is_empty(), "built-in rules skipped: {skipped:?}");
        rules
    }

    /// The action a rule without its own `action` (and without an override) takes.
    #[must_use]
    pub fn with_default_action(mut self, action: Action) -> DlpRules {
        self.default_action = action;
        self
    }

    /// Overrides one rule's action.
    ///
    /// # Errors
    ///
    /// [`DlpError::UnknownRule`] when no rule has that id.
    pub fn set_action(&mut self, id: &str, action: Action) -> Result<(), DlpError> {
        if !self.rules.iter().any(|rule| rule.id == id) {
            return Err(DlpError::UnknownRule { id: id.to_owned() });
        }
        self.overrides.insert(id.to_owned(), action);
        Ok(())
    }

    /// The action a rule takes: an override, else the rule's own `action`, else the default.
    #[must_use]
    pub fn action_for(&self, id: &str) -> Action {
        if let Some(action) = self.overrides.get(id) {
            return *action;
        }
        self.rules
            .iter()
            .find(|rule| rule.id == id)
            .and_then(|rule| rule.action)
            .unwrap_or(self.default_action)
    }

    /// Every loaded rule id, in file order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|rule| rule.id.as_str())
    }

    /// A rule's description, if it exists.
    #[must_use]
    pub fn description(&self, id: &str) -> Option<&str> {
        self.rules
            .iter()
            .find(|rule| rule.id == id)
            .map(|rule| rule.description.as_str())
    }

    /// Number of loaded rules (path-scoped ones included).
    #[must_use]
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when no rule was loaded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Ids of rules limited to file paths; they never run on HTTP messages.
    #[must_use]
    pub fn path_scoped(&self) -> Vec<&str> {
        self.rules
            .iter()
            .filter(|rule| rule.path_scoped)
            .map(|rule| rule.id.as_str())
            .collect()
    }
}

/// What produced a finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FindingKind {
    /// A rule from the rule set matched.
    Rule,
    /// A custody secret's real value, in some encoding, on its way to a host that is not
    /// one of its own (or to an unknown host).
    CustodySecret {
        credential: String,
        form: EncodedForm,
    },
    /// A placeholder on its way to a host that is not one of its credential's hosts: an
    /// exfiltration attempt.
    Placeholder {
        credential: String,
        form: EncodedForm,
    },
}

/// Where in an HTTP message a finding sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// Offset into the (decoded) body or the buffer given to [`Scanner::scan`].
    Body,
    /// Offset into the value of this header.
    Header(String),
}

/// One detection. Holds no secret material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The rule id, or `custody:<credential>` / `placeholder:<credential>`.
    pub rule_id: String,
    pub kind: FindingKind,
    pub action: Action,
    pub location: Location,
    /// Byte offset of the secret in the scanned buffer (or header value).
    pub offset: usize,
    /// Byte length of the secret.
    pub len: usize,
    /// A redacted excerpt: at most four leading characters, `…`, and the length.
    pub excerpt: String,
}

/// The result of [`Scanner::scan_body`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanOutcome {
    /// The whole body was scanned; an empty list means it is clean.
    Scanned(Vec<Finding>),
    /// The body, encoded or decoded, is larger than the cap. The first `limit` decoded
    /// bytes were scanned and their findings are included; the rest was not looked at.
    TooLarge {
        limit: usize,
        findings: Vec<Finding>,
    },
    /// The body could not be decoded (an unknown `Content-Encoding`, or corrupt data).
    /// Nothing reliable was scanned, so policy should treat this like an unscanned body.
    Undecodable { reason: String },
}

impl ScanOutcome {
    /// The findings, whatever the outcome (none for [`ScanOutcome::Undecodable`]).
    #[must_use]
    pub fn findings(&self) -> &[Finding] {
        match self {
            ScanOutcome::Scanned(findings) | ScanOutcome::TooLarge { findings, .. } => findings,
            ScanOutcome::Undecodable { .. } => &[],
        }
    }

    /// True when any finding's action is [`Action::Block`].
    #[must_use]
    pub fn blocks(&self) -> bool {
        self.findings()
            .iter()
            .any(|finding| finding.action == Action::Block)
    }
}

/// Redacts a secret for display: at most four leading characters (fewer for short
/// secrets, so at most a quarter is shown), non-printable bytes as `?`, then `…` and the
/// length in bytes.
#[must_use]
pub fn redact(secret: &[u8]) -> String {
    let shown = (secret.len() / 4).min(4);
    let mut out: String = secret[..shown]
        .iter()
        .map(|&byte| {
            if byte.is_ascii_graphic() {
                char::from(byte)
            } else {
                '?'
            }
        })
        .collect();
    out.push('…');
    out.push_str(&format!("({} bytes)", secret.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_shows_at_most_four_chars_and_a_quarter() {
        assert_eq!(
            redact(b"AKIAIOSFODNN7EXAMPLE"),
            "AKIA…(20 bytes)".to_owned()
        );
        assert_eq!(redact(b"abcdefg"), "a…(7 bytes)".to_owned());
        assert_eq!(redact(b"abc"), "…(3 bytes)".to_owned());
        assert_eq!(redact(b"\x00\x01\x02\x03zzzz"), "??…(8 bytes)".to_owned());
    }

    #[test]
    fn builtin_rules_all_compile() {
        let (rules, skipped) = DlpRules::from_gitleaks_toml(BUILTIN_RULES).expect("valid");
        assert_eq!(skipped, Vec::<SkippedRule>::new());
        assert!(rules.len() >= 10, "only {} rules", rules.len());
    }

    #[test]
    fn action_override_and_default() {
        let mut rules = DlpRules::builtin().with_default_action(Action::Log);
        assert_eq!(rules.action_for("aws-access-key-id"), Action::Block);
        rules
            .set_action("aws-access-key-id", Action::Log)
            .expect("known id");
        assert_eq!(rules.action_for("aws-access-key-id"), Action::Log);
        assert!(matches!(
            rules.set_action("no-such-rule", Action::Log),
            Err(DlpError::UnknownRule { .. })
        ));
    }
}
