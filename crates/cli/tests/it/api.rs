//! The library API (`bot_bottle::Client` and the functions it backs) against the real
//! engine, with the `command` provider. A `Client` takes the home and the shim
//! explicitly, so these tests never touch the process environment.

use bot_bottle::{BottleError, Client, GatewaySettings, StartOptions, exit_codes};
use bot_bottle_runtime::launch::RuntimeError;

use crate::common::{COMMAND_BOTTLE, Project, bin};

/// Records the prompt it was given in the workspace; the prompt `fail` exits 4.
const ECHO_AGENT: &str = r#"---
provider: command
command: ["bash", "-c", "echo \"$BOT_BOTTLE_PROMPT\" > /workspace/prompt.txt; [ \"$BOT_BOTTLE_PROMPT\" != fail ] || exit 4"]
bottles: plain
---
"#;

fn project() -> Project {
    let project = Project::new();
    project
        .agent("echoer", ECHO_AGENT)
        .agent(
            "lonely",
            "---\nprovider: command\ncommand: [\"true\"]\n---\n",
        )
        .bottle("plain", COMMAND_BOTTLE)
        .bottle("extra", COMMAND_BOTTLE);
    project
}

fn client(project: &Project) -> Client {
    Client::new(project.home.path(), bin())
        .with_gateway(GatewaySettings {
            loopback_only: true,
            ..GatewaySettings::default()
        })
        .quiet(true)
        .trust_project_manifests(true)
}

fn options(project: &Project, prompt: &str) -> StartOptions {
    StartOptions {
        cwd: Some(project.path().to_owned()),
        ..StartOptions::new(prompt)
    }
}

