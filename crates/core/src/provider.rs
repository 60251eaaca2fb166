//! Each agent CLI's quirks, as plain data: install step, arguments, environment,
//! where its instructions go, how it trusts the gateway CA and how it resumes.
//!
//! Providers are a closed set, so this is one enum with a `match` per behaviour
//! (see docs/architecture.md, "Providers"). They live in core rather than runtime
//! because `plan()` is pure and must already know the argv and the image recipe.
//!
//! Sources for the flags below:
//! - claude: <https://docs.anthropic.com/en/docs/claude-code/cli-reference> and
//!   <https://docs.anthropic.com/en/docs/claude-code/settings> (env variables)
//! - codex: <https://github.com/openai/codex/blob/main/docs/config.md> and `codex exec --help`
//! - pi: <https://github.com/badlogic/pi-mono/tree/main/packages/coding-agent>
//!
//! Observed behaviour behind a sealed network is in `shared/AGENTS-WIRE.md`.

use std::collections::BTreeMap;

use crate::manifest::ProviderKind;

/// Where the gateway CA certificate is placed inside every bottle.
pub const BOTTLE_CA_PATH: &str = "/etc/bot-bottle/gateway-ca.pem";
/// The system trust store inside the bottle (Debian's, and Alpine's): the gateway CA is
/// appended to it at launch.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The home directory of the agent user inside the bottle.
pub const AGENT_HOME: &str = "/home/agent";
/// The workspace inside the bottle.
pub const WORKSPACE: &str = "/workspace";

/// npm packages, pinned: the version is part of the image's content hash, so a bump
/// rebuilds the image on purpose, never by accident. Versions as observed in
/// `shared/AGENTS-WIRE.md`.
pub const CLAUDE_PACKAGE: &str = "@anthropic-ai/claude-code@2.1.328";
pub const CODEX_PACKAGE: &str = "@openai/codex@0.169.0";
pub const PI_PACKAGE: &str = "@mariozechner/pi-coding-agent@0.73.1";

/// Codex's configuration in the bottle.
///
/// - A custom provider that still points at `https://api.openai.com/v1`: the built-in one
///   first tries WebSocket upgrades (seven of them) before it falls back to `POST
///   /v1/responses`, and each would be a line in the audit log. The key comes from
///   `OPENAI_API_KEY`, which holds a placeholder the gateway swaps on the way out.
/// - Analytics and plugin listings off: side traffic to other hosts, and retries would
///   turn one blocked call into six audit lines.
///
/// See <https://github.com/openai/codex/blob/main/docs/config.md> (`model_providers`).
pub const CODEX_CONFIG: &str = r#"model_provider = "bot-bottle-openai"

[model_providers.bot-bottle-openai]
name = "OpenAI (through the bot-bottle gateway)"
base_url = "https://api.openai.com/v1"
env_key = "OPENAI_API_KEY"
wire_api = "responses"

[analytics]
enabled = false

[features]
plugins = false
"#;

/// How the agent is being started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation<'a> {
    /// Attached to a terminal, no initial prompt.
    Interactive,
    /// Headless, with the prompt as the first task.
    Headless { prompt: &'a str },
}

/// A file the provider needs inside the bottle before the agent starts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProvisionedFile {
    /// Absolute path in the bottle.
    pub path: String,
    pub contents: String,
}

