//! Bad input gets a clear error, a hint and a nonzero, documented exit code.

use crate::common::{COMMAND_BOTTLE, Project, stderr, stdout};

fn project() -> Project {
    let project = Project::new();
    project
        .agent(
            "worker",
            "---\nprovider: command\ncommand: [\"true\"]\nbottles: plain\n---\nWork.\n",
        )
        .agent("lonely", "---\nprovider: claude\n---\n")
        .bottle("plain", COMMAND_BOTTLE);
    project
}

fn assert_error(output: &std::process::Output, code: i32, needles: &[&str]) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(code), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
    }
    assert!(err.contains("hint:"), "no hint in:\n{err}");
}

#[test]
fn headless_without_agent() {
    let out = project().run(&["start", "--headless", "--prompt", "x"]);
    assert_error(&out, 2, &["--headless requires an agent name"]);
}

#[test]
fn headless_without_prompt() {
    let out = project().run(&["start", "worker", "--headless"]);
    assert_error(&out, 2, &["--headless requires --prompt"]);
}

#[test]
fn prompt_without_headless() {
    let out = project().run(&["start", "worker", "--prompt", "x"]);
    assert_error(&out, 2, &["--prompt is only valid with --headless"]);
    let out = project().run(&["resume", "worker-abcde", "--prompt", "x"]);
    assert_error(&out, 2, &["--prompt is only valid with --headless"]);
}

#[test]
fn resume_headless_without_prompt() {
    let out = project().run(&["resume", "worker-abcde", "--headless"]);
    assert_error(&out, 2, &["--headless requires --prompt"]);
}

#[test]
fn resume_unknown_slug_suggests_ps() {
    let out = project().run(&["resume", "worker-abcde", "--headless", "--prompt", "x"]);
    assert_error(
        &out,
        66,
        &["no state recorded for `worker-abcde`", "bot-bottle ps"],
    );
}

#[test]
fn unknown_agent_lists_known_ones() {
    let out = project().run(&[
        "start",
        "nobody",
        "--headless",
        "--prompt",
        "x",
        "--dry-run",
    ]);
    assert_error(&out, 78, &["unknown agent `nobody`", "`worker`"]);
}

#[test]
fn agent_without_default_bottle() {
    let out = project().run(&[
        "start",
        "lonely",
        "--headless",
        "--prompt",
        "x",
        "--dry-run",
    ]);
    assert_error(
        &out,
        78,
        &["agent `lonely` has no default bottle", "--bottle NAME"],
    );
}

#[test]
fn unknown_bottle() {
    let out = project().run(&[
        "start",
        "worker",
        "--headless",
        "--prompt",
        "x",
        "--bottle",
        "nope",
        "--dry-run",
    ]);
    assert_error(&out, 78, &["unknown bottle `nope`", "`plain`"]);
}

#[test]
fn malformed_manifest_names_file_and_line() {
    let project = project();
    project.bottle("broken", "---\negress:\n  rules: []\nimgae: {}\n---\n");
    let out = project.run(&[
        "start",
        "worker",
        "--headless",
        "--prompt",
        "x",
        "--dry-run",
    ]);
    assert_error(
        &out,
        78,
        &["bottles/broken.md:4:", "imgae", "known keys here"],
    );
}

