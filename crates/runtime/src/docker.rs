//! The Docker backend, through the Docker Engine API (bollard). Podman's compatible
//! socket works through `DOCKER_HOST`.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use bollard::Docker;
use bollard::container::{AttachContainerResults, LogOutput};
use bollard::errors::Error as BollardError;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    AttachContainerOptions, BuildImageOptions, CommitContainerOptions, CreateContainerOptions,
    CreateImageOptions, ListContainersOptions, ListImagesOptions, RemoveContainerOptions,
    RemoveImageOptions, ResizeContainerTTYOptions, StopContainerOptions, UploadToContainerOptions,
    WaitContainerOptions,
};
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

use crate::container::{LABEL_KIND, LABEL_MANAGED, LABEL_SLUG};
use crate::progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "cannot reach the Docker engine at {endpoint}\nhint: start it (`sudo systemctl start docker`, or `dockerd &`), or point `DOCKER_HOST` at a running engine"
    )]
    Unreachable {
        endpoint: String,
        #[source]
        source: BollardError,
    },
    #[error("docker: {action} failed: {message}")]
    Api { action: String, message: String },
    #[error(
        "building image `{tag}` failed: {message}\nhint: the build log above shows the failing step; network steps retry, so a repeat failure is not a flake"
    )]
    Build { tag: String, message: String },
    #[error(
        "`mmdebstrap` is not installed; it builds the base image from this host's Debian mirror\nhint: `sudo apt-get install mmdebstrap`"
    )]
    NoMmdebstrap,
    #[error(
        "building the base image with mmdebstrap failed (exit {code})\nhint: the output above names the failing package or mirror"
    )]
    Mmdebstrap { code: i32 },
    #[error("cannot access `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn api(action: &str) -> impl FnOnce(BollardError) -> DockerError + '_ {
    move |err| DockerError::Api {
        action: action.to_owned(),
        message: err.to_string(),
    }
}

/// True when `err` is the engine's 404.
fn is_not_found(err: &BollardError) -> bool {
    matches!(
        err,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// How long output still arriving after the container exited is copied.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);

/// Aborts a spawned task when dropped, so a pump never outlives its session.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connected engine.
#[derive(Clone)]
pub struct DockerEngine {
    docker: Docker,
}

/// A tar archive built in memory.
pub struct Archive {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for Archive {
    fn default() -> Self {
        Self::new()
    }
}

impl Archive {
    #[must_use]
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    /// Adds a file with the given owner and mode. `path` is relative to the
    /// extraction directory.
    pub fn file(
        &mut self,
        path: &str,
        contents: &[u8],
        uid: u64,
        mode: u32,
    ) -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(uid);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        self.builder
            .append_data(&mut header, path.trim_start_matches('/'), contents)
    }

    /// Adds a directory entry (so intermediate directories get the right owner).
    pub fn dir(&mut self, path: &str, uid: u64, mode: u32) -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(0);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(uid);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Directory);
        self.builder.append_data(
            &mut header,
            format!("{}/", path.trim_start_matches('/').trim_end_matches('/')),
            &[][..],
        )
    }

    /// Adds a host directory tree under `prefix`, owned by `uid`.
    pub fn tree(&mut self, host_dir: &Path, prefix: &str, uid: u64) -> std::io::Result<u64> {
        let mut bytes = 0;
        let mut stack = vec![(host_dir.to_owned(), prefix.trim_end_matches('/').to_owned())];
        while let Some((dir, inside)) = stack.pop() {
            if !inside.is_empty() {
                self.dir(&inside, uid, 0o755)?;
            }
            let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
            entries.sort_by_key(std::fs::DirEntry::file_name);
            for entry in entries {
                let kind = entry.file_type()?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let target = if inside.is_empty() {
                    name
                } else {
                    format!("{inside}/{name}")
                };
                if kind.is_dir() {
                    stack.push((entry.path(), target));
                } else if kind.is_file() {
                    use std::os::unix::fs::PermissionsExt;
                    let meta = entry.metadata()?;
                    let contents = std::fs::read(entry.path())?;
                    bytes += contents.len() as u64;
                    self.file(&target, &contents, uid, meta.permissions().mode() & 0o777)?;
                } else if kind.is_symlink() {
                    let link = std::fs::read_link(entry.path())?;
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    header.set_uid(uid);
                    header.set_gid(uid);
                    header.set_mode(0o777);
                    self.builder
                        .append_link(&mut header, target.trim_start_matches('/'), link)?;
                }
            }
        }
        Ok(bytes)
    }

    pub fn finish(self) -> std::io::Result<Vec<u8>> {
        self.builder.into_inner()
    }
}

