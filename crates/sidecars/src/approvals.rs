//! The approval queue: requests a bottle's gateway holds (`egress.unlisted: ask`) and
//! questions its agent asks (`ask_human`), waiting for a human, in SQLite
//! (`$BOT_BOTTLE_HOME/bot-bottle.db`, table `approvals`), shared by every bottle on the
//! host and every process that decides (CLI, dashboard).
//!
//! The database is the forge store's file; this table keeps its own schema version (in
//! `component_versions`), so the two migrate independently. WAL and a busy timeout let
//! gateways, the CLI and the dashboard use it at once; a decision is one conditional
//! `UPDATE … WHERE status = 'pending'`, so two deciders cannot both win.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

/// How long a writer waits for another process's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The schema of the `approvals` component, in order; append only.
const MIGRATIONS: &[&str] = &["CREATE TABLE approvals (
        id TEXT PRIMARY KEY NOT NULL,
        slug TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('egress', 'question')),
        host TEXT,
        port INTEGER,
        method TEXT,
        path TEXT,
        agent_reason TEXT,
        question TEXT,
        status TEXT NOT NULL CHECK (status IN ('pending', 'allowed', 'allowed-always', 'denied', 'answered')),
        decided_by TEXT,
        decision_reason TEXT,
        answer TEXT,
        created_at TEXT NOT NULL,
        decided_at TEXT
    );
    CREATE INDEX approvals_pending ON approvals (status, slug);"];

/// Bounds on what a bottle puts in the queue (the agent writes the reason and the
/// question; the gateway the request line).
pub const MAX_TEXT: usize = 4096;
pub const MAX_HOST: usize = 1024;
pub const MAX_PATH: usize = 2048;

/// What waits for a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A request the gateway holds, or an egress the agent asked for.
    Egress,
    /// A free-text question from the agent.
    Question,
}

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Pending,
    /// Allowed once.
    Allowed,
    /// Allowed, and a rule was added for the bottle.
    AllowedAlways,
    Denied,
    /// A question got its answer.
    Answered,
}

impl Status {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Allowed => "allowed",
            Self::AllowedAlways => "allowed-always",
            Self::Denied => "denied",
            Self::Answered => "answered",
        }
    }

    #[must_use]
    pub fn is_allowed(self) -> bool {
        matches!(self, Self::Allowed | Self::AllowedAlways)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(match value {
            "pending" => Self::Pending,
            "allowed" => Self::Allowed,
            "allowed-always" => Self::AllowedAlways,
            "denied" => Self::Denied,
            "answered" => Self::Answered,
            other => return Err(other.to_owned()),
        })
    }
}

/// What a bottle files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewApproval {
    pub slug: String,
    /// `None` means [`Kind::Egress`].
    pub question: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub method: Option<String>,
    pub path: Option<String>,
    /// Why the agent wants it (from `request_egress`), when it said.
    pub agent_reason: Option<String>,
}

/// One entry of the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub id: String,
    pub slug: String,
    pub kind: Kind,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub agent_reason: Option<String>,
    pub question: Option<String>,
    pub status: Status,
    /// Who decided: a user name, `timeout`, `gateway-stopped`, `limit`.
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
    /// The human's answer to a question.
    pub answer: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    pub decided_at: Option<String>,
}

