//! What a forge run adds to a bottle's plan: git access to one repository through the
//! gateway (push only to the run's branch, with the forge token held on the host), the
//! forge sidecar forwarded into the bottle and registered with the agent's MCP client,
//! and the standing instructions of a forge run. Pure: the launcher applies it once the
//! bottle's slug (and so its branch) is known.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::credential::{CredentialSource, CredentialSpec, Inject};
use crate::manifest::ProviderKind;
use crate::plan::{BOTTLE_RUN_DIR, BOTTLE_SHIM_PATH, BottlePlan};
use crate::policy::{EgressRule, GitRule};
use crate::provider::{AGENT_HOME, ProvisionedFile};

/// The loopback port in the bottle that the shim forwards to the forge sidecar.
pub const FORGE_PORT: u16 = 3129;
/// The forge sidecar's socket in `state/<slug>/run/`.
pub const FORGE_SOCKET: &str = "forge.sock";
/// The loopback port in the bottle that the shim forwards to the supervise sidecar.
pub const SUPERVISE_PORT: u16 = 3130;
/// The supervise sidecar's socket in `state/<slug>/run/`.
pub const SUPERVISE_SOCKET: &str = "supervise.sock";
/// Where the sidecar serves MCP (streamable HTTP).
pub const MCP_PATH: &str = "/mcp";
/// The name the agent's MCP client knows the sidecar by (claude calls its tools
/// `mcp__forge__<tool>`).
pub const MCP_SERVER_NAME: &str = "forge";
/// The credential name of the forge token in the plan and the audit log.
pub const FORGE_CREDENTIAL: &str = "forge-token";
/// claude's MCP configuration file, passed with `--mcp-config`.
const CLAUDE_MCP_CONFIG: &str = ".bot-bottle/mcp.json";

/// The forge context of one run, as the plan needs it. Holds no secret: the token is a
/// [`CredentialSource`] that the gateway resolves on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgeAttach {
    /// The forge's git host as the bottle names it, e.g. `gitea.example.com`.
    pub host: String,
    /// Its HTTPS port when not 443.
    pub port: Option<u16>,
    /// `owner/name`.
    pub repo: String,
    /// The assigned issue.
    pub issue: u64,
    /// The only branch the run may push, e.g. `bot-bottle/fix-login-k3j2`.
    pub branch: String,
    /// The Basic-auth user name git sends with the token (the bot's login).
    pub username: String,
    /// Where the host reads the forge token.
    pub token: CredentialSource,
}

/// What the plan shows about a forge run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgePlan {
    pub repo: String,
    pub issue: u64,
    pub branch: String,
    pub clone_url: String,
}

impl ForgeAttach {
    /// `https://host[:port]/owner/name.git`.
    #[must_use]
    pub fn clone_url(&self) -> String {
        match self.port {
            Some(port) if port != 443 => {
                format!("https://{}:{port}/{}.git", self.host, self.repo)
            }
            _ => format!("https://{}/{}.git", self.host, self.repo),
        }
    }
}

/// The in-bottle URL of the forge sidecar.
#[must_use]
pub fn sidecar_url() -> String {
    format!("http://127.0.0.1:{FORGE_PORT}{MCP_PATH}")
}

/// The standing instructions of a forge run, appended to the agent's own.
#[must_use]
pub fn instructions(forge: &ForgeAttach, provider: ProviderKind) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Forge run\n\nYou are working on issue #{issue} of `{repo}`. The workspace starts empty.",
        issue = forge.issue,
        repo = forge.repo
    );
    let _ = writeln!(
        text,
        "- Clone with `git clone {url}` (also in `$BOT_BOTTLE_FORGE_CLONE_URL`); no credentials are needed, the gateway adds them.",
        url = forge.clone_url()
    );
    let _ = writeln!(
        text,
        "- Work on the branch `{branch}` (`$BOT_BOTTLE_FORGE_BRANCH`) and push only that branch. Pushes to any other ref are refused.",
        branch = forge.branch
    );
    let _ = writeln!(
        text,
        "- Talk to the forge only through the forge tools: read_issue, read_pr, read_comments, post_comment, update_description, create_pr (from your branch) and signal_done. You may write only to issue #{} and your own pull requests.",
        forge.issue
    );
    let _ = writeln!(
        text,
        "- When a unit of work is finished, open or update your pull request, then call signal_done with status `done`, `blocked` or `needs_input` and a short summary. The run is paused until a human answers."
    );
    match provider {
        ProviderKind::Claude | ProviderKind::Codex => {
            let _ = writeln!(
                text,
                "- The forge tools are the MCP server `{MCP_SERVER_NAME}`. Without it, the same tools run as `{BOTTLE_SHIM_PATH} tool forge TOOL 'JSON'`."
            );
        }
        ProviderKind::Pi | ProviderKind::Command => {
            let _ = writeln!(
                text,
                "- Run the forge tools as `{BOTTLE_SHIM_PATH} tool forge TOOL 'JSON'`, e.g. `{BOTTLE_SHIM_PATH} tool forge signal_done '{{\"status\":\"done\",\"summary\":\"…\"}}'`; `{BOTTLE_SHIM_PATH} tool forge --list` lists them."
            );
        }
    }
    text
}

