//! DLP reads what the origin will read: every content coding, and the body's other
//! readings (JSON escapes, percent-encoding, multipart transfer encodings, nested base64).
//! Also the per-gateway memory budget for buffered bodies.

use std::io::Write as _;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bot_bottle_core::credential::Inject;
use bot_bottle_egress::{Limits, OverCap};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{CurlResult, TestPki, curl, policy, tls_gateway_with, tls_origin, traffic};

/// A made-up AWS access key id: `AKIA` and 16 characters of `[A-Z2-7]` derived from a
/// digest (built at run time, so no scanner trips on the source; never issued).
fn fake_aws_key() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = sha2::Sha256::digest(b"bot-bottle views test key");
    let tail: String = digest[..16]
        .iter()
        .map(|byte| char::from(ALPHABET[usize::from(byte % 32)]))
        .collect();
    format!("AKIA{tail}")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("in memory");
    encoder.finish().expect("in memory")
}

struct Setup {
    gw: crate::support::TestGateway,
    ca: String,
    placeholder: String,
}

/// A gateway intercepting `api.test` and `other.test`, with a credential for `git.test`.
async fn setup(tweak: impl FnOnce(&mut bot_bottle_egress::GatewayConfig)) -> Setup {
    let pki = TestPki::new();
    let origin = tls_origin(&pki, &["api.test", "other.test"], None).await;
    let gitea = crate::mitm::credential(
        "gitea",
        "git.test",
        Inject::Bearer,
        &["views", "test", "token", "0123456789abcdef"].join("-"),
    );
    let placeholder = gitea.placeholder().to_owned();
    let (gw, ca) = tls_gateway_with(
        policy("rules:\n  - host: api.test\n  - host: other.test\n"),
        &[("api.test", origin), ("other.test", origin)],
        &pki,
        vec![gitea],
        tweak,
    )
    .await;
    Setup {
        gw,
        ca: ca.to_str().expect("utf8").to_owned(),
        placeholder,
    }
}

impl Setup {
    /// POSTs `body` (a file, so any bytes go) with extra headers to `url`.
    async fn post(&self, url: &str, headers: &[&str], body: &[u8]) -> CurlResult {
        let path = self.gw.audit_path.with_file_name(format!(
            "body-{}",
            hex::encode(&sha2::Sha256::digest(body)[..8])
        ));
        std::fs::write(&path, body).expect("write body");
        let data = format!("@{}", path.display());
        let mut args: Vec<&str> = vec!["--cacert", &self.ca];
        for header in headers {
            args.extend(["-H", header]);
        }
        args.extend(["--data-binary", &data, url]);
        curl(&self.gw.proxy_url(), &args).await
    }

    async fn get(&self, url: &str) -> CurlResult {
        curl(&self.gw.proxy_url(), &["--cacert", &self.ca, url]).await
    }
}

fn blocked(result: &CurlResult) -> Option<String> {
    result.header("x-bot-bottle-block")
}

#[tokio::test]
async fn every_content_coding_is_undone_and_stacking_is_capped() {
    let key = fake_aws_key();
    let s = setup(|_| {}).await;
    let url = "https://api.test/upload";
    let secret = format!("{{\"aws_access_key_id\": \"{key}\"}}");

    // Two header lines: the first says identity, the second gzip. The origin undoes both.
    let split = s
        .post(
            url,
            &["content-encoding: identity", "content-encoding: gzip"],
            &gzip(secret.as_bytes()),
        )
        .await;
    assert_eq!(split.status, 403, "{}", split.body);
    assert_eq!(blocked(&split).as_deref(), Some("dlp-blocked"));

    // Three layers are fine (a clean body goes through), five are refused.
    let three = gzip(&gzip(&gzip(b"{\"hello\": \"world\"}")));
    let fine = s
        .post(url, &["content-encoding: gzip, gzip, gzip"], &three)
        .await;
    assert_eq!(fine.status, 200, "{}", fine.body);
    let five = gzip(&gzip(&three));
    let layered = s
        .post(
            url,
            &["content-encoding: gzip, gzip, gzip, gzip, gzip"],
            &five,
        )
        .await;
    assert_eq!(layered.status, 403, "{}", layered.body);
    assert_eq!(blocked(&layered).as_deref(), Some("dlp-undecodable-body"));

    // A coding the gateway cannot read, alone or behind one it can.
    for coding in ["compress", "gzip, x-unknown"] {
        let unknown = s
            .post(
                url,
                &[&format!("content-encoding: {coding}")],
                &gzip(b"hello"),
            )
            .await;
        assert_eq!(unknown.status, 403, "{coding}: {}", unknown.body);
        assert_eq!(blocked(&unknown).as_deref(), Some("dlp-undecodable-body"));
    }

    // Bytes after the end of a deflate stream would reach the origin unscanned.
    let mut trailing = {
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(b"short").expect("in memory");
        encoder.finish().expect("in memory")
    };
    trailing.extend_from_slice(secret.as_bytes());
    let tail = s.post(url, &["content-encoding: deflate"], &trailing).await;
    assert_eq!(blocked(&tail).as_deref(), Some("dlp-undecodable-body"));

    let events = traffic(&s.gw.audit_path);
    assert!(
        events[2]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("at most 3")),
        "{events:?}"
    );
    assert!(
        !std::fs::read_to_string(&s.gw.audit_path)
            .expect("audit")
            .contains(&key)
    );
    s.gw.handle.shutdown().await;
}

