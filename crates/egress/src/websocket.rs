//! Websocket messages on their way out. After an allowed upgrade the gateway does not just
//! splice bytes: every message the bottle sends is reassembled from its frames, unmasked
//! and scanned like a request body before any of its frames go upstream. A message that
//! carries a secret (or another host's placeholder) is not sent; the bottle gets a close
//! frame with status 1008 and the connection ends. Messages from the server pass through,
//! except when a credential was injected into the upgrade: then they are re-framed with
//! every echo of the real value replaced by its placeholder, as HTTP responses are.
//!
//! Compression extensions are not offered upstream (the upgrade's
//! `Sec-WebSocket-Extensions` is removed), so payloads are plain; a frame with a reserved
//! bit set is one the gateway cannot read, and is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::dlp::{Action, Finding, FindingKind, ScanOutcome, Scanner};
use crate::gateway::OverCap;

const OP_CLOSE: u8 = 0x8;
/// RFC 6455 close codes.
const POLICY_VIOLATION: u16 = 1008;
const MESSAGE_TOO_BIG: u16 = 1009;

/// One frame as the bottle sent it, with its payload unmasked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub payload: Vec<u8>,
    /// The frame's bytes exactly as received (still masked), to forward unchanged.
    pub raw: Vec<u8>,
}

/// Reassembles frames from a byte stream.
#[derive(Debug, Default)]
pub(crate) struct FrameParser {
    buf: Vec<u8>,
}

impl FrameParser {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed, or `Err(len)` when a
    /// frame declares a payload over `max` (it would have to be buffered whole).
    pub fn next(&mut self, max: usize) -> Result<Option<Frame>, u64> {
        let [b0, b1, ..] = self.buf[..] else {
            return Ok(None);
        };
        let masked = b1 & 0x80 != 0;
        let (len, mut header) = match b1 & 0x7f {
            126 => match self.buf.get(2..4) {
                Some(ext) => (u64::from(u16::from_be_bytes([ext[0], ext[1]])), 4),
                None => return Ok(None),
            },
            127 => match self.buf.get(2..10) {
                Some(ext) => {
                    let mut bytes = [0u8; 8];
                    bytes.copy_from_slice(ext);
                    (u64::from_be_bytes(bytes), 10)
                }
                None => return Ok(None),
            },
            short => (u64::from(short), 2),
        };
        let len_usize = usize::try_from(len).map_err(|_| len)?;
        if len_usize > max {
            return Err(len);
        }
        let mask = if masked {
            let Some(key) = self.buf.get(header..header + 4) else {
                return Ok(None);
            };
            let key = [key[0], key[1], key[2], key[3]];
            header += 4;
            Some(key)
        } else {
            None
        };
        let total = header + len_usize;
        if self.buf.len() < total {
            return Ok(None);
        }
        let raw: Vec<u8> = self.buf.drain(..total).collect();
        let mut payload = raw[header..].to_vec();
        if let Some(key) = mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= key[i % 4];
            }
        }
        Ok(Some(Frame {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x7,
            opcode: b0 & 0x0f,
            payload,
            raw,
        }))
    }
}

/// An unmasked frame, as a server sends it.
fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        len if len < 126 => frame.push(u8::try_from(len).unwrap_or(125)),
        len => match u16::try_from(len) {
            Ok(short) => {
                frame.push(126);
                frame.extend_from_slice(&short.to_be_bytes());
            }
            Err(_) => {
                frame.push(127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        },
    }
    frame.extend_from_slice(payload);
    frame
}

fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    server_frame(true, OP_CLOSE, &payload)
}

/// Replaces real credential values with their placeholders in the server's frames,
/// streaming: a message is re-framed fragment by fragment, holding back the last
/// `longest secret - 1` bytes so a value split across frames is still found.
struct Scrubber {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    hold: usize,
    carry: Vec<u8>,
    /// Whether a message's first fragment went out (the rest are continuations).
    started: bool,
}

