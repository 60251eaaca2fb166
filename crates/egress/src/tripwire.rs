//! The tripwire: what happens to a packet that tries to leave a bottle without the gateway.
//!
//! A bottle has no route out. Left at that, a direct connection, a DNS query or a UDP
//! datagram fails inside the bottle's kernel (`ENETUNREACH`) and nobody hears of it. The
//! tripwire gives the bottle's network namespace a TUN device as its default route (IPv4
//! and IPv6). Every packet routed there is read by [`inspect`], which never forwards
//! anything: it answers with a refusal (a TCP reset, or an ICMP "administratively
//! prohibited") so the tool fails at once, and returns an [`Attempt`] for the audit log.
//!
//! This module is pure (bytes in, bytes out); the runtime owns the TUN device and the
//! socket that carries attempts to the gateway, which records them through
//! [`crate::GatewayHandle::attempt_recorder`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The tripwire device's own IPv4 address (RFC 2544 benchmarking range, never routed).
pub const TRIPWIRE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The tripwire device's own IPv6 address (a unique-local address).
pub const TRIPWIRE_V6: Ipv6Addr = Ipv6Addr::new(0xfd62, 0x6f74, 0x746c, 0, 0, 0, 0, 1);
/// The TUN device's name inside the bottle's network namespace.
pub const TRIPWIRE_DEVICE: &str = "tripwire0";
/// DNS names longer than this are cut in the audit (a name is at most 253 octets).
const MAX_NAME: usize = 253;

/// The transport of an attempt, as audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
    /// A UDP or TCP query to port 53 whose question could be read.
    Dns,
    Icmp,
    /// Any other IP protocol.
    Ip,
}

impl Transport {
    /// The audit's `reason` for an attempt over this transport.
    #[must_use]
    pub fn reason(self) -> &'static str {
        match self {
            Transport::Tcp => "direct-connection",
            Transport::Udp => "direct-datagram",
            Transport::Dns => "dns-query",
            Transport::Icmp => "direct-icmp",
            Transport::Ip => "direct-packet",
        }
    }

    /// The audit's `method` column.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
            Transport::Dns => "DNS",
            Transport::Icmp => "ICMP",
            Transport::Ip => "IP",
        }
    }
}

/// One attempt to leave the bottle other than through the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub transport: Transport,
    pub destination: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The IP protocol number (6 TCP, 17 UDP, 1 or 58 ICMP, …).
    pub protocol: u8,
    /// For DNS: the question's name, with bytes outside `[A-Za-z0-9._-]` escaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Attempts like this one that were not sent separately (see [`Limiter`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u64,
}

/// One line from the tripwire to the host, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Report {
    /// The device is up and routed; the bottle may start. `ipv6: false` with the reason
    /// when only IPv4 could be routed to it (IPv6 then fails unaudited, as before).
    Ready {
        ipv6: bool,
        #[serde(default)]
        detail: Option<String>,
    },
    Attempt(Attempt),
    /// Attempts the [`Limiter`] held back with no later attempt to carry their count
    /// (sent after a quiet second, and when the tripwire stops).
    HeldBack {
        count: u64,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What to do with one packet read from the tripwire device.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Inspection {
    /// The attempt to audit, if the packet starts one (a SYN, a datagram, an echo request).
    pub attempt: Option<Attempt>,
    /// A packet to write back to the device: the refusal the bottle's kernel will see.
    pub reply: Option<Vec<u8>>,
}

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Reads one IP packet (as a TUN device without packet information delivers it) and says
/// what to audit and what to answer. Malformed or foreign packets yield nothing; this
/// never panics on any input.
#[must_use]
pub fn inspect(packet: &[u8]) -> Inspection {
    match packet.first().map(|b| b >> 4) {
        Some(4) => inspect_v4(packet).unwrap_or_default(),
        Some(6) => inspect_v6(packet).unwrap_or_default(),
        _ => Inspection::default(),
    }
}

/// An IP packet split into what the transports need.
struct Ip<'a> {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    /// The whole packet, for ICMP errors that quote it.
    packet: &'a [u8],
    payload: &'a [u8],
}

