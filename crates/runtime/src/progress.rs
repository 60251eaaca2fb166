//! Progress on stderr for long steps (image builds, imports): never a silent minute.

use std::io::Write;
use std::time::Instant;

/// Writes progress lines to stderr, unless quiet.
#[derive(Debug, Clone)]
pub struct Progress {
    quiet: bool,
    started: Instant,
}

impl Progress {
    #[must_use]
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            started: Instant::now(),
        }
    }

    /// A step: `bot-bottle: [12.3s] building image …`.
    pub fn step(&self, message: &str) {
        if !self.quiet {
            let elapsed = self.started.elapsed().as_secs_f64();
            let _ = writeln!(std::io::stderr(), "bot-bottle: [{elapsed:5.1}s] {message}");
        }
    }

    /// One line of a build log, indented under the current step.
    pub fn build_line(&self, text: &str) {
        if self.quiet {
            return;
        }
        let mut stderr = std::io::stderr();
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let _ = writeln!(stderr, "    {line}");
        }
    }
}
