//! The bottle's egress audit log: `state/<slug>/egress.jsonl`, one JSON object per line,
//! append-only and SHA-256 hash-chained.
//!
//! Each line's `hash` is the SHA-256 of the line's own bytes with the trailing
//! `,"hash":"…"` member removed, and each line's `prev_hash` is the previous line's `hash`
//! (64 zeros for the first line). Hashing the exact bytes rather than a re-serialisation
//! keeps verification independent of JSON field order or float formatting. A chain can
//! only prove that no line *before the last* was changed or removed: cutting lines off the
//! end leaves a valid shorter chain, which is why [`VerifyReport`] returns the last
//! sequence number and hash for the caller to anchor elsewhere (metadata, provenance).
//!
//! # Bounds
//!
//! Much of an event comes from the bottle (a host, a path, a header quoted in `detail`,
//! what DLP found), so [`AuditLog::append`] bounds every string field before it writes.
//! Each limit is on the field's *serialised* size (its JSON-escaped text, so a `"` counts
//! 2 bytes and a control character 6); a longer value is cut at a character boundary and
//! ends with the marker `…[+N bytes]` (N: the bytes of the original value left out):
//!
//! | field | limit (bytes) |
//! |---|---|
//! | `method` | [`MAX_METHOD`] = 64 |
//! | `host` | [`MAX_HOST`] = 1024 |
//! | `path` | [`MAX_PATH`] = 2048 |
//! | `reason` | [`MAX_REASON`] = 256 |
//! | `credential` | [`MAX_CREDENTIAL`] = 256 |
//! | `detail` | [`MAX_DETAIL`] = 4096 |
//! | `dlp[].rule` / `action` / `location` / `excerpt` / `credential` | 128 / 32 / 256 / 256 / 256 |
//! | `dlp` | at most [`MAX_DLP_RECORDS`] = 32 records; `dlp_more` counts the rest |
//!
//! With these no line can reach [`MAX_EVENT_LINE`] (64 KiB); should one ever be about
//! to, the writer drops the DLP records (counting them in `dlp_more`) and then cuts every
//! field to 64 bytes, so a line over [`MAX_EVENT_LINE`] is never written. Readers accept
//! lines up to [`MAX_LINE`] (1 MiB); a longer line, or one that is not an event, is
//! reported with its line number and byte offset and skipped, and [`check`] goes on to
//! verify the rest of the chain segment by segment.
//!
//! Block decisions are also rate limited ([`BlockLimiter`]), so a loop of blocked
//! requests cannot fill the disk: past [`BLOCK_BURST`] at once and then
//! [`BLOCK_PER_SECOND`] a second, blocks are counted, not written, and a
//! `block-events-held-back` event with the count (`held_back`) and the top reasons and
//! hosts goes into the chain after a quiet second, every 10 s during a flood, and when
//! the gateway stops.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first line.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Lines longer than this are not read (they are reported and skipped): the writer never
/// produces them, so one is corruption or an attempt to make the reader allocate without
/// bound.
pub const MAX_LINE: usize = 1 << 20;

/// The longest line the writer ever writes, newline included.
pub const MAX_EVENT_LINE: usize = 64 * 1024;
/// Serialised bytes `method` may take (see the module docs).
pub const MAX_METHOD: usize = 64;
/// Serialised bytes `host` may take.
pub const MAX_HOST: usize = 1024;
/// Serialised bytes `path` may take.
pub const MAX_PATH: usize = 2048;
/// Serialised bytes `reason` may take.
pub const MAX_REASON: usize = 256;
/// Serialised bytes `credential` (and a DLP record's `credential`) may take.
pub const MAX_CREDENTIAL: usize = 256;
/// Serialised bytes `detail` may take.
pub const MAX_DETAIL: usize = 4096;
/// Serialised bytes a DLP record's `rule` may take.
pub const MAX_DLP_RULE: usize = 128;
/// Serialised bytes a DLP record's `action` may take.
pub const MAX_DLP_ACTION: usize = 32;
/// Serialised bytes a DLP record's `location` may take.
pub const MAX_DLP_LOCATION: usize = 256;
/// Serialised bytes a DLP record's `excerpt` may take.
pub const MAX_DLP_EXCERPT: usize = 256;
/// DLP records kept in one event; `dlp_more` counts the rest.
pub const MAX_DLP_RECORDS: usize = 32;
/// What every field is cut to in the last resort before a line could exceed
/// [`MAX_EVENT_LINE`].
const LAST_RESORT_FIELD: usize = 64;
/// The longest truncation marker: `…` (3 bytes), `[+`, 20 digits, ` bytes]`.
const MARKER_MAX: usize = 3 + 2 + 20 + 7;
// Every bound leaves room for the longest marker, so a cut value never exceeds it.
const _: () = assert!(
    MARKER_MAX <= MAX_METHOD
        && MARKER_MAX <= MAX_DLP_ACTION
        && MARKER_MAX <= MAX_DLP_RULE
        && MARKER_MAX <= LAST_RESORT_FIELD
);
/// Problems (and chain segments) a verification report lists; the rest are counted.
pub const MAX_REPORTED: usize = 1000;

/// Block events written at once before [`BLOCK_PER_SECOND`] applies.
pub const BLOCK_BURST: u32 = 20;
/// Block events written per second, sustained, past [`BLOCK_BURST`].
pub const BLOCK_PER_SECOND: u32 = 5;
/// During a flood that never pauses for a second, held-back blocks are still reported
/// this often.
pub const BLOCK_SUMMARY_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// One HTTP request: absolute-form, or one inside an intercepted tunnel.
    Request,
    /// A CONNECT tunnel: a block, or a passthrough tunnel when it closes.
    Connect,
    /// The policy was replaced in a running gateway.
    PolicyUpdate,
    /// The gateway started or stopped.
    Gateway,
    /// A packet that tried to leave the bottle other than through the gateway (a direct
    /// connection, a DNS query, a datagram), caught and refused by the tripwire.
    Direct,
    /// One call of the forge sidecar's tools (in `forge-ops.jsonl`, not the gateway's
    /// log): `reason` is the tool, `path` its target (`#17`, or the branch of a new pull
    /// request), `status` the forge's HTTP status when known.
    Forge,
    /// One call of the supervise sidecar's tools, in the gateway's own log: `reason` is
    /// the tool, `host` the host an egress request names, `detail` what the human decided.
    Supervise,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditDecision {
    Allow,
    Block,
    /// Not a traffic decision (policy updates, start and stop).
    Info,
}

/// One DLP finding as recorded: never the secret, only a redacted excerpt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DlpRecord {
    pub rule: String,
    /// `block` or `log`.
    pub action: String,
    /// Where it was found, e.g. `header:authorization`, `body`, `query`.
    pub location: String,
    pub excerpt: String,
    /// For custody findings: the credential whose value or placeholder was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// One line of `egress.jsonl`. Field order is the order on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub at: String,
    pub kind: EventKind,
    pub decision: AuditDecision,
    pub reason: String,
    pub rule: Option<usize>,
    pub method: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// The path without its query string: queries can carry credentials.
    pub path: Option<String>,
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// The *name* of a credential injected into this request.
    pub credential: Option<String>,
    pub dlp: Vec<DlpRecord>,
    /// DLP findings beyond the [`MAX_DLP_RECORDS`] listed in `dlp`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dlp_more: u64,
    /// For a summary of events that were counted rather than written one by one (see
    /// [`BlockLimiter`]): how many.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_back: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub prev_hash: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl AuditEvent {
    /// The event a draft becomes at `seq`, before its hash is computed.
    fn unhashed(draft: EventDraft, seq: u64, at: String, prev_hash: String, dlp_more: u64) -> Self {
        AuditEvent {
            seq,
            at,
            kind: draft.kind,
            decision: draft.decision,
            reason: draft.reason,
            rule: draft.rule,
            method: draft.method,
            host: draft.host,
            port: draft.port,
            path: draft.path,
            status: draft.status,
            bytes_up: draft.bytes_up,
            bytes_down: draft.bytes_down,
            duration_ms: draft.duration_ms,
            credential: draft.credential,
            dlp: draft.dlp,
            dlp_more,
            held_back: draft.held_back,
            detail: draft.detail,
            prev_hash,
            hash: String::new(),
        }
    }
}

/// What the gateway knows about an event; the log adds `seq`, `at` and the hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventDraft {
    pub kind: EventKind,
    pub decision: AuditDecision,
    pub reason: String,
    pub rule: Option<usize>,
    pub method: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    pub credential: Option<String>,
    pub dlp: Vec<DlpRecord>,
    /// For a summary event: how many events it stands for (see [`AuditEvent::held_back`]).
    pub held_back: u64,
    pub detail: Option<String>,
}

