//! Webhook delivery as Gitea does it (`services/webhook/deliver.go`,
//! `modules/webhook/type.go`): one delivery per hook and event, a random UUID v4 as
//! the delivery id, the payload as indented JSON, and the same set of headers and
//! signatures Gitea adds. Deliveries go out one at a time, in the order the events
//! happened, from a background task.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{FakeGiteaError, Shared, lock};

/// Gitea's default `[webhook] DELIVER_TIMEOUT`.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(5);

/// How much of a receiver's answer is read (and then dropped).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// A webhook on one repository.
#[derive(Debug, Clone)]
pub(super) struct Hook {
    pub owner: String,
    pub repo: String,
    pub url: String,
    pub secret: String,
}

/// One delivery: the exact bytes and headers sent, and how the receiver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// `X-Gitea-Delivery`: a UUID v4, new for every delivery Gitea creates.
    pub id: String,
    /// Where it was sent.
    pub url: String,
    /// `X-Gitea-Event`, the coarse event (`issues`, `issue_comment`, `pull_request`).
    pub event: String,
    /// `X-Gitea-Event-Type`, the fine-grained type (`issue_label`, `pull_request_comment`, …).
    pub event_type: String,
    /// The payload's `action`.
    pub action: String,
    /// Whether the background task has tried to send it.
    pub attempted: bool,
    /// The receiver's status; `None` until attempted, or when it could not be reached.
    pub status: Option<u16>,
    /// Why it could not be sent, when it could not.
    pub error: Option<String>,
    /// The body, byte for byte as signed and sent.
    pub body: Vec<u8>,
    /// The headers in the order they were sent, with Gitea's spelling.
    pub headers: Vec<(String, String)>,
}

impl DeliveryRecord {
    /// The first value of header `name` (case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The body parsed as JSON.
    #[must_use]
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// The coarse event of a fine-grained event type, as `HookEventType.Event()` maps it.
pub(super) fn event_of(event_type: &str) -> &'static str {
    match event_type {
        "issues" | "issue_assign" | "issue_label" | "issue_milestone" => "issues",
        "pull_request"
        | "pull_request_assign"
        | "pull_request_label"
        | "pull_request_milestone"
        | "pull_request_sync"
        | "pull_request_review_request" => "pull_request",
        "issue_comment" | "pull_request_comment" => "issue_comment",
        "pull_request_review_approved" => "pull_request_approved",
        "pull_request_review_rejected" => "pull_request_rejected",
        "pull_request_review_comment" => "pull_request_comment",
        "push" => "push",
        _ => "",
    }
}

/// A delivery of `body` to `hook`, not yet attempted.
pub(super) fn new_delivery(
    hook: &Hook,
    id: String,
    event_type: &str,
    action: &str,
    body: Vec<u8>,
) -> DeliveryRecord {
    let headers = headers(&id, event_type, hook.secret.as_bytes(), &body);
    DeliveryRecord {
        id,
        url: hook.url.clone(),
        event: event_of(event_type).to_owned(),
        event_type: event_type.to_owned(),
        action: action.to_owned(),
        attempted: false,
        status: None,
        error: None,
        body,
        headers,
    }
}