impl BottlePlan {
    /// Registers the MCP server `name`, served in the bottle on `127.0.0.1:port`, with
    /// the agent's MCP client: claude through one `--mcp-config` file listing every
    /// server, codex in its `config.toml`. pi and `command` agents have no MCP client and
    /// use `bot-bottle tool` instead.
    pub fn register_mcp(&mut self, name: &str, port: u16) {
        let url = format!("http://127.0.0.1:{port}{MCP_PATH}");
        match self.provider {
            ProviderKind::Claude => {
                // Otherwise claude defers MCP tools behind its ToolSearch tool, and the
                // model first has to find them by searching.
                self.env
                    .insert("ENABLE_TOOL_SEARCH".to_owned(), "false".to_owned());
                let path = format!("{AGENT_HOME}/{CLAUDE_MCP_CONFIG}");
                let entry = serde_json::json!({ "type": "http", "url": url });
                if let Some(file) = self.files.iter_mut().find(|f| f.path == path) {
                    let mut config: serde_json::Value =
                        serde_json::from_str(&file.contents).unwrap_or_default();
                    config["mcpServers"][name] = entry;
                    file.contents = format!("{config:#}\n");
                } else {
                    let config = serde_json::json!({ "mcpServers": { name: entry } });
                    self.files.push(ProvisionedFile {
                        path: path.clone(),
                        contents: format!("{config:#}\n"),
                    });
                    // `--mcp-config` takes several values; the `=` form keeps it to one.
                    let at = usize::from(!self.argv.is_empty());
                    self.argv.insert(at, format!("--mcp-config={path}"));
                }
            }
            ProviderKind::Codex => {
                if let Some(file) = self
                    .files
                    .iter_mut()
                    .find(|file| file.path.ends_with("/.codex/config.toml"))
                {
                    let _ = write!(file.contents, "\n[mcp_servers.{name}]\nurl = \"{url}\"\n");
                }
            }
            ProviderKind::Pi | ProviderKind::Command => {}
        }
    }

    /// Adds the supervise sidecar: forwarded from `127.0.0.1:3130` to
    /// `run/supervise.sock`, registered with the agent's MCP client, and named in the
    /// instructions.
    pub fn attach_supervise(&mut self) {
        self.forwards.push(crate::plan::Forward {
            port: SUPERVISE_PORT,
            socket: format!("{BOTTLE_RUN_DIR}/{SUPERVISE_SOCKET}"),
        });
        self.env.insert(
            "BOT_BOTTLE_SUPERVISE_URL".to_owned(),
            format!("http://127.0.0.1:{SUPERVISE_PORT}{MCP_PATH}"),
        );
        self.register_mcp("supervise", SUPERVISE_PORT);
        let how = match self.provider {
            ProviderKind::Claude | ProviderKind::Codex => "the MCP server `supervise`".to_owned(),
            ProviderKind::Pi | ProviderKind::Command => format!(
                "`{BOTTLE_SHIM_PATH} tool supervise TOOL 'JSON'` (e.g. `{BOTTLE_SHIM_PATH} tool supervise request_egress '{{\"host\":\"docs.example.org\",\"reason\":\"…\"}}'`)"
            ),
        };
        let note = format!(
            "# Asking a human\n\nWhen a request is refused because no egress rule allows it, do not work around it: ask with request_egress (host, reason), and wait for the answer. ask_human asks a question; current_policy says what you may reach now. These tools are {how}."
        );
        if let Some(file) = self.files.first_mut() {
            if !file.contents.is_empty() {
                file.contents.push_str("\n\n");
            }
            file.contents.push_str(&note);
        }
        self.supervise = true;
    }

