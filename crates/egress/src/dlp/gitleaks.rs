//! The gitleaks v8 TOML format, and Go RE2 patterns translated to the `regex` crate.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use aho_corasick::AhoCorasick;
use regex::bytes::{Regex, RegexBuilder};
use serde::Deserialize;

use super::{
    Action, Allowlist, Condition, DlpError, DlpRules, LazyRegex, LazyRest, RegexTarget, Rule,
    SkippedRule, SplitRegex,
};

/// The compiled-program budget per rule. Some gitleaks rules are large (bounded
/// repetitions of classes); the default 10 MiB would refuse a few of them.
const REGEX_SIZE_LIMIT: usize = 64 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    #[serde(default)]
    #[expect(dead_code, reason = "accepted for compatibility with gitleaks files")]
    title: Option<String>,
    #[serde(default, rename = "minVersion")]
    #[expect(dead_code, reason = "accepted for compatibility with gitleaks files")]
    min_version: Option<String>,
    #[serde(default)]
    #[expect(dead_code, reason = "accepted for compatibility with gitleaks files")]
    description: Option<String>,
    /// Gitleaks' older single global allowlist.
    #[serde(default)]
    allowlist: Option<AllowlistToml>,
    #[serde(default)]
    allowlists: Vec<AllowlistToml>,
    #[serde(default)]
    rules: Vec<RuleToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    id: Option<String>,
    #[serde(default)]
    description: String,
    regex: Option<String>,
    #[serde(rename = "secretGroup")]
    secret_group: Option<usize>,
    entropy: Option<f64>,
    #[serde(default)]
    keywords: Vec<String>,
    path: Option<String>,
    #[serde(default)]
    #[expect(dead_code, reason = "accepted for compatibility with gitleaks files")]
    tags: Vec<String>,
    #[serde(default, rename = "skipReport")]
    #[expect(dead_code, reason = "accepted for compatibility with gitleaks files")]
    skip_report: bool,
    /// Gitleaks' older single per-rule allowlist.
    allowlist: Option<AllowlistToml>,
    #[serde(default)]
    allowlists: Vec<AllowlistToml>,
    /// bot-bottle's extension: `block` or `log`. Gitleaks itself ignores it.
    action: Option<Action>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowlistToml {
    #[serde(default)]
    #[expect(dead_code, reason = "accepted for compatibility with gitleaks files")]
    description: Option<String>,
    condition: Option<String>,
    #[serde(default)]
    commits: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(rename = "regexTarget")]
    regex_target: Option<String>,
    #[serde(default)]
    regexes: Vec<String>,
    #[serde(default)]
    stopwords: Vec<String>,
    /// Only in global `[[allowlists]]`: the rules it applies to (all when empty).
    #[serde(default, rename = "targetRules")]
    target_rules: Vec<String>,
}

pub(crate) fn load(text: &str) -> Result<(DlpRules, Vec<SkippedRule>), DlpError> {
    let file: FileToml = toml::from_str(text)?;

    let mut global = Vec::new();
    let mut targeted: HashMap<String, Vec<Allowlist>> = HashMap::new();
    for allowlist in file.allowlist.into_iter().chain(file.allowlists) {
        let targets = allowlist.target_rules.clone();
        let compiled = compile_allowlist(allowlist, "the global allowlist")?;
        if targets.is_empty() {
            global.push(compiled);
        } else {
            for id in targets {
                targeted.entry(id).or_default().push(compiled.clone());
            }
        }
    }

    let mut rules = Vec::with_capacity(file.rules.len());
    let mut skipped = Vec::new();
    let mut seen = HashSet::new();
    for (index, raw) in file.rules.into_iter().enumerate() {
        let id = raw.id.clone().ok_or(DlpError::MissingId { index })?;
        if !seen.insert(id.clone()) {
            return Err(DlpError::DuplicateId { id });
        }
        if raw.regex.is_none() && raw.path.is_none() {
            return Err(DlpError::EmptyRule { id });
        }
        match compile_rule(raw, &id)? {
            Ok(mut rule) => {
                if let Some(extra) = targeted.remove(&id) {
                    rule.allowlists.extend(extra);
                }
                rules.push(rule);
            }
            Err(reason) => skipped.push(SkippedRule { id, reason }),
        }
    }

    Ok((
        DlpRules {
            rules: Arc::new(rules),
            global_allowlists: Arc::new(global),
            default_action: Action::Block,
            overrides: HashMap::new(),
        },
        skipped,
    ))
}

