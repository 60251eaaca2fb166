//! Gitea / Forgejo webhooks: signature check, payload parsing, dedupe keys.
//!
//! Payload field names follow Gitea's `modules/structs` (`IssuePayload`,
//! `IssueCommentPayload`, `PullRequestPayload`), which Forgejo shares. Only the
//! fields the orchestrator routes on are modelled; unknown fields are ignored
//! because Gitea adds fields between releases.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Every way a delivery can be refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "webhook secret is empty, so no delivery can be verified\nhint: set the same secret on the Gitea webhook and in the orchestrator"
    )]
    EmptySecret,
    #[error("webhook delivery has no `X-Gitea-Signature` or `X-Forgejo-Signature` header")]
    MissingSignature,
    #[error("webhook delivery has an empty signature")]
    EmptySignature,
    #[error("webhook signature is not hex-encoded HMAC-SHA256")]
    MalformedSignature,
    #[error("webhook signature does not match the body")]
    BadSignature,
    #[error(
        "webhook body is form-encoded\nhint: set the Gitea webhook's content type to `application/json`"
    )]
    FormEncoded,
    #[error("webhook delivery has no `X-Gitea-Event-Type` header")]
    MissingEventType,
    #[error("webhook delivery has no `X-Gitea-Delivery` header")]
    MissingDelivery,
    #[error("webhook `{event_type}` payload does not parse: {detail}")]
    Payload { event_type: String, detail: String },
}

/// The delivery headers that matter, read with Gitea's names first and
/// Forgejo's (`X-Forgejo-*`) as the fallback.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookHeaders {
    /// Fine-grained type, e.g. `issue_label`, `pull_request_comment`.
    pub event_type: Option<String>,
    /// The per-attempt UUID. A redelivery, or a second hook on the same event,
    /// gets a new one.
    pub delivery: Option<String>,
    pub signature: Option<String>,
    pub content_type: Option<String>,
}

impl WebhookHeaders {
    /// Read the headers through `lookup` (case-insensitive by name), so any HTTP
    /// framework's header map can be used.
    pub fn from_lookup<'a>(lookup: impl Fn(&str) -> Option<&'a str>) -> Self {
        let first = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| lookup(name))
                .map(|v| v.trim().to_owned())
        };
        Self {
            event_type: first(&[
                "x-gitea-event-type",
                "x-forgejo-event-type",
                "x-gitea-event",
                "x-forgejo-event",
            ]),
            delivery: first(&["x-gitea-delivery", "x-forgejo-delivery"]),
            signature: first(&["x-gitea-signature", "x-forgejo-signature"]),
            content_type: first(&["content-type"]),
        }
    }
}

/// Check the delivery's HMAC-SHA256 (hex, over the raw body) in constant time.
/// A missing or empty signature, an empty secret, or a form-encoded body is
/// refused: an unsigned delivery is never trusted.
pub fn verify_signature(
    secret: &[u8],
    body: &[u8],
    headers: &WebhookHeaders,
) -> Result<(), WebhookError> {
    if secret.is_empty() {
        return Err(WebhookError::EmptySecret);
    }
    let form_type = headers.content_type.as_deref().is_some_and(|value| {
        value
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
    });
    // Gitea's form content type posts `payload=<urlencoded json>`; the signature
    // covers the JSON, not the form, so it could never verify honestly here.
    if form_type || body.starts_with(b"payload=") {
        return Err(WebhookError::FormEncoded);
    }
    let signature = headers
        .signature
        .as_deref()
        .ok_or(WebhookError::MissingSignature)?;
    let signature = signature.strip_prefix("sha256=").unwrap_or(signature);
    if signature.is_empty() {
        return Err(WebhookError::EmptySignature);
    }
    let expected = hex::decode(signature).map_err(|_| WebhookError::MalformedSignature)?;
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(secret).map_err(|_| WebhookError::EmptySecret)?;
    mac.update(body);
    mac.verify_slice(&expected)
        .map_err(|_| WebhookError::BadSignature)
}

