//! The ref-update commands of a smart-HTTP `git-receive-pack` request, read so the gateway
//! can hold a push to the refs a git rule's `push_refs` names.
//!
//! A receive-pack body starts with pkt-lines (four hex digits of length, the length
//! counting themselves): `shallow <oid>` lines and commands `<old-oid> SP <new-oid> SP
//! <refname>`, the first carrying `NUL <capabilities>`, up to a flush-pkt `0000`. If a
//! capability list names `push-options`, option lines follow up to a second flush. Then
//! comes the pack, which is not read. Object ids are 40 (SHA-1) or 64 (SHA-256) hex digits.
//!
//! The parser is pure and bounded ([`MAX_SECTION`] bytes, [`MAX_COMMANDS`] commands,
//! [`MAX_PUSH_OPTIONS`] options) and refuses what `git receive-pack` would read
//! differently or not at all: a delim or response-end packet, an empty or over-long
//! packet, a signed push (`push-cert`, whose commands live inside the certificate), an
//! id of the wrong shape, a ref name git would refuse. A refusal is never a pass.

use std::fmt;

use bot_bottle_core::policy::{
    EgressPolicy, PATH_OVERRIDE_HEADERS, PushScope, RequestFacts, glob_matches,
};

/// The most bytes of commands and push options read from the start of a body.
pub(crate) const MAX_SECTION: usize = 1 << 20;
/// The most ref-update commands one push may carry.
pub(crate) const MAX_COMMANDS: usize = 1024;
/// The most push options one push may carry.
pub(crate) const MAX_PUSH_OPTIONS: usize = 1024;
/// git's `LARGE_PACKET_MAX`: the largest pkt-line, its four length digits included.
const LARGE_PACKET_MAX: usize = 65520;
/// How many refused refs an audit detail names, and how long each may be.
const DETAIL_REFS: usize = 8;
const DETAIL_REF_BYTES: usize = 256;

/// The audit and `x-bot-bottle-block` reason for a push with a refused ref.
pub(crate) const REF_NOT_ALLOWED: &str = "git-ref-not-allowed";
/// The reason for a push whose commands cannot be read.
pub(crate) const UNREADABLE: &str = "git-push-unreadable";

/// One ref-update command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Command {
    pub(crate) old: String,
    pub(crate) new: String,
    pub(crate) refname: String,
}

impl Command {
    /// A delete sets the ref to the all-zero id.
    pub(crate) fn is_delete(&self) -> bool {
        self.new.bytes().all(|b| b == b'0')
    }
}

/// What the start of a receive-pack body says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Commands {
    pub(crate) commands: Vec<Command>,
    pub(crate) push_options: usize,
}

/// Why a body's commands cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// The body ends inside a packet or before the flush that ends a section.
    Truncated,
    /// The length digits are not hex, or name a length git refuses.
    BadLength(String),
    /// A delim (`0001`) or response-end (`0002`) packet where a section must end with a flush.
    SpecialPacket(&'static str),
    /// A packet with no payload (`0004`).
    EmptyPacket,
    /// A line that is neither a command nor a shallow line.
    BadCommand(String),
    /// A signed push: its commands are inside a certificate.
    PushCert,
    /// A ref name git would refuse (or that is not UTF-8).
    BadRefName(String),
    TooManyCommands,
    TooManyPushOptions,
    /// The sections run past [`MAX_SECTION`] bytes.
    TooLarge,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Truncated => f.write_str("the body ends before its command list does"),
            ParseError::BadLength(digits) => write!(f, "bad pkt-line length `{digits}`"),
            ParseError::SpecialPacket(name) => {
                write!(f, "a {name} packet where the command list must end")
            }
            ParseError::EmptyPacket => f.write_str("an empty pkt-line in the command list"),
            ParseError::BadCommand(line) => write!(f, "not a ref-update command: `{line}`"),
            ParseError::PushCert => f.write_str("signed pushes (push-cert) are not supported"),
            ParseError::BadRefName(name) => write!(f, "not a valid ref name: `{name}`"),
            ParseError::TooManyCommands => write!(f, "more than {MAX_COMMANDS} ref updates"),
            ParseError::TooManyPushOptions => {
                write!(f, "more than {MAX_PUSH_OPTIONS} push options")
            }
            ParseError::TooLarge => {
                write!(f, "the command list is over the {MAX_SECTION}-byte cap")
            }
        }
    }
}

