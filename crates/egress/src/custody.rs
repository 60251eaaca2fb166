//! Credential custody: resolving a credential's real value on the host, swapping the
//! bottle's placeholder for it on the way to the credential's own hosts, and scrubbing
//! it back out of what those hosts answer.

use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bot_bottle_core::credential::{CredentialSource, CredentialSpec, Inject, placeholder};
use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::gateway::BoxError;

#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    #[error("credential `{name}` is invalid")]
    Invalid {
        name: String,
        #[source]
        source: bot_bottle_core::credential::CredentialError,
    },
    #[error(
        "credential `{name}`: environment variable `{var}` is not set\nhint: export `{var}` before starting the bottle"
    )]
    MissingEnv { name: String, var: String },
    #[error("credential `{name}`: cannot read `{}`", path.display())]
    File {
        name: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credential `{name}`: command `{command}` failed: {reason}")]
    Command {
        name: String,
        command: String,
        reason: String,
    },
    #[error("credential `{name}` resolved to an empty value")]
    Empty { name: String },
    #[error("credential `{name}`: value contains characters that cannot go in an HTTP header")]
    NotHeaderSafe { name: String },
}

/// A credential whose real value is held in this process. `Debug` never shows the value.
#[derive(Clone)]
pub struct ResolvedCredential {
    pub spec: CredentialSpec,
    placeholder: String,
    secret: String,
}

impl std::fmt::Debug for ResolvedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedCredential")
            .field("spec", &self.spec)
            .field("placeholder", &self.placeholder)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Reads a secret from its source on this host: an env var as is, a file trimmed, a
/// command's first stdout line (the `pass` convention: later lines are metadata), run
/// through `sh -c` in this process's environment. `name` only labels errors.
///
/// # Errors
/// A source that cannot be read. An empty value is not checked here.
pub fn read_source(name: &str, source: &CredentialSource) -> Result<String, CustodyError> {
    let name = name.to_owned();
    let value = match source {
        CredentialSource::Env(var) => std::env::var(var).map_err(|_| CustodyError::MissingEnv {
            name: name.clone(),
            var: var.clone(),
        })?,
        CredentialSource::File(path) => std::fs::read_to_string(path)
            .map_err(|source| CustodyError::File {
                name: name.clone(),
                path: path.clone(),
                source,
            })?
            .trim()
            .to_string(),
        CredentialSource::Command(command) => {
            let output = std::process::Command::new("sh")
                .args(["-c", command])
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|err| CustodyError::Command {
                    name: name.clone(),
                    command: command.clone(),
                    reason: err.to_string(),
                })?;
            if !output.status.success() {
                // stderr is not shown: a failing secret tool may echo what it read.
                return Err(CustodyError::Command {
                    name,
                    command: command.clone(),
                    reason: format!("exited with {}", output.status),
                });
            }
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
    };
    Ok(value)
}

impl ResolvedCredential {
    /// Reads the real value from its source: an env var as is, a file trimmed, a command's
    /// first stdout line (the `pass` convention: later lines are metadata). A command runs
    /// through `sh -c` in the launching user's environment.
    ///
    /// # Errors
    /// An invalid spec, or a source that cannot be read or is empty.
    pub fn resolve(spec: CredentialSpec, bottle: &str) -> Result<Self, CustodyError> {
        spec.validate().map_err(|source| CustodyError::Invalid {
            name: spec.name.clone(),
            source,
        })?;
        let value = read_source(&spec.name, &spec.source)?;
        Self::with_value(spec, bottle, value)
    }

    /// A credential with a value already in hand (tests, or a caller with its own store).
    ///
    /// # Errors
    /// An empty value or one that cannot be sent in a header.
    pub fn with_value(
        spec: CredentialSpec,
        bottle: &str,
        value: String,
    ) -> Result<Self, CustodyError> {
        if value.is_empty() {
            return Err(CustodyError::Empty { name: spec.name });
        }
        if HeaderValue::from_str(&value).is_err() || value.contains(['\r', '\n']) {
            return Err(CustodyError::NotHeaderSafe { name: spec.name });
        }
        let placeholder = placeholder(bottle, &spec.name, &value);
        Ok(ResolvedCredential {
            spec,
            placeholder,
            secret: value,
        })
    }

