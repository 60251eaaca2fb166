//! The orchestrator's webhook endpoint against hostile and unwanted deliveries, over a
//! real socket, with the fake Gitea answering membership questions. Nothing here
//! launches a bottle: every case must end before one would start (the Docker-backed
//! loop is tested end to end in `crates/cli/tests/it/forge.rs`).

use std::time::Duration;

use bot_bottle_core::state::Home;
use bot_bottle_forge::webhook::sign;
use bot_bottle_forge::{ForgeStateStore, SqliteForgeStateStore};
use bot_bottle_orchestrator::{Config, Launcher, Orchestrator};
use bot_bottle_runtime::launch::GatewaySettings;
use bot_bottle_testkit::gitea::{FakeGitea, NewIssue};
use serde_json::json;

const SECRET: &str = "webhook-secret-for-tests";

struct Setup {
    gitea: FakeGitea,
    home: tempfile::TempDir,
    base: String,
    _server: tokio::task::JoinHandle<()>,
    client: HttpClient,
}

async fn setup() -> Setup {
    let gitea = FakeGitea::start().await.expect("fake gitea");
    gitea.add_repo("acme", "widget");
    gitea.add_org_member("bot-bottle", "agent1");
    let home = tempfile::tempdir().expect("home");
    std::fs::create_dir_all(home.path().join("agents")).expect("agents");
    std::fs::write(
        home.path().join("agents/implementer.md"),
        "---\nprovider: command\ncommand: [\"true\"]\nbottles: none\n---\n",
    )
    .expect("agent");
    let api = gitea.api_url();
    let lookup = move |key: &str| -> Option<String> {
        match key {
            "FORGE_GITEA_API" => Some(api.clone()),
            "FORGE_GIT_URL" => Some("https://gitea.test".to_owned()),
            "FORGE_BOT_USER" => Some("bot".to_owned()),
            "FORGE_TOKEN" => Some("unused".to_owned()),
            "FORGE_WEBHOOK_SECRET" => Some(SECRET.to_owned()),
            _ => None,
        }
    };
    // `FORGE_TOKEN` names an env source; the test process reads it from this map's
    // twin in the real environment only when launching, which never happens here.
    let mut config = Config::load(None, &lookup, true).expect("config");
    config.token = bot_bottle_core::credential::CredentialSource::Command("echo test-token".into());
    config.webhook_secret = Some(bot_bottle_core::credential::CredentialSource::Command(
        format!("echo {SECRET}"),
    ));
    let launcher = Launcher {
        home: Home::new(home.path()),
        shim_binary: "/nonexistent/bot-bottle".into(),
        gateway: GatewaySettings {
            loopback_only: true,
            ..GatewaySettings::default()
        },
        trust_project_manifests: false,
        quiet: true,
    };
    let orchestrator = Orchestrator::new(config, launcher).expect("orchestrator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let app = bot_bottle_orchestrator::server::router(orchestrator);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Setup {
        gitea,
        home,
        base,
        _server: server,
        client: HttpClient,
    }
}

/// A tiny HTTP/1.1 client over a TCP socket (the orchestrator is on loopback).
struct HttpClient;

impl HttpClient {
    async fn post(&self, url: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rest = url.strip_prefix("http://").expect("http url");
        let (authority, path) = rest
            .split_once('/')
            .map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .expect("connect");
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        stream.write_all(body).await.expect("write body");
        let mut response = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

fn issue_event(action: &str, number: u64, labels: &[&str], assignees: &[&str]) -> Vec<u8> {
    json!({
        "action": action,
        "number": number,
        "issue": {
            "id": 100 + number, "number": number, "title": "Fix the widget", "body": "It is broken",
            "state": "open", "user": {"id": 3, "login": "alice"},
            "labels": labels.iter().enumerate().map(|(i, l)| json!({"id": i, "name": l})).collect::<Vec<_>>(),
            "assignees": assignees.iter().enumerate().map(|(i, a)| json!({"id": 50 + i, "login": a})).collect::<Vec<_>>(),
            "updated_at": format!("2026-12-04T00:00:0{number}Z"),
        },
        "repository": {"id": 1, "name": "widget", "full_name": "acme/widget", "owner": {"id": 2, "login": "acme"}},
        "sender": {"id": 3, "login": "alice"},
    })
    .to_string()
    .into_bytes()
}

fn headers(event: &str, delivery: &str, signature: Option<String>) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("X-Gitea-Event", event.to_owned()),
        ("X-Gitea-Delivery", delivery.to_owned()),
    ];
    if let Some(signature) = signature {
        out.push(("X-Gitea-Signature", signature));
    }
    out
}

