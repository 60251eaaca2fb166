//! The fake Gitea's git smart HTTP (driven by the real `git` client, over TLS too) and
//! its signed webhook deliveries, received by a server the test starts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bot_bottle_testkit::TlsIdentity;
use bot_bottle_testkit::gitea::{DeliveryRecord, FakeGitea, FakeGiteaError, NewIssue};
use hmac::{Hmac, Mac};
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client;

const OWNER: &str = "acme";
const REPO: &str = "widget";
const TOKEN: &str = "gitea-test-token-1";
const SECRET: &str = "webhook-test-secret";
const BRANCH: &str = "bot-bottle/issue-1";
const WAIT: Duration = Duration::from_secs(20);

/// A test CA and a certificate for `127.0.0.1` it signed.
struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    identity: TlsIdentity,
}

fn pki() -> Pki {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fake gitea test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        identity: TlsIdentity::from_pem(leaf.pem().as_bytes(), key.serialize_pem().as_bytes())
            .unwrap(),
    }
}

/// Runs the real `git` client with nothing from the host's git config.
async fn git(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("git")
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("HOME", cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Agent")
        .env("GIT_AUTHOR_EMAIL", "agent@example.invalid")
        .env("GIT_COMMITTER_NAME", "Agent")
        .env("GIT_COMMITTER_EMAIL", "agent@example.invalid")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap()
}

fn ok(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "git failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn basic(pair: &str) -> String {
    format!("Basic {}", BASE64.encode(pair))
}

fn extra_header(authorization: &str) -> String {
    format!("http.extraHeader=Authorization: {authorization}")
}

/// Clones `owner/repo` into `<work>/clone` with the token in an extra header, and
/// starts branch [`BRANCH`] there with one new commit; returns the clone and the commit.
async fn clone_and_commit(
    fake: &FakeGitea,
    work: &Path,
    env: &[(&str, &str)],
) -> (PathBuf, String) {
    let header = extra_header(&basic(&format!("bot:{TOKEN}")));
    ok(&git(
        work,
        env,
        &[
            "-c",
            &header,
            "clone",
            "--quiet",
            &fake.clone_url(OWNER, REPO),
            "clone",
        ],
    )
    .await);
    let clone = work.join("clone");
    ok(&git(&clone, env, &["checkout", "--quiet", "-b", BRANCH]).await);
    std::fs::write(clone.join("NOTES.md"), "from the agent\n").unwrap();
    ok(&git(&clone, env, &["add", "NOTES.md"]).await);
    ok(&git(&clone, env, &["commit", "--quiet", "-m", "Add notes"]).await);
    let head = ok(&git(&clone, env, &["rev-parse", "HEAD"]).await);
    (clone, head)
}

/// One raw HTTP/1.1 request; returns the whole answer as text.
async fn raw(addr: std::net::SocketAddr, path: &str, authorization: Option<&str>) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = authorization
        .map(|value| format!("Authorization: {value}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A webhook receiver on loopback that records every delivery and answers `status`.
struct Receiver {
    url: String,
    received: Received,
    _task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(status: StatusCode) -> Self {
        async fn hook(
            State((received, status)): State<(Received, StatusCode)>,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            received.lock().unwrap().push((headers, body));
            status
        }
        let received: Received = Arc::default();
        let app = axum::Router::new()
            .route("/hooks/gitea", axum::routing::post(hook))
            .with_state((received.clone(), status));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let url = format!("http://{}/hooks/gitea", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            received,
            _task: task,
        }
    }

    fn received(&self) -> Vec<(HeaderMap, Bytes)> {
        self.received.lock().unwrap().clone()
    }
}

/// Hex HMAC-SHA256, computed here rather than with the fake's code.
fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("header {name} is missing"))
        .to_str()
        .unwrap()
}

fn is_uuid_v4(id: &str) -> bool {
    let parts: Vec<&str> = id.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
        && parts[2].starts_with('4')
        && matches!(&parts[3][..1], "8" | "9" | "a" | "b")
}

async fn api(
    fake: &FakeGitea,
    method: &str,
    path: &str,
    login: &str,
    body: &Value,
) -> client::Reply {
    let authorization = format!("token {login}");
    client::send(
        method,
        &fake.base_url(),
        &format!("/api/v1/repos/{OWNER}/{REPO}{path}"),
        &[("authorization", authorization.as_str())],
        body.to_string(),
        None,
    )
    .await
}

/// `(event, event type, action)` of each delivery.
fn kinds(deliveries: &[DeliveryRecord]) -> Vec<(String, String, String)> {
    deliveries
        .iter()
        .map(|d| (d.event.clone(), d.event_type.clone(), d.action.clone()))
        .collect()
}

fn kind(event: &str, event_type: &str, action: &str) -> (String, String, String) {
    (event.to_owned(), event_type.to_owned(), action.to_owned())
}

#[tokio::test]
async fn clone_commit_and_push_over_tls_with_the_real_git_client() {
    let pki = pki();
    let fake = FakeGitea::start_tls(pki.identity.clone()).await.unwrap();
    assert!(
        fake.api_url().starts_with("https://127.0.0.1:"),
        "{}",
        fake.api_url()
    );
    let dir = fake
        .add_git_repo(
            OWNER,
            REPO,
            &[("README.md", "hello\n"), ("src/lib.rs", "pub fn f() {}\n")],
        )
        .unwrap();
    assert!(dir.ends_with("acme/widget.git"), "{}", dir.display());
    fake.set_git_credentials("bot", TOKEN);
    let receiver = Receiver::start(StatusCode::OK).await;
    fake.add_webhook(OWNER, REPO, &receiver.url, SECRET)
        .unwrap();

    let work = tempfile::tempdir().unwrap();
    let ca = work.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let ca = ca.to_str().unwrap().to_owned();
    let env = [("GIT_SSL_CAINFO", ca.as_str())];
    let (clone, first) = clone_and_commit(&fake, work.path(), &env).await;
    assert_eq!(
        std::fs::read_to_string(clone.join("README.md")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        ok(&git(&clone, &env, &["log", "--format=%an <%ae> %at %s", "main"]).await),
        "Fake Gitea <gitea@example.invalid> 1767225600 Initial commit"
    );

    // The token in the URL, as a credential helper would supply it: git sends it only
    // after the 401 challenge.
    let token_url = format!(
        "https://x-access-token:{TOKEN}@{}/{OWNER}/{REPO}.git",
        fake.addr()
    );
    ok(&git(&clone, &env, &["push", "--quiet", &token_url, BRANCH]).await);
    let refs = fake.git_refs(OWNER, REPO).unwrap();
    assert_eq!(refs.get(&format!("refs/heads/{BRANCH}")), Some(&first));
    assert_eq!(
        fake.git_file(OWNER, REPO, BRANCH, "NOTES.md")
            .unwrap()
            .as_deref(),
        Some("from the agent\n")
    );
    assert_eq!(
        fake.git_file(OWNER, REPO, "main", "NOTES.md").unwrap(),
        None
    );
    assert_eq!(
        fake.git_file(OWNER, REPO, "main", "src/lib.rs")
            .unwrap()
            .as_deref(),
        Some("pub fn f() {}\n")
    );
    let requests = fake.git_requests();
    assert!(
        requests.iter().any(|r| r.status == 401
            && r.user.is_none()
            && r.path.ends_with("/info/refs?service=git-receive-pack")),
        "{requests:#?}"
    );
    let pushes: Vec<_> = requests
        .iter()
        .filter(|r| r.path.ends_with("/git-receive-pack"))
        .collect();
    assert_eq!(pushes.len(), 1, "{requests:#?}");
    assert_eq!(
        (
            pushes[0].method.as_str(),
            pushes[0].user.as_deref(),
            pushes[0].status
        ),
        ("POST", Some("bot"), 200)
    );

    // The branch exists now, so a pull request can be opened from it, with real ids.
    let reply = client::send(
        "POST",
        &fake.base_url(),
        &format!("/api/v1/repos/{OWNER}/{REPO}/pulls"),
        &[("authorization", "token bot")],
        json!({"title": "Add notes", "head": BRANCH, "base": "main", "body": "Closes #1"})
            .to_string(),
        Some(pki.ca_der.clone()),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let pull = reply.json();
    assert_eq!(pull["head"]["sha"], first.as_str());
    assert_eq!(pull["base"]["sha"], refs["refs/heads/main"].as_str());
    assert_eq!(pull["merge_base"], refs["refs/heads/main"].as_str());
    assert_eq!(
        pull["head"]["repo"]["clone_url"],
        fake.clone_url(OWNER, REPO)
    );

    // A second push moves the pull request's head and delivers `pull_request_sync`.
    std::fs::write(clone.join("NOTES.md"), "from the agent, again\n").unwrap();
    ok(&git(&clone, &env, &["commit", "--quiet", "-am", "More notes"]).await);
    let second = ok(&git(&clone, &env, &["rev-parse", "HEAD"]).await);
    let header = extra_header(&format!("token {TOKEN}"));
    ok(&git(
        &clone,
        &env,
        &["-c", &header, "push", "--quiet", "origin", BRANCH],
    )
    .await);
    let deliveries = fake.wait_deliveries(2, WAIT).await.unwrap();
    assert_eq!(
        kinds(&deliveries),
        vec![
            kind("pull_request", "pull_request", "opened"),
            kind("pull_request", "pull_request_sync", "synchronized"),
        ]
    );
    let sync = deliveries[1].json().unwrap();
    assert_eq!(sync["sender"]["login"], "bot");
    assert_eq!(sync["pull_request"]["head"]["sha"], second.as_str());
    let number = pull["number"].as_u64().unwrap();
    let reread = client::send(
        "GET",
        &fake.base_url(),
        &format!("/api/v1/repos/{OWNER}/{REPO}/pulls/{number}"),
        &[],
        String::new(),
        Some(pki.ca_der.clone()),
    )
    .await;
    assert_eq!(reread.json()["head"]["sha"], second.as_str());
    assert_eq!(fake.undeclared_statuses(), Vec::new());
}

#[tokio::test]
async fn the_initial_commit_is_the_same_on_every_server() {
    let files = [("README.md", "hello\n")];
    let one = FakeGitea::start().await.unwrap();
    let two = FakeGitea::start().await.unwrap();
    one.add_git_repo(OWNER, REPO, &files).unwrap();
    two.add_git_repo(OWNER, REPO, &files).unwrap();
    let main = one.git_refs(OWNER, REPO).unwrap()["refs/heads/main"].clone();
    assert_eq!(main.len(), 40);
    assert_eq!(main, two.git_refs(OWNER, REPO).unwrap()["refs/heads/main"]);
    assert!(matches!(
        one.add_git_repo(OWNER, REPO, &files),
        Err(FakeGiteaError::GitRepoExists { .. })
    ));
    let bad = one.add_git_repo("..", REPO, &files).unwrap_err();
    assert!(bad.to_string().contains("hint:"), "{bad}");
    assert!(matches!(
        one.git_refs(OWNER, "other"),
        Err(FakeGiteaError::NoGitRepo { .. })
    ));
}

#[tokio::test]
async fn git_requests_without_valid_credentials_get_401_and_push_nothing() {
    let fake = FakeGitea::start().await.unwrap();
    fake.add_git_repo(OWNER, REPO, &[("README.md", "hello\n")])
        .unwrap();
    let advert = "/acme/widget.git/info/refs?service=git-upload-pack";

    // Before any credentials are set, nothing gets in.
    let token_header = format!("token {TOKEN}");
    assert!(
        raw(fake.addr(), advert, Some(&token_header))
            .await
            .starts_with("HTTP/1.1 401")
    );
    fake.set_git_credentials("bot", TOKEN);

    let refused = raw(fake.addr(), advert, None).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"gitea\"\r\n"),
        "{refused}"
    );
    // Every form Gitea accepts, with or without `.git`.
    for authorization in [
        basic(&format!("bot:{TOKEN}")),
        basic(&format!("someone-else:{TOKEN}")),
        basic(&format!("{TOKEN}:")),
        basic(&format!("{TOKEN}:x-oauth-basic")),
        format!("token {TOKEN}"),
        format!("Bearer {TOKEN}"),
    ] {
        for path in [advert, "/acme/widget/info/refs?service=git-upload-pack"] {
            let answer = raw(fake.addr(), path, Some(&authorization)).await;
            assert!(
                answer.starts_with("HTTP/1.1 200"),
                "{authorization}: {answer}"
            );
            assert!(
                answer.contains("application/x-git-upload-pack-advertisement"),
                "{answer}"
            );
        }
    }
    for wrong in [basic("bot:not-the-token"), basic(&format!("bot:{TOKEN}x"))] {
        assert!(
            raw(fake.addr(), advert, Some(&wrong))
                .await
                .starts_with("HTTP/1.1 401")
        );
    }
    // Credentials first, then whether the repository exists.
    let good = basic(&format!("bot:{TOKEN}"));
    assert!(
        raw(
            fake.addr(),
            "/acme/nope.git/info/refs?service=git-upload-pack",
            None
        )
        .await
        .starts_with("HTTP/1.1 401")
    );
    assert!(
        raw(
            fake.addr(),
            "/acme/nope.git/info/refs?service=git-upload-pack",
            Some(&good)
        )
        .await
        .starts_with("HTTP/1.1 404")
    );

    let work = tempfile::tempdir().unwrap();
    let (clone, _) = clone_and_commit(&fake, work.path(), &[]).await;
    let before = fake.git_refs(OWNER, REPO).unwrap();
    // `origin` carries no credentials and prompts are off.
    let anonymous = git(&clone, &[], &["push", "origin", BRANCH]).await;
    assert!(!anonymous.status.success());
    let wrong_url = format!("http://bot:wrong-token@{}/{OWNER}/{REPO}.git", fake.addr());
    let wrong = git(&clone, &[], &["push", &wrong_url, BRANCH]).await;
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("Authentication failed"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    assert_eq!(fake.git_refs(OWNER, REPO).unwrap(), before);
    let requests = fake.git_requests();
    assert!(
        !requests
            .iter()
            .any(|r| r.path.ends_with("/git-receive-pack")),
        "no pack was received: {requests:#?}"
    );
    let push_adverts: Vec<_> = requests
        .iter()
        .filter(|r| r.path.ends_with("service=git-receive-pack"))
        .map(|r| (r.user.clone(), r.status))
        .collect();
    assert!(!push_adverts.is_empty());
    assert!(
        push_adverts.iter().all(|advert| *advert == (None, 401)),
        "{push_adverts:?}"
    );
}

/// Field names of the spec's definition `name`.
fn spec_fields(spec: &Value, name: &str) -> BTreeSet<String> {
    spec["definitions"][name]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("the spec defines {name}"))
        .keys()
        .cloned()
        .collect()
}

fn unknown_fields(
    value: &Value,
    allowed: &BTreeSet<String>,
    what: &str,
    problems: &mut Vec<String>,
) {
    for key in value
        .as_object()
        .unwrap_or_else(|| panic!("{what} is an object"))
        .keys()
    {
        if !allowed.contains(key) {
            problems.push(format!("{what} has `{key}`, not in the spec"));
        }
    }
}

/// The payload's nested objects use only the spec's field names.
fn check_against_spec(payload: &Value, problems: &mut Vec<String>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/testdata/gitea-swagger.v1.json");
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("the Gitea spec must be at {}: {e}", path.display())),
    )
    .unwrap();
    let user = spec_fields(&spec, "User");
    unknown_fields(&payload["sender"], &user, "sender", problems);
    unknown_fields(
        &payload["repository"],
        &spec_fields(&spec, "Repository"),
        "repository",
        problems,
    );
    unknown_fields(
        &payload["repository"]["owner"],
        &user,
        "repository.owner",
        problems,
    );
    if let Some(issue) = payload.get("issue") {
        unknown_fields(issue, &spec_fields(&spec, "Issue"), "issue", problems);
        for label in issue["labels"].as_array().unwrap() {
            unknown_fields(
                label,
                &spec_fields(&spec, "Label"),
                "issue.labels[]",
                problems,
            );
        }
        if !issue["pull_request"].is_null() {
            unknown_fields(
                &issue["pull_request"],
                &spec_fields(&spec, "PullRequestMeta"),
                "issue.pull_request",
                problems,
            );
        }
    }
    if let Some(comment) = payload.get("comment") {
        unknown_fields(comment, &spec_fields(&spec, "Comment"), "comment", problems);
    }
    if let Some(pull) = payload.get("pull_request").filter(|p| !p.is_null()) {
        unknown_fields(
            pull,
            &spec_fields(&spec, "PullRequest"),
            "pull_request",
            problems,
        );
        unknown_fields(
            &pull["head"],
            &spec_fields(&spec, "PRBranchInfo"),
            "pull_request.head",
            problems,
        );
    }
}

