//! The scanner: keyword prefilter, rule regexes, entropy, allowlists, custody secrets.

use std::collections::HashMap;
use std::ops::Range;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use regex_automata::{Anchored, Input};

use super::custody::{encoded_forms, host_matches};
use super::decode::{DEFAULT_MAX_DECODED, Decoded, decode_with};
use super::views::views;
use super::{
    Action, Allowlist, Condition, CustodySecret, DlpRules, EncodedForm, Finding, FindingKind,
    Location, PlaceholderSecret, RegexTarget, ScanOutcome, SplitRegex, redact,
};

/// All views of one body (see [`Scanner::scan_request_body`]) together hold at most this many times the
/// scan cap.
pub const VIEW_BUDGET_FACTOR: usize = 2;

/// The rule id of a finding for a custody secret's real value.
pub const CUSTODY_RULE_ID: &str = "custody-secret";
/// The rule id of a finding for a placeholder headed to a host it is not for.
pub const PLACEHOLDER_RULE_ID: &str = "exfiltration-attempt";

/// Scans bytes, bodies and headers with a rule set and the custody secrets.
///
/// Build one per policy (building compiles the prefilters) and share it: every method
/// takes `&self` and the type is `Send + Sync`.
///
/// The `host` parameter of the scan methods is the request's destination. A custody
/// secret or placeholder headed to one of its own hosts is expected there and is not a
/// finding; with `None`, every occurrence is one. Either way, a rule match that lies inside
/// a custody secret or placeholder is not reported again as a rule finding, so a
/// placeholder shaped like a real key does not trip the rule for that key.
#[derive(Debug)]
pub struct Scanner {
    rules: DlpRules,
    /// Per rule, in `rules` order: runs on HTTP messages at all.
    active: Vec<bool>,
    actions: Vec<Action>,
    /// Rules with a regex but no keywords: always run.
    unconditional: Vec<usize>,
    /// The rules' keywords, then the literal prefixes of fused split rules (see
    /// [`SplitRegex::prefixes`]), then the custody and placeholder needles, each once:
    /// one pass over a buffer finds all three.
    keywords: Option<AhoCorasick>,
    /// Pattern id → rules that list it as a keyword.
    keyword_rules: Vec<Vec<usize>>,
    /// Patterns `0..keyword_count` are keywords.
    keyword_count: usize,
    /// Pattern id → fused rules (by slot) that it is a literal prefix of.
    prefix_slots: Vec<Vec<usize>>,
    /// Per rule: its slot when its `REST` is checked only at its prefixes' hits.
    fused_slot: Vec<Option<usize>>,
    fused_count: usize,
    custody: Vec<CustodySecret>,
    placeholders: Vec<PlaceholderSecret>,
    /// Every encoded form of every custody secret and placeholder.
    needle_list: Vec<Vec<u8>>,
    /// Pattern id → needles that are that pattern up to ASCII case.
    needle_slots: Vec<Vec<usize>>,
    /// Needle pattern id → what it reveals.
    needle_owner: Vec<NeedleOwner>,
    max_decoded: usize,
}

/// What one automaton pass over a buffer found.
struct Pass {
    /// Indices of the rules to run, in rule order.
    triggered: Vec<usize>,
    /// Per fused rule slot, the sorted start offsets of its literal prefixes (empty when
    /// there was no hit at all).
    candidates: Vec<Vec<usize>>,
    /// Exact needle occurrences (span, needle index), overlapping ones included.
    needle_hits: Vec<(Range<usize>, usize)>,
}

#[derive(Debug, Clone, Copy)]
enum NeedleOwner {
    Custody(usize, EncodedForm),
    Placeholder(usize, EncodedForm),
}

impl Scanner {
    /// Builds a scanner for a rule set and the custody secrets it must always detect.
    ///
    /// Empty custody values are ignored: they would match everywhere.
    #[must_use]
    pub fn new(rules: DlpRules, custody: Vec<CustodySecret>) -> Scanner {
        Scanner::with_placeholders(rules, custody, Vec::new())
    }

    /// Like [`Scanner::new`], and also detects each placeholder on its way to a host that
    /// is not one of its credential's hosts.
    #[must_use]
    pub fn with_placeholders(
        rules: DlpRules,
        custody: Vec<CustodySecret>,
        placeholders: Vec<PlaceholderSecret>,
    ) -> Scanner {
        let mut keyword_list: Vec<String> = Vec::new();
        let mut keyword_rules: Vec<Vec<usize>> = Vec::new();
        let mut unconditional = Vec::new();
        let mut active = Vec::with_capacity(rules.len());
        let mut actions = Vec::with_capacity(rules.len());
        for (index, rule) in rules.rules.iter().enumerate() {
            let runs = rule.regex.is_some() && !rule.path_scoped;
            active.push(runs);
            actions.push(rules.action_for(&rule.id));
            if !runs {
                continue;
            }
            if rule.keywords.is_empty() {
                unconditional.push(index);
            }
            for keyword in &rule.keywords {
                match keyword_list.iter().position(|known| known == keyword) {
                    Some(position) => keyword_rules[position].push(index),
                    None => {
                        keyword_list.push(keyword.clone());
                        keyword_rules.push(vec![index]);
                    }
                }
            }
        }
        let keyword_count = keyword_list.len();
        let mut prefix_slots: Vec<Vec<usize>> = vec![Vec::new(); keyword_count];
        let mut pattern_ids: HashMap<Vec<u8>, usize> = keyword_list
            .iter()
            .enumerate()
            .map(|(id, keyword)| (keyword.as_bytes().to_vec(), id))
            .collect();
        let mut patterns: Vec<Vec<u8>> = keyword_list.into_iter().map(String::into_bytes).collect();
        let mut fused_slot = vec![None; rules.len()];
        let mut fused_count = 0;
        for (index, rule) in rules.rules.iter().enumerate() {
            let Some(prefixes) = rule
                .split
                .as_ref()
                .and_then(|split| split.prefixes.as_ref())
            else {
                continue;
            };
            if !active[index] {
                continue;
            }
            fused_slot[index] = Some(fused_count);
            for prefix in prefixes {
                let id = *pattern_ids.entry(prefix.clone()).or_insert_with(|| {
                    patterns.push(prefix.clone());
                    prefix_slots.push(Vec::new());
                    keyword_rules.push(Vec::new());
                    patterns.len() - 1
                });
                prefix_slots[id].push(fused_count);
            }
            fused_count += 1;
        }
        let custody: Vec<CustodySecret> = custody
            .into_iter()
            .filter(|secret| !secret.value.is_empty())
            .collect();
        let placeholders: Vec<PlaceholderSecret> = placeholders
            .into_iter()
            .filter(|placeholder| !placeholder.placeholder.is_empty())
            .collect();
        let mut needle_list: Vec<Vec<u8>> = Vec::new();
        let mut needle_owner = Vec::new();
        for (index, secret) in custody.iter().enumerate() {
            for (needle, form) in encoded_forms(secret.value.as_bytes()) {
                needle_list.push(needle);
                needle_owner.push(NeedleOwner::Custody(index, form));
            }
        }
        for (index, placeholder) in placeholders.iter().enumerate() {
            for (needle, form) in encoded_forms(placeholder.placeholder.as_bytes()) {
                needle_list.push(needle);
                needle_owner.push(NeedleOwner::Placeholder(index, form));
            }
        }
        // The needles join the same automaton, which is ASCII case-insensitive, so each
        // hit is compared with its needle byte for byte.
        let mut needle_slots: Vec<Vec<usize>> = vec![Vec::new(); patterns.len()];
        for (needle_index, needle) in needle_list.iter().enumerate() {
            let id = *pattern_ids
                .entry(needle.to_ascii_lowercase())
                .or_insert_with(|| {
                    patterns.push(needle.to_ascii_lowercase());
                    prefix_slots.push(Vec::new());
                    keyword_rules.push(Vec::new());
                    needle_slots.push(Vec::new());
                    patterns.len() - 1
                });
            needle_slots[id].push(needle_index);
        }
        let keywords = (!patterns.is_empty()).then(|| {
            // The DFA form is about twice as fast here as the default NFA, and a few
            // hundred keywords keep it well under a megabyte.
            AhoCorasickBuilder::new()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::Standard)
                .kind(Some(AhoCorasickKind::DFA))
                .build(&patterns)
                .expect("keywords are plain strings well under the automaton's size limits")
        });

