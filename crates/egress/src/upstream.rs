//! Choosing and reaching an upstream address: the override map, our own DNS resolution,
//! and the refusal of loopback, private, link-local, CGNAT and metadata addresses.
//!
//! The gateway resolves names itself and connects to the address it checked, so a name
//! that resolves to a public address for the check and a private one for the connect
//! (DNS rebinding) cannot slip through.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpstreamError {
    /// The loopback-only guard (tests) refused a non-loopback address.
    NotLoopback(IpAddr),
    /// A private, loopback, link-local, CGNAT or metadata address, not allowed by a rule.
    Private(IpAddr),
    Resolve(String),
    Connect(String),
}

impl UpstreamError {
    /// The reason name for the block header and the audit log.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            UpstreamError::NotLoopback(_) => "upstream-not-loopback",
            UpstreamError::Private(_) => "private-upstream",
            UpstreamError::Resolve(_) => "upstream-dns-failed",
            UpstreamError::Connect(_) => "upstream-unreachable",
        }
    }

    /// Refusals are policy blocks (403); the rest are gateway errors (502).
    pub(crate) fn is_refusal(&self) -> bool {
        matches!(
            self,
            UpstreamError::NotLoopback(_) | UpstreamError::Private(_)
        )
    }

    pub(crate) fn detail(&self) -> String {
        match self {
            UpstreamError::NotLoopback(ip) => format!("{ip} is not loopback"),
            UpstreamError::Private(ip) => format!("{ip} is a private or special address"),
            UpstreamError::Resolve(m) | UpstreamError::Connect(m) => m.clone(),
        }
    }
}

pub(crate) struct Resolver<'a> {
    pub overrides: &'a HashMap<String, SocketAddr>,
    pub loopback_only: bool,
    pub allow_private: bool,
}

impl Resolver<'_> {
    /// Candidate addresses for `host:port`, already checked.
    pub(crate) async fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, UpstreamError> {
        let host_key = host.trim_end_matches('.').to_ascii_lowercase();
        let overridden = self
            .overrides
            .get(&format!("{host_key}:{port}"))
            .or_else(|| self.overrides.get(&host_key))
            .copied();
        let candidates: Vec<SocketAddr> = match overridden {
            Some(addr) => vec![addr],
            None => {
                let bare = host_key.trim_start_matches('[').trim_end_matches(']');
                tokio::net::lookup_host((bare, port))
                    .await
                    .map_err(|err| {
                        UpstreamError::Resolve(format!("cannot resolve `{host}`: {err}"))
                    })?
                    .collect()
            }
        };
        if candidates.is_empty() {
            return Err(UpstreamError::Resolve(format!("`{host}` has no addresses")));
        }
        let mut allowed = Vec::new();
        let mut first_refusal = None;
        for addr in candidates {
            let ip = canonical(addr.ip());
            // The private check comes first so that a test (loopback guard on) sees the
            // refusal a real gateway gives; an address must pass both.
            let refusal = if overridden.is_none() && !self.allow_private && is_special(ip) {
                // The override map is configuration from the launching process, not
                // something the agent controls, so only resolved names are checked.
                Some(UpstreamError::Private(ip))
            } else if self.loopback_only && !ip.is_loopback() {
                Some(UpstreamError::NotLoopback(ip))
            } else {
                None
            };
            match refusal {
                Some(r) => {
                    first_refusal.get_or_insert(r);
                }
                None => allowed.push(addr),
            }
        }
        // One refused address refuses the name: a name mixing public and private
        // addresses is how rebinding attacks are staged.
        if let Some(refusal) = first_refusal {
            return Err(refusal);
        }
        Ok(allowed)
    }

    pub(crate) async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, UpstreamError> {
        let addrs = self.resolve(host, port).await?;
        let mut last = String::new();
        for addr in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Ok(Err(err)) => last = format!("cannot connect to `{host}` at {addr}: {err}"),
                Err(_) => last = format!("connecting to `{host}` at {addr} timed out"),
            }
        }
        Err(UpstreamError::Connect(last))
    }
}

/// Maps IPv4-mapped IPv6 addresses to IPv4, which is where the kernel connects them.
/// Other forms that embed an IPv4 address reach it through a translator or a relay, so
/// they stay IPv6 (the loopback guard must not take `2002:7f00:1::` for loopback) and
/// [`is_special`] judges them by the address they embed.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        IpAddr::V4(_) => ip,
    }
}

/// Loopback, private, link-local (which holds the cloud metadata address), CGNAT,
/// unspecified, multicast, reserved, benchmarking and documentation ranges; and an IPv6
/// address that embeds an IPv4 address in one of them (see [`embedded_v4`]).
pub(crate) fn is_special(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_special_v4(v4),
        IpAddr::V6(v6) => is_special_v6(v6) || embedded_v4(v6).iter().any(|&v4| is_special_v4(v4)),
    }
}

fn v4_of(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))
}

