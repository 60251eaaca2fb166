//! The host terminal while an agent is attached: raw mode, window size, and stdin.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::sync::mpsc;

/// Puts stdin in raw mode until dropped, so keys (Ctrl-C included) reach the agent's
/// PTY instead of this process.
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    #[must_use]
    pub fn enable() -> Self {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok();
        if let Some(saved) = &saved {
            let mut raw = saved.clone();
            termios::cfmakeraw(&mut raw);
            let _ = termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw);
        }
        Self { saved }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

/// (columns, rows) of the terminal on stdout, if it is one.
#[must_use]
pub fn size() -> Option<(u16, u16)> {
    terminal_size::terminal_size().map(|(w, h)| (w.0, h.0))
}

/// This process's stdin, read on a thread of its own until dropped.
///
/// `tokio::io::stdin` cannot be used here: its blocking read cannot be cancelled, so
/// after the agent exits the runtime's shutdown would wait for the user's next key (and
/// swallow it). This thread polls stdin together with a pipe, and dropping the pipe's
/// write end wakes it to stop, leaving stdin unread.
pub struct StdinReader {
    chunks: mpsc::Receiver<Vec<u8>>,
    _stop: OwnedFd,
}

impl StdinReader {
    /// Starts the reader thread.
    ///
    /// # Errors
    /// The pipe or the thread cannot be created.
    pub fn start() -> std::io::Result<Self> {
        let (stop_read, stop_write) = nix::unistd::pipe()?;
        let (sender, chunks) = mpsc::channel(16);
        std::thread::Builder::new()
            .name("bot-bottle-stdin".to_owned())
            .spawn(move || read_until_stopped(&stop_read, &sender))?;
        Ok(Self {
            chunks,
            _stop: stop_write,
        })
    }

    /// The next chunk of input; `None` at end of input.
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        self.chunks.recv().await
    }
}

fn read_until_stopped(stop: &OwnedFd, sender: &mpsc::Sender<Vec<u8>>) {
    let stdin = std::io::stdin();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [
            PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        }
        // Any event on the stop pipe (its write end closed) means stop.
        if fds[1].any().unwrap_or(true) {
            return;
        }
        if !fds[0].any().unwrap_or(false) {
            continue;
        }
        match nix::unistd::read(stdin.as_fd(), &mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if sender.blocking_send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(_) => return,
        }
    }
}
