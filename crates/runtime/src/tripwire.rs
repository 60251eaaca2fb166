//! The tripwire's two halves.
//!
//! In a small container of its own (`bot-bottle tripwire`, hidden), root with only
//! `CAP_NET_ADMIN`, the tripwire owns the network namespace the bottle joins. It creates a
//! TUN device, makes it the default route for IPv4 and IPv6, and then reads every packet
//! that tries to leave. [`bot_bottle_egress::tripwire::inspect`] decides the refusal to
//! write back and the attempt to report; reports go over a Unix socket that only the
//! tripwire container mounts (never the bottle), to [`Listener`] on the host, which hands
//! them to the gateway's audit log.
//!
//! Nothing here forwards a packet: the device's only other end is this process.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bot_bottle_egress::AttemptRecorder;
use bot_bottle_egress::tripwire::{self, Limiter, Report};

/// The socket's file name in `state/<slug>/tripwire/`.
pub const TRIPWIRE_SOCKET: &str = "tripwire.sock";
/// Where the tripwire container mounts `state/<slug>/tripwire/`.
pub const TRIPWIRE_RUN_DIR: &str = "/run/bot-bottle-tripwire";
/// Reports longer than this are not the tripwire's; the host stops reading.
const MAX_REPORT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TripwireError {
    #[error("cannot reach the gateway's tripwire socket `{path}`")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot set up the tripwire device: {step}\nhint: the tripwire needs `/dev/net/tun` and CAP_NET_ADMIN in its container; set BOT_BOTTLE_TRIPWIRE=off to run bottles without it (direct attempts still fail, but are not audited)"
    )]
    Device {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tripwire i/o failed")]
    Io(#[from] std::io::Error),
}

/// Runs the in-container half until the host closes the socket.
///
/// # Errors
/// The socket cannot be reached, or the device cannot be set up.
pub fn run(socket: &Path) -> Result<(), TripwireError> {
    let mut host = UnixStream::connect(socket).map_err(|source| TripwireError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    let device = sys::create_device(tripwire::TRIPWIRE_DEVICE)?;
    let ipv6 = sys::configure(tripwire::TRIPWIRE_DEVICE);
    let ready = match ipv6 {
        Ok(()) => Report::Ready {
            ipv6: true,
            detail: None,
        },
        Err(TripwireError::Device { step, source }) if step.starts_with("ipv6") => Report::Ready {
            ipv6: false,
            detail: Some(format!("{step}: {source}")),
        },
        Err(err) => return Err(err),
    };
    send(&mut host, &ready)?;

    let mut limiter = Limiter::default();
    let mut packet = vec![0u8; 65_536];
    let mut tun = std::fs::File::from(device);
    loop {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let (tun_ready, host_ready) = {
            let mut fds = [
                PollFd::new(tun.as_fd(), PollFlags::POLLIN),
                PollFd::new(host.as_fd(), PollFlags::POLLIN),
            ];
            // A quiet second flushes what the limiter held back.
            poll(&mut fds, PollTimeout::from(1000u16)).map_err(std::io::Error::from)?;
            let any = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (any(&fds[0]), any(&fds[1]))
        };
        if host_ready {
            // The host never writes; readable means closed: the session is over. Its
            // side is only shut for writing, so the last count still reaches it.
            let mut byte = [0u8; 1];
            if matches!(host.read(&mut byte), Ok(0) | Err(_)) {
                flush_held_back(&mut host, &mut limiter)?;
                // Closed here, before the device: at exit the kernel releases files in
                // reverse order, and tearing the device down takes it ~20 ms, which the
                // host would otherwise wait out for its end of file.
                drop(host);
                return Ok(());
            }
        }
        if !tun_ready {
            flush_held_back(&mut host, &mut limiter)?;
            continue;
        }
        let len = tun.read(&mut packet)?;
        let seen = tripwire::inspect(&packet[..len]);
        if let Some(reply) = seen.reply {
            // A refusal that cannot be written only makes the tool wait for its timeout.
            let _ = tun.write_all(&reply);
        }
        if let Some(attempt) = seen.attempt
            && let Some(attempt) = limiter.admit(attempt, Instant::now())
        {
            send(&mut host, &Report::Attempt(attempt))?;
        }
    }
}

fn flush_held_back(host: &mut UnixStream, limiter: &mut Limiter) -> Result<(), TripwireError> {
    match limiter.take_held_back() {
        0 => Ok(()),
        count => send(host, &Report::HeldBack { count }),
    }
}

fn send(host: &mut UnixStream, report: &Report) -> Result<(), TripwireError> {
    let mut line = serde_json::to_vec(report).map_err(std::io::Error::other)?;
    line.push(b'\n');
    host.write_all(&line)?;
    Ok(())
}

/// The host half: the socket the tripwire container connects to.
#[derive(Debug)]
pub struct Listener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

/// What the tripwire said once its device was up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub ipv6: bool,
    pub detail: Option<String>,
}

impl Listener {
    /// Binds `dir/tripwire.sock`, replacing a stale one from a crashed session.
    ///
    /// # Errors
    /// The socket cannot be bound or opened to the tripwire's uid.
    pub fn bind(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        // Root in the tripwire container has no CAP_DAC_OVERRIDE: the mounted directory
        // and the socket must be open to it. The state directory above stays private.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let path = dir.join(TRIPWIRE_SOCKET);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
        let listener = tokio::net::UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
        Ok(Listener { listener, path })
    }

    /// Accepts the tripwire's one connection, waits for its ready report, and then
    /// records its attempts on a task of their own until [`Reports::finish`].
    ///
    /// # Errors
    /// The tripwire closed the connection or said something else before it was ready.
    pub async fn accept(self, recorder: AttemptRecorder) -> std::io::Result<(Ready, Reports)> {
        let (stream, _) = self.listener.accept().await?;
        // One tripwire per session: nothing else is let in.
        drop(self.listener);
        let _ = std::fs::remove_file(&self.path);
        let std_stream = stream.into_std()?;
        std_stream.set_nonblocking(false)?;
        let control = std_stream.try_clone()?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::task::spawn_blocking(move || {
            let mut reader = BufReader::new(std_stream).take(u64::MAX);
            let mut ready_tx = Some(ready_tx);
            let mut line = Vec::new();
            loop {
                line.clear();
                reader.set_limit(MAX_REPORT as u64);
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if !line.ends_with(b"\n") => {
                        tracing::warn!("tripwire report over {MAX_REPORT} bytes; closing");
                        return;
                    }
                    Ok(_) => {}
                }
                match serde_json::from_slice::<Report>(&line) {
                    Ok(Report::Ready { ipv6, detail }) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(Ready { ipv6, detail });
                        }
                    }
                    Ok(Report::Attempt(attempt)) => recorder.record(&attempt),
                    Ok(Report::HeldBack { count }) => recorder.record_held_back(count),
                    Err(err) => tracing::warn!(error = %err, "unreadable tripwire report"),
                }
            }
        });
        match ready_rx.await {
            Ok(ready) => Ok((ready, Reports { task, control })),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the tripwire disconnected before its device was ready",
            )),
        }
    }
}

