//! Gateway benchmark: small HTTPS GETs (throughput, p50, p99 at concurrency 1 and 32) and
//! 1 MiB downloads, through four paths to the same loopback origin, in one run:
//!
//! - `direct`: HTTPS straight to the origin;
//! - `squid`: squid as a CONNECT tunnel (no interception);
//! - `mitmdump`: mitmproxy intercepting TLS;
//! - `gateway`: this gateway intercepting TLS, with a 20-rule policy and the full gitleaks
//!   DLP rule set, in its own process (so its peak RSS is its own).
//!
//! `cargo bench -p bot-bottle-egress --bench gateway -- [--seconds N] [--big N] [--rounds N]
//! [--skip-others]`, or `scripts/bench-gateway.sh`. Every path is measured `--rounds` times
//! (default 5, `--seconds` 2 per small-GET run): within a round each measurement is taken
//! for every path back to back (direct c=1, gateway c=1, direct c=32, …), so a ratio
//! compares runs a few seconds apart. Ratios are computed per round and printed as the
//! median with the smallest and largest round; the table shows per-path medians. On a
//! shared machine the load drifts, and this keeps the ratios from riding on that drift.
//! Both paths are treated alike: one client process, one keep-alive TLS connection per
//! worker, reused for every request, `TCP_NODELAY` on, the same request headers.
//! `--skip-others` measures only direct and the gateway. Everything listens on 127.0.0.1;
//! nothing leaves the host.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bot_bottle_core::policy::{EgressPolicy, EgressRule};
use bot_bottle_egress::dlp::DlpRules;
use bot_bottle_egress::{GatewayConfig, Listen};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GITLEAKS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/testdata/gitleaks.toml"
);
const SMALL: &[u8] = b"{\"ok\":true,\"id\":\"msg_0123456789\",\"note\":\"small response body\"}";
const BIG_LEN: usize = 1 << 20;

struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "bench origin CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["origin.test".into(), "127.0.0.1".into()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("leaf");
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
    );
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key_der)
    .expect("server config");
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Pki {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
    }
}

async fn origin(server: Arc<rustls::ServerConfig>) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let big = Bytes::from(vec![b'x'; BIG_LEN]);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let big = big.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let body = if req.uri().path() == "/big" {
                        big.clone()
                    } else {
                        Bytes::from_static(SMALL)
                    };
                    async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

#[derive(Clone)]
struct Route {
    proxy: Option<SocketAddr>,
    /// What the client connects (or CONNECTs) to, and names in SNI and Host.
    host: String,
    port: u16,
    roots: Arc<rustls::ClientConfig>,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(route: &Route) -> Sender {
    let target = route
        .proxy
        .unwrap_or_else(|| format!("127.0.0.1:{}", route.port).parse().expect("addr"));
    let mut tcp = tokio::net::TcpStream::connect(target)
        .await
        .expect("connect");
    let _ = tcp.set_nodelay(true);
    if route.proxy.is_some() {
        let authority = format!("{}:{}", route.host, route.port);
        tcp.write_all(
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
        )
        .await
        .expect("CONNECT");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tcp.read_exact(&mut byte).await.expect("CONNECT response");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"),
            "CONNECT refused: {}",
            String::from_utf8_lossy(&head)
        );
    }
    let name = ServerName::try_from(route.host.clone()).expect("server name");
    let tls = tokio_rustls::TlsConnector::from(route.roots.clone())
        .connect(name, tcp)
        .await
        .expect("TLS");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http handshake");
    tokio::spawn(connection);
    sender
}

async fn get(sender: &mut Sender, route: &Route, path: &str) -> usize {
    sender.ready().await.expect("ready");
    let host = if route.port == 443 {
        route.host.clone()
    } else {
        format!("{}:{}", route.host, route.port)
    };
    let request = Request::get(path)
        .header("host", host)
        .header("user-agent", "bot-bottle-bench")
        .body(Empty::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), 200, "{path}");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    body.len()
}

struct SmallResult {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time (user + system) per request of each process in `small`'s `pids`, in µs.
    cpu_us: Vec<f64>,
}