fn inspect_v4(packet: &[u8]) -> Option<Inspection> {
    let header_len = usize::from(packet.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    if header_len < 20 || total < header_len || packet.len() < total {
        return None;
    }
    // Fragments after the first carry no transport header to read.
    let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    if dst.is_unspecified() {
        return None;
    }
    let ip = Ip {
        src: src.into(),
        dst: dst.into(),
        protocol: packet[9],
        packet: &packet[..total],
        payload: &packet[header_len..total],
    };
    if dst.is_multicast() || dst.is_broadcast() {
        return inspect_group(&ip);
    }
    inspect_transport(&ip)
}

fn inspect_v6(packet: &[u8]) -> Option<Inspection> {
    if packet.len() < 40 {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
    if packet.len() < 40 + payload_len {
        return None;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[8..24]).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?);
    if dst.is_unspecified() {
        return None;
    }
    let ip = Ip {
        src: src.into(),
        dst: dst.into(),
        protocol: packet[6],
        packet: &packet[..40 + payload_len],
        payload: &packet[40..40 + payload_len],
    };
    if dst.is_multicast() {
        return inspect_group(&ip);
    }
    inspect_transport(&ip)
}

/// A packet to a multicast or broadcast address. A datagram (mDNS, SSDP, a LAN broadcast)
/// is an attempt, but gets no answer: ICMP errors are never sent about group traffic. The
/// rest (IGMP, ICMPv6 neighbour discovery and listener reports) is the kernel's own.
fn inspect_group(ip: &Ip<'_>) -> Option<Inspection> {
    if ip.protocol != UDP || ip.payload.len() < 8 {
        return None;
    }
    let port = u16::from_be_bytes([ip.payload[2], ip.payload[3]]);
    Some(Inspection {
        attempt: Some(Attempt {
            transport: Transport::Udp,
            destination: ip.dst,
            port: Some(port),
            protocol: UDP,
            name: None,
            suppressed: 0,
        }),
        reply: None,
    })
}

fn inspect_transport(ip: &Ip<'_>) -> Option<Inspection> {
    let attempt = |transport, port, name| Attempt {
        transport,
        destination: ip.dst,
        port,
        protocol: ip.protocol,
        name,
        suppressed: 0,
    };
    match ip.protocol {
        TCP => {
            let tcp = ip.payload;
            if tcp.len() < 20 {
                return None;
            }
            let src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
            let dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
            let data_offset = usize::from(tcp[12] >> 4) * 4;
            let flags = tcp[13];
            if flags & TCP_RST != 0 || data_offset < 20 || data_offset > tcp.len() {
                return None;
            }
            let data_len = u32::try_from(tcp.len() - data_offset).ok()?;
            let (reply_seq, reply_ack, reply_flags) = if flags & TCP_ACK != 0 {
                (ack, 0, TCP_RST)
            } else {
                let consumed =
                    data_len + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
                (0, seq.wrapping_add(consumed), TCP_RST | TCP_ACK)
            };
            let reply = tcp_reset(ip, dst_port, src_port, reply_seq, reply_ack, reply_flags);
            // Only the opening SYN is an attempt; the rest of a refused exchange is noise.
            let opening = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
            let dns = (dst_port == 53)
                .then(|| tcp.get(data_offset + 2..).and_then(dns_question))
                .flatten();
            Some(Inspection {
                attempt: opening.then(|| match dns {
                    Some(name) => attempt(Transport::Dns, Some(dst_port), Some(name)),
                    None => attempt(Transport::Tcp, Some(dst_port), None),
                }),
                reply: Some(reply),
            })
        }
        UDP => {
            let udp = ip.payload;
            if udp.len() < 8 {
                return None;
            }
            let dst_port = u16::from_be_bytes([udp[2], udp[3]]);
            let name = if dst_port == 53 {
                dns_question(&udp[8..])
            } else {
                None
            };
            let transport = if name.is_some() {
                Transport::Dns
            } else {
                Transport::Udp
            };
            Some(Inspection {
                attempt: Some(attempt(transport, Some(dst_port), name)),
                reply: Some(icmp_prohibited(ip)),
            })
        }
        ICMP => {
            // Echo requests are attempts; anything else (errors, replies) is not answered.
            (ip.payload.first() == Some(&8)).then(|| Inspection {
                attempt: Some(attempt(Transport::Icmp, None, None)),
                reply: Some(icmp_prohibited(ip)),
            })
        }
        ICMPV6 => (ip.payload.first() == Some(&128)).then(|| Inspection {
            attempt: Some(attempt(Transport::Icmp, None, None)),
            reply: Some(icmp_prohibited(ip)),
        }),
        // Extension headers and other protocols: audited, answered with ICMP.
        other => Some(Inspection {
            attempt: Some(Attempt {
                transport: Transport::Ip,
                destination: ip.dst,
                port: None,
                protocol: other,
                name: None,
                suppressed: 0,
            }),
            reply: Some(icmp_prohibited(ip)),
        }),
    }
}

/// The first question's name of a DNS query, or `None` if this is not one.
fn dns_question(message: &[u8]) -> Option<String> {
    // Header: 12 bytes; QR must be 0 (a query) and QDCOUNT at least 1.
    if message.len() < 12 || message[2] & 0x80 != 0 {
        return None;
    }
    if u16::from_be_bytes([message[4], message[5]]) == 0 {
        return None;
    }
    let mut name = String::new();
    let mut at = 12;
    loop {
        let len = usize::from(*message.get(at)?);
        if len == 0 {
            break;
        }
        // Compression pointers are not used in a query's first question.
        if len > 63 {
            return None;
        }
        let label = message.get(at + 1..at + 1 + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        for &byte in label {
            if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
                name.push(char::from(byte));
            } else {
                name.push_str(&format!("\\x{byte:02x}"));
            }
        }
        if name.len() > MAX_NAME {
            name.truncate(MAX_NAME);
            name.push('…');
            return Some(name);
        }
        at += 1 + len;
    }
    if name.is_empty() {
        name.push('.');
    }
    Some(name)
}

/// One's-complement sum of 16-bit words, as the IP family's checksums use it.
fn sum16(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        acc += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    #[allow(clippy::cast_possible_truncation)]
    let folded = acc as u16;
    !folded
}

/// The transport checksum over the pseudo-header and `segment`.
fn transport_checksum(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> u16 {
    let len = u32::try_from(segment.len()).unwrap_or(u32::MAX);
    let mut acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let acc = sum16(sum16(0, &s.octets()), &d.octets());
            acc + u32::from(protocol) + len
        }
        (s, d) => {
            let octets = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            let acc = sum16(sum16(0, &octets(s)), &octets(d));
            acc + (len >> 16) + (len & 0xffff) + u32::from(protocol)
        }
    };
    acc = sum16(acc, segment);
    fold(acc)
}

