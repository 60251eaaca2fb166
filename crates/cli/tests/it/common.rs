use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A project directory with `.bot-bottle/` manifests and a private bot-bottle home.
pub struct Project {
    pub dir: tempfile::TempDir,
    pub home: tempfile::TempDir,
    pub env: Vec<(String, String)>,
}

pub const AGENT_UID: u32 = 1000;

impl Project {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bb-proj-")
            .tempdir()
            .unwrap();
        let home = tempfile::Builder::new()
            .prefix("bb-home-")
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(dir.path().join(".bot-bottle/agents")).unwrap();
        std::fs::create_dir_all(dir.path().join(".bot-bottle/bottles")).unwrap();
        // The agent never runs as root; when the tests do, hand it the workspace.
        if nix::unistd::getuid().is_root() {
            let uid = Some(nix::unistd::Uid::from_raw(AGENT_UID));
            let gid = Some(nix::unistd::Gid::from_raw(AGENT_UID));
            nix::unistd::chown(dir.path(), uid, gid).unwrap();
        }
        Self {
            dir,
            home,
            env: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn agent(&self, name: &str, text: &str) -> &Self {
        std::fs::write(
            self.path().join(format!(".bot-bottle/agents/{name}.md")),
            text,
        )
        .unwrap();
        self
    }

    pub fn bottle(&self, name: &str, text: &str) -> &Self {
        std::fs::write(
            self.path().join(format!(".bot-bottle/bottles/{name}.md")),
            text,
        )
        .unwrap();
        self
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        // A hung agent must fail the test, not stall CI: `timeout` ends it.
        let mut cmd = Command::new("timeout");
        cmd.arg("--kill-after=10")
            .arg("900")
            .arg(bin())
            .args(args)
            .current_dir(self.path())
            .env("BOT_BOTTLE_HOME", self.home.path())
            .env("BOT_BOTTLE_LOOPBACK_ONLY", "1")
            // Tests write their own manifests; the trust check has tests of its own.
            .env("BOT_BOTTLE_TRUST_PROJECT_MANIFESTS", "1")
            .env_remove("BOT_BOTTLE_DRY_RUN")
            .env_remove("BOT_BOTTLE_TRIPWIRE")
            .env_remove("BOT_BOTTLE_UPSTREAM_OVERRIDES");
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let output = self.cmd(args).output().unwrap();
        eprintln!(
            "$ bot-bottle {}\n--- stdout\n{}--- stderr\n{}--- exit {:?}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            output.status.code()
        );
        output
    }

    pub fn state_dirs(&self) -> Vec<String> {
        let state = self.home.path().join("state");
        let Ok(entries) = std::fs::read_dir(state) else {
            return Vec::new();
        };
        let mut slugs: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        slugs.sort();
        slugs
    }

    pub fn audit_lines(&self, slug: &str) -> Vec<serde_json::Value> {
        let text =
            std::fs::read_to_string(self.home.path().join(format!("state/{slug}/egress.jsonl")))
                .unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        // Best effort: leave no containers or frozen images behind.
        for slug in self.state_dirs() {
            let _ = self.cmd(&["destroy", &slug]).output();
        }
    }
}

/// An agent manifest that runs `script` with `bash -c` in the bottle(s) `bottles`.
pub fn bash_agent(script: &str, bottles: &str) -> String {
    format!(
        "---\nprovider: command\ncommand: [\"bash\", \"-c\", {}]\nbottles: {bottles}\n---\n",
        serde_json::to_string(script).unwrap()
    )
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bot-bottle"))
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The slug printed by `start --json`.
pub fn slug_of(output: &Output) -> String {
    let value: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("start --json printed no JSON ({err}): {}", stdout(output)));
    value["slug"].as_str().unwrap().to_owned()
}

pub const COMMAND_BOTTLE: &str = "---\negress:\n  rules: []\n---\n";