    /// What the bottle holds (in the env var `spec.env`, if set).
    #[must_use]
    pub fn placeholder(&self) -> &str {
        &self.placeholder
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }

    pub(crate) fn custody_secret(&self) -> crate::dlp::CustodySecret {
        crate::dlp::CustodySecret {
            name: self.spec.name.clone(),
            value: self.secret.clone(),
            hosts: self.spec.hosts.clone(),
        }
    }

    pub(crate) fn placeholder_secret(&self) -> crate::dlp::PlaceholderSecret {
        crate::dlp::PlaceholderSecret {
            name: self.spec.name.clone(),
            placeholder: self.placeholder.clone(),
            hosts: self.spec.hosts.clone(),
        }
    }

    /// Writes the real value into the one slot the credential's `inject` names, and
    /// nowhere else: the named header, `Authorization` (bearer, or basic with the
    /// configured username), or the named query parameter. Whatever the bottle put in that
    /// slot is replaced. A placeholder anywhere else in the request stays a placeholder, so
    /// an origin that echoes a header can only ever echo the placeholder; the returned list
    /// names where such leftovers were (for the audit), never their values.
    /// The caller has already checked that `host` is one of the credential's hosts.
    pub(crate) fn inject(
        &self,
        headers: &mut HeaderMap,
        query: &mut Option<String>,
    ) -> Vec<String> {
        match &self.spec.inject {
            Inject::Header(name) => {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&self.secret),
                ) {
                    headers.insert(name, value);
                }
            }
            Inject::Bearer => {
                if let Ok(value) = HeaderValue::from_str(&format!("Bearer {}", self.secret)) {
                    headers.insert(header::AUTHORIZATION, value);
                }
            }
            Inject::Basic { username } => {
                let encoded = STANDARD.encode(format!("{username}:{}", self.secret));
                if let Ok(value) = HeaderValue::from_str(&format!("Basic {encoded}")) {
                    headers.insert(header::AUTHORIZATION, value);
                }
            }
            Inject::Query(param) => {
                let key = urlencode(param);
                let pair = format!("{key}={}", urlencode(&self.secret));
                let q = query.get_or_insert_with(String::new);
                let mut kept: Vec<&str> = q
                    .split('&')
                    .filter(|p| !p.is_empty() && p.split('=').next() != Some(key.as_str()))
                    .collect();
                kept.push(&pair);
                *q = kept.join("&");
            }
        }
        self.leftovers(headers, query.as_deref())
    }

    /// Where the placeholder still is after injection: every header but the slot, and
    /// every query parameter but the slot's. Raw, or inside a `Basic` credential.
    fn leftovers(&self, headers: &HeaderMap, query: Option<&str>) -> Vec<String> {
        let slot_header = match &self.spec.inject {
            Inject::Header(name) => Some(name.to_ascii_lowercase()),
            Inject::Bearer | Inject::Basic { .. } => Some("authorization".to_string()),
            Inject::Query(_) => None,
        };
        let mut found: Vec<String> = Vec::new();
        for (name, value) in headers {
            if slot_header.as_deref() == Some(name.as_str()) {
                continue;
            }
            if self.carries_placeholder(value.as_bytes()) {
                let place = format!("header:{name}");
                if !found.contains(&place) {
                    found.push(place);
                }
            }
        }
        if let (Some(q), Inject::Query(param)) = (query, &self.spec.inject) {
            let key = urlencode(param);
            let others = q
                .split('&')
                .filter(|p| p.split('=').next() != Some(key.as_str()));
            if others.into_iter().any(|p| p.contains(&self.placeholder)) {
                found.push("query".into());
            }
        } else if query.is_some_and(|q| q.contains(&self.placeholder)) {
            found.push("query".into());
        }
        found
    }

    fn carries_placeholder(&self, value: &[u8]) -> bool {
        if memchr::memmem::find(value, self.placeholder.as_bytes()).is_some() {
            return true;
        }
        let Ok(text) = std::str::from_utf8(value) else {
            return false;
        };
        let Some((scheme, encoded)) = text.split_once(' ') else {
            return false;
        };
        scheme.eq_ignore_ascii_case("basic")
            && STANDARD
                .decode(encoded.trim())
                .is_ok_and(|d| memchr::memmem::find(&d, self.placeholder.as_bytes()).is_some())
    }

    /// Byte strings that reveal the secret, each with what the bottle sees instead: every
    /// form the gateway itself writes. The raw value (header and bearer slots), its
    /// percent-encoded form (the query slot), and for Basic the whole encoded
    /// `username:value`.
    pub(crate) fn scrub_pairs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut pairs = vec![(
            self.secret.as_bytes().to_vec(),
            self.placeholder.as_bytes().to_vec(),
        )];
        let encoded = urlencode(&self.secret);
        if encoded != self.secret {
            pairs.push((
                encoded.into_bytes(),
                urlencode(&self.placeholder).into_bytes(),
            ));
        }
        if let Inject::Basic { username } = &self.spec.inject {
            pairs.push((
                STANDARD
                    .encode(format!("{username}:{}", self.secret))
                    .into_bytes(),
                STANDARD
                    .encode(format!("{username}:{}", self.placeholder))
                    .into_bytes(),
            ));
        }
        pairs
    }
}

