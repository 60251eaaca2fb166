//! CONNECT: decided by host and port, then intercepted, or for a `passthrough` rule
//! tunnelled as is once its ClientHello has shown that it is TLS for the CONNECT host.
//!
//! A passthrough tunnel's first bytes are read (at most [`MAX_PEEK`]) and parsed by
//! [`peek_client_hello`], a small bounded parser of the TLS record and ClientHello
//! framing: a tunnel that does not start with a ClientHello, or whose server name (SNI)
//! is not the CONNECT host, is cut off and audited before any byte goes upstream.
//! Otherwise the peeked bytes are sent upstream unchanged and the rest is spliced.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::audit::{AuditDecision, EventDraft, EventKind};
use crate::gateway::{ProxyBody, Shared, block_response, full_body, upstream_failure};

fn connect_draft(decision: AuditDecision, reason: &str, host: &str, port: u16) -> EventDraft {
    let mut draft = EventDraft::new(EventKind::Connect, decision, reason);
    draft.method = Some("CONNECT".into());
    draft.host = Some(host.to_string());
    draft.port = Some(port);
    draft
}

pub(crate) async fn handle_connect(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let Some(authority) = req.uri().authority().cloned() else {
        let mut draft = EventDraft::new(
            EventKind::Connect,
            AuditDecision::Block,
            "bad-connect-target",
        );
        draft.method = Some("CONNECT".into());
        draft.status = Some(400);
        shared.record(draft);
        let mut response = block_response("bad-connect-target", "CONNECT needs host:port");
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(443);
    if let Some(refusal) = shared.audit_refusal() {
        return refusal;
    }
    let policy = shared.policy();
    let decision = policy.decide_connect(&host, port);
    if !decision.is_allow() {
        let reason = decision.reason.as_str();
        let mut draft = connect_draft(AuditDecision::Block, reason, &host, port);
        draft.rule = decision.rule;
        draft.status = Some(403);
        shared.record(draft);
        return block_response(reason, &format!("CONNECT {host}:{port} is not allowed"));
    }
    let mut draft = connect_draft(AuditDecision::Allow, decision.reason.as_str(), &host, port);
    draft.rule = decision.rule;
    let upstream = match shared.resolver(&policy, &host).connect(&host, port).await {
        Ok(stream) => stream,
        Err(err) => return upstream_failure(&shared, &err, draft),
    };
    let upgrade = hyper::upgrade::on(req);
    if !decision.passthrough {
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    crate::mitm::intercept(shared, upgraded, host, port, upstream).await
                }
                Err(err) => tracing::debug!(error = %err, "CONNECT upgrade failed"),
            }
        });
        return Response::new(full_body(""));
    }
    let mut shutdown = shared.shutdown_signal();
    let hello_timeout = shared.limits.handshake_timeout;
    tokio::spawn(async move {
        let tunnel = async {
            let Ok(upgraded) = upgrade.await else {
                return Ok((0, 0));
            };
            let mut client = TokioIo::new(upgraded);
            let peeked = match read_client_hello(&mut client, &host, hello_timeout).await {
                Ok(peeked) => peeked,
                Err(refusal) => return Err((refusal, client)),
            };
            let mut upstream = upstream;
            if upstream.write_all(&peeked).await.is_err() {
                return Ok((0, 0));
            }
            let (up, down) =
                crate::body::splice(client, upstream, crate::forward::SPLICE_GRACE).await;
            Ok((up + peeked.len() as u64, down))
        };
        let outcome = tokio::select! {
            outcome = tunnel => outcome,
            _ = shutdown.changed() => Ok((0, 0)),
        };
        draft.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match outcome {
            Ok((up, down)) => {
                draft.status = Some(200);
                draft.bytes_up = up;
                draft.bytes_down = down;
                draft.detail = Some("passthrough: not intercepted".into());
            }
            Err((Refusal { reason, detail }, client)) => {
                draft.decision = AuditDecision::Block;
                draft.reason = reason.into();
                draft.detail = Some(detail);
                // The client sees the tunnel close only once the refusal is on record.
                shared.record(draft);
                drop(client);
                return;
            }
        }
        shared.record(draft);
    });
    Response::new(full_body(""))
}

/// The most bytes read from a passthrough tunnel while looking for its ClientHello.
pub(crate) const MAX_PEEK: usize = 64 * 1024;
/// The largest ClientHello accepted (a post-quantum key share makes a hello of ~2 KiB).
const MAX_HELLO: usize = 32 * 1024;
/// TLS's record size limit for plaintext.
const MAX_RECORD: usize = 16 * 1024;

