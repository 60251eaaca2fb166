//! Docker: the forge loop end to end. The fake Gitea (testkit) serves its API and a real
//! `git http-backend` over TLS on loopback and delivers signed webhooks to a real
//! `bot-bottle orchestrate serve`; bottles reach the forge only through the gateway.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bot_bottle_testkit::gitea::{FakeGitea, NewIssue};
use bot_bottle_testkit::script::Turn;
use bot_bottle_testkit::{FixtureConfig, Script, anthropic, openai};
use serde_json::{Value, json};

use crate::agents::{Api, TestPki};
use crate::common::{Project, stderr, stdout};

/// A token standing in for the bot's real Gitea token: the point is where it may go.
const TOKEN: &str = "gitea-token-REALTESTVALUE-0123456789abcdef";
const SECRET: &str = "webhook-secret-0123456789";
const MODEL_KEY: &str = "sk-ant-api03-FORGETESTVALUE0123456789abcdefghijklmnopqrstuvwxyzABCD-test";

/// The world of one forge test: the fake Gitea over TLS, a home with manifests, and the
/// settings `orchestrate` reads.
pub struct Forge {
    pub project: Project,
    pub gitea: FakeGitea,
    _rt: tokio::runtime::Runtime,
    pub env: Vec<(String, String)>,
    _ca_file: tempfile::NamedTempFile,
    pub model: Option<bot_bottle_testkit::FixtureHandle>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Forge {
    /// `agent` is the manifest text of the agent `implementer`, `bottle` of its bottle
    /// `work`; `script`, when given, drives a scripted Messages API posing as
    /// api.anthropic.com.
    pub fn new(agent: &str, bottle: &str, script: Option<Script>) -> Self {
        Self::with_model(agent, bottle, script.map(|script| (Api::Anthropic, script)))
    }

    /// [`Forge::new`] with the model API chosen.
    pub fn with_model(agent: &str, bottle: &str, model: Option<(Api, Script)>) -> Self {
        let project = Project::new();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let pki = TestPki::new();
        let gitea = rt
            .block_on(FakeGitea::start_tls(
                pki.identity(&["gitea.test", "127.0.0.1"]),
            ))
            .unwrap();
        gitea
            .add_git_repo("acme", "widget", &[("README.md", "# widget\n")])
            .unwrap();
        gitea.set_git_credentials("bot", TOKEN);
        gitea.add_org_member("bot-bottle", "agent1");
        gitea.add_issue(
            "acme",
            "widget",
            NewIssue {
                title: "The widget is broken".into(),
                body: "Please fix the widget.".into(),
                author: "alice".into(),
                assignees: vec!["agent1".into()],
                labels: Vec::new(),
            },
        );
        // Another issue, which the run must not write to.
        gitea.add_issue(
            "acme",
            "widget",
            NewIssue {
                title: "Someone else's issue".into(),
                author: "carol".into(),
                ..NewIssue::default()
            },
        );
        let ca_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca_file.path(), &pki.ca_pem).unwrap();
        let home = project.home.path();
        std::fs::create_dir_all(home.join("agents")).unwrap();
        std::fs::create_dir_all(home.join("bottles")).unwrap();
        std::fs::write(home.join("agents/implementer.md"), agent).unwrap();
        std::fs::write(home.join("bottles/work.md"), bottle).unwrap();
        let mut overrides = vec![format!("gitea.test={}", gitea.addr())];
        let model = model.map(|(api, script)| {
            let host = match api {
                Api::Anthropic => "api.anthropic.com",
                Api::OpenAi => "api.openai.com",
            };
            let config = FixtureConfig::new(script)
                .with_expected_key(MODEL_KEY)
                .with_tls(pki.identity(&[host]));
            let fixture = match api {
                Api::Anthropic => rt.block_on(anthropic::start(config)),
                Api::OpenAi => rt.block_on(openai::start(config)),
            }
            .unwrap();
            overrides.push(format!("{host}={}", fixture.addr()));
            fixture
        });
        let ca = ca_file.path().display().to_string();
        let env = vec![
            (
                "FORGE_GITEA_API".into(),
                format!("https://127.0.0.1:{}/api/v1", gitea.addr().port()),
            ),
            ("FORGE_GIT_URL".into(), "https://gitea.test".into()),
            ("FORGE_CA_FILE".into(), ca.clone()),
            ("FORGE_BOT_USER".into(), "bot".into()),
            ("FORGE_TOKEN".into(), TOKEN.into()),
            ("FORGE_WEBHOOK_SECRET".into(), SECRET.into()),
            ("FORGE_LISTEN".into(), format!("127.0.0.1:{}", free_port())),
            ("BOT_BOTTLE_UPSTREAM_OVERRIDES".into(), overrides.join(",")),
            ("BOT_BOTTLE_UPSTREAM_CA".into(), ca),
            ("BB_TEST_ANTHROPIC_KEY".into(), MODEL_KEY.into()),
            ("BB_TEST_OPENAI_KEY".into(), MODEL_KEY.into()),
        ];
        Self {
            project,
            gitea,
            _rt: rt,
            env,
            _ca_file: ca_file,
            model,
        }
    }