#[tokio::test]
async fn webhooks_arrive_signed_in_order_with_gitea_headers_and_payloads() {
    let fake = FakeGitea::start().await.unwrap();
    let receiver = Receiver::start(StatusCode::OK).await;
    fake.add_repo(OWNER, REPO);
    fake.add_webhook(OWNER, REPO, &receiver.url, SECRET)
        .unwrap();
    let issue = fake.add_issue(
        OWNER,
        REPO,
        NewIssue {
            title: "Parser drops trailing newline".to_owned(),
            body: "Steps: <parse> & print".to_owned(),
            author: "alice".to_owned(),
            labels: vec!["bug".to_owned()],
            ..NewIssue::default()
        },
    );
    fake.label_issue(OWNER, REPO, issue, "bot-bottle:implementer", "alice")
        .unwrap();
    fake.assign_issue(OWNER, REPO, issue, "bot", "alice")
        .unwrap();
    let human = fake
        .comment_as(OWNER, REPO, issue, "alice", "please also handle CRLF")
        .unwrap();
    let bot_comment = api(
        &fake,
        "POST",
        &format!("/issues/{issue}/comments"),
        "bot",
        &json!({"body": "on it"}),
    )
    .await;
    assert_eq!(bot_comment.status, 201);
    let pull = api(
        &fake,
        "POST",
        "/pulls",
        "bot",
        &json!({"title": "Keep the newline", "head": BRANCH, "base": "main", "body": "Closes #1"}),
    )
    .await;
    assert_eq!(pull.status, 201);
    let pr = pull.json()["number"].as_u64().unwrap();
    fake.comment_as(OWNER, REPO, pr, "alice", "looks good, one nit")
        .unwrap();
    fake.close(OWNER, REPO, pr, true);

    let deliveries = fake.wait_deliveries(7, WAIT).await.unwrap();
    assert_eq!(
        kinds(&deliveries),
        vec![
            kind("issues", "issue_label", "label_updated"),
            kind("issues", "issue_assign", "assigned"),
            kind("issue_comment", "issue_comment", "created"),
            kind("issue_comment", "issue_comment", "created"),
            kind("pull_request", "pull_request", "opened"),
            kind("issue_comment", "pull_request_comment", "created"),
            kind("pull_request", "pull_request", "closed"),
        ]
    );
    let received = receiver.received();
    assert_eq!(received.len(), 7);
    let mut ids = BTreeSet::new();
    let mut problems = Vec::new();
    for (record, (headers, body)) in deliveries.iter().zip(&received) {
        assert_eq!(
            (record.attempted, record.status, record.error.as_deref()),
            (true, Some(200), None)
        );
        assert_eq!(record.body, body.to_vec(), "sent byte for byte");
        let signature = hmac_hex(SECRET, body);
        assert_eq!(header(headers, "x-gitea-signature"), signature);
        assert_eq!(header(headers, "x-gogs-signature"), signature);
        assert_eq!(
            header(headers, "x-hub-signature-256"),
            format!("sha256={signature}")
        );
        assert!(header(headers, "x-hub-signature").starts_with("sha1="));
        assert_eq!(header(headers, "x-hub-signature").len(), 45);
        assert_eq!(header(headers, "content-type"), "application/json");
        let id = header(headers, "x-gitea-delivery");
        assert!(is_uuid_v4(id), "{id}");
        assert_eq!(id, record.id);
        assert_eq!(header(headers, "x-github-delivery"), id);
        assert_eq!(header(headers, "x-gogs-delivery"), id);
        ids.insert(id.to_owned());
        assert_eq!(header(headers, "x-gitea-event"), record.event);
        assert_eq!(header(headers, "x-github-event"), record.event);
        assert_eq!(header(headers, "x-gitea-event-type"), record.event_type);
        assert_eq!(header(headers, "x-github-event-type"), record.event_type);
        let payload: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(payload["action"], record.action.as_str());
        assert_eq!(payload["repository"]["owner"]["login"], OWNER);
        assert_eq!(payload["repository"]["name"], REPO);
        assert_eq!(payload["repository"]["full_name"], "acme/widget");
        check_against_spec(&payload, &mut problems);
    }
    assert_eq!(problems, Vec::<String>::new());
    assert_eq!(ids.len(), 7, "every delivery has its own id");
    // Go's encoder escapes `<`, `>` and `&`; the signature covers those bytes.
    let first = String::from_utf8(received[0].1.to_vec()).unwrap();
    assert!(
        first.contains(r"Steps: \u003cparse\u003e \u0026 print"),
        "{first}"
    );

    let payloads: Vec<Value> = deliveries.iter().map(|d| d.json().unwrap()).collect();
    let labeled = &payloads[0];
    assert_eq!(labeled["number"], issue);
    assert_eq!(labeled["sender"]["login"], "alice");
    let labels: Vec<&str> = labeled["issue"]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(labels, vec!["bug", "bot-bottle:implementer"]);
    assert!(labeled["issue"]["pull_request"].is_null());
    assert_eq!(payloads[1]["issue"]["assignees"][0]["login"], "bot");
    assert_eq!(payloads[2]["comment"]["id"], human);
    assert_eq!(payloads[2]["comment"]["user"]["login"], "alice");
    assert_eq!(payloads[2]["is_pull"], false);
    assert!(payloads[2].get("pull_request").is_none());
    assert_eq!(
        payloads[3]["sender"]["login"], "bot",
        "the bot's own comment"
    );
    assert_eq!(payloads[3]["comment"]["body"], "on it");
    let opened = &payloads[4];
    assert_eq!(opened["number"], pr);
    assert_eq!(opened["sender"]["login"], "bot");
    assert_eq!(opened["pull_request"]["head"]["ref"], BRANCH);
    assert_eq!(opened["pull_request"]["merged"], false);
    let pr_comment = &payloads[5];
    assert_eq!(pr_comment["is_pull"], true);
    assert_eq!(pr_comment["issue"]["number"], pr);
    assert_eq!(pr_comment["issue"]["pull_request"]["merged"], false);
    assert_eq!(pr_comment["pull_request"]["number"], pr);
    assert_eq!(pr_comment["comment"]["body"], "looks good, one nit");
    let closed = &payloads[6];
    assert_eq!(closed["pull_request"]["merged"], true);
    assert_eq!(closed["pull_request"]["state"], "closed");
    assert_eq!(closed["pull_request"]["head"]["ref"], BRANCH);
    assert_eq!(fake.undeclared_statuses(), Vec::new());
}

