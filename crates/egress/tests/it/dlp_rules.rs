//! The built-in DLP rule set against its case file (`dlp_cases.rs`): the figures the
//! default set must hold, printed on every run.

use bot_bottle_egress::dlp::{DlpRules, Scanner};

use crate::dlp_cases::{cases, score};

#[test]
fn builtin_rules_detect_block_and_spare_the_cases() {
    let cases = cases();
    let scanner = Scanner::new(DlpRules::builtin(), Vec::new());
    let score = score(&scanner, &cases);
    println!("built-in DLP set: {}", score.summary());
    for (expected, text, found) in &score.failures {
        println!("  expected {expected}, found {found:?}: {text:?}");
    }
    // Enough cases that one miss moves a figure by well under a point.
    assert!(score.positives >= 600, "{} positives", score.positives);
    assert!(score.negatives >= 80, "{} negatives", score.negatives);
    assert!(score.recall() >= 95.0, "{}", score.summary());
    assert!(score.blocked_rate() >= 80.0, "{}", score.summary());
    assert!(score.false_blocked_rate() <= 1.0, "{}", score.summary());
    assert!(score.expected_rate() >= 90.0, "{}", score.summary());
    // Code that only names secrets should not even be logged, or the audit log fills with
    // noise: at most one look-alike in twenty gets a (log) finding.
    assert!(
        score.negatives_found * 20 <= score.negatives,
        "{}",
        score.summary()
    );
}

#[test]
fn the_case_file_fails_a_thin_rule_set() {
    // The old default set's shape: a handful of prefixed tokens and a generic rule. The case
    // file must tell it apart from the built-in set, or its figures would prove nothing.
    let (thin, skipped) = DlpRules::from_gitleaks_toml(
        "[[rules]]\nid = 'github-pat'\nregex = 'ghp_[0-9A-Za-z]{36}'\nkeywords = ['ghp_']\naction = 'block'\n\
         [[rules]]\nid = 'generic-api-key'\nregex = '(?i)(?:key|token|secret)[\\w.-]{0,20}[\\s\\x27\"]{0,3}[=:]{1,2}[\\s\\x27\"]{0,3}([\\w+/=-]{16,})'\nkeywords = ['key', 'token', 'secret']\naction = 'log'\n",
    )
    .expect("valid rule file");
    assert!(skipped.is_empty());
    let score = score(&Scanner::new(thin, Vec::new()), &cases());
    assert!(score.blocked_rate() < 20.0, "{}", score.summary());
    assert!(score.recall() < 95.0, "{}", score.summary());
}
