//! A full disk under the op log: the call fails, `failed()` resolves, every later call
//! is refused without reaching the forge, and the log keeps only whole lines.
//!
//! The disk is a real one: a 1 MiB tmpfs mounted for the test (the suite runs as root,
//! as `scripts/test.sh` does; without root this test fails and says so).

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bot_bottle_sidecars::{FORGE_OPS_LOG, FORGE_SOCKET, ForgeSidecar, QUEUE_DIR, client};
use serde_json::json;

use crate::support::{FakeForge, ISSUE, context, forward_to};

struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill it, which takes root (scripts/test.sh runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_sidecar_closed() {
    let disk = SmallDisk::mount("1m");
    let state = disk.dir.path().join("state/b");
    let socket = state.join("run").join(FORGE_SOCKET);
    let forge = FakeForge::new();
    let sidecar = ForgeSidecar::start(
        context(Arc::new(forge.clone()), Vec::new()),
        &socket,
        &state.join(FORGE_OPS_LOG),
        &state.join(QUEUE_DIR),
    )
    .await
    .expect("start");
    let (url, forward) = forward_to(&socket).await;
    let read = client::call_tool(&url, "read_issue", json!({"number": ISSUE}))
        .await
        .expect("read");
    assert!(!read.is_error);

    let filler = disk.dir.path().join("filler");
    {
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
    }

    // The log's last page may still have room: call until a line does not fit.
    let mut written = 1;
    let failed = loop {
        let output = client::call_tool(&url, "read_issue", json!({"number": ISSUE}))
            .await
            .expect("answers");
        if output.is_error {
            break output;
        }
        written += 1;
        assert!(written < 100, "the log never filled up");
    };
    assert!(failed.text.contains("cannot be written"), "{}", failed.text);
    let reason = tokio::time::timeout(Duration::from_secs(5), sidecar.failed())
        .await
        .expect("failed() resolves");
    assert!(reason.contains("forge-ops.jsonl"), "{reason}");

    let calls_before = forge.calls().len();
    let refused = client::call_tool(&url, "post_comment", json!({"number": ISSUE, "body": "x"}))
        .await
        .expect("answers");
    assert!(refused.is_error);
    assert!(refused.text.contains("has stopped"), "{}", refused.text);
    assert_eq!(
        forge.calls().len(),
        calls_before,
        "nothing reaches the forge"
    );

    std::fs::remove_file(&filler).expect("free space");
    forward.abort();
    sidecar.shutdown().await;
    let report =
        bot_bottle_egress::audit::verify(&state.join(FORGE_OPS_LOG)).expect("whole lines only");
    assert_eq!(report.events, written);
}
