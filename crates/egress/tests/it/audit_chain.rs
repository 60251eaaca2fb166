use bot_bottle_egress::audit::{self, AuditError};

use crate::support::{curl, gateway, one_allowed_request_on, origin, policy};

#[tokio::test]
async fn the_chain_survives_a_restart_and_detects_modified_and_deleted_lines() {
    let origin = origin().await;
    let rules = policy("rules:\n  - host: api.test\n");
    let gw = gateway(rules.clone(), &[("api.test", origin)]).await;
    for path in ["/a", "/b"] {
        assert_eq!(
            curl(&gw.proxy_url(), &[&format!("http://api.test{path}")])
                .await
                .status,
            200
        );
    }
    assert_eq!(
        curl(&gw.proxy_url(), &["http://blocked.test/"])
            .await
            .status,
        403
    );
    let audit_path = gw.audit_path.clone();
    let dir = gw._dir;
    gw.handle.shutdown().await;
    let first = audit::verify(&audit_path).expect("verifies");

    // A new gateway on the same file continues the chain.
    one_allowed_request_on(&audit_path, rules, origin, "http://api.test/c").await;
    let report = audit::verify(&audit_path).expect("verifies after restart");
    assert_eq!(report.last_seq, first.last_seq + 3);
    let events = audit::read(&audit_path).expect("reads");
    assert_eq!(events.len() as u64, report.lines);

    let original = std::fs::read_to_string(&audit_path).expect("read");
    let lines: Vec<&str> = original.lines().collect();

    let modified = original.replacen("\"/b\"", "\"/z\"", 1);
    assert_ne!(modified, original);
    std::fs::write(&audit_path, &modified).expect("write");
    let broken_line = lines
        .iter()
        .position(|l| l.contains("\"/b\""))
        .expect("line /b") as u64
        + 1;
    match audit::verify(&audit_path) {
        Err(AuditError::Broken { line, .. }) => assert_eq!(line, broken_line),
        other => panic!("modified line not detected: {other:?}"),
    }

    let mut without = lines.clone();
    without.remove(3);
    std::fs::write(&audit_path, without.join("\n") + "\n").expect("write");
    match audit::verify(&audit_path) {
        Err(AuditError::Broken { line, problem, .. }) => {
            assert_eq!(line, 4);
            assert!(problem.contains("prev_hash"), "{problem}");
        }
        other => panic!("deleted line not detected: {other:?}"),
    }
    drop(dir);
}

/// The tripwire's attempts land in the gateway's chain with their reason, the DNS name as
/// the host, and the count of what the limiter held back.
#[tokio::test]
async fn tripwire_attempts_are_chained_events() {
    use bot_bottle_egress::tripwire::{Attempt, Transport};

    let gw = gateway(policy("rules: []\n"), &[]).await;
    let recorder = gw.handle.attempt_recorder();
    recorder.record(&Attempt {
        transport: Transport::Dns,
        destination: "10.255.255.53".parse().expect("ip"),
        port: Some(53),
        protocol: 17,
        name: Some("leak.example".to_owned()),
        suppressed: 0,
    });
    recorder.record(&Attempt {
        transport: Transport::Tcp,
        destination: "2001:db8::1".parse().expect("ip"),
        port: Some(443),
        protocol: 6,
        name: None,
        suppressed: 4,
    });
    let audit_path = gw.audit_path.clone();
    let _dir = gw._dir;
    gw.handle.shutdown().await;
    let events = audit::read(&audit_path).expect("reads");
    let direct: Vec<_> = events
        .iter()
        .filter(|e| e.kind == audit::EventKind::Direct)
        .collect();
    assert_eq!(direct.len(), 2, "{events:?}");
    assert_eq!(direct[0].reason, "dns-query");
    assert_eq!(direct[0].host.as_deref(), Some("leak.example"));
    assert_eq!(direct[0].decision, audit::AuditDecision::Block);
    assert!(
        direct[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("10.255.255.53")),
        "{:?}",
        direct[0]
    );
    assert_eq!(direct[1].reason, "direct-connection");
    assert!(
        direct[1]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("4 more attempts")),
        "{:?}",
        direct[1]
    );
    let line = audit::format_event(direct[1]);
    assert!(
        line.contains("block direct TCP [2001:db8::1]:443 (direct-connection)"),
        "{line}"
    );
    assert_eq!(
        audit::verify(&audit_path).expect("verifies").lines,
        events.len() as u64
    );
}

/// A chain alone cannot show lines cut from its end; the head the gateway records when it
/// stops can.
#[tokio::test]
async fn the_recorded_head_catches_a_cut_tail() {
    let origin = origin().await;
    let gw = gateway(
        policy("rules:\n  - host: api.test\n"),
        &[("api.test", origin)],
    )
    .await;
    for path in ["/a", "/b"] {
        curl(&gw.proxy_url(), &[&format!("http://api.test{path}")]).await;
    }
    let audit_path = gw.audit_path.clone();
    let _dir = gw._dir;
    gw.handle.shutdown().await;
    let head = audit::read_head(&audit_path)
        .expect("reads")
        .expect("a head is written on shutdown");
    let full = audit::verify(&audit_path).expect("verifies");
    assert_eq!(
        (head.seq, head.hash.clone()),
        (full.last_seq, full.last_hash)
    );
    audit::verify_against(&audit_path, std::slice::from_ref(&head))
        .expect("the whole log reaches its head");

    let text = std::fs::read_to_string(&audit_path).expect("log");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    std::fs::write(&audit_path, lines.join("\n") + "\n").expect("cut");
    audit::verify(&audit_path).expect("a shorter chain still verifies on its own");
    let err =
        audit::verify_against(&audit_path, std::slice::from_ref(&head)).expect_err("the cut shows");
    assert!(matches!(err, AuditError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("removed from the end"), "{err}");

    assert!("3:abc".parse::<audit::AuditHead>().is_err());
    assert!("x:".parse::<audit::AuditHead>().is_err());
    let parsed: audit::AuditHead = format!("{}:{}", head.seq, head.hash.to_uppercase())
        .parse()
        .expect("parses");
    assert_eq!(parsed, head);
}
