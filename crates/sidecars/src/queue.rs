//! The queue dir (`state/<slug>/queue/`): events the forge sidecar hands to the
//! orchestrator, one JSON file each.
//!
//! A file appears whole or not at all: it is written under a temporary name (starting
//! with `.`), synced, renamed, and the directory synced, so a crash leaves either no
//! event or a complete one. Names start with a zero-padded timestamp that is strictly
//! increasing within a process, so sorting the names sorts the events by time. The
//! orchestrator reads [`pending`] events and [`ack`]s each one once it has acted on it.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The subdirectory corrupt files are moved to by [`pending`].
pub const BAD_DIR: &str = "bad";

/// The largest event file [`pending`] reads; a larger one is treated as corrupt.
pub const MAX_EVENT_FILE: u64 = 1024 * 1024;

/// What the agent did that the orchestrator must act on.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum QueueEvent {
    /// The agent called `signal_done`: the orchestrator freezes the bottle.
    SignalDone { status: DoneStatus, summary: String },
    /// The agent opened (or re-found) a pull request through the sidecar.
    PrCreated { number: u64 },
}

/// How the agent says its unit of work ended.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum DoneStatus {
    Done,
    Blocked,
    NeedsInput,
}

impl DoneStatus {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Blocked => "blocked",
            Self::NeedsInput => "needs_input",
        }
    }
}

impl std::fmt::Display for DoneStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event file's contents.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QueuedEvent {
    /// The file's name without `.json`; sorts by time.
    pub id: String,
    /// When it was queued, RFC 3339 UTC.
    pub at: String,
    pub event: QueueEvent,
}

/// The last timestamp handed out, so two events queued in the same nanosecond (or
/// across a clock step backwards) still get increasing names.
static LAST_STAMP: AtomicU64 = AtomicU64::new(0);

fn next_stamp() -> u64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let now = u64::try_from(now).unwrap_or(0);
    let mut last = LAST_STAMP.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST_STAMP.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs_err::File::open(dir)?.sync_all()
}

/// Writes `event` atomically into `dir` (created if missing) and returns it as queued.
///
/// # Errors
/// The directory or the file cannot be created, written, synced or renamed; the error
/// names the path.
pub fn push(dir: &Path, event: QueueEvent) -> io::Result<QueuedEvent> {
    fs_err::create_dir_all(dir)?;
    let id = format!("{:020}-{:08x}", next_stamp(), rand::random::<u32>());
    let at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(io::Error::other)?;
    let queued = QueuedEvent { id, at, event };
    let mut bytes = serde_json::to_vec(&queued).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let temporary = dir.join(format!(".{}.json.tmp", queued.id));
    let path = dir.join(format!("{}.json", queued.id));
    let write = || -> io::Result<()> {
        let mut options = fs_err::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use fs_err::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        fs_err::rename(&temporary, &path)?;
        sync_dir(dir)
    };
    if let Err(err) = write() {
        let _ = std::fs::remove_file(&temporary);
        return Err(err);
    }
    Ok(queued)
}

/// The events waiting in `dir`, oldest first. Temporary files are skipped; a file that
/// is not a queued event (unreadable, too large, not the format) is moved to `dir/bad/`
/// and logged, never returned and never an error. A missing `dir` has no events.
///
/// # Errors
/// Only when `dir` exists but cannot be listed.
pub fn pending(dir: &Path) -> io::Result<Vec<(PathBuf, QueuedEvent)>> {
    let entries = match fs_err::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            quarantine(dir, &entry.path(), "the file name is not UTF-8");
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        names.push(name);
    }
    names.sort();
    let mut events = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        match read_event(&path, &name) {
            Ok(event) => events.push((path, event)),
            // Gone since the listing (acked by another reader): nothing to report.
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => quarantine(dir, &path, &err.to_string()),
        }
    }
    Ok(events)
}

fn read_event(path: &Path, name: &str) -> io::Result<QueuedEvent> {
    let file = fs_err::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_EVENT_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_EVENT_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("over {MAX_EVENT_FILE} bytes"),
        ));
    }
    let event: QueuedEvent = serde_json::from_slice(&bytes)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
    if Some(event.id.as_str()) != name.strip_suffix(".json") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("its id `{}` is not its file name", event.id),
        ));
    }
    Ok(event)
}