        Scanner {
            rules,
            active,
            actions,
            unconditional,
            keywords,
            keyword_rules,
            keyword_count,
            prefix_slots,
            fused_slot,
            fused_count,
            custody,
            placeholders,
            needle_list,
            needle_slots,
            needle_owner,
            max_decoded: DEFAULT_MAX_DECODED,
        }
    }

    /// Sets the cap on a body's size, encoded and decoded (default [`DEFAULT_MAX_DECODED`]).
    #[must_use]
    pub fn with_max_decoded(mut self, cap: usize) -> Scanner {
        self.max_decoded = cap;
        self
    }

    /// The cap on a body's size, encoded and decoded.
    #[must_use]
    pub fn max_decoded(&self) -> usize {
        self.max_decoded
    }

    /// The rule set this scanner runs.
    #[must_use]
    pub fn rules(&self) -> &DlpRules {
        &self.rules
    }

    /// Scans a buffer as it is, reporting every custody secret and placeholder in it.
    #[must_use]
    pub fn scan(&self, bytes: &[u8]) -> Vec<Finding> {
        self.scan_buffer(bytes, None, &Location::Body)
    }

    /// Scans a buffer bound for `host`: its bytes, and its views (JSON escapes and
    /// percent-encoding undone, base64 runs decoded; see [`Scanner::scan_request_body`]).
    /// Views past the budget are not scanned; use [`Scanner::scan_message`] to learn
    /// whether they all were.
    #[must_use]
    pub fn scan_for_host(&self, bytes: &[u8], host: &str) -> Vec<Finding> {
        self.scan_with_views(bytes, &[], Some(host)).0
    }

    /// [`Scanner::scan_for_host`] for a whole message (a websocket message): when its
    /// views do not all fit in the budget, [`ScanOutcome::TooLarge`] with the findings
    /// of what was scanned.
    #[must_use]
    pub fn scan_message(&self, bytes: &[u8], host: &str) -> ScanOutcome {
        match self.scan_with_views(bytes, &[], Some(host)) {
            (findings, true) => ScanOutcome::Scanned(findings),
            (findings, false) => ScanOutcome::TooLarge {
                limit: self.max_decoded,
                findings,
            },
        }
    }

    /// Decodes a whole body per its `Content-Encoding` (gzip, deflate, br, zstd, stacked in
    /// any order) and scans it. Chunked transfer coding is already undone by the HTTP
    /// layer, so `body` is the full message body.
    ///
    /// A body whose decoded size is over the cap gives [`ScanOutcome::TooLarge`], with
    /// findings from the first cap bytes; decoding stops there.
    #[must_use]
    pub fn scan_body(
        &self,
        body: &[u8],
        content_encoding: Option<&str>,
        host: Option<&str>,
    ) -> ScanOutcome {
        self.scan_request_body(body, content_encoding, &[], host, false)
    }

    /// What the origin will read: undoes every coding of `content_encoding` (all of a
    /// request's `Content-Encoding` lines joined with `,`; at most
    /// [`super::MAX_CODINGS`] besides `identity`, each one the gateway can
    /// decode, or the body is [`ScanOutcome::Undecodable`]), then scans the decoded bytes
    /// and their views: JSON string escapes undone, percent-encoding undone, the
    /// `base64` and `quoted-printable` parts of a multipart body (its boundary from
    /// `content_types`, the request's `Content-Type` values), and base64 runs decoded up
    /// to three levels deep. The views together hold at most [`VIEW_BUDGET_FACTOR`] times
    /// the cap; past that the outcome is [`ScanOutcome::TooLarge`].
    ///
    /// With `prefix_only`, `body` is only the start of a longer body: decoders may stop
    /// where it was cut, but a start that does not decode is still
    /// [`ScanOutcome::Undecodable`], and the outcome is at best `TooLarge`.
    #[must_use]
    pub fn scan_request_body(
        &self,
        body: &[u8],
        content_encoding: Option<&str>,
        content_types: &[&str],
        host: Option<&str>,
        prefix_only: bool,
    ) -> ScanOutcome {
        let (decoded, whole) =
            match decode_with(body, content_encoding, self.max_decoded, prefix_only) {
                Decoded::Complete(bytes) => (bytes, true),
                Decoded::Truncated(prefix) => (prefix, false),
                Decoded::Failed(reason) => return ScanOutcome::Undecodable { reason },
            };
        let (findings, views_fit) = self.scan_with_views(&decoded, content_types, host);
        if whole && views_fit {
            ScanOutcome::Scanned(findings)
        } else {
            ScanOutcome::TooLarge {
                limit: self.max_decoded,
                findings,
            }
        }
    }

    /// Scans `bytes` and each of its views; a finding a view repeats (a rule matching the
    /// same bytes, a custody secret or placeholder of the same credential) is reported
    /// once. The flag says every view fit.
    fn scan_with_views(
        &self,
        bytes: &[u8],
        content_types: &[&str],
        host: Option<&str>,
    ) -> (Vec<Finding>, bool) {
        let (findings, complete, _) = self.scan_with_views_counted(bytes, content_types, host);
        (findings, complete)
    }

    /// [`Scanner::scan_with_views`], also saying how many of the findings (the first ones)
    /// are in `bytes` themselves rather than in a view.
    fn scan_with_views_counted(
        &self,
        bytes: &[u8],
        content_types: &[&str],
        host: Option<&str>,
    ) -> (Vec<Finding>, bool, usize) {
        let mut findings = self.scan_buffer(bytes, host, &Location::Body);
        let raw = findings.len();
        let views = views(
            bytes,
            content_types,
            self.max_decoded.saturating_mul(VIEW_BUDGET_FACTOR),
        );
        if views.buffers.is_empty() {
            return (findings, views.complete, raw);
        }
        // A custody secret or placeholder is one leak whatever its form (base64 in the
        // bytes is raw in the base64 view); a rule match is the same one if its bytes are.
        let key = |finding: &Finding, buffer: &[u8]| match &finding.kind {
            FindingKind::Rule => (
                finding.rule_id.clone(),
                String::new(),
                buffer
                    .get(finding.offset..finding.offset + finding.len)
                    .map(<[u8]>::to_vec),
            ),
            FindingKind::CustodySecret { credential, .. }
            | FindingKind::Placeholder { credential, .. } => {
                (finding.rule_id.clone(), credential.clone(), None)
            }
        };
        let mut seen: std::collections::HashSet<_> =
            findings.iter().map(|finding| key(finding, bytes)).collect();
        for view in &views.buffers {
            for finding in self.scan_buffer(view, host, &Location::Body) {
                if seen.insert(key(&finding, view)) {
                    findings.push(finding);
                }
            }
        }
        (findings, views.complete, raw)
    }

    /// Scans header values (header names are scanned too, as the `name: value` line the
    /// rules see). Offsets in findings are relative to the header value.
    #[must_use]
    pub fn scan_headers(&self, headers: &http::HeaderMap, host: Option<&str>) -> Vec<Finding> {
        // One buffer, one pass: each header as a `name: value` line, as in a file.
        let mut buffer = Vec::new();
        let mut spans: Vec<(Range<usize>, &str)> = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            buffer.extend_from_slice(name.as_str().as_bytes());
            buffer.extend_from_slice(b": ");
            let start = buffer.len();
            buffer.extend_from_slice(value.as_bytes());
            spans.push((start..buffer.len(), name.as_str()));
            buffer.push(b'\n');
        }
        // The views too (a key base64-encoded in a custom header, percent-encoded in a
        // cookie): the raw findings come first and are placed in their header; a finding
        // only a decoded view shows cannot be, and is located as `(decoded)`.
        let (mut findings, _, raw) = self.scan_with_views_counted(&buffer, &[], host);
        for finding in findings.iter_mut().skip(raw) {
            finding.location = Location::Header("(decoded)".to_owned());
        }
        for finding in findings.iter_mut().take(raw) {
            let span = spans
                .iter()
                .find(|(range, _)| finding.offset < range.end.max(range.start + 1))
                .or(spans.last());
            if let Some((range, name)) = span {
                finding.location = Location::Header((*name).to_owned());
                finding.offset = finding.offset.saturating_sub(range.start);
            }
        }
        findings
    }

    fn scan_buffer(&self, bytes: &[u8], host: Option<&str>, location: &Location) -> Vec<Finding> {
        let mut findings = Vec::new();
        let Pass {
            triggered,
            candidates,
            needle_hits,
        } = self.pass(bytes);
        let custody_spans = self.scan_custody(bytes, &needle_hits, host, location, &mut findings);
        for index in triggered {
            let starts = self.fused_slot[index]
                .map(|slot| candidates.get(slot).map_or(&[][..], Vec::as_slice));
            self.run_rule(
                index,
                bytes,
                starts,
                &custody_spans,
                location,
                &mut findings,
            );
        }
        drop_generic_duplicates(&mut findings);
        findings.sort_by_key(|finding| finding.offset);
        findings
    }

    /// Reports custody secrets and placeholders headed elsewhere, and returns the spans of
    /// all of them (expected or not) so rules do not report them a second time.
    fn scan_custody(
        &self,
        bytes: &[u8],
        needle_hits: &[(Range<usize>, usize)],
        host: Option<&str>,
        location: &Location,
        findings: &mut Vec<Finding>,
    ) -> Vec<Range<usize>> {
        let mut spans = Vec::new();
        for (span, needle) in needle_hits {
            let span = span.clone();
            let (hosts, kind, rule_id) = match self.needle_owner[*needle] {
                NeedleOwner::Custody(index, form) => {
                    let secret = &self.custody[index];
                    (
                        &secret.hosts,
                        FindingKind::CustodySecret {
                            credential: secret.name.clone(),
                            form,
                        },
                        CUSTODY_RULE_ID,
                    )
                }
                NeedleOwner::Placeholder(index, form) => {
                    let placeholder = &self.placeholders[index];
                    (
                        &placeholder.hosts,
                        FindingKind::Placeholder {
                            credential: placeholder.name.clone(),
                            form,
                        },
                        PLACEHOLDER_RULE_ID,
                    )
                }
            };
            spans.push(span.clone());
            let expected =
                host.is_some_and(|host| hosts.iter().any(|pattern| host_matches(pattern, host)));
            if expected {
                continue;
            }
            findings.push(Finding {
                rule_id: rule_id.to_owned(),
                kind,
                action: Action::Block,
                location: location.clone(),
                offset: span.start,
                len: span.len(),
                excerpt: redact(&bytes[span]),
            });
        }
        spans
    }

    /// The one automaton pass over `bytes`.
    fn pass(&self, bytes: &[u8]) -> Pass {
        let mut run = vec![false; self.active.len()];
        for &index in &self.unconditional {
            run[index] = true;
        }
        // Allocated on the first prefix hit: most headers and URLs have none.
        let mut candidates: Vec<Vec<usize>> = Vec::new();
        let mut needle_hits = Vec::new();
        if let Some(keywords) = &self.keywords {
            let mut seen = vec![false; self.keyword_count];
            let mut remaining = self.keyword_count;
            let keep_going = self.fused_count > 0 || !self.needle_list.is_empty();
            for found in keywords.find_overlapping_iter(bytes) {
                let pattern = found.pattern().as_usize();
                for &slot in &self.prefix_slots[pattern] {
                    if candidates.is_empty() {
                        candidates = vec![Vec::new(); self.fused_count];
                    }
                    candidates[slot].push(found.start());
                }
                for &needle in &self.needle_slots[pattern] {
                    if bytes[found.range()] == self.needle_list[needle] {
                        needle_hits.push((found.range(), needle));
                    }
                }
                if pattern < self.keyword_count && !seen[pattern] {
                    seen[pattern] = true;
                    for &index in &self.keyword_rules[pattern] {
                        run[index] = true;
                    }
                    remaining -= 1;
                    if remaining == 0 && !keep_going {
                        break;
                    }
                }
            }
        }
        // Overlapping matches come in order of their end; a rule's prefixes can overlap.
        for starts in &mut candidates {
            starts.sort_unstable();
            starts.dedup();
        }
        let triggered = run
            .iter()
            .enumerate()
            .filter_map(|(index, &runs)| runs.then_some(index))
            .collect();
        Pass {
            triggered,
            candidates,
            needle_hits,
        }
    }

    fn run_rule(
        &self,
        index: usize,
        bytes: &[u8],
        starts: Option<&[usize]>,
        custody_spans: &[Range<usize>],
        location: &Location,
        findings: &mut Vec<Finding>,
    ) {
        let rule = &self.rules.rules[index];
        let action = self.actions[index];
        let Some(regex) = &rule.regex else {
            return;
        };
        let regex = regex.get();
        for captures in RuleMatches::new(regex, rule.split.as_ref(), starts, bytes) {
            let Some(whole) = captures.get(0) else {
                continue;
            };
            // gitleaks: the configured group, else the first non-empty group, else the match.
            let secret = match rule.secret_group {
                Some(group) => match captures.get(group) {
                    Some(secret) => secret,
                    None => continue,
                },
                None => captures
                    .iter()
                    .skip(1)
                    .flatten()
                    .find(|group| !group.is_empty())
                    .unwrap_or(whole),
            };
            let secret_range = secret.range();
            if let Some(threshold) = rule.entropy
                && shannon_entropy(secret.as_bytes()) <= threshold
            {
                continue;
            }
            if custody_spans
                .iter()
                .any(|span| span.start < secret_range.end && secret_range.start < span.end)
            {
                continue;
            }
            let candidate = Candidate {
                bytes,
                secret: secret_range.clone(),
                whole: whole.range(),
            };
            if rule
                .allowlists
                .iter()
                .chain(self.rules.global_allowlists.iter())
                .any(|allowlist| allows(allowlist, &candidate))
            {
                continue;
            }
            findings.push(Finding {
                rule_id: rule.id.clone(),
                kind: FindingKind::Rule,
                action,
                location: location.clone(),
                offset: secret_range.start,
                len: secret_range.len(),
                excerpt: redact(secret.as_bytes()),
            });
        }
    }
}

