//! Webhook verification, parsing, dedupe and targeting on realistic payloads.

use bot_bottle_forge::webhook::{self, Delivery, WebhookError, WebhookEvent, WebhookHeaders};
use bot_bottle_forge::{
    ForgeStateStore, SqliteForgeStateStore, Target, TargetDecision, dedupe_keys, target_issue,
};

const SECRET: &[u8] = b"webhook-secret";

fn headers(event_type: &str, delivery: &str, signature: Option<&str>) -> WebhookHeaders {
    let pairs: Vec<(&str, String)> = [
        Some(("x-gitea-event-type", event_type.to_owned())),
        Some(("x-gitea-delivery", delivery.to_owned())),
        signature.map(|s| ("x-gitea-signature", s.to_owned())),
        Some(("content-type", "application/json".to_owned())),
    ]
    .into_iter()
    .flatten()
    .collect();
    WebhookHeaders::from_lookup(|name| {
        pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    })
}

fn deliver(event_type: &str, delivery: &str, fixture: &str) -> Delivery {
    let body = crate::fixture(fixture);
    let signature = webhook::sign(SECRET, &body);
    webhook::receive(
        SECRET,
        &headers(event_type, delivery, Some(&signature)),
        &body,
    )
    .unwrap_or_else(|e| panic!("{fixture}: {e}"))
}

#[test]
fn issues_payload_parses() {
    let delivery = deliver("issue_label", "uuid-1", "issues_label_updated.json");
    let WebhookEvent::Issues(event) = delivery.event else {
        panic!("not an issues event");
    };
    assert_eq!("label_updated", event.action);
    assert_eq!(17, event.number);
    assert_eq!("acme/widget", event.repository.full_name);
    assert_eq!("acme", event.repository.owner.login);
    assert_eq!(
        vec!["bot-bottle:implementer", "bug"],
        event
            .issue
            .labels
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
    );
    assert_eq!("alice", event.issue.assignees[0].login);
    assert_eq!(None, event.issue.pull_request);
}

#[test]
fn issue_comment_payload_parses() {
    let delivery = deliver("issue_comment", "uuid-2", "issue_comment_created.json");
    let WebhookEvent::IssueComment(event) = delivery.event else {
        panic!("not a comment event");
    };
    assert_eq!(
        ("created", 9001, "alice"),
        (
            event.action.as_str(),
            event.comment.id,
            event.comment.user.login.as_str()
        )
    );
    assert_eq!("Please also handle CRLF.", event.comment.body);
    assert_eq!(17, event.issue.number);
    assert!(!event.is_pull);
}

#[test]
fn pull_request_payload_parses() {
    let delivery = deliver("pull_request", "uuid-3", "pull_request_closed.json");
    let WebhookEvent::PullRequest(event) = delivery.event else {
        panic!("not a PR event");
    };
    assert_eq!("closed", event.action);
    assert_eq!(18, event.number);
    assert!(event.pull_request.merged);
    assert_eq!("bot-bottle/issue-17", event.pull_request.head.ref_name);
    assert_eq!(
        "1e5d0c9b8a7f6e5d4c3b2a1908f7e6d5c4b3a291",
        event.pull_request.head.sha
    );
    assert_eq!("Closes #17", event.pull_request.body);
}

#[test]
fn dispatch_follows_the_event_type_header() {
    // A PR thread comment arrives as `pull_request_comment` with the comment payload.
    let delivery = deliver(
        "pull_request_comment",
        "uuid-4",
        "issue_comment_created.json",
    );
    assert!(matches!(delivery.event, WebhookEvent::IssueComment(_)));
    let body = crate::fixture("issues_label_updated.json");
    let signature = webhook::sign(SECRET, &body);
    let push = webhook::receive(SECRET, &headers("push", "uuid-5", Some(&signature)), &body)
        .expect("push is accepted and ignored");
    assert_eq!(
        WebhookEvent::Other {
            event_type: "push".to_owned()
        },
        push.event
    );
}

#[test]
fn good_bad_empty_and_missing_signatures() {
    let body = crate::fixture("issues_label_updated.json");
    let good = webhook::sign(SECRET, &body);
    assert!(webhook::receive(SECRET, &headers("issues", "u", Some(&good)), &body).is_ok());
    let bad = webhook::sign(b"wrong-secret", &body);
    assert_eq!(
        Some(WebhookError::BadSignature),
        webhook::receive(SECRET, &headers("issues", "u", Some(&bad)), &body).err()
    );
    assert_eq!(
        Some(WebhookError::EmptySignature),
        webhook::receive(SECRET, &headers("issues", "u", Some("")), &body).err()
    );
    assert_eq!(
        Some(WebhookError::MissingSignature),
        webhook::receive(SECRET, &headers("issues", "u", None), &body).err()
    );
    // One flipped byte of the body.
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    assert_eq!(
        Some(WebhookError::BadSignature),
        webhook::receive(SECRET, &headers("issues", "u", Some(&good)), &tampered).err()
    );
}

