//! The provenance a session leaves behind: what `launch` records about a finished
//! session, read from the bottle's state, its audit log and its workspace, signed with
//! the host's key (see `bot_bottle_core::provenance` and docs/forge.md).
//!
//! Everything here is bounded: the audit log is read once, streaming, with counts per
//! host capped at [`MAX_SUMMARY_HOSTS`]; the workspace's git history is asked for at
//! most [`MAX_SUBJECT_COMMITS`] commits, with a timeout.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bot_bottle_core::policy::EgressPolicy;
use bot_bottle_core::provenance::{
    DlpResult, EgressSummary, HostCounts, LogHead, MAX_SUMMARY_HOSTS, OTHER_HOSTS,
    ResourceDescriptor,
};
use bot_bottle_egress::audit::{AuditDecision, Entry, EventKind, read_entries};
use sha2::{Digest, Sha256};

/// File name of the latest session's envelope in `state/<slug>/`.
pub const LATEST_FILE: &str = "provenance.json";
/// Directory of every session's envelope in `state/<slug>/`.
pub const HISTORY_DIR: &str = "provenance";
/// Commits named as subjects at most; a session that made more names the newest ones
/// and says so in the last subject's annotations.
pub const MAX_SUBJECT_COMMITS: usize = 1000;
/// How long one `git` call on the workspace may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(20);

/// What one read of the audit log gives the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditTally {
    pub summary: EgressSummary,
    /// DLP findings recorded (listed and counted-only).
    pub dlp_findings: u64,
    /// `sha256:<hex>` of the log file's bytes as read.
    pub digest: String,
}

impl AuditTally {
    /// The DLP result for the statement.
    #[must_use]
    pub fn dlp(&self) -> DlpResult {
        match self.dlp_findings {
            0 => DlpResult::Clean,
            count => DlpResult::Findings { count },
        }
    }
}

/// A reader that hashes what passes through it, so the log is read once.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Counts the events of the log at `path` numbered after `after_seq` (the head when the
/// session started: a resumed bottle's log holds every session), streaming (see
/// [`tally_reader`]); the digest covers the whole file. `None` when there is no log.
///
/// # Errors
/// The log exists but cannot be read.
pub fn tally_audit(path: &Path, after_seq: u64) -> std::io::Result<Option<AuditTally>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let mut reader = BufReader::new(Hashing {
        inner: file,
        hasher: Sha256::new(),
    });
    let (summary, dlp_findings) = tally_reader(&mut reader, after_seq)?;
    let hashing = reader.into_inner();
    Ok(Some(AuditTally {
        summary,
        dlp_findings,
        digest: format!("sha256:{}", hex::encode(hashing.hasher.finalize())),
    }))
}

/// The commits a session pushed: the new ids of the allowed pushes audited after
/// `after_seq`, oldest first, without repeats.
///
/// # Errors
/// A read error.
pub fn pushed_commits(path: &Path, after_seq: u64) -> std::io::Result<Vec<String>> {
    let file = std::fs::File::open(path)?;
    let mut commits: Vec<String> = Vec::new();
    for entry in read_entries(BufReader::new(file)) {
        let Entry::Event { event, .. } = entry? else {
            continue;
        };
        if event.seq <= after_seq || event.decision != AuditDecision::Allow {
            continue;
        }
        for id in event
            .detail
            .as_deref()
            .map(bot_bottle_egress::pushed_ids)
            .unwrap_or_default()
        {
            if !commits.contains(&id) {
                commits.push(id);
            }
        }
    }
    Ok(commits)
}