impl EventDraft {
    #[must_use]
    pub fn new(kind: EventKind, decision: AuditDecision, reason: impl Into<String>) -> Self {
        EventDraft {
            kind,
            decision,
            reason: reason.into(),
            rule: None,
            method: None,
            host: None,
            port: None,
            path: None,
            status: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            credential: None,
            dlp: Vec::new(),
            held_back: 0,
            detail: None,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The bytes `c` takes inside a JSON string as `serde_json` writes it.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0c}' => 2,
        c if u32::from(c) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// `text`, cut so that its JSON-escaped form takes at most `max` bytes, with the marker
/// `…[+N bytes]` when anything was cut. `max` must be at least [`MARKER_MAX`].
#[must_use]
pub fn bound(text: String, max: usize) -> String {
    if text.chars().map(escaped_len).sum::<usize>() <= max {
        return text;
    }
    let budget = max.saturating_sub(MARKER_MAX);
    let mut used = 0;
    let mut end = 0;
    for (i, c) in text.char_indices() {
        used += escaped_len(c);
        if used > budget {
            break;
        }
        end = i + c.len_utf8();
    }
    format!("{}…[+{} bytes]", &text[..end], text.len() - end)
}

fn bound_opt(text: Option<String>, max: usize) -> Option<String> {
    text.map(|t| bound(t, max))
}

impl DlpRecord {
    fn bounded(self) -> DlpRecord {
        DlpRecord {
            rule: bound(self.rule, MAX_DLP_RULE),
            action: bound(self.action, MAX_DLP_ACTION),
            location: bound(self.location, MAX_DLP_LOCATION),
            excerpt: bound(self.excerpt, MAX_DLP_EXCERPT),
            credential: bound_opt(self.credential, MAX_CREDENTIAL),
        }
    }
}

impl EventDraft {
    /// Applies the per-field bounds (see the module docs).
    fn bounded(mut self) -> (EventDraft, u64) {
        let more = self.dlp.len().saturating_sub(MAX_DLP_RECORDS) as u64;
        self.dlp.truncate(MAX_DLP_RECORDS);
        let dlp = std::mem::take(&mut self.dlp)
            .into_iter()
            .map(DlpRecord::bounded)
            .collect();
        let draft = EventDraft {
            reason: bound(self.reason, MAX_REASON),
            method: bound_opt(self.method, MAX_METHOD),
            host: bound_opt(self.host, MAX_HOST),
            path: bound_opt(self.path, MAX_PATH),
            credential: bound_opt(self.credential, MAX_CREDENTIAL),
            detail: bound_opt(self.detail, MAX_DETAIL),
            dlp,
            ..self
        };
        (draft, more)
    }
}

/// Serialises `event` (without its `hash`) into at most `max_line - 75` bytes, so that
/// the line with its hash and newline fits in `max_line`: when the bounded fields do not
/// fit (they always do for [`MAX_EVENT_LINE`]), the DLP records go first (counted in
/// `dlp_more`), then every field is cut to [`LAST_RESORT_FIELD`] bytes.
fn serialise_within(event: &mut AuditEvent, max_line: usize) -> Vec<u8> {
    // `,"hash":"` + 64 hex digits + `"}` + newline, less the `}` the body ends with.
    let room = max_line.saturating_sub(",\"hash\":\"\"}\n".len() + 64 - 1);
    let body = serde_json::to_vec(&*event).expect("an audit event always serializes");
    if body.len() <= room {
        return body;
    }
    event.dlp_more += event.dlp.len() as u64;
    event.dlp.clear();
    let body = serde_json::to_vec(&*event).expect("an audit event always serializes");
    if body.len() <= room {
        return body;
    }
    let cut = |text: &mut String| *text = bound(std::mem::take(text), LAST_RESORT_FIELD);
    let cut_opt = |text: &mut Option<String>| {
        if let Some(text) = text.as_mut() {
            *text = bound(std::mem::take(text), LAST_RESORT_FIELD);
        }
    };
    cut(&mut event.reason);
    cut_opt(&mut event.method);
    cut_opt(&mut event.host);
    cut_opt(&mut event.path);
    cut_opt(&mut event.credential);
    cut_opt(&mut event.detail);
    serde_json::to_vec(&*event).expect("an audit event always serializes")
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit log `{path}`")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write audit log `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read audit log `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "audit log `{path}` is broken at line {line}: {problem}\nhint: the log was changed after it was written; keep it as evidence and run `bot-bottle audit verify`"
    )]
    Broken {
        path: PathBuf,
        /// 1-based line number of the first line that does not verify.
        line: u64,
        problem: String,
    },
    #[error("cannot write the audit export")]
    Export(#[source] io::Error),
    #[error(
        "audit log `{path}` does not reach its recorded head: {problem}\nhint: lines were removed from the end of the log (or the head was taken from another log); keep both as evidence"
    )]
    Truncated { path: PathBuf, problem: String },
}

/// Where a log stood when its writer last stopped: the last line's sequence number and
/// hash. A hash chain cannot show that lines were cut from its end; comparing it with a
/// head kept elsewhere can. The gateway writes one beside the log ([`head_path`]) each
/// time it stops, and launches print it for callers to keep in their own records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
}

impl std::str::FromStr for AuditHead {
    type Err = String;