enum Packet<'a> {
    Flush,
    Data(&'a [u8]),
}

struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Result<Packet<'a>, ParseError> {
        let end = self.at.checked_add(4).ok_or(ParseError::TooLarge)?;
        if end > MAX_SECTION {
            return Err(ParseError::TooLarge);
        }
        let digits = self.body.get(self.at..end).ok_or(ParseError::Truncated)?;
        let mut len = 0usize;
        for &b in digits {
            let value = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => return Err(ParseError::BadLength(excerpt(digits))),
            };
            len = len * 16 + usize::from(value);
        }
        match len {
            0 => {
                self.at = end;
                return Ok(Packet::Flush);
            }
            1 => return Err(ParseError::SpecialPacket("delim (0001)")),
            2 => return Err(ParseError::SpecialPacket("response-end (0002)")),
            3 => return Err(ParseError::BadLength(excerpt(digits))),
            4 => return Err(ParseError::EmptyPacket),
            _ if len > LARGE_PACKET_MAX => return Err(ParseError::BadLength(excerpt(digits))),
            _ => {}
        }
        let stop = self.at + len;
        if stop > MAX_SECTION {
            return Err(ParseError::TooLarge);
        }
        let payload = self.body.get(end..stop).ok_or(ParseError::Truncated)?;
        self.at = stop;
        Ok(Packet::Data(payload))
    }
}

/// Reads the command list (and push options) at the start of a receive-pack body.
pub(crate) fn parse(body: &[u8]) -> Result<Commands, ParseError> {
    let mut reader = Reader { body, at: 0 };
    let mut out = Commands::default();
    let mut push_options = false;
    loop {
        let payload = match reader.next()? {
            Packet::Flush => break,
            Packet::Data(payload) => payload,
        };
        // git chomps one trailing LF off the packet, then reads the line up to a NUL.
        let payload = payload.strip_suffix(b"\n").unwrap_or(payload);
        let (line, capabilities) = match payload.iter().position(|&b| b == 0) {
            Some(nul) => (&payload[..nul], Some(&payload[nul + 1..])),
            None => (payload, None),
        };
        // receive-pack honours a capability list on any line, not only the first.
        if let Some(capabilities) = capabilities {
            push_options |= capabilities
                .split(u8::is_ascii_whitespace)
                .any(|word| word.split(|&b| b == b'=').next() == Some(b"push-options"));
        }
        if line == b"push-cert" {
            return Err(ParseError::PushCert);
        }
        if let Some(oid) = line.strip_prefix(b"shallow ") {
            if !is_oid(oid) {
                return Err(ParseError::BadCommand(excerpt(line)));
            }
            continue;
        }
        if out.commands.len() == MAX_COMMANDS {
            return Err(ParseError::TooManyCommands);
        }
        out.commands.push(command(line)?);
    }
    if push_options {
        loop {
            match reader.next()? {
                Packet::Flush => break,
                Packet::Data(_) if out.push_options == MAX_PUSH_OPTIONS => {
                    return Err(ParseError::TooManyPushOptions);
                }
                Packet::Data(_) => out.push_options += 1,
            }
        }
    }
    Ok(out)
}

fn is_oid(text: &[u8]) -> bool {
    (text.len() == 40 || text.len() == 64) && text.iter().all(u8::is_ascii_hexdigit)
}

fn command(line: &[u8]) -> Result<Command, ParseError> {
    let bad = || ParseError::BadCommand(excerpt(line));
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(old), Some(new), Some(refname)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    if !is_oid(old) || old.len() != new.len() || !is_oid(new) {
        return Err(bad());
    }
    let refname = std::str::from_utf8(refname)
        .ok()
        .filter(|name| refname_ok(name))
        .ok_or_else(|| ParseError::BadRefName(excerpt(refname)))?;
    Ok(Command {
        old: String::from_utf8_lossy(old).to_ascii_lowercase(),
        new: String::from_utf8_lossy(new).to_ascii_lowercase(),
        refname: refname.to_string(),
    })
}

/// git's `check_refname_format`, as strict as it is for a pushed ref: under `refs/`, no
/// empty, `.`-led or `.lock` component, no `..`, `@{`, control characters, space,
/// `~^:?*[\`, no trailing `/` or `.`.
fn refname_ok(name: &str) -> bool {
    name.starts_with("refs/")
        && !name.ends_with('/')
        && !name.ends_with('.')
        && !name.contains("..")
        && !name.contains("@{")
        && name
            .bytes()
            .all(|b| b > b' ' && b != 0x7f && !b"~^:?*[\\".contains(&b))
        && name
            .split('/')
            .all(|part| !part.is_empty() && !part.starts_with('.') && !part.ends_with(".lock"))
}

