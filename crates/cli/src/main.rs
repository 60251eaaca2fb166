//! The `bot-bottle` binary: parses arguments, calls the library, maps errors to exit
//! codes. It is also the in-bottle shim (`bot-bottle shim`, hidden).

use std::io::{BufRead, IsTerminal, Write};
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

const AFTER_HELP: &str = "\
Manifests live in the nearest `.bot-bottle/` above the current directory and in
$BOT_BOTTLE_HOME (default ~/.bot-bottle): agents/<name>.md and bottles/<name>.md.

Exit codes: the agent's own exit code passes through. bot-bottle's own failures:
  2 usage, 66 unknown slug or state, 69 container backend, 73 image build,
  75 preflight declined, 76 egress gateway failed (bottle stopped), 78 configuration,
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
    },
    /// Write the log as JSONL or CSV (for a SIEM), after verifying it and its recorded head
    Export {
        slug: String,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Output file (default: stdout)
        #[arg(long, short)]
        output: Option<PathBuf>,
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

fn audit_path(slug: &str) -> Result<PathBuf, Failure> {
    let home = Home::from_env().map_err(RuntimeError::from)?;
    let bottle = home.bottle(slug).map_err(RuntimeError::from)?;
    let mut path = bottle.egress_log();
    if !path.exists() {
        // A destroyed bottle's log is archived, not deleted.
        path = home.archived_audit(slug).map_err(RuntimeError::from)?;
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

/// Verifies the chain, then that it reaches the head recorded beside it and the one the
/// caller kept (if any); returns the heads it checked.
fn verify_log(
    path: &std::path::Path,
    expect: Option<&audit::AuditHead>,
) -> Result<(audit::VerifyReport, Vec<audit::AuditHead>), audit::AuditError> {
    let mut heads: Vec<audit::AuditHead> = audit::read_head(path)?.into_iter().collect();
    if let Some(expect) = expect
        && !heads.contains(expect)
    {
        heads.push(expect.clone());
    }
    let report = audit::verify_against(path, &heads)?;
    Ok((report, heads))
}

async fn audit_command(args: AuditArgs) -> Result<i32, Failure> {
    match args.action {
        Some(AuditAction::Verify { slug, expect, json }) => {
            let path = audit_path(&slug)?;
            let result = verify_log(&path, expect.as_ref());
            match result {
                Ok((report, heads)) => {
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
                    Ok(0)
                }
                Err(err) => {
                    if json {
                        print_json(
                            &serde_json::json!({"slug": slug, "ok": false, "error": err.to_string()}),
                        );
                    }
                    Err(Failure {
                        code: 1,
                        error: anyhow::Error::new(err),
                    })
                }
            }
        }
        Some(AuditAction::Export {
            slug,
            format,
            output,
        }) => {
            let path = audit_path(&slug)?;
            // A SIEM gets nothing from a log that was cut at its end, either.
            verify_log(&path, None).map_err(|err| Failure {
                code: 1,
                error: anyhow::Error::new(err),
            })?;
            let reader = std::io::BufReader::new(
                std::fs::File::open(&path)
                    .with_context(|| format!("cannot open `{}`", path.display()))?,
            );
            let mut writer: Box<dyn Write> = match &output {
                Some(out) => Box::new(
                    std::fs::File::create(out)
                        .with_context(|| format!("cannot create `{}`", out.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            match format {
                ExportFormat::Jsonl => audit::export_jsonl(reader, &mut writer, &path),
                ExportFormat::Csv => audit::export_csv(reader, &mut writer, &path),
            }
            .map_err(|err| Failure {
                code: 1,
                error: anyhow::Error::new(err),
            })?;
            Ok(0)
        }
        None => {
            let Some(slug) = args.slug else {
                return Err(usage(
                    "`audit` needs a bottle slug",
                    "bot-bottle audit <slug> [--json] [--follow]",
                ));
            };
            let path = audit_path(&slug)?;
            show_audit(&path, args.json, args.follow).await
        }
    }
}

async fn show_audit(path: &std::path::Path, json: bool, follow: bool) -> Result<i32, Failure> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .with_context(|| format!("cannot read `{}`", path.display()))?;
        if read == 0 {
            if !follow {
                return Ok(0);
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            continue;
        }
        // A line being written has no newline yet; wait for the rest.
        if !line.ends_with('\n') && follow {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut rest = String::new();
            let _ = reader.read_line(&mut rest);
            line.push_str(&rest);
        }
        let text = line.trim_end();
        if text.is_empty() {
            continue;
        }
        if json {
            println!("{text}");
        } else {
            match serde_json::from_str::<audit::AuditEvent>(text) {
                Ok(event) => println!("{}", audit::format_event(&event)),
                Err(_) => println!("(unparseable line) {text}"),
            }
        }
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
            if json {
                print_json(&serde_json::json!({
                    "ok": true,
                    "key_id": verified.key_id,
                    "statement": serde_json::to_value(&verified.statement).unwrap_or_default(),
                }));
            } else {
                println!("ok: signature valid (key {})", verified.key_id);
                println!(
                    "{}",
                    serde_json::to_string_pretty(&verified.statement).unwrap_or_default()
                );
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