    /// `SEQ:HASH`, as `audit verify --expect` takes it.
    fn from_str(text: &str) -> Result<Self, String> {
        let (seq, hash) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}` is not `SEQ:HASH`"))?;
        let seq = seq
            .parse()
            .map_err(|_| format!("`{seq}` is not a sequence number"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("`{hash}` is not a 64-digit hex SHA-256"));
        }
        Ok(AuditHead {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// `egress.jsonl` → `egress.head.json`, beside it.
#[must_use]
pub fn head_path(log: &Path) -> PathBuf {
    log.with_extension("head.json")
}

/// The head recorded beside a log, if any.
///
/// # Errors
/// The file exists but cannot be read or parsed.
pub fn read_head(log: &Path) -> Result<Option<AuditHead>, AuditError> {
    let path = head_path(log);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|err| AuditError::Read {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, err),
            }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AuditError::Read { path, source }),
    }
}

/// Verifies the chain and that it reaches every one of `heads`, in one pass: for each
/// head, the line numbered `head.seq` exists and has `head.hash`. With no heads this is
/// [`verify`].
///
/// # Errors
/// As [`verify`], or [`AuditError::Truncated`] for the first head the log does not reach.
pub fn verify_against(path: &Path, heads: &[AuditHead]) -> Result<VerifyReport, AuditError> {
    let report = check(path, heads)?;
    report.into_result(path)
}

/// Checks the whole log at `path` and the `heads` it must reach, and reports every
/// problem rather than stopping at the first: a line that cannot be read (over
/// [`MAX_LINE`], not an event) or does not verify is listed with its line number and byte
/// offset, and the chain is checked on from the next line that does, as a new segment.
/// Memory stays bounded whatever the file holds.
///
/// # Errors
/// Only I/O errors; what is wrong with the content is in the report.
pub fn check(path: &Path, heads: &[AuditHead]) -> Result<VerifyReport, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut seen: Vec<Option<String>> = vec![None; heads.len()];
    let mut checker = Checker::new();
    let mut reader = LineReader::new(BufReader::new(file));
    while let Some(raw) = reader.next_line().map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })? {
        if let Some(event) = checker.feed(&raw) {
            for (head, found) in heads.iter().zip(seen.iter_mut()) {
                if event.seq == head.seq {
                    *found = Some(event.hash.clone());
                }
            }
        }
    }
    let mut report = checker.finish();
    for (head, found) in heads.iter().zip(seen) {
        match found {
            Some(hash) if hash == head.hash => {}
            Some(hash) => report.unmet_heads.push(format!(
                "line seq {} has hash {hash}, the head says {}",
                head.seq, head.hash
            )),
            None => report.unmet_heads.push(format!(
                "the log ends at seq {}, the head is at seq {}",
                report.last_seq, head.seq
            )),
        }
    }
    Ok(report)
}

/// One line that could not be read or does not verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineProblem {
    /// 1-based line number (blank lines count).
    pub line: u64,
    /// Byte offset of the line's first byte in the file.
    pub offset: u64,
    pub problem: String,
}

impl std::fmt::Display for LineProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {} (byte {}): {}",
            self.line, self.offset, self.problem
        )
    }
}

/// A run of consecutive lines whose chain verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    pub first_line: u64,
    pub first_seq: u64,
    pub last_line: u64,
    pub last_seq: u64,
}

/// What a verification found. [`VerifyReport::is_ok`] when there are no problems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Non-blank lines read, good or bad.
    pub lines: u64,
    /// Lines that verified.
    pub events: u64,
    /// Of the last line that verified; 0 for an empty log.
    pub last_seq: u64,
    /// [`GENESIS_HASH`] for an empty log.
    pub last_hash: String,
    /// The first [`MAX_REPORTED`] problems, in file order.
    pub problems: Vec<LineProblem>,
    /// Problems past those listed.
    pub problems_more: u64,
    /// The verified runs of the chain; one for an intact log, none for an empty one.
    pub segments: Vec<Segment>,
    /// Segments past the first [`MAX_REPORTED`].
    pub segments_more: u64,
    /// Heads the log does not reach, as sentences (from [`check`]).
    pub unmet_heads: Vec<String>,
}

impl VerifyReport {
    #[must_use]
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.problems_more == 0 && self.unmet_heads.is_empty()
    }

    /// The report when it is clean, else the error for its first problem.
    ///
    /// # Errors
    /// [`AuditError::Broken`] for the first problem line (its text counts the others),
    /// else [`AuditError::Truncated`] for the first unmet head.
    pub fn into_result(self, path: &Path) -> Result<VerifyReport, AuditError> {
        if let Some(first) = self.problems.first() {
            let others = self.problems.len() as u64 - 1 + self.problems_more;
            let mut problem = format!("{} (byte {})", first.problem, first.offset);
            if others > 0 {
                problem.push_str(&format!("; and {others} more problem lines"));
            }
            return Err(AuditError::Broken {
                path: path.to_path_buf(),
                line: first.line,
                problem,
            });
        }
        if let Some(problem) = self.unmet_heads.first() {
            return Err(AuditError::Truncated {
                path: path.to_path_buf(),
                problem: problem.clone(),
            });
        }
        Ok(self)
    }
}

struct ChainState {
    file: File,
    seq: u64,
    prev_hash: String,
}

/// The writer. Appends are serialised by a mutex and written with one `write` call per
/// line, so a crash loses at most the line being written, never interleaves two.
pub struct AuditLog {
    path: PathBuf,
    state: Mutex<ChainState>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (creating if missing) the log and continues its chain from the last line.
    ///
    /// # Errors
    /// I/O errors, or [`AuditError::Broken`] when the last line does not parse: the
    /// gateway then refuses to start rather than fork the chain.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| AuditError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true).read(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let (seq, prev_hash) = match last_line(&mut file).map_err(|source| AuditError::Read {
            path: path.to_path_buf(),
            source,
        })? {
            None => (0, GENESIS_HASH.to_string()),
            Some((line_no, line)) => {
                let event: AuditEvent =
                    serde_json::from_slice(&line).map_err(|err| AuditError::Broken {
                        path: path.to_path_buf(),
                        line: line_no,
                        problem: format!("last line is not an audit event ({err})"),
                    })?;
                (event.seq, event.hash)
            }
        };
        Ok(AuditLog {
            path: path.to_path_buf(),
            state: Mutex::new(ChainState {
                file,
                seq,
                prev_hash,
            }),
        })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event and returns it as written.
    ///
    /// # Errors
    /// The write failed; the chain state is left unchanged so the next write continues
    /// from the last line that did reach the file.
    pub fn append(&self, draft: EventDraft) -> Result<AuditEvent, AuditError> {
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (draft, dlp_more) = draft.bounded();
        let mut event =
            AuditEvent::unhashed(draft, state.seq + 1, at, state.prev_hash.clone(), dlp_more);
        let body = serialise_within(&mut event, MAX_EVENT_LINE);
        let hash = hex::encode(Sha256::digest(&body));
        let mut line = body;
        line.pop();
        line.extend_from_slice(b",\"hash\":\"");
        line.extend_from_slice(hash.as_bytes());
        line.extend_from_slice(b"\"}\n");
        if line.len() > MAX_EVENT_LINE {
            // `serialise_within` makes this unreachable; the bound holds even if it did not.
            return Err(AuditError::Write {
                path: self.path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("an event over {MAX_EVENT_LINE} bytes was not written"),
                ),
            });
        }
        let before = state.file.metadata().map(|m| m.len());
        if let Err(source) = state.file.write_all(&line) {
            // A full disk takes part of the line: cut it off again, so the log stays a
            // chain that verifies and that a later session can continue.
            if let Ok(len) = before {
                let _ = state.file.set_len(len);
            }
            return Err(AuditError::Write {
                path: self.path.clone(),
                source,
            });
        }
        if event.decision == AuditDecision::Block {
            // Blocks are the evidence that matters most; pay for an fsync on those.
            let _ = state.file.sync_data();
        }
        state.seq = event.seq;
        state.prev_hash.clone_from(&hash);
        event.hash = hash;
        Ok(event)
    }

    /// Flushes the log to disk.
    ///
    /// # Errors
    /// The fsync failed.
    /// Where the chain stands now.
    #[must_use]
    pub fn head(&self) -> AuditHead {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        AuditHead {
            seq: state.seq,
            hash: state.prev_hash.clone(),
        }
    }

    /// Syncs the log, then records its head beside it ([`head_path`]), written to a
    /// temporary file and renamed so a crash leaves the old head or the new one.
    ///
    /// # Errors
    /// The sync or the head's write failed.
    pub fn write_head(&self) -> Result<AuditHead, AuditError> {
        self.sync()?;
        let head = self.head();
        let path = head_path(&self.path);
        let temporary = path.with_extension("json.tmp");
        let write = || -> io::Result<()> {
            let mut options = std::fs::OpenOptions::new();
            options.create(true).write(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(&temporary)?;
            file.write_all(&serde_json::to_vec(&head).map_err(io::Error::other)?)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        };
        write().map_err(|source| AuditError::Write { path, source })?;
        Ok(head)
    }

    pub fn sync(&self) -> Result<(), AuditError> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.file.sync_all().map_err(|source| AuditError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// What the gateway says when it stops for want of its audit log: the cause, and for a
/// full disk or quota, where to free space.
#[must_use]
pub fn describe_write_failure(err: &AuditError) -> String {
    let (path, source) = match err {
        AuditError::Write { path, source } | AuditError::Open { path, source } => (path, source),
        other => return format!("the audit log cannot be written: {other}"),
    };
    let full = matches!(
        source.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    );
    let mut text = format!(
        "the audit log `{}` cannot be written: {source}",
        path.display()
    );
    if full {
        text.push_str(&format!(
            "; the bottle was stopped so nothing leaves unaudited\nhint: free space on the filesystem that holds `{}` (under $BOT_BOTTLE_HOME); the state and the log up to the last whole line are kept, and `bot-bottle resume` continues the session",
            path.parent().unwrap_or(path).display()
        ));
    } else {
        text.push_str("; the bottle was stopped so nothing leaves unaudited");
    }
    text
}

/// Returns the last non-empty line (1-based number, bytes), reading backwards from the end.
fn last_line(file: &mut File) -> io::Result<Option<(u64, Vec<u8>)>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let mut window = 64 * 1024u64;
    let tail = loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        Read::by_ref(file).take(len - start).read_to_end(&mut buf)?;
        let trimmed_len = buf.iter().rposition(|&b| b != b'\n').map_or(0, |i| i + 1);
        let has_start = start == 0 || buf[..trimmed_len].contains(&b'\n');
        if has_start {
            let line_start = buf[..trimmed_len]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            break buf[line_start..trimmed_len].to_vec();
        }
        if window >= 4 * MAX_LINE as u64 {
            // Not holding a line the writer never writes (see `MAX_LINE`).
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the last line is over the reader's limit of {MAX_LINE} bytes"),
            ));
        }
        window *= 4;
    };
    if tail.is_empty() {
        return Ok(None);
    }
    // The line number is only for error messages, so count newlines once here.
    file.seek(SeekFrom::Start(0))?;
    let mut count = 0u64;
    let mut last_byte = b'\n';
    let mut reader = BufReader::new(&mut *file);
    loop {
        let buf = reader.fill_buf()?;
        let Some(&last) = buf.last() else {
            break;
        };
        last_byte = last;
        count += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        let n = buf.len();
        reader.consume(n);
    }
    file.seek(SeekFrom::End(0))?;
    let line_no = if last_byte == b'\n' { count } else { count + 1 };
    Ok(Some((line_no, tail)))
}

/// Checks one line's own hash; returns the parsed event.
fn check_line(line: &[u8]) -> Result<AuditEvent, String> {
    let event: AuditEvent =
        serde_json::from_slice(line).map_err(|err| format!("not an audit event ({err})"))?;
    let suffix_len = ",\"hash\":\"\"}".len() + 64;
    let well_formed = event.hash.len() == 64
        && event.hash.bytes().all(|b| b.is_ascii_hexdigit())
        && line.len() > suffix_len
        && line.ends_with(format!(",\"hash\":\"{}\"}}", event.hash).as_bytes());
    if !well_formed {
        return Err("the `hash` member is missing or not last".into());
    }
    let mut body = line[..line.len() - suffix_len].to_vec();
    body.push(b'}');
    let computed = hex::encode(Sha256::digest(&body));
    if computed != event.hash {
        return Err(format!(
            "content does not match its hash (seq {}): the line was modified",
            event.seq
        ));
    }
    Ok(event)
}

/// Verifies the whole chain of the log at `path`.
///
/// # Errors
/// [`AuditError::Broken`] naming the first line that fails (and counting the others), or
/// a read error. [`check`] lists every problem.
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    verify_against(path, &[])
}

/// [`verify`] over any reader; `path` only names the log in errors.
///
/// # Errors
/// As [`verify`].
pub fn verify_reader<R: BufRead>(reader: R, path: &Path) -> Result<VerifyReport, AuditError> {
    let mut checker = Checker::new();
    let mut reader = LineReader::new(reader);
    while let Some(raw) = reader.next_line().map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })? {
        checker.feed(&raw);
    }
    checker.finish().into_result(path)
}

/// Checks lines one at a time against the chain so far.
struct Checker {
    report: VerifyReport,
    /// A problem line came since the last line that verified.
    after_problem: bool,
}

impl Checker {
    fn new() -> Self {
        Checker {
            report: VerifyReport {
                lines: 0,
                events: 0,
                last_seq: 0,
                last_hash: GENESIS_HASH.to_string(),
                problems: Vec::new(),
                problems_more: 0,
                segments: Vec::new(),
                segments_more: 0,
                unmet_heads: Vec::new(),
            },
            after_problem: false,
        }
    }

    fn problem(&mut self, raw: &RawLine, problem: String) {
        self.after_problem = true;
        if self.report.problems.len() < MAX_REPORTED {
            self.report.problems.push(LineProblem {
                line: raw.line,
                offset: raw.offset,
                problem,
            });
        } else {
            self.report.problems_more += 1;
        }
    }

    /// The event when the line verifies (and continues the chain, or starts a segment
    /// after a problem); blank lines are skipped.
    fn feed(&mut self, raw: &RawLine) -> Option<AuditEvent> {
        let text = match &raw.text {
            Ok(text) if text.is_empty() => return None,
            Ok(text) => text,
            Err(too_long) => {
                self.report.lines += 1;
                let problem = too_long.to_string();
                self.problem(raw, problem);
                return None;
            }
        };
        self.report.lines += 1;
        let event = match check_line(text) {
            Ok(event) => event,
            Err(problem) => {
                self.problem(raw, problem);
                return None;
            }
        };
        let continues =
            event.prev_hash == self.report.last_hash && event.seq == self.report.last_seq + 1;
        let first = self.report.segments.is_empty() && self.report.segments_more == 0;
        if !continues && !self.after_problem {
            // After a problem line the break is already reported; the new segment shows
            // where the chain resumes.
            let problem = if event.prev_hash == self.report.last_hash {
                format!(
                    "sequence jumps from {} to {}",
                    self.report.last_seq, event.seq
                )
            } else {
                format!(
                    "`prev_hash` does not match the previous line (seq {}): a line before it was removed or changed",
                    event.seq
                )
            };
            self.problem(raw, problem);
        }
        if !continues || first {
            self.new_segment(raw.line, event.seq);
        }
        if let Some(segment) = self.report.segments.last_mut()
            && self.report.segments_more == 0
        {
            segment.last_line = raw.line;
            segment.last_seq = event.seq;
        }
        self.after_problem = false;
        self.report.events += 1;
        self.report.last_seq = event.seq;
        self.report.last_hash.clone_from(&event.hash);
        Some(event)
    }

    fn new_segment(&mut self, line: u64, seq: u64) {
        if self.report.segments.len() < MAX_REPORTED {
            self.report.segments.push(Segment {
                first_line: line,
                first_seq: seq,
                last_line: line,
                last_seq: seq,
            });
        } else {
            self.report.segments_more += 1;
        }
    }

    fn finish(self) -> VerifyReport {
        self.report
    }
}

/// A line longer than [`MAX_LINE`], read through and discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TooLong {
    bytes: u64,
}

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the line is {} bytes, over the reader's limit of {MAX_LINE} (the writer never writes more than {MAX_EVENT_LINE}); skipped unread",
            self.bytes
        )
    }
}

/// One physical line: its number, where it starts, and its bytes without the line end.
#[derive(Debug)]
struct RawLine {
    line: u64,
    offset: u64,
    /// The line ended with a newline (false only for a last line being written, or cut).
    complete: bool,
    text: Result<Vec<u8>, TooLong>,
}

/// Reads physical lines in bounded memory: a line over [`MAX_LINE`] is read through in
/// chunks and dropped, never held.
struct LineReader<R> {
    reader: R,
    line: u64,
    offset: u64,
}

impl<R: BufRead> LineReader<R> {
    fn new(reader: R) -> Self {
        LineReader {
            reader,
            line: 0,
            offset: 0,
        }
    }

    fn next_line(&mut self) -> io::Result<Option<RawLine>> {
        let mut text = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut text)?;
        if read == 0 {
            return Ok(None);
        }
        self.line += 1;
        let offset = self.offset;
        let mut bytes = read as u64;
        let mut complete = text.last() == Some(&b'\n');
        let text = if !complete && text.len() > MAX_LINE {
            drop(text);
            loop {
                let chunk = self.reader.fill_buf()?;
                if chunk.is_empty() {
                    break;
                }
                let (used, end) = match memchr::memchr(b'\n', chunk) {
                    Some(i) => (i + 1, true),
                    None => (chunk.len(), false),
                };
                self.reader.consume(used);
                bytes += used as u64;
                if end {
                    complete = true;
                    break;
                }
            }
            // The newline is not part of the line's length.
            Err(TooLong {
                bytes: bytes - u64::from(complete),
            })
        } else {
            while text.last() == Some(&b'\n') || text.last() == Some(&b'\r') {
                text.pop();
            }
            Ok(text)
        };
        self.offset += bytes;
        Ok(Some(RawLine {
            line: self.line,
            offset,
            complete,
            text,
        }))
    }
}

/// One line of a log as [`read_entries`] gives it: an event (not verified against the
/// chain), or a line that could not be read as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Event {
        line: u64,
        offset: u64,
        /// The line's bytes as written (without the newline).
        raw: Vec<u8>,
        event: Box<AuditEvent>,
    },
    Bad(LineProblem),
}

fn entry_of(raw: RawLine) -> Option<Entry> {
    let bad = |problem: String| {
        Some(Entry::Bad(LineProblem {
            line: raw.line,
            offset: raw.offset,
            problem,
        }))
    };
    match raw.text {
        Err(too_long) => bad(too_long.to_string()),
        Ok(text) if text.is_empty() => None,
        Ok(text) => match serde_json::from_slice::<AuditEvent>(&text) {
            Ok(event) => Some(Entry::Event {
                line: raw.line,
                offset: raw.offset,
                raw: text,
                event: Box::new(event),
            }),
            Err(err) => bad(format!("not an audit event ({err})")),
        },
    }
}

/// The entries of a log, one per non-blank line, in bounded memory per line. Nothing
/// stops at a bad line: it is an [`Entry::Bad`] and reading goes on. Only an I/O error
/// ends the iteration early (as its last item).
pub fn read_entries<R: BufRead>(reader: R) -> impl Iterator<Item = io::Result<Entry>> {
    let mut reader = LineReader::new(reader);
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed {
            return None;
        }
        loop {
            match reader.next_line() {
                Ok(None) => return None,
                Ok(Some(raw)) => {
                    if let Some(entry) = entry_of(raw) {
                        return Some(Ok(entry));
                    }
                }
                Err(err) => {
                    failed = true;
                    return Some(Err(err));
                }
            }
        }
    })
}

/// Reads every event of the log at `path` (for `bot-bottle audit SLUG`). It does not
/// verify the chain; use [`verify`] for that.
///
/// # Errors
/// A read error, or [`AuditError::Broken`] for the first line that is not an event
/// ([`read_entries`] reads past such lines).
pub fn read(path: &Path) -> Result<Vec<AuditEvent>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    read_events(BufReader::new(file), path).collect()
}

/// Parses events from a reader, one per non-empty line; `path` only names the log in
/// errors. A bad line is an error item naming it, and reading goes on after it.
pub fn read_events<R: BufRead>(
    reader: R,
    path: &Path,
) -> impl Iterator<Item = Result<AuditEvent, AuditError>> + use<'_, R> {
    read_entries(reader).map(move |entry| match entry {
        Ok(Entry::Event { event, .. }) => Ok(*event),
        Ok(Entry::Bad(bad)) => Err(AuditError::Broken {
            path: path.to_path_buf(),
            line: bad.line,
            problem: format!("{} (byte {})", bad.problem, bad.offset),
        }),
        Err(source) => Err(AuditError::Read {
            path: path.to_path_buf(),
            source,
        }),
    })
}

/// Calls `each` for every complete line appended since byte `offset` (0 for the start)
/// and returns the offset to pass next time: the polling step behind
/// `bot-bottle audit SLUG --follow`. A line still being written (no newline yet) is left
/// for the next call. `first_line` is the line number of the line at `offset`, for
/// naming bad lines; the next one is returned with the offset.
///
/// # Errors
/// A read error.
pub fn follow_from(
    path: &Path,
    offset: u64,
    first_line: u64,
    mut each: impl FnMut(Entry),
) -> Result<(u64, u64), AuditError> {
    let read_err = |source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len < offset {
        // The file was replaced or truncated: that is for `verify` to report, so start over.
        return follow_from(path, 0, 1, each);
    }
    file.seek(SeekFrom::Start(offset)).map_err(read_err)?;
    let mut reader = LineReader::new(BufReader::new(file.take(len - offset)));
    reader.line = first_line.saturating_sub(1);
    let (mut next_offset, mut next_line) = (offset, first_line);
    while let Some(mut raw) = reader.next_line().map_err(read_err)? {
        if !raw.complete {
            break;
        }
        raw.offset += offset;
        next_offset = offset + reader.offset;
        next_line = raw.line + 1;
        if let Some(entry) = entry_of(raw) {
            each(entry);
        }
    }
    Ok((next_offset, next_line))
}

/// Events appended since byte `offset` (0 for the start), and the offset to pass next
/// time (see [`follow_from`]); lines that are not events are left out.
///
/// # Errors
/// A read error.
pub fn read_since(path: &Path, offset: u64) -> Result<(Vec<AuditEvent>, u64), AuditError> {
    let mut events = Vec::new();
    let (next, _) = follow_from(path, offset, 1, |entry| {
        if let Entry::Event { event, .. } = entry {
            events.push(*event);
        }
    })?;
    Ok((events, next))
}

/// Copies the log as JSONL, verifying each line on the way so an export never launders a
/// tampered log. Memory stays bounded; the lines before a problem may already be written
/// when it is met, so write to a temporary file and keep it only on success.
///
/// # Errors
/// The first line that does not verify (or cannot be read), or a read or write error.
pub fn export_jsonl<R: BufRead, W: Write>(
    reader: R,
    mut writer: W,
    path: &Path,
) -> Result<VerifyReport, AuditError> {
    let report = export_each(reader, path, |raw, _| {
        writer.write_all(raw)?;
        writer.write_all(b"\n")
    })?;
    writer.flush().map_err(AuditError::Export)?;
    Ok(report)
}

/// Feeds each verified line to `write`, stopping at the first problem.
fn export_each<R: BufRead>(
    reader: R,
    path: &Path,
    mut write: impl FnMut(&[u8], AuditEvent) -> io::Result<()>,
) -> Result<VerifyReport, AuditError> {
    let mut checker = Checker::new();
    let mut reader = LineReader::new(reader);
    while let Some(raw) = reader.next_line().map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })? {
        let event = checker.feed(&raw);
        if !checker.report.problems.is_empty() {
            break;
        }
        if let (Some(event), Ok(text)) = (event, &raw.text) {
            write(text, event).map_err(AuditError::Export)?;
        }
    }
    checker.finish().into_result(path)
}

/// The CSV columns, in order.
pub const CSV_COLUMNS: &[&str] = &[
    "seq",
    "at",
    "kind",
    "decision",
    "reason",
    "rule",
    "method",
    "host",
    "port",
    "path",
    "status",
    "bytes_up",
    "bytes_down",
    "duration_ms",
    "credential",
    "dlp",
    "detail",
    "prev_hash",
    "hash",
];

/// Writes the log as RFC 4180 CSV with a header row, verifying each line on the way (as
/// [`export_jsonl`], whose note on partial output applies). DLP findings are one cell of
/// `rule:action:location` items joined by `;`, ending with `+N more` when the event
/// listed only the first [`MAX_DLP_RECORDS`].
///
/// # Errors
/// A broken chain, or a read or write error.
pub fn export_csv<R: BufRead, W: Write>(
    reader: R,
    mut writer: W,
    path: &Path,
) -> Result<VerifyReport, AuditError> {
    let mut out = String::new();
    push_row(&mut out, CSV_COLUMNS.iter().map(|c| (*c).to_string()));
    writer
        .write_all(out.as_bytes())
        .map_err(AuditError::Export)?;
    let report = export_each(reader, path, |_, e| {
        let opt = |v: Option<String>| v.unwrap_or_default();
        let mut dlp = e
            .dlp
            .iter()
            .map(|d| format!("{}:{}:{}", d.rule, d.action, d.location))
            .collect::<Vec<_>>();
        if e.dlp_more > 0 {
            dlp.push(format!("+{} more", e.dlp_more));
        }
        out.clear();
        push_row(
            &mut out,
            [
                e.seq.to_string(),
                e.at,
                enum_name(&e.kind),
                enum_name(&e.decision),
                e.reason,
                opt(e.rule.map(|r| r.to_string())),
                opt(e.method),
                opt(e.host),
                opt(e.port.map(|p| p.to_string())),
                opt(e.path),
                opt(e.status.map(|s| s.to_string())),
                e.bytes_up.to_string(),
                e.bytes_down.to_string(),
                e.duration_ms.to_string(),
                opt(e.credential),
                dlp.join(";"),
                opt(e.detail),
                e.prev_hash,
                e.hash,
            ]
            .into_iter(),
        );
        writer.write_all(out.as_bytes())
    })?;
    writer.flush().map_err(AuditError::Export)?;
    Ok(report)
}

fn enum_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn push_row(out: &mut String, cells: impl Iterator<Item = String>) {
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            out.push(',');
        }
        // A leading `=`, `+`, `-` or `@` would be a formula in a spreadsheet: a host name
        // chosen by the agent must not become one.
        let formula = cell.starts_with(['=', '+', '-', '@']);
        if formula || cell.contains([',', '"', '\n', '\r']) {
            out.push('"');
            if formula {
                out.push('\'');
            }
            out.push_str(&cell.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(&cell);
        }
    }
    out.push_str("\r\n");
}

/// One line for humans, as `bot-bottle audit SLUG` prints it.
#[must_use]
pub fn format_event(e: &AuditEvent) -> String {
    if e.kind == EventKind::Forge {
        return format_forge_event(e);
    }
    let mut out = format!(
        "{:>5} {} {:<5} {}",
        e.seq,
        e.at,
        enum_name(&e.decision),
        enum_name(&e.kind)
    );
    if let Some(method) = &e.method {
        out.push(' ');
        out.push_str(method);
    }
    if let Some(host) = &e.host {
        out.push(' ');
        match e.port {
            // An IPv6 address (from the tripwire) needs brackets before its port.
            Some(port) if host.contains(':') => out.push_str(&format!("[{host}]:{port}")),
            Some(port) => out.push_str(&format!("{host}:{port}")),
            None => out.push_str(host),
        }
    }
    if let Some(path) = &e.path {
        out.push_str(path);
    }
    if let Some(status) = e.status {
        out.push_str(&format!(" → {status}"));
    }
    out.push_str(&format!(" ({})", e.reason));
    if let Some(credential) = &e.credential {
        out.push_str(&format!(" credential={credential}"));
    }
    for hit in &e.dlp {
        out.push_str(&format!(" dlp={}:{}", hit.rule, hit.action));
    }
    if e.dlp_more > 0 {
        out.push_str(&format!(" dlp+{} more", e.dlp_more));
    }
    if e.held_back > 0 {
        out.push_str(&format!(" held_back={}", e.held_back));
    }
    if let Some(detail) = &e.detail {
        out.push_str(&format!(" — {detail}"));
    }
    out
}

/// A forge sidecar line reads as a call: the tool, its target, the forge's status, then
/// what happened (`allow forge post_comment #17 → 201 — posted comment to #17 (12 bytes)`).
fn format_forge_event(e: &AuditEvent) -> String {
    let mut out = format!(
        "{:>5} {} {:<5} forge {}",
        e.seq,
        e.at,
        enum_name(&e.decision),
        e.reason
    );
    if let Some(path) = &e.path {
        out.push(' ');
        out.push_str(path);
    }
    if let Some(status) = e.status {
        out.push_str(&format!(" → {status}"));
    }
    if e.held_back > 0 {
        out.push_str(&format!(" held_back={}", e.held_back));
    }
    if let Some(detail) = &e.detail {
        out.push_str(&format!(" — {detail}"));
    }
    out
}

/// Distinct reasons (and hosts) a [`BlockLimiter`] tallies; the rest count as `other`.
const TALLY_KEYS: usize = 32;

/// Keeps a loop of blocked requests from filling the disk: a token bucket of
/// [`BLOCK_BURST`] refilled at [`BLOCK_PER_SECOND`]. A block event with no token left is
/// counted (with its reason and host) instead of written; [`BlockLimiter::summary`]
/// turns the count into one event. Allowed events never pass through it.
#[derive(Debug)]
pub struct BlockLimiter {
    burst: u32,
    per_second: u32,
    tokens: f64,
    refilled: Option<Instant>,
    held_back: u64,
    first_held: Option<Instant>,
    last_held: Option<Instant>,
    reasons: BTreeMap<String, u64>,
    hosts: BTreeMap<String, u64>,
    /// After the forced summary at shutdown nothing is held back: no later summary
    /// would report it.
    closed: bool,
}

impl Default for BlockLimiter {
    fn default() -> Self {
        BlockLimiter::new(BLOCK_BURST, BLOCK_PER_SECOND)
    }
}

fn tally(counts: &mut BTreeMap<String, u64>, key: &str) {
    let key = bound(key.to_owned(), 128);
    let key = if counts.contains_key(&key) || counts.len() < TALLY_KEYS {
        key
    } else {
        "other".to_owned()
    };
    *counts.entry(key).or_default() += 1;
}

fn top(counts: &BTreeMap<String, u64>) -> String {
    let mut sorted: Vec<(&String, &u64)> = counts.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    let mut text = sorted
        .iter()
        .take(5)
        .map(|(key, n)| format!("{key} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    if sorted.len() > 5 {
        text.push_str(&format!(", {} more", sorted.len() - 5));
    }
    text
}

impl BlockLimiter {
    #[must_use]
    pub fn new(burst: u32, per_second: u32) -> Self {
        BlockLimiter {
            burst,
            per_second,
            tokens: f64::from(burst),
            refilled: None,
            held_back: 0,
            first_held: None,
            last_held: None,
            reasons: BTreeMap::new(),
            hosts: BTreeMap::new(),
            closed: false,
        }
    }

    /// Whether to write this block event now; if not, it is counted.
    pub fn admit(&mut self, draft: &EventDraft, now: Instant) -> bool {
        if self.closed {
            return true;
        }
        if let Some(then) = self.refilled {
            let gained =
                now.saturating_duration_since(then).as_secs_f64() * f64::from(self.per_second);
            self.tokens = (self.tokens + gained).min(f64::from(self.burst));
        }
        self.refilled = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        self.held_back += 1;
        self.first_held.get_or_insert(now);
        self.last_held = Some(now);
        tally(&mut self.reasons, &draft.reason);
        tally(&mut self.hosts, draft.host.as_deref().unwrap_or("-"));
        false
    }

    /// Block events counted and not yet reported.
    #[must_use]
    pub fn held_back(&self) -> u64 {
        self.held_back
    }

    /// The `block-events-held-back` event to write now, if any: when a second has
    /// passed since the last block was held back, when the first one is
    /// [`BLOCK_SUMMARY_EVERY`] old, or always with `force` (at shutdown, after which
    /// every block is admitted: blocks from connections still closing are written, not
    /// counted where no summary would follow). It takes the count, so each held-back
    /// block is reported once.
    pub fn summary(&mut self, now: Instant, force: bool) -> Option<EventDraft> {
        self.closed |= force;
        let (first, last) = (self.first_held?, self.last_held?);
        let quiet = now.saturating_duration_since(last) >= Duration::from_secs(1);
        let due = now.saturating_duration_since(first) >= BLOCK_SUMMARY_EVERY;
        if !(force || quiet || due) {
            return None;
        }
        let count = std::mem::take(&mut self.held_back);
        self.first_held = None;
        self.last_held = None;
        let reasons = top(&std::mem::take(&mut self.reasons));
        let hosts = top(&std::mem::take(&mut self.hosts));
        let mut draft = EventDraft::new(
            EventKind::Gateway,
            AuditDecision::Block,
            "block-events-held-back",
        );
        draft.held_back = count;
        draft.detail = Some(format!(
            "{count} more blocked requests (over {} at once, then {} a second) were refused and counted, not logged one by one; reasons: {reasons}; hosts: {hosts}",
            self.burst, self.per_second
        ));
        Some(draft)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(n: u64) -> EventDraft {
        let mut d = EventDraft::new(EventKind::Request, AuditDecision::Allow, "allowed-by-rule");
        d.host = Some(format!("h{n}.example"));
        d.method = Some("GET".into());
        d.path = Some("/".into());
        d.status = Some(200);
        d
    }

    fn write_log(path: &Path, n: u64) {
        let log = AuditLog::open(path).expect("open");
        for i in 0..n {
            log.append(draft(i)).expect("append");
        }
    }

    #[test]
    fn chain_verifies_and_continues_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state/x/egress.jsonl");
        write_log(&path, 3);
        write_log(&path, 2);
        let report = verify(&path).expect("verifies");
        assert_eq!(report.lines, 5);
        assert_eq!(report.last_seq, 5);
        let events = read(&path).expect("reads");
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(events[0].prev_hash, GENESIS_HASH);
        assert_eq!(events[3].prev_hash, events[2].hash);
        assert_eq!(report.last_hash, events[4].hash);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn forge_lines_are_written_and_rendered_as_calls() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("forge-ops.jsonl");
        let log = AuditLog::open(&path).expect("open");
        let mut d = EventDraft::new(EventKind::Forge, AuditDecision::Allow, "post_comment");
        d.path = Some("#17".into());
        d.status = Some(201);
        d.detail = Some("posted comment to #17 (12 bytes)".into());
        log.append(d).expect("append");
        let mut d = EventDraft::new(EventKind::Forge, AuditDecision::Block, "post_comment");
        d.path = Some("#99".into());
        d.detail = Some("refused: outside the scope".into());
        log.append(d).expect("append");
        verify(&path).expect("verifies");
        let raw = std::fs::read_to_string(&path).expect("read");
        assert!(raw.contains("\"kind\":\"forge\""), "{raw}");
        let events = read(&path).expect("read");
        let lines: Vec<String> = events
            .iter()
            .map(|e| {
                let line = format_event(e);
                let prefix = format!("{:>5} {} ", e.seq, e.at);
                line.strip_prefix(&prefix).unwrap_or(&line).to_owned()
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                "allow forge post_comment #17 → 201 — posted comment to #17 (12 bytes)",
                "block forge post_comment #99 — refused: outside the scope",
            ]
        );
    }

    #[test]
    fn detects_modified_deleted_and_reordered_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("egress.jsonl");
        write_log(&path, 4);
        let original = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = original.lines().collect();

        let modified = original.replacen("h1.example", "h9.example", 1);
        std::fs::write(&path, modified).expect("write");
        let err = verify(&path).expect_err("modified");
        assert!(matches!(err, AuditError::Broken { line: 2, .. }), "{err}");

        let deleted = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[3]);
        std::fs::write(&path, deleted).expect("write");
        let err = verify(&path).expect_err("deleted");
        assert!(matches!(err, AuditError::Broken { line: 2, .. }), "{err}");

        let head_cut = format!("{}\n{}\n", lines[2], lines[3]);
        std::fs::write(&path, head_cut).expect("write");
        assert!(matches!(
            verify(&path),
            Err(AuditError::Broken { line: 1, .. })
        ));

        // Re-serialising in another field order breaks the byte-exact hash.
        let reordered: serde_json::Value = serde_json::from_str(lines[1]).expect("json");
        let mut fields: Vec<(String, serde_json::Value)> = reordered
            .as_object()
            .expect("object")
            .clone()
            .into_iter()
            .collect();
        fields.reverse();
        let text = format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).expect("k"), v))
                .collect::<Vec<_>>()
                .join(",")
        );
        std::fs::write(&path, format!("{}\n{}\n", lines[0], text)).expect("write");
        assert!(matches!(
            verify(&path),
            Err(AuditError::Broken { line: 2, .. })
        ));
    }

    #[test]
    fn refuses_to_continue_a_log_with_a_garbage_last_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("egress.jsonl");
        write_log(&path, 2);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        file.write_all(b"{\"seq\":3,\"trunc").expect("write");
        drop(file);
        let err = AuditLog::open(&path).expect_err("garbage tail");
        assert!(matches!(err, AuditError::Broken { line: 3, .. }), "{err}");
    }

    #[test]
    fn read_since_returns_only_new_complete_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("egress.jsonl");
        write_log(&path, 2);
        let (events, offset) = read_since(&path, 0).expect("read");
        assert_eq!(events.len(), 2);
        let (none, same) = read_since(&path, offset).expect("read");
        assert!(none.is_empty());
        assert_eq!(same, offset);
        write_log(&path, 1);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        file.write_all(b"{\"seq\":4,\"partial").expect("write");
        let (new, next) = read_since(&path, offset).expect("read");
        assert_eq!(new.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
        assert!(next > offset);
    }

    #[test]
    fn exports() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("egress.jsonl");
        let log = AuditLog::open(&path).expect("open");
        let mut d = draft(0);
        d.host = Some("=cmd|evil".into());
        d.detail = Some("a, \"quoted\"\nthing".into());
        d.dlp.push(DlpRecord {
            rule: "aws-access-token".into(),
            action: "block".into(),
            location: "body".into(),
            excerpt: "AKIA****".into(),
            credential: None,
        });
        log.append(d).expect("append");
        log.append(draft(1)).expect("append");
        let raw = std::fs::read(&path).expect("read");

        let mut jsonl = Vec::new();
        let report = export_jsonl(raw.as_slice(), &mut jsonl, &path).expect("jsonl");
        assert_eq!(report.lines, 2);
        assert_eq!(jsonl, raw);

        let mut csv = Vec::new();
        export_csv(raw.as_slice(), &mut csv, &path).expect("csv");
        let csv = String::from_utf8(csv).expect("utf8");
        let rows: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(rows[0], CSV_COLUMNS.join(","));
        assert!(rows[1].starts_with("1,"), "{}", rows[1]);
        assert!(rows[1].contains(",\"'=cmd|evil\","), "{}", rows[1]);
        assert!(
            rows[1].contains("\"a, \"\"quoted\"\"\nthing\""),
            "{}",
            rows[1]
        );
        assert!(
            rows[1].contains(",aws-access-token:block:body,"),
            "{}",
            rows[1]
        );

        let tampered = String::from_utf8(raw)
            .expect("utf8")
            .replace("h1.example", "hx.example");
        assert!(export_csv(tampered.as_bytes(), Vec::new(), &path).is_err());
        let line = format_event(&read(&path).expect("read")[1]);
        assert!(
            line.contains("allow request GET h1.example/ → 200 (allowed-by-rule)"),
            "{line}"
        );
    }
}

