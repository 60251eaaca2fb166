//! The `bot-bottle` binary: parses arguments, calls the library, maps errors to exit
//! codes. It is also the in-bottle shim (`bot-bottle shim`, hidden).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use bot_bottle::{BottleError, exit_codes, launch_options};
use bot_bottle_core::manifest::{Catalog, Origin};
use bot_bottle_core::plan::{BottlePlan, BottleSpec};
use bot_bottle_core::state::Home;
use bot_bottle_egress::audit;
use bot_bottle_runtime::launch::{self, RuntimeError};
use bot_bottle_runtime::progress::Progress;
use bot_bottle_runtime::shim;
use clap::{Args, Parser, Subcommand, ValueEnum};

mod orchestrate;

const AFTER_HELP: &str = "\
Manifests live in the nearest `.bot-bottle/` above the current directory and in
$BOT_BOTTLE_HOME (default ~/.bot-bottle): agents/<name>.md and bottles/<name>.md.

Exit codes: the agent's own exit code passes through. bot-bottle's own failures:
  2 usage, 66 unknown slug or state, 69 container backend, 73 image build,
  75 preflight declined, 76 egress gateway failed (bottle stopped), 77 an alert froze
  the bottle (on_alert: freeze), 78 configuration,
  143 interrupted by a signal (bottle stopped, state and audit log kept).";

