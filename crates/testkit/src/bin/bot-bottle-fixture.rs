//! Runs one scripted model fixture until killed, for demos and shell smoke tests.
//!
//! Prints one JSON line on stdout once listening:
//! `{"kind":"anthropic","addr":"127.0.0.1:PORT","base_url":"http://127.0.0.1:PORT"}`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bot_bottle_testkit::{FixtureConfig, FixtureHandle, Script, TlsIdentity, Turn};
use clap::{Parser, ValueEnum};
use serde_json::json;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FixtureKind {
    /// Anthropic Messages API (claude, pi).
    Anthropic,
    /// OpenAI Responses API (codex).
    Openai,
}

#[derive(Debug, Parser)]
#[command(about = "Serve a scripted model API on loopback until killed")]
struct Args {
    #[arg(long, value_enum)]
    kind: FixtureKind,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The API key requests must carry; without it any key is accepted.
    #[arg(long)]
    expect_key: Option<String>,
    /// The file the scripted model asks the agent to write (relative to its working dir).
    #[arg(long, default_value = "hello.txt")]
    write_file: String,
    #[arg(long, default_value = "hello from the fixture\n")]
    content: String,
    /// A shell command the scripted model asks the agent to run first (before the write).
    #[arg(long)]
    shell: Option<String>,
    /// The text of the final answer.
    #[arg(long, default_value = "done")]
    final_text: String,
    /// Directory to resolve `--write-file` against when the client does not state one.
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (needs `--tls-key`).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Keep a JSON array of the received requests here (API keys redacted).
    #[arg(long)]
    record: Option<PathBuf>,
    /// Play this script instead of `--shell`/`--write-file`/`--final-text`: a JSON array
    /// of turns, each `{"shell": CMD}`, `{"write": {"path": P, "content": C}}`,
    /// `{"tool": {"name": N, "input": {…}}}` or `{"text": T}`.
    #[arg(long, conflicts_with_all = ["shell"])]
    script: Option<PathBuf>,
}

/// Reads a `--script` file.
fn read_script(path: &std::path::Path) -> anyhow::Result<Vec<Turn>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading `{}`", path.display()))?;
    let items: Vec<serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("`{}` is not a JSON array of turns", path.display()))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |name: &str| item.get(name);
            let text = |value: Option<&serde_json::Value>| {
                value.and_then(serde_json::Value::as_str).map(str::to_owned)
            };
            if let Some(command) = text(field("shell")) {
                Ok(Turn::Shell { command })
            } else if let Some(answer) = text(field("text")) {
                Ok(Turn::Text(answer))
            } else if let Some(write) = field("write") {
                Ok(Turn::WriteFile {
                    path: text(write.get("path")).unwrap_or_default(),
                    content: text(write.get("content")).unwrap_or_default(),
                })
            } else if let Some(tool) = field("tool") {
                Ok(Turn::Tool {
                    name: text(tool.get("name")).unwrap_or_default(),
                    input: tool.get("input").cloned().unwrap_or_else(|| json!({})),
                })
            } else {
                anyhow::bail!(
                    "turn {i} of `{}` is none of shell, write, tool, text",
                    path.display()
                )
            }
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let script = match &args.script {
        Some(path) => Script::new(read_script(path)?),
        None => default_script(&args),
    };
    let mut config = FixtureConfig::new(script).with_listen(args.listen);
    config.expected_key = args.expect_key.clone();
    config.workspace = args.workspace.clone();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let cert_pem =
            std::fs::read(cert).with_context(|| format!("reading `{}`", cert.display()))?;
        let key_pem = std::fs::read(key).with_context(|| format!("reading `{}`", key.display()))?;
        config = config.with_tls(TlsIdentity::from_pem(&cert_pem, &key_pem)?);
    }
    let (kind, handle) = match args.kind {
        FixtureKind::Anthropic => (
            "anthropic",
            bot_bottle_testkit::anthropic::start(config).await?,
        ),
        FixtureKind::Openai => ("openai", bot_bottle_testkit::openai::start(config).await?),
    };
    println!(
        "{}",
        json!({"kind": kind, "addr": handle.addr().to_string(), "base_url": handle.base_url()})
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => write_record(&args, &handle)?,
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    write_record(&args, &handle)
}

/// The smoke conversation the flags describe: shell commands, a file, a final answer.
fn default_script(args: &Args) -> Script {
    let mut turns: Vec<Turn> = args
        .shell
        .iter()
        .map(|command| Turn::Shell {
            command: command.clone(),
        })
        .collect();
    turns.push(Turn::WriteFile {
        path: args.write_file.clone(),
        content: args.content.clone(),
    });
    turns.push(Turn::Text(args.final_text.clone()));
    Script::new(turns)
}

fn write_record(args: &Args, handle: &FixtureHandle) -> anyhow::Result<()> {
    let Some(path) = &args.record else {
        return Ok(());
    };
    let mut requests = handle.requests();
    for request in &mut requests {
        for (name, value) in &mut request.headers {
            if name == "x-api-key" || name == "authorization" {
                *value = "<redacted>".to_owned();
            }
        }
    }
    let text = serde_json::to_string_pretty(&requests)?;
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)
        .with_context(|| format!("writing `{}`", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("writing `{}`", path.display()))?;
    Ok(())
}
