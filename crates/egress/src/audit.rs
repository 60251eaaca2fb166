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

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first line.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Lines longer than this are refused on read: the writer never produces them, so one is
/// corruption or an attempt to make the reader allocate without bound.
const MAX_LINE: usize = 1 << 20;

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub prev_hash: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
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
            detail: None,
        }
    }
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
    let file = File::open(path).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut seen: Vec<Option<String>> = vec![None; heads.len()];
    let report = verify_lines(BufReader::new(file), path, |seq, hash| {
        for (head, found) in heads.iter().zip(seen.iter_mut()) {
            if seq == head.seq {
                *found = Some(hash.to_owned());
            }
        }
    })?;
    let truncated = |problem| AuditError::Truncated {
        path: path.to_path_buf(),
        problem,
    };
    for (head, found) in heads.iter().zip(seen) {
        match found {
            Some(hash) if hash == head.hash => {}
            Some(hash) => {
                return Err(truncated(format!(
                    "line seq {} has hash {hash}, the head says {}",
                    head.seq, head.hash
                )));
            }
            None => {
                return Err(truncated(format!(
                    "the log ends at seq {}, the head is at seq {}",
                    report.last_seq, head.seq
                )));
            }
        }
    }
    Ok(report)
}

/// The result of a successful [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub lines: u64,
    /// 0 for an empty log.
    pub last_seq: u64,
    /// [`GENESIS_HASH`] for an empty log.
    pub last_hash: String,
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
        let mut event = AuditEvent {
            seq: state.seq + 1,
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
            detail: draft.detail,
            prev_hash: state.prev_hash.clone(),
            hash: String::new(),
        };
        let body = serde_json::to_vec(&event).expect("an audit event always serializes");
        let hash = hex::encode(Sha256::digest(&body));
        let mut line = body;
        line.pop();
        line.extend_from_slice(b",\"hash\":\"");
        line.extend_from_slice(hash.as_bytes());
        line.extend_from_slice(b"\"}\n");
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
/// [`AuditError::Broken`] naming the first line that fails, or a read error.
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    verify_reader(BufReader::new(file), path)
}

/// [`verify`] over any reader; `path` only names the log in errors.
///
/// # Errors
/// As [`verify`].
pub fn verify_reader<R: BufRead>(reader: R, path: &Path) -> Result<VerifyReport, AuditError> {
    verify_lines(reader, path, |_, _| {})
}

fn verify_lines<R: BufRead>(
    reader: R,
    path: &Path,
    mut each: impl FnMut(u64, &str),
) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport {
        lines: 0,
        last_seq: 0,
        last_hash: GENESIS_HASH.to_string(),
    };
    let broken = |line: u64, problem: String| AuditError::Broken {
        path: path.to_path_buf(),
        line,
        problem,
    };
    for (index, line) in lines(reader, path).enumerate() {
        let line_no = index as u64 + 1;
        let line = line?;
        let event = check_line(&line).map_err(|problem| broken(line_no, problem))?;
        if event.prev_hash != report.last_hash {
            return Err(broken(
                line_no,
                format!(
                    "`prev_hash` does not match the previous line (seq {}): a line before it was removed or changed",
                    event.seq
                ),
            ));
        }
        if event.seq != report.last_seq + 1 {
            return Err(broken(
                line_no,
                format!("sequence jumps from {} to {}", report.last_seq, event.seq),
            ));
        }
        each(event.seq, &event.hash);
        report.lines = line_no;
        report.last_seq = event.seq;
        report.last_hash = event.hash;
    }
    Ok(report)
}

fn lines<R: BufRead>(
    mut reader: R,
    path: &Path,
) -> impl Iterator<Item = Result<Vec<u8>, AuditError>> + use<'_, R> {
    std::iter::from_fn(move || {
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line);
            match read {
                Ok(0) => return None,
                Ok(_) if line.len() > MAX_LINE => {
                    return Some(Err(AuditError::Read {
                        path: path.to_path_buf(),
                        source: io::Error::new(io::ErrorKind::InvalidData, "line too long"),
                    }));
                }
                Ok(_) => {
                    while line.last() == Some(&b'\n') || line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if !line.is_empty() {
                        return Some(Ok(line));
                    }
                }
                Err(source) => {
                    return Some(Err(AuditError::Read {
                        path: path.to_path_buf(),
                        source,
                    }));
                }
            }
        }
    })
}