/// The outer `Err` is a malformed file; the inner one is a regex that does not compile,
/// which the caller reports as a skipped rule.
fn compile_rule(raw: RuleToml, id: &str) -> Result<Result<Rule, String>, DlpError> {
    let (regex, captures_len) = match raw
        .regex
        .as_deref()
        .map(|pattern| LazyRegex::checked(translate_go_regex(pattern)))
    {
        None => (None, 0),
        Some(Ok((regex, captures_len))) => (Some(regex), captures_len),
        Some(Err(reason)) => return Ok(Err(reason)),
    };
    if let (Some(group), Some(_)) = (raw.secret_group, &regex) {
        // captures_len counts group 0, the whole match.
        let groups = captures_len - 1;
        if group > groups {
            return Err(DlpError::SecretGroupOutOfRange {
                id: id.to_owned(),
                group,
                groups,
            });
        }
    }
    let owner = format!("rule `{id}`");
    let mut allowlists = Vec::new();
    for allowlist in raw.allowlist.into_iter().chain(raw.allowlists) {
        allowlists.push(compile_allowlist(allowlist, &owner)?);
    }
    Ok(Ok(Rule {
        id: id.to_owned(),
        description: raw.description,
        regex,
        secret_group: raw.secret_group.filter(|group| *group > 0),
        entropy: raw.entropy.filter(|entropy| *entropy > 0.0),
        keywords: raw
            .keywords
            .iter()
            .map(|keyword| keyword.to_ascii_lowercase())
            .collect(),
        path_scoped: raw.path.is_some(),
        split: raw.regex.as_deref().and_then(split_leading_prefix),
        allowlists,
        action: raw.action,
    }))
}

fn compile_allowlist(raw: AllowlistToml, owner: &str) -> Result<Allowlist, DlpError> {
    let invalid =
        |field: &'static str, value: &str, hint: &'static str| DlpError::InvalidAllowlist {
            owner: owner.to_owned(),
            field,
            value: value.to_owned(),
            hint,
        };
    let condition = match raw
        .condition
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None | Some("" | "OR") => Condition::Or,
        Some("AND" | "&&") => Condition::And,
        Some(_) => {
            return Err(invalid(
                "condition",
                raw.condition.as_deref().unwrap_or_default(),
                "use `AND` or `OR`",
            ));
        }
    };
    let regex_target = match raw.regex_target.as_deref() {
        None | Some("" | "secret") => RegexTarget::Secret,
        Some("match") => RegexTarget::Match,
        Some("line") => RegexTarget::Line,
        Some(other) => {
            return Err(invalid(
                "regexTarget",
                other,
                "use `secret`, `match` or `line`",
            ));
        }
    };
    let mut regexes = Vec::with_capacity(raw.regexes.len());
    for pattern in &raw.regexes {
        let regex = compile_go_regex(pattern).map_err(|_| {
            invalid(
                "regexes",
                pattern,
                "the pattern must be valid Go RE2 syntax",
            )
        })?;
        regexes.push(regex);
    }
    let stopwords = if raw.stopwords.is_empty() {
        None
    } else {
        let lowered: Vec<String> = raw
            .stopwords
            .iter()
            .map(|word| word.to_ascii_lowercase())
            .collect();
        Some(
            AhoCorasick::new(&lowered)
                .map_err(|_| invalid("stopwords", "", "stopwords must be plain strings"))?,
        )
    };
    Ok(Allowlist {
        condition,
        regex_target,
        regexes,
        stopwords,
        has_paths_or_commits: !raw.paths.is_empty() || !raw.commits.is_empty(),
    })
}

/// Compiles a Go RE2 pattern with the `regex` crate's byte engine.
///
/// Unicode mode is off because Go's `\w`, `\d`, `\s` and `\b` are ASCII-only; with it on,
/// a few gitleaks rules also grow past any sane size limit.
pub(crate) fn compile_go_regex(pattern: &str) -> Result<Regex, String> {
    build_regex(&translate_go_regex(pattern))
}

/// Compiles a pattern already translated by [`translate_go_regex`].
pub(crate) fn build_regex(translated: &str) -> Result<Regex, String> {
    RegexBuilder::new(translated)
        .unicode(false)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|error| error.to_string())
}