/// Replaces every secret of `pairs` with its placeholder in header values (a response's
/// headers or trailers); returns whether anything changed. A value that would no longer
/// be a valid header after the swap is removed rather than passed on.
pub(crate) fn scrub_header_map(headers: &mut HeaderMap, pairs: &[(Vec<u8>, Vec<u8>)]) -> bool {
    let mut changed = false;
    let mut invalid: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter_mut() {
        let bytes = value.as_bytes();
        if !reveals_any(bytes, pairs) {
            continue;
        }
        changed = true;
        match HeaderValue::from_bytes(&replace_all(bytes, pairs)) {
            Ok(new) => *value = new,
            Err(_) => invalid.push(name.clone()),
        }
    }
    for name in invalid {
        headers.remove(name);
    }
    changed
}

/// The reason phrase of an HTTP/1 response, if the upstream sent a custom one, with every
/// secret of `pairs` replaced; `None` keeps the standard phrase.
pub(crate) fn scrub_reason(
    phrase: &hyper::ext::ReasonPhrase,
    pairs: &[(Vec<u8>, Vec<u8>)],
) -> Option<hyper::ext::ReasonPhrase> {
    let bytes = phrase.as_bytes();
    if !reveals_any(bytes, pairs) {
        return Some(phrase.clone());
    }
    hyper::ext::ReasonPhrase::try_from(replace_all(bytes, pairs)).ok()
}

/// Whether `bytes` hold any secret of `pairs`: the cheap check before [`replace_all`]
/// copies anything.
fn reveals_any(bytes: &[u8], pairs: &[(Vec<u8>, Vec<u8>)]) -> bool {
    pairs
        .iter()
        .any(|(secret, _)| memchr::memmem::find(bytes, secret).is_some())
}

