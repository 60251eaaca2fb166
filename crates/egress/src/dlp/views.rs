//! Other readings of a decoded body: what an origin gets after it undoes an encoding the
//! gateway would otherwise scan only as bytes.
//!
//! - text: JSON string escapes undone (`\u0041KIA…`, `\/`), then percent-encoding (forms,
//!   query strings), then JSON escapes again (an escape that was percent-encoded);
//! - multipart: the parts of a `multipart/*` body with a `base64` or `quoted-printable`
//!   `Content-Transfer-Encoding`, decoded;
//! - base64: every run that looks like base64, decoded, and again inside what that gave,
//!   up to [`MAX_BASE64_DEPTH`] levels.
//!
//! Each view is built only when a cheap check says it can differ from the bytes in a way
//! that matters (an escape that hides a character a secret can hold, a multipart content
//! type, a long mixed-case run of the base64 alphabet), so an ordinary body costs one
//! extra pass over its bytes. All views of one body together hold at most `budget`
//! bytes; [`Views::complete`] says whether everything fit.

use std::borrow::Cow;

/// Base64 inside base64 inside base64, and no deeper.
pub(crate) const MAX_BASE64_DEPTH: usize = 3;

/// Shorter runs are left alone: 24 characters are 18 bytes, less than any key the rules
/// look for, and short runs are mostly words and identifiers.
const MIN_BASE64_RUN: usize = 24;

/// A separator (`/`, a line break) this close to the start of a run may end a prefix that
/// is not base64 (a URL path, a line of text): the run is also decoded from after it, for
/// at most [`RESTART_SPAN`] characters (enough for any key; a `/` inside real base64 then
/// costs little).
const RESTART_WINDOW: usize = 64;
const RESTART_SPAN: usize = 1024;

pub(crate) struct Views {
    pub(crate) buffers: Vec<Vec<u8>>,
    /// False when the budget ran out and some view was cut or not built.
    pub(crate) complete: bool,
}

struct Builder {
    buffers: Vec<Vec<u8>>,
    left: usize,
    complete: bool,
}

impl Builder {
    /// Keeps a view that differs from its source; false once the budget is spent.
    fn push(&mut self, mut view: Vec<u8>) -> bool {
        if view.is_empty() {
            return self.complete;
        }
        if view.len() > self.left {
            view.truncate(self.left);
            self.complete = false;
        }
        self.left -= view.len();
        if !view.is_empty() {
            self.buffers.push(view);
        }
        self.complete
    }
}

/// The views of `body` worth scanning besides its bytes. `content_types` are the
/// request's `Content-Type` values (a multipart boundary comes from there).
pub(crate) fn views(body: &[u8], content_types: &[&str], budget: usize) -> Views {
    let mut builder = Builder {
        buffers: Vec::new(),
        left: budget,
        complete: true,
    };
    let mut sources: Vec<usize> = Vec::new();
    let has_text = match text_view(body) {
        Some(text) => {
            if !builder.push(text) {
                return finish(builder);
            }
            sources.push(builder.buffers.len() - 1);
            true
        }
        None => false,
    };
    for content_type in content_types {
        if let Some(boundary) = multipart_boundary(content_type) {
            let before = builder.buffers.len();
            if !builder.push(multipart_view(body, &boundary)) {
                return finish(builder);
            }
            if builder.buffers.len() > before {
                sources.push(before);
            }
        }
    }
    // The text view holds every base64 run of the body, with escapes inside runs undone,
    // so it replaces the body as a source when it exists.
    let mut level: Vec<u8> = Vec::new();
    if !has_text {
        base64_runs(body, &mut level);
    }
    for &index in &sources {
        base64_runs(&builder.buffers[index], &mut level);
    }
    for _ in 0..MAX_BASE64_DEPTH {
        if level.is_empty() {
            break;
        }
        let mut next = Vec::new();
        base64_runs(&level, &mut next);
        if !builder.push(level) {
            return finish(builder);
        }
        level = next;
    }
    finish(builder)
}

fn finish(builder: Builder) -> Views {
    Views {
        buffers: builder.buffers,
        complete: builder.complete,
    }
}

/// JSON unescaping, then percent-decoding, then JSON unescaping again, each step only when
/// it would reveal a character a secret can be made of. `None` when no step applied.
fn text_view(body: &[u8]) -> Option<Vec<u8>> {
    let mut current: Cow<'_, [u8]> = Cow::Borrowed(body);
    let mut changed = false;
    if hides_json(&current) {
        current = Cow::Owned(json_unescape(&current));
        changed = true;
    }
    if hides_percent(&current) {
        current = Cow::Owned(percent_decode(&current));
        changed = true;
        if hides_json(&current) {
            current = Cow::Owned(json_unescape(&current));
        }
    }
    changed.then(|| current.into_owned())
}

