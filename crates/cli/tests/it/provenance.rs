//! `bot-bottle provenance verify` with the egress head check, and an independent check
//! of the envelope by Python securesystemslib's DSSE verifier. No Docker: the envelope
//! and the log are written here, where a session would leave them.

use std::path::{Path, PathBuf};

use bot_bottle_core::provenance::{
    DlpResult, EgressSummary, LogHead, ResourceDescriptor, RunRecord, Trigger, sha256_digest,
    sign_run, write_envelope_file,
};
use bot_bottle_egress::audit::{AuditDecision, AuditLog, EventDraft, EventKind};

use crate::common::{Project, stderr, stdout};

const SLUG: &str = "worker-pr0v1";

fn record(head: Option<LogHead>) -> RunRecord {
    RunRecord {
        slug: SLUG.to_owned(),
        agent: "worker".to_owned(),
        provider: "command".to_owned(),
        model: None,
        bottles: vec!["dev".to_owned()],
        backend: "docker".to_owned(),
        policy_digest: sha256_digest(b"policy"),
        prompt_digest: sha256_digest(b"do the thing"),
        issue: None,
        trigger: Trigger {
            kind: "cli".to_owned(),
            delivery_id: None,
            comment_id: None,
        },
        base_commit: None,
        images: Vec::new(),
        started_at: "2026-12-04T10:00:00Z".to_owned(),
        finished_at: "2026-12-04T10:01:00Z".to_owned(),
        exit_code: Some(0),
        watchdog_fired: false,
        egress_audit_digest: None,
        egress_audit_head: head.clone(),
        egress_summary: EgressSummary::default(),
        dlp: DlpResult::Clean,
        forge_ops_digest: None,
        forge_ops_head: None,
        cli: None,
        manifests_digest: None,
        outcome: Some("exited".to_owned()),
        approvals: 0,
        subjects: head
            .map(|h| {
                vec![ResourceDescriptor::new(
                    "egress-audit-head",
                    "sha256",
                    h.hash,
                )]
            })
            .unwrap_or_default(),
        builder_version: "test".to_owned(),
    }
}

/// A log of four events at `path`; returns its head.
fn write_log(path: &Path) -> LogHead {
    let log = AuditLog::open(path).unwrap();
    for i in 0..4 {
        let mut draft = EventDraft::new(EventKind::Request, AuditDecision::Allow, "allowed");
        draft.host = Some(format!("h{i}.example.test"));
        log.append(draft).unwrap();
    }
    let head = log.head();
    LogHead {
        seq: head.seq,
        hash: head.hash,
    }
}

/// The project, the live log's path, and a signed envelope recording its head.
fn signed_session() -> (Project, PathBuf, PathBuf) {
    let project = Project::new();
    let log = project
        .home
        .path()
        .join(format!("state/{SLUG}/egress.jsonl"));
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    let head = write_log(&log);
    let envelope = sign_run(project.home.path(), &record(Some(head))).unwrap();
    let file = project
        .home
        .path()
        .join(format!("state/{SLUG}/provenance.json"));
    write_envelope_file(&file, &envelope).unwrap();
    (project, log, file)
}

fn public_key(project: &Project) -> String {
    project
        .home
        .path()
        .join("keys/provenance.ed25519.pub")
        .display()
        .to_string()
}

fn verify(project: &Project, file: &Path, json: bool) -> std::process::Output {
    let file = file.display().to_string();
    let key = public_key(project);
    let mut args = vec!["provenance", "verify", &file, "--key", &key];
    if json {
        args.push("--json");
    }
    project.run(&args)
}

#[test]
fn provenance_verify_checks_the_recorded_head_against_the_live_log() {
    let (project, _log, file) = signed_session();
    let out = verify(&project, &file, false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ok: signature valid"), "{text}");
    assert!(text.contains("reaches the recorded head (seq 4)"), "{text}");

    let out = verify(&project, &file, true);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["egress_head"]["status"], "reached");
    assert_eq!(report["egress_head"]["seq"], 4);
}

#[test]
fn provenance_verify_fails_when_the_log_was_tampered_with() {
    let (project, log, file) = signed_session();
    let text = std::fs::read_to_string(&log).unwrap();
    // Another host in line 2: its hash no longer matches, nor do the links after it.
    let tampered = text.replacen("h1.example.test", "hX.example.test", 1);
    assert_ne!(text, tampered);
    std::fs::write(&log, tampered).unwrap();

    let out = verify(&project, &file, false);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("does not reach the head this provenance records"),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
    assert!(
        stdout(&out).contains("FAILED: egress log"),
        "{}",
        stdout(&out)
    );

    let out = verify(&project, &file, true);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["egress_head"]["status"], "failed");
}

