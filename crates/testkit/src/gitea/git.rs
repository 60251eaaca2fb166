//! Git smart HTTP, served by the real `git http-backend` (run as a CGI program) and
//! authenticated as Gitea authenticates it (`services/auth/basic.go`,
//! `services/auth/oauth2.go`, `routers/web/repo/githttp.go`), plus the plumbing that
//! creates and inspects the bare repositories.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::AsyncWriteExt;

use super::FakeGiteaError;

/// The largest request body a git request may carry (a push of a small test repo is
/// far below it).
pub(super) const MAX_GIT_BODY: usize = 64 * 1024 * 1024;

/// How long one `git http-backend` run may take.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Author and committer of the initial commit, with a fixed date so that its id is the
/// same on every run.
const IDENTITY: [(&str, &str); 6] = [
    ("GIT_AUTHOR_NAME", "Fake Gitea"),
    ("GIT_AUTHOR_EMAIL", "gitea@example.invalid"),
    ("GIT_AUTHOR_DATE", "1767225600 +0000"),
    ("GIT_COMMITTER_NAME", "Fake Gitea"),
    ("GIT_COMMITTER_EMAIL", "gitea@example.invalid"),
    ("GIT_COMMITTER_DATE", "1767225600 +0000"),
];

/// One git request the fake answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRequest {
    pub method: String,
    /// Path and query, e.g. `/acme/widget.git/info/refs?service=git-receive-pack`.
    pub path: String,
    /// The user the credentials belong to; `None` when they were missing or wrong.
    pub user: Option<String>,
    pub status: u16,
}

/// The one user (and token) the git endpoints accept.
#[derive(Debug, Clone)]
pub(super) struct GitCredentials {
    pub username: String,
    pub token: String,
}

/// Which smart HTTP endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Service {
    InfoRefs,
    UploadPack,
    ReceivePack,
}

impl Service {
    fn path_suffix(self) -> &'static str {
        match self {
            Self::InfoRefs => "info/refs",
            Self::UploadPack => "git-upload-pack",
            Self::ReceivePack => "git-receive-pack",
        }
    }
}

/// The user an `Authorization` header authenticates, as Gitea decides it:
///
/// - `Basic base64(user:password)`: the password is the token, whatever the user name;
///   when the password is empty or `x-oauth-basic`, the user name is the token;
/// - `token <t>` or `Bearer <t>`.
///
/// The user is always the token's owner, never the name the client sent. Gitea would
/// also try a real password; the fake has none.
pub(super) fn authenticate(
    credentials: Option<&GitCredentials>,
    authorization: Option<&HeaderValue>,
) -> Option<String> {
    let credentials = credentials?;
    let value = authorization?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    let token = if scheme.eq_ignore_ascii_case("basic") {
        let decoded = String::from_utf8(BASE64.decode(rest).ok()?).ok()?;
        let (user, password) = decoded.split_once(':')?;
        if password.is_empty() || password == "x-oauth-basic" {
            user.to_owned()
        } else {
            password.to_owned()
        }
    } else if scheme == "token" || scheme.eq_ignore_ascii_case("bearer") {
        rest.to_owned()
    } else {
        return None;
    };
    (!token.is_empty() && token == credentials.token).then(|| credentials.username.clone())
}

/// Gitea's answer to a request without (valid) credentials.
pub(super) fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, r#"Basic realm="Gitea""#)],
        "Unauthorized\n",
    )
        .into_response()
}

pub(super) fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

/// Whether a `Git-Protocol` header is safe to pass on (Gitea's `safeGitProtocolHeader`:
/// `key=value` pairs of ASCII letters and digits, joined by `:`).
fn safe_git_protocol(value: &str) -> bool {
    !value.is_empty()
        && value.split(':').all(|pair| {
            pair.split_once('=').is_some_and(|(key, val)| {
                !key.is_empty()
                    && !val.is_empty()
                    && key.bytes().all(|b| b.is_ascii_alphanumeric())
                    && val.bytes().all(|b| b.is_ascii_alphanumeric())
            })
        })
}

