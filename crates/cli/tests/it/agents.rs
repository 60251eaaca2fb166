//! Docker: real agent CLIs, installed from npm into their bottle images, running
//! against the scripted model fixtures on loopback.

use bot_bottle_testkit::{
    FixtureConfig, FixtureHandle, Script, TlsIdentity, anthropic, echo, openai,
};

use crate::common::{Project, slug_of, stderr, stdout};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A test PKI: a CA the gateway trusts upstream (never the bottle), and leaves for the
/// loopback origins that pose as real hosts.
pub struct TestPki {
    pub ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "bot-bottle test origin CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    pub fn identity(&self, names: &[&str]) -> TlsIdentity {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        TlsIdentity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
    }
}

/// A scripted Messages API over HTTPS posing as api.anthropic.com (and `paste.example`),
/// with the gateway told to route both names there and to trust the test CA; beside it,
/// a reflecting origin posing as `echo.example` (see `bot_bottle_testkit::echo`).
pub struct TlsModel {
    pub fixture: FixtureHandle,
    pub echo: FixtureHandle,
    _ca_file: tempfile::NamedTempFile,
}

/// Which hosted API a fixture stands in for.
#[derive(Clone, Copy)]
pub enum Api {
    Anthropic,
    OpenAi,
}

pub fn tls_model(
    project: &mut Project,
    script: Script,
    real_key: &str,
) -> (TlsModel, tokio::runtime::Runtime) {
    tls_model_for(project, Api::Anthropic, script, real_key)
}

/// Starts the fixture for `api` over HTTPS and points the gateway at it: the real host
/// names route to it, its CA is trusted upstream, and the real key is in the launching
/// process's environment (`BB_TEST_ANTHROPIC_KEY` / `BB_TEST_OPENAI_KEY`) only.
pub fn tls_model_for(
    project: &mut Project,
    api: Api,
    script: Script,
    real_key: &str,
) -> (TlsModel, tokio::runtime::Runtime) {
    let rt = runtime();
    let pki = TestPki::new();
    let (names, key_var): (&[&str], &str) = match api {
        Api::Anthropic => (
            &["api.anthropic.com", "paste.example"],
            "BB_TEST_ANTHROPIC_KEY",
        ),
        Api::OpenAi => (&["api.openai.com"], "BB_TEST_OPENAI_KEY"),
    };
    let config = FixtureConfig::new(script)
        .with_expected_key(real_key)
        .with_tls(pki.identity(names));
    let fixture = match api {
        Api::Anthropic => rt.block_on(anthropic::start(config)),
        Api::OpenAi => rt.block_on(openai::start(config)),
    }
    .unwrap();
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), &pki.ca_pem).unwrap();
    let echo = rt
        .block_on(echo::start(
            FixtureConfig::new(Script::write_then_done("unused", ""))
                .with_tls(pki.identity(&["echo.example"])),
        ))
        .unwrap();
    let addr = fixture.addr();
    let mut overrides: Vec<String> = names.iter().map(|name| format!("{name}={addr}")).collect();
    overrides.push(format!("echo.example={}", echo.addr()));
    project
        .env
        .push(("BOT_BOTTLE_UPSTREAM_OVERRIDES".into(), overrides.join(",")));
    project.env.push((
        "BOT_BOTTLE_UPSTREAM_CA".into(),
        ca_file.path().display().to_string(),
    ));
    project.env.push((key_var.into(), real_key.into()));
    (
        TlsModel {
            fixture,
            echo,
            _ca_file: ca_file,
        },
        rt,
    )
}

/// The bottle of the custody tests: the Messages API allowed, the key in custody.
pub const CUSTODY_BOTTLE: &str = r#"---
egress:
  audit: all
  rules:
    - host: api.anthropic.com
      methods: [POST]
      paths: ["/v1/messages*"]
credentials:
  - name: anthropic
    source: {env: BB_TEST_ANTHROPIC_KEY}
    hosts: [api.anthropic.com]
    inject: {header: x-api-key}
    env: ANTHROPIC_API_KEY
---
"#;