/// Hex HMAC-SHA256 of `body`, as Gitea puts in `X-Gitea-Signature`. For tests
/// and for the fake Gitea's deliveries.
#[must_use]
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("hmac takes any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserPayload {
    pub id: i64,
    pub login: String,
    #[serde(default)]
    pub full_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelPayload {
    pub id: i64,
    pub name: String,
    #[serde(default)]
    pub color: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryPayload {
    pub id: i64,
    pub name: String,
    pub full_name: String,
    pub owner: UserPayload,
}

/// Present on an issue that is really a pull request (Gitea's `PullRequestMeta`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestMetaPayload {
    #[serde(default)]
    pub merged: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuePayload {
    pub id: i64,
    pub number: u64,
    pub title: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub body: String,
    pub state: String,
    pub user: UserPayload,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: Vec<LabelPayload>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub assignees: Vec<UserPayload>,
    #[serde(default)]
    pub pull_request: Option<PullRequestMetaPayload>,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommentPayload {
    pub id: i64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub body: String,
    pub user: UserPayload,
    pub created_at: String,
    pub updated_at: String,
}

/// One side of a PR (Gitea's `PRBranchInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchPayload {
    #[serde(rename = "ref")]
    pub ref_name: String,
    pub sha: String,
    #[serde(default)]
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestPayload {
    pub id: i64,
    pub number: u64,
    pub title: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub body: String,
    pub state: String,
    #[serde(default)]
    pub merged: bool,
    pub user: UserPayload,
    pub head: BranchPayload,
    pub base: BranchPayload,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: Vec<LabelPayload>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub assignees: Vec<UserPayload>,
    pub updated_at: String,
}

/// `issues` and its variants (`issue_assign`, `issue_label`, `issue_milestone`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuesEvent {
    pub action: String,
    pub number: u64,
    pub issue: IssuePayload,
    pub repository: RepositoryPayload,
    pub sender: UserPayload,
}

/// `issue_comment` and `pull_request_comment` (a comment on a PR's thread).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueCommentEvent {
    pub action: String,
    pub issue: IssuePayload,
    pub comment: CommentPayload,
    pub repository: RepositoryPayload,
    pub sender: UserPayload,
    #[serde(default)]
    pub is_pull: bool,
}

/// `pull_request` and its variants (`pull_request_sync`, `_label`, `_assign`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestEvent {
    pub action: String,
    pub number: u64,
    pub pull_request: PullRequestPayload,
    pub repository: RepositoryPayload,
    pub sender: UserPayload,
}

/// A parsed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEvent {
    Issues(IssuesEvent),
    IssueComment(IssueCommentEvent),
    PullRequest(PullRequestEvent),
    /// An event type the orchestrator does not route (push, release, …).
    Other {
        event_type: String,
    },
}

impl WebhookEvent {
    /// Who caused the event.
    #[must_use]
    pub fn sender(&self) -> Option<&UserPayload> {
        match self {
            Self::Issues(e) => Some(&e.sender),
            Self::IssueComment(e) => Some(&e.sender),
            Self::PullRequest(e) => Some(&e.sender),
            Self::Other { .. } => None,
        }
    }

    #[must_use]
    pub fn repository(&self) -> Option<&RepositoryPayload> {
        match self {
            Self::Issues(e) => Some(&e.repository),
            Self::IssueComment(e) => Some(&e.repository),
            Self::PullRequest(e) => Some(&e.repository),
            Self::Other { .. } => None,
        }
    }

    /// Whether the bot itself caused this event (its own comment or edit), which
    /// must not trigger it again, or it would answer itself forever.
    #[must_use]
    pub fn is_from(&self, bot_login: &str) -> bool {
        let same = |login: &str| login.eq_ignore_ascii_case(bot_login);
        match self {
            Self::IssueComment(e) => same(&e.comment.user.login) || same(&e.sender.login),
            other => other.sender().is_some_and(|s| same(&s.login)),
        }
    }
}

