//! Trust in a project's manifests.
//!
//! Project manifests (the nearest `.bot-bottle/` above the working directory) decide a
//! bottle's egress policy, its mounts, and its credentials, whose `command` sources run
//! on the host. They live in a working tree, which the previous bottle could write and a
//! cloned repository brings with it. So, like `direnv allow`, a project's manifests are
//! used only once the user has trusted their exact content: the digest of every manifest
//! file and every Dockerfile a project bottle names is kept in
//! `$BOT_BOTTLE_HOME/trusted-manifests.json`, and any change needs trusting again. The
//! home's own manifests (`~/.bot-bottle/`) are the user's, and always trusted.

use std::collections::BTreeMap;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::manifest::{Catalog, Origin};
use crate::state::{Home, StateError, write_atomic};

/// The project root a catalog read, with the digest of what it read there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectManifests {
    pub root: PathBuf,
    pub digest: String,
}

/// The digest of a catalog's project manifests, or `None` when it has none.
///
/// # Errors
/// A manifest or Dockerfile that cannot be read.
pub fn project_manifests(catalog: &Catalog) -> Result<Option<ProjectManifests>, StateError> {
    let Some((root, _)) = catalog
        .roots
        .iter()
        .find(|(_, origin)| *origin == Origin::Project)
    else {
        return Ok(None);
    };
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in ["agents", "bottles"] {
        let path = root.join(dir);
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(StateError::Io { path, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| StateError::Io {
                path: path.clone(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            files.insert(format!("{dir}/{name}"), entry.path());
        }
    }
    for (bottle, origin) in catalog.bottles.values() {
        if *origin == Origin::Project
            && let Some(dockerfile) = &bottle.front.image.dockerfile
        {
            files.insert(
                format!("dockerfile:{}", dockerfile.display()),
                dockerfile.clone(),
            );
        }
    }
    let mut hash = Sha256::new();
    for (name, path) in &files {
        let content = match std::fs::read(path) {
            Ok(content) => content,
            // A directory in `agents/` is not a manifest; the catalog skipped it too.
            Err(_) if path.is_dir() => continue,
            Err(source) => {
                return Err(StateError::Io {
                    path: path.clone(),
                    source,
                });
            }
        };
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update((content.len() as u64).to_be_bytes());
        hash.update(&content);
    }
    Ok(Some(ProjectManifests {
        root: root.canonicalize().unwrap_or_else(|_| root.clone()),
        digest: hex::encode(hash.finalize()),
    }))
}

/// `$BOT_BOTTLE_HOME/trusted-manifests.json`: project root → trusted digest.
#[derive(Debug, Clone)]
pub struct TrustStore {
    path: PathBuf,
}

impl TrustStore {
    #[must_use]
    pub fn new(home: &Home) -> Self {
        TrustStore {
            path: home.root().join("trusted-manifests.json"),
        }
    }

    fn load(&self) -> Result<BTreeMap<PathBuf, String>, StateError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|err| StateError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, err),
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(StateError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Whether this exact content of the project's manifests was trusted.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn is_trusted(&self, project: &ProjectManifests) -> Result<bool, StateError> {
        Ok(self.load()?.get(&project.root) == Some(&project.digest))
    }

    /// Records the project's manifests as trusted (replacing an older digest).
    ///
    /// # Errors
    /// The store cannot be read or written.
    pub fn trust(&self, project: &ProjectManifests) -> Result<(), StateError> {
        let mut all = self.load()?;
        all.insert(project.root.clone(), project.digest.clone());
        let text = serde_json::to_vec_pretty(&all).map_err(|err| StateError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(err),
        })?;
        if let Some(dir) = self.path.parent() {
            crate::state::create_private_dir(dir)?;
        }
        write_atomic(&self.path, &text, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn project(dir: &Path, bottle: &str) -> Catalog {
        std::fs::create_dir_all(dir.join(".bot-bottle/agents")).unwrap();
        std::fs::create_dir_all(dir.join(".bot-bottle/bottles")).unwrap();
        std::fs::write(
            dir.join(".bot-bottle/agents/a.md"),
            "---\nprovider: claude\nbottles: b\n---\n",
        )
        .unwrap();
        std::fs::write(dir.join(".bot-bottle/bottles/b.md"), bottle).unwrap();
        Catalog::resolve(dir, &dir.join("no-home")).unwrap()
    }

    #[test]
    fn any_change_to_the_manifests_needs_trusting_again() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().join("home"));
        let store = TrustStore::new(&home);
        let work = tmp.path().join("work");
        let first = project_manifests(&project(&work, "---\negress: {rules: []}\n---\n"))
            .unwrap()
            .unwrap();
        assert!(!store.is_trusted(&first).unwrap());
        store.trust(&first).unwrap();
        assert!(store.is_trusted(&first).unwrap());
        let widened = project_manifests(&project(
            &work,
            "---\negress: {rules: [{host: evil.example}]}\n---\n",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(widened.root, first.root);
        assert_ne!(widened.digest, first.digest);
        assert!(!store.is_trusted(&widened).unwrap());
        // A new file is a change too.
        std::fs::write(
            work.join(".bot-bottle/agents/c.md"),
            "---\nprovider: pi\n---\n",
        )
        .unwrap();
        let catalog = Catalog::resolve(&work, &tmp.path().join("no-home")).unwrap();
        assert_ne!(
            project_manifests(&catalog).unwrap().unwrap().digest,
            widened.digest
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join("home/trusted-manifests.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn no_project_root_needs_no_trust() {
        let tmp = tempfile::tempdir().unwrap();
        let catalog = Catalog::resolve(tmp.path(), &tmp.path().join("no-home")).unwrap();
        assert_eq!(project_manifests(&catalog).unwrap(), None);
    }
}