/// The IPv4 addresses an IPv6 address carries, for the forms a translator or relay
/// turns into IPv4 traffic:
/// - IPv4-mapped `::ffff:a.b.c.d` and IPv4-compatible `::a.b.c.d` (deprecated, but
///   some stacks still map it),
/// - SIIT `::ffff:0:a.b.c.d` (RFC 6145/7915),
/// - NAT64 `64:ff9b::a.b.c.d` (RFC 6052; the local-use `64:ff9b:1::/48` is refused
///   whole by [`is_special_v6`], since where its IPv4 sits depends on the operator),
/// - Teredo `2001:0::/32` (RFC 4380): the server in bits 32..64 and the client, the
///   last 32 bits XOR `0xffffffff`; both are returned,
/// - 6to4 `2002::/16` (RFC 3056): bits 16..48.
fn embedded_v4(ip: Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = ip.segments();
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] // mapped
        | [0, 0, 0, 0, 0xffff, 0, hi, lo] // SIIT
        | [0, 0, 0, 0, 0, 0, hi, lo] // compatible (also :: and ::1, special anyway)
        | [0x0064, 0xff9b, 0, 0, 0, 0, hi, lo] => vec![v4_of(hi, lo)],
        [0x2001, 0, server_hi, server_lo, _, _, client_hi, client_lo] => vec![
            v4_of(server_hi, server_lo),
            v4_of(!client_hi, !client_lo),
        ],
        [0x2002, hi, lo, ..] => vec![v4_of(hi, lo)],
        _ => Vec::new(),
    }
}

fn is_special_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn is_special_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local (holds fd00:ec2::254, a metadata address)
        || (seg[0] & 0xffc0) == 0xfe80 // link-local
        || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        || (seg[0] == 0x3fff && seg[1] < 0x1000) // documentation 3fff::/20
        || (seg[0] == 0x0100 && seg[1..4] == [0, 0, 0]) // discard-only 100::/64
        || (seg[0] == 0x0064 && seg[1] == 0xff9b && seg[2] == 0x0001) // local-use NAT64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_ranges() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:0101::1",
        ] {
            assert!(is_special(s.parse().expect("ip")), "{s} should be special");
        }
        // IPv6 forms that embed an IPv4 address are judged by the address they embed.
        for s in [
            // IPv4-compatible (deprecated), ::/96
            "::127.0.0.1",
            "::10.0.0.1",
            "::169.254.169.254",
            "::a9fe:a9fe",
            // SIIT, ::ffff:0:0/96
            "::ffff:0:127.0.0.1",
            "::ffff:0:192.168.0.1",
            "::ffff:0:a9fe:a9fe",
            // NAT64 well-known prefix, and all of the local-use 64:ff9b:1::/48
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.1.2.3",
            "64:ff9b:1::808:808",
            "64:ff9b:1:ffff::1",
            // Teredo: server in bits 32..64, client = last 32 bits XOR 0xffffffff
            "2001:0:4136:e378:8000:63bf:3fff:fdd2", // server 65.54.227.120, client 192.0.2.45
            "2001:0:4136:e378:8000:63bf:80ff:fffe", // client 127.0.0.1
            "2001:0:4136:e378:8000:63bf:f5ff:fffe", // client 10.0.0.1
            "2001:0:a00:1::1",                      // server 10.0.0.1
            // 6to4
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::1",
            // discard-only, documentation (RFC 9637)
            "100::1",
            "3fff::1",
        ] {
            assert!(is_special(s.parse().expect("ip")), "{s} should be special");
        }
        for s in [
            "93.184.216.34",
            "100.128.0.1",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "::8.8.8.8",
            "::ffff:0:8.8.8.8",
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7", // client 8.8.8.8
            "2002:808:808::1",
            "2001:4860:4860::8888",
            "3fff:1000::1",
        ] {
            assert!(!is_special(s.parse().expect("ip")), "{s} should be public");
        }
    }

    #[tokio::test]
    async fn guards() {
        let mut overrides = HashMap::new();
        overrides.insert(
            "origin.test".to_string(),
            "127.0.0.1:9".parse().expect("addr"),
        );
        overrides.insert(
            "far.test".to_string(),
            "192.0.2.1:443".parse().expect("addr"),
        );
        let resolver = Resolver {
            overrides: &overrides,
            loopback_only: true,
            allow_private: false,
        };
        assert_eq!(
            resolver.resolve("Origin.Test.", 443).await,
            Ok(vec!["127.0.0.1:9".parse().expect("addr")])
        );
        assert_eq!(
            resolver.resolve("far.test", 443).await,
            Err(UpstreamError::NotLoopback("192.0.2.1".parse().expect("ip")))
        );
        let open = Resolver {
            overrides: &overrides,
            loopback_only: false,
            allow_private: false,
        };
        assert_eq!(
            open.resolve("127.0.0.1", 80).await,
            Err(UpstreamError::Private("127.0.0.1".parse().expect("ip")))
        );
        assert_eq!(
            open.resolve("::1", 80).await,
            Err(UpstreamError::Private("::1".parse().expect("ip")))
        );
        assert_eq!(
            open.resolve("::ffff:0:127.0.0.1", 80).await,
            Err(UpstreamError::Private(
                "::ffff:0:127.0.0.1".parse().expect("ip")
            ))
        );
        // The private check comes before the loopback-only guard, so a test sees the
        // refusal a real gateway would give; both refuse.
        assert_eq!(
            resolver.resolve("::127.0.0.1", 80).await,
            Err(UpstreamError::Private("::127.0.0.1".parse().expect("ip")))
        );
        assert_eq!(
            resolver.resolve("2002:7f00:1::1", 80).await,
            Err(UpstreamError::Private(
                "2002:7f00:1::1".parse().expect("ip")
            ))
        );
        let allowed = Resolver {
            overrides: &overrides,
            loopback_only: false,
            allow_private: true,
        };
        assert_eq!(
            allowed.resolve("127.0.0.1", 80).await,
            Ok(vec!["127.0.0.1:80".parse().expect("addr")])
        );
    }
}