/// Counts, among the events numbered after `after_seq`, request and CONNECT events (allowed and blocked, in all and per host), the
/// blocks a rate-limit summary stands for, tripwire attempts, unreadable lines and DLP
/// findings. Memory is bounded: past [`MAX_SUMMARY_HOSTS`] hosts, the rest are counted
/// under [`OTHER_HOSTS`].
///
/// # Errors
/// A read error.
pub fn tally_reader<R: BufRead>(
    reader: R,
    after_seq: u64,
) -> std::io::Result<(EgressSummary, u64)> {
    let mut summary = EgressSummary::default();
    let mut dlp_findings = 0u64;
    for entry in read_entries(reader) {
        let event = match entry? {
            Entry::Event { event, .. } if event.seq > after_seq => event,
            Entry::Event { .. } => continue,
            Entry::Bad(_) => {
                summary.unreadable_lines += 1;
                continue;
            }
        };
        dlp_findings = dlp_findings
            .saturating_add(event.dlp.len() as u64)
            .saturating_add(event.dlp_more);
        summary.held = summary.held.saturating_add(event.held_back);
        match event.kind {
            EventKind::Request | EventKind::Connect => {}
            EventKind::Direct => {
                summary.direct += 1;
                continue;
            }
            EventKind::PolicyUpdate
            | EventKind::Gateway
            | EventKind::Forge
            | EventKind::Supervise => continue,
        }
        if event.held_back > 0 {
            // A summary of blocks not written one by one: counted in `held` above.
            continue;
        }
        summary.requests += 1;
        let allowed = match event.decision {
            AuditDecision::Allow => {
                summary.allowed += 1;
                true
            }
            AuditDecision::Block => {
                summary.blocked += 1;
                false
            }
            AuditDecision::Info => continue,
        };
        let host = event.host.as_deref().unwrap_or("(no host)");
        let key = if summary.hosts.contains_key(host) || summary.hosts.len() < MAX_SUMMARY_HOSTS {
            host
        } else {
            OTHER_HOSTS
        };
        let counts: &mut HostCounts = summary.hosts.entry(key.to_owned()).or_default();
        if allowed {
            counts.allowed += 1;
        } else {
            counts.blocked += 1;
        }
    }
    Ok((summary, dlp_findings))
}

/// `sha256:<hex>` of the policy's canonical JSON (`serde_json`, keys in struct order).
#[must_use]
pub fn policy_digest(policy: &EgressPolicy) -> String {
    format!("sha256:{}", policy.sha256_hex())
}

/// `sha256:<hex>` over a manifest snapshot directory: every regular file under it, in
/// sorted path order, as `<relative path>\0<length>\0<bytes>`. Symlinks and other
/// special files are not followed (the snapshot holds none). `None` when the directory
/// does not exist.
///
/// # Errors
/// The directory exists but cannot be read.
pub fn manifests_digest(dir: &Path) -> std::io::Result<Option<String>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files, 0)?;
    files.sort();
    let mut hasher = Sha256::new();
    for relative in files {
        let bytes = std::fs::read(dir.join(&relative))?;
        hasher.update(relative.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(bytes.len().to_string().as_bytes());
        hasher.update([0]);
        hasher.update(&bytes);
    }
    Ok(Some(format!("sha256:{}", hex::encode(hasher.finalize()))))
}

fn collect_files(
    root: &Path,
    dir: &Path,
    out: &mut Vec<PathBuf>,
    depth: usize,
) -> std::io::Result<()> {
    if depth > 8 {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(root, &entry.path(), out, depth + 1)?;
        } else if kind.is_file() {
            let path = entry.path();
            if let Ok(relative) = path.strip_prefix(root) {
                out.push(relative.to_path_buf());
            }
        }
    }
    Ok(())
}

/// Runs `git` read-only on a workspace the agent could write. The repository's own
/// config still applies (git has no switch to ignore it), so only plumbing that runs
/// no configured program is used here: `rev-parse` and `rev-list` touch no index (no
/// fsmonitor), no work tree (no filters, no textconv), no hooks and no pager; and with
/// every transport refused (`GIT_ALLOW_PROTOCOL`, which repository config cannot
/// override) and lazy fetching off, a partial clone cannot make them
/// reach out. System and global config are not read. A `.git` that is a file (a
/// `gitdir:` pointer elsewhere) or a symlink is not followed: no subject from it.
/// When this process is root, `git` runs as `run_as` (the agent's uid, which owns the
/// workspace): git's ownership check then passes without being turned off, and
/// nothing runs as root in a directory the agent wrote.
async fn git(workspace: &Path, run_as: Option<u32>, args: &[&str]) -> Option<String> {
    let git_dir = workspace.join(".git");
    if !std::fs::symlink_metadata(&git_dir).is_ok_and(|m| m.is_dir()) {
        return None;
    }
    let mut command = tokio::process::Command::new("git");
    command
        .arg("--no-pager")
        .arg("--git-dir")
        .arg(&git_dir)
        .args([
            "-c",
            "core.fsmonitor=false",
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "protocol.allow=never",
        ])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_NO_LAZY_FETCH", "1")
        // Overrides every `protocol.<name>.allow` the repository's config may set.
        .env("GIT_ALLOW_PROTOCOL", "none")
        .env("GIT_NO_REPLACE_OBJECTS", "1")
        .env("GIT_OPTIONAL_LOCKS", "0")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("HOME", "/nonexistent")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(uid) = run_as {
        command.uid(uid).gid(uid);
    }
    let output = tokio::time::timeout(GIT_TIMEOUT, command.output())
        .await
        .ok()?
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout).ok()
}