/// The headers Gitea's `addDefaultHeaders` sets, in its order, after the content
/// type. Without a secret the signatures are empty, as in Gitea.
fn headers(id: &str, event_type: &str, secret: &[u8], body: &[u8]) -> Vec<(String, String)> {
    let (sha1, sha256) = if secret.is_empty() {
        (String::new(), String::new())
    } else {
        (hmac_sha1_hex(secret, body), hmac_sha256_hex(secret, body))
    };
    let event = event_of(event_type);
    [
        ("Content-Type", "application/json".to_owned()),
        ("User-Agent", "Go-http-client/1.1".to_owned()),
        ("X-Gitea-Delivery", id.to_owned()),
        ("X-Gitea-Event", event.to_owned()),
        ("X-Gitea-Event-Type", event_type.to_owned()),
        ("X-Gitea-Signature", sha256.clone()),
        ("X-Gogs-Delivery", id.to_owned()),
        ("X-Gogs-Event", event.to_owned()),
        ("X-Gogs-Event-Type", event_type.to_owned()),
        ("X-Gogs-Signature", sha256.clone()),
        ("X-Hub-Signature", format!("sha1={sha1}")),
        ("X-Hub-Signature-256", format!("sha256={sha256}")),
        ("X-GitHub-Delivery", id.to_owned()),
        ("X-GitHub-Event", event.to_owned()),
        ("X-GitHub-Event-Type", event_type.to_owned()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect()
}

/// A random UUID v4 in its usual text form, as Gitea's `gouuid.New().String()`.
pub(super) fn uuid_v4() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The payload as Gitea writes it: `json.MarshalIndent` with two spaces, which also
/// escapes `<`, `>`, `&`, U+2028 and U+2029. Those characters can only occur inside
/// JSON strings, so replacing them in the text is exact.
pub(super) fn gitea_json(value: &Value) -> Vec<u8> {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
        .into_bytes()
}

/// Accepts only `http://` URLs on a loopback host: the fake never sends anywhere else.
pub(super) fn check_url(url: &str) -> Result<(), FakeGiteaError> {
    let refuse = || FakeGiteaError::WebhookUrl {
        url: url.to_owned(),
    };
    let uri: http::Uri = url.parse().map_err(|_| refuse())?;
    if uri.scheme_str() != Some("http") {
        return Err(refuse());
    }
    let host = uri.host().ok_or_else(refuse)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback { Ok(()) } else { Err(refuse()) }
}

/// Sends queued deliveries (indices into the delivery list) one after the other, and
/// records each outcome.
pub(super) async fn deliver_queue(shared: Shared, mut queue: mpsc::UnboundedReceiver<usize>) {
    while let Some(index) = queue.recv().await {
        let job = {
            let inner = lock(&shared);
            inner.deliveries.get(index).map(|record| {
                (
                    record.url.clone(),
                    record.body.clone(),
                    record.headers.clone(),
                )
            })
        };
        let Some((url, body, headers)) = job else {
            continue;
        };
        let outcome = post(&url, body, &headers).await;
        let mut inner = lock(&shared);
        if let Some(record) = inner.deliveries.get_mut(index) {
            record.attempted = true;
            match outcome {
                Ok(status) => record.status = Some(status),
                Err(error) => record.error = Some(error),
            }
        }
        inner.delivered.send_modify(|count| *count += 1);
    }
}

async fn post(url: &str, body: Vec<u8>, headers: &[(String, String)]) -> Result<u16, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid url `{url}`: {e}"))?;
    let authority = uri
        .authority()
        .ok_or_else(|| format!("url `{url}` has no host"))?
        .clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), ToString::to_string);
    let send = async move {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot connect to `{authority}`: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("http handshake with `{authority}` failed: {e}"))?;
        tokio::spawn(connection);
        let mut request = http::Request::post(path).header(http::header::HOST, authority.as_str());
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build the delivery request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("`{authority}` did not answer: {e}"))?;
        let status = response.status().as_u16();
        let _ = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await;
        Ok(status)
    };
    tokio::time::timeout(DELIVER_TIMEOUT, send)
        .await
        .map_err(|_| format!("no answer within {DELIVER_TIMEOUT:?}"))?
}

fn hmac_sha256_hex(secret: &[u8], body: &[u8]) -> String {
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(body);
            hex::encode(mac.finalize().into_bytes())
        }
        // HMAC takes keys of any length; this arm is unreachable.
        Err(_) => String::new(),
    }
}

/// HMAC-SHA1 for the legacy `X-Hub-Signature` header. No SHA-1 crate is in the
/// workspace and this header carries no security weight here (receivers check the
/// SHA-256 one), so the few lines of SHA-1 live below.
fn hmac_sha1_hex(secret: &[u8], body: &[u8]) -> String {
    const BLOCK: usize = 64;
    let mut key = [0u8; BLOCK];
    if secret.len() > BLOCK {
        key[..20].copy_from_slice(&sha1(secret));
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    let mut inner: Vec<u8> = key.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(body);
    let mut outer: Vec<u8> = key.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&sha1(&inner));
    hex::encode(sha1(&outer))
}