/// Wraps a transport segment in an IP header from `src` to `dst`.
fn ip_packet(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(20 + segment.len()).unwrap_or(u16::MAX);
            let mut header = vec![0x45, 0];
            header.extend_from_slice(&total.to_be_bytes());
            header.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
            header.extend_from_slice(&s.octets());
            header.extend_from_slice(&d.octets());
            let checksum = fold(sum16(0, &header));
            header[10..12].copy_from_slice(&checksum.to_be_bytes());
            header.extend_from_slice(segment);
            header
        }
        (s, d) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let len = u16::try_from(segment.len()).unwrap_or(u16::MAX);
            let mut header = vec![0x60, 0, 0, 0];
            header.extend_from_slice(&len.to_be_bytes());
            header.extend_from_slice(&[protocol, 64]);
            header.extend_from_slice(&v6(s).octets());
            header.extend_from_slice(&v6(d).octets());
            header.extend_from_slice(segment);
            header
        }
    }
}

/// A reset from the destination back to the bottle: `connect()` fails with
/// `ECONNREFUSED` at once.
fn tcp_reset(ip: &Ip<'_>, src_port: u16, dst_port: u16, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&src_port.to_be_bytes());
    tcp.extend_from_slice(&dst_port.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags, 0, 0, 0, 0, 0, 0]);
    let checksum = transport_checksum(ip.dst, ip.src, TCP, &tcp);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
    ip_packet(ip.dst, ip.src, TCP, &tcp)
}