#[tokio::test]
async fn api_label_edits_and_state_changes_deliver_as_gitea_does() {
    let fake = FakeGitea::start().await.unwrap();
    let receiver = Receiver::start(StatusCode::OK).await;
    fake.add_repo(OWNER, REPO);
    fake.add_webhook(OWNER, REPO, &receiver.url, "").unwrap();
    let issue = fake.add_issue(
        OWNER,
        REPO,
        NewIssue {
            title: "T".to_owned(),
            author: "alice".to_owned(),
            labels: vec!["bot-bottle-status:running".to_owned()],
            ..NewIssue::default()
        },
    );
    let labels = api(
        &fake,
        "POST",
        &format!("/issues/{issue}/labels"),
        "bot",
        &json!({"labels": ["bot-bottle-status:running"]}),
    )
    .await;
    assert_eq!(labels.status, 200);
    let label_id = labels.json()[0]["id"].as_i64().unwrap();
    let removed = api(
        &fake,
        "DELETE",
        &format!("/issues/{issue}/labels/{label_id}"),
        "bot",
        &json!({}),
    )
    .await;
    assert_eq!(removed.status, 204);
    let edited = api(
        &fake,
        "PATCH",
        &format!("/issues/{issue}"),
        "bot",
        &json!({"body": "new body", "state": "closed"}),
    )
    .await;
    assert_eq!(edited.status, 201);
    let deliveries = fake.wait_deliveries(3, WAIT).await.unwrap();
    // Adding a label the issue already has changes nothing and sends nothing.
    assert_eq!(
        kinds(&deliveries),
        vec![
            kind("issues", "issue_label", "label_updated"),
            kind("issues", "issues", "edited"),
            kind("issues", "issues", "closed"),
        ]
    );
    assert_eq!(deliveries[0].json().unwrap()["issue"]["labels"], json!([]));
    assert_eq!(deliveries[1].json().unwrap()["changes"]["body"]["from"], "");
    // Without a secret the signature headers are present and empty, as in Gitea.
    let (headers, _) = &receiver.received()[0];
    assert_eq!(header(headers, "x-gitea-signature"), "");
    assert_eq!(fake.undeclared_statuses(), Vec::new());
}