/// Why one command is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefProblem {
    Delete,
    Tag,
    NotMatching,
}

impl RefProblem {
    fn as_str(self) -> &'static str {
        match self {
            RefProblem::Delete => "delete",
            RefProblem::Tag => "tag",
            RefProblem::NotMatching => "not in push_refs",
        }
    }
}

/// Judges one command against the `push_refs` globs: a delete is always refused, a tag
/// only passes a glob that itself names `refs/tags/`, anything else must match a glob.
pub(crate) fn judge(command: &Command, globs: &[&str]) -> Result<(), RefProblem> {
    if command.is_delete() {
        return Err(RefProblem::Delete);
    }
    let tag = command.refname.starts_with("refs/tags/");
    let matched = globs
        .iter()
        .filter(|glob| !tag || glob.starts_with("refs/tags/"))
        .any(|glob| glob_matches(glob, &command.refname));
    match (matched, tag) {
        (true, _) => Ok(()),
        (false, true) => Err(RefProblem::Tag),
        (false, false) => Err(RefProblem::NotMatching),
    }
}

/// How the audit detail of an allowed push starts; each ref follows as `REF NEW-ID`,
/// separated by `, ` (see [`pushed_ids`]).
pub const PUSH_DETAIL_PREFIX: &str = "git push of ";

/// The object ids an allowed push's audit detail says it set refs to (deletes have none).
#[must_use]
pub fn pushed_ids(detail: &str) -> Vec<String> {
    let Some(rest) = detail.strip_prefix(PUSH_DETAIL_PREFIX) else {
        return Vec::new();
    };
    let Some((_, refs)) = rest.split_once(": ") else {
        return Vec::new();
    };
    refs.split(", ")
        .filter_map(|item| item.rsplit_once(' '))
        .map(|(_, id)| id)
        .filter(|id| is_oid(id.as_bytes()) && id.bytes().any(|b| b != b'0'))
        .map(str::to_owned)
        .collect()
}

/// A push the gateway refuses: the reason and the audit detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) reason: &'static str,
    pub(crate) detail: String,
}

/// The `push_refs` globs a request is held to: one list for its own path and one for
/// each path a path-override header (`X-Original-URL`, `X-Rewrite-URL`) names, since an
/// origin that honours the header serves that path instead; each restricted path adds
/// its list, and the push must fit every list. Empty when nothing restricts the request.
pub(crate) fn scope<'p>(
    policy: &'p EgressPolicy,
    method: &hyper::Method,
    host: &str,
    port: u16,
    uri: &hyper::Uri,
    headers: &hyper::HeaderMap,
) -> Vec<Vec<&'p str>> {
    let overrides = PATH_OVERRIDE_HEADERS
        .iter()
        .flat_map(|name| headers.get_all(*name))
        .filter_map(|value| value.to_str().ok());
    std::iter::once((uri.path(), uri.query()))
        .chain(overrides.map(|named| match named.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (named, None),
        }))
        .filter_map(|(path, query)| {
            let facts = RequestFacts {
                host,
                port,
                method: method.as_str(),
                path,
                query,
            };
            match policy.push_scope(&facts) {
                PushScope::Unrestricted => None,
                PushScope::Refs(globs) => Some(globs),
            }
        })
        .collect()
}

