//! A full disk under the audit log: the gateway fails closed and says why, and the log
//! keeps only whole lines, so it verifies and a later session continues it.
//!
//! The disk is a real one: a 1 MiB tmpfs mounted for the test (the suite runs as root,
//! as `scripts/test.sh` does; without root this test fails and says so).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bot_bottle_egress::Listen;
use bot_bottle_egress::audit::{self, AuditLog};

use crate::support::{curl, one_allowed_request_on, origin, policy, start_at};

/// A tmpfs of `size`, unmounted on drop.
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

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the disk refuses; returns its path.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        loop {
            if let Err(err) = file.write_all(&block) {
                assert_eq!(err.kind(), std::io::ErrorKind::StorageFull, "{err}");
                break;
            }
        }
        let _ = file.flush();
        filler
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
async fn a_full_disk_fails_the_gateway_closed_and_loudly_and_keeps_whole_lines() {
    let origin = origin().await;
    let disk = SmallDisk::mount("1m");
    let audit_path = disk.path().join("state/test/egress.jsonl");
    let rules = policy("rules:\n  - host: api.test\n");
    let handle = start_at(
        Listen::Tcp("127.0.0.1:0".parse().expect("addr")),
        rules.clone(),
        &audit_path,
        &[("api.test", origin)],
    )
    .await;
    let proxy = format!("http://{}", handle.tcp_addr().expect("tcp"));
    assert_eq!(curl(&proxy, &["http://api.test/before"]).await.status, 200);

    let filler = disk.fill();
    // The log's last page may still hold a few lines; then a write fails, and from that
    // moment the gateway lets nothing out (an allowed request's line is written when it
    // ends, so the one whose line failed was already answered; none after it is).
    let mut refused = None;
    for n in 0..500 {
        let result = curl(&proxy, &[&format!("http://api.test/while-full/{n}")]).await;
        if result.status != 200 {
            refused = Some(result);
            break;
        }
    }
    let after = refused.expect("the disk is full, so some write must fail");
    assert_eq!(after.status, 503, "{}", after.body);
    assert_eq!(
        after.header("x-bot-bottle-error").as_deref(),
        Some("audit-unavailable")
    );
    let blocked = curl(&proxy, &["http://blocked.test/after"]).await;
    assert_eq!(blocked.status, 503, "{}", blocked.body);
    let why = tokio::time::timeout(Duration::from_secs(5), handle.failed())
        .await
        .expect("the failure is reported at once");
    assert!(why.contains("No space left on device"), "{why}");
    assert!(why.contains("hint: free space"), "{why}");
    assert!(why.contains(&disk.path().display().to_string()), "{why}");

    // Space again: the log holds only whole lines, verifies, and continues.
    std::fs::remove_file(&filler).expect("free space");
    handle.shutdown().await;
    let text = std::fs::read_to_string(&audit_path).expect("log");
    assert!(text.ends_with('\n'), "a partial line was left behind");
    let report = audit::verify(&audit_path).expect("the log still verifies");
    assert!(text.contains("/before"), "{text}");
    assert!(
        !text.contains("/after"),
        "an unwritable event cannot be in the log"
    );
    let log = AuditLog::open(&audit_path).expect("a later session continues the chain");
    drop(log);
    one_allowed_request_on(&audit_path, rules, origin, "http://api.test/resumed").await;
    let resumed = audit::verify(&audit_path).expect("verifies after resuming");
    assert!(resumed.lines > report.lines, "{resumed:?} {report:?}");
}