/// Why a passthrough tunnel was cut off, for the audit log.
#[derive(Debug)]
struct Refusal {
    reason: &'static str,
    detail: String,
}

/// Reads the tunnel's ClientHello and checks its server name against `host`; returns
/// every byte read, to be sent upstream as it came.
async fn read_client_hello<S: AsyncRead + Unpin>(
    client: &mut S,
    host: &str,
    timeout: Duration,
) -> Result<Vec<u8>, Refusal> {
    let opaque = |detail: String| Refusal {
        reason: "opaque-tunnel-refused",
        detail,
    };
    let mut peeked = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        // Parsed again only once the next record is complete, so a client trickling
        // bytes costs one parse per record, not one per read.
        let mut needed = 0;
        loop {
            if peeked.len() >= needed {
                match peek_client_hello(&peeked) {
                    Ok(Peek::NeedMore { at_least }) => needed = at_least,
                    Ok(Peek::Hello(hello)) => return Ok(hello),
                    Err(err) => {
                        return Err(opaque(format!(
                            "the tunnel did not start with a valid TLS ClientHello ({err})"
                        )));
                    }
                }
                if needed > MAX_PEEK {
                    return Err(opaque(format!(
                        "no complete ClientHello in the first {MAX_PEEK} bytes"
                    )));
                }
            }
            let room = chunk.len().min(MAX_PEEK - peeked.len());
            match client.read(&mut chunk[..room]).await {
                Ok(0) => {
                    return Err(opaque(
                        "the client closed the tunnel before its ClientHello".into(),
                    ));
                }
                Ok(n) => peeked.extend_from_slice(&chunk[..n]),
                Err(err) => return Err(opaque(format!("reading the ClientHello: {err}"))),
            }
        }
    };
    let hello = match tokio::time::timeout(timeout, read).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(Refusal {
                reason: "tls-handshake-timeout",
                detail: "no ClientHello in time".into(),
            });
        }
    };
    if let Err(detail) = sni_matches(host, &hello) {
        return Err(Refusal {
            reason: "sni-mismatch",
            detail,
        });
    }
    Ok(peeked)
}

/// Whether a passthrough tunnel's ClientHello may go to `host`. A host name must be the
/// one server name, ASCII case and a trailing dot aside. An IP-literal host must get
/// no server name (RFC 6066 has none for addresses, and clients send none), or one
/// that is the same address. Anything else is domain fronting.
fn sni_matches(host: &str, hello: &ClientHello) -> Result<(), String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if hello.server_names.len() > 1 {
        return Err(format!(
            "the ClientHello names {} servers; one is allowed",
            hello.server_names.len()
        ));
    }
    let name = hello.server_names.first().map(|raw| {
        let name = String::from_utf8_lossy(raw).into_owned();
        match name.strip_suffix('.') {
            Some(stripped) => stripped.to_owned(),
            None => name,
        }
    });
    let ok = match (host.parse::<IpAddr>(), &name) {
        (Ok(_), None) => true,
        (Ok(ip), Some(name)) => name.parse::<IpAddr>().is_ok_and(|named| named == ip),
        (Err(_), Some(name)) => name.eq_ignore_ascii_case(host),
        (Err(_), None) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "TLS server name {} differs from the CONNECT host (domain fronting)",
            name.map_or_else(|| "<none>".to_owned(), |n| format!("{n:?}"))
        ))
    }
}

/// What [`peek_client_hello`] found so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Peek {
    /// A prefix of a plausible ClientHello: read until the buffer holds `at_least`
    /// bytes (always more than it holds now), then look again.
    NeedMore {
        at_least: usize,
    },
    Hello(ClientHello),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ClientHello {
    /// The `host_name` entries of the server_name extension, as sent (RFC 6066 allows
    /// one; [`sni_matches`] refuses more).
    pub server_names: Vec<Vec<u8>>,
}

