//! `bot-bottle start` in a real terminal: tmux runs it in a 120×40 window, the tests
//! type into it and read the screen. Covers the pickers, the preflight, and (Docker) a
//! PTY attach to a `command` agent: input, window size, Ctrl-C and the exit code.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{COMMAND_BOTTLE, Project, bin};

const STEP: Duration = Duration::from_secs(30);
/// Pressing `y` may build the bottle image on a fresh machine.
const LAUNCH: Duration = Duration::from_secs(900);

fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A private tmux server (own socket, no user config) with one 120×40 window running
/// `bot-bottle ARGS` in the project. Afterwards the window's shell records bot-bottle's
/// exit code and the terminal settings it left behind.
struct Terminal {
    socket: String,
    files: tempfile::TempDir,
}

impl Terminal {
    fn start(project: &Project, args: &[&str]) -> Self {
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let socket = format!(
            "bb-it-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::SeqCst)
        );
        let files = tempfile::Builder::new()
            .prefix("bb-tty-")
            .tempdir()
            .unwrap();
        let mut command = vec![
            "env".to_owned(),
            "-u".to_owned(),
            "BOT_BOTTLE_DRY_RUN".to_owned(),
            "-u".to_owned(),
            "BOT_BOTTLE_UPSTREAM_OVERRIDES".to_owned(),
            format!("BOT_BOTTLE_HOME={}", project.home.path().display()),
            "BOT_BOTTLE_LOOPBACK_ONLY=1".to_owned(),
            "BOT_BOTTLE_TRUST_PROJECT_MANIFESTS=1".to_owned(),
        ];
        command.extend(project.env.iter().map(|(k, v)| format!("{k}={v}")));
        command.push(bin().display().to_string());
        command.extend(args.iter().map(|arg| (*arg).to_owned()));
        let script = format!(
            "{}; echo $? > {}; stty -a > {}; exec sleep 3600",
            command
                .iter()
                .map(|word| sh_quote(word))
                .collect::<Vec<_>>()
                .join(" "),
            sh_quote(&files.path().join("exit").display().to_string()),
            sh_quote(&files.path().join("stty").display().to_string()),
        );
        let terminal = Self { socket, files };
        let out = terminal
            .tmux()
            .args([
                "new-session",
                "-d",
                "-s",
                "bb",
                "-x",
                "120",
                "-y",
                "40",
                "-c",
            ])
            .arg(project.path())
            .arg(script)
            .output()
            .expect("tmux must be installed (scripts/bootstrap.sh installs it)");
        assert!(
            out.status.success(),
            "tmux new-session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        terminal
    }

    fn tmux(&self) -> Command {
        let mut command = Command::new("tmux");
        command.args(["-L", &self.socket, "-f", "/dev/null"]);
        command
    }

    fn run_tmux(&self, args: &[&str]) {
        let out = self.tmux().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The whole pane, history included, with wrapped lines joined.
    fn screen(&self) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-J", "-S", "-", "-t", "bb"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Named keys (`Enter`, `Space`, `C-c`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "bb"];
        args.extend(keys);
        self.run_tmux(&args);
    }

    /// Literal text, not key names.
    fn text(&self, text: &str) {
        self.run_tmux(&["send-keys", "-t", "bb", "-l", text]);
    }

    fn line(&self, text: &str) {
        self.text(text);
        self.keys(&["Enter"]);
    }

    fn resize(&self, columns: u16, rows: u16) {
        self.run_tmux(&[
            "resize-window",
            "-t",
            "bb",
            "-x",
            &columns.to_string(),
            "-y",
            &rows.to_string(),
        ]);
    }

    /// Polls the screen until `done` holds; fails with the screen after `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; the screen:\n{screen}{}",
                self.exit_note()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the screen shows `needle`.
    fn wait_text(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for(&format!("`{needle}`"), timeout, |screen| {
            screen.contains(needle)
        })
    }

    /// Waits until some whole line (trailing blanks aside) is `line`.
    fn wait_line(&self, line: &str, timeout: Duration) -> String {
        self.wait_for(&format!("the line `{line}`"), timeout, |screen| {
            has_line(screen, line)
        })
    }

    fn exit_note(&self) -> String {
        match std::fs::read_to_string(self.files.path().join("exit")) {
            Ok(code) => format!("\n(bot-bottle exited {})", code.trim()),
            Err(_) => String::new(),
        }
    }

    /// bot-bottle's exit code, once it has exited.
    fn exit_code(&self, timeout: Duration) -> i32 {
        let path = self.files.path().join("exit");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && text.ends_with('\n')
            {
                return text.trim().parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "bot-bottle did not exit within {timeout:?}; the screen:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `stty -a` of the terminal after bot-bottle exited.
    fn settings_after_exit(&self) -> String {
        let path: PathBuf = self.files.path().join("stty");
        let deadline = Instant::now() + STEP;
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && text.contains("icanon")
            {
                return text;
            }
            assert!(Instant::now() < deadline, "no `stty -a` output");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // Hangs up bot-bottle if a test failed midway; Project's drop then destroys
        // whatever bottle it left.
        let _ = self.tmux().arg("kill-server").output();
    }
}

/// The harness trusts every project's manifests; this project is checked as a user's is.
fn checking_trust(mut project: Project) -> Project {
    project.env.push((
        "BOT_BOTTLE_TRUST_PROJECT_MANIFESTS".to_owned(),
        "0".to_owned(),
    ));
    project
}

fn wait_until_file(path: &std::path::Path) {
    let deadline = Instant::now() + STEP;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "`{}` was not written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn has_line(screen: &str, line: &str) -> bool {
    screen.lines().any(|l| l.trim_end() == line)
}

/// bot-bottle restored the terminal: line editing and echo are on again.
fn assert_cooked(settings: &str) {
    let words: Vec<&str> = settings.split_whitespace().collect();
    for flag in ["icanon", "echo", "isig", "opost"] {
        assert!(
            words.contains(&flag),
            "terminal left without `{flag}`:\n{settings}"
        );
    }
}

fn picker_project() -> Project {
    let project = Project::new();
    project
        .agent(
            "sheller",
            "---\nprovider: command\ncommand: [\"env\", \"PS1=agent-prompt$ \", \"bash\", \"--norc\", \"-i\"]\nbottles: plain\n---\n",
        )
        .agent(
            "other",
            "---\nprovider: command\ncommand: [\"true\"]\nbottles: extra\n---\n",
        )
        .bottle("plain", COMMAND_BOTTLE)
        .bottle("extra", COMMAND_BOTTLE);
    project
}

#[test]
fn interactive_pickers_then_declined_preflight_launches_nothing() {
    // The trust check on: the preflight warns that these manifests were never trusted.
    let project = checking_trust(picker_project());
    let terminal = Terminal::start(&project, &["start"]);

    let screen = terminal.wait_text("? Agent:", STEP);
    assert!(
        has_line(&screen, "  other") || has_line(&screen, "> other"),
        "{screen}"
    );
    // Typing filters the list; `shel` leaves only `sheller`.
    terminal.text("shel");
    let screen = terminal.wait_line("> sheller", STEP);
    assert!(!screen.contains("other"), "filter kept `other`:\n{screen}");
    terminal.keys(&["Enter"]);

    // The agent's default bottle is preselected, the other one is not.
    let screen = terminal.wait_text("? Bottles:", STEP);
    assert!(has_line(&screen, "  [x] plain"), "{screen}");
    assert!(has_line(&screen, "> [ ] extra"), "{screen}");
    terminal.keys(&["Space"]);
    terminal.wait_line("> [x] extra", STEP);
    terminal.keys(&["Enter"]);

    terminal.wait_text("? Label: (sheller)", STEP);
    terminal.line("night-run");
    terminal.wait_text("? Color:", STEP);
    terminal.text("magen");
    terminal.wait_line("> magenta", STEP);
    terminal.keys(&["Enter"]);

    let screen = terminal.wait_text("Launch this bottle? (y/N)", STEP);
    for line in [
        "> Agent: sheller",
        "> Bottles: extra, plain",
        "> Label: night-run",
        "> Color: magenta",
        "label      night-run",
        "agent      sheller (command)",
        "bottles    extra + plain",
        "backend    docker",
        "mode       interactive",
    ] {
        assert!(has_line(&screen, line), "no `{line}` in:\n{screen}");
    }
    assert!(
        screen.contains("are new or changed since you last trusted them"),
        "no trust warning in:\n{screen}"
    );
    terminal.line("n");

    assert_eq!(terminal.exit_code(STEP), 75, "{}", terminal.screen());
    assert!(
        !project.home.path().join("trusted-manifests.json").exists(),
        "declining trusted the manifests"
    );
    assert!(
        project.state_dirs().is_empty(),
        "a declined launch left state: {:?}",
        project.state_dirs()
    );
    assert_cooked(&terminal.settings_after_exit());
}

/// Prints a marker once its trap is set, then loops until SIGINT, which it reports and
/// turns into exit 3.
const TRAP_SCRIPT: &str =
    "trap 'echo got-int; exit 3' INT\necho trap-armed\nwhile :; do sleep 0.1; done\n";

#[test]
fn docker_interactive_attach_input_resize_ctrl_c_and_exit_code() {
    // The trust check on: answering y at the preflight trusts the manifests.
    let project = checking_trust(picker_project());
    std::fs::write(project.path().join("trap.sh"), TRAP_SCRIPT).unwrap();
    let terminal = Terminal::start(&project, &["start", "sheller"]);

    terminal.wait_text("? Bottles:", STEP);
    terminal.keys(&["Enter"]);
    terminal.wait_text("? Label: (sheller)", STEP);
    terminal.line("attach-run");
    terminal.wait_text("? Color:", STEP);
    terminal.text("cyan");
    terminal.wait_line("> cyan", STEP);
    terminal.keys(&["Enter"]);
    terminal.wait_text("Launch this bottle? (y/N)", STEP);
    terminal.line("y");
    wait_until_file(&project.home.path().join("trusted-manifests.json"));

    terminal.wait_for("the agent's shell prompt", LAUNCH, |screen| {
        screen
            .lines()
            .any(|line| line.trim_end() == "agent-prompt$")
    });
    // Typed input reaches the agent, and its PTY has the window's size.
    terminal.line("echo typed-$((6*7)); stty size");
    terminal.wait_line("typed-42", STEP);
    terminal.wait_line("40 120", STEP);

    // A resize reaches the agent asynchronously (SIGWINCH, then the engine's resize
    // call): ask again until it shows.
    terminal.resize(100, 30);
    let deadline = Instant::now() + STEP;
    while !has_line(&terminal.screen(), "30 100") {
        assert!(
            Instant::now() < deadline,
            "the resize never reached the agent:\n{}",
            terminal.screen()
        );
        terminal.line("stty size");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Ctrl-C goes to the agent's foreground process, not to bot-bottle.
    terminal.line("bash /workspace/trap.sh; echo rc=$?");
    terminal.wait_line("trap-armed", STEP);
    terminal.keys(&["C-c"]);
    terminal.wait_for("the agent's INT trap", STEP, |screen| {
        screen
            .lines()
            .any(|line| line.trim_end().ends_with("got-int"))
    });
    terminal.wait_line("rc=3", STEP);

    // The agent's exit code is bot-bottle's, and bot-bottle exits without waiting for
    // another key.
    terminal.line("exit 7");
    assert_eq!(terminal.exit_code(STEP), 7, "{}", terminal.screen());
    assert_cooked(&terminal.settings_after_exit());

    let slugs = project.state_dirs();
    assert_eq!(slugs.len(), 1, "{slugs:?}");
    let metadata: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            project
                .home
                .path()
                .join(format!("state/{}/metadata.json", slugs[0])),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(metadata["label"], "attach-run");
    assert_eq!(metadata["color"], "cyan");
    assert_eq!(metadata["status"], "stopped");
    assert_eq!(metadata["exit_code"], 7);
}

#[test]
fn interactive_escape_in_a_picker_cancels_with_the_terminal_restored() {
    let project = picker_project();
    let terminal = Terminal::start(&project, &["start"]);
    terminal.wait_text("? Agent:", STEP);
    terminal.keys(&["Escape"]);
    assert_eq!(terminal.exit_code(STEP), 75, "{}", terminal.screen());
    assert!(project.state_dirs().is_empty());
    assert_cooked(&terminal.settings_after_exit());
}

#[test]
fn docker_interactive_resume_continues_the_bottle() {
    let project = picker_project();
    let first = Terminal::start(
        &project,
        &[
            "start", "sheller", "--bottle", "plain", "--label", "again", "--color", "red",
        ],
    );
    first.wait_text("Launch this bottle? (y/N)", STEP);
    first.line("y");
    first.wait_line("agent-prompt$", LAUNCH);
    // Outside the workspace: only the bottle's own filesystem keeps it.
    first.line("echo kept-$((2+3)) > ~/note.txt; exit 0");
    assert_eq!(first.exit_code(STEP), 0, "{}", first.screen());
    let slugs = project.state_dirs();
    assert_eq!(slugs.len(), 1, "{slugs:?}");

    let second = Terminal::start(&project, &["resume", &slugs[0]]);
    second.wait_line("agent-prompt$", LAUNCH);
    second.line("cat ~/note.txt; exit 3");
    second.wait_line("kept-5", STEP);
    assert_eq!(second.exit_code(STEP), 3, "{}", second.screen());
    assert_cooked(&second.settings_after_exit());
}