/// Parse a verified delivery's body according to its event type.
pub fn parse_event(event_type: &str, body: &[u8]) -> Result<WebhookEvent, WebhookError> {
    fn parse<T: serde::de::DeserializeOwned>(
        event_type: &str,
        body: &[u8],
    ) -> Result<T, WebhookError> {
        serde_json::from_slice(body).map_err(|e| WebhookError::Payload {
            event_type: event_type.to_owned(),
            detail: e.to_string(),
        })
    }
    // Gitea's fine-grained types (modules/webhook/type.go) grouped by the payload
    // struct each one sends.
    Ok(match event_type {
        "issues" | "issue_assign" | "issue_label" | "issue_milestone" => {
            WebhookEvent::Issues(parse(event_type, body)?)
        }
        "issue_comment" | "pull_request_comment" => {
            WebhookEvent::IssueComment(parse(event_type, body)?)
        }
        "pull_request"
        | "pull_request_assign"
        | "pull_request_label"
        | "pull_request_milestone"
        | "pull_request_sync"
        | "pull_request_review_request"
        | "pull_request_review_approved"
        | "pull_request_review_rejected"
        | "pull_request_review_comment" => WebhookEvent::PullRequest(parse(event_type, body)?),
        other => WebhookEvent::Other {
            event_type: other.to_owned(),
        },
    })
}

/// A verified, parsed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub delivery_id: String,
    pub event_type: String,
    pub event: WebhookEvent,
}

/// Verify, then parse: the one call a webhook listener makes.
pub fn receive(
    secret: &[u8],
    headers: &WebhookHeaders,
    body: &[u8],
) -> Result<Delivery, WebhookError> {
    verify_signature(secret, body, headers)?;
    let event_type = headers
        .event_type
        .clone()
        .filter(|t| !t.is_empty())
        .ok_or(WebhookError::MissingEventType)?;
    let delivery_id = headers
        .delivery
        .clone()
        .filter(|d| !d.is_empty())
        .ok_or(WebhookError::MissingDelivery)?;
    let event = parse_event(&event_type, body)?;
    Ok(Delivery {
        delivery_id,
        event_type,
        event,
    })
}

/// The keys under which a delivery is remembered. A delivery is a duplicate
/// when any key was seen before: the UUID catches a replay of the same attempt;
/// the semantic key catches a redelivery (new UUID) and a second hook on the
/// same event (new UUID too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupeKeys {
    pub delivery: String,
    pub semantic: Option<String>,
}

impl DedupeKeys {
    #[must_use]
    pub fn all(&self) -> Vec<String> {
        std::iter::once(self.delivery.clone())
            .chain(self.semantic.clone())
            .collect()
    }
}