/// Finds the ClientHello at the start of `buf` (TLS records of type handshake, the
/// message possibly split across several) and reads its server name. Only framing is
/// checked, and every length against what holds it, so hostile input can neither
/// panic it nor make it buffer more than [`MAX_HELLO`] of handshake.
pub(crate) fn peek_client_hello(buf: &[u8]) -> Result<Peek, &'static str> {
    if buf.first().is_some_and(|&b| b != 22) {
        return Err("not a TLS handshake record");
    }
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            return Ok(Peek::NeedMore { at_least: pos + 5 });
        };
        if header[0] != 22 {
            return Err("a non-handshake record inside the ClientHello");
        }
        if header[1] != 3 {
            return Err("not a TLS record version");
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err("bad record length");
        }
        let Some(fragment) = buf.get(pos + 5..pos + 5 + len) else {
            return Ok(Peek::NeedMore {
                at_least: pos + 5 + len,
            });
        };
        handshake.extend_from_slice(fragment);
        pos += 5 + len;
        if let Some(head) = handshake.get(..4) {
            if head[0] != 1 {
                return Err("the first handshake message is not a ClientHello");
            }
            let body_len =
                usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]);
            if body_len > MAX_HELLO {
                return Err("ClientHello too large");
            }
            if let Some(body) = handshake.get(4..4 + body_len) {
                return parse_client_hello(body).map(Peek::Hello);
            }
        }
        if handshake.len() > MAX_HELLO + 4 {
            return Err("ClientHello too large");
        }
    }
}

/// A cursor that refuses to read past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if n > self.0.len() {
            return Err("truncated ClientHello");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<usize, &'static str> {
        Ok(usize::from(self.take(1)?[0]))
    }

    fn u16(&mut self) -> Result<usize, &'static str> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A vector with a `width`-byte length prefix.
    fn vec(&mut self, width: usize) -> Result<Reader<'a>, &'static str> {
        let len = if width == 1 { self.u8()? } else { self.u16()? };
        Ok(Reader(self.take(len)?))
    }
}