impl Scrubber {
    fn new(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        let hold = pairs
            .iter()
            .map(|(secret, _)| secret.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Scrubber {
            pairs,
            hold,
            carry: Vec::new(),
            started: false,
        }
    }

    /// The bytes to send the bottle for one server frame.
    fn frame(&mut self, frame: &Frame) -> Vec<u8> {
        if frame.opcode & 0x8 != 0 {
            let mut payload = crate::custody::replace_all(&frame.payload, &self.pairs);
            payload.truncate(125);
            return server_frame(frame.fin, frame.opcode, &payload);
        }
        self.carry.extend_from_slice(&frame.payload);
        let mut replaced = crate::custody::replace_all(&self.carry, &self.pairs);
        self.carry = if frame.fin {
            Vec::new()
        } else {
            replaced.split_off(replaced.len() - self.hold.min(replaced.len()))
        };
        let opcode = if self.started { 0 } else { frame.opcode };
        self.started = !frame.fin;
        server_frame(frame.fin, opcode, &replaced)
    }
}

/// What happened on one websocket connection.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Server frames re-framed to keep an echoed credential out of the bottle.
    pub scrubbed: bool,
    /// Messages (and control frames) the bottle sent that were scanned.
    pub scanned: u64,
    pub findings: Vec<Finding>,
    /// Why the connection was cut: `(reason, detail)` for the audit.
    pub refusal: Option<(&'static str, String)>,
    /// Set when messages went on unscanned (over the cap with `OverCap::Log`).
    pub unscanned: Option<String>,
}

/// What the outbound pump decided about one message.
enum Verdict {
    Forward,
    Refuse(&'static str, String, u16),
}

impl Verdict {
    fn is_forward(&self) -> bool {
        matches!(self, Verdict::Forward)
    }
}

fn judge(findings: &[Finding]) -> Verdict {
    let blocking: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.action == Action::Block)
        .collect();
    if blocking.is_empty() {
        return Verdict::Forward;
    }
    let exfiltration = blocking.iter().any(|f| {
        matches!(
            f.kind,
            FindingKind::Placeholder { .. } | FindingKind::CustodySecret { .. }
        )
    });
    if exfiltration {
        Verdict::Refuse(
            "exfiltration-attempt",
            "a websocket message carried a credential (or its placeholder) to a host it is not for"
                .to_owned(),
            POLICY_VIOLATION,
        )
    } else {
        let ids: Vec<&str> = blocking.iter().map(|f| f.rule_id.as_str()).collect();
        Verdict::Refuse(
            "dlp-blocked",
            format!("secret detected in a websocket message: {}", ids.join(", ")),
            POLICY_VIOLATION,
        )
    }
}

/// Scans a message; on a multi-threaded runtime (the product's) the worker hands its other
/// tasks to the rest of the pool first, so a large message does not stall other
/// connections. A one-thread runtime has nowhere to hand them, so the scan runs in place.
/// Scans share the gateway's scan slots with request bodies (`slots`), so at most one per
/// core runs at once, whatever mix of bodies and messages a bottle sends.
async fn scan_off_worker(
    slots: &tokio::sync::Semaphore,
    scanner: &Scanner,
    message: &[u8],
    host: &str,
) -> ScanOutcome {
    let _slot = slots.acquire().await;
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let scan = || {
        #[cfg(test)]
        crate::forward::tests::scan_gate(host);
        scanner.scan_message(message, host)
    };
    if multi_thread {
        tokio::task::block_in_place(scan)
    } else {
        scan()
    }
}

/// How [`relay`] scans what the bottle sends: the gateway's scanner, its scan slots
/// (shared with request bodies) and its over-cap policy.
pub(crate) struct MessageScan<'a> {
    pub scanner: &'a Scanner,
    pub slots: &'a tokio::sync::Semaphore,
    pub over_cap: OverCap,
}