#[tokio::test]
async fn redelivery_sends_the_same_bytes_and_a_resend_the_same_id() {
    let fake = FakeGitea::start().await.unwrap();
    let receiver = Receiver::start(StatusCode::OK).await;
    let failing = Receiver::start(StatusCode::INTERNAL_SERVER_ERROR).await;
    fake.add_repo(OWNER, REPO);
    fake.add_webhook(OWNER, REPO, &receiver.url, SECRET)
        .unwrap();
    fake.add_webhook(OWNER, REPO, &failing.url, SECRET).unwrap();
    let issue = fake.add_issue(
        OWNER,
        REPO,
        NewIssue {
            title: "T".to_owned(),
            author: "alice".to_owned(),
            ..NewIssue::default()
        },
    );
    fake.label_issue(OWNER, REPO, issue, "bot-bottle:implementer", "alice")
        .unwrap();
    let first = fake.wait_deliveries(2, WAIT).await.unwrap();
    assert_ne!(first[0].id, first[1].id, "each hook gets its own delivery");
    assert_eq!(first[0].body, first[1].body);
    assert_eq!(first[1].status, Some(500), "a failed delivery is recorded");
    let original = first[0].id.clone();

    let new_id = fake.redeliver(&original).unwrap();
    assert_ne!(new_id, original, "Gitea gives a redelivery a new id");
    assert!(is_uuid_v4(&new_id));
    assert!(fake.resend(&original));
    assert_eq!(fake.redeliver("no-such-delivery"), None);
    assert!(!fake.resend("no-such-delivery"));
    let all = fake.wait_deliveries(4, WAIT).await.unwrap();
    assert_eq!(all.len(), 4);

    let received = receiver.received();
    assert_eq!(received.len(), 3);
    let ids: Vec<&str> = received
        .iter()
        .map(|(h, _)| header(h, "x-gitea-delivery"))
        .collect();
    assert_eq!(
        ids,
        vec![original.as_str(), new_id.as_str(), original.as_str()]
    );
    for (headers, body) in &received {
        assert_eq!(body, &received[0].1, "byte for byte");
        assert_eq!(header(headers, "x-gitea-signature"), hmac_hex(SECRET, body));
        assert_eq!(header(headers, "x-gitea-event-type"), "issue_label");
    }
    assert_eq!(failing.received().len(), 1);
}