#[cfg(test)]
mod bounds_tests {
    use super::*;

    /// The bytes a string takes inside its JSON quotes.
    fn json_len(text: &str) -> usize {
        serde_json::to_string(text).expect("json").len() - 2
    }

    fn marker_count(text: &str) -> Option<usize> {
        let (_, tail) = text.rsplit_once("…[+")?;
        tail.strip_suffix(" bytes]")?.parse().ok()
    }

    #[test]
    fn bound_cuts_by_escaped_size_and_says_how_much() {
        assert_eq!(bound("short".into(), 64), "short");
        let exact = "a".repeat(64);
        assert_eq!(bound(exact.clone(), 64), exact);

        let quotes = "\"".repeat(400_000);
        let cut = bound(quotes.clone(), MAX_HOST);
        assert!(json_len(&cut) <= MAX_HOST, "{}", json_len(&cut));
        let kept = cut.len() - cut.rfind('…').map_or(0, |i| cut.len() - i);
        assert_eq!(marker_count(&cut), Some(quotes.len() - kept), "{cut}");
        assert!(
            json_len(&cut) > MAX_HOST - MARKER_MAX - 2,
            "not cut too short"
        );

        // Control characters take 6 bytes escaped; multi-byte characters are not split.
        let controls = "\u{1}".repeat(10_000);
        assert!(json_len(&bound(controls, 256)) <= 256);
        let huge = bound("\u{1}".repeat(1 << 20), MAX_DLP_ACTION);
        assert!(json_len(&huge) <= MAX_DLP_ACTION, "{huge:?}");
        let wide = "é€😀".repeat(1000);
        let cut = bound(wide.clone(), 100);
        assert!(json_len(&cut) <= 100);
        assert!(wide.starts_with(cut.split('…').next().expect("prefix")));
    }