    /// Adds a forge run to the plan: the git rule and the token for the forge host, the
    /// sidecar's forward, its MCP registration, the environment and the instructions.
    pub fn attach_forge(&mut self, forge: &ForgeAttach) {
        self.egress.rules.push(EgressRule {
            port: forge.port,
            git: Some(GitRule {
                repo: forge.repo.clone(),
                fetch: true,
                push: true,
                push_refs: vec![format!("refs/heads/{}", forge.branch)],
            }),
            ..EgressRule::host(forge.host.clone())
        });
        self.credentials.push(CredentialSpec {
            name: FORGE_CREDENTIAL.to_owned(),
            source: forge.token.clone(),
            hosts: vec![forge.host.clone()],
            inject: Inject::Basic {
                username: forge.username.clone(),
            },
            env: None,
        });
        let url = sidecar_url();
        for (key, value) in [
            ("BOT_BOTTLE_FORGE_URL", url.clone()),
            ("BOT_BOTTLE_FORGE_CLONE_URL", forge.clone_url()),
            ("BOT_BOTTLE_FORGE_BRANCH", forge.branch.clone()),
            ("BOT_BOTTLE_FORGE_ISSUE", forge.issue.to_string()),
        ] {
            self.env.insert(key.to_owned(), value);
        }
        self.forwards.push(crate::plan::Forward {
            port: FORGE_PORT,
            socket: format!("{BOTTLE_RUN_DIR}/{FORGE_SOCKET}"),
        });
        let extra = instructions(forge, self.provider);
        if let Some(file) = self.files.first_mut() {
            if !file.contents.is_empty() {
                file.contents.push_str("\n\n");
            }
            file.contents.push_str(&extra);
        }
        self.register_mcp(MCP_SERVER_NAME, FORGE_PORT);
        self.forge = Some(ForgePlan {
            repo: forge.repo.clone(),
            issue: forge.issue,
            branch: forge.branch.clone(),
            clone_url: forge.clone_url(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Reason, RequestFacts};

    fn attach() -> ForgeAttach {
        ForgeAttach {
            host: "gitea.example.com".to_owned(),
            port: None,
            repo: "acme/widget".to_owned(),
            issue: 7,
            branch: "bot-bottle/widget-ab12".to_owned(),
            username: "bot".to_owned(),
            token: CredentialSource::Env("FORGE_TOKEN".to_owned()),
        }
    }

    fn plan_for(provider: ProviderKind) -> BottlePlan {
        use crate::manifest::{AgentManifest, BottleManifest, Catalog, Origin};
        use crate::plan::{BottleSpec, HostFacts};
        use std::path::{Path, PathBuf};
        let mut catalog = Catalog::default();
        let agent = AgentManifest::parse(
            Path::new("/p/.bot-bottle/agents/a.md"),
            &format!(
                "---\nprovider: {provider}\nbottles: dev\n{}---\nBe careful.\n",
                if provider == ProviderKind::Command {
                    "command: [sh, -c, make]\n"
                } else {
                    ""
                }
            ),
        )
        .expect("agent");
        let dev = BottleManifest::parse(Path::new("/p/.bot-bottle/bottles/dev.md"), "---\n---\n")
            .expect("bottle");
        catalog.agents.insert("a".into(), (agent, Origin::Project));
        catalog.bottles.insert("dev".into(), (dev, Origin::Project));
        let spec = BottleSpec {
            agent: "a".into(),
            prompt: Some("go".into()),
            cwd: PathBuf::from("/w"),
            ..BottleSpec::default()
        };
        let host = HostFacts {
            agent_uid: 1000,
            default_backend: "docker".into(),
            ..HostFacts::default()
        };
        crate::plan::plan(&spec, &catalog, &host).expect("plan")
    }

    #[test]
    fn claude_gets_the_git_rule_the_token_the_forward_and_an_mcp_config() {
        let mut plan = plan_for(ProviderKind::Claude);
        plan.attach_forge(&attach());
        let rule = plan.egress.rules.last().expect("rule");
        assert_eq!(rule.host, "gitea.example.com");
        let git = rule.git.as_ref().expect("git rule");
        assert_eq!(git.push_refs, vec!["refs/heads/bot-bottle/widget-ab12"]);
        assert!(git.push && git.fetch);
        plan.egress.validate().expect("the added rule is valid");
        let credential = plan.credentials.last().expect("credential");
        assert_eq!(credential.name, FORGE_CREDENTIAL);
        assert_eq!(
            credential.env, None,
            "the token never gets a bottle variable"
        );
        credential.validate().expect("valid credential");
        assert_eq!(
            plan.argv[1],
            "--mcp-config=/home/agent/.bot-bottle/mcp.json"
        );
        let config = plan
            .files
            .iter()
            .find(|f| f.path.ends_with("mcp.json"))
            .expect("mcp config");
        let json: serde_json::Value = serde_json::from_str(&config.contents).expect("json");
        assert_eq!(
            json["mcpServers"]["forge"]["url"],
            "http://127.0.0.1:3129/mcp"
        );
        assert!(
            plan.files[0]
                .contents
                .starts_with("Be careful.\n\n# Forge run"),
            "{}",
            plan.files[0].contents
        );
        assert!(plan.files[0].contents.contains("signal_done"));
        assert_eq!(plan.forwards[0].port, FORGE_PORT);
        assert_eq!(plan.forwards[0].socket, "/run/bot-bottle/forge.sock");
        assert_eq!(
            plan.env["BOT_BOTTLE_FORGE_BRANCH"],
            "bot-bottle/widget-ab12"
        );
        let rendered = plan.render();
        assert!(rendered.contains("forge      acme/widget#7"), "{rendered}");
        assert!(rendered.contains("forge-token"), "{rendered}");
        // The plan, serialized, names the token's source, never a value.
        let json = serde_json::to_string(&plan).expect("serialize");
        assert!(json.contains("FORGE_TOKEN"));
    }

    #[test]
    fn codex_registers_the_server_in_its_config_and_pi_gets_the_command_form() {
        let mut plan = plan_for(ProviderKind::Codex);
        plan.attach_forge(&attach());
        let config = plan
            .files
            .iter()
            .find(|f| f.path.ends_with("config.toml"))
            .expect("codex config");
        assert!(
            config
                .contents
                .ends_with("\n[mcp_servers.forge]\nurl = \"http://127.0.0.1:3129/mcp\"\n"),
            "{}",
            config.contents
        );
        let mut plan = plan_for(ProviderKind::Pi);
        plan.attach_forge(&attach());
        assert!(plan.files[0].contents.contains("tool forge signal_done"));
        assert!(!plan.argv.iter().any(|a| a.starts_with("--mcp-config")));
    }

    #[test]
    fn the_git_rule_allows_the_branch_only() {
        let mut plan = plan_for(ProviderKind::Command);
        plan.attach_forge(&ForgeAttach {
            port: Some(8443),
            ..attach()
        });
        assert_eq!(
            plan.forge.as_ref().expect("forge").clone_url,
            "https://gitea.example.com:8443/acme/widget.git"
        );
        let decide = |path: &str, query: Option<&str>| {
            plan.egress.decide(&RequestFacts {
                host: "gitea.example.com",
                port: 8443,
                method: "GET",
                path,
                query,
            })
        };
        let fetch = decide(
            "/acme/widget.git/info/refs",
            Some("service=git-upload-pack"),
        );
        assert!(fetch.is_allow(), "{fetch:?}");
        let other = decide("/acme/other.git/info/refs", Some("service=git-upload-pack"));
        assert_eq!(other.reason, Reason::GitRepoNotAllowed);
        let api = decide("/api/v1/repos/acme/widget", None);
        assert!(
            !api.is_allow(),
            "the agent never reaches the forge API: {api:?}"
        );
    }

    #[test]
    fn supervise_and_forge_share_one_claude_mcp_config() {
        let mut plan = plan_for(ProviderKind::Claude);
        plan.attach_supervise();
        plan.attach_forge(&attach());
        let flags = plan
            .argv
            .iter()
            .filter(|a| a.starts_with("--mcp-config"))
            .count();
        assert_eq!(flags, 1, "{:?}", plan.argv);
        let config = plan
            .files
            .iter()
            .find(|f| f.path.ends_with("mcp.json"))
            .expect("mcp config");
        let json: serde_json::Value = serde_json::from_str(&config.contents).expect("json");
        assert_eq!(
            json["mcpServers"]["supervise"]["url"],
            "http://127.0.0.1:3130/mcp"
        );
        assert_eq!(
            json["mcpServers"]["forge"]["url"],
            "http://127.0.0.1:3129/mcp"
        );
        assert!(plan.supervise);
        assert_eq!(plan.forwards.len(), 2);
        assert!(plan.files[0].contents.contains("request_egress"));
        assert!(plan.render().contains("supervise  request_egress"));
        let mut plan = plan_for(ProviderKind::Command);
        plan.attach_supervise();
        assert!(
            plan.files[0]
                .contents
                .contains("tool supervise request_egress")
        );
    }
}
