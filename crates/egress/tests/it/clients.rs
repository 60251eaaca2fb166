//! Real clients other than curl: git (smart HTTP through `git http-backend`) and node.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use bot_bottle_core::credential::{CredentialSource, CredentialSpec, Inject};
use bot_bottle_egress::ResolvedCredential;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};

use crate::support::{Handler, TestPki, policy, tls_gateway, tls_origin, traffic};

pub(crate) const GIT_TOKEN: &str = "gitea-real-token-5f0c2b7e9a1d4c3b8e6f";

pub(crate) fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "bot")
        .env("GIT_AUTHOR_EMAIL", "bot@example.invalid")
        .env("GIT_COMMITTER_NAME", "bot")
        .env("GIT_COMMITTER_EMAIL", "bot@example.invalid")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        // The environment's CA bundle would override `http.sslCAInfo`.
        .env_remove("GIT_SSL_CAINFO")
        .output()
        .expect("git runs")
}

pub(crate) fn git_ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A bare repository at `root/owner/name.git` with one commit, pushable over HTTP.
pub(crate) fn bare_repo(root: &Path, work: &Path, repo: &str) {
    let bare = root.join(format!("{repo}.git"));
    std::fs::create_dir_all(&bare).expect("mkdir");
    git_ok(&bare, &["init", "-q", "--bare", "-b", "main"]);
    git_ok(&bare, &["config", "http.receivepack", "true"]);
    let seed = work.join(format!("seed-{}", repo.replace('/', "-")));
    std::fs::create_dir_all(&seed).expect("mkdir");
    git_ok(&seed, &["init", "-q", "-b", "main"]);
    std::fs::write(seed.join("README"), "hello\n").expect("write");
    git_ok(&seed, &["add", "README"]);
    git_ok(&seed, &["commit", "-q", "-m", "seed"]);
    git_ok(&seed, &["push", "-q", bare.to_str().expect("utf8"), "main"]);
}

/// `git http-backend` as a CGI behind the loopback origin. It answers 401 unless the
/// request carries the real token, so a passing clone proves injection worked.
pub(crate) fn git_backend(root: std::path::PathBuf) -> Handler {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("bot:{GIT_TOKEN}"))
    );
    Arc::new(move |req: Request<hyper::body::Incoming>| {
        let root = root.clone();
        let expected = expected.clone();
        Box::pin(async move {
            let authorized = req
                .headers()
                .get("authorization")
                .is_some_and(|v| v.as_bytes() == expected.as_bytes());
            if !authorized {
                let mut response = Response::new(Full::new(Bytes::from_static(b"auth required")));
                *response.status_mut() = hyper::StatusCode::UNAUTHORIZED;
                response.headers_mut().insert(
                    "www-authenticate",
                    hyper::header::HeaderValue::from_static("Basic realm=\"git\""),
                );
                return response;
            }
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let content_type = header("content-type");
            let encoding = header("content-encoding");
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut child = tokio::process::Command::new("git")
                .arg("http-backend")
                .env("GIT_PROJECT_ROOT", &root)
                .env("GIT_HTTP_EXPORT_ALL", "1")
                .env("PATH_INFO", &path)
                .env("QUERY_STRING", &query)
                .env("REQUEST_METHOD", &method)
                .env("CONTENT_TYPE", &content_type)
                .env("HTTP_CONTENT_ENCODING", &encoding)
                .env("REMOTE_USER", "bot")
                .env("REMOTE_ADDR", "127.0.0.1")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("git http-backend");
            if let Some(mut stdin) = child.stdin.take() {
                use tokio::io::AsyncWriteExt as _;
                let _ = stdin.write_all(&body).await;
            }
            let out = child.wait_with_output().await.expect("backend output");
            let split = out
                .stdout
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|i| (i, 4))
                .or_else(|| {
                    out.stdout
                        .windows(2)
                        .position(|w| w == b"\n\n")
                        .map(|i| (i, 2))
                })
                .expect("CGI header block");
            let head = String::from_utf8_lossy(&out.stdout[..split.0]).to_string();
            let mut response = Response::new(Full::new(Bytes::from(
                out.stdout[split.0 + split.1..].to_vec(),
            )));
            for line in head.lines() {
                let Some((name, value)) = line.split_once(':') else {
                    continue;
                };
                let value = value.trim();
                if name.eq_ignore_ascii_case("status") {
                    let code = value
                        .split_whitespace()
                        .next()
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(500);
                    *response.status_mut() = hyper::StatusCode::from_u16(code)
                        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
                } else if let (Ok(name), Ok(value)) = (
                    hyper::header::HeaderName::from_bytes(name.as_bytes()),
                    hyper::header::HeaderValue::from_str(value),
                ) {
                    response.headers_mut().append(name, value);
                }
            }
            response
        })
    })
}