/// Everything one `git http-backend` run needs.
pub(super) struct BackendRun {
    pub home: PathBuf,
    pub project_root: PathBuf,
    pub owner: String,
    pub repo: String,
    pub service: Service,
    pub user: String,
    pub peer: SocketAddr,
}

/// Runs `git http-backend` for one request and turns its CGI output into a response.
pub(super) async fn run_backend(run: BackendRun, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let header_text = |name: &HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let content_type = header_text(&header::CONTENT_TYPE);
    if run.service != Service::InfoRefs {
        // Gitea refuses a mismatched content type with 401 (`serviceRPC`).
        let expected = format!("application/x-{}-request", run.service.path_suffix());
        if content_type != expected {
            return StatusCode::UNAUTHORIZED.into_response();
        }
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_GIT_BODY).await else {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than the fake Gitea accepts\n",
        );
    };
    let mut env = base_env(&run.home);
    let mut set = |name: &str, value: String| env.push((name.into(), value.into()));
    set("GATEWAY_INTERFACE", "CGI/1.1".to_owned());
    set(
        "GIT_PROJECT_ROOT",
        run.project_root.to_string_lossy().into_owned(),
    );
    set("GIT_HTTP_EXPORT_ALL", "1".to_owned());
    set(
        "PATH_INFO",
        format!(
            "/{}/{}.git/{}",
            run.owner,
            run.repo,
            run.service.path_suffix()
        ),
    );
    set(
        "QUERY_STRING",
        parts.uri.query().unwrap_or_default().to_owned(),
    );
    set("REQUEST_METHOD", parts.method.as_str().to_owned());
    set("CONTENT_TYPE", content_type);
    if !body.is_empty() || run.service != Service::InfoRefs {
        set("CONTENT_LENGTH", body.len().to_string());
    }
    set("REMOTE_USER", run.user.clone());
    set("REMOTE_ADDR", run.peer.ip().to_string());
    // http-backend inflates a gzip body itself when told the encoding.
    let encoding = header_text(&header::CONTENT_ENCODING);
    if !encoding.is_empty() {
        set("HTTP_CONTENT_ENCODING", encoding);
    }
    let protocol = header_text(&HeaderName::from_static("git-protocol"));
    if safe_git_protocol(&protocol) {
        set("HTTP_GIT_PROTOCOL", protocol);
    }
    match tokio::time::timeout(BACKEND_TIMEOUT, backend(env, body)).await {
        Ok(Ok(output)) if !output.stdout.is_empty() => cgi_response(&output.stdout),
        Ok(Ok(output)) => {
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("git http-backend wrote nothing: {stderr}\n"),
            )
                .into_response()
        }
        Ok(Err(error)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot run git http-backend: {error}\n"),
        )
            .into_response(),
        Err(_) => plain(
            StatusCode::GATEWAY_TIMEOUT,
            "git http-backend took too long\n",
        ),
    }
}

async fn backend(env: Vec<(OsString, OsString)>, body: Bytes) -> std::io::Result<Output> {
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdin = child.stdin.take();
    // Feed stdin while stdout is read, or a large body and a large answer deadlock.
    let feeder = tokio::spawn(async move {
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(&body).await;
        }
    });
    let output = child.wait_with_output().await;
    let _ = feeder.await;
    output
}

/// Splits CGI output into `Status:`, headers and body.
fn cgi_response(stdout: &[u8]) -> Response {
    let (head, body) = split_head(stdout);
    let mut status = StatusCode::OK;
    let mut headers = HeaderMap::new();
    for line in String::from_utf8_lossy(head).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            if let Some(code) = value
                .split_whitespace()
                .next()
                .and_then(|code| code.parse::<u16>().ok())
                .and_then(|code| StatusCode::from_u16(code).ok())
            {
                status = code;
            }
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    let mut response = Response::new(Body::from(body.to_vec()));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn split_head(stdout: &[u8]) -> (&[u8], &[u8]) {
    let crlf = stdout.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = stdout.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(c), Some(l)) if l < c => (&stdout[..l], &stdout[l + 2..]),
        (Some(c), _) => (&stdout[..c], &stdout[c + 4..]),
        (None, Some(l)) => (&stdout[..l], &stdout[l + 2..]),
        (None, None) => (stdout, &[]),
    }
}