impl ProviderKind {
    /// The npm package installed into the bottle image, if any.
    #[must_use]
    pub fn npm_package(self) -> Option<&'static str> {
        match self {
            Self::Claude => Some(CLAUDE_PACKAGE),
            Self::Codex => Some(CODEX_PACKAGE),
            Self::Pi => Some(PI_PACKAGE),
            Self::Command => None,
        }
    }

    /// The executable name inside the bottle.
    #[must_use]
    pub fn program(self) -> Option<&'static str> {
        match self {
            Self::Claude => Some("claude"),
            Self::Codex => Some("codex"),
            Self::Pi => Some("pi"),
            Self::Command => None,
        }
    }

    /// The full argv for the agent. `command` is the agent manifest's argv for
    /// `provider: command`; `resume` is true when the bottle continues an earlier
    /// session (so the CLI reopens its conversation instead of starting anew).
    #[must_use]
    pub fn argv(
        self,
        command: Option<&[String]>,
        model: Option<&str>,
        extra_args: &[String],
        invocation: &Invocation<'_>,
        resume: bool,
    ) -> Vec<String> {
        let mut argv: Vec<String> = Vec::new();
        let s = |x: &str| x.to_owned();
        match self {
            Self::Claude => {
                // The bottle is the sandbox, so the CLI asks for no approvals of its own.
                argv.extend([s("claude"), s("--dangerously-skip-permissions")]);
                if let Some(model) = model {
                    argv.extend([s("--model"), s(model)]);
                }
                if resume {
                    argv.push(s("--continue"));
                }
                argv.extend(extra_args.iter().cloned());
                if let Invocation::Headless { prompt } = invocation {
                    argv.extend(self.headless_prompt(prompt));
                }
            }
            Self::Codex => {
                argv.push(s("codex"));
                match invocation {
                    Invocation::Headless { prompt } => {
                        argv.push(s("exec"));
                        if resume {
                            argv.extend([s("resume"), s("--last")]);
                        }
                        // Outside a git repository codex refuses to run without this.
                        argv.extend([
                            s("--skip-git-repo-check"),
                            s("--dangerously-bypass-approvals-and-sandbox"),
                        ]);
                        if let Some(model) = model {
                            argv.extend([s("--model"), s(model)]);
                        }
                        argv.extend(extra_args.iter().cloned());
                        argv.extend(self.headless_prompt(prompt));
                    }
                    Invocation::Interactive => {
                        if resume {
                            argv.extend([s("resume"), s("--last")]);
                        }
                        argv.push(s("--dangerously-bypass-approvals-and-sandbox"));
                        if let Some(model) = model {
                            argv.extend([s("--model"), s(model)]);
                        }
                        argv.extend(extra_args.iter().cloned());
                    }
                }
            }
            Self::Pi => {
                argv.push(s("pi"));
                if let Some(model) = model {
                    argv.extend([s("--model"), s(model)]);
                }
                if resume {
                    argv.push(s("--continue"));
                }
                argv.extend(extra_args.iter().cloned());
                if let Invocation::Headless { prompt } = invocation {
                    argv.extend(self.headless_prompt(prompt));
                }
            }
            Self::Command => {
                argv.extend(command.unwrap_or_default().iter().cloned());
                argv.extend(extra_args.iter().cloned());
            }
        }
        argv
    }

    /// The arguments that deliver a headless prompt (claude `-p`, codex positional,
    /// pi `-p`). `command` receives the prompt in `BOT_BOTTLE_PROMPT` instead.
    #[must_use]
    pub fn headless_prompt(self, prompt: &str) -> Vec<String> {
        match self {
            Self::Claude | Self::Pi => vec!["-p".to_owned(), prompt.to_owned()],
            Self::Codex => vec![prompt.to_owned()],
            Self::Command => Vec::new(),
        }
    }

    /// Environment for the agent process (never a secret: credentials arrive as
    /// placeholders through the plan, not here).
    #[must_use]
    pub fn env(self, invocation: &Invocation<'_>) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let mut set = |k: &str, v: &str| {
            env.insert(k.to_owned(), v.to_owned());
        };
        match self {
            Self::Claude => {
                // Node reads only this for extra roots; the native binary honours it too.
                set("NODE_EXTRA_CA_CERTS", BOTTLE_CA_PATH);
                // Without it claude sends feature-flag, bootstrap and telemetry calls (some
                // with the API key) that would crowd the audit log.
                set("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1");
                set("DISABLE_AUTOUPDATER", "1");
            }
            Self::Codex => {
                set("CODEX_CA_CERTIFICATE", BOTTLE_CA_PATH);
                set("CODEX_HOME", &format!("{AGENT_HOME}/.codex"));
            }
            Self::Pi => {
                set("NODE_EXTRA_CA_CERTS", BOTTLE_CA_PATH);
                set("PI_OFFLINE", "1");
            }
            Self::Command => {}
        }
        if let (Self::Command, Invocation::Headless { prompt }) = (self, invocation) {
            set("BOT_BOTTLE_PROMPT", prompt);
        }
        env
    }

    /// Config files and instructions, placed where this CLI reads them.
    #[must_use]
    pub fn provisioned_files(self, instructions: &str) -> Vec<ProvisionedFile> {
        let file = |path: String, contents: String| ProvisionedFile { path, contents };
        let mut files = Vec::new();
        match self {
            Self::Claude => {
                // User memory: read in every project, and it keeps the workspace clean.
                files.push(file(
                    format!("{AGENT_HOME}/.claude/CLAUDE.md"),
                    instructions.to_owned(),
                ));
            }
            Self::Codex => {
                files.push(file(
                    format!("{AGENT_HOME}/.codex/AGENTS.md"),
                    instructions.to_owned(),
                ));
                // Analytics and plugin listings are side traffic to other hosts; retries
                // would turn one blocked call into six audit lines.
                files.push(file(
                    format!("{AGENT_HOME}/.codex/config.toml"),
                    CODEX_CONFIG.to_owned(),
                ));
            }
            Self::Pi => {
                files.push(file(
                    format!("{AGENT_HOME}/.pi/agent/AGENTS.md"),
                    instructions.to_owned(),
                ));
            }
            Self::Command => {
                files.push(file(
                    format!("{AGENT_HOME}/INSTRUCTIONS.md"),
                    instructions.to_owned(),
                ));
            }
        }
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headless_prompt_args_per_provider() {
        assert_eq!(
            ProviderKind::Claude.headless_prompt("do it"),
            vec!["-p", "do it"]
        );
        assert_eq!(
            ProviderKind::Pi.headless_prompt("do it"),
            vec!["-p", "do it"]
        );
        assert_eq!(ProviderKind::Codex.headless_prompt("do it"), vec!["do it"]);
        assert!(ProviderKind::Command.headless_prompt("do it").is_empty());
    }

    #[test]
    fn prompt_text_is_verbatim() {
        let prompt = "line one\n  'quoted' \"double\" $HOME `tick`";
        assert_eq!(ProviderKind::Claude.headless_prompt(prompt)[1], prompt);
        assert_eq!(ProviderKind::Codex.headless_prompt(prompt)[0], prompt);
    }

    #[test]
    fn claude_headless_argv() {
        let argv = ProviderKind::Claude.argv(
            None,
            Some("m"),
            &[],
            &Invocation::Headless { prompt: "p" },
            false,
        );
        assert_eq!(
            argv,
            vec![
                "claude",
                "--dangerously-skip-permissions",
                "--model",
                "m",
                "-p",
                "p"
            ]
        );
        let resumed =
            ProviderKind::Claude.argv(None, None, &[], &Invocation::Headless { prompt: "p" }, true);
        assert_eq!(
            resumed,
            vec![
                "claude",
                "--dangerously-skip-permissions",
                "--continue",
                "-p",
                "p"
            ]
        );
    }

    #[test]
    fn codex_headless_and_resume_argv() {
        let argv = ProviderKind::Codex.argv(
            None,
            None,
            &[],
            &Invocation::Headless { prompt: "p" },
            false,
        );
        assert_eq!(
            argv,
            vec![
                "codex",
                "exec",
                "--skip-git-repo-check",
                "--dangerously-bypass-approvals-and-sandbox",
                "p"
            ]
        );
        let resumed =
            ProviderKind::Codex.argv(None, None, &[], &Invocation::Headless { prompt: "p" }, true);
        assert_eq!(&resumed[..4], ["codex", "exec", "resume", "--last"]);
    }

    #[test]
    fn command_argv_and_prompt_env() {
        let cmd = vec!["bash".to_owned(), "-c".to_owned(), "echo hi".to_owned()];
        let invocation = Invocation::Headless { prompt: "p" };
        assert_eq!(
            ProviderKind::Command.argv(Some(&cmd), None, &[], &invocation, false),
            cmd
        );
        assert_eq!(
            ProviderKind::Command
                .env(&invocation)
                .get("BOT_BOTTLE_PROMPT")
                .map(String::as_str),
            Some("p")
        );
    }

    #[test]
    fn every_node_provider_trusts_the_gateway_ca() {
        let i = Invocation::Interactive;
        assert_eq!(
            ProviderKind::Claude.env(&i)["NODE_EXTRA_CA_CERTS"],
            BOTTLE_CA_PATH
        );
        assert_eq!(
            ProviderKind::Pi.env(&i)["NODE_EXTRA_CA_CERTS"],
            BOTTLE_CA_PATH
        );
        assert_eq!(
            ProviderKind::Codex.env(&i)["CODEX_CA_CERTIFICATE"],
            BOTTLE_CA_PATH
        );
    }
}