/// "Communication administratively prohibited", quoting the offending packet as ICMP
/// errors must. It comes from the destination itself: the kernel drops a packet that
/// arrives with one of its own addresses as the source (a martian).
fn icmp_prohibited(ip: &Ip<'_>) -> Vec<u8> {
    match (ip.src, ip.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            // Type 3 (unreachable), code 13 (administratively prohibited); quote the IP
            // header and the first 8 bytes of what it carried.
            let quote_len = ip.packet.len().min(ip.packet.len() - ip.payload.len() + 8);
            let mut icmp = vec![3, 13, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(&ip.packet[..quote_len]);
            let checksum = fold(sum16(0, &icmp));
            icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
            ip_packet(ip.dst, ip.src, ICMP, &icmp)
        }
        _ => {
            // Type 1 (unreachable), code 1 (administratively prohibited); the quote may
            // fill the minimum IPv6 MTU.
            let quote_len = ip.packet.len().min(1280 - 48);
            let mut icmp = vec![1, 1, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(&ip.packet[..quote_len]);
            let checksum = transport_checksum(ip.dst, ip.src, ICMPV6, &icmp);
            icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
            ip_packet(ip.dst, ip.src, ICMPV6, &icmp)
        }
    }
}

/// Keeps a flood of attempts from flooding the audit log: an attempt identical to one
/// recorded in the last [`Limiter::window`] is counted instead of sent, and at most
/// [`Limiter::per_second`] distinct attempts are sent per second. The next attempt that
/// is sent carries the count of those held back, so nothing is lost without a trace.
#[derive(Debug)]
pub struct Limiter {
    window: Duration,
    per_second: u32,
    recent: HashMap<(Transport, IpAddr, Option<u16>, Option<String>), Instant>,
    second: Option<Instant>,
    sent_this_second: u32,
    held_back: u64,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new(Duration::from_secs(5), 20)
    }
}

impl Limiter {
    #[must_use]
    pub fn new(window: Duration, per_second: u32) -> Self {
        Limiter {
            window,
            per_second,
            recent: HashMap::new(),
            second: None,
            sent_this_second: 0,
            held_back: 0,
        }
    }