#[test]
fn provenance_verify_fails_when_the_log_was_cut_short() {
    let (project, log, file) = signed_session();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // The chain of the first three lines still verifies: only the head shows the cut.
    std::fs::write(&log, format!("{}\n", lines[..3].join("\n"))).unwrap();
    let out = verify(&project, &file, true);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["egress_head"]["status"], "failed");
    let problem = report["egress_head"]["problem"].as_str().unwrap();
    assert!(problem.contains("ends at seq 3"), "{problem}");
}

#[test]
fn provenance_verify_finds_the_archived_log_after_destroy_and_says_when_there_is_none() {
    let (project, log, file) = signed_session();
    let kept = project.home.path().join("provenance-copy.json");
    std::fs::copy(&file, &kept).unwrap();
    // Where `destroy` archives the log.
    let archive = project.home.path().join(format!("audit/{SLUG}.jsonl"));
    std::fs::create_dir_all(archive.parent().unwrap()).unwrap();
    std::fs::rename(&log, &archive).unwrap();
    std::fs::remove_dir_all(project.home.path().join("state")).unwrap();

    let out = verify(&project, &kept, true);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["egress_head"]["status"], "reached");
    assert_eq!(report["egress_head"]["log"], archive.display().to_string());

    std::fs::remove_file(&archive).unwrap();
    let out = verify(&project, &kept, true);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["egress_head"]["status"], "log-not-found");
}

/// The verifier the tests use: the venv `scripts/bootstrap.sh` makes.
fn python() -> PathBuf {
    let dir = std::env::var_os("BOT_BOTTLE_PYENV")
        .map_or_else(|| PathBuf::from("/var/tmp/bot-bottle-pyenv"), PathBuf::from);
    let python = dir.join("bin/python");
    assert!(
        python.is_file(),
        "`{}` is missing: run scripts/bootstrap.sh (it installs Python securesystemslib for this test)",
        python.display()
    );
    python
}

/// Verifies with securesystemslib only: the key id is computed here, from the PEM, as
/// DSSE signers name ed25519 keys (hex SHA-256 of the raw key), not taken from Rust.
const SSLIB_VERIFY: &str = r#"
import base64, hashlib, json, sys
from cryptography.hazmat.primitives import serialization
from securesystemslib.dsse import Envelope
from securesystemslib.signer import SSlibKey

envelope_path, key_path = sys.argv[1], sys.argv[2]
public = serialization.load_pem_public_key(open(key_path, "rb").read())
raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
key = SSlibKey.from_crypto(public, keyid=hashlib.sha256(raw).hexdigest())
envelope = Envelope.from_dict(json.load(open(envelope_path)))
try:
    envelope.verify([key], 1)
except Exception as err:
    print(f"REJECTED: {type(err).__name__}: {err}")
    sys.exit(3)
statement = json.loads(envelope.payload)
assert envelope.payload_type == "application/vnd.in-toto+json", envelope.payload_type
assert statement["_type"] == "https://in-toto.io/Statement/v1", statement["_type"]
assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
print("VERIFIED", statement["predicate"]["runDetails"]["metadata"]["invocationId"])
"#;

pub(crate) fn sslib_verify(envelope: &Path, key: &str) -> std::process::Output {
    let out = std::process::Command::new(python())
        .args(["-c", SSLIB_VERIFY])
        .arg(envelope)
        .arg(key)
        .output()
        .unwrap();
    eprintln!(
        "securesystemslib: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn provenance_envelope_verifies_with_python_securesystemslib() {
    let (project, _log, file) = signed_session();
    let key = public_key(&project);
    let out = sslib_verify(&file, &key);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out).trim(), format!("VERIFIED {SLUG}"));

    // The same verifier rejects a payload changed after signing.
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let payload = engine.decode(value["payload"].as_str().unwrap()).unwrap();
    let forged = String::from_utf8(payload)
        .unwrap()
        .replace("\"exitCode\":0", "\"exitCode\":1");
    value["payload"] = engine.encode(forged).into();
    let tampered = project.home.path().join("tampered.json");
    std::fs::write(&tampered, value.to_string()).unwrap();
    let out = sslib_verify(&tampered, &key);
    assert_eq!(out.status.code(), Some(3));
    assert!(stdout(&out).contains("REJECTED"), "{}", stdout(&out));
}