/// True for a rule id that names a generic pattern (a secret-sounding name and a
/// high-entropy value) rather than one provider's token format: `generic-api-key`, the id
/// both gitleaks and the built-in set use, and any other `generic-…` id.
pub(crate) fn is_generic_rule(id: &str) -> bool {
    id.starts_with("generic-")
}

/// Drops a generic rule's finding when a specific rule found an overlapping span, as
/// gitleaks does: the same secret is reported (and audited) once, under the rule that
/// knows what it is. A generic finding that blocks is kept beside a specific one that only
/// logs, so a rule turned to `log` cannot undo a user's `generic-…: block`.
fn drop_generic_duplicates(findings: &mut Vec<Finding>) {
    let specific: Vec<(Range<usize>, Action)> = findings
        .iter()
        .filter(|finding| finding.kind == FindingKind::Rule && !is_generic_rule(&finding.rule_id))
        .map(|finding| (finding.offset..finding.offset + finding.len, finding.action))
        .collect();
    if specific.is_empty() {
        return;
    }
    findings.retain(|finding| {
        let span = finding.offset..finding.offset + finding.len;
        finding.kind != FindingKind::Rule
            || !is_generic_rule(&finding.rule_id)
            || !specific.iter().any(|(other, action)| {
                other.start < span.end
                    && span.start < other.end
                    && (*action == Action::Block || finding.action == Action::Log)
            })
    });
}

