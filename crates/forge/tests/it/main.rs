//! Integration tests of `bot-bottle-forge`. Every server here is on loopback.

mod contract;
mod gitea;
mod scoped;
mod store;
mod webhooks;

use std::path::PathBuf;

/// `../shared/testdata/` beside the repository, read at test time (never copied in).
pub fn shared_testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/testdata")
        .join(name)
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read fixture {}: {e}", path.display()))
}
