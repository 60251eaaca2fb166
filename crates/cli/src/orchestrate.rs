//! `bot-bottle orchestrate …` (the forge loop) and `bot-bottle tool …` (the in-bottle
//! form of the sidecars' tools, for agents without an MCP client).

use std::path::PathBuf;

use bot_bottle_core::state::Home;
use bot_bottle_orchestrator::{Config, Launcher, Orchestrator, OrchestratorError};
use bot_bottle_runtime::launch::{self, RuntimeError};
use clap::{Args, Subcommand};

use crate::{Failure, print_json};

pub const ORCHESTRATE_HELP: &str = "\
Settings (environment, or KEY = \"value\" lines in --config, default
$BOT_BOTTLE_HOME/orchestrator.toml; the environment wins):
  FORGE_GITEA_API        the Gitea API, e.g. https://gitea.example.com/api/v1 (required)
  FORGE_BOT_USER         the bot's login: git user, and its comments never resume (required)
  FORGE_TOKEN            the bot's token (environment only), or FORGE_TOKEN_FILE /
                         FORGE_TOKEN_COMMAND (e.g. `pass show gitea/bot`) (required)
  FORGE_WEBHOOK_SECRET   the webhook's secret (environment only), or _FILE / _COMMAND
                         (required by `serve`)
  FORGE_ORG              assignees must be members (default bot-bottle)
  FORGE_WATCHDOG_TIMEOUT freeze a running bottle silent this long (default 30m)
  FORGE_LISTEN           webhook listener (default 127.0.0.1:8787)
  FORGE_MAX_CONCURRENT   sessions at once (default 2)
  FORGE_BRANCH_PREFIX    a run pushes only <prefix><slug> (default bot-bottle/)
  FORGE_BASE_BRANCH      pull requests target it (default main)
  FORGE_GIT_URL          where bottles clone (default: the API's origin)
  FORGE_CA_FILE          extra roots (PEM) for a privately issued forge certificate
  FORGE_REPOS            only these owner/name repositories (comma-separated)";

#[derive(Debug, Subcommand)]
pub enum OrchestrateAction {
    /// Serve Gitea webhooks: targeted issues start runs, comments resume them, closed
    /// pull requests destroy them
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Start a run for an issue now, without a webhook, and wait until it is frozen
    Start {
        /// The repository, as owner/name
        #[arg(long)]
        repo: String,
        #[arg(long)]
        issue: u64,
        /// The agent manifest to run
        #[arg(long)]
        agent: String,
        /// A bottle to use instead of the agent's default
        #[arg(long)]
        bottle: Option<String>,
        /// The task (default: the issue's title and body)
        #[arg(long)]
        prompt: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Resume a frozen run with a prompt, and wait until it is frozen again
    Resume {
        slug: String,
        #[arg(long)]
        prompt: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// List orchestrated runs: issue, pull request, state, last check-in, watchdog
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Settings file (default $BOT_BOTTLE_HOME/orchestrator.toml)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ToolAction {
    /// Call a forge sidecar tool: `tool forge signal_done '{"status":"done","summary":"…"}'`
    Forge(ToolCall),
    /// Call a supervise sidecar tool: `tool supervise ask_human '{"question":"…"}'`
    Supervise(ToolCall),
}

#[derive(Debug, Args)]
pub struct ToolCall {
    /// The tool (omit with --list)
    tool: Option<String>,
    /// Its arguments as a JSON object (default `{}`)
    arguments: Option<String>,
    /// List the tools and their arguments
    #[arg(long)]
    list: bool,
    /// The sidecar's URL (default $BOT_BOTTLE_FORGE_URL or $BOT_BOTTLE_SUPERVISE_URL)
    #[arg(long)]
    url: Option<String>,
}

fn failure(err: OrchestratorError) -> Failure {
    Failure {
        code: err.exit_code(),
        error: anyhow::Error::new(err),
    }
}

fn load(config: &ConfigArgs, need_secret: bool) -> Result<(Config, Home), Failure> {
    let home = Home::from_env().map_err(RuntimeError::from)?;
    let file = config
        .config
        .clone()
        .unwrap_or_else(|| home.root().join("orchestrator.toml"));
    if config.config.is_some() && !file.exists() {
        return Err(failure(OrchestratorError::Refused(format!(
            "settings file `{}` does not exist\nhint: omit --config to read only the environment",
            file.display()
        ))));
    }
    let lookup = |key: &str| std::env::var(key).ok();
    let config = Config::load(Some(&file), &lookup, need_secret)
        .map_err(|err| failure(OrchestratorError::from(err)))?;
    Ok((config, home))
}

fn orchestrator(config: Config, home: Home, quiet: bool) -> Result<Orchestrator, Failure> {
    let options = bot_bottle::launch_options(home.clone(), quiet)?;
    let launcher = Launcher {
        home,
        shim_binary: options.shim_binary,
        gateway: options.gateway,
        trust_project_manifests: options.trust_project_manifests,
        quiet,
    };
    Orchestrator::new(config, launcher).map_err(failure)
}

pub async fn orchestrate(action: OrchestrateAction) -> Result<i32, Failure> {
    match action {
        OrchestrateAction::Serve { config } => {
            let (config, home) = load(&config, true)?;
            let listen = config.listen;
            if !bot_bottle_orchestrator::server::is_loopback(&listen) {
                eprintln!(
                    "bot-bottle: warning: the webhook listener binds {listen}, reachable from other hosts; every request still needs a valid X-Gitea-Signature"
                );
            }
            let org = config.org.clone();
            let orchestrator = orchestrator(config, home, false)?;
            orchestrator.check_bot_user().await.map_err(failure)?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|source| {
                    failure(OrchestratorError::Io {
                        path: PathBuf::from(listen.to_string()),
                        source,
                    })
                })?;
            let bound = listener.local_addr().map_or(listen, |a| a);
            eprintln!(
                "bot-bottle: orchestrate: listening for Gitea webhooks on http://{bound}/webhook (org {org})"
            );
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            bot_bottle_orchestrator::server::serve(orchestrator.clone(), listener, shutdown)
                .await
                .map_err(failure)?;
            Ok(0)
        }
        OrchestrateAction::Start {
            repo,
            issue,
            agent,
            bottle,
            prompt,
            json,
            config,
        } => {
            let Some((owner, name)) = repo
                .split_once('/')
                .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
            else {
                return Err(crate::usage(
                    &format!("`--repo {repo}` is not owner/name"),
                    "write e.g. `--repo acme/widget`",
                ));
            };
            let (config, home) = load(&config, false)?;
            let orchestrator = orchestrator(config, home, json)?;
            orchestrator.check_bot_user().await.map_err(failure)?;
            let prompt = match prompt {
                Some(prompt) => prompt,
                None => {
                    let issue = orchestrator
                        .forge_for(owner, name)
                        .map_err(failure)?
                        .read_issue(issue)
                        .await
                        .map_err(|err| failure(err.into()))?;
                    bot_bottle_orchestrator::router::start_prompt(
                        issue.number,
                        &issue.title,
                        &issue.body,
                    )
                }
            };
            let slug = orchestrator
                .start_run(
                    owner,
                    name,
                    issue,
                    &agent,
                    bottle.as_deref(),
                    prompt,
                    bot_bottle_core::provenance::Trigger {
                        kind: "cli".to_owned(),
                        delivery_id: None,
                        comment_id: None,
                    },
                )
                .map_err(failure)?;
            wait(&orchestrator).await;
            report(&orchestrator, &slug, json)
        }
        OrchestrateAction::Resume {
            slug,
            prompt,
            json,
            config,
        } => {
            let (config, home) = load(&config, false)?;
            let orchestrator = orchestrator(config, home, json)?;
            orchestrator.resume_slug(&slug, prompt).map_err(failure)?;
            wait(&orchestrator).await;
            report(&orchestrator, &slug, json)
        }
        OrchestrateAction::Status { json, config } => {
            let (config, home) = load(&config, false)?;
            let orchestrator = orchestrator(config, home, true)?;
            let rows = orchestrator.status().map_err(failure)?;
            if json {
                print_json(&serde_json::to_value(&rows).unwrap_or_default());
                return Ok(0);
            }
            if rows.is_empty() {
                println!(
                    "no orchestrated runs (`bot-bottle orchestrate serve` starts them from webhooks)"
                );
                return Ok(0);
            }
            println!(
                "{:<28} {:<22} {:<9} {:<6} {:<21} {:<8} NOTE",
                "SLUG", "ISSUE", "STATE", "PR", "LAST CHECK-IN", "WATCHDOG"
            );
            for row in rows {
                println!(
                    "{:<28} {:<22} {:<9} {:<6} {:<21} {:<8} {}",
                    row.slug,
                    format!("{}#{}", row.repo, row.issue),
                    row.state.as_str(),
                    row.pr
                        .map(|p| format!("#{p}"))
                        .unwrap_or_else(|| "-".to_owned()),
                    row.last_checkin,
                    if row.watchdog_fired { "fired" } else { "-" },
                    row.note.unwrap_or_default()
                );
                println!("    {}", row.issue_url);
                if let Some(url) = row.pr_url {
                    println!("    {url}");
                }
            }
            Ok(0)
        }
    }
}

/// Runs the watcher (watchdog, `signal_done`) until every session has ended.
async fn wait(orchestrator: &Orchestrator) {
    let watcher = {
        let orchestrator = orchestrator.clone();
        tokio::spawn(async move { orchestrator.watch().await })
    };
    orchestrator.idle().await;
    watcher.abort();
}

fn report(orchestrator: &Orchestrator, slug: &str, json: bool) -> Result<i32, Failure> {
    let row = orchestrator
        .status()
        .map_err(failure)?
        .into_iter()
        .find(|r| r.slug == slug);
    let Some(row) = row else {
        return Ok(0);
    };
    if json {
        print_json(&serde_json::to_value(&row).unwrap_or_default());
    } else {
        println!(
            "{slug}: {} ({}){}",
            row.state.as_str(),
            row.note.as_deref().unwrap_or(""),
            row.pr_url
                .as_deref()
                .map(|u| format!("; pull request {u}"))
                .unwrap_or_default()
        );
    }
    // A run that did not end frozen, or whose session failed, is a failure.
    let failed = row
        .note
        .as_deref()
        .is_some_and(|note| note.starts_with("session failed"));
    if failed && !json {
        eprintln!(
            "bot-bottle: the run's session failed; `bot-bottle orchestrate status` shows it, and the orchestrator's log above says why"
        );
    }
    Ok(
        if row.state == bot_bottle_forge::ForgeStatus::Frozen && !failed {
            0
        } else {
            launch::exit_codes::BACKEND
        },
    )
}

pub async fn tool(action: ToolAction) -> Result<i32, Failure> {
    let (sidecar, variable, hint, call) = match action {
        ToolAction::Forge(call) => (
            "forge",
            "BOT_BOTTLE_FORGE_URL",
            "the forge tools exist only inside a bottle started by the orchestrator; pass --url to name one",
            call,
        ),
        ToolAction::Supervise(call) => (
            "supervise",
            "BOT_BOTTLE_SUPERVISE_URL",
            "the supervise tools exist only inside a bottle whose manifest sets `supervise: true`; pass --url to name one",
            call,
        ),
    };
    let ToolCall {
        tool,
        arguments,
        list,
        url,
    } = call;
    let url = url
        .or_else(|| std::env::var(variable).ok())
        .ok_or_else(|| {
            crate::usage(
                &format!("no {sidecar} sidecar here: `{variable}` is not set"),
                hint,
            )
        })?;
    let tool_error = |err: bot_bottle_sidecars::client::ClientError| Failure {
        code: launch::exit_codes::BACKEND,
        error: anyhow::Error::new(err),
    };
    if list {
        let tools = bot_bottle_sidecars::client::list_tools(&url)
            .await
            .map_err(tool_error)?;
        print_json(&tools);
        return Ok(0);
    }
    let Some(tool) = tool else {
        return Err(crate::usage(
            "name the tool to call",
            &format!("e.g. `bot-bottle tool {sidecar} TOOL '{{…}}'`; `--list` lists them"),
        ));
    };
    let arguments: serde_json::Value = match arguments {
        Some(text) => serde_json::from_str(&text).map_err(|err| {
            crate::usage(
                &format!("the arguments are not JSON: {err}"),
                "pass one JSON object, e.g. '{\"number\": 1}'",
            )
        })?,
        None => serde_json::json!({}),
    };
    if !arguments.is_object() {
        return Err(crate::usage(
            "the arguments must be a JSON object",
            "e.g. '{\"number\": 1}'",
        ));
    }
    let output = bot_bottle_sidecars::client::call_tool(&url, &tool, arguments)
        .await
        .map_err(tool_error)?;
    println!("{}", output.text);
    Ok(if output.is_error { 1 } else { 0 })
}