/// What `ps` needs to know of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    pub id: String,
    pub slug: String,
    /// [`crate::container::KIND_BOTTLE`] or [`crate::container::KIND_TRIPWIRE`].
    pub kind: String,
    pub state: String,
}

impl DockerEngine {
    /// Connects to `DOCKER_HOST` or the local socket and negotiates the API version
    /// (the Debian engine speaks 1.41).
    pub async fn connect() -> Result<Self, DockerError> {
        let endpoint = std::env::var("DOCKER_HOST")
            .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned());
        let unreachable = |source| DockerError::Unreachable {
            endpoint: endpoint.clone(),
            source,
        };
        let docker = Docker::connect_with_local_defaults().map_err(unreachable)?;
        // Negotiating asks the engine for its version: that is the reachability check.
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        Ok(Self { docker })
    }

    pub async fn image_exists(&self, tag: &str) -> Result<bool, DockerError> {
        match self.docker.inspect_image(tag).await {
            Ok(_) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(err) => Err(api("inspect image")(err)),
        }
    }

    /// The engine's id (`sha256:…`) of an image, `None` when there is no such image.
    pub async fn image_id(&self, reference: &str) -> Result<Option<String>, DockerError> {
        match self.docker.inspect_image(reference).await {
            Ok(image) => Ok(image.id),
            Err(err) if is_not_found(&err) => Ok(None),
            Err(err) => Err(api("inspect image")(err)),
        }
    }

    /// Imports a root filesystem tarball as `tag` (the Engine API's `docker import`).
    pub async fn import_rootfs(
        &self,
        tarball: &Path,
        tag: &str,
        progress: &Progress,
    ) -> Result<(), DockerError> {
        let bytes = tokio::fs::read(tarball)
            .await
            .map_err(|source| DockerError::Io {
                path: tarball.to_owned(),
                source,
            })?;
        progress.step(&format!("importing base image ({} MiB)", bytes.len() >> 20));
        self.import_archive(bytes, tag, "base").await
    }

    /// Imports a root filesystem tar held in memory as `tag`, labelled with `kind`.
    pub async fn import_archive(
        &self,
        bytes: Vec<u8>,
        tag: &str,
        kind: &str,
    ) -> Result<(), DockerError> {
        let (repo, tag_part) = tag.rsplit_once(':').unwrap_or((tag, "latest"));
        let options = CreateImageOptions {
            from_src: Some("-".to_owned()),
            repo: Some(repo.to_owned()),
            tag: Some(tag_part.to_owned()),
            changes: vec![format!("LABEL {LABEL_MANAGED}=1 {LABEL_KIND}={kind}")],
            ..CreateImageOptions::default()
        };
        let mut stream =
            self.docker
                .create_image(Some(options), Some(bollard::body_full(bytes.into())), None);
        while let Some(item) = stream.next().await {
            item.map_err(|err| DockerError::Build {
                tag: tag.to_owned(),
                message: err.to_string(),
            })?;
        }
        Ok(())
    }

    /// Builds `tag` from an in-memory context, streaming the build log to `progress`.
    pub async fn build(
        &self,
        tag: &str,
        context: Vec<u8>,
        progress: &Progress,
    ) -> Result<(), DockerError> {
        let options = BuildImageOptions {
            dockerfile: "Dockerfile".to_owned(),
            t: Some(tag.to_owned()),
            rm: true,
            forcerm: true,
            labels: Some(HashMap::from([
                (LABEL_MANAGED.to_owned(), "1".to_owned()),
                (LABEL_KIND.to_owned(), "bottle-image".to_owned()),
            ])),
            ..BuildImageOptions::default()
        };
        let mut stream =
            self.docker
                .build_image(options, None, Some(bollard::body_full(context.into())));
        while let Some(item) = stream.next().await {
            let info = item.map_err(|err| DockerError::Build {
                tag: tag.to_owned(),
                message: err.to_string(),
            })?;
            if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                return Err(DockerError::Build {
                    tag: tag.to_owned(),
                    message: detail,
                });
            }
            if let Some(text) = info.stream {
                progress.build_line(&text);
            }
        }
        Ok(())
    }

    /// Creates the bottle's container. An old container of the same name (a crashed
    /// session) is replaced.
    pub async fn create(
        &self,
        name: &str,
        config: ContainerCreateBody,
    ) -> Result<String, DockerError> {
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..CreateContainerOptions::default()
        };
        let created = match self
            .docker
            .create_container(Some(options.clone()), config.clone())
            .await
        {
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                // The name is taken by a crashed session's container: replace it.
                self.remove_container(name).await?;
                self.docker.create_container(Some(options), config).await
            }
            other => other,
        }
        .map_err(api("create container"))?;
        Ok(created.id)
    }

    /// Extracts a tar archive into the container at `/`.
    pub async fn upload(&self, container: &str, archive: Vec<u8>) -> Result<(), DockerError> {
        let options = UploadToContainerOptions {
            path: "/".to_owned(),
            ..UploadToContainerOptions::default()
        };
        self.docker
            .upload_to_container(container, Some(options), bollard::body_full(archive.into()))
            .await
            .map_err(api("copy files into the bottle"))
    }

    /// Reads one file of an image, through a container that is created for it and removed
    /// again without ever starting.
    pub async fn read_image_file(
        &self,
        image: &str,
        path: &str,
    ) -> Result<Option<Vec<u8>>, DockerError> {
        let config = ContainerCreateBody {
            image: Some(image.to_owned()),
            // Never started; some images have no default command, and create wants one.
            cmd: Some(vec!["/nonexistent".to_owned()]),
            network_disabled: Some(true),
            labels: Some(HashMap::from([(LABEL_MANAGED.to_owned(), "1".to_owned())])),
            ..ContainerCreateBody::default()
        };
        let created = self
            .docker
            .create_container(None::<CreateContainerOptions>, config)
            .await
            .map_err(api("create a container to read the image"))?;
        let contents = self.read_file(&created.id, path).await;
        self.remove_container(&created.id).await?;
        contents
    }

    /// Reads one regular file out of a (created or stopped) container, or `None` when
    /// it does not exist.
    pub async fn read_file(
        &self,
        container: &str,
        path: &str,
    ) -> Result<Option<Vec<u8>>, DockerError> {
        let options = bollard::query_parameters::DownloadFromContainerOptions {
            path: path.to_owned(),
        };
        let mut stream = self
            .docker
            .download_from_container(container, Some(options));
        let mut archive = Vec::new();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => archive.extend_from_slice(&bytes),
                Err(err) if is_not_found(&err) => return Ok(None),
                Err(err) => return Err(api("copy a file out of the bottle")(err)),
            }
        }
        let io = |source| DockerError::Io {
            path: PathBuf::from(path),
            source,
        };
        let mut reader = tar::Archive::new(archive.as_slice());
        for entry in reader.entries().map_err(io)? {
            let mut entry = entry.map_err(io)?;
            if entry.header().entry_type().is_file() {
                let mut contents = Vec::new();
                std::io::Read::read_to_end(&mut entry, &mut contents).map_err(io)?;
                return Ok(Some(contents));
            }
        }
        Ok(None)
    }

    /// Runs a headless container to completion: output to this process's stdout and
    /// stderr, returns the exit code.
    pub async fn run_headless(
        &self,
        container: &str,
        stdout_to_stderr: bool,
    ) -> Result<i64, DockerError> {
        let attach = self.attach_and_start(container, false).await?;
        self.copy_output_until_exit(container, attach.output, |chunk| match chunk {
            LogOutput::StdErr { message } => {
                let _ = std::io::stderr().write_all(&message);
            }
            LogOutput::StdOut { message } | LogOutput::Console { message } if stdout_to_stderr => {
                let _ = std::io::stderr().write_all(&message);
            }
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                let mut stdout = std::io::stdout();
                let _ = stdout.write_all(&message);
                let _ = stdout.flush();
            }
            LogOutput::StdIn { .. } => {}
        })
        .await
    }

    /// Runs an interactive container attached to this terminal. Returns the exit code.
    pub async fn run_interactive(&self, container: &str) -> Result<i64, DockerError> {
        let attach = self.attach_and_start(container, true).await?;
        // Everything below is undone by drops, so the terminal comes back out of raw mode
        // and the pumps stop on every way out: the agent exiting, an engine error, or the
        // caller dropping this future when the gateway fails.
        let _raw = crate::terminal::RawMode::enable();
        self.resize_to_terminal(container).await;
        let mut stdin =
            crate::terminal::StdinReader::start().map_err(|source| DockerError::Io {
                path: PathBuf::from("/dev/stdin"),
                source,
            })?;
        let mut input = attach.input;
        let _stdin_pump = AbortOnDrop(tokio::spawn(async move {
            while let Some(bytes) = stdin.next().await {
                if input.write_all(&bytes).await.is_err() {
                    break;
                }
                let _ = input.flush().await;
            }
        }));
        let engine = self.clone();
        let resize_container = container.to_owned();
        let _resizer = AbortOnDrop(tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                engine.resize_to_terminal(&resize_container).await;
            }
        }));
        self.copy_output_until_exit(container, attach.output, |chunk| {
            let mut stdout = std::io::stdout();
            let _ = stdout.write_all(&chunk.into_bytes());
            let _ = stdout.flush();
        })
        .await
    }

    /// Starts a created container without attaching (the tripwire, which reports over
    /// its socket, not its output).
    pub async fn start(&self, container: &str) -> Result<(), DockerError> {
        self.docker
            .start_container(
                container,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(api("start container"))
    }

    /// The last lines a container wrote, for an error message.
    pub async fn output_tail(&self, container: &str) -> String {
        let options = bollard::query_parameters::LogsOptions {
            stdout: true,
            stderr: true,
            tail: "20".to_owned(),
            ..bollard::query_parameters::LogsOptions::default()
        };
        let mut stream = self.docker.logs(container, Some(options));
        let mut text = String::new();
        while let Some(Ok(chunk)) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        text.trim().to_owned()
    }

    /// Attaches to a created container, then starts it: attaching first is what makes
    /// the agent's first bytes of output arrive.
    async fn attach_and_start(
        &self,
        container: &str,
        stdin: bool,
    ) -> Result<AttachContainerResults, DockerError> {
        let attach = self
            .docker
            .attach_container(
                container,
                Some(AttachContainerOptions {
                    stream: true,
                    stdin,
                    stdout: true,
                    stderr: true,
                    logs: true,
                    ..AttachContainerOptions::default()
                }),
            )
            .await
            .map_err(api("attach"))?;
        self.docker
            .start_container(
                container,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(api("start container"))?;
        Ok(attach)
    }

    /// Hands the container's output to `write` until the container exits, and returns
    /// its exit code. The exit decides, not the end of the stream: an attach stream can
    /// outlive the container (a detached process holding the TTY open), and must not
    /// keep the launch waiting.
    async fn copy_output_until_exit(
        &self,
        container: &str,
        mut output: Pin<Box<dyn Stream<Item = Result<LogOutput, BollardError>> + Send>>,
        mut write: impl FnMut(LogOutput),
    ) -> Result<i64, DockerError> {
        let exited = self.wait(container);
        tokio::pin!(exited);
        loop {
            tokio::select! {
                chunk = output.next() => match chunk {
                    Some(Ok(chunk)) => write(chunk),
                    Some(Err(_)) | None => return exited.await,
                },
                code = &mut exited => {
                    // What the engine still holds arrives right behind the exit.
                    let drain = async {
                        while let Some(Ok(chunk)) = output.next().await {
                            write(chunk);
                        }
                    };
                    let _ = tokio::time::timeout(OUTPUT_DRAIN, drain).await;
                    return code;
                }
            }
        }
    }

    async fn resize_to_terminal(&self, container: &str) {
        if let Some((width, height)) = crate::terminal::size() {
            let _ = self
                .docker
                .resize_container_tty(
                    container,
                    ResizeContainerTTYOptions {
                        h: i32::from(height),
                        w: i32::from(width),
                    },
                )
                .await;
        }
    }

    async fn wait(&self, container: &str) -> Result<i64, DockerError> {
        let mut waits = self
            .docker
            .wait_container(container, None::<WaitContainerOptions>);
        match waits.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            // bollard reports a nonzero exit as an error that carries the code.
            Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(err)) => Err(api("wait for container")(err)),
            None => Err(DockerError::Api {
                action: "wait for container".to_owned(),
                message: "the engine closed the wait stream".to_owned(),
            }),
        }
    }

    pub async fn stop(&self, container: &str) -> Result<(), DockerError> {
        match self
            .docker
            .stop_container(
                container,
                Some(StopContainerOptions {
                    t: Some(5),
                    ..StopContainerOptions::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(err) if is_not_found(&err) => Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(err) => Err(api("stop container")(err)),
        }
    }

    /// Removes a container if it exists.
    pub async fn remove_container(&self, container: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..RemoveContainerOptions::default()
        };
        match self.docker.remove_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            Err(err) if is_not_found(&err) => Ok(()),
            // Forced removal conflicts only with a removal already under way (a tripwire
            // Docker removes by itself once it exits).
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(err) => Err(api("remove container")(err)),
        }
    }

    /// Commits a container to `repo:tag`, labelled with the slug so destroy finds it.
    pub async fn commit(
        &self,
        container: &str,
        repo: &str,
        tag: &str,
        slug: &str,
    ) -> Result<String, DockerError> {
        let options = CommitContainerOptions {
            container: Some(container.to_owned()),
            repo: Some(repo.to_owned()),
            tag: Some(tag.to_owned()),
            pause: true,
            comment: Some(format!("bot-bottle freeze of {slug}")),
            changes: Some(format!(
                "LABEL {LABEL_SLUG}={slug} {LABEL_KIND}=frozen {LABEL_MANAGED}=1"
            )),
            ..CommitContainerOptions::default()
        };
        let id = self
            .docker
            .commit_container(options, bollard::models::ContainerConfig::default())
            .await
            .map_err(api("commit container"))?;
        Ok(id.id)
    }

    pub async fn remove_image(&self, image: &str) -> Result<(), DockerError> {
        let options = RemoveImageOptions {
            force: true,
            ..RemoveImageOptions::default()
        };
        match self.docker.remove_image(image, Some(options), None).await {
            Ok(_) => Ok(()),
            Err(err) if is_not_found(&err) => Ok(()),
            Err(err) => Err(api("remove image")(err)),
        }
    }

    /// Every bot-bottle container (any state), optionally for one slug.
    pub async fn containers(
        &self,
        slug: Option<&str>,
    ) -> Result<Vec<ContainerSummary>, DockerError> {
        let mut labels = vec![format!("{LABEL_MANAGED}=1")];
        if let Some(slug) = slug {
            labels.push(format!("{LABEL_SLUG}={slug}"));
        }
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_owned(), labels)])),
            ..ListContainersOptions::default()
        };
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(api("list containers"))?;
        Ok(list
            .into_iter()
            .map(|c| {
                let mut labels = c.labels.unwrap_or_default();
                ContainerSummary {
                    id: c.id.unwrap_or_default(),
                    slug: labels.remove(LABEL_SLUG).unwrap_or_default(),
                    kind: labels.remove(LABEL_KIND).unwrap_or_default(),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                }
            })
            .collect())
    }

    /// Image ids of frozen images of one slug.
    pub async fn frozen_images(&self, slug: &str) -> Result<Vec<String>, DockerError> {
        let options = ListImagesOptions {
            filters: Some(HashMap::from([(
                "label".to_owned(),
                vec![
                    format!("{LABEL_SLUG}={slug}"),
                    format!("{LABEL_KIND}=frozen"),
                ],
            )])),
            ..ListImagesOptions::default()
        };
        let list = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(api("list images"))?;
        Ok(list.into_iter().map(|image| image.id).collect())
    }
}