/// A human's (or the system's) decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    AllowOnce,
    AllowAlways,
    Deny { reason: Option<String> },
    Answer(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("cannot create the directory of `{}`", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("approval queue `{}` failed", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "approval queue `{}` has schema version {found}, newer than this build knows ({known})\nhint: upgrade bot-bottle",
        path.display()
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("no approval `{id}`\nhint: `bot-bottle approvals` lists them")]
    Unknown { id: String },
    #[error("approval `{id}` was already decided: {status}{}", by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default())]
    AlreadyDecided {
        id: String,
        status: Status,
        by: Option<String>,
    },
    #[error("approval `{id}` is a {kind}; {what}\nhint: {hint}")]
    WrongKind {
        id: String,
        kind: &'static str,
        what: &'static str,
        hint: &'static str,
    },
    #[error("approval `{id}` row is corrupt: {detail}")]
    Corrupt { id: String, detail: String },
}

/// The queue on its SQLite file.
pub struct ApprovalStore {
    path: PathBuf,
    connection: Mutex<Connection>,
}

impl fmt::Debug for ApprovalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApprovalStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

const COLUMNS: &str = "id, slug, kind, host, port, method, path, agent_reason, question, status, \
    decided_by, decision_reason, answer, created_at, decided_at";

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `text` cut to at most `max` bytes at a character boundary.
fn bound(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn new_id() -> String {
    use rand::Rng as _;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let mut rng = rand::rng();
    let tail: String = (0..8)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    format!("ap-{tail}")
}

impl ApprovalStore {
    /// The database file of a bot-bottle home.
    #[must_use]
    pub fn default_path(home: &Path) -> PathBuf {
        home.join("bot-bottle.db")
    }

    /// Opens (creating and migrating) the queue in `path`.
    ///
    /// # Errors
    /// The file cannot be opened or migrated.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, ApprovalError> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs_err::create_dir_all(parent).map_err(|source| ApprovalError::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let sql = |source| ApprovalError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut connection = Connection::open(&path).map_err(sql)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        let _mode: String = connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(sql)?;
        connection
            .execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(sql)?;
        migrate(&mut connection, &path)?;
        Ok(Self {
            path,
            connection: Mutex::new(connection),
        })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn sql(&self, source: rusqlite::Error) -> ApprovalError {
        ApprovalError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Files a new pending approval; every text is bounded.
    ///
    /// # Errors
    /// The database fails.
    pub fn file(&self, new: &NewApproval) -> Result<Approval, ApprovalError> {
        let approval = Approval {
            id: new_id(),
            slug: new.slug.clone(),
            kind: if new.question.is_some() {
                Kind::Question
            } else {
                Kind::Egress
            },
            host: new.host.as_deref().map(|h| bound(h, MAX_HOST)),
            port: new.port,
            method: new.method.as_deref().map(|m| bound(m, 64)),
            path: new.path.as_deref().map(|p| bound(p, MAX_PATH)),
            agent_reason: new.agent_reason.as_deref().map(|r| bound(r, MAX_TEXT)),
            question: new.question.as_deref().map(|q| bound(q, MAX_TEXT)),
            status: Status::Pending,
            decided_by: None,
            decision_reason: None,
            answer: None,
            created_at: now(),
            decided_at: None,
        };
        self.lock()
            .execute(
                &format!(
                    "INSERT INTO approvals ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL, NULL, NULL, ?11, NULL)"
                ),
                params![
                    approval.id,
                    approval.slug,
                    kind_str(approval.kind),
                    approval.host,
                    approval.port,
                    approval.method,
                    approval.path,
                    approval.agent_reason,
                    approval.question,
                    approval.status.as_str(),
                    approval.created_at,
                ],
            )
            .map_err(|source| self.sql(source))?;
        Ok(approval)
    }

    /// One approval.
    ///
    /// # Errors
    /// The database fails, or a row is corrupt.
    pub fn get(&self, id: &str) -> Result<Option<Approval>, ApprovalError> {
        let connection = self.lock();
        let raw = connection
            .query_row(
                &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
                params![id],
                RawApproval::from_row,
            )
            .optional()
            .map_err(|source| self.sql(source))?;
        raw.map(RawApproval::into_approval).transpose()
    }

    /// Approvals, oldest first: only pending ones, or the latest `limit` of every status;
    /// only `slug`'s when given.
    ///
    /// # Errors
    /// The database fails, or a row is corrupt.
    pub fn list(
        &self,
        pending_only: bool,
        slug: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Approval>, ApprovalError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare(&format!(
                "SELECT {COLUMNS} FROM (SELECT rowid AS seq, * FROM approvals \
                 WHERE (?1 = 0 OR status = 'pending') AND (?2 IS NULL OR slug = ?2) \
                 ORDER BY created_at DESC, rowid DESC LIMIT ?3) ORDER BY created_at, seq"
            ))
            .map_err(|source| self.sql(source))?;
        let rows = statement
            .query_map(
                params![
                    i64::from(pending_only),
                    slug,
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                RawApproval::from_row,
            )
            .map_err(|source| self.sql(source))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.map_err(|source| self.sql(source))?.into_approval()?);
        }
        Ok(out)
    }

    /// Records a decision on a pending approval, atomically: exactly one decider wins.
    ///
    /// # Errors
    /// No such approval, already decided, a decision that does not fit its kind (an
    /// answer to an egress request, allow/deny of a question is fine as deny only), or
    /// the database fails.
    pub fn decide(
        &self,
        id: &str,
        decision: &Decision,
        by: &str,
    ) -> Result<Approval, ApprovalError> {
        let current = self
            .get(id)?
            .ok_or_else(|| ApprovalError::Unknown { id: id.to_owned() })?;
        let wrong = |what, hint| ApprovalError::WrongKind {
            id: id.to_owned(),
            kind: kind_str(current.kind),
            what,
            hint,
        };
        let (status, reason, answer) = match (decision, current.kind) {
            (Decision::AllowOnce, Kind::Egress) => (Status::Allowed, None, None),
            (Decision::AllowAlways, Kind::Egress) => (Status::AllowedAlways, None, None),
            (Decision::Deny { reason }, _) => (Status::Denied, reason.clone(), None),
            (Decision::Answer(text), Kind::Question) => {
                (Status::Answered, None, Some(bound(text, MAX_TEXT)))
            }
            (Decision::Answer(_), Kind::Egress) => {
                return Err(wrong(
                    "it takes approve or deny, not an answer",
                    "`bot-bottle approve ID` or `bot-bottle deny ID`",
                ));
            }
            (Decision::AllowOnce | Decision::AllowAlways, Kind::Question) => {
                return Err(wrong(
                    "it takes an answer",
                    "`bot-bottle approve ID --answer TEXT`, or `bot-bottle deny ID`",
                ));
            }
        };
        let changed = self
            .lock()
            .execute(
                "UPDATE approvals SET status = ?2, decided_by = ?3, decision_reason = ?4, answer = ?5, decided_at = ?6 \
                 WHERE id = ?1 AND status = 'pending'",
                params![
                    id,
                    status.as_str(),
                    bound(by, 256),
                    reason.as_deref().map(|r| bound(r, MAX_TEXT)),
                    answer,
                    now()
                ],
            )
            .map_err(|source| self.sql(source))?;
        let after = self
            .get(id)?
            .ok_or_else(|| ApprovalError::Unknown { id: id.to_owned() })?;
        if changed == 0 {
            return Err(ApprovalError::AlreadyDecided {
                id: id.to_owned(),
                status: after.status,
                by: after.decided_by,
            });
        }
        Ok(after)
    }

    /// Denies every pending approval of `slug` (its gateway stopped, or started again
    /// after a crash: nothing waits for them any more). Returns how many.
    ///
    /// # Errors
    /// The database fails.
    pub fn deny_pending(&self, slug: &str, by: &str) -> Result<usize, ApprovalError> {
        self.lock()
            .execute(
                "UPDATE approvals SET status = 'denied', decided_by = ?2, decided_at = ?3 \
                 WHERE slug = ?1 AND status = 'pending'",
                params![slug, by, now()],
            )
            .map_err(|source| self.sql(source))
    }

    /// How many approvals of `slug` are pending.
    ///
    /// # Errors
    /// The database fails.
    pub fn pending_count(&self, slug: &str) -> Result<usize, ApprovalError> {
        let count: i64 = self
            .lock()
            .query_row(
                "SELECT COUNT(*) FROM approvals WHERE slug = ?1 AND status = 'pending'",
                params![slug],
                |row| row.get(0),
            )
            .map_err(|source| self.sql(source))?;
        Ok(usize::try_from(count).unwrap_or(0))
    }
}

fn kind_str(kind: Kind) -> &'static str {
    match kind {
        Kind::Egress => "egress",
        Kind::Question => "question",
    }
}

fn migrate(connection: &mut Connection, path: &Path) -> Result<(), ApprovalError> {
    let sql = |source| ApprovalError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let transaction = connection
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sql)?;
    transaction
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS component_versions (component TEXT PRIMARY KEY NOT NULL, version INTEGER NOT NULL);",
        )
        .map_err(sql)?;
    let version: i64 = transaction
        .query_row(
            "SELECT version FROM component_versions WHERE component = 'approvals'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(sql)?
        .unwrap_or(0);
    let applied = usize::try_from(version).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(ApprovalError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for migration in MIGRATIONS.iter().skip(applied) {
        transaction.execute_batch(migration).map_err(sql)?;
    }
    transaction
        .execute(
            "INSERT INTO component_versions (component, version) VALUES ('approvals', ?1) \
             ON CONFLICT (component) DO UPDATE SET version = excluded.version",
            params![i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)],
        )
        .map_err(sql)?;
    transaction.commit().map_err(sql)
}