/// Reads every event of the log at `path` (for `bot-bottle audit SLUG`). It does not
/// verify the chain; use [`verify`] for that.
///
/// # Errors
/// A read error or a line that is not an event.
pub fn read(path: &Path) -> Result<Vec<AuditEvent>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    read_events(BufReader::new(file), path).collect()
}

/// Parses events from a reader, one per non-empty line; `path` only names the log in
/// errors. A follower can call this on a reader positioned after what it has shown.
pub fn read_events<R: BufRead>(
    reader: R,
    path: &Path,
) -> impl Iterator<Item = Result<AuditEvent, AuditError>> + use<'_, R> {
    lines(reader, path).enumerate().map(move |(index, line)| {
        let line = line?;
        serde_json::from_slice(&line).map_err(|err| AuditError::Broken {
            path: path.to_path_buf(),
            line: index as u64 + 1,
            problem: format!("not an audit event ({err})"),
        })
    })
}

/// Events appended since byte `offset` (0 for the start), and the offset to pass next
/// time: the polling step behind `bot-bottle audit SLUG --follow`. Only complete lines
/// are returned, so a line being written is picked up on the next call.
///
/// # Errors
/// A read error or a complete line that is not an event.
pub fn read_since(path: &Path, offset: u64) -> Result<(Vec<AuditEvent>, u64), AuditError> {
    let read_err = |source| AuditError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len < offset {
        // The file was replaced or truncated: that is for `verify` to report, so start over.
        return read_since(path, 0);
    }
    file.seek(SeekFrom::Start(offset)).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(len - offset)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let events = read_events(&bytes[..complete], path).collect::<Result<Vec<_>, _>>()?;
    Ok((events, offset + complete as u64))
}

/// Copies the log as JSONL, verifying it on the way so an export never launders a
/// tampered log.
///
/// # Errors
/// A broken chain, or a read or write error.
pub fn export_jsonl<R: BufRead, W: Write>(
    reader: R,
    mut writer: W,
    path: &Path,
) -> Result<VerifyReport, AuditError> {
    let mut all = Vec::new();
    for line in lines(reader, path) {
        all.extend_from_slice(&line?);
        all.push(b'\n');
    }
    let report = verify_reader(all.as_slice(), path)?;
    writer.write_all(&all).map_err(AuditError::Export)?;
    writer.flush().map_err(AuditError::Export)?;
    Ok(report)
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

/// Writes the log as RFC 4180 CSV with a header row, after verifying the chain. DLP
/// findings are one cell of `rule:action:location` items joined by `;`.
///
/// # Errors
/// A broken chain, or a read or write error.
pub fn export_csv<R: BufRead, W: Write>(
    reader: R,
    mut writer: W,
    path: &Path,
) -> Result<VerifyReport, AuditError> {
    let mut all = Vec::new();
    for line in lines(reader, path) {
        all.extend_from_slice(&line?);
        all.push(b'\n');
    }
    let report = verify_reader(all.as_slice(), path)?;
    let mut out = String::new();
    push_row(&mut out, CSV_COLUMNS.iter().map(|c| (*c).to_string()));
    for event in read_events(all.as_slice(), path) {
        let e = event?;
        let opt = |v: Option<String>| v.unwrap_or_default();
        let dlp = e
            .dlp
            .iter()
            .map(|d| format!("{}:{}:{}", d.rule, d.action, d.location))
            .collect::<Vec<_>>()
            .join(";");
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
                dlp,
                opt(e.detail),
                e.prev_hash,
                e.hash,
            ]
            .into_iter(),
        );
    }
    writer
        .write_all(out.as_bytes())
        .map_err(AuditError::Export)?;
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
    if let Some(detail) = &e.detail {
        out.push_str(&format!(" — {detail}"));
    }
    out
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