/// The same key, hidden in each view an origin would undo.
fn hidden_forms(secret: &str) -> Vec<(&'static str, Vec<u8>, Option<&'static str>)> {
    let escaped: String = secret
        .chars()
        .map(|c| format!("\\u{:04x}", u32::from(c)))
        .collect();
    let percent: String = secret.bytes().map(|b| format!("%{b:02X}")).collect();
    let part = STANDARD.encode(format!("id={secret}\n"));
    let multipart = format!(
        "--bb0un\r\nContent-Disposition: form-data; name=\"f\"; filename=\"f\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n{}\r\n--bb0un--\r\n",
        &part[..16],
        &part[16..]
    );
    let nested = STANDARD.encode(STANDARD.encode(format!("id {secret}")));
    vec![
        (
            "json-escapes",
            format!("{{\"note\": \"{escaped}\"}}").into_bytes(),
            Some("content-type: application/json"),
        ),
        (
            "form-percent",
            format!(
                "a={}%{:02X}{}&b=1",
                &secret[..4],
                secret.as_bytes()[4],
                &secret[5..]
            )
            .into_bytes(),
            Some("content-type: application/x-www-form-urlencoded"),
        ),
        ("all-percent", format!("q={percent}").into_bytes(), None),
        (
            "multipart-base64",
            multipart.into_bytes(),
            Some("content-type: multipart/form-data; boundary=bb0un"),
        ),
        (
            "base64-of-base64",
            format!("{{\"blob\": \"{nested}\"}}").into_bytes(),
            None,
        ),
    ]
}

