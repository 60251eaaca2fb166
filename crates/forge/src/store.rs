//! Forge state: one record per forge-targeted issue, plus the webhook deliveries
//! already handled, in SQLite (`$BOT_BOTTLE_HOME/bot-bottle.db`).
//!
//! The orchestrator, the CLI (`orchestrate status`) and a second orchestrator
//! process may open the same file, so the database runs in WAL mode with a busy
//! timeout, and every read-modify-write happens inside one `BEGIN IMMEDIATE`
//! transaction: two writers serialise instead of losing an update.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

/// How long a writer waits for another process's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE forge_state (
        owner TEXT NOT NULL,
        repo TEXT NOT NULL,
        issue_number INTEGER NOT NULL,
        slug TEXT NOT NULL,
        agent_name TEXT NOT NULL,
        bottle_names TEXT NOT NULL,
        backend_name TEXT NOT NULL,
        agent_git_user TEXT NOT NULL,
        pr_number INTEGER,
        status TEXT NOT NULL CHECK (status IN ('running', 'frozen', 'destroyed')),
        last_checkin_at TEXT NOT NULL,
        base_commit_sha TEXT NOT NULL,
        resume_rounds INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (owner, repo, issue_number)
    );
    CREATE INDEX forge_state_slug ON forge_state (slug);
    CREATE TABLE deliveries (
        key TEXT PRIMARY KEY NOT NULL,
        received_at INTEGER NOT NULL
    );",
    // The orchestrator's loop: whether the watchdog froze the run, a human comment
    // that arrived while the run was busy (it resumes the run when it is frozen), and
    // the last thing that happened to the run, for `orchestrate status`.
    "ALTER TABLE forge_state ADD COLUMN watchdog_fired INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE forge_state ADD COLUMN pending_prompt TEXT;
    ALTER TABLE forge_state ADD COLUMN note TEXT;",
];

/// Lifecycle of a forge-managed bottle: launched, frozen on `signal_done` (or by
/// the watchdog), destroyed when its PR closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForgeStatus {
    Running,
    Frozen,
    Destroyed,
}

impl ForgeStatus {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Frozen => "frozen",
            Self::Destroyed => "destroyed",
        }
    }
}

impl fmt::Display for ForgeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ForgeStatus {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "running" => Ok(Self::Running),
            "frozen" => Ok(Self::Frozen),
            "destroyed" => Ok(Self::Destroyed),
            other => Err(other.to_owned()),
        }
    }
}

/// One forge-targeted issue's bottle, keyed by (owner, repo, issue number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgeState {
    pub owner: String,
    pub repo: String,
    pub issue_number: u64,
    pub slug: String,
    pub agent_name: String,
    pub bottle_names: Vec<String>,
    pub backend_name: String,
    pub agent_git_user: String,
    pub pr_number: Option<u64>,
    pub status: ForgeStatus,
    /// RFC 3339; the watchdog compares it with `FORGE_WATCHDOG_TIMEOUT`.
    pub last_checkin_at: String,
    /// The commit the run started from (provenance's resolved dependency).
    pub base_commit_sha: String,
    /// How many times a comment resumed the bottle.
    pub resume_rounds: u32,
    /// The watchdog froze the run because it was silent too long.
    #[serde(default)]
    pub watchdog_fired: bool,
    /// A human comment that arrived while the run was busy; it resumes the run once
    /// the run is frozen.
    #[serde(default)]
    pub pending_prompt: Option<String>,
    /// The last thing that happened to the run, in a few words.
    #[serde(default)]
    pub note: Option<String>,
}

/// Every way the state store can fail.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the directory of forge state database `{path}`")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("forge state database `{path}` failed")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "forge state database `{path}` has schema version {found}, newer than this build knows ({known})\nhint: upgrade bot-bottle, or point it at another `BOT_BOTTLE_HOME`"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: usize,
    },
    #[error("forge state row for `{owner}/{repo}#{issue_number}` is corrupt: {detail}")]
    Corrupt {
        owner: String,
        repo: String,
        issue_number: i64,
        detail: String,
    },
}