/// Rewrites the places where Go RE2 and the `regex` crate disagree on syntax:
///
/// - Go reads a `{` that does not start a valid repetition (`{n}`, `{n,}`, `{n,m}`) as a
///   literal; `regex` rejects it. It is escaped.
/// - Inside a class, Go reads `[` (other than `[:name:]`) and the `&&`, `--`, `~~`
///   operators as literals; `regex` reads nesting and set operations. They are escaped.
/// - Go's `\Q…\E` literal quoting does not exist in `regex`; the text is escaped instead.
pub(crate) fn translate_go_regex(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut i = 0;
    // Position of the first member of the current class, when inside one.
    let mut class_start: Option<usize> = None;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            if chars.get(i + 1) == Some(&'Q') {
                let body_start = i + 2;
                let mut end = body_start;
                while end < chars.len() && !(chars[end] == '\\' && chars.get(end + 1) == Some(&'E'))
                {
                    end += 1;
                }
                let literal: String = chars[body_start..end].iter().collect();
                out.push_str(&regex::escape(&literal));
                i = (end + 2).min(chars.len().max(end));
                continue;
            }
            out.push(c);
            if let Some(&next) = chars.get(i + 1) {
                out.push(next);
            }
            i += 2;
            continue;
        }
        if let Some(start) = class_start {
            match c {
                ']' if i > start => {
                    class_start = None;
                    out.push(']');
                }
                '[' if chars.get(i + 1) == Some(&':') => {
                    // A POSIX class such as [:alpha:]: copy through its closing `:]`.
                    let mut end = i + 2;
                    while end + 1 < chars.len() && !(chars[end] == ':' && chars[end + 1] == ']') {
                        end += 1;
                    }
                    let end = (end + 2).min(chars.len());
                    out.extend(&chars[i..end]);
                    i = end;
                    continue;
                }
                '[' => out.push_str("\\["),
                '&' | '~' if chars.get(i + 1) == Some(&c) => {
                    out.push('\\');
                    out.push(c);
                }
                '-' if chars.get(i + 1) == Some(&'-') => out.push_str("\\-"),
                _ => out.push(c),
            }
            i += 1;
            continue;
        }
        match c {
            '[' => {
                out.push('[');
                let mut start = i + 1;
                if chars.get(start) == Some(&'^') {
                    out.push('^');
                    start += 1;
                }
                // A `]` right after `[` or `[^` is a literal member in both dialects.
                if chars.get(start) == Some(&']') {
                    out.push_str("\\]");
                    start += 1;
                }
                class_start = Some(start);
                i = start;
                continue;
            }
            '{' => {
                if let Some(len) = repetition_len(&chars[i..]) {
                    out.extend(&chars[i..i + len]);
                    i += len;
                    continue;
                }
                out.push_str("\\{");
            }
            '}' => out.push_str("\\}"),
            _ => out.push(c),
        }
        i += 1;
    }
    out
}

/// Splits `FLAGS [class]{0,n}[?] REST` into `FLAGS REST` and `n`, when `REST` has no
/// top-level `|` (which would bind looser than the prefix).
///
/// Such a leading repetition makes the lazy DFA track every count up to `n` at every
/// position, which is what makes gitleaks' semi-generic rules slow; `REST` is cheap.
pub(crate) fn split_leading_prefix(pattern: &str) -> Option<SplitRegex> {
    let (flags, after_flags) = match pattern.strip_prefix("(?") {
        Some(tail) => {
            let close = tail.find(')')?;
            let flags = &tail[..close];
            if flags.is_empty() || !flags.chars().all(|c| c.is_ascii_alphabetic() || c == '-') {
                return None;
            }
            (&pattern[..close + 3], &tail[close + 1..])
        }
        None => ("", pattern),
    };
    let class_body = after_flags.strip_prefix('[')?;
    let class_end = class_body.find(']')?;
    let class = &class_body[..class_end];
    if class.is_empty() || class.contains('[') || class.ends_with('\\') {
        return None;
    }
    let repetition = class_body[class_end + 1..].strip_prefix("{0,")?;
    let digits = repetition.find('}')?;
    let max_prefix: usize = repetition[..digits].parse().ok()?;
    let mut rest = &repetition[digits + 1..];
    rest = rest.strip_prefix('?').unwrap_or(rest);
    if rest.is_empty() || has_top_level_alternation(rest) {
        return None;
    }
    let rest = translate_go_regex(&format!("{flags}{rest}"));
    let prefixes = literal_prefixes(&rest);
    let rest = LazyRest::checked(rest).ok()?;
    Some(SplitRegex {
        rest,
        max_prefix,
        prefixes,
    })
}