#[tokio::test]
async fn a_key_or_a_placeholder_hidden_in_a_view_is_caught() {
    let key = fake_aws_key();
    let s = setup(|_| {}).await;
    for (what, expected, secret) in [
        ("key", "dlp-blocked", key.clone()),
        ("placeholder", "exfiltration-attempt", s.placeholder.clone()),
    ] {
        for (form, body, content_type) in hidden_forms(&secret) {
            assert!(
                !String::from_utf8_lossy(&body).contains(&secret),
                "{form}: the secret is in plain sight"
            );
            let headers: Vec<&str> = content_type.into_iter().collect();
            let result = s.post("https://other.test/upload", &headers, &body).await;
            assert_eq!(result.status, 403, "{what} in {form}: {}", result.body);
            assert_eq!(
                blocked(&result).as_deref(),
                Some(expected),
                "{what} in {form}"
            );
        }
        // A custom header, base64-encoded (no key name beside it to hint at it).
        let header = format!(
            "X-Trace-Context: {}",
            STANDARD.encode(format!("trace=1;data={secret};end"))
        );
        let in_header = s.post("https://other.test/upload", &[&header], b"x").await;
        assert_eq!(
            in_header.status, 403,
            "{what} in a header: {}",
            in_header.body
        );
        assert_eq!(
            blocked(&in_header).as_deref(),
            Some(expected),
            "{what} in a header"
        );
        // The query string, percent-encoded.
        let percent: String = secret.bytes().map(|b| format!("%{b:02X}")).collect();
        let query = s
            .get(&format!("https://other.test/search?q={percent}"))
            .await;
        assert_eq!(query.status, 403, "{what} in the query: {}", query.body);
        assert_eq!(blocked(&query).as_deref(), Some(expected));
    }
    // Ordinary bodies with escapes, percent-encoding and base64 still go through.
    let ordinary = s
        .post(
            "https://other.test/upload",
            &["content-type: application/json"],
            format!(
                "{{\"text\": \"line\\none \\u00e9 \\\"q\\\"\", \"url\": \"a%20b\", \"img\": \"{}\"}}",
                STANDARD.encode([0x89u8, b'P', b'N', b'G', 1, 2, 3, 4].repeat(40))
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(ordinary.status, 200, "{}", ordinary.body);
    let audit = std::fs::read_to_string(&s.gw.audit_path).expect("audit");
    assert!(!audit.contains(&key) && !audit.contains(&s.placeholder));
    s.gw.handle.shutdown().await;
}

#[tokio::test]
async fn over_the_cap_with_pass_a_start_that_does_not_decode_is_refused() {
    let s = setup(|config| {
        config.dlp_body_cap = 1024;
        config.dlp_over_cap = OverCap::Pass;
    })
    .await;
    // Not gzip at all: passing it would send 4 KiB nobody read.
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let refused = s
        .post(
            "https://api.test/upload",
            &["content-encoding: gzip"],
            &garbage,
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert_eq!(blocked(&refused).as_deref(), Some("dlp-undecodable-body"));
    // Real gzip over the cap still passes, with its start scanned.
    // Digests do not compress: 4 KiB of them stay over the 1 KiB cap in gzip.
    let noise: Vec<u8> = (0..128u32)
        .flat_map(|i| sha2::Sha256::digest(i.to_le_bytes()).to_vec())
        .collect();
    let compressed = gzip(&noise);
    assert!(compressed.len() > 1024);
    let passed = s
        .post(
            "https://api.test/upload",
            &["content-encoding: gzip"],
            &compressed,
        )
        .await;
    assert_eq!(passed.status, 200, "{}", passed.body);
    s.gw.handle.shutdown().await;
}

/// Starts a plain-HTTP POST whose body is `total` bytes and sends only `sent` of them.
async fn partial_post(
    proxy: std::net::SocketAddr,
    total: usize,
    sent: usize,
) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let head = format!(
        "POST http://api.test/hold HTTP/1.1\r\nHost: api.test\r\nContent-Length: {total}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(&vec![b'h'; sent]).await.expect("body");
    stream
}

/// The status line of the answer to a plain-HTTP POST of `len` bytes, read to its end. The
/// body is written on its own task, so an answer that comes before the body is all sent
/// is still read.
async fn post_of(proxy: std::net::SocketAddr, len: usize) -> String {
    let stream = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let head = format!(
            "POST http://api.test/big HTTP/1.1\r\nHost: api.test\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        );
        let _ = write.write_all(head.as_bytes()).await;
        let _ = write.write_all(&vec![b'b'; len]).await;
        write
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // To the end (the request said `Connection: close`), so the gateway is done with it.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), read.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    }
    writer.abort();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn request_bodies_share_a_memory_budget() {
    let origin = crate::support::origin().await;
    let pki = TestPki::new();
    let (gw, _ca) = tls_gateway_with(
        policy("rules:\n  - host: api.test\n"),
        &[("api.test", origin)],
        &pki,
        vec![],
        |config| {
            config.limits = Limits {
                body_memory_budget: 1 << 20,
                ..Limits::default()
            };
        },
    )
    .await;
    let addr = gw.handle.tcp_addr().expect("tcp");
    let proxy = gw.proxy_url();

    // 900 KiB of a 1 MiB budget, held: the rest of that body does not come (yet). Then
    // another 700 KiB body does not fit. The gateway reads both bodies as they come, so
    // a try where the second got in first (and the held one was refused) starts over.
    let mut held = None;
    for _ in 0..20 {
        let mut holder = partial_post(addr, 1 << 20, 900 << 10).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = post_of(addr, 700 << 10).await;
        let mut byte = [0u8; 1];
        let holder_answered =
            tokio::time::timeout(Duration::from_millis(50), holder.read(&mut byte))
                .await
                .is_ok();
        if answer.starts_with("HTTP/1.1 503") && !holder_answered {
            held = Some(holder);
            break;
        }
    }
    let mut holder = held.expect("a body past the budget was refused while another was held");
    // A small body still fits.
    let small = curl(&proxy, &["-d", "small=1", "http://api.test/small"]).await;
    assert_eq!(small.status, 200, "{}", small.body);

    // The held body completes and goes out; its share comes back.
    holder
        .write_all(&vec![b'h'; (1 << 20) - (900 << 10)])
        .await
        .expect("rest of the body");
    let mut response = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), holder.read(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&response[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response[..n])
    );
    let again = post_of(addr, 700 << 10).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");

    let events = traffic(&gw.audit_path);
    let budget: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["reason"] == "body-memory-budget")
        .collect();
    assert!(!budget.is_empty(), "{events:?}");
    assert_eq!(budget[0]["status"], 503);
    assert_eq!(budget[0]["decision"], "block");
    // The held, the small and the last body went out.
    let sent: Vec<&str> = events
        .iter()
        .filter(|e| e["status"] == 200)
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert!(sent.ends_with(&["/small", "/hold", "/big"]), "{sent:?}");
    gw.handle.shutdown().await;
}
