//! Integration tests of the testkit fixtures, over real loopback sockets.
#![allow(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns panic to report a failure, like the tests do"
)]

mod client;
mod fake_gitea;
mod fixture_anthropic;
mod fixture_bin;
mod fixture_echo;
mod fixture_openai;