#[tokio::test]
async fn git_clone_is_allowed_while_push_to_the_same_repo_is_blocked() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("repos");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    bare_repo(&root, &work, "owner/name");
    bare_repo(&root, &work, "owner/scratch");
    let origin = tls_origin(&pki, &["git.test"], Some(git_backend(root.clone()))).await;
    let rules = policy(
        "rules:\n  - host: git.test\n    git: {repo: owner/name, fetch: true, push: false}\n  - host: git.test\n    git: {repo: owner/scratch, push: true}\n",
    );
    let gitea = ResolvedCredential::with_value(
        CredentialSpec {
            name: "gitea".into(),
            source: CredentialSource::Env("UNUSED".into()),
            hosts: vec!["git.test".into()],
            inject: Inject::Basic {
                username: "bot".into(),
            },
            env: None,
        },
        "bottle-git01",
        GIT_TOKEN.into(),
    )
    .expect("credential");
    let placeholder = gitea.placeholder().to_string();
    let (gw, ca) = tls_gateway(rules, &[("git.test", origin)], &pki, vec![gitea]).await;
    let proxy = gw.proxy_url();
    let ca = ca.to_str().expect("utf8").to_string();
    let with_proxy = |args: &[&str]| -> Vec<String> {
        let mut all = vec![
            "-c".to_string(),
            format!("http.proxy={proxy}"),
            "-c".to_string(),
            format!("http.sslCAInfo={ca}"),
        ];
        all.extend(args.iter().map(|a| (*a).to_string()));
        all
    };
    // The bottle's git holds only the placeholder, in the URL as a user would put a token.
    let url = |repo: &str| format!("https://bot:{placeholder}@git.test/{repo}.git");

    let clone = with_proxy(&["clone", "-q", &url("owner/name"), "name"]);
    let clone: Vec<&str> = clone.iter().map(String::as_str).collect();
    tokio::task::spawn_blocking({
        let work = work.clone();
        let clone: Vec<String> = clone.iter().map(|s| (*s).to_string()).collect();
        move || {
            let args: Vec<&str> = clone.iter().map(String::as_str).collect();
            git_ok(&work, &args)
        }
    })
    .await
    .expect("join");
    let checkout = work.join("name");
    assert_eq!(
        std::fs::read_to_string(checkout.join("README")).expect("cloned file"),
        "hello\n"
    );

    std::fs::write(checkout.join("change"), "x\n").expect("write");
    git_ok(&checkout, &["add", "change"]);
    git_ok(&checkout, &["commit", "-q", "-m", "change"]);
    let push_args = with_proxy(&["push", "origin", "main"]);
    let push = tokio::task::spawn_blocking({
        let checkout = checkout.clone();
        move || {
            let args: Vec<&str> = push_args.iter().map(String::as_str).collect();
            run(&checkout, &args)
        }
    })
    .await
    .expect("join");
    assert!(!push.status.success(), "push to owner/name must be refused");
    let stderr = String::from_utf8_lossy(&push.stderr);
    assert!(stderr.contains("403"), "{stderr}");
    assert!(!stderr.contains(GIT_TOKEN));

    // The same client may push where the policy allows it: the refusal above was the gateway's.
    let scratch_args = with_proxy(&["clone", "-q", &url("owner/scratch"), "scratch"]);
    let work2 = work.clone();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = scratch_args.iter().map(String::as_str).collect();
        git_ok(&work2, &args)
    })
    .await
    .expect("join");
    let scratch = work.join("scratch");
    std::fs::write(scratch.join("change"), "y\n").expect("write");
    git_ok(&scratch, &["add", "change"]);
    git_ok(&scratch, &["commit", "-q", "-m", "allowed change"]);
    let push_args = with_proxy(&["push", "-q", "origin", "main"]);
    let scratch2 = scratch.clone();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = push_args.iter().map(String::as_str).collect();
        git_ok(&scratch2, &args)
    })
    .await
    .expect("join");
    let log = git_ok(
        &root.join("owner/scratch.git"),
        &["log", "--format=%s", "main"],
    );
    assert_eq!(log, "allowed change\nseed\n");
    let log = git_ok(
        &root.join("owner/name.git"),
        &["log", "--format=%s", "main"],
    );
    assert_eq!(log, "seed\n", "the blocked push must not have landed");

    let events = traffic(&gw.audit_path);
    let blocked: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["decision"] == "block").collect();
    assert!(!blocked.is_empty());
    assert!(
        blocked
            .iter()
            .all(|e| e["reason"] == "git-push-not-allowed"),
        "{blocked:?}"
    );
    assert!(
        blocked
            .iter()
            .any(|e| e["path"] == "/owner/name.git/info/refs"),
        "{blocked:?}"
    );
    assert!(
        events
            .iter()
            .filter(|e| e["decision"] == "allow")
            .all(|e| e["credential"] == "gitea"),
        "every allowed git request carried the injected credential"
    );
    let audit = std::fs::read_to_string(&gw.audit_path).expect("audit");
    assert!(!audit.contains(GIT_TOKEN));
    gw.handle.shutdown().await;
}

