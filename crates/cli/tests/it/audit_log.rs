//! `bot-bottle audit` over a log with a line it cannot read: the line is named by number
//! and byte offset, the rest is still shown and checked, and the exit code says so. No
//! Docker: the log is written here, where a destroyed bottle's log is archived.

use bot_bottle_egress::audit::{AuditDecision, AuditLog, EventDraft, EventKind};

use crate::common::{Project, stderr, stdout};

const SLUG: &str = "worker-b4dl1";

/// A log of six events with 2 MiB of garbage planted after the second line and the
/// fifth event removed; returns the project and the garbage line's byte offset.
fn damaged_log() -> (Project, u64) {
    let project = Project::new();
    let path = project.home.path().join(format!("audit/{SLUG}.jsonl"));
    let log = AuditLog::open(&path).unwrap();
    for i in 0..6 {
        let mut draft = EventDraft::new(EventKind::Request, AuditDecision::Allow, "allowed");
        draft.host = Some(format!("h{i}.example"));
        log.append(draft).unwrap();
    }
    drop(log);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let offset = (lines[0].len() + lines[1].len() + 2) as u64;
    let garbage = "\"".repeat(2 << 20);
    let damaged = format!(
        "{}\n{}\n{garbage}\n{}\n{}\n{}\n",
        lines[0], lines[1], lines[2], lines[3], lines[5]
    );
    std::fs::write(&path, damaged).unwrap();
    (project, offset)
}

#[test]
fn audit_verify_names_every_bad_line_and_checks_the_rest() {
    let (project, offset) = damaged_log();
    let out = project.run(&["audit", "verify", SLUG]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("line 3 (byte {offset}):")), "{err}");
    assert!(err.contains("over the reader's limit"), "{err}");
    // Line 6 is seq 6, whose predecessor (seq 5) was removed.
    assert!(err.contains("line 6 (byte "), "{err}");
    assert!(
        err.contains("does not verify: 2 problems in 6 lines"),
        "{err}"
    );
    assert!(
        err.contains("the chain verifies in: lines 1-5 (seq 1-4), lines 6-6 (seq 6-6)"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");

    let out = project.run(&["audit", "verify", SLUG, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["problems"][0]["line"], 3);
    assert_eq!(report["problems"][0]["offset"], offset);
    assert_eq!(report["problems"][1]["line"], 6);
    assert_eq!(report["segments"].as_array().unwrap().len(), 2, "{report}");
    assert_eq!(
        report["events"], 5,
        "line 6 is intact, only its link is not"
    );
}

#[test]
fn audit_shows_every_readable_line_and_names_the_bad_one() {
    let (project, offset) = damaged_log();
    let out = project.run(&["audit", SLUG]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let shown = stdout(&out);
    for host in ["h0", "h1", "h2", "h3", "h5"] {
        assert!(shown.contains(&format!("{host}.example")), "{shown}");
    }
    let err = stderr(&out);
    assert!(
        err.contains(&format!("warning: skipped line 3 (byte {offset})")),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");

    let out = project.run(&["audit", SLUG, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[2]["bad_line"], 3);
    assert_eq!(rows[2]["offset"], offset);
    assert_eq!(rows[5]["seq"], 6);
}

#[test]
fn audit_export_refuses_a_damaged_log_and_leaves_no_file() {
    let (project, offset) = damaged_log();
    let target = project.path().join("export.jsonl");
    let out = project.run(&["audit", "export", SLUG, "-o", target.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("line 3 (byte {offset}):")), "{err}");
    assert!(!target.exists());
    assert!(!project.path().join("export.jsonl.partial").exists());
}
