//! Docker: the bottle lifecycle and the sealed network, with the `command` provider.

use crate::common::{COMMAND_BOTTLE, Project, bash_agent, slug_of, stderr, stdout};

/// Writes a note on the first session; prints it when resumed with the prompt `check`.
const NOTE_AGENT: &str = r#"---
provider: command
command: ["bash", "-c", "if [ \"$BOT_BOTTLE_PROMPT\" = check ]; then cat /workspace/note.txt; else echo \"frozen $BOT_BOTTLE_PROMPT\" > /workspace/note.txt; echo written; fi"]
bottles: plain
---
"#;

#[test]
fn docker_start_freeze_resume_destroy() {
    let project = Project::new();
    project
        .agent("noter", NOTE_AGENT)
        .bottle("plain", COMMAND_BOTTLE);
    // --cwd copies the workspace in, so the note lives only in the bottle's filesystem
    // and survives only through freeze → resume.
    let out = project.run(&[
        "start",
        "noter",
        "--headless",
        "--prompt",
        "data",
        "--cwd",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let slug = slug_of(&out);
    assert!(
        !project.path().join("note.txt").exists(),
        "copy mode must not write to the host"
    );

    let out = project.run(&["freeze", &slug, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let frozen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(frozen["status"], "frozen");

    let out = project.run(&["ps", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["slug"], slug.as_str());
    assert_eq!(rows[0]["status"], "frozen");

    let out = project.run(&["resume", &slug, "--headless", "--prompt", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("frozen data"),
        "resume did not see the file: {}",
        stdout(&out)
    );

    // One hash chain across both sessions: the resumed gateway continued the log.
    let events = project.audit_lines(&slug);
    let starts = events
        .iter()
        .filter(|e| e["reason"] == "gateway-started")
        .count();
    assert_eq!(starts, 2, "{events:?}");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "sequence not continuous"
    );
    let verify = project.run(&["audit", "verify", &slug]);
    assert_eq!(verify.status.code(), Some(0), "{}", stderr(&verify));

    let out = project.run(&["destroy", &slug]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(project.state_dirs().is_empty(), "state dir left behind");
    // The record of what the bottle sent out outlives it.
    let archived = project.home.path().join(format!("audit/{slug}.jsonl"));
    assert!(archived.is_file(), "the audit log was not archived");
    let verify = project.run(&["audit", "verify", &slug, "--json"]);
    assert_eq!(verify.status.code(), Some(0), "{}", stderr(&verify));
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    let head = &report["heads_checked"][0];
    assert_eq!(head["seq"], report["last_seq"], "{report}");
    let expect = format!("{}:{}", head["seq"], head["hash"].as_str().unwrap());
    // Cutting the last line leaves a valid chain; the head recorded at the session's end
    // (and the copy a caller kept) show the cut.
    let text = std::fs::read_to_string(&archived).unwrap();
    let cut: Vec<&str> = text.lines().collect();
    std::fs::write(&archived, cut[..cut.len() - 1].join("\n") + "\n").unwrap();
    let verify = project.run(&["audit", "verify", &slug]);
    assert_eq!(verify.status.code(), Some(1), "{}", stderr(&verify));
    assert!(
        stderr(&verify).contains("removed from the end"),
        "{}",
        stderr(&verify)
    );
    std::fs::remove_file(project.home.path().join(format!("audit/{slug}.head.json"))).unwrap();
    let verify = project.run(&["audit", "verify", &slug, "--expect", &expect]);
    assert_eq!(verify.status.code(), Some(1), "{}", stderr(&verify));
    let verify = project.run(&["audit", "verify", &slug, "--expect", "12:nothex"]);
    assert_eq!(verify.status.code(), Some(2), "{}", stderr(&verify));
    assert!(stderr(&verify).contains("SEQ:HASH") || stderr(&verify).contains("64-digit"));
    std::fs::write(&archived, text).unwrap();
    let out = project.run(&["ps", "--json"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    let images = std::process::Command::new("docker")
        .args([
            "images",
            "-q",
            "--filter",
            &format!("label=dev.bot-bottle.slug={slug}"),
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&images).trim(), "", "frozen image left behind");
    // Destroying again is not an error.
    let out = project.run(&["destroy", &slug]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn docker_exit_code_passes_through_and_bind_mount_writes_to_host() {
    let project = Project::new();
    project
        .agent("exiter", "---\nprovider: command\ncommand: [\"bash\", \"-c\", \"echo hi > /workspace/out.txt; exit 7\"]\nbottles: plain\n---\n")
        .bottle("plain", COMMAND_BOTTLE);
    let out = project.run(&["start", "exiter", "--headless", "--prompt", "x"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(project.path().join("out.txt")).unwrap(),
        "hi\n"
    );
}

#[test]
fn docker_label_collision_is_uniquified() {
    let project = Project::new();
    project
        .agent(
            "sleeper",
            "---\nprovider: command\ncommand: [\"sleep\", \"20\"]\nbottles: plain\n---\n",
        )
        .bottle("plain", COMMAND_BOTTLE);
    let mut first = project
        .cmd(&["start", "sleeper", "--headless", "--prompt", "x", "--json"])
        .spawn()
        .unwrap();
    // Wait until the first bottle is running.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let out = project.run(&["ps", "--json"]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if rows
            .as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["status"] == "running"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "first bottle never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let out = project.run(&[
        "start",
        "sleeper",
        "--headless",
        "--prompt",
        "x",
        "--dry-run",
    ]);
    assert!(
        stdout(&out).contains("label      sleeper\n"),
        "dry run does not uniquify: {}",
        stdout(&out)
    );
    let mut second = project
        .cmd(&["start", "sleeper", "--headless", "--prompt", "x"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let _ = second.kill();
    let _ = first.kill();
    let _ = second.wait();
    let _ = first.wait();
    let err = std::io::read_to_string(second.stderr.take().unwrap()).unwrap_or_default();
    assert!(
        err.contains("label `sleeper` is in use by a running bottle; using `sleeper-2`"),
        "{err}"
    );
}

/// With the tripwire off, every way out that bypasses the gateway must still fail (in the
/// bottle's own kernel: it has loopback only); the gateway's own answer to a disallowed
/// host is a 403 with a reason header, and it is audited. The escape suite runs the same
/// attempts with the tripwire on and checks they are audited too.
const GATEWAY_SCRIPT: &str = r#"
curl -sS -m 10 -o /dev/null -D - http://blocked.example/path | tr -d '\r' | grep -i -E '^(HTTP/|x-bot-bottle-block)'
curl -sS -m 10 https://blocked.example/ 2>&1 | head -1
ip -o link 2>/dev/null | cut -d: -f2 | tr -d ' ' | tr '\n' ' ' ; cat /sys/class/net/*/operstate >/dev/null 2>&1; ls /sys/class/net
"#;

#[test]
fn docker_sealed_network_without_the_tripwire() {
    let mut project = Project::new();
    project
        .env
        .push(("BOT_BOTTLE_TRIPWIRE".to_owned(), "off".to_owned()));
    let agent = bash_agent(
        &format!("{}{GATEWAY_SCRIPT}", crate::escape::DIRECT_ATTEMPTS),
        "plain",
    );
    project
        .agent("escaper", &agent)
        .bottle("plain", COMMAND_BOTTLE);
    let out = project.run(&["start", "escaper", "--headless", "--prompt", "x", "--json"]);
    // With --json the agent's output goes to stderr, keeping stdout for the result.
    let text = stderr(&out);
    for attempt in crate::escape::DIRECT_NAMES {
        assert!(
            text.contains(&format!("{attempt} SEALED")),
            "{attempt} not sealed:\n{text}"
        );
    }
    assert!(!text.contains("ESCAPED"), "{text}");
    assert!(text.contains("HTTP/1.1 403"), "{text}");
    assert!(
        text.contains("x-bot-bottle-block: not-in-allowlist"),
        "{text}"
    );
    // Only loopback exists inside: no tripwire device.
    assert!(text.lines().any(|line| line.trim() == "lo"), "{text}");
    assert!(!text.contains("tripwire0"), "{text}");
    let slug = project.state_dirs().pop().unwrap();
    let blocks: Vec<serde_json::Value> = project
        .audit_lines(&slug)
        .into_iter()
        .filter(|event| event["decision"] == "block")
        .collect();
    assert!(
        blocks
            .iter()
            .any(|e| e["host"] == "blocked.example" && e["method"] == "GET"),
        "no audit entry for the plain-HTTP block: {blocks:?}"
    );
    assert!(
        blocks
            .iter()
            .any(|e| e["host"] == "blocked.example" && e["method"] == "CONNECT"),
        "no audit entry for the CONNECT block: {blocks:?}"
    );
    let verify = project.run(&["audit", "verify", &slug]);
    assert_eq!(verify.status.code(), Some(0), "{}", stderr(&verify));
}

/// `bot-bottle` itself, without the `timeout` wrapper, so a test can signal it.
fn direct(project: &Project, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(crate::common::bin());
    cmd.args(args)
        .current_dir(project.path())
        .env("BOT_BOTTLE_HOME", project.home.path())
        .env("BOT_BOTTLE_LOOPBACK_ONLY", "1")
        .env("BOT_BOTTLE_TRUST_PROJECT_MANIFESTS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn container_running(slug: &str) -> bool {
    let out = std::process::Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{.State.Running}}",
            &format!("bot-bottle-{slug}"),
        ])
        .output()
        .unwrap();
    stdout(&out).trim() == "true"
}

/// Probes the gateway every 200 ms and logs each answer's status to the workspace.
const PROBE_AGENT: &str = r#"---
provider: command
command: ["bash", "-c", "for i in $(seq 1 300); do curl -s -m 2 -o /dev/null -w '%{http_code}\n' http://blocked.example/ >> /workspace/probe.log; sleep 0.2; done"]
bottles: plain
---
"#;

/// Starts the probing agent with `bot-bottle` as a direct child, once its first probe was
/// answered by the gateway. Returns the child, the slug and the probe log.
fn start_prober(project: &Project) -> (std::process::Child, String, std::path::PathBuf) {
    project
        .agent("prober", PROBE_AGENT)
        .bottle("plain", COMMAND_BOTTLE);
    let child = direct(project, &["start", "prober", "--headless", "--prompt", "x"])
        .spawn()
        .unwrap();
    let probe_log = project.path().join("probe.log");
    wait_for("the first probe", || {
        std::fs::read_to_string(&probe_log).is_ok_and(|log| log.contains("403"))
    });
    let slug = project.state_dirs().pop().unwrap();
    (child, slug, probe_log)
}

#[test]
fn docker_sigterm_stops_the_bottle_and_keeps_the_audit() {
    let project = Project::new();
    let (child, slug, _) = start_prober(&project);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("interrupted by SIGTERM"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(&format!("bot-bottle resume {slug}")),
        "{}",
        stderr(&out)
    );
    assert!(!container_running(&slug), "the bottle outlived its gateway");
    let ps = project.run(&["ps", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&ps.stdout).unwrap();
    assert_eq!(rows[0]["status"], "stopped");
    let verify = project.run(&["audit", "verify", &slug]);
    assert_eq!(verify.status.code(), Some(0), "{}", stderr(&verify));
}

/// If the host process dies without any chance to clean up, the bottle keeps running but
/// nothing gets out: the gateway socket has no listener, and the bottle has no route.
#[test]
fn docker_gateway_death_fails_closed() {
    let project = Project::new();
    let (mut child, slug, probe_log) = start_prober(&project);
    child.kill().unwrap();
    let _ = child.wait();
    let answered = std::fs::read_to_string(&probe_log).unwrap().lines().count();
    wait_for("probes after the gateway died", || {
        std::fs::read_to_string(&probe_log).is_ok_and(|log| log.lines().count() >= answered + 5)
    });
    let log = std::fs::read_to_string(&probe_log).unwrap();
    let after: Vec<&str> = log.lines().skip(answered + 1).collect();
    assert!(
        after.iter().all(|status| *status == "000"),
        "requests got answers after the gateway died: {after:?}"
    );
    assert!(
        container_running(&slug),
        "expected the orphaned bottle to still run (that is what is being tested)"
    );
    let verify = project.run(&["audit", "verify", &slug]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "the audit log was damaged: {}",
        stderr(&verify)
    );
    // Project's Drop destroys the orphan.
}

#[test]
fn docker_rm_removes_the_bottle_and_keeps_its_audit_log() {
    let project = Project::new();
    project
        .agent("exiter", "---\nprovider: command\ncommand: [\"bash\", \"-c\", \"curl -s -o /dev/null http://blocked.example/; exit 4\"]\nbottles: plain\n---\n")
        .bottle("plain", COMMAND_BOTTLE);
    let out = project.run(&[
        "start",
        "exiter",
        "--headless",
        "--prompt",
        "x",
        "--rm",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let slug = slug_of(&out);
    assert!(project.state_dirs().is_empty(), "--rm left state behind");
    let containers = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.bot-bottle.slug={slug}"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&containers).trim(),
        "",
        "--rm left the container behind"
    );
    let audit = project.run(&["audit", &slug, "--json"]);
    assert_eq!(audit.status.code(), Some(0), "{}", stderr(&audit));
    assert!(
        stdout(&audit).contains("blocked.example"),
        "{}",
        stdout(&audit)
    );
}

/// `git` on the host for the test's own repository (owned by the agent's uid when the
/// tests run as root, hence `safe.directory`).
fn host_git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "safe.directory=*",
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.test",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", stderr(&out));
    stdout(&out).trim().to_owned()
}

#[test]
fn docker_provenance_names_the_sessions_commit_and_the_audit_head() {
    let project = Project::new();
    project
        .agent(
            "committer",
            &bash_agent(
                "cd /workspace && echo work > work.txt && git add work.txt && git -c user.name=agent -c user.email=agent@example.test commit -q -m 'agent work' && echo committed",
                "plain",
            ),
        )
        .bottle("plain", COMMAND_BOTTLE);
    host_git(project.path(), &["init", "-q"]);
    host_git(
        project.path(),
        &["commit", "-q", "--allow-empty", "-m", "base"],
    );
    let base = host_git(project.path(), &["rev-parse", "HEAD"]);
    if nix::unistd::getuid().is_root() {
        let status = std::process::Command::new("chown")
            .args(["-R", &format!("{0}:{0}", crate::common::AGENT_UID)])
            .arg(project.path())
            .status()
            .unwrap();
        assert!(status.success());
    }

    let out = project.run(&[
        "start",
        "committer",
        "--headless",
        "--prompt",
        "commit",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let slug = result["slug"].as_str().unwrap().to_owned();
    let head = host_git(project.path(), &["rev-parse", "HEAD"]);
    assert_ne!(base, head, "the agent made no commit");

    let file = project
        .home
        .path()
        .join(format!("state/{slug}/provenance.json"));
    assert_eq!(result["provenance"], file.display().to_string());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(0o600, mode);
    let history: Vec<_> = std::fs::read_dir(file.with_extension(""))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(1, history.len(), "one file per session");

    let key = project.home.path().join("keys/provenance.ed25519.pub");
    let verify = project.run(&[
        "provenance",
        "verify",
        &file.display().to_string(),
        "--key",
        &key.display().to_string(),
        "--json",
    ]);
    assert_eq!(verify.status.code(), Some(0), "{}", stderr(&verify));
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(report["egress_head"]["status"], "reached");
    let statement = &report["statement"];
    // The subject is the session's one commit, not the base it started from.
    let subjects = statement["subject"].as_array().unwrap();
    assert_eq!(1, subjects.len(), "{subjects:?}");
    assert_eq!(subjects[0]["digest"]["gitCommit"], head.as_str());
    let build = &statement["predicate"]["buildDefinition"];
    assert_eq!(
        build["resolvedDependencies"][0]["digest"]["gitCommit"],
        base.as_str()
    );
    assert!(
        build["resolvedDependencies"][1]["digest"]["sha256"]
            .as_str()
            .is_some_and(|d| d.len() == 64),
        "the image id: {build}"
    );
    assert_eq!(build["externalParameters"]["agent"], "committer");
    let details = &statement["predicate"]["runDetails"];
    assert_eq!(details["metadata"]["outcome"], "exited");
    assert_eq!(details["metadata"]["exitCode"], 0);
    assert_eq!(details["metadata"]["watchdogFired"], false);
    // The head the statement carries is the one the launch printed.
    let egress = &details["byproducts"][0];
    assert_eq!(egress["name"], "egress-audit");
    assert_eq!(egress["annotations"]["head"], result["audit_head"]);
    assert!(result["audit_head"]["seq"].as_u64().unwrap() > 0);
}