#[tokio::test]
async fn node_trusts_the_gateway_ca_through_node_extra_ca_certs() {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test"], None).await;
    let (gw, ca) = tls_gateway(
        policy("rules:\n  - host: api.test\n    paths: [\"/v1/*\"]\n"),
        &[("api.test", origin)],
        &pki,
        vec![],
    )
    .await;
    let port = gw.handle.tcp_addr().expect("tcp").port();
    // Node has no proxy support of its own in v20, so the script speaks CONNECT itself.
    let script = r#"
const http = require('http'), tls = require('tls');
const [port, path] = process.argv.slice(1);
const req = http.request({ host: '127.0.0.1', port: Number(port), method: 'CONNECT', path: 'api.test:443' });
req.on('connect', (res, socket) => {
  if (res.statusCode !== 200) { console.log('CONNECT ' + res.statusCode); process.exit(0); }
  const s = tls.connect({ socket, servername: 'api.test', ALPNProtocols: ['http/1.1'] }, () => {
    s.write(`GET ${path} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n`);
  });
  let data = '';
  s.on('data', (c) => (data += c));
  s.on('end', () => console.log(data.split('\r\n')[0] + ' | ' + data.split('\r\n\r\n')[1]));
  s.on('error', (e) => { console.log('TLS ' + e.code); process.exit(0); });
});
req.end();
"#;
    let node = |path: &'static str, with_ca: bool| {
        let mut command = tokio::process::Command::new("node");
        command.args(["-e", script, &port.to_string(), path]);
        if with_ca {
            command.env("NODE_EXTRA_CA_CERTS", &ca);
        } else {
            command.env_remove("NODE_EXTRA_CA_CERTS");
        }
        command.output()
    };
    let out = node("/v1/hello", true).await.expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("HTTP/1.1 200 OK | HTTP/1.1 GET /v1/hello"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let blocked = node("/admin", true).await.expect("node runs");
    let stdout = String::from_utf8_lossy(&blocked.stdout);
    assert!(
        stdout.starts_with(
            "HTTP/1.1 403 Forbidden | blocked by the bot-bottle egress gateway: path-not-allowed"
        ),
        "{stdout}"
    );

    let untrusted = node("/v1/hello", false).await.expect("node runs");
    let stdout = String::from_utf8_lossy(&untrusted.stdout);
    assert!(
        stdout.starts_with("TLS "),
        "without the CA node must refuse: {stdout}"
    );
    gw.handle.shutdown().await;
}
