//! A bottle cannot make its audit log unreadable or fill the disk with it: every line
//! stays under the writer's bound whatever the request carries, block events are rate
//! limited with counts that add up, and a reader goes on past a bad line.

use std::io::BufReader;
use std::time::{Duration, Instant};

use bot_bottle_egress::audit::{self, AuditError, Entry, MAX_EVENT_LINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{audit_lines, curl, gateway, one_allowed_request_on, origin, policy};

/// Sends `request` on a new connection to the gateway and returns the status line.
async fn raw_request(gateway: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(gateway)
        .await
        .expect("connect to the gateway");
    stream.write_all(request).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response))
        .await
        .expect("the gateway answers")
        .expect("read");
    let response = String::from_utf8_lossy(&response);
    response.lines().next().unwrap_or_default().to_owned()
}

/// Every line of the log, checked against the writer's bound.
fn assert_lines_bounded(path: &std::path::Path) {
    let raw = std::fs::read(path).expect("read the log");
    for (i, line) in raw.split_inclusive(|&b| b == b'\n').enumerate() {
        assert!(
            line.len() <= MAX_EVENT_LINE,
            "line {} is {} bytes, over {MAX_EVENT_LINE}",
            i + 1,
            line.len()
        );
    }
}

#[tokio::test]
async fn a_huge_host_header_of_quotes_leaves_a_short_line_that_verifies() {
    let origin = origin().await;
    let gw = gateway(
        policy("rules:\n  - host: api.test\n"),
        &[("api.test", origin)],
    )
    .await;
    let addr = gw.handle.tcp_addr().expect("tcp");
    // Each `"` doubles in the Debug quoting of the detail and again in JSON: ~400 KB of
    // them once made a 1.6 MB line that no reader would read.
    let host = "\"".repeat(400_000);
    let request =
        format!("GET http://api.test/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let status = raw_request(addr, request.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    let audit_path = gw.audit_path.clone();
    gw.handle.shutdown().await;

    assert_lines_bounded(&audit_path);
    let report = audit::verify(&audit_path).expect("the log verifies");
    assert_eq!(report.events, report.lines);
    let events = audit::read(&audit_path).expect("reads");
    let mismatch = events
        .iter()
        .find(|e| e.reason == "host-mismatch")
        .expect("the block is audited");
    let detail = mismatch.detail.as_deref().expect("detail");
    assert!(detail.len() <= audit::MAX_DETAIL, "{}", detail.len());
    // Cut twice: by the gateway before formatting, and by the log's field bound.
    assert!(detail.contains('…'), "truncation is marked: {detail:.200}");
    assert!(detail.starts_with("Host header \"\\\"\\\""), "{detail:.40}");
}

/// `n` distinct AWS-key-shaped values (`AKIA` and 16 of `A-Z2-7`, random, never the
/// documentation's `…EXAMPLE`), one a line, made here so no key-shaped string is in the
/// source.
fn fake_access_keys(n: usize) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    let mut out = Vec::with_capacity(n * 21);
    for _ in 0..n {
        out.extend_from_slice(b"AKI");
        out.push(b'A');
        for _ in 0..16 {
            // xorshift64*: plenty of entropy for a test and no dependency.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
            out.push(ALPHABET[(r >> 59) as usize]);
        }
        out.push(b'\n');
    }
    out
}

