//! Images without a registry (DESIGN.md §7).
//!
//! - The base image is a Debian trixie root filesystem built on the host by
//!   `mmdebstrap` from the host's own apt mirror, imported through the Engine API and
//!   tagged by a content hash of its recipe.
//! - The bottle image is `FROM` the base (or the user's Dockerfile) plus the agent user
//!   and the provider's CLI, tagged by a content hash of its Dockerfile.
//! - Builds trust the host's extra CA certificates (an intercepting corporate proxy
//!   then works). That trust is removed again before the build ends: at run time a
//!   bottle trusts only the system store and its own gateway CA.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use bot_bottle_core::plan::{BASE_PACKAGES, BASE_SUITE, ImagePlan, base_image_tag};

use crate::docker::{Archive, DockerEngine, DockerError};
use crate::progress::Progress;

/// Where the host keeps extra CA certificates (`update-ca-certificates` reads them).
pub const HOST_EXTRA_CA_DIR: &str = "/usr/local/share/ca-certificates";

/// Whether image builds trust the host's extra CAs. Default: yes when the host has
/// any. `BOT_BOTTLE_BUILD_TRUST_HOST_CA=0` turns it off.
#[must_use]
pub fn build_trusts_host_cas() -> bool {
    std::env::var("BOT_BOTTLE_BUILD_TRUST_HOST_CA").map_or(true, |v| v != "0" && v != "false")
}

/// Every `*.crt` under the host's extra CA directory, sorted.
#[must_use]
pub fn host_extra_cas(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|ext| ext == "crt") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The first Debian mirror in the host's apt sources, else deb.debian.org.
#[must_use]
pub fn host_debian_mirror() -> String {
    let mut texts = Vec::new();
    for dir in ["/etc/apt/sources.list.d"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for path in paths {
                let is_source = path
                    .extension()
                    .is_some_and(|ext| ext == "sources" || ext == "list");
                if is_source && let Ok(text) = std::fs::read_to_string(&path) {
                    texts.push(text);
                }
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push(text);
    }
    mirror_from_sources(&texts).unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// Finds a main-archive mirror URL (not the security archive) in apt sources text,
/// in either the deb822 `URIs:` or the one-line `deb URL suite` format.
#[must_use]
pub fn mirror_from_sources(texts: &[String]) -> Option<String> {
    for text in texts {
        for line in text.lines().map(str::trim) {
            let url = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|word| word.contains("://"))
            } else {
                None
            };
            if let Some(url) = url
                && url.contains("://")
                && !url.contains("security")
            {
                return Some(url.trim_end_matches('/').to_owned());
            }
        }
    }
    None
}

/// Serializes image builds across processes: two launches of the same new image wait
/// for one build instead of racing two.
struct BuildLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl BuildLock {
    fn acquire(progress: &Progress) -> Result<Self, DockerError> {
        let path = std::env::temp_dir().join("bot-bottle-image-build.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| DockerError::Io {
                path: path.clone(),
                source,
            })?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _file: lock }),
            Err((file, _)) => {
                progress.step("waiting for another image build to finish");
                let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, errno)| DockerError::Io {
                        path,
                        source: std::io::Error::from(errno),
                    })?;
                Ok(Self { _file: lock })
            }
        }
    }
}