#[test]
fn bad_egress_rule_is_refused() {
    let project = project();
    project.bottle("plain", "---\negress:\n  rules:\n    - host: \"\"\n---\n");
    let out = project.run(&[
        "start",
        "worker",
        "--headless",
        "--prompt",
        "x",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("bottles/plain.md"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unreachable_docker_daemon() {
    let mut project = project();
    project.env.push((
        "DOCKER_HOST".into(),
        "unix:///nonexistent/docker.sock".into(),
    ));
    let out = project.run(&["start", "worker", "--headless", "--prompt", "x"]);
    assert_error(&out, 69, &["cannot reach the Docker engine", "DOCKER_HOST"]);
}

#[test]
fn unknown_backend() {
    let out = project().run(&[
        "start",
        "worker",
        "--headless",
        "--prompt",
        "x",
        "--backend",
        "vmware",
        "--dry-run",
    ]);
    assert_error(&out, 78, &["unknown backend `vmware`"]);
}

#[test]
fn audit_of_unknown_slug() {
    let out = project().run(&["audit", "verify", "worker-zzzzz"]);
    assert_error(&out, 66, &["no audit log for `worker-zzzzz`"]);
}

#[test]
fn dry_run_prints_the_plan_and_launches_nothing() {
    let project = project();
    let mut cmd = project.cmd(&["start", "worker", "--headless", "--prompt", "Do it"]);
    cmd.env("BOT_BOTTLE_DRY_RUN", "1")
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out).replace(&project.path().display().to_string(), "[PROJECT]");
    // The image tag hashes the agent uid, which differs between machines.
    let text = regex_lite_replace(&text, "bot-bottle/bottle:", "[HASH]");
    insta::assert_snapshot!("dry_run_plan", text);
    assert!(project.state_dirs().is_empty());
}

#[test]
fn dry_run_json_is_machine_readable() {
    let out = project().run(&[
        "start",
        "worker",
        "--headless",
        "--prompt",
        "Do it",
        "--dry-run",
        "--json",
    ]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["agent"], "worker");
    assert_eq!(plan["bottles"], serde_json::json!(["plain"]));
    assert_eq!(plan["env"]["HTTPS_PROXY"], "http://127.0.0.1:3128");
    assert_eq!(plan["env"]["NO_PROXY"], "localhost,127.0.0.1,::1");
    assert_eq!(plan["tripwire"], true);
}

#[test]
fn the_tripwire_switch_shows_in_the_plan_and_rejects_bad_values() {
    let args = [
        "start",
        "worker",
        "--headless",
        "--prompt",
        "x",
        "--dry-run",
    ];
    let mut project = project();
    project
        .env
        .push(("BOT_BOTTLE_TRIPWIRE".to_owned(), "off".to_owned()));
    let out = project.run(&args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("tripwire off: direct attempts fail unaudited"),
        "{}",
        stdout(&out)
    );
    project.env = vec![("BOT_BOTTLE_TRIPWIRE".to_owned(), "maybe".to_owned())];
    let out = project.run(&args);
    assert_error(&out, 78, &["BOT_BOTTLE_TRIPWIRE=maybe", "`on` or `off`"]);
}

#[test]
fn agents_and_bottles_list_where_they_came_from() {
    let out = project().run(&["agents", "--json"]);
    let agents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(agents[1]["name"], "worker");
    assert_eq!(agents[1]["origin"], "project");
    let out = project().run(&["bottles"]);
    assert!(stdout(&out).contains("plain"), "{}", stdout(&out));
}

#[test]
fn help_snapshot() {
    let out = std::process::Command::new(crate::common::bin())
        .args(["start", "--help"])
        .output()
        .unwrap();
    insta::assert_snapshot!("start_help", stdout(&out));
}

/// Replaces the 16 hex digits after `marker` with `replacement`.
fn regex_lite_replace(text: &str, marker: &str, replacement: &str) -> String {
    match text.find(marker) {
        Some(at) => {
            let start = at + marker.len();
            let end = (start + 16).min(text.len());
            format!("{}{replacement}{}", &text[..start], &text[end..])
        }
        None => text.to_owned(),
    }
}

#[test]
fn unknown_color() {
    let out = project().run(&[
        "start",
        "worker",
        "--headless",
        "--prompt",
        "x",
        "--color",
        "chartreuse",
        "--dry-run",
    ]);
    assert_error(&out, 78, &["unknown color `chartreuse`", "bright-cyan"]);
}

#[test]
fn completions_are_generated() {
    let out = std::process::Command::new(crate::common::bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let script = stdout(&out);
    assert!(script.contains("complete -F _bot__bottle"), "{script}");
    assert!(script.contains("freeze"), "{script}");
}

/// Project manifests decide egress, mounts and credential commands that run on the host,
/// and a working tree (or a cloned repository) can change them: a headless start uses them
/// only once they were trusted as they are, and any change needs trusting again.
#[test]
fn untrusted_project_manifests_are_refused_until_trusted() {
    let mut project = project();
    project.env = vec![
        (
            "BOT_BOTTLE_TRUST_PROJECT_MANIFESTS".to_owned(),
            "0".to_owned(),
        ),
        (
            "DOCKER_HOST".to_owned(),
            "unix:///nonexistent/docker.sock".to_owned(),
        ),
    ];
    let start = ["start", "worker", "--headless", "--prompt", "x"];
    let out = project.run(&start);
    assert_error(&out, 78, &["not trusted as they are", "bot-bottle trust"]);
    let mut dry = start.to_vec();
    dry.push("--dry-run");
    let out = project.run(&dry);
    assert!(
        stdout(&out).contains("are new or changed since you last trusted them"),
        "{}",
        stdout(&out)
    );

    let out = project.run(&["trust", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let trusted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(trusted["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        trusted["allows"],
        serde_json::json!(["bottle plain: egress to nothing"])
    );
    // Past the trust check, the launch goes on to the (unreachable) engine.
    let out = project.run(&start);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    let out = project.run(&dry);
    assert!(!stdout(&out).contains("WARNING"), "{}", stdout(&out));

    // What the agent would do from a bind-mounted workspace: widen the policy.
    project.bottle(
        "plain",
        "---\negress:\n  rules:\n    - host: evil.example\n---\n",
    );
    let out = project.run(&start);
    assert_error(&out, 78, &["not trusted as they are"]);

    // `trust` says what it allows, host commands first among them.
    project.bottle(
        "plain",
        "---
egress:
  rules:
    - host: api.example
credentials:
  - name: token
    source: {command: \"pass show token\"}
    hosts: [api.example]
    inject: bearer
---
",
    );
    let out = project.run(&["trust"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(
            "bottle plain: egress to api.example; credential token (RUNS ON THIS HOST: pass show token) for api.example"
        ),
        "{}",
        stdout(&out)
    );
}