/// Dedupe keys for a delivery.
///
/// - comment: the comment id (an edit of a handled comment does not resume again);
/// - issue: issue id + action + `updated_at`;
/// - pull request: PR id + action + head SHA. The action is part of the key
///   because `closed` carries the same head SHA as the `opened` or
///   `synchronized` before it, and a close must still reach the router.
#[must_use]
pub fn dedupe_keys(delivery_id: &str, event: &WebhookEvent) -> DedupeKeys {
    let semantic = match event {
        WebhookEvent::IssueComment(e) => Some(format!("comment:{}", e.comment.id)),
        WebhookEvent::Issues(e) => Some(format!(
            "issue:{}:{}:{}",
            e.issue.id, e.action, e.issue.updated_at
        )),
        WebhookEvent::PullRequest(e) => Some(format!(
            "pr:{}:{}:{}",
            e.pull_request.id, e.action, e.pull_request.head.sha
        )),
        WebhookEvent::Other { .. } => None,
    };
    DedupeKeys {
        delivery: format!("delivery:{delivery_id}"),
        semantic,
    }
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(signature: Option<&str>) -> WebhookHeaders {
        WebhookHeaders {
            event_type: Some("issues".to_owned()),
            delivery: Some("d-1".to_owned()),
            signature: signature.map(str::to_owned),
            content_type: Some("application/json".to_owned()),
        }
    }

    #[test]
    fn signature_matches_a_known_hmac_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            sign(b"Jefe", b"what do ya want for nothing?")
        );
    }

    #[test]
    fn good_signature_verifies_with_and_without_prefix() {
        let body = br#"{"action":"opened"}"#;
        let signature = sign(b"s3cret", body);
        assert_eq!(
            Ok(()),
            verify_signature(b"s3cret", body, &headers(Some(&signature)))
        );
        assert_eq!(
            Ok(()),
            verify_signature(
                b"s3cret",
                body,
                &headers(Some(&format!("sha256={signature}")))
            )
        );
    }

    #[test]
    fn bad_empty_missing_and_malformed_signatures_are_refused() {
        let body = br#"{"action":"opened"}"#;
        let other = sign(b"other", body);
        assert_eq!(
            Err(WebhookError::BadSignature),
            verify_signature(b"s3cret", body, &headers(Some(&other)))
        );
        assert_eq!(
            Err(WebhookError::EmptySignature),
            verify_signature(b"s3cret", body, &headers(Some("")))
        );
        assert_eq!(
            Err(WebhookError::MissingSignature),
            verify_signature(b"s3cret", body, &headers(None))
        );
        assert_eq!(
            Err(WebhookError::MalformedSignature),
            verify_signature(b"s3cret", body, &headers(Some("not-hex")))
        );
        let truncated = &sign(b"s3cret", body)[..10];
        assert_eq!(
            Err(WebhookError::BadSignature),
            verify_signature(b"s3cret", body, &headers(Some(truncated)))
        );
    }

    #[test]
    fn empty_secret_refuses_even_a_matching_signature() {
        let body = b"{}";
        assert_eq!(
            Err(WebhookError::EmptySecret),
            verify_signature(b"", body, &headers(Some(&sign(b"", body))))
        );
    }

    #[test]
    fn form_encoded_bodies_are_refused() {
        let body = b"payload=%7B%7D";
        let mut form = headers(Some(&sign(b"s3cret", body)));
        assert_eq!(
            Err(WebhookError::FormEncoded),
            verify_signature(b"s3cret", body, &form)
        );
        form.content_type = Some("application/x-www-form-urlencoded; charset=utf-8".to_owned());
        let json = b"{}";
        form.signature = Some(sign(b"s3cret", json));
        assert_eq!(
            Err(WebhookError::FormEncoded),
            verify_signature(b"s3cret", json, &form)
        );
    }

    #[test]
    fn forgejo_headers_are_the_fallback() {
        let pairs = [
            ("x-forgejo-event-type", "issue_comment"),
            ("x-forgejo-delivery", "uuid-2"),
            ("x-forgejo-signature", "abc"),
        ];
        let parsed = WebhookHeaders::from_lookup(|name| {
            pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
        });
        assert_eq!(
            WebhookHeaders {
                event_type: Some("issue_comment".to_owned()),
                delivery: Some("uuid-2".to_owned()),
                signature: Some("abc".to_owned()),
                content_type: None,
            },
            parsed
        );
        let both = [
            ("x-gitea-signature", "gitea"),
            ("x-forgejo-signature", "forgejo"),
        ];
        let parsed = WebhookHeaders::from_lookup(|name| {
            both.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
        });
        assert_eq!(Some("gitea".to_owned()), parsed.signature);
    }

    #[test]
    fn unknown_event_types_are_other() {
        assert_eq!(
            Ok(WebhookEvent::Other {
                event_type: "push".to_owned()
            }),
            parse_event("push", b"{}")
        );
        assert!(matches!(
            parse_event("issues", b"{}"),
            Err(WebhookError::Payload { .. })
        ));
    }
}