/// Makes sure the base image exists, building it with mmdebstrap if not.
pub async fn ensure_base_image(
    engine: &DockerEngine,
    progress: &Progress,
) -> Result<String, DockerError> {
    let tag = base_image_tag();
    if engine.image_exists(&tag).await? {
        return Ok(tag);
    }
    let _lock = BuildLock::acquire(progress)?;
    if engine.image_exists(&tag).await? {
        return Ok(tag);
    }
    let mirror = host_debian_mirror();
    progress.step(&format!(
        "building base image {tag}: Debian {BASE_SUITE} from {mirror} (about a minute, once)"
    ));
    let work = tempfile_dir()?;
    let tarball = work.join("rootfs.tar");
    // apt retries single downloads; a whole run can still fail on a flaky mirror, so the
    // run is retried too, with a pause, before the launch gives up.
    const ATTEMPTS: u32 = 3;
    let mut attempt = 1;
    loop {
        let status = tokio::process::Command::new("mmdebstrap")
            .arg("--variant=apt")
            .arg(format!("--include={}", BASE_PACKAGES.join(",")))
            .arg("--aptopt=Acquire::Retries \"5\"")
            .arg("--aptopt=Acquire::http::Timeout \"60\"")
            .arg(BASE_SUITE)
            .arg(&tarball)
            .arg(&mirror)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .status();
        // A hung mirror must not hang the launch: 15 minutes is ten times a slow build.
        let status = match tokio::time::timeout(std::time::Duration::from_secs(900), status).await {
            Ok(Ok(status)) => status,
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(DockerError::NoMmdebstrap);
            }
            Ok(Err(source)) => {
                return Err(DockerError::Io {
                    path: PathBuf::from("mmdebstrap"),
                    source,
                });
            }
            Err(_) => {
                progress.step("mmdebstrap took longer than 15 minutes; stopped it");
                std::process::ExitStatus::from_raw(124 << 8)
            }
        };
        if status.success() {
            break;
        }
        if attempt == ATTEMPTS {
            let _ = std::fs::remove_dir_all(&work);
            return Err(DockerError::Mmdebstrap {
                code: status.code().unwrap_or(-1),
            });
        }
        progress.step(&format!(
            "mmdebstrap failed (exit {}), attempt {attempt} of {ATTEMPTS}; retrying",
            status.code().unwrap_or(-1)
        ));
        tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt) * 10)).await;
        attempt += 1;
    }
    let imported = engine.import_rootfs(&tarball, &tag, progress).await;
    let _ = std::fs::remove_dir_all(&work);
    imported?;
    progress.step(&format!("base image {tag} ready"));
    Ok(tag)
}