/// The flow of a running tripwire's reports into the audit log.
#[derive(Debug)]
pub struct Reports {
    task: tokio::task::JoinHandle<()>,
    control: UnixStream,
}

impl Reports {
    /// Ends the session's tripwire: closing this side makes it exit (and Docker remove
    /// it); what it reported before is read to the end first, so the last attempts are
    /// in the log before the gateway's final line.
    pub async fn finish(self) {
        let _ = self.control.shutdown(std::net::Shutdown::Write);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await;
    }
}

/// The device and its routes: the workspace's only `unsafe`, four kinds of ioctl with
/// structures laid out as the kernel's `<linux/if.h>`, `<linux/route.h>` and
/// `<linux/ipv6_route.h>` declare them.
#[allow(unsafe_code)]
mod sys {
    use std::ffi::CString;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use bot_bottle_egress::tripwire::{TRIPWIRE_V4, TRIPWIRE_V6};

    use super::TripwireError;

    const IFNAMSIZ: usize = 16;

    #[repr(C)]
    struct IfReq {
        name: [u8; IFNAMSIZ],
        data: [u8; 24],
    }

    #[repr(C)]
    struct SockAddr {
        family: u16,
        data: [u8; 14],
    }

    #[repr(C)]
    struct RtEntry {
        pad1: libc::c_ulong,
        dst: SockAddr,
        gateway: SockAddr,
        genmask: SockAddr,
        flags: libc::c_ushort,
        pad2: libc::c_short,
        pad3: libc::c_ulong,
        pad4: *mut libc::c_void,
        metric: libc::c_short,
        dev: *const libc::c_char,
        mtu: libc::c_ulong,
        window: libc::c_ulong,
        irtt: libc::c_ushort,
    }

    #[repr(C)]
    struct In6IfReq {
        addr: [u8; 16],
        prefixlen: u32,
        ifindex: libc::c_int,
    }

    #[repr(C)]
    struct In6RtMsg {
        dst: [u8; 16],
        src: [u8; 16],
        gateway: [u8; 16],
        kind: u32,
        dst_len: u16,
        src_len: u16,
        metric: u32,
        info: libc::c_ulong,
        flags: u32,
        ifindex: libc::c_int,
    }

    fn ifreq(name: &str) -> IfReq {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        let bytes = name.as_bytes();
        req.name[..bytes.len().min(IFNAMSIZ - 1)]
            .copy_from_slice(&bytes[..bytes.len().min(IFNAMSIZ - 1)]);
        req
    }