/// Moves a corrupt file out of the way so it is reported once, not on every poll.
fn quarantine(dir: &Path, path: &Path, problem: &str) {
    let bad = dir.join(BAD_DIR);
    let target = path.file_name().map(|name| bad.join(name));
    let moved = match target {
        Some(target) => fs_err::create_dir_all(&bad).and_then(|()| fs_err::rename(path, &target)),
        None => Err(io::Error::other("the path has no file name")),
    };
    match moved {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            problem,
            "a queue file is not a queued event; moved it to `{}`",
            bad.display()
        ),
        Err(err) => tracing::warn!(
            path = %path.display(),
            problem,
            error = %err,
            "a queue file is not a queued event, and it could not be moved aside; skipping it"
        ),
    }
}

/// Removes an event the orchestrator has handled. Removing one that is already gone is
/// success, so a retried ack is harmless.
///
/// # Errors
/// The file exists but cannot be removed.
pub fn ack(path: &Path) -> io::Result<()> {
    match fs_err::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    }
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_in_order_and_ack_removes_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = dir.path().join("queue");
        let first = push(&queue, QueueEvent::PrCreated { number: 18 }).expect("push");
        let second = push(
            &queue,
            QueueEvent::SignalDone {
                status: DoneStatus::NeedsInput,
                summary: "which database?".into(),
            },
        )
        .expect("push");
        assert!(first.id < second.id, "{} < {}", first.id, second.id);
        let found = pending(&queue).expect("pending");
        assert_eq!(
            found.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
            vec![first.clone(), second.clone()]
        );
        ack(&found[0].0).expect("ack");
        ack(&found[0].0).expect("a second ack is harmless");
        assert_eq!(
            pending(&queue)
                .expect("pending")
                .into_iter()
                .map(|(_, e)| e)
                .collect::<Vec<_>>(),
            vec![second]
        );
    }

    #[test]
    fn wire_format_is_tagged_snake_case() {
        let event = QueueEvent::SignalDone {
            status: DoneStatus::NeedsInput,
            summary: "s".into(),
        };
        assert_eq!(
            serde_json::json!({"kind": "signal_done", "status": "needs_input", "summary": "s"}),
            serde_json::to_value(&event).expect("serialize")
        );
        assert_eq!(
            serde_json::json!({"kind": "pr_created", "number": 3}),
            serde_json::to_value(QueueEvent::PrCreated { number: 3 }).expect("serialize")
        );
    }

    #[test]
    fn temporary_files_are_skipped_and_corrupt_ones_moved_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = dir.path();
        let good = push(queue, QueueEvent::PrCreated { number: 1 }).expect("push");
        std::fs::write(queue.join(".00000000000000000001-aaaaaaaa.json.tmp"), "{").expect("w");
        std::fs::write(queue.join("00000000000000000002-bbbbbbbb.json"), "not json")
            .expect("write");
        // A well-formed event under another file's name is not trusted either.
        let mut moved = good.clone();
        moved.id = "elsewhere".into();
        std::fs::write(
            queue.join("00000000000000000003-cccccccc.json"),
            serde_json::to_vec(&moved).expect("json"),
        )
        .expect("write");
        std::fs::write(queue.join("notes.txt"), "ignored").expect("write");

        let found = pending(queue).expect("pending");
        assert_eq!(
            found.into_iter().map(|(_, e)| e).collect::<Vec<_>>(),
            vec![good]
        );
        let mut bad: Vec<String> = std::fs::read_dir(queue.join(BAD_DIR))
            .expect("bad dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        bad.sort();
        assert_eq!(
            bad,
            vec![
                "00000000000000000002-bbbbbbbb.json",
                "00000000000000000003-cccccccc.json"
            ]
        );
        assert!(
            queue
                .join(".00000000000000000001-aaaaaaaa.json.tmp")
                .exists()
        );
        assert_eq!(pending(queue).expect("pending again").len(), 1);
    }

    #[test]
    fn a_missing_dir_has_no_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(
            pending(&dir.path().join("absent"))
                .expect("pending")
                .is_empty()
        );
    }
}
