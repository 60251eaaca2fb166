//! `$BOT_BOTTLE_HOME` layout and per-bottle state (`state/<slug>/metadata.json`).
//!
//! Nothing in state ever holds a secret: credentials appear here by name only.
//! Writes that must survive a crash are atomic (temp file, fsync, rename).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::slug::is_valid_slug;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot access `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{path}` is not valid bottle metadata: {message}\nhint: it may be from a newer bot-bottle; `bot-bottle destroy {slug}` removes it"
    )]
    Corrupt {
        path: PathBuf,
        slug: String,
        message: String,
    },
    #[error(
        "`{slug}` is not a bottle identity\nhint: identities look like `implementer-a1b2c`; run `bot-bottle ps`"
    )]
    BadSlug { slug: String },
    #[error("cannot find a home directory\nhint: set `BOT_BOTTLE_HOME` or `HOME`")]
    NoHome,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The `$BOT_BOTTLE_HOME` directory (default `~/.bot-bottle`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `$BOT_BOTTLE_HOME`, else `$HOME/.bot-bottle`.
    pub fn from_env() -> Result<Self, StateError> {
        if let Some(root) = std::env::var_os("BOT_BOTTLE_HOME").filter(|v| !v.is_empty()) {
            return Ok(Self::new(root));
        }
        let home = std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .ok_or(StateError::NoHome)?;
        Ok(Self::new(PathBuf::from(home).join(".bot-bottle")))
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    #[must_use]
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    #[must_use]
    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }

    #[must_use]
    pub fn db_path(&self) -> PathBuf {
        self.root.join("bot-bottle.db")
    }

    /// Where a destroyed bottle's audit log is kept: `audit/<slug>.jsonl`. Destroying a
    /// bottle removes its state, never its record of what it sent out.
    pub fn archived_audit(&self, slug: &str) -> Result<PathBuf, StateError> {
        if !is_valid_slug(slug) {
            return Err(StateError::BadSlug {
                slug: slug.to_owned(),
            });
        }
        Ok(self.root.join("audit").join(format!("{slug}.jsonl")))
    }

    #[must_use]
    pub fn state_root(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The bottle's state directory. The slug is checked so it cannot escape `state/`.
    pub fn bottle(&self, slug: &str) -> Result<BottleDir, StateError> {
        if !is_valid_slug(slug) {
            return Err(StateError::BadSlug {
                slug: slug.to_owned(),
            });
        }
        Ok(BottleDir {
            slug: slug.to_owned(),
            dir: self.state_root().join(slug),
        })
    }

    /// Creates the home directory private to this user (0700): it holds CA keys.
    pub fn ensure(&self) -> Result<(), StateError> {
        create_private_dir(&self.root)?;
        create_private_dir(&self.state_root())
    }

    /// Every bottle with readable metadata, oldest first.
    pub fn list(&self) -> Result<Vec<Metadata>, StateError> {
        let root = self.state_root();
        if !root.is_dir() {
            return Ok(Vec::new());
        }
        let mut all = Vec::new();
        for entry in fs_err::read_dir(&root).map_err(io(&root))? {
            let entry = entry.map_err(io(&root))?;
            let Some(slug) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(bottle) = self.bottle(&slug) else {
                continue;
            };
            if let Some(metadata) = bottle.read_metadata()? {
                all.push(metadata);
            }
        }
        all.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then(a.identity.cmp(&b.identity))
        });
        Ok(all)
    }
}

/// Creates `dir` (and parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Writes `contents` to `path` atomically: temp file in the same directory, fsync,
/// rename, fsync the directory.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        file.write_all(contents).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(dir_handle) = std::fs::File::open(dir) {
        let _ = dir_handle.sync_all();
    }
    Ok(())
}

/// The lifecycle state of a bottle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// State written, container not yet running.
    Created,
    Running,
    /// The agent exited; the container is kept until destroyed or frozen.
    Stopped,
    /// Committed to an image; `resume` continues from it.
    Frozen,
    /// Launch failed before the agent ran.
    Failed,
}

impl Status {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Frozen => "frozen",
            Self::Failed => "failed",
        }
    }
}

/// `state/<slug>/metadata.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub identity: String,
    pub label: String,
    pub label_slug: String,
    #[serde(default)]
    pub color: Option<String>,
    pub agent: String,
    pub provider: String,
    pub bottles: Vec<String>,
    pub cwd: PathBuf,
    pub copy_cwd: bool,
    pub backend: String,
    /// The image the bottle was created from (content-hash tag).
    pub image: String,
    /// The image `freeze` committed, which `resume` starts from.
    #[serde(default)]
    pub frozen_image: Option<String>,
    #[serde(default)]
    pub container_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub status: Status,
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// How many times an agent session ran in this bottle (1 after start).
    #[serde(default)]
    pub sessions: u32,
    /// Why the bottle was frozen on an alert (`on_alert: freeze`), until it is resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<String>,
}