/// The environment every git process of the fake starts from: `PATH` only, a private
/// home, and no system or global config, so the host's git settings cannot leak in.
fn base_env(home: &Path) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vec![
        ("HOME".into(), home.as_os_str().to_owned()),
        ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
        ("GIT_CONFIG_GLOBAL".into(), "/dev/null".into()),
        ("LC_ALL".into(), "C".into()),
    ];
    if let Some(path) = std::env::var_os("PATH") {
        env.push(("PATH".into(), path));
    }
    env
}

/// Runs `git` with `GIT_DIR=git_dir`; returns its output whatever the exit status.
fn run_git(
    home: &Path,
    git_dir: &Path,
    args: &[&str],
    input: Option<&[u8]>,
    extra_env: &[(&str, &str)],
) -> Result<Output, FakeGiteaError> {
    let mut command = std::process::Command::new("git");
    command
        .args(args)
        .env_clear()
        .envs(base_env(home))
        .env("GIT_DIR", git_dir)
        .envs(extra_env.iter().copied())
        .current_dir(home)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_error = |source| FakeGiteaError::GitSpawn { source };
    let mut child = command.spawn().map_err(spawn_error)?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(data).map_err(spawn_error)?;
    }
    child.wait_with_output().map_err(spawn_error)
}

/// Runs `git` and fails unless it exits 0; returns its trimmed stdout.
fn git(
    home: &Path,
    git_dir: &Path,
    args: &[&str],
    input: Option<&[u8]>,
    extra_env: &[(&str, &str)],
) -> Result<String, FakeGiteaError> {
    let output = run_git(home, git_dir, args, input, extra_env)?;
    if !output.status.success() {
        return Err(FakeGiteaError::Git {
            args: args.join(" "),
            dir: git_dir.to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Creates the bare repository `git_dir` with one commit on `main` holding `files`,
/// and lets authenticated users push to it.
pub(super) fn create_repo(
    home: &Path,
    git_dir: &Path,
    files: &[(&str, &str)],
) -> Result<(), FakeGiteaError> {
    let dir = git_dir.to_string_lossy().into_owned();
    git(
        home,
        git_dir,
        &[
            "init",
            "--quiet",
            "--bare",
            "--template=",
            "--initial-branch=main",
            &dir,
        ],
        None,
        &[],
    )?;
    git(
        home,
        git_dir,
        &["config", "http.receivepack", "true"],
        None,
        &[],
    )?;
    let index = git_dir.join("fake-gitea-initial-index");
    let index_env = index.to_string_lossy().into_owned();
    let with_index = [("GIT_INDEX_FILE", index_env.as_str())];
    for (path, content) in files {
        let blob = git(
            home,
            git_dir,
            &["hash-object", "-w", "--stdin"],
            Some(content.as_bytes()),
            &[],
        )?;
        git(
            home,
            git_dir,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("100644,{blob},{path}"),
            ],
            None,
            &with_index,
        )?;
    }
    let tree = git(home, git_dir, &["write-tree"], None, &with_index)?;
    let _ = std::fs::remove_file(&index);
    let commit = git(
        home,
        git_dir,
        &[
            "commit-tree",
            "--no-gpg-sign",
            &tree,
            "-m",
            "Initial commit",
        ],
        None,
        &IDENTITY,
    )?;
    git(
        home,
        git_dir,
        &["update-ref", "refs/heads/main", &commit],
        None,
        &[],
    )?;
    Ok(())
}

/// Every ref and the object it points at (`git for-each-ref`).
pub(super) fn refs(
    home: &Path,
    git_dir: &Path,
) -> Result<BTreeMap<String, String>, FakeGiteaError> {
    let listing = git(
        home,
        git_dir,
        &["for-each-ref", "--format=%(refname) %(objectname)"],
        None,
        &[],
    )?;
    Ok(listing
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(name, id)| (name.to_owned(), id.to_owned()))
        .collect())
}

/// The text of `path` at `rev`, or `None` when there is no such file there.
pub(super) fn file(
    home: &Path,
    git_dir: &Path,
    rev: &str,
    path: &str,
) -> Result<Option<String>, FakeGiteaError> {
    let spec = format!("{rev}:{path}");
    let found = run_git(
        home,
        git_dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            &spec,
        ],
        None,
        &[],
    )?;
    if !found.status.success() {
        return Ok(None);
    }
    let id = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    let kind = git(home, git_dir, &["cat-file", "-t", &id], None, &[])?;
    if kind != "blob" {
        return Ok(None);
    }
    let output = run_git(home, git_dir, &["cat-file", "blob", &id], None, &[])?;
    Ok(Some(String::from_utf8_lossy(&output.stdout).into_owned()))
}

/// The merge base of two commits, when they have one.
pub(super) fn merge_base(home: &Path, git_dir: &Path, a: &str, b: &str) -> Option<String> {
    git(home, git_dir, &["merge-base", a, b], None, &[]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> GitCredentials {
        GitCredentials {
            username: "bot".to_owned(),
            token: "t0ken".to_owned(),
        }
    }

    fn auth(value: &str) -> Option<String> {
        authenticate(Some(&creds()), Some(&HeaderValue::from_str(value).unwrap()))
    }

    fn basic(pair: &str) -> String {
        format!("Basic {}", BASE64.encode(pair))
    }

    #[test]
    fn the_token_authenticates_as_its_owner_in_every_form_gitea_accepts() {
        let bot = Some("bot".to_owned());
        assert_eq!(auth(&basic("bot:t0ken")), bot);
        assert_eq!(auth(&basic("anyone:t0ken")), bot, "any user name");
        assert_eq!(auth(&basic("t0ken:")), bot, "token as the user name");
        assert_eq!(auth(&basic("t0ken:x-oauth-basic")), bot);
        assert_eq!(auth("token t0ken"), bot);
        assert_eq!(auth("Bearer t0ken"), bot);
    }

    #[test]
    fn wrong_or_missing_credentials_authenticate_nobody() {
        assert_eq!(auth(&basic("bot:wrong")), None);
        assert_eq!(auth(&basic("bot")), None, "no colon");
        assert_eq!(auth(&basic(":")), None);
        assert_eq!(auth("Token t0ken"), None, "gitea matches `token` exactly");
        assert_eq!(auth("Digest t0ken"), None);
        assert_eq!(authenticate(Some(&creds()), None), None);
        let header = HeaderValue::from_str(&basic("bot:t0ken")).unwrap();
        assert_eq!(
            authenticate(None, Some(&header)),
            None,
            "no credentials set"
        );
    }

    #[test]
    fn git_protocol_header_must_be_plain_pairs() {
        assert!(safe_git_protocol("version=2"));
        assert!(safe_git_protocol("version=2:object=sha1"));
        assert!(!safe_git_protocol(""));
        assert!(!safe_git_protocol("version=2;rm"));
        assert!(!safe_git_protocol("version="));
    }

    #[test]
    fn cgi_output_is_split_into_status_headers_and_body() {
        let response = cgi_response(
            b"Status: 404 Not Found\r\nContent-Type: text/plain\r\nExpires: x\r\n\r\nnope",
        );
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()["content-type"], "text/plain");
        assert_eq!(response.headers()["expires"], "x");
        let ok = cgi_response(b"Content-Type: a/b\n\nbody\r\n\r\nmore");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            split_head(b"A: b\n\nbody\r\n\r\nmore").1,
            b"body\r\n\r\nmore"
        );
    }
}