pub(crate) fn replace_all(data: &[u8], pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut current = data.to_vec();
    for (secret, placeholder) in pairs {
        if memchr::memmem::find(&current, secret).is_none() {
            continue;
        }
        let mut out = Vec::with_capacity(current.len());
        let mut rest = current.as_slice();
        while let Some(at) = memchr::memmem::find(rest, secret) {
            out.extend_from_slice(&rest[..at]);
            out.extend_from_slice(placeholder);
            rest = &rest[at + secret.len()..];
        }
        out.extend_from_slice(rest);
        current = out;
    }
    current
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response body with real secrets replaced by their placeholders, streaming: it holds
/// back the last `longest - 1` bytes of each chunk so a secret split across two chunks is
/// still found.
pub(crate) struct Scrubbed<B> {
    inner: B,
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    carry: BytesMut,
    hold: usize,
    ended: bool,
    /// Trailers that arrived while bytes were held back: sent after those bytes.
    trailers: Option<HeaderMap>,
}

impl<B> Scrubbed<B> {
    /// `pairs` are the injected credentials' [`ResolvedCredential::scrub_pairs`].
    pub(crate) fn new(inner: B, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        let hold = pairs.iter().map(|(s, _)| s.len()).max().unwrap_or(1) - 1;
        Scrubbed {
            inner,
            pairs,
            carry: BytesMut::new(),
            hold,
            ended: false,
            trailers: None,
        }
    }

    fn replace_all(&self, data: &[u8]) -> BytesMut {
        BytesMut::from(replace_all(data, &self.pairs).as_slice())
    }
}

impl<B> Body for Scrubbed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.ended {
                if !self.carry.is_empty() {
                    let rest = self.carry.split().freeze();
                    let out = self.replace_all(&rest).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.ended = true,
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err.into()))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        self.carry.extend_from_slice(&data);
                        let joined = self.carry.split().freeze();
                        let replaced = self.replace_all(&joined);
                        let keep = self.hold.min(replaced.len());
                        let mut replaced = replaced;
                        let tail = replaced.split_off(replaced.len() - keep);
                        self.carry = tail;
                        if !replaced.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(replaced.freeze()))));
                        }
                    }
                    Err(frame) => {
                        // Trailers are the body's last frame: scrub them and send them
                        // after whatever is still held back.
                        if let Ok(mut trailers) = frame.into_trailers() {
                            scrub_header_map(&mut trailers, &self.pairs);
                            self.trailers = Some(trailers);
                        }
                        self.ended = true;
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.carry.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn credential(inject: Inject) -> ResolvedCredential {
        let spec = CredentialSpec {
            name: "gitea".into(),
            source: CredentialSource::Env("UNUSED".into()),
            hosts: vec!["git.test".into()],
            inject,
            env: None,
        };
        ResolvedCredential::with_value(spec, "bottle-x", "real-secret-value-0123456789".into())
            .expect("valid")
    }

    #[test]
    fn the_real_value_goes_only_into_the_inject_slot() {
        let c = credential(Inject::Basic {
            username: "bot".into(),
        });
        let mut headers = HeaderMap::new();
        let sent = format!(
            "Basic {}",
            STANDARD.encode(format!("someone:{}", c.placeholder()))
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&sent).expect("hv"),
        );
        let mut query = Some(format!("a=1&token={}", c.placeholder()));
        let left = c.inject(&mut headers, &mut query);
        // The slot gets the configured username, whatever the bottle sent.
        let expected = format!(
            "Basic {}",
            STANDARD.encode("bot:real-secret-value-0123456789")
        );
        assert_eq!(headers[header::AUTHORIZATION], expected.as_str());
        // The query is not Basic's slot: the placeholder stays, and is reported.
        assert_eq!(
            query.as_deref(),
            Some(format!("a=1&token={}", c.placeholder()).as_str())
        );
        assert_eq!(left, vec!["query".to_string()]);

        // Nothing sent: the slot is filled in.
        let mut empty = HeaderMap::new();
        let mut none = None;
        assert!(c.inject(&mut empty, &mut none).is_empty());
        assert_eq!(empty[header::AUTHORIZATION], expected.as_str());
        assert_eq!(none, None);

        // The attack from the issue: a bearer credential, and the placeholder inside a
        // Basic value in a header of the bottle's choosing. Only Authorization changes.
        let b = credential(Inject::Bearer);
        let mut headers = HeaderMap::new();
        let foreign = format!(
            "Basic {}",
            STANDARD.encode(format!("zz:{}", b.placeholder()))
        );
        headers.insert("x-e", HeaderValue::from_str(&foreign).expect("hv"));
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(b.placeholder()).expect("hv"),
        );
        let left = b.inject(&mut headers, &mut None);
        assert_eq!(
            headers[header::AUTHORIZATION],
            "Bearer real-secret-value-0123456789"
        );
        assert_eq!(headers["x-e"], foreign.as_str());
        assert_eq!(headers["sec-websocket-protocol"], b.placeholder());
        assert_eq!(left, vec!["header:x-e", "header:sec-websocket-protocol"]);

        let h = credential(Inject::Header("x-api-key".into()));
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-api-key",
            HeaderValue::from_str(&format!("prefix-{}", h.placeholder())).expect("hv"),
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", h.placeholder())).expect("hv"),
        );
        let left = h.inject(&mut headers, &mut None);
        assert_eq!(headers["x-api-key"], "real-secret-value-0123456789");
        assert_eq!(
            headers[header::AUTHORIZATION],
            format!("Bearer {}", h.placeholder()).as_str()
        );
        assert_eq!(left, vec!["header:authorization"]);

        let q = credential(Inject::Query("key".into()));
        let mut query = Some(format!("key=wrong&x=1&other={}", q.placeholder()));
        let left = q.inject(&mut HeaderMap::new(), &mut query);
        assert_eq!(
            query.as_deref(),
            Some(
                format!(
                    "x=1&other={}&key=real-secret-value-0123456789",
                    q.placeholder()
                )
                .as_str()
            )
        );
        assert_eq!(left, vec!["query".to_string()]);
        assert!(!format!("{q:?}").contains("real-secret"));
    }

    #[test]
    fn every_form_the_gateway_writes_is_scrubbed() {
        let spec = CredentialSpec {
            name: "q".into(),
            source: CredentialSource::Env("UNUSED".into()),
            hosts: vec!["git.test".into()],
            inject: Inject::Basic {
                username: "bot".into(),
            },
            env: None,
        };
        let c = ResolvedCredential::with_value(spec, "bottle-x", "s3cr/t+v@lue=0123456789".into())
            .expect("valid");
        let basic = STANDARD.encode("bot:s3cr/t+v@lue=0123456789");
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-raw",
            HeaderValue::from_static("a s3cr/t+v@lue=0123456789 b"),
        );
        headers.insert(
            "x-query",
            HeaderValue::from_static("key=s3cr%2Ft%2Bv%40lue%3D0123456789"),
        );
        headers.insert(
            "x-basic",
            HeaderValue::from_str(&format!("Basic {basic}")).expect("hv"),
        );
        headers.insert("x-clean", HeaderValue::from_static("nothing here"));
        assert!(scrub_header_map(&mut headers, &c.scrub_pairs()));
        let all: String = headers
            .values()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(!all.contains("s3cr"), "{all}");
        assert!(!all.contains(&basic), "{all}");
        assert_eq!(headers["x-clean"], "nothing here");
        assert_eq!(
            headers["x-basic"],
            format!(
                "Basic {}",
                STANDARD.encode(format!("bot:{}", c.placeholder()))
            )
            .as_str()
        );
        let phrase =
            hyper::ext::ReasonPhrase::try_from(b"Denied for s3cr/t+v@lue=0123456789".to_vec())
                .expect("phrase");
        let scrubbed = scrub_reason(&phrase, &c.scrub_pairs()).expect("still a phrase");
        assert_eq!(
            scrubbed.as_bytes(),
            format!("Denied for {}", c.placeholder()).as_bytes()
        );
    }

    #[tokio::test]
    async fn scrubs_a_secret_split_across_chunks() {
        let c = credential(Inject::Bearer);
        let body = Frames(
            [
                Frame::data(Bytes::from_static(b"echo: real-secret-va")),
                Frame::data(Bytes::from_static(
                    b"lue-0123456789 and again real-secret-value-0123456789!",
                )),
            ]
            .into(),
        );
        let out = Scrubbed::new(body, c.scrub_pairs())
            .collect()
            .await
            .expect("collect")
            .to_bytes();
        let expected = format!("echo: {p} and again {p}!", p = c.placeholder());
        assert_eq!(out, expected.as_bytes());
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-echo",
            HeaderValue::from_static("real-secret-value-0123456789"),
        );
        assert!(scrub_header_map(&mut headers, &c.scrub_pairs()));
        assert_eq!(headers["x-echo"], c.placeholder());
    }

    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    #[tokio::test]
    async fn trailers_are_scrubbed_and_kept_after_held_back_bytes() {
        let c = credential(Inject::Bearer);
        let mut trailers = HeaderMap::new();
        trailers.insert(
            "x-echo",
            HeaderValue::from_static("token=real-secret-value-0123456789"),
        );
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = Frames(
            [
                Frame::data(Bytes::from_static(b"tail ends with real-secret-val")),
                Frame::trailers(trailers),
            ]
            .into(),
        );
        let collected = Scrubbed::new(body, c.scrub_pairs())
            .collect()
            .await
            .expect("collect");
        let trailers = collected.trailers().cloned().expect("trailers kept");
        assert_eq!(
            trailers["x-echo"],
            format!("token={}", c.placeholder()).as_str()
        );
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(
            collected.to_bytes(),
            b"tail ends with real-secret-val".as_slice()
        );
    }
}