/// The same matches as `regex.captures_iter(haystack)`, found faster when the regex was
/// split (see [`SplitRegex`]): search for the cheap rest first, then run the full regex
/// only from `max_prefix` bytes before that hit.
///
/// Why that finds the same leftmost-first matches: let `c` be the leftmost start of a rest
/// match at or after `pos`. A full match starting at `q >= pos` contains a rest match
/// starting in `q..=q + max_prefix`, at or after `c`, so `q >= c - max_prefix`. And the full
/// regex matches at `c` itself (empty prefix). So the leftmost full match at or after `pos`
/// is the leftmost one at or after `max(pos, c - max_prefix)`, and it exists.
///
/// With `starts` (a fused rule: every match of the rest begins at one of these sorted
/// offsets, see [`SplitRegex::prefixes`]), `c` is the first start at or after `pos` where
/// the rest matches anchored, which is the same leftmost start without a search of its
/// own over the whole buffer. The full match then ends past `c` (it contains a rest match
/// starting at or after `c`, and rest matches are not empty), so `c` is never needed again.
struct RuleMatches<'r, 'h> {
    regex: &'r regex::bytes::Regex,
    split: Option<&'r SplitRegex>,
    starts: Option<&'h [usize]>,
    haystack: &'h [u8],
    pos: usize,
    done: bool,
}

impl<'r, 'h> RuleMatches<'r, 'h> {
    fn new(
        regex: &'r regex::bytes::Regex,
        split: Option<&'r SplitRegex>,
        starts: Option<&'h [usize]>,
        haystack: &'h [u8],
    ) -> Self {
        RuleMatches {
            regex,
            split,
            starts: split.and(starts),
            haystack,
            pos: 0,
            done: false,
        }
    }
}

impl RuleMatches<'_, '_> {
    /// The leftmost start at or after `pos` of a match of the rest.
    fn next_rest_start(&mut self, split: &SplitRegex) -> Option<usize> {
        let rest = split.rest.get();
        let Some(starts) = &mut self.starts else {
            let input = Input::new(self.haystack).range(self.pos..);
            return rest.find(input).map(|found| found.start());
        };
        while let Some((&start, later)) = starts.split_first() {
            *starts = later;
            if start < self.pos {
                continue;
            }
            let input = Input::new(self.haystack)
                .range(start..)
                .anchored(Anchored::Yes)
                .earliest(true);
            if rest.is_match(input) {
                return Some(start);
            }
        }
        None
    }
}

impl<'h> Iterator for RuleMatches<'_, 'h> {
    type Item = regex::bytes::Captures<'h>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.pos > self.haystack.len() {
            return None;
        }
        let start = match self.split {
            Some(split) => match self.next_rest_start(split) {
                Some(rest) => self.pos.max(rest.saturating_sub(split.max_prefix)),
                None => {
                    self.done = true;
                    return None;
                }
            },
            None => self.pos,
        };
        let Some(captures) = self.regex.captures_at(self.haystack, start) else {
            self.done = true;
            return None;
        };
        let whole = captures.get(0)?;
        // An empty match would repeat forever; step past it as `captures_iter` does.
        self.pos = if whole.is_empty() {
            whole.end() + 1
        } else {
            whole.end()
        };
        Some(captures)
    }
}

struct Candidate<'a> {
    bytes: &'a [u8],
    secret: Range<usize>,
    whole: Range<usize>,
}

impl Candidate<'_> {
    fn target(&self, target: RegexTarget) -> &[u8] {
        match target {
            RegexTarget::Secret => &self.bytes[self.secret.clone()],
            RegexTarget::Match => &self.bytes[self.whole.clone()],
            RegexTarget::Line => {
                let start = memchr::memrchr(b'\n', &self.bytes[..self.whole.start])
                    .map_or(0, |newline| newline + 1);
                let end = memchr::memchr(b'\n', &self.bytes[self.whole.end..])
                    .map_or(self.bytes.len(), |newline| self.whole.end + newline);
                &self.bytes[start..end]
            }
        }
    }
}

/// gitleaks' allowlist semantics: with `OR`, any one check that matches allows the
/// finding; with `AND`, every configured check must match. Paths and commits are
/// configured checks that never match an HTTP message.
fn allows(allowlist: &Allowlist, candidate: &Candidate<'_>) -> bool {
    let regex_hit = || {
        let target = candidate.target(allowlist.regex_target);
        allowlist.regexes.iter().any(|regex| regex.is_match(target))
    };
    let stopword_hit = || {
        allowlist.stopwords.as_ref().is_some_and(|stopwords| {
            let lowered = candidate.bytes[candidate.secret.clone()].to_ascii_lowercase();
            stopwords.is_match(&lowered)
        })
    };
    match allowlist.condition {
        Condition::Or => regex_hit() || stopword_hit(),
        Condition::And => {
            let configured = !allowlist.regexes.is_empty()
                || allowlist.stopwords.is_some()
                || allowlist.has_paths_or_commits;
            configured
                && !allowlist.has_paths_or_commits
                && (allowlist.regexes.is_empty() || regex_hit())
                && (allowlist.stopwords.is_none() || stopword_hit())
        }
    }
}