fn parse_client_hello(body: &[u8]) -> Result<ClientHello, &'static str> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    if r.vec(1)?.0.len() > 32 {
        return Err("session id longer than 32 bytes");
    }
    let suites = r.vec(2)?;
    if suites.0.is_empty() || suites.0.len() % 2 != 0 {
        return Err("bad cipher suite list");
    }
    if r.vec(1)?.0.is_empty() {
        return Err("no compression methods");
    }
    let mut hello = ClientHello {
        server_names: Vec::new(),
    };
    if r.0.is_empty() {
        return Ok(hello); // no extensions at all
    }
    let mut extensions = r.vec(2)?;
    if !r.0.is_empty() {
        return Err("bytes after the extensions");
    }
    let mut seen = Vec::new();
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec(2)?;
        if seen.contains(&kind) {
            return Err("an extension appears twice");
        }
        seen.push(kind);
        if kind != 0 {
            continue;
        }
        let mut names = data.vec(2)?;
        if !data.0.is_empty() || names.0.is_empty() {
            return Err("bad server_name extension");
        }
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec(2)?.0;
            if name_type != 0 {
                return Err("a server name that is not a host name");
            }
            if name.is_empty() {
                return Err("an empty server name");
            }
            hello.server_names.push(name.to_vec());
        }
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello body with `extensions` (each `(type, data)`), or none at all.
    fn hello_body(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        if let Some(extensions) = extensions {
            let mut all = Vec::new();
            for (kind, data) in extensions {
                all.extend_from_slice(&kind.to_be_bytes());
                all.extend_from_slice(&u16::try_from(data.len()).expect("len").to_be_bytes());
                all.extend_from_slice(data);
            }
            body.extend_from_slice(&u16::try_from(all.len()).expect("len").to_be_bytes());
            body.extend_from_slice(&all);
        }
        body
    }

    /// A server_name extension's data with `(name_type, name)` entries.
    fn sni(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend_from_slice(&u16::try_from(name.len()).expect("len").to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut data = u16::try_from(list.len())
            .expect("len")
            .to_be_bytes()
            .to_vec();
        data.extend_from_slice(&list);
        data
    }

    /// The handshake message for `body`, cut into records of at most `fragment` bytes.
    fn records(kind: u8, body: &[u8], fragment: usize) -> Vec<u8> {
        let len = u32::try_from(body.len()).expect("len").to_be_bytes();
        let mut message = vec![kind, len[1], len[2], len[3]];
        message.extend_from_slice(body);
        let mut out = Vec::new();
        for piece in message.chunks(fragment) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&u16::try_from(piece.len()).expect("len").to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    fn names_of(buf: &[u8]) -> Vec<String> {
        match peek_client_hello(buf) {
            Ok(Peek::Hello(hello)) => hello
                .server_names
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect(),
            other => panic!("no hello: {other:?}"),
        }
    }

    /// What a real client (rustls) sends first when connecting to `name`.
    fn rustls_hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn reads_the_server_name_of_real_and_fragmented_client_hellos() {
        let real = rustls_hello("api.test");
        for end in 0..real.len() {
            match peek_client_hello(&real[..end]) {
                Ok(Peek::NeedMore { at_least }) => {
                    assert!(
                        at_least > end && at_least <= real.len(),
                        "{end}: {at_least}"
                    );
                }
                other => panic!("{end}: {other:?}"),
            }
        }
        assert_eq!(names_of(&real), vec!["api.test"]);
        // Bytes after the hello (a second record, early data) do not matter.
        let mut more = real.clone();
        more.extend_from_slice(b"\x17\x03\x03\x00\x01x");
        assert_eq!(names_of(&more), vec!["api.test"]);
        // A client sends no server name for an address.
        assert!(names_of(&rustls_hello("127.0.0.1")).is_empty());
        // The same hello re-cut into records of 7 bytes, and of 1 byte.
        let body = &real[9..];
        for fragment in [7, 1] {
            let cut = records(1, body, fragment);
            assert_eq!(names_of(&cut), vec!["api.test"], "{fragment}");
            assert_eq!(
                peek_client_hello(&cut[..cut.len() - 1]),
                Ok(Peek::NeedMore {
                    at_least: cut.len()
                })
            );
        }
        // No extensions at all (an old client): no server name.
        assert!(names_of(&records(1, &hello_body(None), 100)).is_empty());
        // Unknown extensions are skipped; several names are reported, for refusal.
        let two = hello_body(Some(&[
            (0xfe0d, vec![1, 2, 3]),
            (0, sni(&[(0, b"a.test"), (0, b"b.test")])),
        ]));
        assert_eq!(names_of(&records(1, &two, 1000)), vec!["a.test", "b.test"]);
    }

    #[test]
    fn refuses_what_is_not_a_well_formed_client_hello() {
        let with = |extensions: &[(u16, Vec<u8>)]| records(1, &hello_body(Some(extensions)), 1000);
        let mut trailing = hello_body(Some(&[(0, sni(&[(0, b"a.test")]))]));
        trailing.push(0);
        let mut long_session = hello_body(None);
        long_session[34] = 33;
        long_session.splice(35..35, [0; 33]);
        let mut huge_record = records(1, &hello_body(None), 1000);
        huge_record[3..5].copy_from_slice(&[0x40, 0x01]);
        let mut huge_message = records(1, &hello_body(None), 1000);
        huge_message[6..9].copy_from_slice(&[0xff, 0xff, 0xff]);
        let mut cut_body = hello_body(None);
        cut_body.truncate(40);
        let mut odd_suites = hello_body(None);
        odd_suites[36] = 3;
        let hostile: Vec<(&str, Vec<u8>)> = vec![
            (
                "plain http",
                b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec(),
            ),
            ("ssh", b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
            ("sslv2 hello", vec![0x80, 0x2e, 1, 3, 1, 0, 0x15]),
            ("alert record", vec![21, 3, 3, 0, 2, 2, 40]),
            ("record version", vec![22, 2, 0, 0, 4, 1, 0, 0, 0]),
            ("empty record", vec![22, 3, 1, 0, 0]),
            ("server hello", records(2, &hello_body(None), 1000)),
            ("record over 16 KiB", huge_record),
            ("message over the cap", huge_message),
            ("truncated body", records(1, &cut_body, 1000)),
            ("session id over 32", records(1, &long_session, 1000)),
            ("odd cipher suites", records(1, &odd_suites, 1000)),
            ("bytes after extensions", records(1, &trailing, 1000)),
            ("empty server_name", with(&[(0, vec![])])),
            ("empty name list", with(&[(0, vec![0, 0])])),
            ("empty name", with(&[(0, sni(&[(0, b"")]))])),
            ("name type 1", with(&[(0, sni(&[(1, b"a.test")]))])),
            (
                "server_name twice",
                with(&[(0, sni(&[(0, b"a.test")])), (0, sni(&[(0, b"b.test")]))]),
            ),
            (
                "list longer than the extension",
                with(&[(0, vec![0, 9, 0, 0, 1, b'a'])]),
            ),
            (
                "bytes after the name list",
                with(&[(0, [sni(&[(0, b"a.test")]), vec![0]].concat())]),
            ),
        ];
        for (what, bytes) in hostile {
            assert!(peek_client_hello(&bytes).is_err(), "{what}: {bytes:?}");
        }
        // A handshake record after a non-handshake one is refused, not waited for.
        let mut mixed = records(1, &hello_body(None), 20);
        mixed[25] = 23;
        assert!(peek_client_hello(&mixed).is_err());
    }

    #[test]
    fn server_names_must_be_the_connect_host() {
        let hello = |names: &[&str]| ClientHello {
            server_names: names.iter().map(|n| n.as_bytes().to_vec()).collect(),
        };
        for (host, names) in [
            ("api.test", &["api.test"][..]),
            ("api.test", &["API.Test."]),
            ("api.test.", &["api.test"]),
            ("127.0.0.1", &[]),
            ("127.0.0.1", &["127.0.0.1"]),
            ("::1", &["0:0::1"]),
        ] {
            assert_eq!(sni_matches(host, &hello(names)), Ok(()), "{host} {names:?}");
        }
        for (host, names) in [
            ("api.test", &["other.test"][..]),
            ("api.test", &[]),
            ("api.test", &["api.test", "api.test"]),
            ("api.test", &["api.test", "other.test"]),
            ("api.test", &["api.test.."]),
            ("api.test", &["api.test\0"]),
            ("api.test", &["xapi.test"]),
            ("127.0.0.1", &["api.test"]),
            ("127.0.0.1", &["127.0.0.2"]),
            ("127.0.0.1", &["127.0.0.1", "api.test"]),
        ] {
            assert!(
                sni_matches(host, &hello(names)).is_err(),
                "{host} {names:?}"
            );
        }
    }

    #[test]
    fn no_input_makes_the_parser_panic() {
        let mut next = crate::xorshift();
        let seeds = [
            rustls_hello("api.test"),
            records(
                1,
                &hello_body(Some(&[(0, sni(&[(0, b"a.test"), (0, b"b.test")]))])),
                11,
            ),
            records(1, &hello_body(None), 3),
        ];
        for round in 0..20_000 {
            let mut bytes = seeds[round % seeds.len()].clone();
            for _ in 0..next() % 6 {
                let at = usize::try_from(next() % bytes.len() as u64).expect("index");
                bytes[at] = u8::try_from(next() & 0xff).expect("byte");
            }
            bytes.truncate(usize::try_from(next() % (bytes.len() as u64 + 1)).expect("len"));
            match peek_client_hello(&bytes) {
                Ok(Peek::Hello(hello)) => {
                    let named: usize = hello.server_names.iter().map(Vec::len).sum();
                    assert!(named <= bytes.len());
                }
                Ok(Peek::NeedMore { at_least }) => assert!(at_least > bytes.len()),
                Err(_) => {}
            }
        }
    }

    #[tokio::test]
    async fn the_peeked_bytes_are_returned_whole_and_reading_is_bounded() {
        let hello = rustls_hello("api.test");
        let (mut client, mut gateway) = tokio::io::duplex(1024);
        let written = hello.clone();
        let writer = tokio::spawn(async move {
            // In small pieces, as a slow client would.
            for piece in written.chunks(100) {
                client.write_all(piece).await.expect("write");
                tokio::task::yield_now().await;
            }
            client
        });
        let peeked = read_client_hello(&mut gateway, "api.test", Duration::from_secs(5))
            .await
            .expect("allowed");
        assert_eq!(peeked, hello, "forwarded exactly as read");
        drop(writer.await.expect("writer"));

        let refused = |host: &'static str, bytes: Vec<u8>| async move {
            let (mut client, mut gateway) = tokio::io::duplex(MAX_PEEK * 2);
            let writer = tokio::spawn(async move {
                let _ = client.write_all(&bytes).await;
                client
            });
            let refusal = read_client_hello(&mut gateway, host, Duration::from_millis(500))
                .await
                .expect_err("refused");
            drop(writer);
            refusal.reason
        };
        assert_eq!(refused("other.test", hello.clone()).await, "sni-mismatch");
        assert_eq!(
            refused("api.test", b"GET / HTTP/1.1\r\n\r\n".to_vec()).await,
            "opaque-tunnel-refused"
        );
        // A hello announced at the size cap, sent one byte per record: the gateway stops
        // reading at MAX_PEEK rather than buffering on.
        let mut trickle = Vec::new();
        let len = u32::try_from(MAX_HELLO).expect("len").to_be_bytes();
        for byte in [1, len[1], len[2], len[3]].into_iter().chain([0; MAX_PEEK]) {
            trickle.extend_from_slice(&[22, 3, 1, 0, 1, byte]);
        }
        assert_eq!(refused("api.test", trickle).await, "opaque-tunnel-refused");
        // Half a hello, then silence.
        assert_eq!(
            refused("api.test", hello[..50].to_vec()).await,
            "tls-handshake-timeout"
        );
        // A client that closes before its hello is complete.
        let (client, mut gateway) = tokio::io::duplex(64);
        drop(client);
        let closed = read_client_hello(&mut gateway, "api.test", Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert_eq!(closed.reason, "opaque-tunnel-refused");
    }
}
