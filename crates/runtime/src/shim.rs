//! The in-bottle shim: PID 1 of every bottle.
//!
//! It is the same static `bot-bottle` binary, bind-mounted read-only, started as
//! `bot-bottle shim --forward 3128=/run/bot-bottle/egress.sock -- <agent argv>`. It
//! - forwards each `127.0.0.1:<port>` inside the bottle to a host Unix socket (the
//!   bottle has no network interface but loopback, so this is its only way out);
//! - runs the agent as its child and exits with the agent's exit code;
//! - reaps every zombie (as PID 1 it inherits orphans);
//! - forwards SIGTERM and SIGHUP to the agent (PID 1 has no default handlers). SIGINT
//!   from a terminal reaches the agent's process group directly, so it is not forwarded.

use std::path::PathBuf;
use std::process::Command;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::net::{TcpListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};

/// One loopback port inside the bottle forwarded to a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub port: u16,
    pub socket: PathBuf,
}

impl std::str::FromStr for Forward {
    type Err = String;

    /// Parses `PORT=/path/to.sock`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (port, socket) = text
            .split_once('=')
            .ok_or_else(|| format!("expected PORT=/path/to.sock, got `{text}`"))?;
        let port = port
            .parse()
            .map_err(|_| format!("`{port}` is not a port number"))?;
        Ok(Self {
            port,
            socket: PathBuf::from(socket),
        })
    }
}

async fn serve_forward(listener: TcpListener, socket: PathBuf) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        let socket = socket.clone();
        tokio::spawn(async move {
            // When the host side is gone the connection simply fails: fail closed.
            match UnixStream::connect(&socket).await {
                Ok(mut outbound) => {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                Err(err) => {
                    eprintln!("bot-bottle shim: {} unreachable: {err}", socket.display());
                }
            }
        });
    }
}

/// A directory whose tree is copied into another before the agent starts:
/// `SOURCE:TARGET`. The host writes the agent's instructions and config into `SOURCE`
/// (a read-only view for the agent); copying them into the agent-owned home, instead of
/// uploading them into the container, keeps a launch to the engine calls `docker run`
/// makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provision {
    pub source: PathBuf,
    pub target: PathBuf,
}

impl std::str::FromStr for Provision {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (source, target) = text
            .split_once(':')
            .ok_or_else(|| format!("expected SOURCE:TARGET, got `{text}`"))?;
        Ok(Self {
            source: PathBuf::from(source),
            target: PathBuf::from(target),
        })
    }
}

/// Copies every file under `source` to the same relative path under `target`,
/// creating directories; existing files are replaced.
pub fn provision(spec: &Provision) -> std::io::Result<usize> {
    let mut copied = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        let dir = spec.source.join(&relative);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err)
                if err.kind() == std::io::ErrorKind::NotFound
                    && relative.as_os_str().is_empty() =>
            {
                return Ok(0);
            }
            Err(err) => return Err(err),
        };
        std::fs::create_dir_all(spec.target.join(&relative))?;
        for entry in entries {
            let entry = entry?;
            let path = relative.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let destination = spec.target.join(&path);
                // Replace rather than write through: a symlink the agent left there must
                // not redirect the write.
                let _ = std::fs::remove_file(&destination);
                std::fs::copy(entry.path(), &destination)?;
                copied += 1;
            }
        }
    }
    Ok(copied)
}

/// Runs the shim and returns the agent's exit code (128 + signal when it was killed).
pub fn run_with(forwards: &[Forward], provisions: &[Provision], argv: &[String]) -> i32 {
    for spec in provisions {
        if let Err(err) = provision(spec) {
            eprintln!(
                "bot-bottle shim: cannot copy {} into {}: {err}",
                spec.source.display(),
                spec.target.display()
            );
            return 125;
        }
    }
    run(forwards, argv)
}

/// Runs the shim and returns the agent's exit code (128 + signal when it was killed).
pub fn run(forwards: &[Forward], argv: &[String]) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bot-bottle shim: cannot start: {err}");
            return 125;
        }
    };
    runtime.block_on(run_async(forwards, argv))
}

