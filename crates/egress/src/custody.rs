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
        let name = spec.name.clone();
        let value = match &spec.source {
            CredentialSource::Env(var) => {
                std::env::var(var).map_err(|_| CustodyError::MissingEnv {
                    name: name.clone(),
                    var: var.clone(),
                })?
            }
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

    /// Swaps the placeholder for the real value in headers (inside `Basic` credentials
    /// too) and the query, and makes sure the injection target carries the value.
    /// The caller has already checked that `host` is one of the credential's hosts.
    pub(crate) fn inject(&self, headers: &mut HeaderMap, query: &mut Option<String>) {
        let names: Vec<HeaderName> = headers.keys().cloned().collect();
        for name in names {
            let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
            let mut changed = false;
            let swapped: Vec<HeaderValue> = values
                .into_iter()
                .map(|value| match self.swap_header_value(&value) {
                    Some(new) => {
                        changed = true;
                        new
                    }
                    None => value,
                })
                .collect();
            if changed {
                headers.remove(&name);
                for value in swapped {
                    headers.append(name.clone(), value);
                }
            }
        }
        if let Some(q) = query.as_mut()
            && q.contains(&self.placeholder)
        {
            *q = q.replace(&self.placeholder, &urlencode(&self.secret));
        }
        match &self.spec.inject {
            Inject::Header(name) => {
                let present = headers
                    .get(name.as_str())
                    .is_some_and(|v| v.as_bytes() == self.secret.as_bytes());
                if !present
                    && let Ok(value) = HeaderValue::from_str(&self.secret)
                    && let Ok(name) = HeaderName::from_bytes(name.as_bytes())
                {
                    headers.insert(name, value);
                }
            }
            Inject::Bearer => {
                let wanted = format!("Bearer {}", self.secret);
                if headers
                    .get(header::AUTHORIZATION)
                    .map(HeaderValue::as_bytes)
                    != Some(wanted.as_bytes())
                    && let Ok(value) = HeaderValue::from_str(&wanted)
                {
                    headers.insert(header::AUTHORIZATION, value);
                }
            }
            Inject::Basic { username } => {
                let wanted = format!(
                    "Basic {}",
                    STANDARD.encode(format!("{username}:{}", self.secret))
                );
                if headers
                    .get(header::AUTHORIZATION)
                    .map(HeaderValue::as_bytes)
                    != Some(wanted.as_bytes())
                    && let Ok(value) = HeaderValue::from_str(&wanted)
                {
                    headers.insert(header::AUTHORIZATION, value);
                }
            }
            Inject::Query(param) => {
                let pair = format!("{}={}", urlencode(param), urlencode(&self.secret));
                let q = query.get_or_insert_with(String::new);
                let has = q.split('&').any(|p| p == pair);
                if !has {
                    let kept: Vec<&str> = q
                        .split('&')
                        .filter(|p| {
                            !p.is_empty() && p.split('=').next() != Some(urlencode(param).as_str())
                        })
                        .collect();
                    let mut rebuilt = kept.join("&");
                    if !rebuilt.is_empty() {
                        rebuilt.push('&');
                    }
                    rebuilt.push_str(&pair);
                    *q = rebuilt;
                }
            }
        }
    }

    fn swap_header_value(&self, value: &HeaderValue) -> Option<HeaderValue> {
        let text = value.to_str().ok()?;
        if text.contains(&self.placeholder) {
            return HeaderValue::from_str(&text.replace(&self.placeholder, &self.secret)).ok();
        }
        // git and other Basic-auth clients send `user:placeholder` base64-encoded.
        let (scheme, encoded) = text.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = STANDARD.decode(encoded.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        if !decoded.contains(&self.placeholder) {
            return None;
        }
        let swapped = decoded.replace(&self.placeholder, &self.secret);
        HeaderValue::from_str(&format!("{scheme} {}", STANDARD.encode(swapped))).ok()
    }

    /// Byte strings that reveal the secret, each with what the bottle sees instead: the
    /// raw value, and for Basic the whole encoded `username:value` that was injected.
    pub(crate) fn scrub_pairs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut pairs = vec![(
            self.secret.as_bytes().to_vec(),
            self.placeholder.as_bytes().to_vec(),
        )];
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

    /// Replaces the real value with the placeholder in response headers; returns whether
    /// anything changed.
    pub(crate) fn scrub_headers(&self, headers: &mut HeaderMap) -> bool {
        let pairs = self.scrub_pairs();
        let mut changed = false;
        for value in headers.values_mut() {
            let bytes = value.as_bytes();
            if !pairs
                .iter()
                .any(|(secret, _)| memchr::memmem::find(bytes, secret).is_some())
            {
                continue;
            }
            let replaced = replace_all(bytes, &pairs);
            if let Ok(new) = HeaderValue::from_bytes(&replaced) {
                *value = new;
                changed = true;
            }
        }
        changed
    }
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
}

impl<B> Scrubbed<B> {
    pub(crate) fn new(inner: B, credentials: &[&ResolvedCredential]) -> Self {
        let pairs: Vec<(Vec<u8>, Vec<u8>)> =
            credentials.iter().flat_map(|c| c.scrub_pairs()).collect();
        let hold = pairs.iter().map(|(s, _)| s.len()).max().unwrap_or(1) - 1;
        Scrubbed {
            inner,
            pairs,
            carry: BytesMut::new(),
            hold,
            ended: false,
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
                if self.carry.is_empty() {
                    return Poll::Ready(None);
                }
                let rest = self.carry.split().freeze();
                let out = self.replace_all(&rest).freeze();
                return Poll::Ready(Some(Ok(Frame::data(out))));
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
                        // Trailers: flush what is held first, on the next poll.
                        if self.carry.is_empty() {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        let rest = self.carry.split().freeze();
                        let out = self.replace_all(&rest).freeze();
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.carry.is_empty()
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
    fn swaps_inside_basic_and_bearer_and_query() {
        let c = credential(Inject::Basic {
            username: "bot".into(),
        });
        let mut headers = HeaderMap::new();
        let sent = format!(
            "Basic {}",
            STANDARD.encode(format!("bot:{}", c.placeholder()))
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&sent).expect("hv"),
        );
        let mut query = Some(format!("a=1&token={}", c.placeholder()));
        c.inject(&mut headers, &mut query);
        let expected = format!(
            "Basic {}",
            STANDARD.encode("bot:real-secret-value-0123456789")
        );
        assert_eq!(headers[header::AUTHORIZATION], expected.as_str());
        assert_eq!(
            query.as_deref(),
            Some("a=1&token=real-secret-value-0123456789")
        );

        // Nothing sent: the injection target is filled in.
        let mut empty = HeaderMap::new();
        let mut none = None;
        c.inject(&mut empty, &mut none);
        assert_eq!(empty[header::AUTHORIZATION], expected.as_str());

        let b = credential(Inject::Bearer);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", b.placeholder())).expect("hv"),
        );
        b.inject(&mut headers, &mut None);
        assert_eq!(
            headers[header::AUTHORIZATION],
            "Bearer real-secret-value-0123456789"
        );

        let h = credential(Inject::Header("x-api-key".into()));
        let mut headers = HeaderMap::new();
        h.inject(&mut headers, &mut None);
        assert_eq!(headers["x-api-key"], "real-secret-value-0123456789");

        let q = credential(Inject::Query("key".into()));
        let mut query = Some("key=wrong&x=1".to_string());
        q.inject(&mut HeaderMap::new(), &mut query);
        assert_eq!(
            query.as_deref(),
            Some("x=1&key=real-secret-value-0123456789")
        );
        assert!(!format!("{q:?}").contains("real-secret"));
    }

    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn scrubs_a_secret_split_across_chunks() {
        let c = credential(Inject::Bearer);
        let body = Chunks(
            [
                Bytes::from_static(b"echo: real-secret-va"),
                Bytes::from_static(b"lue-0123456789 and again real-secret-value-0123456789!"),
            ]
            .into(),
        );
        let out = Scrubbed::new(body, &[&c])
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
        assert!(c.scrub_headers(&mut headers));
        assert_eq!(headers["x-echo"], c.placeholder());
    }
}