fn tempfile_dir() -> Result<PathBuf, DockerError> {
    let dir = std::env::temp_dir().join(format!("bot-bottle-build-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| DockerError::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// Inserts build-only CA trust after the last `FROM` and removes it at the end.
/// `ARG` (not `ENV`) keeps `NODE_EXTRA_CA_CERTS` out of the image's config.
#[must_use]
pub fn with_build_ca_trust(dockerfile: &str, uid_after: Option<&str>) -> String {
    let lines: Vec<&str> = dockerfile.lines().collect();
    let last_from = lines
        .iter()
        .rposition(|line| line.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .unwrap_or(0);
    let mut out = String::new();
    for (index, line) in lines.iter().enumerate() {
        out.push_str(line);
        out.push('\n');
        if index == last_from {
            out.push_str("USER root\n");
            out.push_str("COPY build-ca/ /usr/local/share/ca-certificates/bot-bottle-build/\n");
            out.push_str("RUN update-ca-certificates >/dev/null\n");
            out.push_str("ARG NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt\n");
        }
    }
    out.push_str("USER root\n");
    out.push_str("RUN rm -rf /usr/local/share/ca-certificates/bot-bottle-build && update-ca-certificates --fresh >/dev/null\n");
    if let Some(user) = uid_after {
        out.push_str(&format!("USER {user}\n"));
    }
    out
}

/// Makes sure the bottle image exists, building it if not. Returns its tag.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DockerError + use<> {
    let path = path.to_owned();
    move |source| DockerError::Io { path, source }
}

/// The tripwire's image: empty but for the directories its mounts land on. The tripwire
/// runs as root, so it never runs in a rootfs the agent could have touched (a frozen
/// image is one); its only program is the static binary mounted from the host.
pub const TRIPWIRE_IMAGE: &str = "bot-bottle/tripwire:1";

/// Imports [`TRIPWIRE_IMAGE`] once.
pub async fn ensure_tripwire_image(engine: &DockerEngine) -> Result<String, DockerError> {
    if engine.image_exists(TRIPWIRE_IMAGE).await? {
        return Ok(TRIPWIRE_IMAGE.to_owned());
    }
    let mut archive = Archive::new();
    for dir in [
        "dev",
        "proc",
        "sys",
        "etc",
        "opt",
        "opt/bot-bottle",
        "run",
        "tmp",
    ] {
        archive.dir(dir, 0, 0o755).map_err(io(Path::new(dir)))?;
    }
    let bytes = archive.finish().map_err(io(Path::new("tripwire image")))?;
    engine
        .import_archive(bytes, TRIPWIRE_IMAGE, "tripwire-image")
        .await?;
    Ok(TRIPWIRE_IMAGE.to_owned())
}

pub async fn ensure_bottle_image(
    engine: &DockerEngine,
    image: &ImagePlan,
    agent_uid: u32,
    dockerfile_dir: Option<&Path>,
    progress: &Progress,
) -> Result<String, DockerError> {
    if let Some(frozen) = &image.resume_from {
        return Ok(frozen.clone());
    }
    if engine.image_exists(&image.tag).await? {
        return Ok(image.tag.clone());
    }
    if image.base.is_some() {
        ensure_base_image(engine, progress).await?;
    }
    let _lock = BuildLock::acquire(progress)?;
    if engine.image_exists(&image.tag).await? {
        return Ok(image.tag.clone());
    }
    progress.step(&format!("building bottle image {}", image.tag));
    let cas = if build_trusts_host_cas() {
        host_extra_cas(Path::new(HOST_EXTRA_CA_DIR))
    } else {
        Vec::new()
    };
    let mut archive = Archive::new();
    // A user Dockerfile may COPY from its own directory: send that as the context.
    if let Some(dir) = dockerfile_dir {
        archive.tree(dir, "", 0).map_err(io(dir))?;
    }
    let dockerfile = if cas.is_empty() {
        image.dockerfile.clone()
    } else {
        progress.step(&format!(
            "the build trusts {} extra CA certificate(s) of this host",
            cas.len()
        ));
        archive
            .dir("build-ca", 0, 0o755)
            .map_err(io(Path::new("build-ca")))?;
        for (index, ca) in cas.iter().enumerate() {
            let pem = std::fs::read(ca).map_err(io(ca))?;
            archive
                .file(&format!("build-ca/host-{index}.crt"), &pem, 0, 0o644)
                .map_err(io(ca))?;
        }
        with_build_ca_trust(&image.dockerfile, Some(&agent_uid.to_string()))
    };
    archive
        .file("Dockerfile", dockerfile.as_bytes(), 0, 0o644)
        .map_err(io(Path::new("Dockerfile")))?;
    let context = archive.finish().map_err(io(Path::new("build context")))?;
    engine.build(&image.tag, context, progress).await?;
    progress.step(&format!("bottle image {} ready", image.tag));
    Ok(image.tag.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_and_one_line_sources() {
        let deb822 =
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n".to_owned();
        assert_eq!(
            mirror_from_sources(&[deb822]).as_deref(),
            Some("http://mirror.example/debian")
        );
        let security = "URIs: http://deb.debian.org/debian-security\n".to_owned();
        let line = "deb [arch=amd64] http://ftp.example/debian/ bookworm main\n".to_owned();
        assert_eq!(
            mirror_from_sources(&[security, line]).as_deref(),
            Some("http://ftp.example/debian")
        );
    }

    #[test]
    fn build_ca_trust_is_inserted_after_last_from_and_removed_at_the_end() {
        let out = with_build_ca_trust("FROM a AS b\nRUN x\nFROM c\nRUN npm i\n", Some("1000"));
        let expected = "FROM a AS b\nRUN x\nFROM c\nUSER root\nCOPY build-ca/ /usr/local/share/ca-certificates/bot-bottle-build/\nRUN update-ca-certificates >/dev/null\nARG NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt\nRUN npm i\nUSER root\nRUN rm -rf /usr/local/share/ca-certificates/bot-bottle-build && update-ca-certificates --fresh >/dev/null\nUSER 1000\n";
        assert_eq!(out, expected);
    }
}