#[tokio::test]
async fn eight_mib_of_distinct_keys_leave_a_capped_findings_list() {
    let origin = origin().await;
    let gw = gateway(
        policy("rules:\n  - host: api.test\n"),
        &[("api.test", origin)],
    )
    .await;
    // Just under the 8 MiB scan cap, so every key is found.
    let keys = (bot_bottle_egress::dlp::DEFAULT_MAX_DECODED - 64) / 21;
    let body = fake_access_keys(keys);
    let dir = tempfile::tempdir().expect("tempdir");
    let body_path = dir.path().join("body");
    std::fs::write(&body_path, &body).expect("write body");
    let result = curl(
        &gw.proxy_url(),
        &[
            "--data-binary",
            &format!("@{}", body_path.display()),
            "http://api.test/upload",
        ],
    )
    .await;
    assert_eq!(result.status, 403, "{}", result.body);
    let audit_path = gw.audit_path.clone();
    gw.handle.shutdown().await;

    assert_lines_bounded(&audit_path);
    audit::verify(&audit_path).expect("the log verifies");
    let events = audit::read(&audit_path).expect("reads");
    let blocked = events
        .iter()
        .find(|e| e.reason == "dlp-blocked")
        .expect("the block is audited");
    assert_eq!(blocked.dlp.len(), audit::MAX_DLP_RECORDS);
    // Listed or counted: (nearly) every key is a finding (a few random ones fall under
    // the rule's entropy floor).
    let found = blocked.dlp.len() as u64 + blocked.dlp_more;
    assert!(
        found <= keys as u64 && found >= keys as u64 * 99 / 100,
        "{found} of {keys} keys"
    );
    let log = std::fs::read_to_string(&audit_path).expect("read");
    let first_key = std::str::from_utf8(&body[..20]).expect("ascii");
    assert!(!log.contains(first_key), "no key reaches the log");
}

#[tokio::test]
async fn a_loop_of_blocked_requests_writes_a_bounded_number_of_lines_that_add_up() {
    let gw = gateway(policy("rules:\n  - host: api.test\n"), &[]).await;
    let addr = gw.handle.tcp_addr().expect("tcp");
    let started = Instant::now();
    let sent = 1200u64;
    for i in 0..sent {
        let host = format!("h{}.blocked.test", i % 7);
        let request = format!(
            "GET http://{host}/loop/{i} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        );
        let status = raw_request(addr, request.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    }
    // A quiet second reports what was held back, before any shutdown.
    let waited = Instant::now();
    // (Raw text: the gateway may be writing a line while it is read.)
    while !std::fs::read_to_string(&gw.audit_path)
        .expect("read the log")
        .contains("\"reason\":\"block-events-held-back\"")
    {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no summary after a quiet second"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    let audit_path = gw.audit_path.clone();
    gw.handle.shutdown().await;

    let lines = audit_lines(&audit_path);
    let written = lines
        .iter()
        .filter(|e| e["kind"] == "request" && e["decision"] == "block")
        .count() as u64;
    let summaries: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|e| e["reason"] == "block-events-held-back")
        .collect();
    let held_back: u64 = summaries
        .iter()
        .map(|e| e["held_back"].as_u64().expect("held_back count"))
        .sum();
    assert_eq!(
        written + held_back,
        sent,
        "every block is written or counted"
    );
    let allowed_by_rate = u64::from(audit::BLOCK_BURST)
        + u64::from(audit::BLOCK_PER_SECOND) * (elapsed.as_secs() + 1);
    assert!(
        written <= allowed_by_rate,
        "{written} block lines in {elapsed:?}"
    );
    // One after each quiet second at most (the loop has none unless the machine
    // stalls), plus the one at shutdown.
    assert!(
        summaries.len() as u64 <= elapsed.as_secs() + 2,
        "{} summaries in {elapsed:?}",
        summaries.len()
    );
    for summary in &summaries {
        assert_eq!(summary["kind"], "gateway");
        assert_eq!(summary["decision"], "block");
        let detail = summary["detail"].as_str().expect("detail");
        assert!(detail.contains("not-in-allowlist ×"), "{detail}");
        assert!(detail.contains("blocked.test"), "{detail}");
    }
    audit::verify(&audit_path).expect("the log verifies");
}

#[tokio::test]
async fn a_planted_garbage_line_is_named_and_the_rest_is_read_and_verified() {
    let origin = origin().await;
    let rules = policy("rules:\n  - host: api.test\n");
    let gw = gateway(rules.clone(), &[("api.test", origin)]).await;
    for path in ["/a", "/b", "/c"] {
        let url = format!("http://api.test{path}");
        assert_eq!(curl(&gw.proxy_url(), &[&url]).await.status, 200);
    }
    let audit_path = gw.audit_path.clone();
    let dir = gw._dir;
    gw.handle.shutdown().await;

    // 2 MiB of garbage planted after the second line.
    let original = std::fs::read(&audit_path).expect("read");
    let second_end = original
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(1)
        .map(|(i, _)| i + 1)
        .expect("two lines");
    let mut planted = original[..second_end].to_vec();
    planted.extend(std::iter::repeat_n(b'{', 2 << 20));
    planted.push(b'\n');
    planted.extend_from_slice(&original[second_end..]);
    std::fs::write(&audit_path, &planted).expect("write");

    // The gateway continues the chain after the planted line.
    one_allowed_request_on(&audit_path, rules, origin, "http://api.test/d").await;

    let report = audit::check(&audit_path, &[]).expect("reads");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].line, 3);
    assert_eq!(report.problems[0].offset, second_end as u64);
    assert_eq!(report.events, report.lines - 1, "every other line verifies");
    assert_eq!(report.segments.len(), 1, "the chain links around it");
    match audit::verify(&audit_path) {
        Err(AuditError::Broken {
            line: 3, problem, ..
        }) => {
            assert!(problem.contains("over the reader's limit"), "{problem}");
        }
        other => panic!("the planted line is not named: {other:?}"),
    }

    let file = std::fs::File::open(&audit_path).expect("open");
    let entries: Vec<Entry> = audit::read_entries(BufReader::new(file))
        .collect::<Result<_, _>>()
        .expect("reads past it");
    let paths: Vec<String> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Event { event, .. } => event.path.clone(),
            Entry::Bad(_) => None,
        })
        .collect();
    assert_eq!(paths, vec!["/a", "/b", "/c", "/d"]);
    assert_eq!(
        entries
            .iter()
            .filter(|e| matches!(e, Entry::Bad(bad) if bad.line == 3))
            .count(),
        1
    );
    let mut exported = Vec::new();
    let err = audit::export_jsonl(
        BufReader::new(std::fs::File::open(&audit_path).expect("open")),
        &mut exported,
        &audit_path,
    )
    .expect_err("a broken log is not exported");
    assert!(matches!(err, AuditError::Broken { line: 3, .. }), "{err}");
    drop(dir);
}