async fn run_async(forwards: &[Forward], argv: &[String]) -> i32 {
    let Some((program, args)) = argv.split_first() else {
        eprintln!("bot-bottle shim: no command to run");
        return 125;
    };
    for forward in forwards {
        match TcpListener::bind(("127.0.0.1", forward.port)).await {
            Ok(listener) => {
                tokio::spawn(serve_forward(listener, forward.socket.clone()));
            }
            Err(err) => {
                eprintln!(
                    "bot-bottle shim: cannot listen on 127.0.0.1:{}: {err}",
                    forward.port
                );
                return 125;
            }
        }
    }
    // Listen for SIGCHLD before the child exists, so its exit cannot be missed.
    let (Ok(mut children), Ok(mut terms), Ok(mut hangups)) = (
        signal(SignalKind::child()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        eprintln!("bot-bottle shim: cannot install signal handlers");
        return 125;
    };
    let child = match Command::new(program).args(args).spawn() {
        Ok(child) => child,
        Err(err) => {
            eprintln!("bot-bottle shim: cannot run `{program}`: {err}");
            return if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    let agent = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // The std `Child` is dropped unwaited on purpose: every child is reaped below.
    drop(child);
    loop {
        if let Some(code) = reap(agent) {
            return code;
        }
        tokio::select! {
            _ = children.recv() => {}
            _ = terms.recv() => { let _ = kill(agent, Signal::SIGTERM); }
            _ = hangups.recv() => { let _ = kill(agent, Signal::SIGHUP); }
        }
    }
}

/// Reaps every exited child; returns the agent's exit code once it has exited.
fn reap(agent: Pid) -> Option<i32> {
    let mut agent_code = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => agent_code = Some(code),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == agent => {
                agent_code = Some(128 + signal as i32);
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return agent_code,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forward_spec() {
        let forward: Forward = "3128=/run/bot-bottle/egress.sock".parse().unwrap();
        assert_eq!(
            forward,
            Forward {
                port: 3128,
                socket: PathBuf::from("/run/bot-bottle/egress.sock")
            }
        );
        assert!("3128".parse::<Forward>().is_err());
        assert!("x=/a".parse::<Forward>().is_err());
    }

    #[test]
    fn passes_exit_code_through_and_forwards_a_port() {
        let _children = crate::CHILDREN.blocking_lock();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).unwrap();
            conn.write_all(b"pong").unwrap();
            buf
        });
        // A free port, so parallel tests do not collide.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; printf ping >&3; read -n 4 reply <&3; [ \"$reply\" = pong ] && exit 7"
        );
        let code = run(
            &[Forward { port, socket }],
            &["bash".to_owned(), "-c".to_owned(), script],
        );
        assert_eq!(code, 7);
        assert_eq!(&server.join().unwrap(), b"ping");
    }

    #[test]
    fn provision_copies_the_tree_and_replaces_files() {
        let source = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(source.path().join(".claude")).unwrap();
        std::fs::write(source.path().join(".claude/CLAUDE.md"), "new").unwrap();
        std::fs::write(source.path().join("top.txt"), "top").unwrap();
        std::fs::create_dir_all(target.path().join(".claude")).unwrap();
        std::fs::write(target.path().join(".claude/CLAUDE.md"), "old").unwrap();
        let spec = Provision {
            source: source.path().to_owned(),
            target: target.path().to_owned(),
        };
        assert_eq!(provision(&spec).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(target.path().join(".claude/CLAUDE.md")).unwrap(),
            "new"
        );
        assert_eq!(
            std::fs::read_to_string(target.path().join("top.txt")).unwrap(),
            "top"
        );
        let missing = Provision {
            source: source.path().join("nope"),
            target: target.path().to_owned(),
        };
        assert_eq!(provision(&missing).unwrap(), 0);
        assert_eq!(
            "/a:/b".parse::<Provision>().unwrap(),
            Provision {
                source: "/a".into(),
                target: "/b".into()
            }
        );
    }

    #[test]
    fn missing_program_is_127() {
        let _children = crate::CHILDREN.blocking_lock();
        assert_eq!(run(&[], &["/nonexistent/program".to_owned()]), 127);
    }
}