/// Storage for forge state. Callers depend on this trait, so the engine or the
/// location can change without touching them.
pub trait ForgeStateStore: Send + Sync {
    /// Insert the record, or replace the one with the same key.
    fn upsert(&self, state: &ForgeState) -> Result<(), StoreError>;

    fn get(
        &self,
        owner: &str,
        repo: &str,
        issue_number: u64,
    ) -> Result<Option<ForgeState>, StoreError>;

    /// Remove a record; removing a missing one is success.
    fn delete(&self, owner: &str, repo: &str, issue_number: u64) -> Result<(), StoreError>;

    /// Every record, ordered by owner, repo, then issue number.
    fn all(&self) -> Result<Vec<ForgeState>, StoreError>;

    /// Read-modify-write one record atomically with respect to other writers,
    /// processes included. Returns the updated record, or `None` when absent.
    fn update(
        &self,
        owner: &str,
        repo: &str,
        issue_number: u64,
        change: &mut dyn FnMut(&mut ForgeState),
    ) -> Result<Option<ForgeState>, StoreError>;

    /// The record whose PR is `pr_number` (a PR event names the PR, not the issue).
    fn find_by_pr(
        &self,
        owner: &str,
        repo: &str,
        pr_number: u64,
    ) -> Result<Option<ForgeState>, StoreError>;

    /// Remember a webhook delivery under all its dedupe keys. Returns `false`
    /// (and records nothing) when any key was seen before: the event is a
    /// duplicate and must not be handled again.
    fn record_delivery(&self, keys: &[String]) -> Result<bool, StoreError>;
}

/// [`ForgeStateStore`] on a SQLite file.
pub struct SqliteForgeStateStore {
    path: PathBuf,
    connection: Mutex<Connection>,
}

impl fmt::Debug for SqliteForgeStateStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteForgeStateStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteForgeStateStore {
    /// The database file under a bot-bottle home directory.
    #[must_use]
    pub fn default_path(home: &Path) -> PathBuf {
        home.join("bot-bottle.db")
    }

    /// Open (creating the file and its parent directories) and migrate.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs_err::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut connection = Connection::open(&path).map_err(sql)?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
        // WAL lets readers (the status table, a second orchestrator) run beside a
        // writer; `journal_mode` answers with the mode actually in force.
        let _mode: String = connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(sql)?;
        connection
            .execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
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

