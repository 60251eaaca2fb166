//! Integration tests for the forge sidecar. Every server is on loopback or a Unix
//! socket the test created; the forge is an in-memory fake (`support::FakeForge`) or
//! the fake Gitea from the testkit.

mod disk_full;
mod gitea;
mod happy;
mod hostile;
mod supervise;
mod support;
