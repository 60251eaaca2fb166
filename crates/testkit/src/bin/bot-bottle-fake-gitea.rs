//! Runs the fake Gitea (API, `git http-backend`, signed webhooks) over TLS until its
//! stdin closes, for demos (`scripts/demo-forge.sh`).
//!
//! Prints one JSON line once listening: `{"addr":"127.0.0.1:PORT","api_url":"https://…"}`.
//! Then it reads one command per stdin line and answers each with one JSON line:
//! - `hook URL SECRET`: deliver every event of the repository to `URL`, signed;
//! - `label N LABEL SENDER`: `SENDER` adds `LABEL` to issue `N`;
//! - `comment N USER TEXT…`: `USER` comments on issue or pull request `N`;
//! - `close N merged|closed`: close (or merge) pull request `N`;
//! - `show`: refs, pull requests and every comment;
//! - `file REV PATH`: a file's content at a revision.

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context;
use bot_bottle_testkit::TlsIdentity;
use bot_bottle_testkit::gitea::{FakeGitea, NewIssue};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "Serve a fake Gitea over TLS on loopback until stdin closes")]
struct Args {
    /// PEM certificate chain and key to serve HTTPS with.
    #[arg(long)]
    tls_cert: PathBuf,
    #[arg(long)]
    tls_key: PathBuf,
    /// The repository, as owner/name (one commit on `main` with a README).
    #[arg(long)]
    repo: String,
    /// The user git requests must authenticate as.
    #[arg(long)]
    git_user: String,
    /// The environment variable holding the token git requests must carry.
    #[arg(long)]
    git_token_env: String,
    /// `ORG:USER` memberships (repeatable).
    #[arg(long = "member")]
    members: Vec<String>,
    /// `TITLE|BODY|AUTHOR|ASSIGNEE` issues, opened in order (repeatable).
    #[arg(long = "issue")]
    issues: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let (owner, repo) = args
        .repo
        .split_once('/')
        .context("--repo must be owner/name")?;
    let cert = std::fs::read(&args.tls_cert)
        .with_context(|| format!("reading `{}`", args.tls_cert.display()))?;
    let key = std::fs::read(&args.tls_key)
        .with_context(|| format!("reading `{}`", args.tls_key.display()))?;
    let gitea = FakeGitea::start_tls(TlsIdentity::from_pem(&cert, &key)?).await?;
    gitea.add_git_repo(owner, repo, &[("README.md", &format!("# {repo}\n"))])?;
    let token = std::env::var(&args.git_token_env)
        .with_context(|| format!("`{}` is not set", args.git_token_env))?;
    gitea.set_git_credentials(&args.git_user, &token);
    for member in &args.members {
        let (org, user) = member
            .split_once(':')
            .context("--member must be ORG:USER")?;
        gitea.add_org_member(org, user);
    }
    for issue in &args.issues {
        let mut parts = issue.split('|');
        let mut next = || parts.next().unwrap_or_default().to_owned();
        let (title, body, author, assignee) = (next(), next(), next(), next());
        gitea.add_issue(
            owner,
            repo,
            NewIssue {
                title,
                body,
                author,
                assignees: if assignee.is_empty() {
                    Vec::new()
                } else {
                    vec![assignee]
                },
                labels: Vec::new(),
            },
        );
    }
    println!(
        "{}",
        json!({"addr": gitea.addr().to_string(), "api_url": gitea.api_url()})
    );
    let (lines, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = commands.recv().await {
        let answer = match run(&gitea, owner, repo, &line) {
            Ok(value) => value,
            Err(err) => json!({"error": format!("{err:#}")}),
        };
        println!("{answer}");
    }
    Ok(())
}

fn run(gitea: &FakeGitea, owner: &str, repo: &str, line: &str) -> anyhow::Result<Value> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |i: usize| -> anyhow::Result<u64> {
        words
            .get(i)
            .context("missing number")?
            .parse()
            .context("not a number")
    };
    match words.first().copied() {
        Some("hook") => {
            let (url, secret) = (words.get(1).context("URL")?, words.get(2).unwrap_or(&""));
            gitea.add_webhook(owner, repo, url, secret)?;
            Ok(json!({"ok": "hook"}))
        }
        Some("label") => {
            let (label, sender) = (
                words.get(2).context("LABEL")?,
                words.get(3).context("SENDER")?,
            );
            gitea.label_issue(owner, repo, number(1)?, label, sender)?;
            Ok(json!({"ok": "label"}))
        }
        Some("comment") => {
            let user = words.get(2).context("USER")?;
            let text = words.get(3..).unwrap_or_default().join(" ");
            gitea.comment_as(owner, repo, number(1)?, user, &text)?;
            Ok(json!({"ok": "comment"}))
        }
        Some("close") => {
            gitea.close(owner, repo, number(1)?, words.get(2) == Some(&"merged"));
            Ok(json!({"ok": "close"}))
        }
        Some("show") => {
            let refs = gitea.git_refs(owner, repo)?;
            let pulls = gitea.pull_numbers(owner, repo);
            let mut comments = serde_json::Map::new();
            for number in 1..=(pulls.iter().copied().max().unwrap_or(0).max(2)) {
                let list: Vec<Value> = gitea
                    .issue_comments(owner, repo, number)
                    .into_iter()
                    .map(|(user, body)| json!({"user": user, "body": body}))
                    .collect();
                if !list.is_empty() {
                    comments.insert(number.to_string(), Value::Array(list));
                }
            }
            Ok(json!({"refs": refs, "pulls": pulls, "comments": comments}))
        }
        Some("file") => {
            let (rev, path) = (words.get(1).context("REV")?, words.get(2).context("PATH")?);
            Ok(json!({"file": gitea.git_file(owner, repo, rev, path)?}))
        }
        _ => anyhow::bail!("unknown command `{line}`"),
    }
}