/// A flood of plain denials must not use up the lines a leak attempt's evidence needs:
/// the DLP block right after it is written in full, with its finding.
#[tokio::test]
async fn a_flood_of_denials_does_not_hide_a_dlp_block() {
    let origin = origin().await;
    let gw = gateway(
        policy("rules:\n  - host: api.test\n"),
        &[("api.test", origin)],
    )
    .await;
    let addr = gw.handle.tcp_addr().expect("tcp");
    for i in 0..60 {
        let request = format!(
            "GET http://denied.test/flood/{i} HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n"
        );
        let status = raw_request(addr, request.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    }
    let key = fake_access_keys(1);
    let key = String::from_utf8(key).expect("ascii");
    let body = format!("aws_access_key_id={}", key.trim());
    let request = format!(
        "POST http://api.test/leak HTTP/1.1\r\nHost: api.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let status = raw_request(addr, request.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    let audit_path = gw.audit_path.clone();
    gw.handle.shutdown().await;
    let lines = audit_lines(&audit_path);
    let leak = lines
        .iter()
        .find(|e| e["path"] == "/leak")
        .unwrap_or_else(|| panic!("the DLP block was held back: {lines:?}"));
    assert_eq!(leak["reason"], "dlp-blocked");
    assert!(
        leak["dlp"].to_string().contains("aws-access-key-id"),
        "{leak}"
    );
    // The flood itself was still limited.
    let denials = lines
        .iter()
        .filter(|e| e["host"] == "denied.test" && e["decision"] == "block")
        .count();
    assert!(denials < 60, "{denials} denial lines");
}