#[tokio::test]
async fn webhook_urls_must_be_loopback_and_waiting_too_long_says_so() {
    let fake = FakeGitea::start().await.unwrap();
    let error = fake
        .add_webhook(OWNER, REPO, "http://example.com/hook", SECRET)
        .unwrap_err();
    assert!(error.to_string().contains("hint:"), "{error}");
    assert!(
        fake.add_webhook(OWNER, REPO, "https://127.0.0.1:1/hook", SECRET)
            .is_err()
    );
    let waited = fake
        .wait_deliveries(1, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(
        waited,
        FakeGiteaError::DeliveryTimeout {
            wanted: 1,
            attempted: 0,
            ..
        }
    ));
    // A receiver that is not listening: the delivery is attempted and the error kept.
    let closed = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    fake.add_webhook(OWNER, REPO, &url, SECRET).unwrap();
    let issue = fake.add_issue(OWNER, REPO, NewIssue::default());
    fake.assign_issue(OWNER, REPO, issue, "bot", "alice")
        .unwrap();
    let deliveries = fake.wait_deliveries(1, WAIT).await.unwrap();
    assert_eq!(deliveries[0].status, None);
    assert!(deliveries[0].error.is_some());
    assert!(matches!(
        fake.label_issue(OWNER, REPO, 99, "x", "alice"),
        Err(FakeGiteaError::NoIssue { number: 99, .. })
    ));
}