/// Shannon entropy in bits per byte, as gitleaks computes it for ASCII secrets.
pub(crate) fn shannon_entropy(data: &[u8]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &byte in data {
        counts[usize::from(byte)] += 1;
    }
    #[expect(clippy::cast_precision_loss, reason = "lengths are far below 2^52")]
    let len = data.len() as f64;
    counts
        .iter()
        .filter(|&&count| count > 0)
        .map(|&count| {
            let frequency = f64::from(count) / len;
            -frequency * frequency.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};

    use super::*;
    use crate::dlp::LazyRegex;
    use crate::dlp::decode::tests::{gzip, gzip_bomb};
    use crate::dlp::gitleaks::tests::gitleaks_file;

    // Test-only values shaped like real credentials; none was ever issued.
    const AWS_KEY: &str = "AKIAZ7Q3XK2M5RTB4WLE";
    const GITHUB_TOKEN: &str = "ghp_R8f2kLq9ZxW3mN7vB5tY1cH4jD6sG0aE2pUo";
    const CUSTODY_VALUE: &str = "sk-live-Qm9vYmFyQmF6UXV4-7f3a9c2e";

    fn custody() -> Vec<CustodySecret> {
        vec![CustodySecret {
            name: "model-key".to_owned(),
            value: CUSTODY_VALUE.to_owned(),
            hosts: vec!["api.model.test".to_owned()],
        }]
    }

    fn ids(findings: &[Finding]) -> Vec<&str> {
        findings
            .iter()
            .map(|finding| finding.rule_id.as_str())
            .collect()
    }

    fn rules_from(toml: &str) -> DlpRules {
        let (rules, skipped) = DlpRules::from_gitleaks_toml(toml).expect("valid rule file");
        assert_eq!(skipped, Vec::new());
        rules
    }

    fn gitleaks_scanner() -> Scanner {
        let (rules, skipped) =
            DlpRules::from_gitleaks_toml(&gitleaks_file()).expect("valid rule file");
        assert_eq!(skipped, Vec::new());
        Scanner::new(rules, custody())
    }

    #[test]
    fn planted_aws_key_and_github_token_with_builtin_rules() {
        let scanner = Scanner::new(DlpRules::builtin(), Vec::new());
        let body = format!(
            "{{\"config\": \"aws_access_key_id = {AWS_KEY}\\n\", \"note\": \"push with {GITHUB_TOKEN} please\"}}"
        );
        let findings = scanner.scan(body.as_bytes());
        assert_eq!(ids(&findings), vec!["aws-access-key-id", "github-pat"]);
        assert_eq!(findings[0].offset, body.find(AWS_KEY).expect("planted"));
        assert_eq!(findings[0].len, AWS_KEY.len());
        assert_eq!(findings[0].excerpt, "AKIA…(20 bytes)");
        assert_eq!(findings[0].action, Action::Block);
        assert_eq!(findings[1].excerpt, "ghp_…(40 bytes)");
    }

    #[test]
    fn planted_aws_key_and_github_token_with_the_gitleaks_rules() {
        let scanner = gitleaks_scanner();
        let body = format!(
            "export AWS_ACCESS_KEY_ID={AWS_KEY}\ngit push https://{GITHUB_TOKEN}@forge.test/o/r\n"
        );
        let findings = scanner.scan(body.as_bytes());
        let found = ids(&findings);
        assert!(found.contains(&"aws-access-token"), "{found:?}");
        assert!(found.contains(&"github-pat"), "{found:?}");
        for finding in &findings {
            let debug = format!("{finding:?}");
            assert!(
                !debug.contains(AWS_KEY) && !debug.contains(GITHUB_TOKEN),
                "{debug}"
            );
        }
    }

    #[test]
    fn custody_secret_base64_in_a_gzip_json_body() {
        let scanner = gitleaks_scanner();
        let encoded = STANDARD.encode(format!("user:{CUSTODY_VALUE}"));
        let json = format!("{{\"messages\":[{{\"role\":\"user\",\"content\":\"{encoded}\"}}]}}");
        let body = gzip(json.as_bytes());
        let outcome = scanner.scan_body(&body, Some("gzip"), Some("collector.evil.test"));
        let custody_hits: Vec<&Finding> = outcome
            .findings()
            .iter()
            .filter(|finding| finding.rule_id == CUSTODY_RULE_ID)
            .collect();
        assert_eq!(custody_hits.len(), 1, "{outcome:?}");
        assert_eq!(
            custody_hits[0].kind,
            FindingKind::CustodySecret {
                credential: "model-key".to_owned(),
                form: EncodedForm::Base64
            }
        );
        assert!(outcome.blocks());
        // Toward its own host the credential is expected.
        let own = scanner.scan_body(&body, Some("gzip"), Some("API.model.test"));
        assert!(
            own.findings()
                .iter()
                .all(|finding| finding.rule_id != CUSTODY_RULE_ID),
            "{own:?}"
        );
    }

    #[test]
    fn custody_secret_in_every_encoding() {
        let scanner = Scanner::new(rules_from(""), custody());
        let value = CUSTODY_VALUE.as_bytes();
        let percent: String = CUSTODY_VALUE
            .bytes()
            .map(|byte| format!("%{byte:02X}"))
            .collect();
        let mut cases: Vec<(String, EncodedForm)> = vec![
            (format!("x={CUSTODY_VALUE};"), EncodedForm::Raw),
            (format!("hex={}", hex_lower(value)), EncodedForm::HexLower),
            (
                format!("HEX={}", hex_lower(value).to_ascii_uppercase()),
                EncodedForm::HexUpper,
            ),
        ];
        // Percent-encoding only differs from raw where the value has reserved characters.
        let with_reserved = format!("{CUSTODY_VALUE}/+=");
        let scanner_reserved = Scanner::new(
            rules_from(""),
            vec![CustodySecret {
                name: "reserved".to_owned(),
                value: with_reserved.clone(),
                hosts: Vec::new(),
            }],
        );
        let url_encoded = format!("q={CUSTODY_VALUE}%2F%2B%3D&x=1");
        let findings = scanner_reserved.scan(url_encoded.as_bytes());
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert!(matches!(
            findings[0].kind,
            FindingKind::CustodySecret {
                form: EncodedForm::UrlEncoded,
                ..
            }
        ));
        assert_eq!(percent.len(), value.len() * 3);
        for prefix in ["", "a", "ab"] {
            let mut data = prefix.as_bytes().to_vec();
            data.extend_from_slice(value);
            data.extend_from_slice(b"!?>");
            cases.push((STANDARD.encode(&data), EncodedForm::Base64));
            // `!?>` after the value puts `-`/`_` into the URL-safe text, so it differs.
            cases.push((URL_SAFE.encode(&data), EncodedForm::Base64Url));
        }
        for (text, form) in cases {
            let findings = scanner.scan(text.as_bytes());
            let forms: Vec<EncodedForm> = findings
                .iter()
                .filter_map(|finding| match finding.kind {
                    FindingKind::CustodySecret { form, .. } => Some(form),
                    _ => None,
                })
                .collect();
            assert!(
                forms.contains(&form)
                    || (form == EncodedForm::Base64Url && forms.contains(&EncodedForm::Base64)),
                "{form}: {forms:?}"
            );
        }
    }

    #[test]
    fn custody_needles_match_exactly_although_the_pass_ignores_case() {
        // The value contains a gitleaks keyword and shares the keyword automaton.
        let value = "Secret-Value-Qm9vYmFy-XYZ123";
        let scanner = Scanner::new(
            DlpRules::builtin(),
            vec![CustodySecret {
                name: "mixed".to_owned(),
                value: value.to_owned(),
                hosts: Vec::new(),
            }],
        );
        let custody_hits = |body: &str| {
            scanner
                .scan(body.as_bytes())
                .iter()
                .filter(|finding| finding.rule_id == CUSTODY_RULE_ID)
                .count()
        };
        assert_eq!(custody_hits(&format!("a={value}&b={value}")), 2);
        assert_eq!(
            custody_hits(&format!("a={}", value.to_ascii_lowercase())),
            0
        );
        assert_eq!(
            custody_hits(&format!("a={}", value.to_ascii_uppercase())),
            0
        );
    }

    fn hex_lower(value: &[u8]) -> String {
        value.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    #[test]
    fn placeholder_to_the_wrong_host_is_an_exfiltration_attempt() {
        // Shaped like a GitHub token, so the github-pat rule would match it too.
        let placeholder = "ghp_BOTBOTTLEplaceholder0000000000000abcd";
        let scanner = Scanner::with_placeholders(
            DlpRules::builtin(),
            Vec::new(),
            vec![PlaceholderSecret {
                name: "github".to_owned(),
                placeholder: placeholder.to_owned(),
                hosts: vec!["github.test".to_owned(), "*.github.test".to_owned()],
            }],
        );
        let body = format!("token={placeholder}");
        assert_eq!(
            scanner.scan_for_host(body.as_bytes(), "api.github.test"),
            Vec::new()
        );
        let findings = scanner.scan_for_host(body.as_bytes(), "paste.evil.test");
        assert_eq!(ids(&findings), vec![PLACEHOLDER_RULE_ID]);
        assert_eq!(
            findings[0].kind,
            FindingKind::Placeholder {
                credential: "github".to_owned(),
                form: EncodedForm::Raw
            }
        );
    }

    #[test]
    fn basic_auth_header_carrying_a_custody_secret() {
        let scanner = Scanner::new(DlpRules::builtin(), custody());
        let mut headers = http::HeaderMap::new();
        headers.insert("x-trace", http::HeaderValue::from_static("abc"));
        let basic = format!("Basic {}", STANDARD.encode(format!("git:{CUSTODY_VALUE}")));
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&basic).expect("ascii"),
        );
        let findings = scanner.scan_headers(&headers, Some("evil.test"));
        assert_eq!(ids(&findings), vec![CUSTODY_RULE_ID]);
        assert_eq!(
            findings[0].location,
            Location::Header("authorization".to_owned())
        );
        assert!(findings[0].offset >= "Basic ".len());
        assert!(
            scanner
                .scan_headers(&headers, Some("api.model.test"))
                .is_empty()
        );
    }

    #[test]
    fn split_rules_find_exactly_the_matches_of_the_full_regex() {
        let (rules, _) = DlpRules::from_gitleaks_toml(&gitleaks_file()).expect("valid");
        let mut text = String::new();
        let names = [
            "api_key",
            "x",
            "a_very_long_identifier_name_that_goes_past_fifty_chars_access",
            "sonar.login",
            "kucoin_secret",
            "my.token.value",
            "password",
            "client-secret",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaakey",
            "nytimes",
        ];
        let operators = [" = ", ": ", "=>", ":=", "||", " ?= ", ","];
        let values = [
            "'Zx81Kq0Pw3Lm5Nb7Vc9'",
            "\"0123456789abcdef0123456789abcdef\"",
            "short",
            "f3e2d1c0-b9a8-4765-8432-10fedcba9876",
            "AbCdEf0123456789AbCdEf0123456789AbCdEf01;",
        ];
        for (index, name) in names.iter().enumerate() {
            for (offset, operator) in operators.iter().enumerate() {
                let value = values[(index + offset) % values.len()];
                text.push_str(&format!(
                    "{name}{operator}{value}\n{name}_{name}{operator}{value} "
                ));
            }
        }
        let haystack = text.as_bytes();
        let scanner = Scanner::new(rules.clone(), Vec::new());
        let candidates = scanner.pass(haystack).candidates;
        let mut split_rules = 0;
        let mut fused_rules = 0;
        let mut matched = 0;
        for (index, rule) in rules.rules.iter().enumerate() {
            let (Some(regex), Some(split)) = (&rule.regex, &rule.split) else {
                continue;
            };
            split_rules += 1;
            let spans = |iter: &mut dyn Iterator<Item = regex::bytes::Captures<'_>>| {
                iter.map(|captures| {
                    (0..captures.len())
                        .map(|group| captures.get(group).map(|m| m.range()))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
            };
            let regex = regex.get();
            let expected = spans(&mut regex.captures_iter(haystack));
            let actual = spans(&mut RuleMatches::new(regex, Some(split), None, haystack));
            assert_eq!(actual, expected, "rule `{}`", rule.id);
            if let Some(slot) = scanner.fused_slot[index] {
                fused_rules += 1;
                let starts = Some(candidates.get(slot).map_or(&[][..], Vec::as_slice));
                let fused = spans(&mut RuleMatches::new(regex, Some(split), starts, haystack));
                assert_eq!(fused, expected, "rule `{}` (fused)", rule.id);
            }
            matched += expected.len();
        }
        assert!(split_rules > 50, "only {split_rules} rules were split");
        assert!(fused_rules > 50, "only {fused_rules} rules were fused");
        // The text must give the split path real matches to agree on, not only misses.
        assert!(matched > 20, "only {matched} matches");
    }

    #[test]
    fn only_rules_a_scan_needs_are_compiled() {
        let scanner = gitleaks_scanner();
        let compiled = |scanner: &Scanner| {
            scanner
                .rules
                .rules
                .iter()
                .filter(|rule| rule.regex.as_ref().is_some_and(LazyRegex::is_compiled))
                .map(|rule| rule.id.clone())
                .collect::<Vec<String>>()
        };
        assert_eq!(compiled(&scanner), Vec::<String>::new());
        let body = format!("push with {GITHUB_TOKEN}");
        assert_eq!(ids(&scanner.scan(body.as_bytes())), vec!["github-pat"]);
        let after = compiled(&scanner);
        assert!(after.iter().any(|id| id == "github-pat"), "{after:?}");
        assert!(
            !after.iter().any(|id| id == "aws-access-token"),
            "{after:?}"
        );
        assert!(
            after.len() < 40,
            "{} rules compiled: {after:?}",
            after.len()
        );
    }

    #[test]
    fn a_generic_finding_on_a_specific_rules_span_is_dropped() {
        let scanner = Scanner::new(
            rules_from(
                "[[rules]]\nid = 'generic-api-key'\nregex = '(?i)token\\s*=\\s*([a-z0-9_]{12,})'\n\
                 [[rules]]\nid = 'tok'\nregex = 'tok_[a-z0-9]{8}'\n\
                 [[rules]]\nid = 'generic-password'\nregex = 'pw=([a-z0-9_]{8,})'\n",
            ),
            Vec::new(),
        );
        // The generic rule's secret contains the specific token: reported once, as `tok`.
        assert_eq!(ids(&scanner.scan(b"token = tok_prod1234")), vec!["tok"]);
        // Overlapping without containing is the same secret too.
        assert_eq!(
            ids(&scanner.scan(b"pw=zz_tok_prod1234 pw=tok_prod1234zz")),
            vec!["tok", "tok"]
        );
        // A generic finding elsewhere in the buffer stays.
        assert_eq!(
            ids(&scanner.scan(b"tok_prod1234 token = qwertyuiop12")),
            vec!["tok", "generic-api-key"]
        );
        // Two generic rules on one span are both kept: neither knows more than the other.
        let generic_only = Scanner::new(
            rules_from(
                "[[rules]]\nid = 'generic-api-key'\nregex = 'k=([a-z0-9]{8,})'\n\
                 [[rules]]\nid = 'generic-other'\nregex = '([a-z0-9]{8,})'\n",
            ),
            Vec::new(),
        );
        assert_eq!(
            ids(&generic_only.scan(b"k=abcdef123")),
            vec!["generic-api-key", "generic-other"]
        );
    }

    #[test]
    fn a_blocking_generic_finding_is_kept_beside_a_specific_one_that_only_logs() {
        let scanner = Scanner::new(
            rules_from(
                "[[rules]]\nid = 'generic-api-key'\nregex = '(?i)token\\s*=\\s*([a-z0-9_]{12,})'\naction = 'block'\n\
                 [[rules]]\nid = 'tok'\nregex = 'tok_[a-z0-9]{8}'\naction = 'log'\n",
            ),
            Vec::new(),
        );
        let findings = scanner.scan(b"token = tok_prod1234");
        assert_eq!(ids(&findings), vec!["generic-api-key", "tok"]);
        assert!(findings.iter().any(|f| f.action == Action::Block));
    }

    #[test]
    fn the_builtin_set_reports_a_provider_token_once() {
        let scanner = Scanner::new(DlpRules::builtin(), Vec::new());
        let body = format!("{{\"api_token\": \"{GITHUB_TOKEN}\"}}");
        let findings = scanner.scan(body.as_bytes());
        assert_eq!(ids(&findings), vec!["github-pat"]);
        assert_eq!(findings[0].action, Action::Block);
    }

    #[test]
    fn builtin_rules_do_not_block_placeholders_that_look_like_keys() {
        let scanner = Scanner::new(DlpRules::builtin(), Vec::new());
        let blocks = |text: &str| {
            scanner
                .scan(text.as_bytes())
                .iter()
                .any(|finding| finding.action == Action::Block)
        };
        // Too short for any Slack token format.
        assert!(!blocks("SLACK_BOT_TOKEN=xoxb-12345-abcd234"));
        // Google's placeholder shapes and a public Firebase SDK sample key (built from
        // pieces so this file holds no key-shaped run).
        assert!(!blocks("key: AIzaSyabcdefghijklmnopqrstuvwxyz1234567"));
        assert!(!blocks(&format!("key: AIza{}", "a".repeat(35))));
        assert!(!blocks(&format!(
            "key: AIza{}{}",
            "SyAnLA7NfeLquW1tJFpx", "_eQCxoX-oo6YyIs"
        )));
        assert!(!blocks("octopus: API-VERSIONNUMBERFORTHECLIENTX"));
        // The same shapes with random-looking content do block.
        assert!(blocks(&format!(
            "SLACK_BOT_TOKEN=xoxb-{}-{}-{}",
            "4820571193", "7719305562", "Qm3xV8pLr2Tz6Wc9Hn4Ks1Ya"
        )));
        assert!(blocks(&format!(
            "key: AIza{}",
            "Sy7Qm2Xr9Lp4Tz8Wc3Hn6Ks1Va5Bd0Fe2Gj"
        )));
        assert!(blocks(&format!(
            "octopus: API-{}",
            "7QM2XR9LP4TZ8WC3HN6KS1VA5B"
        )));
    }

    #[test]
    fn builtin_rules_spare_a_provider_named_id_but_not_a_token_under_an_id_path() {
        let scanner = Scanner::new(DlpRules::builtin(), Vec::new());
        let uuid = "0f6b3c2a-9d41-4e7b-8a15-2c9e7d3f1b64";
        let blocks = |text: String| {
            scanner
                .scan(text.as_bytes())
                .iter()
                .any(|finding| finding.action == Action::Block)
        };
        assert!(!blocks(format!("heroku_app_id = \"{uuid}\"")));
        assert!(!blocks(format!("var herokuAppId string = \"{uuid}\"")));
        assert!(blocks(format!("heroku_api_key = \"{uuid}\"")));
        // An `id` earlier in the name is not the name of the value.
        assert!(blocks(format!("user_id.heroku_token = \"{uuid}\"")));
    }

    #[test]
    fn builtin_rules_stay_quiet_on_what_agent_clis_send_every_call() {
        let scanner = Scanner::new(DlpRules::builtin(), Vec::new());
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "anthropic-beta",
            http::HeaderValue::from_static(
                "claude-code-20250219,token-counting-2024-11-01,advanced-tool-use-2025-11-20",
            ),
        );
        assert_eq!(scanner.scan_headers(&headers, None), Vec::new());
        assert_eq!(
            scanner.scan(br#"{"credentials_path": ".claude/settings", "secret_dir": ".config/gh/hosts.yml"}"#),
            Vec::new()
        );
        // The same names with a value that is not a flag or a dot-directory path still log.
        let value = "q8Zr3VbN1xT6yK2m";
        let found = scanner.scan(format!("{{\"credentials\": \"{value}\"}}").as_bytes());
        assert_eq!(ids(&found), vec!["generic-api-key"]);
    }

    #[test]
    fn keyword_prefilter_gates_the_rule() {
        let scanner = Scanner::new(
            rules_from(
                "[[rules]]\nid = 'needs-kw'\nregex = 'code-[0-9]{6}'\nkeywords = ['MAGIC']\n",
            ),
            Vec::new(),
        );
        assert_eq!(scanner.scan(b"code-123456"), Vec::new());
        assert_eq!(ids(&scanner.scan(b"magic: code-123456")), vec!["needs-kw"]);
        assert_eq!(ids(&scanner.scan(b"code-123456 (MaGiC)")), vec!["needs-kw"]);
    }

    #[test]
    fn entropy_threshold_and_secret_group() {
        let scanner = Scanner::new(
            rules_from(
                "[[rules]]\nid = 'e'\nregex = '(k)=([a-z0-9]{12})'\nsecretGroup = 2\nentropy = 3.0\n",
            ),
            Vec::new(),
        );
        // 12 distinct characters: log2(12) ≈ 3.58 bits; "aaaabbbbcccc": log2(3) ≈ 1.58.
        let findings = scanner.scan(b"k=a1b2c3d4e5f6");
        assert_eq!(ids(&findings), vec!["e"]);
        assert_eq!(findings[0].offset, 2);
        assert_eq!(findings[0].len, 12);
        assert_eq!(scanner.scan(b"k=aaaabbbbcccc"), Vec::new());
        assert!((shannon_entropy(b"abcd") - 2.0).abs() < 1e-9);
        assert!(shannon_entropy(b"aaaa").abs() < 1e-9);
    }

    #[test]
    fn first_nonempty_group_is_the_secret_by_default() {
        let scanner = Scanner::new(
            rules_from("[[rules]]\nid = 'g'\nregex = 'id=(?:(x+)|(y+))'\n"),
            Vec::new(),
        );
        let findings = scanner.scan(b"id=yyy");
        assert_eq!((findings[0].offset, findings[0].len), (3, 3));
    }

    fn one_rule_with_allowlist(allowlist: &str) -> Scanner {
        let toml = format!(
            "[[rules]]\nid = 'tok'\nregex = 'tok_([a-z0-9]{{8}})'\n[[rules.allowlists]]\n{allowlist}\n"
        );
        Scanner::new(rules_from(&toml), Vec::new())
    }

    #[test]
    fn allowlist_regex_targets() {
        let secret = one_rule_with_allowlist("regexes = ['^test']");
        assert_eq!(secret.scan(b"tok_test1234"), Vec::new());
        assert_eq!(ids(&secret.scan(b"tok_prod1234")), vec!["tok"]);
        // The secret is `test1234`, so `^tok_` only matches with `match` as the target.
        let on_secret = one_rule_with_allowlist("regexes = ['^tok_']");
        assert_eq!(ids(&on_secret.scan(b"tok_prod1234")), vec!["tok"]);
        let on_match = one_rule_with_allowlist("regexTarget = 'match'\nregexes = ['^tok_']");
        assert_eq!(on_match.scan(b"tok_prod1234"), Vec::new());
        let on_line = one_rule_with_allowlist("regexTarget = 'line'\nregexes = ['^# example']");
        assert_eq!(on_line.scan(b"# example tok_prod1234\n"), Vec::new());
        assert_eq!(
            ids(&on_line.scan(b"# example\nvalue tok_prod1234\n")),
            vec!["tok"]
        );
    }

    #[test]
    fn allowlist_stopwords_and_conditions() {
        let stopwords = one_rule_with_allowlist("stopwords = ['DUMMY']");
        assert_eq!(stopwords.scan(b"tok_dummy123"), Vec::new());
        assert_eq!(ids(&stopwords.scan(b"tok_prod1234")), vec!["tok"]);

        let or = one_rule_with_allowlist("regexes = ['^0']\nstopwords = ['dummy']");
        assert_eq!(or.scan(b"tok_0abcdefg"), Vec::new());
        assert_eq!(or.scan(b"tok_dummy123"), Vec::new());

        let and =
            one_rule_with_allowlist("condition = 'AND'\nregexes = ['^0']\nstopwords = ['dummy']");
        assert_eq!(ids(&and.scan(b"tok_0abcdefg")), vec!["tok"]);
        assert_eq!(ids(&and.scan(b"tok_dummy123")), vec!["tok"]);
        assert_eq!(and.scan(b"tok_0dummy12"), Vec::new());

        // A path can never match an HTTP message, so an AND list naming one never applies,
        // and an OR list falls back on its other checks.
        let and_path =
            one_rule_with_allowlist("condition = 'AND'\npaths = ['.*']\nstopwords = ['dummy']");
        assert_eq!(ids(&and_path.scan(b"tok_dummy123")), vec!["tok"]);
        let or_path = one_rule_with_allowlist("paths = ['.*']\nstopwords = ['dummy']");
        assert_eq!(or_path.scan(b"tok_dummy123"), Vec::new());
    }

    #[test]
    fn global_and_targeted_allowlists() {
        let scanner = Scanner::new(
            rules_from(
                "[allowlist]\nregexes = ['^glob']\n\
                 [[allowlists]]\ntargetRules = ['b']\nstopwords = ['only']\n\
                 [[rules]]\nid = 'a'\nregex = 'a_([a-z0-9]{8})'\n\
                 [[rules]]\nid = 'b'\nregex = 'b_([a-z0-9]{8})'\n",
            ),
            Vec::new(),
        );
        assert_eq!(scanner.scan(b"a_globabcd b_globabcd"), Vec::new());
        assert_eq!(ids(&scanner.scan(b"a_onlyabcd b_onlyabcd")), vec!["a"]);
    }

    #[test]
    fn per_rule_actions() {
        let body = b"tok_prod1234";
        let rules =
            rules_from("[[rules]]\nid = 'tok'\nregex = 'tok_[a-z0-9]{8}'\naction = 'log'\n");
        let findings = Scanner::new(rules.clone(), Vec::new()).scan(body);
        assert_eq!(findings[0].action, Action::Log);
        let mut rules = rules;
        rules.set_action("tok", Action::Block).expect("known id");
        assert_eq!(
            Scanner::new(rules, Vec::new()).scan(body)[0].action,
            Action::Block
        );
        let defaulted = rules_from("[[rules]]\nid = 'tok'\nregex = 'tok_[a-z0-9]{8}'\n")
            .with_default_action(Action::Log);
        assert_eq!(
            Scanner::new(defaulted, Vec::new()).scan(body)[0].action,
            Action::Log
        );
    }

    fn aws_ids(outcome: &ScanOutcome) -> Vec<&str> {
        ids(outcome.findings())
            .into_iter()
            .filter(|id| *id == "aws-access-key-id")
            .collect()
    }

    #[test]
    fn a_key_in_each_view_is_found_once() {
        let scanner = Scanner::new(DlpRules::builtin(), Vec::new());
        let escaped = format!("{{\"k\":\"\\u0041{}\"}}", &AWS_KEY[1..]);
        let percent = format!("a=AKIA%{:02X}{}", AWS_KEY.as_bytes()[4], &AWS_KEY[5..]);
        let nested = STANDARD.encode(STANDARD.encode(format!("id {AWS_KEY}")));
        let multipart = format!(
            "--b\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n--b--\r\n",
            STANDARD.encode(format!("id={AWS_KEY}"))
        );
        for (body, content_types) in [
            (escaped.as_str(), &[][..]),
            (percent.as_str(), &[]),
            (nested.as_str(), &[]),
            (multipart.as_str(), &["multipart/mixed; boundary=b"]),
        ] {
            // The bytes alone hide it.
            assert_eq!(
                aws_ids(&ScanOutcome::Scanned(scanner.scan(body.as_bytes()))),
                Vec::<&str>::new()
            );
            let outcome =
                scanner.scan_request_body(body.as_bytes(), None, content_types, None, false);
            assert!(matches!(outcome, ScanOutcome::Scanned(_)), "{outcome:?}");
            assert_eq!(aws_ids(&outcome), vec!["aws-access-key-id"], "{body}");
        }
        // Plain and escaped copies of one key: one finding, not two.
        let both = format!("{AWS_KEY} \\u0041{}", &AWS_KEY[1..]);
        assert_eq!(
            aws_ids(&scanner.scan_body(both.as_bytes(), None, None)),
            vec!["aws-access-key-id"]
        );
    }

    #[test]
    fn a_placeholder_in_a_view_is_an_exfiltration_attempt() {
        let placeholder = "bbph-model-key-0123456789abcdef";
        let scanner = Scanner::with_placeholders(
            DlpRules::builtin(),
            Vec::new(),
            vec![PlaceholderSecret {
                name: "model".to_owned(),
                placeholder: placeholder.to_owned(),
                hosts: vec!["api.model.test".to_owned()],
            }],
        );
        let escaped: String = placeholder
            .chars()
            .map(|c| format!("\\u{:04x}", u32::from(c)))
            .collect();
        let nested = STANDARD.encode(STANDARD.encode(placeholder));
        for body in [escaped, nested] {
            assert!(scanner.scan(body.as_bytes()).is_empty(), "{body}");
            let found = scanner.scan_for_host(body.as_bytes(), "paste.evil.test");
            assert_eq!(ids(&found), vec![PLACEHOLDER_RULE_ID], "{body}");
            assert!(
                scanner
                    .scan_for_host(body.as_bytes(), "api.model.test")
                    .is_empty()
            );
        }
    }

    #[test]
    fn views_past_the_budget_make_the_body_too_large() {
        let scanner = Scanner::new(DlpRules::builtin(), Vec::new()).with_max_decoded(4096);
        // 3.6 KiB of body, 8.3 KiB of views: the text view, then two levels of base64.
        let body = format!("\\u0041 {}", STANDARD.encode(STANDARD.encode([7u8; 2000])));
        assert!(body.len() < 4096);
        assert!(matches!(
            scanner.scan_body(body.as_bytes(), None, None),
            ScanOutcome::TooLarge { limit: 4096, .. }
        ));
        assert!(matches!(
            scanner.scan_message(body.as_bytes(), "x.test"),
            ScanOutcome::TooLarge { .. }
        ));
    }

    #[test]
    fn cap_and_bomb_give_too_large_with_findings_from_the_prefix() {
        let scanner = Scanner::new(DlpRules::builtin(), Vec::new()).with_max_decoded(64);
        let mut body = format!("key {AWS_KEY} ").into_bytes();
        body.resize(200, b' ');
        let outcome = scanner.scan_body(&body, None, None);
        match &outcome {
            ScanOutcome::TooLarge { limit, findings } => {
                assert_eq!(*limit, 64);
                assert_eq!(ids(findings), vec!["aws-access-key-id"]);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let scanner = Scanner::new(DlpRules::builtin(), Vec::new()).with_max_decoded(1 << 20);
        assert_eq!(
            scanner.scan_body(&gzip_bomb(), Some("gzip"), None),
            ScanOutcome::TooLarge {
                limit: 1 << 20,
                findings: Vec::new()
            }
        );
        assert_eq!(
            scanner.scan_body(b"plain", None, None),
            ScanOutcome::Scanned(Vec::new())
        );
        assert!(matches!(
            scanner.scan_body(b"xx", Some("compress"), None),
            ScanOutcome::Undecodable { .. }
        ));
    }
}