/// Characters that keys, tokens and placeholders are made of.
fn secretish(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'/' | b'=' | b'_' | b'-' | b'.')
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// `\uXXXX` of a character a secret can hold, or `\/`. JSON encoders escape quotes,
/// controls and (some) `<>&` and non-ASCII, none of which a key is made of, so ordinary
/// JSON does not trigger the view.
fn hides_json(bytes: &[u8]) -> bool {
    memchr::memmem::find(bytes, br"\/").is_some()
        || memchr::memmem::find_iter(bytes, br"\u").any(|at| {
            bytes
                .get(at + 2..at + 6)
                .and_then(|hex| {
                    hex.iter()
                        .try_fold(0u32, |acc, &b| Some(acc << 4 | u32::from(hex_value(b)?)))
                })
                .and_then(|code| u8::try_from(code).ok())
                .is_some_and(secretish)
        })
}

/// `%XX` of a character a secret can hold, or of `\` (a JSON escape hidden in turn); `%20`
/// and the like do not count.
fn hides_percent(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'%', bytes).any(|at| {
        match (
            bytes.get(at + 1).copied().and_then(hex_value),
            bytes.get(at + 2).copied().and_then(hex_value),
        ) {
            (Some(high), Some(low)) => secretish(high << 4 | low) || high << 4 | low == b'\\',
            _ => false,
        }
    })
}

/// Undoes JSON string escapes wherever they are (the view does not parse JSON, so it also
/// works on a body that merely contains JSON). Invalid escapes are kept as they are.
fn json_unescape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some(at) = memchr::memchr(b'\\', rest) {
        out.extend_from_slice(&rest[..at]);
        rest = &rest[at..];
        let simple = match rest.get(1) {
            Some(b'"') => Some(b'"'),
            Some(b'\\') => Some(b'\\'),
            Some(b'/') => Some(b'/'),
            Some(b'b') => Some(0x08),
            Some(b'f') => Some(0x0c),
            Some(b'n') => Some(b'\n'),
            Some(b'r') => Some(b'\r'),
            Some(b't') => Some(b'\t'),
            _ => None,
        };
        if let Some(byte) = simple {
            out.push(byte);
            rest = &rest[2..];
            continue;
        }
        match unicode_escape(rest) {
            Some((ch, used)) => {
                let mut utf8 = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut utf8).as_bytes());
                rest = &rest[used..];
            }
            None => {
                out.push(b'\\');
                rest = &rest[1..];
            }
        }
    }
    out.extend_from_slice(rest);
    out
}

/// `\uXXXX` (or a surrogate pair of them) at the start of `bytes`: the character and how
/// many bytes it took. A lone surrogate becomes U+FFFD.
fn unicode_escape(bytes: &[u8]) -> Option<(char, usize)> {
    let unit = |at: usize| -> Option<u32> {
        if bytes.get(at) != Some(&b'\\') || bytes.get(at + 1) != Some(&b'u') {
            return None;
        }
        bytes
            .get(at + 2..at + 6)?
            .iter()
            .try_fold(0u32, |acc, &b| Some(acc << 4 | u32::from(hex_value(b)?)))
    };
    let first = unit(0)?;
    if (0xD800..0xDC00).contains(&first)
        && let Some(second) = unit(6)
        && (0xDC00..0xE000).contains(&second)
    {
        let code = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
        return Some((char::from_u32(code).unwrap_or('\u{FFFD}'), 12));
    }
    Some((char::from_u32(first).unwrap_or('\u{FFFD}'), 6))
}

/// `%XX` → the byte. `+` stays `+`: in a form it means a space, but a base64 secret
/// written raw keeps its `+`, and that is what the view is for.
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some(at) = memchr::memchr(b'%', rest) {
        out.extend_from_slice(&rest[..at]);
        match (
            rest.get(at + 1).copied().and_then(hex_value),
            rest.get(at + 2).copied().and_then(hex_value),
        ) {
            (Some(high), Some(low)) => {
                out.push(high << 4 | low);
                rest = &rest[at + 3..];
            }
            _ => {
                out.push(b'%');
                rest = &rest[at + 1..];
            }
        }
    }
    out.extend_from_slice(rest);
    out
}