    fn hostile_draft(records: usize) -> EventDraft {
        let evil = |n: usize| "\"\u{1}\\".repeat(n);
        let mut d = EventDraft::new(EventKind::Request, AuditDecision::Block, evil(1000));
        d.method = Some(evil(1000));
        d.host = Some(evil(100_000));
        d.path = Some(evil(100_000));
        d.credential = Some(evil(1000));
        d.detail = Some(evil(100_000));
        d.rule = Some(usize::MAX);
        d.port = Some(u16::MAX);
        d.status = Some(u16::MAX);
        (d.bytes_up, d.bytes_down, d.duration_ms) = (u64::MAX, u64::MAX, u64::MAX);
        d.dlp = (0..records)
            .map(|_| DlpRecord {
                rule: evil(500),
                action: evil(500),
                location: evil(500),
                excerpt: evil(500),
                credential: Some(evil(500)),
            })
            .collect();
        d
    }

    #[test]
    fn every_field_from_the_bottle_is_bounded_and_no_line_exceeds_the_max() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("egress.jsonl");
        let log = AuditLog::open(&path).expect("open");
        let written = log.append(hostile_draft(1000)).expect("append");
        let raw = std::fs::read(&path).expect("read");
        assert!(raw.len() <= MAX_EVENT_LINE, "{} bytes", raw.len());
        assert_eq!(written.dlp.len(), MAX_DLP_RECORDS);
        assert_eq!(written.dlp_more, 1000 - MAX_DLP_RECORDS as u64);
        for (field, max) in [
            (&written.reason, MAX_REASON),
            (written.method.as_ref().expect("method"), MAX_METHOD),
            (written.host.as_ref().expect("host"), MAX_HOST),
            (written.path.as_ref().expect("path"), MAX_PATH),
            (
                written.credential.as_ref().expect("credential"),
                MAX_CREDENTIAL,
            ),
            (written.detail.as_ref().expect("detail"), MAX_DETAIL),
        ] {
            assert!(json_len(field) <= max, "{} > {max}", json_len(field));
            assert!(marker_count(field).is_some(), "no marker on {field:?}");
        }
        for record in &written.dlp {
            assert!(json_len(&record.rule) <= MAX_DLP_RULE);
            assert!(json_len(&record.action) <= MAX_DLP_ACTION);
            assert!(json_len(&record.location) <= MAX_DLP_LOCATION);
            assert!(json_len(&record.excerpt) <= MAX_DLP_EXCERPT);
            let credential = record.credential.as_ref().expect("credential");
            assert!(json_len(credential) <= MAX_CREDENTIAL);
        }
        let report = verify(&path).expect("verifies");
        assert_eq!(report.events, 1);
        let read = read(&path).expect("reads");
        assert_eq!(read[0], written);
        assert!(format_event(&read[0]).contains("dlp+968 more"));
        let mut csv = Vec::new();
        export_csv(
            BufReader::new(File::open(&path).expect("open")),
            &mut csv,
            &path,
        )
        .expect("csv");
        let csv = String::from_utf8(csv).expect("utf8");
        assert!(csv.contains(";+968 more\","), "{csv:.300}");
        assert!(csv.len() < 2 * MAX_EVENT_LINE, "{}", csv.len());
    }

    #[test]
    fn a_line_that_would_not_fit_drops_dlp_records_then_cuts_every_field() {
        let (draft, more) = hostile_draft(MAX_DLP_RECORDS).bounded();
        assert_eq!(more, 0);
        let event = |draft: EventDraft| {
            AuditEvent::unhashed(
                draft,
                1,
                "2026-01-01T00:00:00Z".into(),
                GENESIS_HASH.into(),
                0,
            )
        };
        // The worst bounded event fits the real limit untouched...
        let mut full = event(draft.clone());
        let body = serialise_within(&mut full, MAX_EVENT_LINE);
        assert!(body.len() + 75 <= MAX_EVENT_LINE);
        assert_eq!(full.dlp.len(), MAX_DLP_RECORDS);
        // ...a smaller limit sheds the DLP records first...
        let mut shed = event(draft.clone());
        let body = serialise_within(&mut shed, 16 * 1024);
        assert!(body.len() + 75 <= 16 * 1024, "{}", body.len());
        assert!(shed.dlp.is_empty());
        assert_eq!(shed.dlp_more, MAX_DLP_RECORDS as u64);
        assert!(shed.detail.as_ref().is_some_and(|d| json_len(d) > 1000));
        // ...and then cuts every field.
        let mut cut = event(draft);
        let body = serialise_within(&mut cut, 2048);
        assert!(body.len() + 75 <= 2048, "{}", body.len());
        let host = cut.host.expect("host");
        assert!(json_len(&host) <= LAST_RESORT_FIELD && marker_count(&host).is_some());
    }

    fn lines_of(n: u64) -> (tempfile::TempDir, PathBuf, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("egress.jsonl");
        let log = AuditLog::open(&path).expect("open");
        for i in 0..n {
            let mut d = EventDraft::new(EventKind::Request, AuditDecision::Allow, "ok");
            d.host = Some(format!("h{i}.example"));
            log.append(d).expect("append");
        }
        let text = std::fs::read_to_string(&path).expect("read");
        let lines = text.lines().map(str::to_owned).collect();
        (dir, path, lines)
    }

    #[test]
    fn a_planted_huge_line_is_named_and_the_rest_of_the_chain_still_verifies() {
        let (_dir, path, lines) = lines_of(5);
        let garbage = "x".repeat(2 << 20);
        // Inserted: the chain around it is intact, the line itself is the problem.
        let inserted = format!(
            "{}\n{}\n{garbage}\n{}\n{}\n{}\n",
            lines[0], lines[1], lines[2], lines[3], lines[4]
        );
        std::fs::write(&path, &inserted).expect("write");
        let offset = (lines[0].len() + lines[1].len() + 2) as u64;
        let report = check(&path, &[]).expect("reads");
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(report.problems[0].line, 3);
        assert_eq!(report.problems[0].offset, offset);
        assert!(
            report.problems[0]
                .problem
                .contains(&format!("{} bytes", 2 << 20)),
            "{}",
            report.problems[0].problem
        );
        assert_eq!((report.events, report.last_seq), (5, 5));
        assert_eq!(report.segments.len(), 1);
        match verify(&path) {
            Err(AuditError::Broken { line: 3, .. }) => {}
            other => panic!("{other:?}"),
        }

        // Replacing a line (and a second, short garbage line later): every problem is
        // listed and the chain resumes after each.
        let replaced = format!(
            "{}\n{}\n{garbage}\n{}\nnot json\n\n{}\n",
            lines[0], lines[1], lines[3], lines[4]
        );
        std::fs::write(&path, &replaced).expect("write");
        let report = check(&path, &[]).expect("reads");
        let problems: Vec<u64> = report.problems.iter().map(|p| p.line).collect();
        assert_eq!(problems, vec![3, 5], "{:?}", report.problems);
        assert!(report.problems[1].problem.contains("not an audit event"));
        let segments: Vec<(u64, u64, u64, u64)> = report
            .segments
            .iter()
            .map(|s| (s.first_line, s.last_line, s.first_seq, s.last_seq))
            .collect();
        // The chain resumes at line 4 (seq 4, whose predecessor was replaced); the
        // inserted line 5 breaks no link, and the blank line 6 still counts.
        assert_eq!(segments, vec![(1, 2, 1, 2), (4, 7, 4, 5)]);
        assert!(!report.is_ok());

        // Readers name the bad lines and go on.
        let entries: Vec<Entry> = read_entries(BufReader::new(File::open(&path).expect("open")))
            .collect::<Result<_, _>>()
            .expect("reads");
        let shape: Vec<String> = entries
            .iter()
            .map(|e| match e {
                Entry::Event { line, event, .. } => format!("{line}:seq{}", event.seq),
                Entry::Bad(bad) => format!("{}:bad@{}", bad.line, bad.offset),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                "1:seq1".to_string(),
                "2:seq2".into(),
                format!("3:bad@{offset}"),
                "4:seq4".into(),
                "5:bad@".to_string()
                    + &(offset + (2 << 20) + 1 + lines[3].len() as u64 + 1).to_string(),
                "7:seq5".into(),
            ]
        );
        let (events, next) = read_since(&path, 0).expect("read since");
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 4, 5]
        );
        assert_eq!(next, replaced.len() as u64);
        let err = export_jsonl(
            BufReader::new(File::open(&path).expect("open")),
            Vec::new(),
            &path,
        )
        .expect_err("no export of a broken log");
        assert!(matches!(err, AuditError::Broken { line: 3, .. }), "{err}");
    }

    #[test]
    fn lines_at_the_reader_limit_are_read_and_one_byte_more_is_not() {
        let at_limit = format!("{}\n{}\n", "y".repeat(MAX_LINE), "z".repeat(MAX_LINE + 1));
        let mut reader = LineReader::new(at_limit.as_bytes());
        let first = reader.next_line().expect("io").expect("line");
        assert_eq!(first.text.map(|t| t.len()), Ok(MAX_LINE));
        let second = reader.next_line().expect("io").expect("line");
        assert_eq!(
            second.text,
            Err(TooLong {
                bytes: MAX_LINE as u64 + 1
            })
        );
        assert_eq!(second.offset, MAX_LINE as u64 + 1);
        assert!(second.complete);
        assert!(reader.next_line().expect("io").is_none());
    }

    #[test]
    fn follow_from_leaves_a_partial_line_and_numbers_lines_across_calls() {
        let (_dir, path, _) = lines_of(2);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        file.write_all(b"garbage\n{\"seq\":3,\"partial")
            .expect("write");
        let mut seen = Vec::new();
        let (offset, line) = follow_from(&path, 0, 1, |e| seen.push(e)).expect("follow");
        assert_eq!(line, 4);
        assert!(matches!(&seen[2], Entry::Bad(bad) if bad.line == 3));
        assert_eq!(seen.len(), 3);
        file.write_all(b"\n").expect("write");
        let mut more = Vec::new();
        let (_, line) = follow_from(&path, offset, line, |e| more.push(e)).expect("follow");
        assert_eq!(line, 5);
        assert!(matches!(&more[..], [Entry::Bad(bad)] if bad.line == 4 && bad.offset == offset));
    }

    fn blocked(reason: &str, host: &str) -> EventDraft {
        let mut d = EventDraft::new(EventKind::Request, AuditDecision::Block, reason);
        d.host = Some(host.into());
        d
    }

    #[test]
    fn block_limiter_holds_back_past_the_burst_and_reports_the_count() {
        let mut limiter = BlockLimiter::new(3, 2);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for _ in 0..3 {
            assert!(limiter.admit(&blocked("not-allowed", "a.test"), t0));
        }
        assert!(!limiter.admit(&blocked("not-allowed", "a.test"), t0));
        assert!(!limiter.admit(&blocked("host-mismatch", "b.test"), at(100)));
        assert!(!limiter.admit(&blocked("host-mismatch", "b.test"), at(200)));
        // Half a second refills one token at 2 a second.
        assert!(limiter.admit(&blocked("not-allowed", "a.test"), at(700)));
        assert!(!limiter.admit(&blocked("not-allowed", "a.test"), at(700)));
        assert_eq!(limiter.held_back(), 4);
        assert!(limiter.summary(at(1000), false).is_none(), "not quiet yet");
        let summary = limiter.summary(at(1700), false).expect("a quiet second");
        assert_eq!(summary.held_back, 4);
        assert_eq!(summary.kind, EventKind::Gateway);
        assert_eq!(summary.decision, AuditDecision::Block);
        assert_eq!(summary.reason, "block-events-held-back");
        let detail = summary.detail.expect("detail");
        assert!(detail.contains("host-mismatch ×2"), "{detail}");
        assert!(detail.contains("a.test ×2, b.test ×2"), "{detail}");
        // The bucket refilled meanwhile: empty it again, then one is held back.
        while limiter.admit(&blocked("not-allowed", "a.test"), at(1700)) {}
        let last = limiter.summary(at(1800), true).expect("forced at shutdown");
        assert_eq!(last.held_back, 1);
        assert!(limiter.summary(at(5000), true).is_none(), "reported once");
        assert_eq!(limiter.held_back(), 0);
        // After shutdown's summary nothing is held back where no summary would follow.
        assert!(limiter.admit(&blocked("not-allowed", "a.test"), at(1800)));
    }

    #[test]
    fn block_limiter_reports_during_a_flood_and_keeps_its_tallies_small() {
        let mut limiter = BlockLimiter::new(1, 1);
        let t0 = Instant::now();
        let mut total = 0u64;
        let mut admitted = 0u64;
        let mut reported = 0u64;
        // A block every 10 ms for 25 s, each to another host: never a quiet second.
        for i in 0..2500u64 {
            let now = t0 + Duration::from_millis(i * 10);
            total += 1;
            if limiter.admit(&blocked("not-allowed", &format!("h{i}.test")), now) {
                admitted += 1;
            }
            if let Some(summary) = limiter.summary(now, false) {
                reported += summary.held_back;
                let detail = summary.detail.expect("detail");
                assert!(detail.contains("more"), "{detail}");
                assert!(limiter.hosts.is_empty());
            }
            assert!(limiter.hosts.len() <= TALLY_KEYS + 1);
        }
        reported += limiter
            .summary(t0 + Duration::from_secs(30), true)
            .map_or(0, |s| s.held_back);
        assert!(admitted <= 27, "{admitted}");
        assert_eq!(admitted + reported, total);
    }
}