    /// The schema version in force (the number of migrations applied).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.lock()
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|source| self.sql(source))
    }

    /// Forget deliveries older than `age`, so the table does not grow forever.
    /// Gitea retries a delivery for minutes, not days.
    pub fn prune_deliveries(&self, age: Duration) -> Result<usize, StoreError> {
        let cutoff = unix_now().saturating_sub(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
        self.lock()
            .execute(
                "DELETE FROM deliveries WHERE received_at < ?1",
                params![cutoff],
            )
            .map_err(|source| self.sql(source))
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the connection leaves no transaction open
        // (rusqlite rolls back on drop), so the connection is still usable.
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn sql(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn select_one(
        &self,
        connection: &Connection,
        where_clause: &str,
        owner: &str,
        repo: &str,
        number: u64,
    ) -> Result<Option<ForgeState>, StoreError> {
        let query = format!("SELECT {COLUMNS} FROM forge_state WHERE {where_clause}");
        let raw = connection
            .query_row(
                &query,
                params![owner, repo, to_sql_int(number)],
                RawState::from_row,
            )
            .optional()
            .map_err(|source| self.sql(source))?;
        raw.map(RawState::into_state).transpose()
    }
}

const COLUMNS: &str = "owner, repo, issue_number, slug, agent_name, bottle_names, backend_name, \
     agent_git_user, pr_number, status, last_checkin_at, base_commit_sha, resume_rounds, \
     watchdog_fired, pending_prompt, note";

fn migrate(connection: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    // IMMEDIATE takes the write lock before reading the version, so two processes
    // opening a fresh database cannot both run migration 1.
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    let version: i64 = transaction
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(sql)?;
    let applied = usize::try_from(version).unwrap_or(usize::MAX);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        transaction.execute_batch(migration).map_err(sql)?;
        transaction
            .pragma_update(
                None,
                "user_version",
                i64::try_from(index + 1).unwrap_or(i64::MAX),
            )
            .map_err(sql)?;
    }
    transaction.commit().map_err(sql)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

// SQLite integers are i64; issue and PR numbers never come near the limit.
fn to_sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

struct RawState {
    owner: String,
    repo: String,
    issue_number: i64,
    slug: String,
    agent_name: String,
    bottle_names: String,
    backend_name: String,
    agent_git_user: String,
    pr_number: Option<i64>,
    status: String,
    last_checkin_at: String,
    base_commit_sha: String,
    resume_rounds: i64,
    watchdog_fired: bool,
    pending_prompt: Option<String>,
    note: Option<String>,
}

impl RawState {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            owner: row.get(0)?,
            repo: row.get(1)?,
            issue_number: row.get(2)?,
            slug: row.get(3)?,
            agent_name: row.get(4)?,
            bottle_names: row.get(5)?,
            backend_name: row.get(6)?,
            agent_git_user: row.get(7)?,
            pr_number: row.get(8)?,
            status: row.get(9)?,
            last_checkin_at: row.get(10)?,
            base_commit_sha: row.get(11)?,
            resume_rounds: row.get(12)?,
            watchdog_fired: row.get(13)?,
            pending_prompt: row.get(14)?,
            note: row.get(15)?,
        })
    }

    fn into_state(self) -> Result<ForgeState, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            owner: self.owner.clone(),
            repo: self.repo.clone(),
            issue_number: self.issue_number,
            detail,
        };
        let bottle_names: Vec<String> = serde_json::from_str(&self.bottle_names)
            .map_err(|e| corrupt(format!("`bottle_names` is not a JSON list: {e}")))?;
        let status = self
            .status
            .parse()
            .map_err(|s| corrupt(format!("unknown status `{s}`")))?;
        let issue_number = u64::try_from(self.issue_number)
            .map_err(|_| corrupt("negative issue number".to_owned()))?;
        let pr_number = self
            .pr_number
            .map(u64::try_from)
            .transpose()
            .map_err(|_| corrupt("negative PR number".to_owned()))?;
        let resume_rounds = u32::try_from(self.resume_rounds).map_err(|_| {
            corrupt(format!(
                "`resume_rounds` {} out of range",
                self.resume_rounds
            ))
        })?;
        Ok(ForgeState {
            owner: self.owner,
            repo: self.repo,
            issue_number,
            slug: self.slug,
            agent_name: self.agent_name,
            bottle_names,
            backend_name: self.backend_name,
            agent_git_user: self.agent_git_user,
            pr_number,
            status,
            last_checkin_at: self.last_checkin_at,
            base_commit_sha: self.base_commit_sha,
            resume_rounds,
            watchdog_fired: self.watchdog_fired,
            pending_prompt: self.pending_prompt,
            note: self.note,
        })
    }
}

fn write_state(connection: &Connection, state: &ForgeState) -> rusqlite::Result<()> {
    let bottle_names =
        serde_json::to_string(&state.bottle_names).unwrap_or_else(|_| "[]".to_owned());
    connection.execute(
        &format!(
            "INSERT OR REPLACE INTO forge_state ({COLUMNS}) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
        ),
        params![
            state.owner,
            state.repo,
            to_sql_int(state.issue_number),
            state.slug,
            state.agent_name,
            bottle_names,
            state.backend_name,
            state.agent_git_user,
            state.pr_number.map(to_sql_int),
            state.status.as_str(),
            state.last_checkin_at,
            state.base_commit_sha,
            i64::from(state.resume_rounds),
            state.watchdog_fired,
            state.pending_prompt,
            state.note,
        ],
    )?;
    Ok(())
}