    fn sockaddr_v4(addr: Ipv4Addr) -> SockAddr {
        let mut data = [0u8; 14];
        data[2..6].copy_from_slice(&addr.octets());
        SockAddr {
            family: u16::try_from(libc::AF_INET).unwrap_or(2),
            data,
        }
    }

    fn device_error(step: &str) -> impl FnOnce(std::io::Error) -> TripwireError + '_ {
        move |source| TripwireError::Device {
            step: step.to_owned(),
            source,
        }
    }

    fn check(result: libc::c_int) -> std::io::Result<()> {
        if result < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn socket(family: libc::c_int) -> std::io::Result<OwnedFd> {
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        check(fd)?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Opens `/dev/net/tun` and attaches a TUN device (IP packets, no extra header).
    pub(super) fn create_device(name: &str) -> Result<OwnedFd, TripwireError> {
        let path = c"/dev/net/tun";
        // SAFETY: open(2) with a valid C string.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        check(fd).map_err(device_error("open /dev/net/tun"))?;
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let device = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(name);
        let flags = i16::try_from(libc::IFF_TUN | libc::IFF_NO_PI).unwrap_or(0);
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is.
        let result = unsafe { libc::ioctl(device.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
        check(result).map_err(device_error("TUNSETIFF"))?;
        Ok(device)
    }

    /// Addresses the device, brings it up and routes everything to it. IPv4 must work;
    /// an IPv6 failure is returned with a step starting `ipv6` so the caller can go on.
    pub(super) fn configure(name: &str) -> Result<(), TripwireError> {
        let v4 = socket(libc::AF_INET).map_err(device_error("socket"))?;
        let mut req = ifreq(name);
        let addr = sockaddr_v4(TRIPWIRE_V4);
        req.data[..2].copy_from_slice(&addr.family.to_ne_bytes());
        req.data[2..16].copy_from_slice(&addr.data);
        // SAFETY: SIOCSIFADDR reads one `struct ifreq`.
        check(unsafe { libc::ioctl(v4.as_raw_fd(), libc::SIOCSIFADDR, &raw mut req) })
            .map_err(device_error("set the IPv4 address"))?;

        let mut req = ifreq(name);
        // SAFETY: SIOCGIFFLAGS fills the flags of one `struct ifreq`.
        check(unsafe { libc::ioctl(v4.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) })
            .map_err(device_error("read the device flags"))?;
        let flags = i16::from_ne_bytes([req.data[0], req.data[1]])
            | i16::try_from(libc::IFF_UP | libc::IFF_RUNNING).unwrap_or(0);
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`.
        check(unsafe { libc::ioctl(v4.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut req) })
            .map_err(device_error("bring the device up"))?;

        let dev = CString::new(name).map_err(|_| TripwireError::Device {
            step: "device name".to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        let mut route = RtEntry {
            pad1: 0,
            dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            gateway: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            flags: libc::RTF_UP,
            pad2: 0,
            pad3: 0,
            pad4: std::ptr::null_mut(),
            metric: 0,
            dev: dev.as_ptr(),
            mtu: 0,
            window: 0,
            irtt: 0,
        };
        // SAFETY: SIOCADDRT reads one `struct rtentry`; `dev` outlives the call.
        check(unsafe { libc::ioctl(v4.as_raw_fd(), libc::SIOCADDRT, &raw mut route) })
            .map_err(device_error("add the IPv4 default route"))?;

        let mut req = ifreq(name);
        // SAFETY: SIOCGIFINDEX fills the index of one `struct ifreq`.
        check(unsafe { libc::ioctl(v4.as_raw_fd(), libc::SIOCGIFINDEX, &raw mut req) })
            .map_err(device_error("read the device index"))?;
        let ifindex =
            libc::c_int::from_ne_bytes([req.data[0], req.data[1], req.data[2], req.data[3]]);

        let v6 = socket(libc::AF_INET6).map_err(device_error("ipv6 socket"))?;
        let mut addr = In6IfReq {
            addr: TRIPWIRE_V6.octets(),
            prefixlen: 128,
            ifindex,
        };
        // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads one `struct in6_ifreq`.
        check(unsafe { libc::ioctl(v6.as_raw_fd(), libc::SIOCSIFADDR, &raw mut addr) })
            .map_err(device_error("ipv6 address"))?;
        let mut route = In6RtMsg {
            dst: Ipv6Addr::UNSPECIFIED.octets(),
            src: Ipv6Addr::UNSPECIFIED.octets(),
            gateway: Ipv6Addr::UNSPECIFIED.octets(),
            kind: 0,
            dst_len: 0,
            src_len: 0,
            metric: 1,
            info: 0,
            flags: u32::from(libc::RTF_UP),
            ifindex,
        };
        // SAFETY: SIOCADDRT on an AF_INET6 socket reads one `struct in6_rtmsg`.
        check(unsafe { libc::ioctl(v6.as_raw_fd(), libc::SIOCADDRT, &raw mut route) })
            .map_err(device_error("ipv6 default route"))?;
        Ok(())
    }
}