/// More prefix literals than this and a rule is searched on its own: a long list would
/// mostly be short, frequent prefixes that cost the keyword pass more than they save.
const MAX_PREFIX_LITERALS: usize = 64;

/// The lowercased literals one of which begins every match of `pattern` (already
/// translated), or `None` when there is no such finite set or it has an empty literal
/// (a match could start anywhere).
///
/// `regex-syntax`'s prefix extraction gives literals such that every match starts with
/// one of them (some are shortened when the set would grow too large, which keeps that
/// true). Lowercasing only widens the set of places the scanner then checks.
fn literal_prefixes(pattern: &str) -> Option<Vec<Vec<u8>>> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};
    let hir = regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .build()
        .parse(pattern)
        .ok()?;
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let mut literals: Vec<Vec<u8>> = seq
        .literals()?
        .iter()
        .map(|literal| literal.as_bytes().to_ascii_lowercase())
        .collect();
    if literals.is_empty() || literals.iter().any(Vec::is_empty) {
        return None;
    }
    literals.sort();
    literals.dedup();
    (literals.len() <= MAX_PREFIX_LITERALS).then_some(literals)
}

/// Compiles the `REST` of a split rule (already translated) with the same syntax as
/// [`build_regex`].
pub(crate) fn build_rest(translated: &str) -> Result<regex_automata::meta::Regex, String> {
    use regex_automata::meta::Regex as MetaRegex;
    MetaRegex::builder()
        .syntax(
            regex_automata::util::syntax::Config::new()
                .unicode(false)
                .utf8(false),
        )
        .configure(
            MetaRegex::config()
                .utf8_empty(false)
                .nfa_size_limit(Some(REGEX_SIZE_LIMIT)),
        )
        .build(translated)
        .map_err(|error| error.to_string())
}

fn has_top_level_alternation(pattern: &str) -> bool {
    let mut depth = 0usize;
    let mut in_class = false;
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '[' if !in_class => {
                in_class = true;
                // `]` right after `[` or `[^` is a member, not the end.
                if chars.peek() == Some(&'^') {
                    chars.next();
                }
                if chars.peek() == Some(&']') {
                    chars.next();
                }
            }
            ']' if in_class => in_class = false,
            '(' if !in_class => depth += 1,
            ')' if !in_class => depth = depth.saturating_sub(1),
            '|' if !in_class && depth == 0 => return true,
            _ => {}
        }
    }
    false
}