fn store(setup: &Setup) -> SqliteForgeStateStore {
    SqliteForgeStateStore::open(SqliteForgeStateStore::default_path(setup.home.path()))
        .expect("store")
}

#[tokio::test]
async fn forged_missing_and_empty_signatures_are_refused_with_401() {
    let setup = setup().await;
    let url = format!("{}/webhook", setup.base);
    let body = issue_event("label_updated", 1, &["bot-bottle:implementer"], &["agent1"]);
    for signature in [
        None,
        Some(String::new()),
        Some(sign(b"not-the-secret", &body)),
        Some("zz".repeat(32)),
        Some(sign(SECRET.as_bytes(), b"another body")),
    ] {
        let (status, text) = setup
            .client
            .post(&url, &headers("issues", "d-1", signature.clone()), &body)
            .await;
        assert_eq!(status, 401, "{signature:?}: {text}");
    }
    // Nothing was recorded: neither a run nor the delivery (a later genuine one counts).
    assert!(store(&setup).all().expect("all").is_empty());
    assert!(
        setup.gitea.requests().is_empty(),
        "a refused delivery reached the forge"
    );
}

#[tokio::test]
async fn malformed_bodies_and_headers_are_refused_without_side_effects() {
    let setup = setup().await;
    let url = format!("{}/webhook", setup.base);
    for body in [
        b"{not json".to_vec(),
        b"payload=%7B%7D".to_vec(),
        json!({"action": "opened"}).to_string().into_bytes(),
        vec![0xff; 100],
    ] {
        let signature = sign(SECRET.as_bytes(), &body);
        let (status, text) = setup
            .client
            .post(&url, &headers("issues", "d-bad", Some(signature)), &body)
            .await;
        assert_eq!(status, 400, "{text}");
    }
    // No delivery id, no event type.
    let body = issue_event("label_updated", 1, &["bot-bottle:implementer"], &["agent1"]);
    let signature = sign(SECRET.as_bytes(), &body);
    let (status, _) = setup
        .client
        .post(
            &url,
            &[
                ("X-Gitea-Event", "issues".to_owned()),
                ("X-Gitea-Signature", signature.clone()),
            ],
            &body,
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = setup
        .client
        .post(
            &url,
            &[
                ("X-Gitea-Delivery", "d-x".to_owned()),
                ("X-Gitea-Signature", signature),
            ],
            &body,
        )
        .await;
    assert_eq!(status, 400);
    // A body over the limit is refused before it is read whole.
    let huge = vec![b' '; bot_bottle_orchestrator::server::MAX_BODY + 1];
    let (status, _) = setup
        .client
        .post(
            &url,
            &headers("issues", "d-huge", Some(sign(SECRET.as_bytes(), &huge))),
            &huge,
        )
        .await;
    assert_eq!(status, 413);
    assert!(store(&setup).all().expect("all").is_empty());
}

#[tokio::test]
async fn untargeted_issues_start_nothing_and_replays_are_duplicates() {
    let setup = setup().await;
    let url = format!("{}/webhook", setup.base);
    setup.gitea.add_issue(
        "acme",
        "widget",
        NewIssue {
            title: "x".into(),
            ..NewIssue::default()
        },
    );
    let cases: [(&str, &[&str], &[&str], &str); 4] = [
        ("unlabelled", &[], &["agent1"], "NoAgentLabel"),
        (
            "non-member",
            &["bot-bottle:implementer"],
            &["mallory"],
            "NoMemberAssignee",
        ),
        (
            "unassigned",
            &["bot-bottle:implementer"],
            &[],
            "NoMemberAssignee",
        ),
        (
            "unknown agent",
            &["bot-bottle:nosuch"],
            &["agent1"],
            "UnknownAgent",
        ),
    ];
    for (i, (what, labels, assignees, expected)) in cases.iter().enumerate() {
        let number = u64::try_from(i).expect("small") + 1;
        let body = issue_event("label_updated", number, labels, assignees);
        let signature = sign(SECRET.as_bytes(), &body);
        let (status, text) = setup
            .client
            .post(
                &url,
                &headers("issues", &format!("d-{i}"), Some(signature)),
                &body,
            )
            .await;
        assert_eq!(status, 202, "{what}: {text}");
        assert!(text.contains(expected), "{what}: {text}");
    }
    assert!(
        store(&setup).all().expect("all").is_empty(),
        "nothing may start"
    );
    // Membership was asked of the forge at event time, for the non-member too.
    assert!(
        setup
            .gitea
            .requests()
            .iter()
            .any(|r| r.uri.contains("/orgs/bot-bottle/members/mallory")),
        "{:?}",
        setup.gitea.requests()
    );
    // A replay of a handled delivery (same id, same body) is a duplicate, and so is a
    // redelivery of the same event under a new id.
    let body = issue_event("label_updated", 1, &[], &["agent1"]);
    let signature = sign(SECRET.as_bytes(), &body);
    let (status, text) = setup
        .client
        .post(
            &url,
            &headers("issues", "d-0", Some(signature.clone())),
            &body,
        )
        .await;
    assert_eq!((status, text.contains("duplicate")), (200, true), "{text}");
    let (status, text) = setup
        .client
        .post(&url, &headers("issues", "d-new-id", Some(signature)), &body)
        .await;
    assert_eq!((status, text.contains("duplicate")), (200, true), "{text}");
}

#[tokio::test]
async fn the_bots_own_events_and_other_repositories_are_ignored() {
    let setup = setup().await;
    let url = format!("{}/webhook", setup.base);
    let comment = json!({
        "action": "created",
        "issue": {"id": 5, "number": 5, "title": "t", "body": "", "state": "open",
                  "user": {"id": 3, "login": "alice"}, "updated_at": "x"},
        "comment": {"id": 77, "body": "I am the bot", "user": {"id": 9, "login": "bot"},
                    "created_at": "x", "updated_at": "x"},
        "repository": {"id": 1, "name": "widget", "full_name": "acme/widget", "owner": {"id": 2, "login": "acme"}},
        "sender": {"id": 9, "login": "bot"},
        "is_pull": false,
    })
    .to_string()
    .into_bytes();
    let (status, text) = setup
        .client
        .post(
            &url,
            &headers(
                "issue_comment",
                "c-1",
                Some(sign(SECRET.as_bytes(), &comment)),
            ),
            &comment,
        )
        .await;
    assert_eq!(status, 202);
    assert!(text.contains("bot"), "{text}");
    // A human comment on an issue without a run does nothing either.
    let human = String::from_utf8(comment)
        .expect("utf8")
        .replace("\"login\":\"bot\"", "\"login\":\"alice\"")
        .replace("\"id\":77", "\"id\":78");
    let (status, text) = setup
        .client
        .post(
            &url,
            &headers(
                "issue_comment",
                "c-2",
                Some(sign(SECRET.as_bytes(), human.as_bytes())),
            ),
            human.as_bytes(),
        )
        .await;
    assert_eq!(status, 202);
    assert!(text.contains("has no run"), "{text}");
    assert!(store(&setup).all().expect("all").is_empty());
}

#[tokio::test]
async fn a_token_of_another_user_than_forge_bot_user_is_refused() {
    let setup = setup().await;
    setup.gitea.set_git_credentials("bot", "test-token");
    let make = |bot: &str| {
        let api = setup.gitea.api_url();
        let bot = bot.to_owned();
        let lookup = move |key: &str| -> Option<String> {
            match key {
                "FORGE_GITEA_API" => Some(api.clone()),
                "FORGE_GIT_URL" => Some("https://gitea.test".to_owned()),
                "FORGE_BOT_USER" => Some(bot.clone()),
                "FORGE_TOKEN_COMMAND" => Some("echo test-token".to_owned()),
                _ => None,
            }
        };
        let config = Config::load(None, &lookup, false).expect("config");
        Orchestrator::new(
            config,
            Launcher {
                home: Home::new(setup.home.path()),
                shim_binary: "/nonexistent/bot-bottle".into(),
                gateway: GatewaySettings::default(),
                trust_project_manifests: false,
                quiet: true,
            },
        )
        .expect("orchestrator")
    };
    make("bot")
        .check_bot_user()
        .await
        .expect("the token is bot's");
    make("BOT")
        .check_bot_user()
        .await
        .expect("logins compare without case");
    let err = make("someone-else")
        .check_bot_user()
        .await
        .expect_err("a wrong bot user would answer itself");
    assert!(err.to_string().contains("belongs to `bot`"), "{err}");
    assert!(err.to_string().contains("hint:"), "{err}");
}