/// User plus system CPU time of a process so far, in clock ticks (`/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second for `/proc` times; 100 on every Linux this runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// `pids`: processes whose CPU time per request is reported (origin, client, proxy).
async fn small(route: &Route, concurrency: usize, seconds: f64, pids: &[u32]) -> SmallResult {
    // Warm-up: one request per connection, not measured.
    let mut senders = Vec::new();
    for _ in 0..concurrency {
        let mut sender = connect(route).await;
        get(&mut sender, route, "/small").await;
        senders.push(sender);
    }
    let ticks_before: Vec<Option<u64>> = pids.iter().map(|&pid| cpu_ticks(pid)).collect();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut sender in senders {
        let route = route.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                get(&mut sender, &route, "/small").await;
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("join"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_us = pids
        .iter()
        .zip(ticks_before)
        .map(|(&pid, before)| match (before, cpu_ticks(pid)) {
            (Some(before), Some(after)) => {
                (after - before) as f64 / TICKS_PER_SECOND * 1e6 / all.len() as f64
            }
            _ => f64::NAN,
        })
        .collect();
    all.sort();
    let pick = |q: f64| {
        let index = ((all.len() as f64 - 1.0) * q).round() as usize;
        all[index].as_secs_f64() * 1000.0
    };
    SmallResult {
        requests_per_second: all.len() as f64 / elapsed,
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        cpu_us,
    }
}

async fn big(route: &Route, count: usize) -> f64 {
    let mut sender = connect(route).await;
    get(&mut sender, route, "/big").await;
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..count {
        bytes += get(&mut sender, route, "/big").await;
    }
    bytes as f64 / (1024.0 * 1024.0) / started.elapsed().as_secs_f64()
}

fn client_config(pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn wait_listening(port: u16, child: &mut Child, what: &str) {
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on {port}");
}

/// Peak resident set of a process, from `/proc/PID/status` (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

struct Proxy {
    name: &'static str,
    child: Child,
    port: u16,
    /// The CA the client must trust through this proxy.
    ca_pem: String,
    /// The host the client CONNECTs to.
    host: String,
}

fn start_squid(dir: &Path) -> Option<Proxy> {
    let squid = which("squid")?;
    let port = free_port();
    let work = dir.join("squid");
    std::fs::create_dir_all(&work).expect("mkdir");
    // squid drops to its own user when started as root; let it write here.
    let _ = Command::new("chmod").args(["777", work.to_str()?]).status();
    let conf = work.join("squid.conf");
    std::fs::write(
        &conf,
        format!(
            "http_port 127.0.0.1:{port}\nacl SSL_ports port 1-65535\nacl CONNECT method CONNECT\nhttp_access allow all\ncache deny all\naccess_log none\ncache_log {log}\npid_filename {pid}\ncoredump_dir {work}\nworkers 1\nshutdown_lifetime 0 seconds\n",
            log = work.join("cache.log").display(),
            pid = work.join("squid.pid").display(),
            work = work.display()
        ),
    )
    .expect("squid.conf");
    let mut child = Command::new(squid)
        .args(["-N", "-f"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_listening(port, &mut child, "squid");
    Some(Proxy {
        name: "squid",
        child,
        port,
        ca_pem: String::new(),
        host: "127.0.0.1".into(),
    })
}

fn start_mitmdump(dir: &Path, origin_ca: &Path) -> Option<Proxy> {
    let mitmdump = which("mitmdump")?;
    let port = free_port();
    let confdir = dir.join("mitmproxy");
    std::fs::create_dir_all(&confdir).expect("mkdir");
    let mut child = Command::new(mitmdump)
        .args([
            "-q",
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            &port.to_string(),
        ])
        .arg("--set")
        .arg(format!("confdir={}", confdir.display()))
        .arg("--set")
        .arg(format!(
            "ssl_verify_upstream_trusted_ca={}",
            origin_ca.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_listening(port, &mut child, "mitmdump");
    let ca_pem = std::fs::read_to_string(confdir.join("mitmproxy-ca-cert.pem")).ok()?;
    Some(Proxy {
        name: "mitmdump",
        child,
        port,
        ca_pem,
        host: "127.0.0.1".into(),
    })
}

fn start_gateway(origin: SocketAddr, dir: &Path, origin_ca: &Path) -> Proxy {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args(["serve-gateway", &origin.to_string()])
        .arg(dir)
        .arg(origin_ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn gateway");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("gateway port");
    let port: u16 = line.trim().parse().expect("port line");
    let ca_pem = std::fs::read_to_string(dir.join("gateway-ca/ca.pem")).expect("gateway CA");
    Proxy {
        name: "gateway",
        child,
        port,
        ca_pem,
        host: "origin.test".into(),
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

/// The gateway's own process: 20 rules (the origin's is the last), the full gitleaks
/// rule set, audit level `blocks`, loopback only.
fn serve_gateway(origin: &str, dir: &str, origin_ca: &str) {
    // `BENCH_RT=current` runs the gateway on one thread, to see what cross-thread
    // wake-ups cost at c=1.
    let runtime = if std::env::var("BENCH_RT").as_deref() == Ok("current") {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    } else {
        tokio::runtime::Runtime::new().expect("runtime")
    };
    runtime.block_on(async {
        let mut rules: Vec<EgressRule> = (0..19)
            .map(|i| EgressRule {
                methods: vec!["GET".into(), "POST".into()],
                paths: vec![format!("/api/v{i}/*")],
                ..EgressRule::host(format!("service{i}.example.com"))
            })
            .collect();
        let origin: SocketAddr = origin.parse().expect("origin addr");
        rules.push(EgressRule {
            port: Some(origin.port()),
            methods: vec!["GET".into()],
            paths: vec!["/small".into(), "/big".into()],
            ..EgressRule::host("origin.test")
        });
        let policy = EgressPolicy {
            rules,
            ..EgressPolicy::default()
        };
        // `BENCH_DLP=builtin|empty` isolates the DLP cost; the default is the full set.
        let dlp = match (
            std::env::var("BENCH_DLP").as_deref(),
            std::fs::read_to_string(GITLEAKS),
        ) {
            (Ok("empty"), _) => DlpRules::from_gitleaks_toml("").expect("empty rules").0,
            (Ok("builtin"), _) | (_, Err(_)) => DlpRules::builtin(),
            (_, Ok(text)) => {
                DlpRules::from_gitleaks_toml(&text)
                    .expect("gitleaks rules")
                    .0
            }
        };
        let dir = Path::new(dir);
        let ca = bot_bottle_egress::CertificateAuthority::load_or_create(
            &dir.join("gateway-ca"),
            "bench gateway CA",
        )
        .expect("CA");
        let mut config = GatewayConfig::new(
            Listen::Tcp("127.0.0.1:0".parse().expect("addr")),
            policy,
            dir.join("egress.jsonl"),
        );
        config.ca = Some(Arc::new(ca));
        config.dlp_rules = Some(dlp);
        config.loopback_only = true;
        config.native_roots = false;
        config.extra_upstream_roots =
            rustls_pemfile::certs(&mut std::fs::read_to_string(origin_ca).expect("ca").as_bytes())
                .map(|c| c.expect("pem"))
                .collect::<Vec<CertificateDer<'static>>>();
        config
            .upstream_overrides
            .insert("origin.test".into(), origin);
        let handle = bot_bottle_egress::start(config).await.expect("gateway");
        println!("{}", handle.tcp_addr().expect("tcp").port());
        let _ = std::io::stdout().flush();
        // Runs until the parent kills it.
        std::future::pending::<()>().await;
    });
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve-gateway") {
        serve_gateway(&args[1], &args[2], &args[3]);
        return;
    }
    if args.first().map(String::as_str) == Some("serve-origin") {
        serve_origin(Path::new(&args[1]));
        return;
    }
    let mut seconds = 2.0;
    let mut big_count = 40;
    let mut rounds = 5usize;
    let mut others = true;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--seconds" => seconds = iter.next().and_then(|v| v.parse().ok()).unwrap_or(seconds),
            "--rounds" => {
                rounds = iter
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(rounds)
                    .max(1)
            }
            "--skip-others" => others = false,
            "--big" => {
                big_count = iter
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(big_count)
            }
            _ => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(seconds, big_count, rounds, others));
}

struct Row {
    name: &'static str,
    c1: SmallResult,
    c32: SmallResult,
    big_mib_s: f64,
    rss_mib: Option<f64>,
}

/// The origin's own process, so that "direct" crosses a process boundary as a real
/// origin does (an in-process origin would flatter the baseline).
fn serve_origin(dir: &Path) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let pki = pki();
        std::fs::write(dir.join("origin-ca.pem"), &pki.ca_pem).expect("write CA");
        let addr = origin(pki.server.clone()).await;
        println!("{}", addr.port());
        let _ = std::io::stdout().flush();
        std::future::pending::<()>().await;
    });
}

fn start_origin(dir: &Path) -> (Child, SocketAddr, String) {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .arg("serve-origin")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn origin");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("origin port");
    let port: u16 = line.trim().parse().expect("port line");
    let ca_pem = std::fs::read_to_string(dir.join("origin-ca.pem")).expect("origin CA");
    (
        child,
        format!("127.0.0.1:{port}").parse().expect("addr"),
        ca_pem,
    )
}

async fn run(seconds: f64, big_count: usize, rounds: usize, others: bool) {
    let load_before = load_average();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut origin_child, origin, origin_ca_pem) = start_origin(dir.path());
    let origin_pid = origin_child.id();
    let origin_ca = dir.path().join("origin-ca.pem");
    println!(
        "gateway benchmark: loopback origin {origin} (own process), {seconds} s per small-GET run, {big_count} x 1 MiB, {rounds} round(s)"
    );
    let gitleaks = if Path::new(GITLEAKS).exists() {
        "full gitleaks rule set"
    } else {
        "built-in DLP rules (gitleaks file not found)"
    };

    let direct = Route {
        proxy: None,
        host: "127.0.0.1".into(),
        port: origin.port(),
        roots: client_config(&origin_ca_pem),
    };
    let mut proxies = Vec::new();
    if others {
        match start_squid(dir.path()) {
            Some(p) => proxies.push(p),
            None => println!("squid: not installed, skipped"),
        }
        match start_mitmdump(dir.path(), &origin_ca) {
            Some(p) => proxies.push(p),
            None => println!("mitmdump: not installed, skipped"),
        }
    }
    proxies.push(start_gateway(origin, dir.path(), &origin_ca));
    let mut routes = vec![("direct", direct, None)];
    for proxy in &proxies {
        let roots = if proxy.ca_pem.is_empty() {
            client_config(&origin_ca_pem)
        } else {
            client_config(&proxy.ca_pem)
        };
        let route = Route {
            proxy: Some(format!("127.0.0.1:{}", proxy.port).parse().expect("addr")),
            host: proxy.host.clone(),
            port: origin.port(),
            roots,
        };
        routes.push((proxy.name, route, Some(proxy.child.id())));
    }
    // Finest interleaving: within a round each measurement (c=1, c=32, 1 MiB) is taken for
    // every path back to back, so a ratio compares runs seconds apart, not a minute apart.
    let mut runs: Vec<Vec<Row>> = routes.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        if rounds > 1 {
            eprintln!("round {} of {rounds}", round + 1);
        }
        let mut c1s = Vec::new();
        for (name, route, pid) in &routes {
            eprintln!("  {name}: c=1");
            let pids: Vec<u32> = [origin_pid, std::process::id()]
                .into_iter()
                .chain(*pid)
                .collect();
            c1s.push(small(route, 1, seconds, &pids).await);
        }
        let mut c32s = Vec::new();
        for (name, route, pid) in &routes {
            eprintln!("  {name}: c=32");
            let pids: Vec<u32> = [origin_pid, std::process::id()]
                .into_iter()
                .chain(*pid)
                .collect();
            c32s.push(small(route, 32, seconds, &pids).await);
        }
        let mut bigs = Vec::new();
        for (name, route, _) in &routes {
            eprintln!("  {name}: 1 MiB");
            bigs.push(big(route, big_count).await);
        }
        for (((((name, _, pid), runs), c1), c32), big_mib_s) in
            routes.iter().zip(&mut runs).zip(c1s).zip(c32s).zip(bigs)
        {
            runs.push(Row {
                name,
                c1,
                c32,
                big_mib_s,
                rss_mib: pid.and_then(peak_rss_mib),
            });
        }
    }
    let per_round: Vec<Vec<Row>> = runs;
    let rows: Vec<Row> = per_round.iter().map(|r| median_row(r)).collect();
    for mut proxy in proxies {
        let _ = proxy.child.kill();
        let _ = proxy.child.wait();
    }
    let _ = origin_child.kill();
    let _ = origin_child.wait();

    println!();
    println!(
        "{:<10} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9}",
        "path",
        "c1 req/s",
        "c1 p50ms",
        "c1 p99ms",
        "c32 req/s",
        "c32 p50",
        "c32 p99",
        "1MiB MB/s",
        "peak RSS"
    );
    for row in &rows {
        println!(
            "{:<10} {:>10.0} {:>9.3} {:>9.3} {:>10.0} {:>9.3} {:>9.3} {:>10.1} {:>9}",
            row.name,
            row.c1.requests_per_second,
            row.c1.p50_ms,
            row.c1.p99_ms,
            row.c32.requests_per_second,
            row.c32.p50_ms,
            row.c32.p99_ms,
            row.big_mib_s,
            row.rss_mib
                .map_or("-".to_string(), |r| format!("{r:.1} MiB")),
        );
    }
    let index = |name: &str| rows.iter().position(|r| r.name == name);
    let (Some(d), Some(g)) = (index("direct"), index("gateway")) else {
        return;
    };
    let (direct, gateway) = (&rows[d], &rows[g]);
    println!();
    println!(
        "gateway: 20-rule policy, {gitleaks}, audit level `blocks`; machine load before/after: {load_before} / {}",
        load_average()
    );
    println!(
        "ratios are per round (each path measured seconds apart), shown as median [min-max] over {rounds} round(s)"
    );
    let ratio = |of: usize, to: usize, pick: fn(&Row) -> f64| {
        Spread::of(
            per_round[of]
                .iter()
                .zip(&per_round[to])
                .map(|(a, b)| pick(a) / pick(b))
                .collect(),
        )
    };
    let c1 = |r: &Row| r.c1.requests_per_second;
    let c32 = |r: &Row| r.c32.requests_per_second;
    let mib = |r: &Row| r.big_mib_s;
    println!(
        "gateway/direct (target >= 0.5x small, >= 0.7x 1 MiB): c=1 {}, c=32 {}, 1 MiB {}",
        ratio(g, d, c1),
        ratio(g, d, c32),
        ratio(g, d, mib)
    );
    println!(
        "added p50 latency at c=1: {:.3} ms (<= 1 ms);  gateway peak RSS {} (<= 20 MB)",
        gateway.c1.p50_ms - direct.c1.p50_ms,
        gateway
            .rss_mib
            .map_or("-".into(), |r| format!("{r:.1} MiB"))
    );
    if let Some(m) = index("mitmdump") {
        println!(
            "gateway/mitmdump (target >= 10x): c=1 {}, c=32 {}, 1 MiB {}",
            ratio(g, m, c1),
            ratio(g, m, c32),
            ratio(g, m, mib)
        );
    }
    if let Some(s) = index("squid") {
        println!(
            "gateway/squid (squid does not intercept): c=1 {}, c=32 {}, 1 MiB {}",
            ratio(g, s, c1),
            ratio(g, s, c32),
            ratio(g, s, mib)
        );
    }
    let cpu = |r: &SmallResult| {
        let us = |i: usize| r.cpu_us.get(i).map_or("-".into(), |v| format!("{v:.1}"));
        format!("client {} + origin {} + proxy {}", us(1), us(0), us(2))
    };
    println!(
        "CPU per request, µs (median; the machine's load cancels out): c=1 direct {} / gateway {};  c=32 direct {} / gateway {}",
        cpu(&direct.c1),
        cpu(&gateway.c1),
        cpu(&direct.c32),
        cpu(&gateway.c32)
    );
    println!(
        "direct itself across rounds: c=1 {} req/s, c=32 {} req/s, 1 MiB {} MB/s",
        Spread::of(per_round[d].iter().map(c1).collect()),
        Spread::of(per_round[d].iter().map(c32).collect()),
        Spread::of(per_round[d].iter().map(mib).collect())
    );
}

/// A median with the smallest and largest value, for printing.
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        Spread {
            median: values[values.len() / 2],
            min: values[0],
            max: values[values.len() - 1],
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.median >= 100.0 {
            write!(f, "{:.0} [{:.0}-{:.0}]", self.median, self.min, self.max)
        } else {
            write!(f, "{:.2}x [{:.2}-{:.2}]", self.median, self.min, self.max)
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Per figure, the median over the rounds; peak RSS is the highest seen.
fn median_row(runs: &[Row]) -> Row {
    fn median(mut values: Vec<f64>) -> f64 {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    }
    let small = |runs: &[Row], pick: fn(&Row) -> &SmallResult| SmallResult {
        requests_per_second: median(runs.iter().map(|r| pick(r).requests_per_second).collect()),
        p50_ms: median(runs.iter().map(|r| pick(r).p50_ms).collect()),
        p99_ms: median(runs.iter().map(|r| pick(r).p99_ms).collect()),
        cpu_us: (0..pick(&runs[0]).cpu_us.len())
            .map(|i| median(runs.iter().map(|r| pick(r).cpu_us[i]).collect()))
            .collect(),
    };
    let c1 = small(runs, |r| &r.c1);
    let c32 = small(runs, |r| &r.c32);
    let big_mib_s = median(runs.iter().map(|r| r.big_mib_s).collect());
    let rss_mib = runs.iter().filter_map(|r| r.rss_mib).max_by(f64::total_cmp);
    Row {
        name: runs[0].name,
        c1,
        c32,
        big_mib_s,
        rss_mib,
    }
}