/// Decides a receive-pack body held to `globs`. `head` is the body as the gateway has
/// buffered it (its start, when it is over the scan cap); `encodings` are the values of
/// its `Content-Encoding` headers. Returns the refs the push updates, for the audit log.
pub(crate) fn check(globs: &[&str], head: &[u8], encodings: &[&[u8]]) -> Result<String, Refusal> {
    let unreadable = |why: String| Refusal {
        reason: UNREADABLE,
        detail: format!("git push refused: {why}"),
    };
    let decoded;
    let body: &[u8] = match encodings {
        [] => head,
        // `git http-backend` and Gitea undo exactly these; anything else they would
        // read raw, so it is refused rather than read one way here and another there.
        [coding] if *coding == b"gzip" || *coding == b"x-gzip" => {
            decoded = crate::dlp::decode::decode_with(head, Some("gzip"), MAX_SECTION, false);
            match &decoded {
                crate::dlp::decode::Decoded::Complete(bytes)
                | crate::dlp::decode::Decoded::Truncated(bytes) => bytes,
                crate::dlp::decode::Decoded::Failed(why) => {
                    return Err(unreadable(format!("the gzip body does not decode: {why}")));
                }
            }
        }
        _ => {
            let shown: Vec<String> = encodings.iter().map(|c| excerpt(c)).collect();
            return Err(unreadable(format!(
                "unsupported content-encoding `{}`",
                shown.join(", ")
            )));
        }
    };
    let parsed = parse(body).map_err(|e| unreadable(e.to_string()))?;
    let mut refused: Vec<(&str, RefProblem)> = Vec::new();
    for command in &parsed.commands {
        if let Err(problem) = judge(command, globs) {
            refused.push((&command.refname, problem));
        }
    }
    let listed = |items: &mut dyn Iterator<Item = String>, total: usize| {
        let mut shown: Vec<String> = items.take(DETAIL_REFS).collect();
        if total > DETAIL_REFS {
            shown.push(format!("and {} more", total - DETAIL_REFS));
        }
        shown.join(", ")
    };
    if refused.is_empty() {
        let total = parsed.commands.len();
        return Ok(format!(
            "{PUSH_DETAIL_PREFIX}{total} ref(s): {}",
            listed(
                &mut parsed
                    .commands
                    .iter()
                    .map(|c| format!("{} {}", cut(&c.refname), c.new)),
                total
            )
        ));
    }
    let total = refused.len();
    let refs = listed(
        &mut refused
            .iter()
            .map(|(name, problem)| format!("{} ({})", cut(name), problem.as_str())),
        total,
    );
    let allowed = if globs.is_empty() {
        "no ref at this path".to_string()
    } else {
        listed(&mut globs.iter().map(|g| cut(g)), globs.len())
    };
    Err(Refusal {
        reason: REF_NOT_ALLOWED,
        detail: format!(
            "git push refused whole: {refs}; push_refs allows {allowed}, never deletes, tags only by a refs/tags/ glob"
        ),
    })
}