fn metadata(project: &Project, slug: &str) -> serde_json::Value {
    let path = project
        .home
        .path()
        .join(format!("state/{slug}/metadata.json"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn set_recorded_backend(project: &Project, slug: &str, backend: &str) {
    let mut value = metadata(project, slug);
    value["backend"] = backend.into();
    let path = project
        .home
        .path()
        .join(format!("state/{slug}/metadata.json"));
    std::fs::write(path, serde_json::to_vec(&value).unwrap()).unwrap();
}

fn docker_lines(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "docker {args:?} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn expect_err<T: std::fmt::Debug>(result: Result<T, BottleError>) -> BottleError {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(err) => err,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_api_start_returns_slug_in_default_bottle_with_label_and_color() {
    let project = project();
    let slug = client(&project)
        .start_headless(
            "echoer",
            StartOptions {
                label: Some("nightly".to_owned()),
                color: Some("green".to_owned()),
                ..options(&project, "Do it")
            },
        )
        .await
        .unwrap();
    assert!(
        slug.starts_with("nightly-") && slug.len() == "nightly-".len() + 5,
        "{slug}"
    );
    assert_eq!(project.state_dirs(), vec![slug.clone()]);
    assert_eq!(
        std::fs::read_to_string(project.path().join("prompt.txt")).unwrap(),
        "Do it\n",
        "the prompt did not reach the agent"
    );
    let recorded = metadata(&project, &slug);
    assert_eq!(recorded["identity"], slug.as_str());
    assert_eq!(recorded["agent"], "echoer");
    assert_eq!(recorded["bottles"], serde_json::json!(["plain"]));
    assert_eq!(recorded["label"], "nightly");
    assert_eq!(recorded["color"], "green");
    assert_eq!(recorded["backend"], "docker");
    assert_eq!(recorded["status"], "stopped");
    assert_eq!(recorded["exit_code"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_api_explicit_bottles_are_forwarded_in_order() {
    let project = project();
    let slug = client(&project)
        .start_headless(
            "echoer",
            StartOptions {
                bottles: vec!["extra".to_owned(), "plain".to_owned()],
                ..options(&project, "x")
            },
        )
        .await
        .unwrap();
    let recorded = metadata(&project, &slug);
    assert_eq!(recorded["bottles"], serde_json::json!(["extra", "plain"]));
    // The label defaults to the agent's name, and there is no color.
    assert_eq!(recorded["label"], "echoer");
    assert_eq!(recorded["color"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_agent_without_default_bottle_is_a_config_error() {
    let project = project();
    let err = expect_err(
        client(&project)
            .start_headless("lonely", options(&project, "x"))
            .await,
    );
    assert_eq!(err.exit_code(), exit_codes::CONFIG, "{err}");
    assert!(
        err.to_string()
            .contains("agent `lonely` has no default bottle"),
        "{err}"
    );
    assert!(err.to_string().contains("hint:"), "{err}");
    assert!(
        matches!(err.runtime_error(), Some(RuntimeError::Plan(_))),
        "{err:?}"
    );
    assert_eq!(err.slug(), None);
    assert!(project.state_dirs().is_empty(), "nothing may be launched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_unknown_explicit_backend_is_a_config_error() {
    let project = project();
    let err = expect_err(
        client(&project)
            .start_headless(
                "echoer",
                StartOptions {
                    backend: Some("smolmachines".to_owned()),
                    ..options(&project, "x")
                },
            )
            .await,
    );
    assert_eq!(err.exit_code(), exit_codes::CONFIG, "{err}");
    assert!(
        err.to_string().contains("unknown backend `smolmachines`"),
        "{err}"
    );
    assert!(project.state_dirs().is_empty(), "nothing may be launched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_api_nonzero_agent_exit_is_an_error_with_its_code_and_slug() {
    let project = project();
    let err = expect_err(
        client(&project)
            .start_headless("echoer", options(&project, "fail"))
            .await,
    );
    assert_eq!(err.exit_code(), 4, "{err}");
    assert!(err.runtime_error().is_none(), "{err:?}");
    let slug = err.slug().expect("the kept bottle's slug").to_owned();
    assert_eq!(project.state_dirs(), vec![slug.clone()]);
    assert_eq!(metadata(&project, &slug)["exit_code"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_operations_on_missing_state_are_state_errors() {
    let project = project();
    let client = client(&project);
    let err = expect_err(client.resume_headless("ghost-abcde", "x", None).await);
    assert_eq!(err.exit_code(), exit_codes::STATE, "{err}");
    assert!(
        err.to_string()
            .contains("no state recorded for `ghost-abcde`"),
        "{err}"
    );
    let err = expect_err(client.freeze("ghost-abcde", None).await);
    assert_eq!(err.exit_code(), exit_codes::STATE, "{err}");
    assert!(project.state_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_api_resume_exit_code_and_backend_from_metadata() {
    let project = project();
    let client = client(&project);
    let slug = client
        .start_headless("echoer", options(&project, "first"))
        .await
        .unwrap();

    let err = expect_err(client.resume_headless(&slug, "fail", None).await);
    assert_eq!(err.exit_code(), 4, "{err}");
    assert_eq!(err.slug(), Some(slug.as_str()));
    assert!(err.to_string().contains("resuming"), "{err}");

    // The recorded backend is used when none is given: one this build does not know
    // is refused before anything happens to the bottle.
    set_recorded_backend(&project, &slug, "smolmachines");
    let before = metadata(&project, &slug);
    let err = expect_err(client.resume_headless(&slug, "again", None).await);
    assert_eq!(err.exit_code(), exit_codes::CONFIG, "{err}");
    assert!(
        err.to_string().contains("unknown backend `smolmachines`"),
        "{err}"
    );
    let err = expect_err(client.freeze(&slug, None).await);
    assert!(
        err.to_string().contains("unknown backend `smolmachines`"),
        "{err}"
    );
    assert_eq!(
        metadata(&project, &slug),
        before,
        "a refused resume changed the bottle"
    );
    // An explicit backend overrides the recorded one, either way.
    let err = expect_err(client.resume_headless(&slug, "again", Some("nope")).await);
    assert!(err.to_string().contains("unknown backend `nope`"), "{err}");
    client
        .resume_headless(&slug, "again", Some("docker"))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(project.path().join("prompt.txt")).unwrap(),
        "again\n"
    );
    let recorded = metadata(&project, &slug);
    assert_eq!(recorded["backend"], "docker");
    assert_eq!(recorded["exit_code"], 0);
    assert_eq!(recorded["sessions"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_api_freeze_then_destroy_clears_everything_idempotently() {
    let project = project();
    let client = client(&project);
    let slug = client
        .start_headless("echoer", options(&project, "x"))
        .await
        .unwrap();
    client.freeze(&slug, None).await.unwrap();
    let recorded = metadata(&project, &slug);
    assert_eq!(recorded["status"], "frozen");
    let image = recorded["frozen_image"].as_str().unwrap().to_owned();
    assert!(!docker_lines(&["images", "-q", &image]).is_empty());

    client.destroy(&slug, None).await.unwrap();
    assert!(project.state_dirs().is_empty(), "state left behind");
    let label = format!("label=dev.bot-bottle.slug={slug}");
    assert_eq!(docker_lines(&["images", "-q", "--filter", &label]), "");
    assert_eq!(docker_lines(&["ps", "-aq", "--filter", &label]), "");
    // Again, and for a slug that never existed: not errors.
    client.destroy(&slug, None).await.unwrap();
    client.destroy("never-abcde", None).await.unwrap();
    let err = expect_err(client.destroy(&slug, Some("nope")).await);
    assert_eq!(err.exit_code(), exit_codes::CONFIG, "{err}");
}