/// SHA-1 (FIPS 180-4).
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut state: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let bit_len = u64::try_from(data.len())
        .unwrap_or(u64::MAX)
        .wrapping_mul(8);
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bit_len.to_be_bytes());
    for chunk in message.chunks_exact(64) {
        let mut words = [0u32; 80];
        for (word, bytes) in words.iter_mut().zip(chunk.chunks_exact(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        for i in 16..80 {
            words[i] = (words[i - 3] ^ words[i - 8] ^ words[i - 14] ^ words[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = state;
        for (i, word) in words.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let next = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*word);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = next;
        }
        for (slot, value) in state.iter_mut().zip([a, b, c, d, e]) {
            *slot = slot.wrapping_add(value);
        }
    }
    let mut out = [0u8; 20];
    for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_and_hmac_sha1_match_published_vectors() {
        assert_eq!(
            hex::encode(sha1(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hex::encode(sha1(b"")),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        // 56 bytes: the padding spills into a second block.
        assert_eq!(
            hex::encode(sha1(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "84983e441c3bd26ebaae4aa1f95129e5e54670f1"
        );
        // RFC 2202, test cases 2 and 6 (a key longer than one block).
        assert_eq!(
            hmac_sha1_hex(b"Jefe", b"what do ya want for nothing?"),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
        assert_eq!(
            hmac_sha1_hex(
                &[0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "aa4ae5e15272d00e95705637ce8a3b55ed402112"
        );
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn uuid_is_version_4_variant_1() {
        let id = uuid_v4();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            vec![8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{id}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, uuid_v4());
    }

    #[test]
    fn event_types_map_to_events_as_gitea_does() {
        assert_eq!(event_of("issue_label"), "issues");
        assert_eq!(event_of("issue_assign"), "issues");
        assert_eq!(event_of("pull_request_comment"), "issue_comment");
        assert_eq!(event_of("pull_request_sync"), "pull_request");
        assert_eq!(
            event_of("pull_request_review_comment"),
            "pull_request_comment"
        );
    }

    #[test]
    fn json_escapes_like_go() {
        let body = gitea_json(&serde_json::json!({"a": "<b>&\u{2028}"}));
        assert_eq!(
            String::from_utf8(body).unwrap(),
            "{\n  \"a\": \"\\u003cb\\u003e\\u0026\\u2028\"\n}"
        );
    }

    #[test]
    fn only_loopback_http_urls_are_accepted() {
        for good in [
            "http://127.0.0.1:9/hook",
            "http://localhost:9/",
            "http://[::1]:9/x",
        ] {
            assert!(check_url(good).is_ok(), "{good}");
        }
        for bad in [
            "https://127.0.0.1:9/",
            "http://example.com/",
            "http://10.0.0.1/",
            "nonsense",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers_carry_both_signatures_and_are_empty_without_a_secret() {
        let signed = headers("id-1", "issue_label", b"s3cret", b"{}");
        let get = |list: &[(String, String)], name: &str| {
            list.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
                .unwrap()
        };
        assert_eq!(get(&signed, "X-Gitea-Event"), "issues");
        assert_eq!(get(&signed, "X-Gitea-Event-Type"), "issue_label");
        assert_eq!(get(&signed, "X-GitHub-Event"), "issues");
        assert_eq!(
            get(&signed, "X-Hub-Signature-256"),
            format!("sha256={}", get(&signed, "X-Gitea-Signature"))
        );
        assert_eq!(get(&signed, "X-Gitea-Signature").len(), 64);
        let unsigned = headers("id-1", "issues", b"", b"{}");
        assert_eq!(get(&unsigned, "X-Gitea-Signature"), "");
        assert_eq!(get(&unsigned, "X-Hub-Signature"), "sha1=");
    }
}
