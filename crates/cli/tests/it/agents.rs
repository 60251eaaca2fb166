//! Docker: real agent CLIs, installed from npm into their bottle images, running
//! against the scripted model fixtures on loopback.

use bot_bottle_testkit::{FixtureConfig, Script, anthropic};

use crate::common::{Project, slug_of, stderr, stdout};

/// A fake key: the fixture checks that this exact value arrives. Not a secret.
const TEST_KEY: &str = "sk-ant-api03-test-key-not-a-secret";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn docker_claude_code_writes_a_file_through_the_gateway() {
    let rt = runtime();
    let project = Project::new();
    let fixture = rt
        .block_on(anthropic::start(
            FixtureConfig::new(Script::write_then_done(
                "/workspace/hello.txt",
                "hello from the bottle\n",
            ))
            .with_expected_key(TEST_KEY),
        ))
        .unwrap();
    project
        .agent("implementer", "---\nprovider: claude\nbottles: claude-api\n---\nYou implement things.\n")
        .bottle(
            "claude-api",
            &format!(
                "---\negress:\n  audit: all\n  rules:\n    - host: api.anthropic.com\n      port: 80\n      methods: [POST]\n      paths: [\"/v1/messages*\"]\nenv:\n  ANTHROPIC_BASE_URL: http://api.anthropic.com\n  ANTHROPIC_API_KEY: {TEST_KEY}\n---\n"
            ),
        );
    let mut project = project;
    project.env.push((
        "BOT_BOTTLE_UPSTREAM_OVERRIDES".into(),
        format!("api.anthropic.com={}", fixture.addr()),
    ));
    let mut cmd = project.cmd(&[
        "start",
        "implementer",
        "--headless",
        "--prompt",
        "Write hello.txt",
        "--json",
    ]);
    let out = cmd.output().unwrap();
    eprintln!("stderr:\n{}", stderr(&out));
    assert_eq!(
        out.status.code(),
        Some(0),
        "claude failed:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let slug = slug_of(&out);
    assert_eq!(
        std::fs::read_to_string(project.path().join("hello.txt")).unwrap(),
        "hello from the bottle\n"
    );
    let requests = fixture.requests();
    assert!(
        requests.len() >= 2,
        "expected a tool call and a final turn: {requests:?}"
    );
    assert!(
        requests.iter().all(|r| r.path_only() == "/v1/messages"),
        "{requests:?}"
    );

    let events = project.audit_lines(&slug);
    let allowed: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["decision"] == "allow").collect();
    assert!(
        allowed.len() >= 2,
        "the model calls were not audited as allowed: {events:?}"
    );
    // The only egress is the Messages API. Claude also tries a side call to
    // api.anthropic.com:443 that the base URL does not move; it is blocked, so it is
    // not egress, but it must be in the log.
    for event in &allowed {
        assert_eq!(
            event["host"], "api.anthropic.com",
            "unexpected egress: {event}"
        );
        assert_eq!(event["method"], "POST", "unexpected egress: {event}");
        let path = event["path"].as_str().unwrap_or_default();
        assert!(
            path.starts_with("/v1/messages"),
            "unexpected egress: {event}"
        );
    }
    for event in events.iter().filter(|e| e["decision"] == "block") {
        assert_eq!(
            event["host"], "api.anthropic.com",
            "blocked call to an unexpected host: {event}"
        );
    }
}

fn version_smoke(provider: &str, expect: &str) {
    let project = Project::new();
    project
        .agent(
            provider,
            &format!("---\nprovider: {provider}\nbottles: quiet\nargs: [\"--version\"]\n---\n"),
        )
        .bottle("quiet", "---\negress:\n  rules: []\n---\n");
    // `args` come before the prompt, and `--version` exits before reading it.
    let out = project.run(&["start", provider, "--headless", "--prompt", "unused"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // pi prints its version on stderr, codex on stdout.
    let printed = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        printed.contains(expect),
        "{provider} --version printed: {printed}"
    );
}

#[test]
fn docker_codex_starts_and_prints_its_version() {
    version_smoke("codex", "0.169.0");
}

#[test]
fn docker_pi_starts_and_prints_its_version() {
    version_smoke("pi", "0.73.1");
}