    pub fn home(&self) -> &Path {
        self.project.home.path()
    }

    pub fn listen(&self) -> String {
        self.setting("FORGE_LISTEN")
    }

    pub fn setting(&self, key: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap()
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.project.cmd(args);
        cmd.current_dir(self.home());
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        let out = self.cmd(args).output().unwrap();
        eprintln!(
            "$ bot-bottle {}\n--- stdout\n{}--- stderr\n{}--- exit {:?}",
            args.join(" "),
            stdout(&out),
            stderr(&out),
            out.status.code()
        );
        out
    }

    /// Starts `orchestrate serve` and waits for its listener; registers the webhook. The
    /// child is the binary itself (not under `timeout`), so killing it kills the
    /// orchestrator.
    pub fn serve(&self) -> Server {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut command = Command::new(crate::common::bin());
        command
            .args(["orchestrate", "serve"])
            .current_dir(self.home())
            .env("BOT_BOTTLE_HOME", self.home())
            .env("BOT_BOTTLE_LOOPBACK_ONLY", "1")
            .env_remove("BOT_BOTTLE_TRIPWIRE");
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::from(log.reopen().unwrap()))
            .spawn()
            .unwrap();
        let listen = self.listen();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&listen).is_err() {
            assert!(
                Instant::now() < deadline,
                "orchestrate serve did not listen: {}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.gitea
            .add_webhook(
                "acme",
                "widget",
                &format!("http://{listen}/webhook"),
                SECRET,
            )
            .unwrap();
        Server {
            child: Some(child),
            log,
        }
    }

    pub fn status(&self) -> Vec<Value> {
        let out = self
            .cmd(&["orchestrate", "status", "--json"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until the run of issue `issue` satisfies `done`, printing the server log on
    /// a timeout.
    pub fn wait_for(
        &self,
        server: &Server,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(row) = self.status().into_iter().find(|r| done(r)) {
                return row;
            }
            if Instant::now() >= deadline {
                for entry in std::fs::read_dir(self.home().join("state"))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    for event in Self::lines(&entry.path().join("egress.jsonl")) {
                        if event["decision"] == "block" {
                            eprintln!("blocked: {event}");
                        }
                    }
                }
                panic!(
                    "timed out waiting for {what}; status: {:?}\n--- orchestrator log\n{}",
                    self.status(),
                    server.log()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn state(&self, slug: &str) -> PathBuf {
        self.home().join("state").join(slug)
    }

    pub fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

pub struct Server {
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Server {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// SIGKILL: the orchestrator gets no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        eprintln!("--- orchestrator log\n{}", self.log());
    }
}

const CLAUDE_AGENT: &str = "---\nprovider: claude\nbottles: work\n---\nYou fix issues.\n";
use crate::agents::CUSTODY_BOTTLE as CLAUDE_BOTTLE;

fn tool(name: &str, input: Value) -> Turn {
    Turn::Tool {
        name: format!("mcp__forge__{name}"),
        input,
    }
}

const GIT: &str = "git -c user.name=agent -c user.email=agent@example.invalid";

/// The headline story with the real Claude Code CLI: labelled issue → the agent reads it
/// through the sidecar, clones, commits, pushes its branch, opens a PR, tries two things
/// it may not do, signals done → frozen; a review comment → resumed, pushes a fix →
/// frozen again; the PR is merged → destroyed.
#[test]
fn docker_forge_issue_to_pr_review_and_close_with_claude() {
    let script = Script::new(vec![
        tool("read_issue", json!({"number": 1})),
        Turn::Shell {
            command: format!(
                "cd /workspace && git clone -q \"$BOT_BOTTLE_FORGE_CLONE_URL\" w && cd w && git checkout -q -b \"$BOT_BOTTLE_FORGE_BRANCH\" && echo fixed > fix.txt && git add fix.txt && {GIT} commit -qm 'Fix the widget' && git push -q origin HEAD && (git push origin HEAD:main 2>&1 || echo main-refused)"
            ),
        },
        tool(
            "create_pr",
            json!({"title": "Fix the widget", "body": "Closes #1"}),
        ),
        tool(
            "post_comment",
            json!({"number": 2, "body": "hello from the bottle"}),
        ),
        tool(
            "signal_done",
            json!({"status": "done", "summary": "Fixed the widget in fix.txt."}),
        ),
        Turn::Text("done".into()),
        Turn::Shell {
            command: format!(
                "cd /workspace/w && echo reviewed >> fix.txt && {GIT} commit -qam 'Address review' && git push -q origin HEAD"
            ),
        },
        tool(
            "signal_done",
            json!({"status": "done", "summary": "Addressed the review."}),
        ),
        Turn::Text("done again".into()),
    ]);
    let forge = Forge::new(CLAUDE_AGENT, CLAUDE_BOTTLE, Some(script));
    let server = forge.serve();

    forge
        .gitea
        .label_issue("acme", "widget", 1, "bot-bottle:implementer", "alice")
        .unwrap();
    let row = forge.wait_for(&server, "the first freeze", Duration::from_secs(600), |r| {
        r["issue"] == 1 && r["state"] == "frozen"
    });
    let slug = row["slug"].as_str().unwrap().to_owned();
    for event in Forge::lines(&forge.state(&slug).join("egress.jsonl")) {
        if event["decision"] == "block" {
            eprintln!("blocked: {event}");
        }
    }
    let branch = format!("bot-bottle/{slug}");
    let pr = row["pr"].as_u64().expect("the run's PR is recorded");
    assert!(
        row["note"].as_str().unwrap().contains("signalled done"),
        "{row}"
    );

    // The model saw only the real key (the bottle held a placeholder).
    let model_requests = forge.model.as_ref().unwrap().requests();
    assert!(model_requests.len() >= 6, "{}", model_requests.len());

    // The branch was pushed through the gateway; main was not touched.
    let refs = forge.gitea.git_refs("acme", "widget").unwrap();
    let head = refs
        .get(&format!("refs/heads/{branch}"))
        .expect("branch pushed")
        .clone();
    assert_eq!(
        forge
            .gitea
            .git_file("acme", "widget", &branch, "fix.txt")
            .unwrap()
            .as_deref(),
        Some("fixed\n")
    );
    assert_eq!(
        forge
            .gitea
            .git_file("acme", "widget", "main", "fix.txt")
            .unwrap(),
        None
    );
    // The push to main was refused by the gateway and audited, naming the ref.
    let egress = Forge::lines(&forge.state(&slug).join("egress.jsonl"));
    assert!(
        egress.iter().any(|e| e["decision"] == "block"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("refs/heads/main"))),
        "no refused push to main in the audit: {egress:#?}"
    );
    assert!(
        egress
            .iter()
            .any(|e| e["decision"] == "allow" && e["credential"] == "forge-token"),
        "the forge token was never injected: {egress:#?}"
    );
    // The summary and the provenance were posted; the write to #2 was refused.
    let comments = forge.gitea.comment_bodies("acme", "widget", 1);
    assert!(
        comments
            .iter()
            .any(|c| c.contains("Fixed the widget in fix.txt.")),
        "{comments:?}"
    );
    assert!(forge.gitea.comment_bodies("acme", "widget", 2).is_empty());
    let pr_comments = forge.gitea.comment_bodies("acme", "widget", pr);
    assert!(
        pr_comments.iter().any(|c| c.contains("provenance verify")),
        "{pr_comments:?}"
    );
    let ops = Forge::lines(&forge.state(&slug).join("forge-ops.jsonl"));
    let tools: Vec<&str> = ops.iter().filter_map(|o| o["reason"].as_str()).collect();
    for expected in ["read_issue", "create_pr", "post_comment", "signal_done"] {
        assert!(
            tools.contains(&expected),
            "{expected} missing from {tools:?}"
        );
    }
    assert!(
        ops.iter()
            .any(|o| o["reason"] == "post_comment" && o["decision"] == "block"),
        "the refused write is not in forge-ops.jsonl: {ops:#?}"
    );

    // A review comment resumes the run; it pushes a fix and is frozen again.
    forge
        .gitea
        .comment_as(
            "acme",
            "widget",
            pr,
            "alice",
            "Please also note the review.",
        )
        .unwrap();
    let row = forge.wait_for(
        &server,
        "the second freeze",
        Duration::from_secs(600),
        |r| r["issue"] == 1 && r["state"] == "frozen" && r["resume_rounds"] == 1,
    );
    assert!(
        row["note"].as_str().unwrap().contains("signalled done"),
        "{row}"
    );
    let refs = forge.gitea.git_refs("acme", "widget").unwrap();
    assert_ne!(
        refs.get(&format!("refs/heads/{branch}")),
        Some(&head),
        "no new push"
    );
    assert_eq!(
        forge
            .gitea
            .git_file("acme", "widget", &branch, "fix.txt")
            .unwrap()
            .as_deref(),
        Some("fixed\nreviewed\n")
    );
    assert!(
        forge
            .gitea
            .comment_bodies("acme", "widget", 1)
            .iter()
            .any(|c| c.contains("Addressed the review."))
    );

    // Both logs verify, and the egress chain runs unbroken across freeze and resume.
    let verify = forge.run(&["audit", "verify", &slug, "--json"]);
    assert_eq!(verify.status.code(), Some(0), "{}", stdout(&verify));
    let gateway_starts = Forge::lines(&forge.state(&slug).join("egress.jsonl"))
        .iter()
        .filter(|e| e["kind"] == "gateway" && e["reason"] == "gateway-started")
        .count();
    assert!(gateway_starts >= 2, "two sessions, one chain");
    let ops_report =
        bot_bottle_egress::audit::verify(&forge.state(&slug).join("forge-ops.jsonl")).unwrap();
    assert!(ops_report.is_ok(), "{ops_report:?}");

    // The provenance verifies, with bot-bottle and with securesystemslib.
    let envelope = forge.state(&slug).join("provenance.json");
    let key = forge.home().join("keys/provenance.ed25519.pub");
    let out = forge.run(&[
        "provenance",
        "verify",
        envelope.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = report.to_string();
    assert!(text.contains("gitCommit"), "{text}");
    assert!(text.contains("forge-ops"), "{text}");
    let sslib = crate::provenance::sslib_verify(&envelope, key.to_str().unwrap());
    assert_eq!(sslib.status.code(), Some(0));

    // The token never reached the bottle: not in its environment, its image or its files.
    let inspect = Command::new("docker")
        .args(["image", "inspect", "--format", "{{json .Config.Env}}"])
        .arg(format!("bot-bottle/frozen:{slug}-2"))
        .output()
        .unwrap();
    assert!(!stdout(&inspect).contains(TOKEN));
    let save = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "docker save bot-bottle/frozen:{slug}-2 | grep -a -c {TOKEN} || true"
        ))
        .output()
        .unwrap();
    assert_eq!(
        stdout(&save).trim(),
        "0",
        "the token is in the frozen image"
    );
    for entry in walk(&forge.state(&slug)) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "the token is in {}",
            entry.display()
        );
    }
    assert!(
        !server.log().contains(TOKEN),
        "the token is in the orchestrator's output"
    );

    // Merging the PR destroys the bottle; its logs are archived.
    forge.gitea.close("acme", "widget", pr, true);
    forge.wait_for(&server, "destroy", Duration::from_secs(120), |r| {
        r["issue"] == 1
            && r["state"] == "destroyed"
            && r["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("destroyed"))
    });
    assert!(!forge.state(&slug).exists());
    assert!(forge.home().join(format!("audit/{slug}.jsonl")).exists());
    assert!(
        forge
            .home()
            .join(format!("audit/{slug}.forge-ops.jsonl"))
            .exists()
    );
    drop(server);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    out
}

const COMMAND_BOTTLE: &str = "---\negress:\n  rules: []\n---\n";

fn command_agent(script: &str) -> String {
    format!(
        "---\nprovider: command\ncommand: [\"bash\", \"-c\", {}]\nbottles: work\n---\n",
        serde_json::to_string(script).unwrap()
    )
}

/// The watchdog freezes a run that stops calling its sidecar, says so on the issue, and
/// records `watchdog_fired` (in the store and in the session's provenance).
#[test]
fn docker_forge_watchdog_freezes_a_silent_run() {
    let agent = command_agent(
        "/opt/bot-bottle/bot-bottle tool forge read_issue '{\"number\": 1}' >/dev/null && sleep 120",
    );
    let mut forge = Forge::new(&agent, COMMAND_BOTTLE, None);
    forge.set("FORGE_WATCHDOG_TIMEOUT", "4s");
    let started = Instant::now();
    let out = forge.run(&[
        "orchestrate",
        "start",
        "--repo",
        "acme/widget",
        "--issue",
        "1",
        "--agent",
        "implementer",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(100),
        "the watchdog did not stop the run"
    );
    let row: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["state"], "frozen");
    assert_eq!(row["watchdog_fired"], true);
    let comments = forge.gitea.comment_bodies("acme", "widget", 1);
    assert!(
        comments.iter().any(|c| c.contains("watchdog")),
        "{comments:?}"
    );
    let slug = row["slug"].as_str().unwrap();
    let envelope = std::fs::read_to_string(forge.state(slug).join("provenance.json")).unwrap();
    let envelope: Value = serde_json::from_str(&envelope).unwrap();
    let payload = base64_decode(envelope["payload"].as_str().unwrap());
    let statement: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        statement["predicate"]["runDetails"]["metadata"]["watchdogFired"],
        true
    );
    let destroyed = forge.run(&["destroy", slug]);
    assert_eq!(destroyed.status.code(), Some(0));
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

/// The orchestrator is killed (SIGKILL) while a run works; started again, it stops the
/// stranded bottle and resumes the run, which completes once: one summary comment, one
/// PR, a frozen run.
#[test]
fn docker_forge_orchestrator_killed_mid_run_completes_the_run_once() {
    let agent = command_agent(
        r#"set -e
T=/opt/bot-bottle/bot-bottle
$T tool forge read_issue '{"number": 1}' >/dev/null
if [ ! -f /workspace/started ]; then touch /workspace/started; sleep 300; fi
cd /workspace
[ -d w ] || git clone -q "$BOT_BOTTLE_FORGE_CLONE_URL" w
cd w
git checkout -q -B "$BOT_BOTTLE_FORGE_BRANCH"
echo once > once.txt
git add once.txt
git -c user.name=a -c user.email=a@example.invalid commit -qm once || true
git push -q origin HEAD
$T tool forge create_pr '{"title": "Once", "body": "Closes #1"}' >/dev/null
$T tool forge signal_done '{"status": "done", "summary": "Completed once."}'
"#,
    );
    let mut forge = Forge::new(&agent, COMMAND_BOTTLE, None);
    let mut server = forge.serve();
    forge
        .gitea
        .label_issue("acme", "widget", 1, "bot-bottle:implementer", "alice")
        .unwrap();
    let row = forge.wait_for(&server, "the run to start", Duration::from_secs(300), |r| {
        r["issue"] == 1 && r["state"] == "running"
    });
    let slug = row["slug"].as_str().unwrap().to_owned();
    // Wait until the agent is in its long sleep (it has called the sidecar).
    let ops = forge.state(&slug).join("forge-ops.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while Forge::lines(&ops).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the agent never called its sidecar\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(1));
    server.kill();
    // Killed: nothing watches the run now. A new orchestrator adopts it.
    forge.set("FORGE_LISTEN", &format!("127.0.0.1:{}", free_port()));
    let server = forge.serve();
    let row = forge.wait_for(
        &server,
        "the run to complete",
        Duration::from_secs(300),
        |r| r["issue"] == 1 && r["state"] == "frozen",
    );
    assert_eq!(row["slug"], slug.as_str(), "the run was started twice");
    assert_eq!(forge.status().len(), 1);
    let summaries = forge
        .gitea
        .comment_bodies("acme", "widget", 1)
        .into_iter()
        .filter(|c| c.contains("Completed once."))
        .count();
    assert_eq!(summaries, 1, "the run completed {summaries} times");
    assert_eq!(forge.gitea.pull_numbers("acme", "widget").len(), 1);
    drop(server);
}

/// Settings are checked before anything starts, each refusal with a hint; secrets are
/// never accepted in the settings file.
#[test]
fn orchestrate_refuses_missing_or_unsafe_settings_with_a_hint() {
    let project = Project::new();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = project.cmd(args);
        for key in bot_bottle_orchestrator::config::KEYS {
            cmd.env_remove(key);
        }
        for (key, value) in env {
            cmd.env(key, value);
        }
        let out = cmd.output().unwrap();
        (out.status.code(), stderr(&out))
    };
    let (code, err) = run(&["orchestrate", "serve"], &[]);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("FORGE_GITEA_API") && err.contains("hint:"),
        "{err}"
    );
    let (code, err) = run(
        &["orchestrate", "status"],
        &[
            ("FORGE_GITEA_API", "https://gitea.example/api/v1"),
            ("FORGE_BOT_USER", "bot"),
            ("FORGE_TOKEN", "t"),
            ("FORGE_WATCHDOG_TIMEOUT", "soon"),
        ],
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("FORGE_WATCHDOG_TIMEOUT") && err.contains("hint:"),
        "{err}"
    );
    let file = project.home.path().join("orchestrator.toml");
    std::fs::write(&file, "FORGE_WEBHOOK_SECRET = \"plain\"\n").unwrap();
    let (code, err) = run(&["orchestrate", "status"], &[]);
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("may not be written"), "{err}");
    assert!(!err.contains("plain"), "the secret was echoed: {err}");
}

/// `bot-bottle tool forge` outside a forge bottle says where it works.
#[test]
fn tool_forge_outside_a_bottle_is_a_usage_error() {
    let project = Project::new();
    let out = project
        .cmd(&["tool", "forge", "read_issue", "{\"number\": 1}"])
        .env_remove("BOT_BOTTLE_FORGE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("hint:"), "{}", stderr(&out));
}

/// codex registers the sidecar from its `config.toml` (`[mcp_servers.forge]`) and calls
/// its tools: a `signal_done` through codex's own MCP client freezes the run.
#[test]
fn docker_forge_codex_calls_the_sidecar_through_its_mcp_config() {
    let script = Script::new(vec![
        Turn::Tool {
            name: "mcp__forge__read_issue".into(),
            input: json!({"number": 1}),
        },
        Turn::Tool {
            name: "mcp__forge__signal_done".into(),
            input: json!({"status": "blocked", "summary": "Codex needs a decision."}),
        },
        Turn::Text("waiting".into()),
    ]);
    let agent = "---\nprovider: codex\nmodel: fixture-model\nbottles: work\n---\nYou fix issues.\n";
    let bottle = "---\negress:\n  audit: all\n  rules:\n    - host: api.openai.com\n      methods: [POST]\n      paths: [\"/v1/responses\"]\ncredentials:\n  - name: openai\n    source: {env: BB_TEST_OPENAI_KEY}\n    hosts: [api.openai.com]\n    inject: bearer\n    env: OPENAI_API_KEY\n---\n";
    let forge = Forge::with_model(agent, bottle, Some((Api::OpenAi, script)));
    let out = forge.run(&[
        "orchestrate",
        "start",
        "--repo",
        "acme/widget",
        "--issue",
        "1",
        "--agent",
        "implementer",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let row: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["note"], "signalled blocked", "{row}");
    let comments = forge.gitea.comment_bodies("acme", "widget", 1);
    assert!(
        comments
            .iter()
            .any(|c| c.contains("Codex needs a decision.")),
        "{comments:?}"
    );
    let slug = row["slug"].as_str().unwrap();
    let ops = Forge::lines(&forge.state(slug).join("forge-ops.jsonl"));
    assert_eq!(ops[0]["reason"], "read_issue", "{ops:?}");
    let destroyed = forge.run(&["destroy", slug]);
    assert_eq!(destroyed.status.code(), Some(0));
}