/// The `boundary` parameter of a `multipart/*` content type.
fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let essence = params.next()?.trim();
    if !essence
        .get(..10)
        .is_some_and(|start| start.eq_ignore_ascii_case("multipart/"))
    {
        return None;
    }
    params.find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim().trim_matches('"');
        (!value.is_empty()).then(|| value.to_owned())
    })
}

/// The parts with a `base64` or `quoted-printable` transfer encoding, decoded, one after
/// another (a line break between them).
fn multipart_view(body: &[u8], boundary: &str) -> Vec<u8> {
    let delimiter = format!("--{boundary}");
    let finder = memchr::memmem::Finder::new(delimiter.as_bytes());
    // The body's end closes the last part too: a lenient parser reads a part whose
    // closing delimiter is missing.
    let mut starts: Vec<usize> = finder.find_iter(body).collect();
    starts.push(body.len());
    let mut out = Vec::new();
    for window in starts.windows(2) {
        let Some(part) = body.get(window[0] + delimiter.len()..window[1]) else {
            continue;
        };
        let Some((head, content)) = split_head(part) else {
            continue;
        };
        let encoding = head
            .split(|&b| b == b'\n')
            .find_map(|line| {
                let line = std::str::from_utf8(line).ok()?;
                let (name, value) = line.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("content-transfer-encoding")
                    .then(|| value.trim().to_ascii_lowercase())
            })
            .unwrap_or_default();
        let decoded = match encoding.as_str() {
            // Lenient, as many decoders are: everything outside the alphabet is skipped.
            "base64" => base64_lenient(content),
            "quoted-printable" => quoted_printable(content),
            _ => continue,
        };
        if !out.is_empty() {
            out.push(b'\n');
        }
        out.extend_from_slice(&decoded);
    }
    out
}

/// A part's header block and its content (after the blank line).
fn split_head(part: &[u8]) -> Option<(&[u8], &[u8])> {
    let crlf = memchr::memmem::find(part, b"\r\n\r\n").map(|at| (at, 4));
    let lf = memchr::memmem::find(part, b"\n\n").map(|at| (at, 2));
    let (at, len) = match (crlf, lf) {
        (Some(a), Some(b)) => {
            if a.0 <= b.0 {
                a
            } else {
                b
            }
        }
        (a, b) => a.or(b)?,
    };
    Some((&part[..at], &part[at + len..]))
}