#[test]
fn forgejo_signature_header_is_accepted() {
    let body = crate::fixture("issue_comment_created.json");
    let signature = webhook::sign(SECRET, &body);
    let pairs = [
        ("x-forgejo-event-type", "issue_comment"),
        ("x-forgejo-delivery", "f-1"),
        ("x-forgejo-signature", signature.as_str()),
    ];
    let forgejo =
        WebhookHeaders::from_lookup(|name| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v));
    let delivery = webhook::receive(SECRET, &forgejo, &body).expect("forgejo delivery");
    assert_eq!("f-1", delivery.delivery_id);
}

#[test]
fn missing_delivery_or_event_type_is_refused() {
    let body = crate::fixture("issues_label_updated.json");
    let signature = webhook::sign(SECRET, &body);
    let mut no_delivery = headers("issues", "", Some(&signature));
    no_delivery.delivery = None;
    assert_eq!(
        Some(WebhookError::MissingDelivery),
        webhook::receive(SECRET, &no_delivery, &body).err()
    );
    let mut no_type = headers("issues", "u", Some(&signature));
    no_type.event_type = None;
    assert_eq!(
        Some(WebhookError::MissingEventType),
        webhook::receive(SECRET, &no_type, &body).err()
    );
}

#[test]
fn redelivery_with_a_new_uuid_is_deduped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteForgeStateStore::open(dir.path().join("bot-bottle.db")).expect("store");
    let first = deliver("issue_comment", "uuid-a", "issue_comment_created.json");
    let again = deliver("issue_comment", "uuid-b", "issue_comment_created.json");
    let first_keys = dedupe_keys(&first.delivery_id, &first.event);
    let again_keys = dedupe_keys(&again.delivery_id, &again.event);
    assert_ne!(first_keys.delivery, again_keys.delivery);
    assert_eq!(Some("comment:9001".to_owned()), again_keys.semantic);
    assert!(store.record_delivery(&first_keys.all()).expect("first"));
    assert!(
        !store
            .record_delivery(&again_keys.all())
            .expect("redelivery")
    );
}

#[test]
fn semantic_keys_cover_issues_and_prs() {
    let issue = deliver("issue_label", "u1", "issues_label_updated.json");
    assert_eq!(
        Some("issue:301:label_updated:2026-11-24T08:01:30Z".to_owned()),
        dedupe_keys(&issue.delivery_id, &issue.event).semantic
    );
    let pr = deliver("pull_request", "u2", "pull_request_closed.json");
    assert_eq!(
        Some("pr:402:closed:1e5d0c9b8a7f6e5d4c3b2a1908f7e6d5c4b3a291".to_owned()),
        dedupe_keys(&pr.delivery_id, &pr.event).semantic
    );
    assert_eq!(
        "delivery:u2",
        dedupe_keys(&pr.delivery_id, &pr.event).delivery
    );
}

#[test]
fn the_bots_own_comments_are_recognised() {
    let own = deliver("issue_comment", "u1", "issue_comment_own.json");
    assert!(own.event.is_from("bot-bottle-bot"));
    assert!(own.event.is_from("Bot-Bottle-Bot"));
    let human = deliver("issue_comment", "u2", "issue_comment_created.json");
    assert!(!human.event.is_from("bot-bottle-bot"));
}

#[test]
fn targeting_a_labelled_issue_from_a_payload() {
    let delivery = deliver("issue_label", "u1", "issues_label_updated.json");
    let WebhookEvent::Issues(event) = delivery.event else {
        panic!("not an issues event");
    };
    let labels: Vec<String> = event.issue.labels.iter().map(|l| l.name.clone()).collect();
    let assignees: Vec<String> = event
        .issue
        .assignees
        .iter()
        .map(|a| a.login.clone())
        .collect();
    let agents = vec!["implementer".to_owned()];
    assert_eq!(
        TargetDecision::Targeted(Target {
            agent: "implementer".to_owned(),
            bottle: None,
            assignee: "alice".to_owned(),
        }),
        target_issue(&labels, &assignees, |login| login == "alice", &agents)
    );
    assert_eq!(
        TargetDecision::NoMemberAssignee,
        target_issue(&labels, &assignees, |_| false, &agents)
    );
    let other_agents = vec!["reviewer".to_owned()];
    assert_eq!(
        TargetDecision::UnknownAgent("implementer".to_owned()),
        target_issue(&labels, &assignees, |_| true, &other_agents)
    );
}