fn grep_dir(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(path);
            }
        }
    }
    hits
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The real Claude Code CLI, unmodified, talks to https://api.anthropic.com through the
/// intercepting gateway; the bottle holds a placeholder, the fixture receives the real
/// key, and the real key is nowhere in the bottle, its frozen image, the state or the log.
#[test]
fn docker_claude_code_over_intercepted_tls_with_custody() {
    // A test value standing in for a real key; the point is where it may and may not go.
    let real_key = "sk-ant-api03-REALTESTVALUE0123456789abcdefghijklmnopqrstuvwxyzABCDEFG-test";
    let mut project = Project::new();
    let (model, _rt) = tls_model(
        &mut project,
        Script::write_then_done("/workspace/hello.txt", "hello over tls\n"),
        real_key,
    );
    project
        .agent(
            "implementer",
            "---\nprovider: claude\nbottles: claude-api\n---\nYou implement things.\n",
        )
        .bottle("claude-api", CUSTODY_BOTTLE);
    let out = project.run(&[
        "start",
        "implementer",
        "--headless",
        "--prompt",
        "Write hello.txt",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "claude failed:\n{}",
        stderr(&out)
    );
    let slug = slug_of(&out);
    assert_eq!(
        std::fs::read_to_string(project.path().join("hello.txt")).unwrap(),
        "hello over tls\n"
    );

    // The fixture only answers requests that carry the real key, and it answered.
    let requests = model.fixture.requests();
    assert!(requests.len() >= 2, "{requests:?}");
    assert!(
        requests
            .iter()
            .all(|r| r.header("x-api-key") == Some(real_key)),
        "the real key did not arrive"
    );

    let events = project.audit_lines(&slug);
    let allowed: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["decision"] == "allow" && e["kind"] == "request")
        .collect();
    assert!(allowed.len() >= 2, "{events:?}");
    for event in &allowed {
        assert_eq!(
            event["host"], "api.anthropic.com",
            "unexpected egress: {event}"
        );
        assert_eq!(
            event["credential"], "anthropic",
            "no injection recorded: {event}"
        );
    }
    for event in events.iter().filter(|e| e["decision"] == "block") {
        assert_eq!(
            event["host"], "api.anthropic.com",
            "blocked call to an unexpected host: {event}"
        );
    }

    // Secret absence. Positive control first: the placeholder is in the container's env.
    let inspect = std::process::Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{json .Config.Env}}",
            &format!("bot-bottle-{slug}"),
        ])
        .output()
        .unwrap();
    let env = stdout(&inspect);
    assert!(
        env.contains("ANTHROPIC_API_KEY=sk-ant-api03-"),
        "placeholder missing: {env}"
    );
    assert!(
        !env.contains(real_key),
        "the real key is in the container env"
    );
    let hits = grep_dir(project.home.path(), real_key.as_bytes());
    assert!(hits.is_empty(), "the real key is in state files: {hits:?}");

    let out = project.run(&["freeze", &slug, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let frozen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let image = frozen["image"].as_str().unwrap();
    let saved = std::process::Command::new("docker")
        .args(["save", image])
        .output()
        .unwrap();
    assert!(saved.status.success(), "{}", stderr(&saved));
    assert!(
        saved.stdout.len() > 1 << 20,
        "docker save produced too little"
    );
    let placeholder = env
        .split('"')
        .find_map(|item| item.strip_prefix("ANTHROPIC_API_KEY="))
        .unwrap()
        .to_owned();
    assert!(
        contains(&saved.stdout, placeholder.as_bytes()),
        "positive control: the placeholder is in the frozen image's config"
    );
    assert!(
        !contains(&saved.stdout, real_key.as_bytes()),
        "the real key is in the frozen image"
    );
    // The interception CA's private key stays on the host, 0600, out of the bottle.
    let ca_key_path = project.home.path().join(format!("ca/{slug}/ca-key.pem"));
    let ca_key = std::fs::read_to_string(&ca_key_path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&ca_key_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let key_body: String = ca_key
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let key_line = ca_key.lines().nth(1).unwrap();
    assert!(!key_body.is_empty());
    assert!(
        !contains(&saved.stdout, key_line.as_bytes()),
        "the CA key is in the frozen image"
    );
    let hits = grep_dir(
        &project.home.path().join(format!("state/{slug}")),
        key_line.as_bytes(),
    );
    assert!(
        hits.is_empty(),
        "the CA key is in the bottle's state (mounted into it): {hits:?}"
    );

    // Resume continues the same conversation (`claude --continue`): the next request
    // carries the first prompt in its history.
    let before = model.fixture.requests().len();
    let out = project.run(&["resume", &slug, "--headless", "--prompt", "Now say done"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let resumed = &model.fixture.requests()[before..];
    assert!(!resumed.is_empty(), "resume made no model call");
    let history = serde_json::to_string(&resumed[0].body).unwrap();
    assert!(
        history.contains("Write hello.txt"),
        "resume started a new conversation: {history}"
    );
    assert!(history.contains("Now say done"), "{history}");
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

/// Resumes `slug` headlessly and checks that the agent's next model call carries the
/// first session's prompt: the CLI continued its conversation instead of starting anew.
fn assert_resume_continues(project: &Project, model: &TlsModel, slug: &str, first_prompt: &str) {
    let before = model.fixture.requests().len();
    let out = project.run(&["resume", slug, "--headless", "--prompt", "Now say done"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let resumed = &model.fixture.requests()[before..];
    assert!(!resumed.is_empty(), "resume made no model call");
    let history = serde_json::to_string(&resumed[0].body).unwrap();
    assert!(
        history.contains(first_prompt),
        "resume started a new conversation: {history}"
    );
    assert!(history.contains("Now say done"), "{history}");
}

/// The bottle of the pi test: the Messages API with the key in custody (pi uses the same
/// API and header as claude).
#[test]
fn docker_pi_writes_a_file_over_intercepted_tls() {
    let real_key = "sk-ant-api03-PITESTVALUE0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH-test";
    let mut project = Project::new();
    let (model, _rt) = tls_model(
        &mut project,
        Script::write_then_done("hello.txt", "hello from pi\n"),
        real_key,
    );
    project
        .agent(
            "pi-agent",
            "---\nprovider: pi\nbottles: claude-api\n---\nYou implement things.\n",
        )
        .bottle("claude-api", CUSTODY_BOTTLE);
    let out = project.run(&[
        "start",
        "pi-agent",
        "--headless",
        "--prompt",
        "Write hello.txt",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // pi exits 0 even when it got no answer, so the file is the real check.
    assert_eq!(
        std::fs::read_to_string(project.path().join("hello.txt")).unwrap(),
        "hello from pi\n"
    );
    assert!(
        model
            .fixture
            .requests()
            .iter()
            .all(|r| r.header("x-api-key") == Some(real_key))
    );
    let slug = project.state_dirs().pop().unwrap();
    assert_resume_continues(&project, &model, &slug, "Write hello.txt");
}

/// Codex through its custom provider (still https://api.openai.com/v1), bearer key in
/// custody, the Responses API over intercepted TLS.
#[test]
fn docker_codex_writes_a_file_over_intercepted_tls() {
    let real_key = "sk-proj-CODEXTESTVALUE0123456789abcdefghijklmnopqrstuvwxyzABCDEF-test";
    let mut project = Project::new();
    let (model, _rt) = tls_model_for(
        &mut project,
        Api::OpenAi,
        Script::write_then_done("hello.txt", "hello from codex\n"),
        real_key,
    );
    project
        .agent(
            "codex-agent",
            // An unknown model id keeps codex on plain function tools (AGENTS-WIRE.md).
            "---\nprovider: codex\nmodel: fixture-model\nbottles: openai-api\n---\nYou implement things.\n",
        )
        .bottle(
            "openai-api",
            "---\negress:\n  audit: all\n  rules:\n    - host: api.openai.com\n      methods: [POST]\n      paths: [\"/v1/responses\"]\ncredentials:\n  - name: openai\n    source: {env: BB_TEST_OPENAI_KEY}\n    hosts: [api.openai.com]\n    inject: bearer\n    env: OPENAI_API_KEY\n---\n",
        );
    let out = project.run(&[
        "start",
        "codex-agent",
        "--headless",
        "--prompt",
        "Write hello.txt",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(project.path().join("hello.txt")).unwrap(),
        "hello from codex\n"
    );
    let requests = model.fixture.requests();
    assert!(requests.len() >= 2, "{requests:?}");
    let bearer = format!("Bearer {real_key}");
    assert!(
        requests
            .iter()
            .all(|r| r.header("authorization") == Some(bearer.as_str())),
        "{requests:?}"
    );
    let slug = slug_of(&out);
    let events = project.audit_lines(&slug);
    assert!(
        events.iter().all(|e| e["decision"] != "block"),
        "codex made calls the policy blocked: {events:?}"
    );
    assert_resume_continues(&project, &model, &slug, "Write hello.txt");
}