fn quoted_printable(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            if let (Some(high), Some(low)) = (
                bytes.get(i + 1).copied().and_then(hex_value),
                bytes.get(i + 2).copied().and_then(hex_value),
            ) {
                out.push(high << 4 | low);
                i += 3;
                continue;
            }
            // A soft line break.
            if bytes.get(i + 1) == Some(&b'\n') {
                i += 2;
                continue;
            }
            if bytes.get(i + 1) == Some(&b'\r') && bytes.get(i + 2) == Some(&b'\n') {
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The 6-bit value of a character of either base64 alphabet (standard or URL-safe).
fn sextet(byte: u8) -> Option<u8> {
    match byte {
        b'A'..=b'Z' => Some(byte - b'A'),
        b'a'..=b'z' => Some(byte - b'a' + 26),
        b'0'..=b'9' => Some(byte - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    }
}

/// Decodes the alphabet characters of `chars` in order, skipping everything else.
fn decode_sextets(chars: impl Iterator<Item = u8>, out: &mut Vec<u8>) {
    let mut acc: u32 = 0;
    let mut bits = 0;
    for value in chars.filter_map(sextet) {
        acc = ((acc << 6) | u32::from(value)) & 0xFFFF;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
}

fn base64_lenient(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    decode_sextets(bytes.iter().copied(), &mut out);
    out
}

/// Per byte: `IN` for both base64 alphabets (plus `UPPER` or `LOWER` for letters), `SOFT`
/// for the line-break bytes a wrapped run may hold, 0 for the rest.
const IN: u8 = 1;
const UPPER: u8 = 2;
const LOWER: u8 = 4;
const SOFT: u8 = 8;
const CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        table[byte] = if b.is_ascii_uppercase() {
            IN | UPPER
        } else if b.is_ascii_lowercase() {
            IN | LOWER
        } else if b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'/' | b'_') {
            IN
        } else if matches!(b, b'\n' | b'\r') {
            SOFT
        } else {
            0
        };
        byte += 1;
    }
    table
};

fn class(byte: u8) -> u8 {
    CLASS[usize::from(byte)]
}

/// Appends to `out` the decoding of every run in `bytes` that looks like base64: at least
/// [`MIN_BASE64_RUN`] characters of one alphabet, both letter cases present (hex digests,
/// words and paths are not decoded), single line breaks inside a run skipped (wrapped
/// base64). Decodings are separated by a line break.
///
/// Most text has no such run, so the search skips: a run long enough covers the byte
/// `MIN_BASE64_RUN - 1` ahead, so when that byte can be in no run, nothing before it
/// needs a look; when it can, only the stretch of run bytes around it is looked at.
fn base64_runs(bytes: &[u8], out: &mut Vec<u8>) {
    let n = bytes.len();
    let mut i = 0;
    while i + MIN_BASE64_RUN <= n {
        let probe = i + MIN_BASE64_RUN - 1;
        if class(bytes[probe]) == 0 {
            i = probe + 1;
            continue;
        }
        let mut from = probe;
        while from > i && class(bytes[from - 1]) != 0 {
            from -= 1;
        }
        let mut to = probe + 1;
        while to < n && class(bytes[to]) != 0 {
            to += 1;
        }
        if to - from >= MIN_BASE64_RUN {
            exact_runs(bytes, from, to, out);
        }
        i = to + 1;
    }
}

/// The runs in `bytes[from..to]`, a stretch of alphabet and line-break bytes.
fn exact_runs(bytes: &[u8], from: usize, to: usize, out: &mut Vec<u8>) {
    let mut i = from;
    while i < to {
        if class(bytes[i]) & IN == 0 {
            i += 1;
            continue;
        }
        let start = i;
        let mut count = 0usize;
        let mut seen = 0u8;
        loop {
            let segment = i;
            while i < to && class(bytes[i]) & IN != 0 {
                seen |= class(bytes[i]);
                i += 1;
            }
            count += i - segment;
            // One line break (LF or CRLF) inside a run: wrapped base64 continues.
            let after = match (bytes.get(i), bytes.get(i + 1)) {
                (Some(b'\n'), _) => i + 1,
                (Some(b'\r'), Some(b'\n')) => i + 2,
                _ => break,
            };
            if after >= to || class(bytes[after]) & IN == 0 {
                break;
            }
            i = after;
        }
        let end = i;
        if count < MIN_BASE64_RUN || seen & (UPPER | LOWER) != UPPER | LOWER {
            continue;
        }
        if !out.is_empty() {
            out.push(b'\n');
        }
        decode_sextets(bytes[start..end].iter().copied(), out);
        // The last separator near the start may end a prefix that is not base64.
        let window = &bytes[start..end.min(start + RESTART_WINDOW)];
        if let Some(at) = window.iter().rposition(|&b| matches!(b, b'/' | b'\n')) {
            let restart = start + at + 1;
            if end - restart >= MIN_BASE64_RUN {
                out.push(b'\n');
                let stop = end.min(restart + RESTART_SPAN);
                decode_sextets(bytes[restart..stop].iter().copied(), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    use super::*;

    const KEY: &str = "AKIAZ7Q3XK2M5RTB4WLE";

    fn all(body: &[u8], content_types: &[&str]) -> Vec<u8> {
        let views = views(body, content_types, 1 << 20);
        assert!(views.complete);
        views.buffers.join(&b'\n')
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        memchr::memmem::find(haystack, needle.as_bytes()).is_some()
    }

    #[test]
    fn ordinary_bodies_get_no_view() {
        for body in [
            &b"{\"prompt\": \"hello\\n\\\"world\\\" \\u001b[31m caf\\u00e9 \\u003c\"}"[..],
            b"a=hello%20world&b=%0A",
            b"path/to/some/file.rs and a sha256 0123456789abcdef0123456789abcdef0123",
            b"",
        ] {
            let views = views(body, &["application/json"], 1 << 20);
            assert!(
                views.buffers.is_empty(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn json_escapes_and_percent_encoding_are_undone() {
        let escaped: String = KEY
            .chars()
            .map(|c| format!("\\u{:04x}", u32::from(c)))
            .collect();
        assert!(contains(
            &all(format!("{{\"k\":\"{escaped}\"}}").as_bytes(), &[]),
            KEY
        ));
        let partly = format!("{{\"k\":\"\\u0041{}\"}}", &KEY[1..]);
        assert!(contains(&all(partly.as_bytes(), &[]), KEY));
        let percent: String = KEY.bytes().map(|b| format!("%{b:02X}")).collect();
        assert!(contains(
            &all(format!("a={percent}&x=1").as_bytes(), &[]),
            KEY
        ));
        // A percent-encoded JSON escape.
        let both = format!("q=%5Cu0041{}", &KEY[1..]);
        assert!(contains(&all(both.as_bytes(), &[]), KEY));
        // Surrogate pairs and lone surrogates.
        assert_eq!(
            json_unescape(br"\ud83d\ude00 \ud800 \/"),
            "\u{1F600} \u{FFFD} /".as_bytes()
        );
    }

    #[test]
    fn base64_nested_three_levels_and_after_a_prefix() {
        let once = STANDARD.encode(format!("key={KEY}"));
        let twice = STANDARD.encode(&once);
        let thrice = URL_SAFE_NO_PAD.encode(&twice);
        for body in [&once, &twice, &thrice] {
            assert!(contains(
                &all(format!("{{\"d\":\"{body}\"}}").as_bytes(), &[]),
                KEY
            ));
        }
        let four = STANDARD.encode(&thrice);
        assert!(!contains(&all(four.as_bytes(), &[]), KEY));
        // After a URL path, and after a line of text the run continues from.
        assert!(contains(
            &all(format!("/v1/files/{once}").as_bytes(), &[]),
            KEY
        ));
        assert!(contains(
            &all(format!("here it is\n{once}").as_bytes(), &[]),
            KEY
        ));
        // Wrapped at 16 characters.
        let wrapped: Vec<String> = once
            .as_bytes()
            .chunks(16)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        assert!(contains(&all(wrapped.join("\r\n").as_bytes(), &[]), KEY));
    }

    #[test]
    fn multipart_parts_in_base64_and_quoted_printable() {
        let encoded = STANDARD.encode(format!("aws_access_key_id = {KEY}\n"));
        let wrapped = format!("{}\r\n{}", &encoded[..20], &encoded[20..]);
        let qp: String = KEY.bytes().map(|b| format!("={b:02X}")).collect();
        let body = format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{wrapped}\r\n\
             --XyZ\r\nContent-Transfer-Encoding: Quoted-Printable\r\n\r\nk=3D{qp}=\r\n!\r\n--XyZ--\r\n"
        );
        let view = all(body.as_bytes(), &["multipart/form-data; boundary=\"XyZ\""]);
        assert!(contains(&view, &format!("aws_access_key_id = {KEY}")));
        assert!(contains(&view, &format!("k={KEY}!")));
        assert_eq!(multipart_boundary("text/plain; boundary=x"), None);
        // No closing delimiter: the last part is still read.
        let open = format!("--XyZ\r\nContent-Transfer-Encoding: base64\r\n\r\n{encoded}");
        assert!(contains(
            &all(open.as_bytes(), &["multipart/mixed; boundary=XyZ"]),
            KEY
        ));
    }

    #[test]
    fn a_slash_inside_real_base64_costs_a_bounded_extra_decode() {
        // 48 KiB of base64 with a `/` near its start.
        let mut run = b"ab/".to_vec();
        run.extend(
            STANDARD
                .encode([0xfbu8; 48 << 10])
                .bytes()
                .map(|b| if b == b'/' { b'x' } else { b }),
        );
        let mut out = Vec::new();
        base64_runs(&run, &mut out);
        let once = run.len() / 4 * 3;
        assert!(
            out.len() <= once + RESTART_SPAN,
            "{} > {once} + {RESTART_SPAN}",
            out.len()
        );
    }

    #[test]
    fn the_skipping_search_finds_what_a_byte_by_byte_one_does() {
        let pieces: [&[u8]; 9] = [
            b"QUtJQVo3UTNY",
            b"aGVsbG8gd29y",
            b"abc",
            b" ",
            b"\n",
            b"\r\n",
            b"/",
            b"==",
            b"\"",
        ];
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..2000 {
            let mut text = Vec::new();
            for _ in 0..(state % 40) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                text.extend_from_slice(pieces[(state % 9) as usize]);
            }
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            base64_runs(&text, &mut fast);
            exact_runs(&text, 0, text.len(), &mut slow);
            assert_eq!(fast, slow, "{:?}", String::from_utf8_lossy(&text));
        }
    }

    #[test]
    fn views_stay_within_the_budget() {
        let once = STANDARD.encode(KEY.repeat(200));
        let body = format!("{once} %41%41 \\u0041");
        let views = views(body.as_bytes(), &[], 1000);
        assert!(!views.complete);
        assert_eq!(views.buffers.iter().map(Vec::len).sum::<usize>(), 1000);
        let roomy = super::views(body.as_bytes(), &[], 1 << 20);
        assert!(roomy.complete);
    }
}