/// Length of a Go repetition operator (`{n}`, `{n,}`, `{n,m}`) at the start of `chars`.
fn repetition_len(chars: &[char]) -> Option<usize> {
    let mut i = 1;
    let digits_start = i;
    while chars.get(i).is_some_and(char::is_ascii_digit) {
        i += 1;
    }
    if i == digits_start {
        return None;
    }
    if chars.get(i) == Some(&',') {
        i += 1;
        while chars.get(i).is_some_and(char::is_ascii_digit) {
            i += 1;
        }
    }
    (chars.get(i) == Some(&'}')).then_some(i + 1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn literal_braces_are_escaped_and_repetitions_kept() {
        assert_eq!(translate_go_regex(r"a{2}b{1,}c{3,4}"), r"a{2}b{1,}c{3,4}");
        assert_eq!(
            translate_go_regex(r"^\${(?:[A-Z_]+)}$"),
            r"^\$\{(?:[A-Z_]+)\}$"
        );
        assert_eq!(translate_go_regex(r"x{,3}"), r"x\{,3\}");
        assert_eq!(translate_go_regex(r"\{\{[ \t]*}}"), r"\{\{[ \t]*\}\}");
    }

    #[test]
    fn classes_are_translated() {
        assert_eq!(translate_go_regex(r"[^]]+"), r"[^\]]+");
        assert_eq!(translate_go_regex(r"[[:alpha:][]"), r"[[:alpha:]\[]");
        assert_eq!(translate_go_regex(r"[a&&b]"), r"[a\&&b]");
        assert_eq!(translate_go_regex(r"[{}]"), r"[{}]");
        assert_eq!(translate_go_regex(r"\Qa.b\E+"), r"a\.b+");
    }

    #[test]
    fn translated_patterns_behave_like_go() {
        let regex = compile_go_regex(r"^\${(?:[A-Z_]+|[a-z_]+)}$").expect("compiles");
        assert!(regex.is_match(b"${HOME}"));
        let regex = compile_go_regex(r"[^:]+:\[[^]]+]").expect("compiles");
        assert!(regex.is_match(b"user:[secret]"));
        // ASCII-only classes, as in Go: a non-ASCII letter is not \w.
        let regex = compile_go_regex(r"^\w+$").expect("compiles");
        assert!(!regex.is_match("é".as_bytes()));
    }

    #[test]
    fn leading_prefix_is_split_only_when_safe() {
        let split = split_leading_prefix(r"(?i)[\w.-]{0,50}?(?:key|token)=(\w+)").expect("splits");
        assert_eq!(split.max_prefix, 50);
        assert_eq!(split.rest.as_str(), r"(?i)(?:key|token)=(\w+)");
        assert!(split_leading_prefix(r"[a-z]{0,5}x|y").is_none());
        assert!(split_leading_prefix(r"[a-z]{1,5}x").is_none());
        assert!(split_leading_prefix(r"(x)[a-z]{0,5}x").is_none());
        assert!(split_leading_prefix(r"[a-z]{0,5}(?:x|y)[|]").is_some());
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(matches!(
            load("[[rules]]\nregex = 'x'\n"),
            Err(DlpError::MissingId { index: 0 })
        ));
        assert!(matches!(
            load("[[rules]]\nid = 'a'\nregex = 'x'\n[[rules]]\nid = 'a'\nregex = 'y'\n"),
            Err(DlpError::DuplicateId { .. })
        ));
        assert!(matches!(
            load("[[rules]]\nid = 'a'\n"),
            Err(DlpError::EmptyRule { .. })
        ));
        assert!(matches!(
            load("[[rules]]\nid = 'a'\nregex = '(x)'\nsecretGroup = 2\n"),
            Err(DlpError::SecretGroupOutOfRange { .. })
        ));
        assert!(matches!(
            load("[[rules]]\nid = 'a'\nregex = 'x'\nbogus = 1\n"),
            Err(DlpError::Toml(_))
        ));
        assert!(matches!(
            load("[[rules]]\nid = 'a'\nregex = 'x'\n[[rules.allowlists]]\ncondition = 'XOR'\n"),
            Err(DlpError::InvalidAllowlist { .. })
        ));
    }

    #[test]
    fn uncompilable_rule_is_reported_not_fatal() {
        let (rules, skipped) =
            load("[[rules]]\nid = 'bad'\nregex = '(unclosed'\n[[rules]]\nid = 'ok'\nregex = 'x'\n")
                .expect("file is well formed");
        assert_eq!(rules.ids().collect::<Vec<_>>(), vec!["ok"]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].id, "bad");
    }

    pub(crate) fn gitleaks_file() -> String {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/testdata/gitleaks.toml"
        );
        std::fs::read_to_string(path).unwrap_or_else(|error| panic!("read {path}: {error}"))
    }

    #[test]
    fn the_full_gitleaks_file_loads_with_no_rule_left_out() {
        let text = gitleaks_file();
        let started = std::time::Instant::now();
        let (rules, skipped) = load(&text).expect("the gitleaks file is well formed");
        let elapsed = started.elapsed();
        let failed: Vec<String> = skipped
            .iter()
            .map(|rule| format!("{}: {}", rule.id, rule.reason))
            .collect();
        assert_eq!(failed, Vec::<String>::new(), "rules that do not compile");
        let declared = text.matches("[[rules]]").count();
        assert_eq!(rules.len(), declared);
        assert_eq!(
            rules.path_scoped(),
            vec![
                "freemius-secret-key",
                "hashicorp-tf-password",
                "kubernetes-secret-yaml",
                "nuget-config-password",
                "pkcs12-file",
            ]
        );
        eprintln!("{} gitleaks rules compiled in {elapsed:?}", rules.len());
    }
}
