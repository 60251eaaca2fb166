//! The host terminal while an agent is attached: raw mode and window size.

use std::os::fd::AsFd;

use nix::sys::termios::{self, SetArg, Termios};

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