impl ForgeStateStore for SqliteForgeStateStore {
    fn upsert(&self, state: &ForgeState) -> Result<(), StoreError> {
        write_state(&self.lock(), state).map_err(|source| self.sql(source))
    }

    fn get(
        &self,
        owner: &str,
        repo: &str,
        issue_number: u64,
    ) -> Result<Option<ForgeState>, StoreError> {
        let connection = self.lock();
        self.select_one(
            &connection,
            "owner = ?1 AND repo = ?2 AND issue_number = ?3",
            owner,
            repo,
            issue_number,
        )
    }

    fn delete(&self, owner: &str, repo: &str, issue_number: u64) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "DELETE FROM forge_state WHERE owner = ?1 AND repo = ?2 AND issue_number = ?3",
                params![owner, repo, to_sql_int(issue_number)],
            )
            .map(|_| ())
            .map_err(|source| self.sql(source))
    }

    fn all(&self) -> Result<Vec<ForgeState>, StoreError> {
        let connection = self.lock();
        let mut statement = connection
            .prepare(&format!(
                "SELECT {COLUMNS} FROM forge_state ORDER BY owner, repo, issue_number"
            ))
            .map_err(|source| self.sql(source))?;
        let rows = statement
            .query_map([], RawState::from_row)
            .map_err(|source| self.sql(source))?;
        let mut states = Vec::new();
        for row in rows {
            states.push(row.map_err(|source| self.sql(source))?.into_state()?);
        }
        Ok(states)
    }

    fn update(
        &self,
        owner: &str,
        repo: &str,
        issue_number: u64,
        change: &mut dyn FnMut(&mut ForgeState),
    ) -> Result<Option<ForgeState>, StoreError> {
        let mut connection = self.lock();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| self.sql(source))?;
        let Some(mut state) = self.select_one(
            &transaction,
            "owner = ?1 AND repo = ?2 AND issue_number = ?3",
            owner,
            repo,
            issue_number,
        )?
        else {
            return Ok(None);
        };
        change(&mut state);
        // The key is the record's identity; a closure must not move it.
        state.owner = owner.to_owned();
        state.repo = repo.to_owned();
        state.issue_number = issue_number;
        write_state(&transaction, &state).map_err(|source| self.sql(source))?;
        transaction.commit().map_err(|source| self.sql(source))?;
        Ok(Some(state))
    }

    fn find_by_pr(
        &self,
        owner: &str,
        repo: &str,
        pr_number: u64,
    ) -> Result<Option<ForgeState>, StoreError> {
        let connection = self.lock();
        self.select_one(
            &connection,
            "owner = ?1 AND repo = ?2 AND pr_number = ?3 ORDER BY issue_number LIMIT 1",
            owner,
            repo,
            pr_number,
        )
    }

    fn record_delivery(&self, keys: &[String]) -> Result<bool, StoreError> {
        let mut connection = self.lock();
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| self.sql(source))?;
        for key in keys {
            let seen: bool = transaction
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM deliveries WHERE key = ?1)",
                    params![key],
                    |row| row.get(0),
                )
                .map_err(|source| self.sql(source))?;
            if seen {
                return Ok(false);
            }
        }
        let now = unix_now();
        for key in keys {
            transaction
                .execute(
                    "INSERT OR IGNORE INTO deliveries (key, received_at) VALUES (?1, ?2)",
                    params![key, now],
                )
                .map_err(|source| self.sql(source))?;
        }
        transaction.commit().map_err(|source| self.sql(source))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_text() {
        for status in [
            ForgeStatus::Running,
            ForgeStatus::Frozen,
            ForgeStatus::Destroyed,
        ] {
            assert_eq!(Ok(status), status.as_str().parse::<ForgeStatus>());
        }
        assert_eq!(Err("paused".to_owned()), "paused".parse::<ForgeStatus>());
    }

    #[test]
    fn fresh_database_is_migrated_to_the_latest_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteForgeStateStore::open(dir.path().join("db.sqlite")).expect("open");
        assert_eq!(
            i64::try_from(MIGRATIONS.len()).expect("small"),
            store.schema_version().expect("version")
        );
    }
}