/// Run untrusted AI coding agents in sealed, egress-audited containers.
#[derive(Debug, Parser)]
#[command(name = "bot-bottle", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a new bottle running an agent
    Start(StartArgs),
    /// Resume a frozen or stopped bottle with a new session
    Resume(ResumeArgs),
    /// Commit a bottle to an image so `resume` continues from its files and session
    Freeze(SlugArgs),
    /// Remove a bottle's container, frozen images and state (idempotent)
    Destroy(SlugArgs),
    /// List bottles: running, stopped and frozen
    Ps(JsonArgs),
    /// List the agents visible from here, and where each came from
    Agents(JsonArgs),
    /// List the bottles visible from here, and where each came from
    Bottles(JsonArgs),
    /// Trust this project's manifests as they are now (read them first: they decide
    /// egress, mounts and credential commands that run on this host)
    Trust(JsonArgs),
    /// Show, verify or export a bottle's egress audit log
    Audit(AuditArgs),
    /// Verify a signed provenance record offline, or export the signing public key
    #[command(subcommand)]
    Provenance(ProvenanceAction),
    /// The forge loop: Gitea issues become sandboxed runs that open pull requests
    #[command(subcommand, after_help = orchestrate::ORCHESTRATE_HELP)]
    Orchestrate(orchestrate::OrchestrateAction),
    /// Inside a bottle: call a sidecar's tools without an MCP client
    #[command(subcommand)]
    Tool(orchestrate::ToolAction),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// In-bottle PID 1: forward loopback ports to host sockets and run the agent
    #[command(hide = true)]
    Shim(ShimArgs),
    /// The tripwire beside a bottle: refuse and report every packet that tries a direct way out
    #[command(hide = true)]
    Tripwire {
        /// The host's Unix socket for reports
        #[arg(long)]
        socket: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
struct StartArgs {
    /// The agent to run (an `agents/<name>.md` manifest); omit to pick interactively
    agent: Option<String>,
    /// No prompts of any kind; requires AGENT and --prompt
    #[arg(long)]
    headless: bool,
    /// The task for the agent (required with --headless)
    #[arg(long)]
    prompt: Option<String>,
    /// A bottle to compose, in order (repeatable); default: the agent's own
    #[arg(long = "bottle", value_name = "BOTTLE")]
    bottles: Vec<String>,
    /// Label / terminal title (default: the agent name)
    #[arg(long)]
    label: Option<String>,
    /// Color, one of the 16 ANSI color names
    #[arg(long)]
    color: Option<String>,
    /// Container backend
    #[arg(long)]
    backend: Option<String>,
    /// Copy the current directory into the bottle instead of bind-mounting it
    #[arg(long)]
    cwd: bool,
    /// Remove the bottle when the agent exits (its audit log is kept in
    /// $BOT_BOTTLE_HOME/audit/); without it the bottle is kept for freeze/resume
    #[arg(long)]
    rm: bool,
    /// Print the plan and launch nothing (also BOT_BOTTLE_DRY_RUN=1)
    #[arg(long)]
    dry_run: bool,
    /// Machine-readable output on stdout
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ResumeArgs {
    /// The bottle's identity, as shown by `bot-bottle ps`
    slug: String,
    /// No prompts of any kind; requires --prompt
    #[arg(long)]
    headless: bool,
    /// The follow-up task (only with --headless)
    #[arg(long)]
    prompt: Option<String>,
    /// Container backend (default: the one the bottle was started with)
    #[arg(long)]
    backend: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SlugArgs {
    slug: String,
    /// Container backend (default: the one the bottle was started with)
    #[arg(long)]
    backend: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct JsonArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AuditArgs {
    #[command(subcommand)]
    action: Option<AuditAction>,
    /// The bottle whose log to show
    slug: Option<String>,
    #[arg(long)]
    json: bool,
    /// Keep printing new events as they are written
    #[arg(long)]
    follow: bool,
    /// Which of the bottle's logs
    #[arg(long, value_enum, default_value = "egress")]
    log: LogKind,
}

/// A bottle's hash-chained logs.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogKind {
    /// The gateway's egress audit (`egress.jsonl`)
    Egress,
    /// The forge sidecar's operations (`forge-ops.jsonl`)
    ForgeOps,
}

#[derive(Debug, Subcommand)]
enum AuditAction {
    /// Check the hash chain (naming the first broken line) and that the log still reaches
    /// the head recorded when its gateway last stopped
    Verify {
        slug: String,
        /// Also check against a head kept elsewhere (a launch's `audit_head`), as SEQ:HASH
        #[arg(long, value_name = "SEQ:HASH")]
        expect: Option<audit::AuditHead>,
        #[arg(long)]
        json: bool,
        /// Which of the bottle's logs
        #[arg(long, value_enum, default_value = "egress")]
        log: LogKind,
    },
    /// Write the log as JSONL or CSV (for a SIEM), after verifying it and its recorded head
    Export {
        slug: String,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Output file (default: stdout)
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Which of the bottle's logs
        #[arg(long, value_enum, default_value = "egress")]
        log: LogKind,
    },
}

#[derive(Debug, Subcommand)]
enum ProvenanceAction {
    /// Check a DSSE envelope's signature and print the statement it carries
    Verify {
        /// The envelope (e.g. state/<slug>/provenance.json)
        file: PathBuf,
        /// The public key: PEM (SPKI) or raw 32 bytes in base64
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print this host's provenance public key (PEM), creating the key pair on first use
    ExportKey,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(Debug, Args)]
struct ShimArgs {
    /// PORT=/path/to.sock: forward 127.0.0.1:PORT to a Unix socket (repeatable)
    #[arg(long = "forward")]
    forwards: Vec<shim::Forward>,
    /// SOURCE:TARGET: copy a directory tree into place before the agent starts (repeatable)
    #[arg(long = "provision")]
    provisions: Vec<shim::Provision>,
    /// The agent's argv
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

/// A failure with its exit code, printed once with its whole chain.
struct Failure {
    code: i32,
    error: anyhow::Error,
}

impl From<BottleError> for Failure {
    fn from(err: BottleError) -> Self {
        Self {
            code: err.exit_code(),
            error: anyhow::Error::new(err),
        }
    }
}

impl From<RuntimeError> for Failure {
    fn from(err: RuntimeError) -> Self {
        Self {
            code: err.exit_code(),
            error: anyhow::Error::new(err),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self {
            code: exit_codes::CONFIG,
            error,
        }
    }
}

fn usage(message: &str, hint: &str) -> Failure {
    Failure {
        code: exit_codes::USAGE,
        error: anyhow::anyhow!("{message}\nhint: {hint}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Shim(args) = &cli.command {
        let code = shim::run_with(&args.forwards, &args.provisions, &args.argv);
        return ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1));
    }
    if let Command::Tripwire { socket } = &cli.command {
        return match bot_bottle_runtime::tripwire::run(socket) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!(
                    "error: {}",
                    anyhow::Error::new(err)
                        .chain()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(": ")
                );
                ExitCode::from(69)
            }
        };
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("BOT_BOTTLE_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)),
        Err(failure) => {
            let mut text = format!("error: {}", failure.error);
            for cause in failure.error.chain().skip(1) {
                let cause = cause.to_string();
                if !text.contains(&cause) {
                    text.push_str(&format!("\n  caused by: {cause}"));
                }
            }
            eprintln!("{text}");
            ExitCode::from(u8::try_from(failure.code & 0xff).unwrap_or(1))
        }
    }
}

async fn run(cli: Cli) -> Result<i32, Failure> {
    match cli.command {
        Command::Start(args) => start(args).await,
        Command::Resume(args) => resume(args).await,
        Command::Freeze(args) => {
            let home = Home::from_env().map_err(RuntimeError::from)?;
            check_backend(args.backend.as_deref())?;
            let image = launch::freeze(&home, &args.slug, &Progress::new(args.json)).await?;
            if args.json {
                print_json(
                    &serde_json::json!({"slug": args.slug, "status": "frozen", "image": image}),
                );
            } else {
                println!("frozen {} as {image}", args.slug);
            }
            Ok(0)
        }
        Command::Destroy(args) => {
            let home = Home::from_env().map_err(RuntimeError::from)?;
            check_backend(args.backend.as_deref())?;
            launch::destroy(&home, &args.slug, &Progress::new(args.json)).await?;
            if args.json {
                print_json(&serde_json::json!({"slug": args.slug, "status": "destroyed"}));
            } else {
                println!("destroyed {}", args.slug);
            }
            Ok(0)
        }
        Command::Ps(args) => ps(args.json).await,
        Command::Agents(args) => list_manifests(true, args.json),
        Command::Bottles(args) => list_manifests(false, args.json),
        Command::Trust(args) => trust_command(args.json),
        Command::Audit(args) => audit_command(args).await,
        Command::Provenance(action) => provenance_command(action),
        Command::Orchestrate(action) => orchestrate::orchestrate(action).await,
        Command::Tool(action) => orchestrate::tool(action).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "bot-bottle",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Command::Shim(_) | Command::Tripwire { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}

fn check_backend(backend: Option<&str>) -> Result<(), Failure> {
    match backend {
        None | Some("docker") => Ok(()),
        Some(other) => Err(usage(
            &format!("unknown backend `{other}`"),
            "known backends: `docker`",
        )),
    }
}

fn print_json(value: &serde_json::Value) {
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

fn dry_run_requested(flag: bool) -> bool {
    flag || std::env::var("BOT_BOTTLE_DRY_RUN").is_ok_and(|v| v == "1" || v == "true")
}

fn current_dir() -> Result<PathBuf, Failure> {
    std::env::current_dir()
        .context("cannot read the current directory")
        .map_err(Failure::from)
}

async fn start(args: StartArgs) -> Result<i32, Failure> {
    if args.headless {
        if args.agent.is_none() {
            return Err(usage(
                "--headless requires an agent name",
                "bot-bottle start <agent> --headless --prompt 'Do the thing'",
            ));
        }
        if args.prompt.as_deref().is_none_or(str::is_empty) {
            return Err(usage(
                "--headless requires --prompt",
                "bot-bottle start <agent> --headless --prompt 'Do the thing'",
            ));
        }
    } else if args.prompt.is_some() {
        return Err(usage(
            "--prompt is only valid with --headless",
            "add --headless to run without prompts, or drop --prompt to work interactively",
        ));
    }
    let home = Home::from_env().map_err(RuntimeError::from)?;
    let cwd = current_dir()?;
    let dry_run = dry_run_requested(args.dry_run);
    let interactive = !args.headless;
    if interactive && !dry_run && !std::io::stdin().is_terminal() {
        return Err(usage(
            "interactive start needs a terminal",
            "use `--headless --prompt '…'` in scripts and CI",
        ));
    }

    let mut spec = BottleSpec {
        agent: args.agent.clone().unwrap_or_default(),
        bottles: args.bottles.clone(),
        label: args.label.clone(),
        color: args.color.clone(),
        prompt: args.prompt.clone(),
        cwd: cwd.clone(),
        copy_cwd: args.cwd,
        backend: args.backend.clone(),
        identity: None,
        resume_image: None,
    };
    if interactive && !dry_run {
        pick_interactively(&mut spec, &home)?;
    }
    let progress = Progress::new(args.json);
    if !dry_run {
        let label = spec.label.clone().unwrap_or_else(|| spec.agent.clone());
        // Orchestrators fire many bottles: a taken label gets a number, not an error.
        spec.label = Some(launch::unique_label(&home, &label, &progress)?);
    }
    if dry_run {
        let tripwire = launch::GatewaySettings::from_env()?.tripwire;
        let check_trust = !launch::trust_project_manifests_from_env();
        let plan = launch::make_plan(&spec, &home, tripwire, check_trust)?;
        print_plan(&plan, args.json);
        return Ok(0);
    }
    if interactive && std::io::stderr().is_terminal() {
        // The label names the terminal window, so several bottles stay apart.
        let label = spec.label.as_deref().unwrap_or(&spec.agent);
        let clean: String = label.chars().filter(|c| !c.is_control()).collect();
        eprint!("\x1b]0;bot-bottle: {clean}\x07");
    }
    let mut options = launch_options(home, args.json)?;
    options.agent_stdout_to_stderr = args.json;
    options.remove_after = args.rm;
    if interactive {
        options.confirm = Some(Box::new(confirm_plan));
    }
    let outcome = launch::launch(&spec, &options).await?;
    if args.json {
        print_json(&serde_json::to_value(&outcome).unwrap_or_default());
    }
    Ok(outcome.exit_code)
}

fn print_plan(plan: &BottlePlan, json: bool) {
    if json {
        print_json(&serde_json::to_value(plan).unwrap_or_default());
    } else {
        print!("{}", plan.render());
        println!("(dry run: nothing was launched)");
    }
}

fn confirm_plan(plan: &BottlePlan) -> bool {
    eprint!("{}", plan.render());
    inquire::Confirm::new("Launch this bottle?")
        .with_default(false)
        .prompt()
        .unwrap_or(false)
}

fn pick_interactively(spec: &mut BottleSpec, home: &Home) -> Result<(), Failure> {
    let catalog = Catalog::resolve(&spec.cwd, home.root()).map_err(RuntimeError::from)?;
    let cancelled = |err: inquire::InquireError| Failure {
        code: exit_codes::DECLINED,
        error: anyhow::anyhow!("cancelled: {err}"),
    };
    if spec.agent.is_empty() {
        let names: Vec<String> = catalog.agents.keys().cloned().collect();
        if names.is_empty() {
            return Err(usage(
                "no agents found",
                "create `.bot-bottle/agents/<name>.md`; see docs/manifests.md",
            ));
        }
        spec.agent = inquire::Select::new("Agent:", names)
            .prompt()
            .map_err(cancelled)?;
    }
    let agent = catalog.agent(&spec.agent).map_err(RuntimeError::from)?;
    if spec.bottles.is_empty() {
        let names: Vec<String> = catalog.bottles.keys().cloned().collect();
        let defaults: Vec<usize> = names
            .iter()
            .enumerate()
            .filter(|(_, name)| agent.default_bottles.contains(name))
            .map(|(index, _)| index)
            .collect();
        spec.bottles = inquire::MultiSelect::new("Bottles:", names)
            .with_default(&defaults)
            .prompt()
            .map_err(cancelled)?;
    }
    if spec.label.is_none() {
        let label = inquire::Text::new("Label:")
            .with_default(&spec.agent)
            .prompt()
            .map_err(cancelled)?;
        spec.label = Some(label);
    }
    if spec.color.is_none() {
        let mut options = vec!["none"];
        options.extend(bot_bottle_core::plan::COLORS);
        let color = inquire::Select::new("Color:", options)
            .prompt()
            .map_err(cancelled)?;
        spec.color = (color != "none").then(|| color.to_owned());
    }
    Ok(())
}

async fn resume(args: ResumeArgs) -> Result<i32, Failure> {
    if args.prompt.is_some() && !args.headless {
        return Err(usage(
            "--prompt is only valid with --headless",
            &format!(
                "bot-bottle resume {} --headless --prompt 'Address the review'",
                args.slug
            ),
        ));
    }
    if args.headless && args.prompt.as_deref().is_none_or(str::is_empty) {
        return Err(usage(
            "--headless requires --prompt",
            &format!(
                "bot-bottle resume {} --headless --prompt 'Address the review'",
                args.slug
            ),
        ));
    }
    // Before anything happens to the bottle: resuming a stopped one freezes it first.
    check_backend(args.backend.as_deref())?;
    let home = Home::from_env().map_err(RuntimeError::from)?;
    if !args.headless && !std::io::stdin().is_terminal() {
        return Err(usage(
            "interactive resume needs a terminal",
            "use `--headless --prompt '…'` in scripts and CI",
        ));
    }
    let mut options = launch_options(home, args.json)?;
    options.agent_stdout_to_stderr = args.json;
    let outcome = launch::resume(&args.slug, args.prompt, args.backend, &options).await?;
    if args.json {
        print_json(&serde_json::to_value(&outcome).unwrap_or_default());
    }
    Ok(outcome.exit_code)
}

fn age(seconds: i64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

async fn ps(json: bool) -> Result<i32, Failure> {
    let home = Home::from_env().map_err(RuntimeError::from)?;
    let rows = launch::ps(&home).await?;
    if json {
        print_json(&serde_json::to_value(&rows).unwrap_or_default());
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no bottles (start one with `bot-bottle start`)");
        return Ok(0);
    }
    println!(
        "{:<28} {:<14} {:<20} {:<8} {:<9} {:>5}",
        "SLUG", "AGENT", "BOTTLES", "BACKEND", "STATUS", "AGE"
    );
    for row in rows {
        println!(
            "{:<28} {:<14} {:<20} {:<8} {:<9} {:>5}",
            row.slug,
            row.agent,
            row.bottles.join(","),
            row.backend,
            row.status,
            age(row.age_seconds)
        );
    }
    Ok(0)
}

fn trust_command(json: bool) -> Result<i32, Failure> {
    let home = Home::from_env().map_err(RuntimeError::from)?;
    let cwd = current_dir()?;
    match launch::trust_manifests(&cwd, &home)? {
        Some((project, summary)) => {
            if json {
                print_json(&serde_json::json!({
                    "root": project.root,
                    "sha256": project.digest,
                    "allows": summary,
                }));
            } else {
                for line in &summary {
                    println!("{line}");
                }
                println!(
                    "trusted the manifests in {} as they are now (sha256 {}); any change needs `bot-bottle trust` again",
                    project.root.display(),
                    project.digest
                );
            }
            Ok(0)
        }
        None => Err(usage(
            &format!(
                "no `.bot-bottle/` at or above `{}`: nothing to trust",
                cwd.display()
            ),
            "run this in a project that has manifests; those in ~/.bot-bottle are always trusted",
        )),
    }
}

fn list_manifests(agents: bool, json: bool) -> Result<i32, Failure> {
    let home = Home::from_env().map_err(RuntimeError::from)?;
    let catalog = Catalog::resolve(&current_dir()?, home.root()).map_err(RuntimeError::from)?;
    let origin = |origin: &Origin| match origin {
        Origin::Project => "project",
        Origin::Home => "home",
    };
    let rows: Vec<serde_json::Value> = if agents {
        catalog
            .agents
            .values()
            .map(|(agent, from)| {
                serde_json::json!({
                    "name": agent.name, "provider": agent.provider.as_str(), "model": agent.model,
                    "bottles": agent.default_bottles, "origin": origin(from), "path": agent.source,
                })
            })
            .collect()
    } else {
        catalog
            .bottles
            .values()
            .map(|(bottle, from)| {
                serde_json::json!({
                    "name": bottle.name, "rules": bottle.front.egress.rules.len(),
                    "credentials": bottle.front.credentials.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                    "origin": origin(from), "path": bottle.source,
                })
            })
            .collect()
    };
    if json {
        print_json(&serde_json::Value::Array(rows));
        return Ok(0);
    }
    if rows.is_empty() {
        let kind = if agents { "agents" } else { "bottles" };
        println!(
            "no {kind} found in `.bot-bottle/{kind}/` here or in {}",
            home.root().join(kind).display()
        );
        return Ok(0);
    }
    for row in rows {
        let name = row["name"].as_str().unwrap_or_default();
        let detail = if agents {
            format!(
                "{} bottles={}",
                row["provider"].as_str().unwrap_or_default(),
                row["bottles"]
            )
        } else {
            format!("rules={} credentials={}", row["rules"], row["credentials"])
        };
        println!(
            "{name:<20} {detail:<40} {:<8} {}",
            row["origin"].as_str().unwrap_or_default(),
            row["path"].as_str().unwrap_or_default()
        );
    }
    Ok(0)
}

fn audit_path(slug: &str, log: LogKind) -> Result<PathBuf, Failure> {
    let home = Home::from_env().map_err(RuntimeError::from)?;
    let bottle = home.bottle(slug).map_err(RuntimeError::from)?;
    let mut path = match log {
        LogKind::Egress => bottle.egress_log(),
        LogKind::ForgeOps => bot_bottle_runtime::forge::forge_ops_log(&bottle),
    };
    if !path.exists() {
        // A destroyed bottle's log is archived, not deleted.
        path = home.archived_audit(slug).map_err(RuntimeError::from)?;
        if let LogKind::ForgeOps = log {
            path = path.with_extension(bot_bottle_sidecars::FORGE_OPS_LOG);
        }
    }
    if !path.exists() {
        return Err(Failure {
            code: exit_codes::STATE,
            error: anyhow::anyhow!(
                "no audit log for `{slug}` at `{}`\nhint: run `bot-bottle ps` to list bottles",
                path.display()
            ),
        });
    }
    Ok(path)
}

/// Checks the chain (every line, past bad ones), then that it reaches the head recorded
/// beside it and the one the caller kept (if any); returns the report and the heads it
/// checked. Only a failure to read is an error here; what the log holds is in the report.
fn check_log(
    path: &std::path::Path,
    expect: Option<&audit::AuditHead>,
) -> Result<(audit::VerifyReport, Vec<audit::AuditHead>), Failure> {
    let audit_failure = |err: audit::AuditError| Failure {
        code: 1,
        error: anyhow::Error::new(err),
    };
    let mut heads: Vec<audit::AuditHead> = audit::read_head(path)
        .map_err(audit_failure)?
        .into_iter()
        .collect();
    if let Some(expect) = expect
        && !heads.contains(expect)
    {
        heads.push(expect.clone());
    }
    let report = audit::check(path, &heads).map_err(audit_failure)?;
    Ok((report, heads))
}

/// Segments printed in a failed verification's text; `--json` lists up to
/// [`audit::MAX_REPORTED`].
const SEGMENTS_SHOWN: usize = 20;

/// The error for a log that does not verify: every bad line (by number and byte offset),
/// where the chain verifies, and every head it does not reach.
fn verify_failure(path: &std::path::Path, slug: &str, report: &audit::VerifyReport) -> Failure {
    if report.problems.is_empty()
        && let Some(problem) = report.unmet_heads.first()
    {
        // Only the end is missing: the library's own error says so, with its hint.
        return Failure {
            code: 1,
            error: anyhow::Error::new(audit::AuditError::Truncated {
                path: path.to_path_buf(),
                problem: problem.clone(),
            }),
        };
    }
    let bad = report.problems.len() as u64 + report.problems_more;
    let mut text = format!(
        "audit log `{}` does not verify: {bad} problem{} in {} lines",
        path.display(),
        if bad == 1 { "" } else { "s" },
        report.lines
    );
    for problem in &report.problems {
        text.push_str(&format!("\n  {problem}"));
    }
    if report.problems_more > 0 {
        text.push_str(&format!("\n  … and {} more", report.problems_more));
    }
    let mut segments: Vec<String> = report
        .segments
        .iter()
        .take(SEGMENTS_SHOWN)
        .map(|s| {
            format!(
                "lines {}-{} (seq {}-{})",
                s.first_line, s.last_line, s.first_seq, s.last_seq
            )
        })
        .collect();
    let more = (report.segments.len().saturating_sub(SEGMENTS_SHOWN)) as u64 + report.segments_more;
    if more > 0 {
        segments.push(format!("{more} more"));
    }
    if segments.is_empty() {
        text.push_str("\n  no line verifies");
    } else {
        text.push_str(&format!(
            "\n  the chain verifies in: {}",
            segments.join(", ")
        ));
    }
    for head in &report.unmet_heads {
        text.push_str(&format!("\n  it does not reach its recorded head: {head}"));
    }
    text.push_str(&format!(
        "\nhint: the log was changed after it was written (or a write was cut off); keep it as evidence. `bot-bottle audit {slug}` shows every line that can still be read"
    ));
    Failure {
        code: 1,
        error: anyhow::anyhow!(text),
    }
}

async fn audit_command(args: AuditArgs) -> Result<i32, Failure> {
    match args.action {
        Some(AuditAction::Verify {
            slug,
            expect,
            json,
            log,
        }) => {
            let path = audit_path(&slug, log)?;
            let (report, heads) = match check_log(&path, expect.as_ref()) {
                Ok(checked) => checked,
                Err(failure) => {
                    if json {
                        print_json(&serde_json::json!({
                            "slug": slug,
                            "ok": false,
                            "error": failure.error.to_string(),
                        }));
                    }
                    return Err(failure);
                }
            };
            if report.is_ok() {
                if json {
                    print_json(&serde_json::json!({
                        "slug": slug,
                        "ok": true,
                        "lines": report.lines,
                        "last_seq": report.last_seq,
                        "last_hash": report.last_hash,
                        "heads_checked": heads,
                    }));
                } else {
                    println!(
                        "ok: {} events, chain intact (last seq {}, hash {})",
                        report.lines, report.last_seq, report.last_hash
                    );
                    for head in &heads {
                        println!("ok: reaches the head at seq {} ({})", head.seq, head.hash);
                    }
                    if heads.is_empty() {
                        println!(
                            "note: no head recorded beside the log; cut lines at its end would not show"
                        );
                    }
                }
                return Ok(0);
            }
            let failure = verify_failure(&path, &slug, &report);
            if json {
                print_json(&serde_json::json!({
                    "slug": slug,
                    "ok": false,
                    "error": failure.error.to_string(),
                    "lines": report.lines,
                    "events": report.events,
                    "last_seq": report.last_seq,
                    "last_hash": report.last_hash,
                    "problems": report.problems,
                    "problems_more": report.problems_more,
                    "segments": report.segments,
                    "segments_more": report.segments_more,
                    "heads_checked": heads,
                    "heads_unmet": report.unmet_heads,
                }));
            }
            Err(failure)
        }
        Some(AuditAction::Export {
            slug,
            format,
            output,
            log,
        }) => {
            let path = audit_path(&slug, log)?;
            // A SIEM gets nothing from a log that was changed or cut at its end, either.
            let (report, _) = check_log(&path, None)?;
            if !report.is_ok() {
                return Err(verify_failure(&path, &slug, &report));
            }
            let reader = std::io::BufReader::new(
                std::fs::File::open(&path)
                    .with_context(|| format!("cannot open `{}`", path.display()))?,
            );
            // Written beside the output and renamed on success, so a failed export never
            // leaves a file that looks complete.
            let partial = output.as_ref().map(|out| {
                let mut name = out.file_name().unwrap_or_default().to_os_string();
                name.push(".partial");
                out.with_file_name(name)
            });
            let mut writer: Box<dyn Write> = match &partial {
                Some(partial) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(partial)
                        .with_context(|| format!("cannot create `{}`", partial.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let exported = match format {
                ExportFormat::Jsonl => audit::export_jsonl(reader, &mut writer, &path),
                ExportFormat::Csv => audit::export_csv(reader, &mut writer, &path),
            };
            drop(writer);
            if let Err(err) = exported {
                if let Some(partial) = &partial {
                    let _ = std::fs::remove_file(partial);
                }
                return Err(Failure {
                    code: 1,
                    error: anyhow::Error::new(err),
                });
            }
            if let (Some(partial), Some(out)) = (&partial, &output) {
                std::fs::rename(partial, out)
                    .with_context(|| format!("cannot write `{}`", out.display()))?;
            }
            Ok(0)
        }
        None => {
            let Some(slug) = args.slug else {
                return Err(usage(
                    "`audit` needs a bottle slug",
                    "bot-bottle audit <slug> [--json] [--follow]",
                ));
            };
            let path = audit_path(&slug, args.log)?;
            show_audit(&path, &slug, args.json, args.follow).await
        }
    }
}

/// Prints the log (and, with `follow`, what is appended to it). A line that cannot be
/// read is named (line number and byte offset) and skipped: on stderr, or in `--json` as
/// a `{"bad_line": N, "offset": O, "problem": "…"}` object among the events; the command
/// then exits 1 once it has shown the rest.
async fn show_audit(
    path: &std::path::Path,
    slug: &str,
    json: bool,
    follow: bool,
) -> Result<i32, Failure> {
    let (mut offset, mut line) = (0u64, 1u64);
    let mut bad = 0u64;
    loop {
        let mut stdout = std::io::stdout().lock();
        // A closed pipe (`| head`) ends the output, not with a panic.
        let (next_offset, next_line) =
            audit::follow_from(path, offset, line, |entry| match entry {
                audit::Entry::Event { raw, event, .. } => {
                    let _ = if json {
                        stdout
                            .write_all(&raw)
                            .and_then(|()| stdout.write_all(b"\n"))
                    } else {
                        writeln!(stdout, "{}", audit::format_event(&event))
                    };
                }
                audit::Entry::Bad(problem) => {
                    bad += 1;
                    if json {
                        let _ = writeln!(
                            stdout,
                            "{}",
                            serde_json::json!({
                                "bad_line": problem.line,
                                "offset": problem.offset,
                                "problem": problem.problem,
                            })
                        );
                    } else {
                        let _ = stdout.flush();
                        eprintln!("warning: skipped {problem}");
                    }
                }
            })
            .map_err(|err| Failure {
                code: 1,
                error: anyhow::Error::new(err),
            })?;
        let _ = stdout.flush();
        drop(stdout);
        (offset, line) = (next_offset, next_line);
        if !follow {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    if bad > 0 {
        return Err(Failure {
            code: 1,
            error: anyhow::anyhow!(
                "{bad} line{} of `{}` could not be read and {} skipped\nhint: run `bot-bottle audit verify {slug}` to see where the chain breaks",
                if bad == 1 { "" } else { "s" },
                path.display(),
                if bad == 1 { "was" } else { "were" },
            ),
        });
    }
    Ok(0)
}

/// What `provenance verify` found of the egress head an envelope records.
enum HeadCheck {
    /// The statement records no egress head.
    NotRecorded,
    /// No log of the bottle was found here (another host, or removed).
    LogNotFound {
        head: bot_bottle_core::provenance::LogHead,
    },
    Reached {
        head: bot_bottle_core::provenance::LogHead,
        log: PathBuf,
    },
    Failed {
        head: bot_bottle_core::provenance::LogHead,
        log: PathBuf,
        problem: String,
    },
}

impl HeadCheck {
    fn ok(&self) -> bool {
        !matches!(self, Self::Failed { .. })
    }

    fn sentence(&self) -> String {
        match self {
            Self::NotRecorded => "egress head: none recorded".to_owned(),
            Self::LogNotFound { head } => format!(
                "egress head: seq {} not checked (no log of this bottle here)",
                head.seq
            ),
            Self::Reached { head, log } => format!(
                "ok: egress log {} reaches the recorded head (seq {})",
                log.display(),
                head.seq
            ),
            Self::Failed { head, log, problem } => format!(
                "FAILED: egress log {} does not reach the recorded head (seq {}): {problem}",
                log.display(),
                head.seq
            ),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        match self {
            Self::NotRecorded => serde_json::json!({"status": "not-recorded"}),
            Self::LogNotFound { head } => serde_json::json!({
                "status": "log-not-found", "seq": head.seq, "hash": head.hash,
            }),
            Self::Reached { head, log } => serde_json::json!({
                "status": "reached", "seq": head.seq, "hash": head.hash, "log": log,
            }),
            Self::Failed { head, log, problem } => serde_json::json!({
                "status": "failed", "seq": head.seq, "hash": head.hash, "log": log,
                "problem": problem,
            }),
        }
    }
}

/// Checks the egress head a verified statement records against the bottle's log, when
/// this host has it: `state/<slug>/egress.jsonl`, else the log `destroy` archived.
fn check_recorded_head(statement: &bot_bottle_core::provenance::Statement) -> HeadCheck {
    let Some(head) = statement.egress_head() else {
        return HeadCheck::NotRecorded;
    };
    let slug = &statement
        .predicate
        .build_definition
        .internal_parameters
        .slug;
    let log = Home::from_env().ok().and_then(|home| {
        let live = home.bottle(slug).ok()?.egress_log();
        if live.is_file() {
            return Some(live);
        }
        home.archived_audit(slug).ok().filter(|p| p.is_file())
    });
    let Some(log) = log else {
        return HeadCheck::LogNotFound { head };
    };
    let expected = audit::AuditHead {
        seq: head.seq,
        hash: head.hash.clone(),
    };
    match audit::verify_against(&log, &[expected]) {
        Ok(_) => HeadCheck::Reached { head, log },
        Err(err) => HeadCheck::Failed {
            head,
            log,
            problem: err.to_string(),
        },
    }
}

fn provenance_command(action: ProvenanceAction) -> Result<i32, Failure> {
    use bot_bottle_core::provenance;
    match action {
        ProvenanceAction::Verify { file, key, json } => {
            let verified =
                provenance::verify_envelope_file(&file, &key).map_err(|err| Failure {
                    code: 1,
                    error: anyhow::Error::new(err),
                })?;
            let head = check_recorded_head(&verified.statement);
            if json {
                print_json(&serde_json::json!({
                    "ok": head.ok(),
                    "key_id": verified.key_id,
                    "egress_head": head.to_json(),
                    "statement": serde_json::to_value(&verified.statement).unwrap_or_default(),
                }));
            } else {
                println!("ok: signature valid (key {})", verified.key_id);
                println!("{}", head.sentence());
                println!(
                    "{}",
                    serde_json::to_string_pretty(&verified.statement).unwrap_or_default()
                );
            }
            if let HeadCheck::Failed { log, problem, .. } = &head {
                return Err(Failure {
                    code: 1,
                    error: anyhow::anyhow!(
                        "the egress log `{}` does not reach the head this provenance records: {problem}\nhint: lines were changed or cut from the log after the session; `bot-bottle audit verify` shows where",
                        log.display()
                    ),
                });
            }
            Ok(0)
        }
        ProvenanceAction::ExportKey => {
            let home = Home::from_env().map_err(RuntimeError::from)?;
            let keys =
                provenance::ProvenanceKeys::load_or_create(home.root()).map_err(|err| Failure {
                    code: exit_codes::STATE,
                    error: anyhow::Error::new(err),
                })?;
            print!("{}", keys.public_key_pem());
            Ok(0)
        }
    }
}