struct RawApproval {
    id: String,
    slug: String,
    kind: String,
    host: Option<String>,
    port: Option<i64>,
    method: Option<String>,
    path: Option<String>,
    agent_reason: Option<String>,
    question: Option<String>,
    status: String,
    decided_by: Option<String>,
    decision_reason: Option<String>,
    answer: Option<String>,
    created_at: String,
    decided_at: Option<String>,
}

impl RawApproval {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            slug: row.get(1)?,
            kind: row.get(2)?,
            host: row.get(3)?,
            port: row.get(4)?,
            method: row.get(5)?,
            path: row.get(6)?,
            agent_reason: row.get(7)?,
            question: row.get(8)?,
            status: row.get(9)?,
            decided_by: row.get(10)?,
            decision_reason: row.get(11)?,
            answer: row.get(12)?,
            created_at: row.get(13)?,
            decided_at: row.get(14)?,
        })
    }

    fn into_approval(self) -> Result<Approval, ApprovalError> {
        let corrupt = |detail: String| ApprovalError::Corrupt {
            id: self.id.clone(),
            detail,
        };
        let kind = match self.kind.as_str() {
            "egress" => Kind::Egress,
            "question" => Kind::Question,
            other => return Err(corrupt(format!("unknown kind `{other}`"))),
        };
        let status = self
            .status
            .parse()
            .map_err(|s| corrupt(format!("unknown status `{s}`")))?;
        let port = self
            .port
            .map(u16::try_from)
            .transpose()
            .map_err(|_| corrupt("port out of range".to_owned()))?;
        Ok(Approval {
            id: self.id,
            slug: self.slug,
            kind,
            host: self.host,
            port,
            method: self.method,
            path: self.path,
            agent_reason: self.agent_reason,
            question: self.question,
            status,
            decided_by: self.decided_by,
            decision_reason: self.decision_reason,
            answer: self.answer,
            created_at: self.created_at,
            decided_at: self.decided_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, ApprovalStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ApprovalStore::open(ApprovalStore::default_path(dir.path())).expect("open");
        (dir, store)
    }

    fn egress(slug: &str) -> NewApproval {
        NewApproval {
            slug: slug.to_owned(),
            host: Some("example.org".to_owned()),
            port: Some(443),
            method: Some("GET".to_owned()),
            path: Some("/".to_owned()),
            agent_reason: Some("docs".to_owned()),
            ..NewApproval::default()
        }
    }

    #[test]
    fn one_decider_wins_and_the_loser_hears_who() {
        let (_dir, store) = store();
        let filed = store.file(&egress("b1")).expect("file");
        assert_eq!(filed.status, Status::Pending);
        assert!(filed.id.starts_with("ap-"));
        let second = ApprovalStore::open(store.path()).expect("second connection");
        let won = store
            .decide(&filed.id, &Decision::AllowOnce, "alice")
            .expect("decide");
        assert_eq!(won.status, Status::Allowed);
        assert_eq!(won.decided_by.as_deref(), Some("alice"));
        let lost = second
            .decide(&filed.id, &Decision::Deny { reason: None }, "bob")
            .expect_err("already decided");
        assert!(lost.to_string().contains("allowed by alice"), "{lost}");
        assert!(matches!(
            store.decide("ap-nope", &Decision::AllowOnce, "x"),
            Err(ApprovalError::Unknown { .. })
        ));
    }

    #[test]
    fn questions_take_answers_and_egress_does_not() {
        let (_dir, store) = store();
        let question = store
            .file(&NewApproval {
                slug: "b1".into(),
                question: Some("which branch?".into()),
                ..NewApproval::default()
            })
            .expect("file");
        assert_eq!(question.kind, Kind::Question);
        assert!(
            store
                .decide(&question.id, &Decision::AllowOnce, "a")
                .is_err()
        );
        let answered = store
            .decide(&question.id, &Decision::Answer("main".into()), "a")
            .expect("answer");
        assert_eq!(answered.answer.as_deref(), Some("main"));
        let request = store.file(&egress("b1")).expect("file");
        let err = store
            .decide(&request.id, &Decision::Answer("x".into()), "a")
            .expect_err("no answers to requests");
        assert!(err.to_string().contains("hint:"), "{err}");
    }

    #[test]
    fn pending_of_a_stopped_gateway_are_denied_and_listing_filters() {
        let (_dir, store) = store();
        let a = store.file(&egress("b1")).expect("file");
        let b = store.file(&egress("b2")).expect("file");
        assert_eq!(store.pending_count("b1").expect("count"), 1);
        assert_eq!(
            store.deny_pending("b1", "gateway-stopped").expect("deny"),
            1
        );
        let a = store.get(&a.id).expect("get").expect("exists");
        assert_eq!(a.status, Status::Denied);
        assert_eq!(a.decided_by.as_deref(), Some("gateway-stopped"));
        let pending = store.list(true, None, 100).expect("list");
        assert_eq!(
            pending.iter().map(|x| &x.id).collect::<Vec<_>>(),
            vec![&b.id]
        );
        assert_eq!(store.list(false, Some("b1"), 100).expect("list").len(), 1);
    }

    #[test]
    fn agent_texts_are_bounded() {
        let (_dir, store) = store();
        let filed = store
            .file(&NewApproval {
                agent_reason: Some("é".repeat(10_000)),
                ..egress("b1")
            })
            .expect("file");
        assert!(filed.agent_reason.expect("reason").len() <= MAX_TEXT + 3);
    }

    #[test]
    fn the_forge_store_and_the_queue_share_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bot-bottle.db");
        let forge = bot_bottle_forge::SqliteForgeStateStore::open(&path).expect("forge store");
        let queue = ApprovalStore::open(&path).expect("queue");
        queue.file(&egress("b1")).expect("file");
        drop(forge);
        let again = bot_bottle_forge::SqliteForgeStateStore::open(&path).expect("reopen");
        assert_eq!(again.schema_version().expect("version"), 2);
        assert_eq!(
            ApprovalStore::open(&path)
                .expect("reopen")
                .list(false, None, 10)
                .expect("list")
                .len(),
            1
        );
    }
}