/// One bottle's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BottleDir {
    slug: String,
    dir: PathBuf,
}

impl BottleDir {
    #[must_use]
    pub fn slug(&self) -> &str {
        &self.slug
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }

    #[must_use]
    pub fn metadata_path(&self) -> PathBuf {
        self.dir.join("metadata.json")
    }

    /// Unix sockets of the gateway and sidecars; bind-mounted at `/run/bot-bottle`.
    #[must_use]
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    #[must_use]
    pub fn egress_log(&self) -> PathBuf {
        self.dir.join("egress.jsonl")
    }

    #[must_use]
    pub fn preserve_marker(&self) -> PathBuf {
        self.dir.join("preserve")
    }

    #[must_use]
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    pub fn create(&self) -> Result<(), StateError> {
        create_private_dir(&self.dir)?;
        // The bottle's user connects to sockets in here through the bind mount, so the
        // directory itself must be traversable; the parent (0700) keeps others out.
        let run = self.run_dir();
        fs_err::create_dir_all(&run).map_err(io(&run))?;
        use std::os::unix::fs::PermissionsExt;
        fs_err::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).map_err(io(&run))
    }

    pub fn read_metadata(&self) -> Result<Option<Metadata>, StateError> {
        let path = self.metadata_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|err| StateError::Corrupt {
                path,
                slug: self.slug.clone(),
                message: err.to_string(),
            })
    }

    pub fn write_metadata(&self, metadata: &Metadata) -> Result<(), StateError> {
        let mut json = serde_json::to_vec_pretty(metadata).map_err(|err| StateError::Corrupt {
            path: self.metadata_path(),
            slug: self.slug.clone(),
            message: err.to_string(),
        })?;
        json.push(b'\n');
        write_atomic(&self.metadata_path(), &json, 0o600)
    }

    #[must_use]
    pub fn is_preserved(&self) -> bool {
        self.preserve_marker().exists()
    }

    pub fn mark_preserved(&self) -> Result<(), StateError> {
        write_atomic(&self.preserve_marker(), b"", 0o600)
    }

    /// Removes the whole state directory. A missing directory is not an error.
    pub fn remove(&self) -> Result<(), StateError> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io {
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(identity: &str) -> Metadata {
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        Metadata {
            identity: identity.to_owned(),
            label: "impl".to_owned(),
            label_slug: "impl".to_owned(),
            color: None,
            agent: "impl".to_owned(),
            provider: "claude".to_owned(),
            bottles: vec!["dev".to_owned()],
            cwd: PathBuf::from("/w"),
            copy_cwd: false,
            backend: "docker".to_owned(),
            image: "bot-bottle/bottle:abc".to_owned(),
            frozen_image: None,
            container_id: None,
            created_at: at,
            updated_at: at,
            status: Status::Running,
            exit_code: None,
            sessions: 1,
            alert: None,
        }
    }

    #[test]
    fn metadata_round_trips_and_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path());
        home.ensure().unwrap();
        let bottle = home.bottle("impl-abcde").unwrap();
        assert_eq!(bottle.read_metadata().unwrap(), None);
        bottle.create().unwrap();
        bottle.write_metadata(&sample("impl-abcde")).unwrap();
        assert_eq!(bottle.read_metadata().unwrap(), Some(sample("impl-abcde")));
        assert_eq!(home.list().unwrap(), vec![sample("impl-abcde")]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(bottle.metadata_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn remove_is_idempotent_and_preserve_marker_works() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path());
        let bottle = home.bottle("x-12345").unwrap();
        bottle.create().unwrap();
        assert!(!bottle.is_preserved());
        bottle.mark_preserved().unwrap();
        assert!(bottle.is_preserved());
        bottle.remove().unwrap();
        bottle.remove().unwrap();
        assert!(!bottle.exists());
    }

    #[test]
    fn bad_slug_cannot_escape_state() {
        let home = Home::new("/h");
        assert!(matches!(
            home.bottle("../../etc"),
            Err(StateError::BadSlug { .. })
        ));
    }

    #[test]
    fn corrupt_metadata_is_an_error_with_hint() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path());
        let bottle = home.bottle("x-12345").unwrap();
        bottle.create().unwrap();
        std::fs::write(bottle.metadata_path(), "{").unwrap();
        let err = bottle.read_metadata().unwrap_err().to_string();
        assert!(err.contains("hint: "), "{err}");
    }
}