#[tokio::test]
async fn a_pull_request_needs_branches_that_exist_in_the_git_repository() {
    let fake = FakeGitea::start().await.unwrap();
    let dir = fake
        .add_git_repo(OWNER, REPO, &[("README.md", "hello\n")])
        .unwrap();
    let missing = api(
        &fake,
        "POST",
        "/pulls",
        "bot",
        &json!({"title": "T", "head": "missing", "base": "main"}),
    )
    .await;
    assert_eq!(missing.status, 404, "{}", missing.body);
    let no_base = api(
        &fake,
        "POST",
        "/pulls",
        "bot",
        &json!({"title": "T", "head": "main", "base": "missing"}),
    )
    .await;
    assert_eq!(no_base.status, 404, "{}", no_base.body);
    let same = api(
        &fake,
        "POST",
        "/pulls",
        "bot",
        &json!({"title": "T", "head": "main", "base": "main"}),
    )
    .await;
    assert_eq!(same.status, 422);
    ok(&git(&dir, &[], &["branch", "feature", "main"]).await);
    let created = api(
        &fake,
        "POST",
        "/pulls",
        "bot",
        &json!({"title": "T", "head": "feature", "base": "main"}),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let main = fake.git_refs(OWNER, REPO).unwrap()["refs/heads/main"].clone();
    assert_eq!(created.json()["head"]["sha"], main.as_str());
    assert!(fake.pull_numbers(OWNER, REPO).len() == 1);
    assert_eq!(fake.undeclared_statuses(), Vec::new());
}