fn is_commit_id(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The commit the workspace's `HEAD` names, if it is a git repository with one.
pub async fn workspace_head(workspace: &Path, run_as: Option<u32>) -> Option<String> {
    let out = git(
        workspace,
        run_as,
        &["rev-parse", "--verify", "--quiet", "HEAD^{commit}"],
    )
    .await?;
    let sha = out.trim();
    is_commit_id(sha).then(|| sha.to_ascii_lowercase())
}

/// The commits reachable from `after` and not from `before` (all of `after`'s history
/// when `before` is `None`), newest first, at most [`MAX_SUBJECT_COMMITS`] + 1 (the
/// extra one tells the caller there were more).
pub async fn commits_between(
    workspace: &Path,
    run_as: Option<u32>,
    before: Option<&str>,
    after: &str,
) -> Option<Vec<String>> {
    if !is_commit_id(after) || before.is_some_and(|b| !is_commit_id(b)) {
        return None;
    }
    let limit = format!("--max-count={}", MAX_SUBJECT_COMMITS + 1);
    let range = match before {
        Some(before) => format!("{before}..{after}"),
        None => after.to_owned(),
    };
    let out = git(workspace, run_as, &["rev-list", &limit, &range, "--"]).await?;
    Some(
        out.lines()
            .map(str::trim)
            .filter(|line| is_commit_id(line))
            .map(str::to_ascii_lowercase)
            .collect(),
    )
}

/// The statement's subjects: the session's commits when there are any, else the
/// session's egress audit head (what the session is, when it left no commit a host
/// process can name safely), else nothing.
#[must_use]
pub fn subjects(commits: &[String], audit_head: Option<&LogHead>) -> Vec<ResourceDescriptor> {
    if !commits.is_empty() {
        let mut out: Vec<ResourceDescriptor> = commits
            .iter()
            .take(MAX_SUBJECT_COMMITS)
            .map(|sha| ResourceDescriptor::new(format!("commit:{sha}"), "gitCommit", sha.clone()))
            .collect();
        if commits.len() > MAX_SUBJECT_COMMITS
            && let Some(last) = out.last_mut()
        {
            last.annotations.insert(
                "truncated".to_owned(),
                serde_json::json!(format!(
                    "the session made more than {MAX_SUBJECT_COMMITS} commits; the newest are listed"
                )),
            );
        }
        return out;
    }
    let Some(head) = audit_head else {
        return Vec::new();
    };
    let mut subject = ResourceDescriptor::new("egress-audit-head", "sha256", head.hash.clone());
    subject
        .annotations
        .insert("seq".to_owned(), serde_json::json!(head.seq));
    vec![subject]
}

/// The name of a session's file in the history directory: its number and start time,
/// so that sessions sort in order and a failed session (which does not count) never
/// overwrites another.
#[must_use]
pub fn history_name(session: u64, started: time::OffsetDateTime) -> String {
    format!(
        "{session:04}-{:04}{:02}{:02}T{:02}{:02}{:02}Z.json",
        started.year(),
        u8::from(started.month()),
        started.day(),
        started.hour(),
        started.minute(),
        started.second()
    )
}

/// Writes the envelope to `<dir>/provenance/<history_name>` and `<dir>/provenance.json`
/// (each atomically, 0600); returns the latest's path.
///
/// # Errors
/// A directory or file cannot be written.
pub fn write_envelopes(
    dir: &Path,
    history_name: &str,
    envelope: &bot_bottle_core::provenance::Envelope,
) -> Result<PathBuf, bot_bottle_core::provenance::ProvenanceError> {
    use bot_bottle_core::provenance::{ProvenanceError, write_envelope_file};
    let history = dir.join(HISTORY_DIR);
    bot_bottle_core::state::create_private_dir(&history).map_err(|err| ProvenanceError::Write {
        path: history.clone(),
        source: std::io::Error::other(err.to_string()),
    })?;
    write_envelope_file(&history.join(history_name), envelope)?;
    let latest = dir.join(LATEST_FILE);
    write_envelope_file(&latest, envelope)?;
    Ok(latest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bot_bottle_core::provenance::sha256_digest;
    use bot_bottle_egress::audit::{AuditLog, DlpRecord, EventDraft};
    use std::collections::BTreeMap;

    fn draft(kind: EventKind, decision: AuditDecision, host: &str) -> EventDraft {
        let mut draft = EventDraft::new(kind, decision, "test");
        draft.host = Some(host.to_owned());
        draft
    }

    #[test]
    fn tally_counts_requests_per_host_blocks_dlp_and_bad_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("egress.jsonl");
        let log = AuditLog::open(&path).expect("open");
        log.append(EventDraft::new(
            EventKind::Gateway,
            AuditDecision::Info,
            "start",
        ))
        .expect("append");
        for _ in 0..3 {
            log.append(draft(
                EventKind::Request,
                AuditDecision::Allow,
                "api.example.test",
            ))
            .expect("append");
        }
        let mut leaky = draft(
            EventKind::Request,
            AuditDecision::Block,
            "paste.example.test",
        );
        // More findings than one event lists: the writer counts the rest in `dlp_more`.
        let findings = bot_bottle_egress::audit::MAX_DLP_RECORDS + 2;
        leaky.dlp = (0..findings)
            .map(|i| DlpRecord {
                rule: format!("fake-rule-{i}"),
                action: "block".to_owned(),
                location: "body".to_owned(),
                excerpt: "xx…".to_owned(),
                credential: None,
            })
            .collect();
        log.append(leaky).expect("append");
        log.append(draft(
            EventKind::Connect,
            AuditDecision::Block,
            "evil.example.test",
        ))
        .expect("append");
        let mut held = EventDraft::new(EventKind::Request, AuditDecision::Block, "held back");
        held.held_back = 40;
        log.append(held).expect("append");
        log.append(draft(EventKind::Direct, AuditDecision::Block, "10.0.0.1"))
            .expect("append");
        drop(log);
        // A line that is not an event: skipped and counted, and reading goes on.
        let mut text = std::fs::read_to_string(&path).expect("read");
        text.push_str("{not an event\n");
        std::fs::write(&path, &text).expect("write");

        let tally = tally_audit(&path, 0).expect("tally").expect("a log");
        assert_eq!(5, tally.summary.requests, "{:?}", tally.summary);
        assert_eq!(3, tally.summary.allowed);
        assert_eq!(2, tally.summary.blocked);
        assert_eq!(40, tally.summary.held);
        assert_eq!(1, tally.summary.direct);
        assert_eq!(1, tally.summary.unreadable_lines);
        let findings = findings as u64;
        assert_eq!(findings, tally.dlp_findings);
        assert_eq!(DlpResult::Findings { count: findings }, tally.dlp());
        assert_eq!(
            BTreeMap::from([
                (
                    "api.example.test".to_owned(),
                    HostCounts {
                        allowed: 3,
                        blocked: 0
                    }
                ),
                (
                    "evil.example.test".to_owned(),
                    HostCounts {
                        allowed: 0,
                        blocked: 1
                    }
                ),
                (
                    "paste.example.test".to_owned(),
                    HostCounts {
                        allowed: 0,
                        blocked: 1
                    }
                ),
            ]),
            tally.summary.hosts
        );
        assert_eq!(sha256_digest(text.as_bytes()), tally.digest);

        // A resumed session counts only what came after the head it started from (the
        // first five events: the gateway start and the three allowed requests and the
        // DLP block), while the digest still covers the whole log.
        let later = tally_audit(&path, 5).expect("tally").expect("a log");
        assert_eq!(1, later.summary.requests, "{:?}", later.summary);
        assert_eq!(0, later.summary.allowed);
        assert_eq!(1, later.summary.blocked);
        assert_eq!(40, later.summary.held);
        assert_eq!(0, later.dlp_findings);
        assert_eq!(
            vec!["evil.example.test"],
            later.summary.hosts.keys().collect::<Vec<_>>()
        );
        assert_eq!(tally.digest, later.digest);
        assert_eq!(
            None,
            tally_audit(&dir.path().join("missing.jsonl"), 0).expect("no log")
        );
    }

    #[test]
    fn a_flood_of_host_names_stays_bounded() {
        let mut text = String::new();
        let n = MAX_SUMMARY_HOSTS + 500;
        for i in 0..n {
            let event = serde_json::json!({
                "seq": i + 1, "at": "2026-01-01T00:00:00Z", "kind": "request",
                "decision": "block", "reason": "no rule", "rule": null, "method": "GET",
                "host": format!("h{i}.example.test"), "port": 443, "path": "/",
                "status": null, "bytes_up": 0, "bytes_down": 0, "duration_ms": 0,
                "credential": null, "dlp": [], "prev_hash": "x",
            });
            text.push_str(&event.to_string());
            text.push('\n');
        }
        let (summary, _) = tally_reader(text.as_bytes(), 0).expect("tally");
        assert_eq!(n as u64, summary.blocked);
        assert_eq!(MAX_SUMMARY_HOSTS + 1, summary.hosts.len());
        assert_eq!(500, summary.hosts[OTHER_HOSTS].blocked);
    }

    #[test]
    fn manifests_digest_covers_names_and_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("manifests");
        std::fs::create_dir_all(root.join("agents")).expect("mkdir");
        std::fs::create_dir_all(root.join("bottles")).expect("mkdir");
        std::fs::write(root.join("agents/a.md"), "agent").expect("write");
        std::fs::write(root.join("bottles/b.md"), "bottle").expect("write");
        let first = manifests_digest(&root).expect("digest").expect("some");
        assert_eq!(
            first,
            manifests_digest(&root).expect("digest").expect("some")
        );
        std::fs::write(root.join("bottles/b.md"), "bottle!").expect("write");
        let changed = manifests_digest(&root).expect("digest").expect("some");
        assert_ne!(first, changed);
        std::fs::write(root.join("bottles/b.md"), "bottle").expect("write");
        std::fs::rename(root.join("bottles/b.md"), root.join("bottles/c.md")).expect("mv");
        assert_ne!(
            first,
            manifests_digest(&root).expect("digest").expect("some"),
            "a renamed file changes the digest"
        );
        assert_eq!(
            None,
            manifests_digest(&dir.path().join("none")).expect("none")
        );
    }

    #[test]
    fn policy_digest_changes_with_the_policy() {
        let empty = EgressPolicy::default();
        let other = EgressPolicy {
            audit: Some(bot_bottle_core::policy::AuditLevel::default()),
            ..EgressPolicy::default()
        };
        assert_eq!(policy_digest(&empty), policy_digest(&empty.clone()));
        assert_ne!(policy_digest(&empty), policy_digest(&other));
    }

    #[test]
    fn subjects_are_commits_else_the_audit_head() {
        let head = LogHead {
            seq: 9,
            hash: "d".repeat(64),
        };
        let commits = vec!["a".repeat(40), "b".repeat(40)];
        let subjects_of_commits = subjects(&commits, Some(&head));
        assert_eq!(2, subjects_of_commits.len());
        assert_eq!(
            Some(&"a".repeat(40)),
            subjects_of_commits[0].digest.get("gitCommit")
        );
        let fallback = subjects(&[], Some(&head));
        assert_eq!(1, fallback.len());
        assert_eq!("egress-audit-head", fallback[0].name);
        assert_eq!(Some(&"d".repeat(64)), fallback[0].digest.get("sha256"));
        assert!(subjects(&[], None).is_empty());
        let many: Vec<String> = (0..=MAX_SUBJECT_COMMITS)
            .map(|i| format!("{i:040x}"))
            .collect();
        let capped = subjects(&many, None);
        assert_eq!(MAX_SUBJECT_COMMITS, capped.len());
        assert!(
            capped
                .last()
                .expect("last")
                .annotations
                .contains_key("truncated")
        );
    }

    #[test]
    fn envelopes_are_written_as_latest_and_history_privately_and_failures_are_errors() {
        use bot_bottle_core::provenance::{Envelope, EnvelopeSignature};
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let envelope = |payload: &str| Envelope {
            payload: payload.to_owned(),
            payload_type: "application/vnd.in-toto+json".to_owned(),
            signatures: vec![EnvelopeSignature {
                keyid: String::new(),
                sig: String::new(),
            }],
        };
        let started = time::macros::datetime!(2026-12-04 10:00:07 UTC);
        assert_eq!("0003-20261204T100007Z.json", history_name(3, started));
        let first = history_name(1, started);
        let second = history_name(2, started + time::Duration::minutes(5));
        let latest = write_envelopes(dir.path(), &first, &envelope("b25l")).expect("write");
        write_envelopes(dir.path(), &second, &envelope("dHdv")).expect("write");
        assert_eq!(dir.path().join(LATEST_FILE), latest);
        let read = |path: &Path| std::fs::read_to_string(path).expect("read");
        assert!(
            read(&latest).contains("dHdv"),
            "the latest is the last session's"
        );
        let history = dir.path().join(HISTORY_DIR);
        assert!(read(&history.join(&first)).contains("b25l"));
        assert!(read(&history.join(&second)).contains("dHdv"));
        for path in [latest, history.join(&first)] {
            let mode = std::fs::metadata(&path)
                .expect("metadata")
                .permissions()
                .mode();
            assert_eq!(0o600, mode & 0o777, "{}", path.display());
        }
        // A history directory that cannot be made: an error to report, not a panic.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).expect("mkdir");
        std::fs::write(blocked.join(HISTORY_DIR), "a file").expect("write");
        assert!(write_envelopes(&blocked, &first, &envelope("eA==")).is_err());
        assert!(!blocked.join(LATEST_FILE).exists());
    }

    fn git_cmd(dir: &Path, args: &[&str]) {
        let status = std::process::Command::new("git")
            .current_dir(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.test"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("git runs");
        assert!(status.success(), "git {args:?}");
    }

    #[tokio::test]
    async fn commits_of_a_session_come_from_the_workspace_history() {
        let _children = crate::CHILDREN.lock().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path();
        assert_eq!(None, workspace_head(ws, None).await, "not a repository");
        git_cmd(ws, &["init", "-q"]);
        assert_eq!(None, workspace_head(ws, None).await, "no commit yet");
        git_cmd(ws, &["commit", "-q", "--allow-empty", "-m", "base"]);
        let before = workspace_head(ws, None).await.expect("head");
        git_cmd(ws, &["commit", "-q", "--allow-empty", "-m", "one"]);
        git_cmd(ws, &["commit", "-q", "--allow-empty", "-m", "two"]);
        let after = workspace_head(ws, None).await.expect("head");
        let commits = commits_between(ws, None, Some(&before), &after)
            .await
            .expect("rev-list");
        assert_eq!(2, commits.len());
        assert_eq!(after, commits[0]);
        assert!(!commits.contains(&before));
        assert_eq!(
            Some(vec![]),
            commits_between(ws, None, Some(&after), &after).await
        );
        // Not commit ids: refused before git sees them (no option injection).
        assert_eq!(None, commits_between(ws, None, Some("--all"), &after).await);
    }

    #[tokio::test]
    async fn a_gitdir_pointer_or_symlinked_git_is_not_followed() {
        let _children = crate::CHILDREN.lock().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        git_cmd(&real, &["init", "-q"]);
        git_cmd(&real, &["commit", "-q", "--allow-empty", "-m", "base"]);
        assert!(workspace_head(&real, None).await.is_some());
        let pointer = dir.path().join("pointer");
        std::fs::create_dir(&pointer).expect("mkdir");
        std::fs::write(
            pointer.join(".git"),
            format!("gitdir: {}\n", real.join(".git").display()),
        )
        .expect("write");
        assert_eq!(None, workspace_head(&pointer, None).await);
        let linked = dir.path().join("linked");
        std::fs::create_dir(&linked).expect("mkdir");
        std::os::unix::fs::symlink(real.join(".git"), linked.join(".git")).expect("symlink");
        assert_eq!(None, workspace_head(&linked, None).await);
    }

    #[tokio::test]
    async fn repository_hooks_and_fsmonitor_never_run() {
        let _children = crate::CHILDREN.lock().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path().join("ws");
        std::fs::create_dir(&ws).expect("mkdir");
        git_cmd(&ws, &["init", "-q"]);
        git_cmd(&ws, &["commit", "-q", "--allow-empty", "-m", "base"]);
        // What an agent could plant in a bind-mounted repository's config.
        let marker = dir.path().join("ran");
        let script = dir.path().join("evil.sh");
        std::fs::write(&script, format!("#!/bin/sh\ntouch {}\n", marker.display())).expect("write");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let hooks = ws.join(".git/hooks");
        std::fs::create_dir_all(&hooks).expect("mkdir");
        for hook in [
            "post-checkout",
            "reference-transaction",
            "post-index-change",
        ] {
            std::fs::copy(&script, hooks.join(hook)).expect("copy");
        }
        let s = script.display().to_string();
        git_cmd(&ws, &["config", "core.fsmonitor", &s]);
        git_cmd(&ws, &["config", "core.pager", &s]);
        let head = workspace_head(&ws, None).await.expect("head");
        commits_between(&ws, None, None, &head)
            .await
            .expect("rev-list");
        assert!(!marker.exists(), "a program from the repository ran");
    }
}