/// Relays one upgraded connection, scanning what the bottle sends, and scrubbing what it
/// receives when `scrub` (real value → placeholder) is not empty.
pub(crate) async fn relay<C, U>(
    client: C,
    upstream: U,
    scan: MessageScan<'_>,
    host: &str,
    scrub: Vec<(Vec<u8>, Vec<u8>)>,
    grace: std::time::Duration,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    // Both directions write to the bottle: the server's frames, and a refusal's close.
    let client_write = Arc::new(tokio::sync::Mutex::new(client_write));
    let down = AtomicU64::new(0);
    let MessageScan {
        scanner,
        slots,
        over_cap,
    } = scan;
    let cap = scanner.max_decoded();
    let mut outcome = Outcome::default();

    let outbound = async {
        let mut parser = FrameParser::default();
        let mut message: Vec<u8> = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut passthrough = false;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            outcome.bytes_up += n as u64;
            if passthrough {
                if upstream_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                continue;
            }
            parser.push(&buf[..n]);
            loop {
                let frame = match parser.next(cap.saturating_sub(message.len())) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(len) => {
                        let detail = format!(
                            "a websocket message over the {cap}-byte scan cap ({len}-byte frame)"
                        );
                        if over_cap == OverCap::Block {
                            return Some(("dlp-message-too-large", detail, MESSAGE_TOO_BIG));
                        }
                        // Everything from here on goes out as it comes, unscanned, and
                        // the audit says so.
                        outcome.unscanned = Some(format!("{detail}: the rest passed unscanned"));
                        passthrough = true;
                        let rest = std::mem::take(&mut parser.buf);
                        pending.extend_from_slice(&rest);
                        if upstream_write.write_all(&pending).await.is_err() {
                            return None;
                        }
                        pending.clear();
                        break;
                    }
                };
                if frame.rsv != 0 {
                    return Some((
                        "dlp-undecodable-websocket",
                        "a websocket frame uses an extension the gateway did not agree to"
                            .to_owned(),
                        POLICY_VIOLATION,
                    ));
                }
                let control = frame.opcode & 0x8 != 0;
                let whole = if control {
                    frame.payload
                } else {
                    message.extend_from_slice(&frame.payload);
                    pending.extend_from_slice(&frame.raw);
                    if !frame.fin {
                        continue;
                    }
                    std::mem::take(&mut message)
                };
                let findings = match scan_off_worker(slots, scanner, &whole, host).await {
                    ScanOutcome::Scanned(findings) => findings,
                    ScanOutcome::TooLarge { findings, .. } => {
                        let detail = format!(
                            "the decoded views of a websocket message are over the {}-byte budget",
                            cap.saturating_mul(crate::dlp::VIEW_BUDGET_FACTOR)
                        );
                        if over_cap == OverCap::Block && judge(&findings).is_forward() {
                            return Some(("dlp-message-too-large", detail, MESSAGE_TOO_BIG));
                        }
                        outcome.unscanned =
                            Some(format!("{detail}: only part of them was scanned"));
                        findings
                    }
                    // A message that was not read is not forwarded (fail closed).
                    ScanOutcome::Undecodable { reason } => {
                        return Some(("dlp-undecodable-message", reason, POLICY_VIOLATION));
                    }
                };
                outcome.scanned += 1;
                let verdict = judge(&findings);
                outcome.findings.extend(findings);
                if let Verdict::Refuse(reason, detail, code) = verdict {
                    return Some((reason, detail, code));
                }
                let bytes = if control {
                    frame.raw
                } else {
                    std::mem::take(&mut pending)
                };
                if upstream_write.write_all(&bytes).await.is_err() {
                    return None;
                }
            }
        }
        let _ = upstream_write.shutdown().await;
        None
    };

    let scrubbing = !scrub.is_empty();
    let inbound = async {
        let mut scrubber = scrubbing.then(|| Scrubber::new(scrub));
        let mut parser = FrameParser::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match upstream_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            down.fetch_add(n as u64, Ordering::Relaxed);
            let Some(scrubber) = scrubber.as_mut() else {
                if client_write
                    .lock()
                    .await
                    .write_all(&buf[..n])
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            };
            parser.push(&buf[..n]);
            let mut out = Vec::new();
            let mut oversized = None;
            loop {
                match parser.next(cap) {
                    Ok(Some(frame)) => out.extend(scrubber.frame(&frame)),
                    Ok(None) => break,
                    Err(len) => {
                        oversized = Some(len);
                        break;
                    }
                }
            }
            let mut writer = client_write.lock().await;
            if writer.write_all(&out).await.is_err() {
                break;
            }
            if let Some(len) = oversized {
                // A frame too large to hold cannot be scrubbed; it does not reach the
                // bottle, which may hold no credential's real value.
                let _ = writer
                    .write_all(&close_frame(
                        MESSAGE_TOO_BIG,
                        "bot-bottle: server frame too large to scrub",
                    ))
                    .await;
                tracing::warn!(len, "websocket server frame over the scrub cap; closed");
                break;
            }
        }
        let _ = client_write.lock().await.shutdown().await;
    };

    let refusal = {
        let mut outbound = std::pin::pin!(outbound);
        let mut inbound = std::pin::pin!(inbound);
        tokio::select! {
            refused = &mut outbound => {
                if refused.is_none() {
                    let _ = tokio::time::timeout(grace, inbound).await;
                }
                refused
            }
            () = &mut inbound => {
                tokio::time::timeout(grace, outbound).await.ok().flatten()
            }
        }
    };
    if let Some((reason, detail, code)) = refusal {
        let mut writer = client_write.lock().await;
        let _ = writer
            .write_all(&close_frame(code, &format!("bot-bottle: {reason}")))
            .await;
        let _ = writer.shutdown().await;
        outcome.refusal = Some((reason, detail));
    }
    outcome.bytes_down = down.into_inner();
    outcome.scrubbed = scrubbing;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One worker: if the scan held it, the task spawned below could not run until the
    /// gate gave up after 10 s.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_message_scan_does_not_stall_the_worker() {
        use crate::forward::tests::{arm_gate, gate_state, release_gate, wait_for_gate};
        const HOST: &str = "gated-ws.test";
        arm_gate(HOST);
        let (client, mut bottle) = tokio::io::duplex(1 << 16);
        let (upstream, mut origin) = tokio::io::duplex(1 << 16);
        let relay = tokio::spawn(async move {
            let scanner = Scanner::new(crate::dlp::DlpRules::builtin(), Vec::new());
            relay(
                client,
                upstream,
                MessageScan {
                    scanner: &scanner,
                    slots: &tokio::sync::Semaphore::new(1),
                    over_cap: OverCap::Block,
                },
                HOST,
                Vec::new(),
                std::time::Duration::from_secs(1),
            )
            .await
        });
        bottle
            .write_all(&client_frame(true, 0x1, b"hello"))
            .await
            .expect("write");
        wait_for_gate(HOST).await;
        let other = tokio::spawn(async { 42 }).await.expect("other task");
        assert_eq!(other, 42);
        assert!(!gate_state(HOST).1, "the scan held the only worker");
        release_gate(HOST);
        let mut forwarded = vec![0u8; client_frame(true, 0x1, b"hello").len()];
        origin.read_exact(&mut forwarded).await.expect("forwarded");
        drop(bottle);
        drop(origin);
        let outcome = relay.await.expect("relay");
        assert_eq!(outcome.scanned, 1);
        assert!(!gate_state(HOST).1);
    }

    #[tokio::test]
    async fn a_message_waits_for_a_scan_slot() {
        let (client, mut bottle) = tokio::io::duplex(1 << 16);
        let (upstream, mut origin) = tokio::io::duplex(1 << 16);
        // No free slot: every scan of the gateway (bodies and messages) is taken.
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let relay_slots = std::sync::Arc::clone(&slots);
        let relay = tokio::spawn(async move {
            let scanner = Scanner::new(crate::dlp::DlpRules::builtin(), Vec::new());
            relay(
                client,
                upstream,
                MessageScan {
                    scanner: &scanner,
                    slots: &relay_slots,
                    over_cap: OverCap::Block,
                },
                "slots.test",
                Vec::new(),
                std::time::Duration::from_secs(1),
            )
            .await
        });
        let frame = client_frame(true, 0x1, b"hello");
        bottle.write_all(&frame).await.expect("write");
        let mut forwarded = vec![0u8; frame.len()];
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            origin.read_exact(&mut forwarded),
        )
        .await;
        assert!(
            early.is_err(),
            "a message went upstream without a scan slot"
        );
        slots.add_permits(1);
        origin.read_exact(&mut forwarded).await.expect("forwarded");
        drop(bottle);
        drop(origin);
        assert_eq!(relay.await.expect("relay").scanned, 1);
    }

    /// A client frame: masked, as RFC 6455 requires of clients.
    pub(crate) fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | u8::try_from(n).unwrap()),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        frame
    }

    #[test]
    fn frames_are_reassembled_across_reads_and_unmasked() {
        let long = vec![b'x'; 70_000];
        let mut bytes = client_frame(true, 0x1, b"hello");
        bytes.extend(client_frame(false, 0x2, &long));
        bytes.extend(client_frame(true, 0x9, b"ping"));
        let mut parser = FrameParser::default();
        let mut frames = Vec::new();
        for chunk in bytes.chunks(1000) {
            parser.push(chunk);
            while let Some(frame) = parser.next(1 << 20).unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].payload, b"hello");
        assert!(frames[0].fin);
        assert_eq!(frames[1].payload, long);
        assert!(!frames[1].fin);
        assert_eq!(
            (frames[2].opcode, &frames[2].payload[..]),
            (0x9, &b"ping"[..])
        );
        let raw: Vec<u8> = frames.iter().flat_map(|f| f.raw.clone()).collect();
        assert_eq!(raw, bytes, "raw bytes are forwarded unchanged");
    }

    #[test]
    fn a_frame_over_the_cap_is_reported_not_buffered() {
        let mut parser = FrameParser::default();
        parser.push(&client_frame(true, 0x2, &[0u8; 300]));
        assert_eq!(parser.next(100), Err(300));
    }

    fn parse_all(bytes: &[u8]) -> Vec<Frame> {
        let mut parser = FrameParser::default();
        parser.push(bytes);
        std::iter::from_fn(|| parser.next(1 << 20).unwrap()).collect()
    }

    #[test]
    fn server_frames_are_scrubbed_across_fragments() {
        let secret = b"sk-real-0123456789".to_vec();
        let placeholder = b"sk-fake-ABCDEFGHIJKL".to_vec();
        let mut scrubber = Scrubber::new(vec![(secret, placeholder)]);
        let mut out = Vec::new();
        for frame in [
            server_frame(false, 0x1, b"your key is sk-real-01"),
            server_frame(true, 0x9, b"ping sk-real-0123456789"),
            server_frame(false, 0x0, b"23456789 and"),
            server_frame(true, 0x0, b" again sk-real-0123456789"),
        ] {
            for parsed in parse_all(&frame) {
                out.extend(scrubber.frame(&parsed));
            }
        }
        let frames = parse_all(&out);
        let message: Vec<u8> = frames
            .iter()
            .filter(|f| f.opcode & 0x8 == 0)
            .flat_map(|f| f.payload.clone())
            .collect();
        assert_eq!(
            String::from_utf8(message).unwrap(),
            "your key is sk-fake-ABCDEFGHIJKL and again sk-fake-ABCDEFGHIJKL"
        );
        assert_eq!(frames[0].opcode, 0x1, "the message keeps its opcode");
        assert!(
            frames
                .iter()
                .skip(1)
                .filter(|f| f.opcode & 0x8 == 0)
                .all(|f| f.opcode == 0)
        );
        assert!(frames.last().unwrap().fin);
        let ping = frames.iter().find(|f| f.opcode == 0x9).unwrap();
        assert_eq!(ping.payload, b"ping sk-fake-ABCDEFGHIJKL");
        assert!(
            !out.windows(18).any(|w| w == b"sk-real-0123456789"),
            "the real value reached the bottle"
        );
    }

    #[test]
    fn close_frames_carry_the_code() {
        let frame = close_frame(POLICY_VIOLATION, "bot-bottle: dlp-blocked");
        assert_eq!(frame[0], 0x88);
        assert_eq!(usize::from(frame[1]), frame.len() - 2);
        assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 1008);
    }
}