    /// The attempt to send now (with the count held back since the last one), or `None`.
    pub fn admit(&mut self, mut attempt: Attempt, now: Instant) -> Option<Attempt> {
        if self
            .second
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1))
        {
            self.second = Some(now);
            self.sent_this_second = 0;
        }
        let window = self.window;
        self.recent.retain(|_, at| now.duration_since(*at) < window);
        let key = (
            attempt.transport,
            attempt.destination,
            attempt.port,
            attempt.name.clone(),
        );
        if self.recent.contains_key(&key) || self.sent_this_second >= self.per_second {
            self.held_back += 1;
            return None;
        }
        self.recent.insert(key, now);
        self.sent_this_second += 1;
        attempt.suppressed = std::mem::take(&mut self.held_back);
        Some(attempt)
    }

    /// Attempts held back and not yet reported with a later one.
    #[must_use]
    pub fn held_back(&self) -> u64 {
        self.held_back
    }

    /// Takes the count of held-back attempts, to report on its own.
    pub fn take_held_back(&mut self) -> u64 {
        std::mem::take(&mut self.held_back)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTTLE_V4: Ipv4Addr = TRIPWIRE_V4;

    fn v4(dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> Vec<u8> {
        ip_packet(BOTTLE_V4.into(), dst.into(), protocol, segment)
    }

    fn tcp_segment(src: IpAddr, dst: IpAddr, dst_port: u16, seq: u32, flags: u8) -> Vec<u8> {
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&40000u16.to_be_bytes());
        tcp.extend_from_slice(&dst_port.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&0u32.to_be_bytes());
        tcp.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        let checksum = transport_checksum(src, dst, TCP, &tcp);
        tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
        tcp
    }

    fn dns_query(name: &str) -> Vec<u8> {
        let mut msg = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            msg.push(u8::try_from(label.len()).unwrap());
            msg.extend_from_slice(label.as_bytes());
        }
        msg.extend_from_slice(&[0, 0, 1, 0, 1]);
        msg
    }

    fn udp_segment(dst_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut udp = Vec::new();
        udp.extend_from_slice(&5353u16.to_be_bytes());
        udp.extend_from_slice(&dst_port.to_be_bytes());
        udp.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        udp
    }

    /// A valid checksum sums (with the field in place) to zero.
    fn checksum_ok(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> bool {
        transport_checksum(src, dst, protocol, segment) == 0
    }

    #[test]
    fn a_syn_is_an_attempt_answered_by_a_valid_reset() {
        let dst = Ipv4Addr::new(192, 0, 2, 1);
        let syn = tcp_segment(BOTTLE_V4.into(), dst.into(), 443, 1000, TCP_SYN);
        let seen = inspect(&v4(dst, TCP, &syn));
        let attempt = seen.attempt.unwrap();
        assert_eq!(attempt.transport, Transport::Tcp);
        assert_eq!(attempt.destination, IpAddr::from(dst));
        assert_eq!(attempt.port, Some(443));
        let reply = seen.reply.unwrap();
        assert_eq!(reply[0], 0x45);
        assert_eq!(fold(sum16(0, &reply[..20])), 0, "IPv4 header checksum");
        assert_eq!(&reply[12..16], &dst.octets(), "from the destination");
        let tcp = &reply[20..];
        assert!(checksum_ok(dst.into(), BOTTLE_V4.into(), TCP, tcp));
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 443);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
        assert_eq!(tcp[13], TCP_RST | TCP_ACK);
        assert_eq!(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 1001);
    }

    #[test]
    fn later_segments_are_reset_but_not_audited() {
        let dst = Ipv4Addr::new(192, 0, 2, 1);
        let ack = tcp_segment(BOTTLE_V4.into(), dst.into(), 443, 5, TCP_ACK);
        let seen = inspect(&v4(dst, TCP, &ack));
        assert_eq!(seen.attempt, None);
        assert_eq!(seen.reply.unwrap()[20 + 13], TCP_RST);
        let rst = tcp_segment(BOTTLE_V4.into(), dst.into(), 443, 5, TCP_RST);
        assert_eq!(inspect(&v4(dst, TCP, &rst)), Inspection::default());
    }

    #[test]
    fn a_dns_query_is_audited_by_name() {
        let resolver = Ipv4Addr::new(10, 255, 255, 53);
        let packet = v4(
            resolver,
            UDP,
            &udp_segment(53, &dns_query("leak.example.com")),
        );
        let seen = inspect(&packet);
        let attempt = seen.attempt.unwrap();
        assert_eq!(attempt.transport, Transport::Dns);
        assert_eq!(attempt.name.as_deref(), Some("leak.example.com"));
        assert_eq!(attempt.port, Some(53));
        let reply = seen.reply.unwrap();
        assert_eq!(&reply[12..16], &resolver.octets());
        assert_eq!(reply[9], ICMP);
        assert_eq!(&reply[20..22], &[3, 13]);
        assert_eq!(fold(sum16(0, &reply[20..])), 0, "ICMP checksum");
        assert_eq!(&reply[28..48], &packet[..20], "quotes the offending header");
    }

    #[test]
    fn dns_names_with_odd_bytes_are_escaped_and_bounded() {
        let mut query = dns_query("a.b");
        query[13] = b'\n';
        assert_eq!(dns_question(&query).as_deref(), Some("\\x0a.b"));
        let long = vec!["x".repeat(63); 8].join(".");
        let name = dns_question(&dns_query(&long)).unwrap();
        assert!(name.len() <= MAX_NAME + '…'.len_utf8());
        let mut response = dns_query("a.b");
        response[2] |= 0x80;
        assert_eq!(dns_question(&response), None);
    }

    #[test]
    fn other_udp_and_ping_are_attempts() {
        let dst = Ipv4Addr::new(192, 0, 2, 9);
        let udp = inspect(&v4(dst, UDP, &udp_segment(9, b"x")))
            .attempt
            .unwrap();
        assert_eq!((udp.transport, udp.port), (Transport::Udp, Some(9)));
        let echo = [8, 0, 0xf7, 0xff, 0, 0, 0, 0];
        let ping = inspect(&v4(dst, ICMP, &echo));
        assert_eq!(ping.attempt.unwrap().transport, Transport::Icmp);
        let echo_reply = [0, 0, 0xff, 0xff, 0, 0, 0, 0];
        assert_eq!(inspect(&v4(dst, ICMP, &echo_reply)), Inspection::default());
        let gre = inspect(&v4(dst, 47, &[0; 8])).attempt.unwrap();
        assert_eq!((gre.transport, gre.protocol), (Transport::Ip, 47));
        let broadcast = inspect(&v4(Ipv4Addr::BROADCAST, UDP, &udp_segment(67, b"x")));
        assert_eq!(broadcast.attempt.unwrap().port, Some(67));
        assert_eq!(broadcast.reply, None);
        let igmp = v4(Ipv4Addr::new(224, 0, 0, 22), 2, &[0x22; 8]);
        assert_eq!(inspect(&igmp), Inspection::default(), "the kernel's own");
    }

    #[test]
    fn ipv6_syn_gets_a_reset_and_neighbour_discovery_is_ignored() {
        let src: IpAddr = TRIPWIRE_V6.into();
        let dst: IpAddr = "2001:db8::1".parse().unwrap();
        let syn = tcp_segment(src, dst, 80, 7, TCP_SYN);
        let seen = inspect(&ip_packet(src, dst, TCP, &syn));
        assert_eq!(seen.attempt.unwrap().destination, dst);
        let reply = seen.reply.unwrap();
        assert_eq!(reply[0] >> 4, 6);
        assert!(checksum_ok(dst, src, TCP, &reply[40..]));
        assert_eq!(reply[40 + 13], TCP_RST | TCP_ACK);

        let solicit: IpAddr = "ff02::2".parse().unwrap();
        let rs = [133, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            inspect(&ip_packet(src, solicit, ICMPV6, &rs)),
            Inspection::default()
        );
        let mdns: IpAddr = "ff02::fb".parse().unwrap();
        let seen = inspect(&ip_packet(src, mdns, UDP, &udp_segment(5353, b"q")));
        assert_eq!(seen.attempt.unwrap().destination, mdns);
        assert_eq!(seen.reply, None, "no ICMP error about group traffic");
        let echo = inspect(&ip_packet(src, dst, ICMPV6, &[128, 0, 0, 0, 0, 0, 0, 0]));
        let reply = echo.reply.unwrap();
        assert!(checksum_ok(dst, src, ICMPV6, &reply[40..]));
        assert_eq!(&reply[40..42], &[1, 1]);
    }

    #[test]
    fn no_input_makes_it_panic() {
        // A small xorshift: deterministic, no dependency.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let dst = Ipv4Addr::new(192, 0, 2, 1);
        let seeds = [
            v4(
                dst,
                TCP,
                &tcp_segment(BOTTLE_V4.into(), dst.into(), 1, 1, TCP_SYN),
            ),
            v4(dst, UDP, &udp_segment(53, &dns_query("x.y"))),
            ip_packet(
                TRIPWIRE_V6.into(),
                "2001:db8::1".parse().unwrap(),
                UDP,
                &udp_segment(53, &dns_query("x.y")),
            ),
        ];
        for round in 0..20_000 {
            let mut packet = seeds[round % seeds.len()].clone();
            let flips = next() % 6;
            for _ in 0..flips {
                let at = usize::try_from(next() % packet.len() as u64).unwrap();
                packet[at] = u8::try_from(next() & 0xff).unwrap();
            }
            packet.truncate(usize::try_from(next() % (packet.len() as u64 + 1)).unwrap());
            let _ = inspect(&packet);
        }
    }

    #[test]
    fn the_limiter_counts_what_it_holds_back() {
        let start = Instant::now();
        let mut limiter = Limiter::new(Duration::from_secs(5), 2);
        let attempt = |port| Attempt {
            transport: Transport::Udp,
            destination: Ipv4Addr::new(192, 0, 2, 1).into(),
            port: Some(port),
            protocol: UDP,
            name: None,
            suppressed: 0,
        };
        assert!(limiter.admit(attempt(1), start).is_some());
        assert!(limiter.admit(attempt(1), start).is_none(), "a repeat");
        let second = limiter.admit(attempt(2), start).unwrap();
        assert_eq!(second.suppressed, 1, "carries the repeat's count");
        assert!(limiter.admit(attempt(3), start).is_none(), "over the rate");
        assert!(limiter.admit(attempt(4), start).is_none(), "over the rate");
        assert_eq!(limiter.held_back(), 2);
        let later = start + Duration::from_secs(6);
        let sent = limiter.admit(attempt(1), later).unwrap();
        assert_eq!(sent.suppressed, 2);
        assert!(limiter.admit(attempt(1), later).is_none());
        assert_eq!(limiter.take_held_back(), 1);
        assert_eq!(limiter.held_back(), 0);
        assert_eq!(limiter.held_back(), 0);
    }
}