fn cut(text: &str) -> String {
    if text.len() <= DETAIL_REF_BYTES {
        return text.to_string();
    }
    let mut end = DETAIL_REF_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn excerpt(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(DETAIL_REF_BYTES)];
    let mut text: String = String::from_utf8_lossy(shown)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if bytes.len() > shown.len() {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZERO: &str = "0000000000000000000000000000000000000000";
    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const GLOBS: &[&str] = &["refs/heads/bot-bottle/*"];

    fn pkt(payload: &[u8]) -> Vec<u8> {
        let mut out = format!("{:04x}", payload.len() + 4).into_bytes();
        out.extend_from_slice(payload);
        out
    }

    fn cmd(old: &str, new: &str, refname: &str) -> Vec<u8> {
        format!("{old} {new} {refname}\n").into_bytes()
    }

    /// A body as git sends it: the first command carries the capabilities.
    fn body(commands: &[(&str, &str, &str)], capabilities: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (old, new, refname)) in commands.iter().enumerate() {
            let mut line = format!("{old} {new} {refname}").into_bytes();
            if i == 0 {
                line.push(0);
                line.extend_from_slice(capabilities.as_bytes());
            }
            line.push(b'\n');
            out.extend(pkt(&line));
        }
        out.extend_from_slice(b"0000PACK\x00\x00\x00\x02");
        out
    }

    fn refused(globs: &[&str], body: &[u8]) -> Refusal {
        check(globs, body, &[]).expect_err("must be refused")
    }

    #[test]
    fn reads_the_commands_git_sends() {
        let parsed = parse(&body(
            &[
                (ZERO, A, "refs/heads/bot-bottle/run-1"),
                (A, B, "refs/heads/bot-bottle/run-2"),
            ],
            " report-status side-band-64k object-format=sha1 agent=git/2.47",
        ))
        .expect("parses");
        assert_eq!(parsed.commands.len(), 2);
        assert_eq!(parsed.commands[0].refname, "refs/heads/bot-bottle/run-1");
        assert_eq!(parsed.commands[0].old, ZERO);
        assert!(!parsed.commands[0].is_delete());
        assert_eq!(parsed.commands[1].new, B);
        assert_eq!(parsed.push_options, 0);
        // The capability list is not part of the ref name, with or without a newline.
        let bare = [
            pkt(format!("{A} {B} refs/heads/bot-bottle/x\0report-status").as_bytes()),
            b"0000".to_vec(),
        ]
        .concat();
        assert_eq!(
            parse(&bare).expect("parses").commands[0].refname,
            "refs/heads/bot-bottle/x"
        );
        // The probe git sends before a large push is a lone flush: no commands.
        assert_eq!(parse(b"0000").expect("probe").commands, Vec::new());
        assert!(check(GLOBS, b"0000", &[]).is_ok());
    }

    #[test]
    fn sha256_ids_and_shallow_lines_are_read() {
        let old = "0".repeat(64);
        let new = "ab".repeat(32);
        let mut raw = pkt(format!("shallow {}\n", "c".repeat(64)).as_bytes());
        raw.extend(body(
            &[(&old, &new, "refs/heads/bot-bottle/x")],
            "object-format=sha256",
        ));
        let parsed = parse(&raw).expect("parses");
        assert_eq!(parsed.commands.len(), 1);
        assert_eq!(parsed.commands[0].new, new);
        // Mixed lengths, odd lengths and non-hex ids are not commands.
        for line in [
            format!("{old} {B} refs/heads/x"),
            format!("{A} {} refs/heads/x", &B[..39]),
            format!("{A} {}g refs/heads/x", &B[..39]),
            format!("{A}  {B} refs/heads/x"),
            format!("{A} {B}"),
            format!("{A} {B} "),
            "shallow 1234".to_string(),
            "push-cert-end".to_string(),
        ] {
            let raw = [pkt(line.as_bytes()), b"0000".to_vec()].concat();
            assert!(parse(&raw).is_err(), "{line:?} must not parse");
        }
    }

    #[test]
    fn push_options_follow_their_own_flush() {
        let mut raw = body(
            &[(ZERO, A, "refs/heads/bot-bottle/x")],
            "report-status push-options",
        );
        raw.truncate(raw.len() - b"PACK\x00\x00\x00\x02".len());
        raw.extend(pkt(b"ci.skip"));
        raw.extend(pkt(b"merge_request.create"));
        raw.extend_from_slice(b"0000PACK");
        let parsed = parse(&raw).expect("parses");
        assert_eq!(parsed.push_options, 2);
        assert_eq!(parsed.commands.len(), 1);
        // Options with no closing flush are a truncated body, not a pass.
        let cut = raw.len() - b"0000PACK".len();
        assert_eq!(parse(&raw[..cut]), Err(ParseError::Truncated));
        // Too many options.
        let mut many = body(&[(ZERO, A, "refs/heads/bot-bottle/x")], "push-options");
        many.truncate(many.len() - b"PACK\x00\x00\x00\x02".len());
        for _ in 0..=MAX_PUSH_OPTIONS {
            many.extend(pkt(b"o"));
        }
        many.extend_from_slice(b"0000");
        assert_eq!(parse(&many), Err(ParseError::TooManyPushOptions));
    }

    #[test]
    fn hostile_framing_is_refused() {
        let good = pkt(&cmd(ZERO, A, "refs/heads/bot-bottle/x"));
        let cases: Vec<(Vec<u8>, ParseError)> = vec![
            (Vec::new(), ParseError::Truncated),
            (b"00".to_vec(), ParseError::Truncated),
            (good.clone(), ParseError::Truncated),
            (good[..good.len() - 3].to_vec(), ParseError::Truncated),
            (
                [good.clone(), b"000".to_vec()].concat(),
                ParseError::Truncated,
            ),
            (b"zzzz".to_vec(), ParseError::BadLength("zzzz".into())),
            (
                b"PACK\x00\x00\x00\x02".to_vec(),
                ParseError::BadLength("PACK".into()),
            ),
            (b"-010".to_vec(), ParseError::BadLength("-010".into())),
            (b"0003".to_vec(), ParseError::BadLength("0003".into())),
            (b"0004".to_vec(), ParseError::EmptyPacket),
            (b"fff1".to_vec(), ParseError::BadLength("fff1".into())),
            (b"ffff".to_vec(), ParseError::BadLength("ffff".into())),
            (
                [
                    good.clone(),
                    b"0001".to_vec(),
                    good.clone(),
                    b"0000".to_vec(),
                ]
                .concat(),
                ParseError::SpecialPacket("delim (0001)"),
            ),
            (
                [good.clone(), b"0002".to_vec()].concat(),
                ParseError::SpecialPacket("response-end (0002)"),
            ),
            (
                [
                    pkt(b"push-cert\0report-status\n"),
                    pkt(b"certificate version 0.1\n"),
                    b"0000".to_vec(),
                ]
                .concat(),
                ParseError::PushCert,
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(
                parse(&raw),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(&raw)
            );
            let refusal = refused(GLOBS, &raw);
            assert_eq!(refusal.reason, UNREADABLE, "{}", refusal.detail);
        }
        // A length that claims more than the body holds, at the largest git allows.
        let mut huge = b"fff0".to_vec();
        huge.extend(vec![b'a'; 100]);
        assert_eq!(parse(&huge), Err(ParseError::Truncated));
    }

    #[test]
    fn the_section_is_bounded() {
        // Too many commands.
        let commands: Vec<(&str, &str, &str)> =
            vec![(ZERO, A, "refs/heads/bot-bottle/x"); MAX_COMMANDS + 1];
        assert_eq!(
            parse(&body(&commands, "")),
            Err(ParseError::TooManyCommands)
        );
        let commands: Vec<(&str, &str, &str)> =
            vec![(ZERO, A, "refs/heads/bot-bottle/x"); MAX_COMMANDS];
        assert_eq!(
            parse(&body(&commands, ""))
                .expect("at the cap")
                .commands
                .len(),
            MAX_COMMANDS
        );
        // Over the byte cap without a flush: shallow lines do not count as commands but
        // do count as bytes.
        let shallow = pkt(format!("shallow {A}\n").as_bytes());
        let mut raw = Vec::new();
        while raw.len() <= MAX_SECTION {
            raw.extend_from_slice(&shallow);
        }
        raw.extend_from_slice(b"0000");
        assert_eq!(parse(&raw), Err(ParseError::TooLarge));
        let refusal = refused(GLOBS, &raw);
        assert!(refusal.detail.contains("cap"), "{}", refusal.detail);
    }

    #[test]
    fn bad_ref_names_are_refused() {
        for name in [
            "refs/heads/bot-bottle/../main",
            "refs/heads/bot-bottle//x",
            "refs/heads/bot-bottle/x/",
            "refs/heads/bot-bottle/x.",
            "refs/heads/bot-bottle/.x",
            "refs/heads/bot-bottle/x.lock",
            "refs/heads/bot-bottle/x@{1}",
            "refs/heads/bot-bottle/x y",
            "refs/heads/bot-bottle/x\ty",
            "refs/heads/bot-bottle/x\ry",
            "refs/heads/bot-bottle/x\\y",
            "refs/heads/bot-bottle/x:y",
            "refs/heads/bot-bottle/x*",
            "refs/heads/bot-bottle/x?",
            "refs/heads/bot-bottle/x[",
            "refs/heads/bot-bottle/x~1",
            "refs/heads/bot-bottle/x^",
            "HEAD",
            "bot-bottle/x",
            "",
        ] {
            let raw = [
                pkt(format!("{ZERO} {A} {name}\0report-status").as_bytes()),
                b"0000".to_vec(),
            ]
            .concat();
            assert!(
                matches!(parse(&raw), Err(ParseError::BadRefName(_))),
                "{name:?}"
            );
        }
        // A newline before the NUL is inside the ref name.
        let raw = [
            pkt(format!("{ZERO} {A} refs/heads/bot-bottle/x\n\0caps").as_bytes()),
            b"0000".to_vec(),
        ]
        .concat();
        assert!(matches!(parse(&raw), Err(ParseError::BadRefName(_))));
        // Not UTF-8.
        let mut line = format!("{ZERO} {A} refs/heads/bot-bottle/").into_bytes();
        line.extend_from_slice(&[0xff, 0xfe]);
        let raw = [pkt(&line), b"0000".to_vec()].concat();
        assert!(matches!(parse(&raw), Err(ParseError::BadRefName(_))));
    }

    #[test]
    fn refs_are_judged_against_the_globs() {
        let judge_ref = |old: &str, new: &str, name: &str, globs: &[&str]| {
            judge(
                &Command {
                    old: old.into(),
                    new: new.into(),
                    refname: name.into(),
                },
                globs,
            )
        };
        assert_eq!(
            judge_ref(ZERO, A, "refs/heads/bot-bottle/run-1", GLOBS),
            Ok(())
        );
        assert_eq!(judge_ref(A, B, "refs/heads/bot-bottle/a/b", GLOBS), Ok(()));
        assert_eq!(
            judge_ref(A, ZERO, "refs/heads/bot-bottle/run-1", GLOBS),
            Err(RefProblem::Delete)
        );
        assert_eq!(
            judge_ref(A, B, "refs/heads/main", GLOBS),
            Err(RefProblem::NotMatching)
        );
        assert_eq!(
            judge_ref(A, B, "refs/heads/bot-bottle", GLOBS),
            Err(RefProblem::NotMatching)
        );
        assert_eq!(
            judge_ref(A, B, "refs/heads/bot-bottle-x/y", GLOBS),
            Err(RefProblem::NotMatching)
        );
        // A broad glob does not reach tags; a glob that names refs/tags/ does.
        assert_eq!(
            judge_ref(ZERO, A, "refs/tags/v1", &["refs/*"]),
            Err(RefProblem::Tag)
        );
        assert_eq!(judge_ref(ZERO, A, "refs/heads/x", &["refs/*"]), Ok(()));
        assert_eq!(
            judge_ref(ZERO, A, "refs/tags/v1", &["refs/tags/v*"]),
            Ok(())
        );
        assert_eq!(
            judge_ref(ZERO, A, "refs/tags/v1", &["refs/*", "refs/tags/w*"]),
            Err(RefProblem::Tag)
        );
        // Deletes are refused even when a glob matches.
        assert_eq!(
            judge_ref(A, ZERO, "refs/tags/v1", &["refs/tags/*"]),
            Err(RefProblem::Delete)
        );
    }

    #[test]
    fn a_push_with_one_refused_ref_is_refused_whole() {
        let raw = body(
            &[
                (ZERO, A, "refs/heads/bot-bottle/run-1"),
                (A, B, "refs/heads/main"),
                (A, ZERO, "refs/heads/bot-bottle/old"),
                (ZERO, A, "refs/tags/v1"),
            ],
            "report-status",
        );
        let refusal = refused(GLOBS, &raw);
        assert_eq!(refusal.reason, REF_NOT_ALLOWED);
        assert!(
            refusal
                .detail
                .contains("refs/heads/main (not in push_refs)"),
            "{}",
            refusal.detail
        );
        assert!(
            refusal
                .detail
                .contains("refs/heads/bot-bottle/old (delete)"),
            "{}",
            refusal.detail
        );
        assert!(
            refusal.detail.contains("refs/tags/v1 (tag)"),
            "{}",
            refusal.detail
        );
        assert!(!refusal.detail.contains("run-1"), "{}", refusal.detail);
        // A path no git rule can attribute is held to no ref at all.
        let refusal = refused(&[], &body(&[(ZERO, A, "refs/heads/bot-bottle/run-1")], ""));
        assert_eq!(refusal.reason, REF_NOT_ALLOWED);
        assert!(
            refusal.detail.contains("no ref at this path"),
            "{}",
            refusal.detail
        );
        let ok = check(
            GLOBS,
            &body(&[(ZERO, A, "refs/heads/bot-bottle/run-1")], ""),
            &[],
        )
        .expect("allowed");
        assert!(ok.contains("refs/heads/bot-bottle/run-1"), "{ok}");
    }

    #[test]
    fn an_allowed_push_names_each_ref_and_its_new_id() {
        let detail = check(
            GLOBS,
            &body(
                &[
                    (ZERO, A, "refs/heads/bot-bottle/run-1"),
                    (A, B, "refs/heads/bot-bottle/run-2"),
                ],
                " report-status",
            ),
            &[],
        )
        .expect("allowed");
        assert_eq!(
            detail,
            format!(
                "git push of 2 ref(s): refs/heads/bot-bottle/run-1 {A}, refs/heads/bot-bottle/run-2 {B}"
            )
        );
        assert_eq!(pushed_ids(&detail), vec![A.to_owned(), B.to_owned()]);
        assert!(pushed_ids("git push refused whole: x").is_empty());
        assert!(pushed_ids(&format!("git push of 1 ref(s): refs/heads/a {ZERO}")).is_empty());
        assert!(pushed_ids("git push of 1 ref(s): refs/heads/a not-an-id").is_empty());
    }

    #[test]
    fn the_detail_is_bounded() {
        let long = format!("refs/heads/{}", "x".repeat(10_000));
        let mut commands = vec![(ZERO, A, long.as_str())];
        commands.extend(vec![(ZERO, A, "refs/heads/main"); 500]);
        let refusal = refused(GLOBS, &body(&commands, ""));
        assert!(refusal.detail.len() < 4096, "{}", refusal.detail.len());
        assert!(
            refusal.detail.contains("and 493 more"),
            "{}",
            refusal.detail
        );
    }

    #[test]
    fn gzip_bodies_are_decoded_and_other_codings_refused() {
        use std::io::Write as _;
        let gzip = |data: &[u8]| {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(data).expect("in memory");
            encoder.finish().expect("in memory")
        };
        let main = gzip(&body(&[(A, B, "refs/heads/main")], "report-status"));
        let refusal = check(GLOBS, &main, &[b"gzip"]).expect_err("main");
        assert_eq!(refusal.reason, REF_NOT_ALLOWED);
        assert!(
            refusal.detail.contains("refs/heads/main"),
            "{}",
            refusal.detail
        );
        // Read raw, the same body would be garbage: the coding decides what is read.
        assert_eq!(refused(GLOBS, &main).reason, UNREADABLE);
        let allowed = gzip(&body(&[(A, B, "refs/heads/bot-bottle/x")], "report-status"));
        assert!(check(GLOBS, &allowed, &[b"x-gzip"]).is_ok());
        // A gzip body that is cut short or is not gzip is refused, never passed.
        assert_eq!(
            check(GLOBS, &allowed[..allowed.len() / 2], &[b"gzip"])
                .expect_err("cut")
                .reason,
            UNREADABLE
        );
        let plain = body(&[(A, B, "refs/heads/bot-bottle/x")], "report-status");
        assert_eq!(
            check(GLOBS, &plain, &[b"gzip"])
                .expect_err("not gzip")
                .reason,
            UNREADABLE
        );
        // Codings a git server would not undo, several headers, or a coding list.
        for codings in [
            vec![&b"br"[..]],
            vec![&b"deflate"[..]],
            vec![&b"GZIP"[..]],
            vec![&b"identity"[..]],
            vec![&b"gzip, gzip"[..]],
            vec![&b"gzip"[..], &b"gzip"[..]],
        ] {
            let refusal = check(GLOBS, &plain, &codings).expect_err("coding");
            assert_eq!(refusal.reason, UNREADABLE);
            assert!(
                refusal.detail.contains("content-encoding"),
                "{}",
                refusal.detail
            );
        }
        // A gzip bomb costs at most the section cap: the commands come first.
        let mut big = body(&[(A, B, "refs/heads/main")], "report-status");
        big.extend(vec![0u8; 8 << 20]);
        let refusal = check(GLOBS, &gzip(&big), &[b"gzip"]).expect_err("bomb");
        assert_eq!(refusal.reason, REF_NOT_ALLOWED);
    }

    #[test]
    fn no_input_makes_it_panic_or_pass_a_bad_ref() {
        let mut next = crate::xorshift();
        let seeds = [
            body(
                &[
                    (ZERO, A, "refs/heads/bot-bottle/run-1"),
                    (A, B, "refs/heads/main"),
                ],
                "report-status push-options",
            ),
            body(&[(A, ZERO, "refs/tags/v1")], "report-status"),
            [
                pkt(format!("shallow {A}\n").as_bytes()),
                body(&[(A, B, "refs/heads/bot-bottle/x")], "atomic"),
            ]
            .concat(),
        ];
        for round in 0..30_000 {
            let mut raw = seeds[round % seeds.len()].clone();
            for _ in 0..next() % 6 {
                let at = usize::try_from(next() % raw.len() as u64).expect("fits");
                raw[at] = u8::try_from(next() & 0xff).expect("byte");
            }
            raw.truncate(usize::try_from(next() % (raw.len() as u64 + 1)).expect("fits"));
            let Ok(parsed) = parse(&raw) else { continue };
            for command in &parsed.commands {
                assert!(refname_ok(&command.refname), "{command:?}");
                assert_eq!(command.old.len(), command.new.len());
            }
            if check(GLOBS, &raw, &[]).is_ok() {
                assert!(parsed.commands.iter().all(|c| {
                    !c.is_delete() && c.refname.starts_with("refs/heads/bot-bottle/")
                }));
            }
        }
    }
}
