//! Custody secrets and placeholders, and the encoded forms the scanner looks for.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};

/// A real credential held by the gateway. It may leave only toward `hosts`.
///
/// `Debug` never prints the value.
#[derive(Clone)]
pub struct CustodySecret {
    /// The credential's name in the bottle manifest; used in findings and the audit.
    pub name: String,
    /// The real secret.
    pub value: String,
    /// Hosts it is for: exact names or `*.suffix` (any subdomain of `suffix`, not `suffix`
    /// itself), compared ignoring ASCII case and a trailing dot.
    pub hosts: Vec<String>,
}

impl fmt::Debug for CustodySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustodySecret")
            .field("name", &self.name)
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// The stand-in value a bottle holds instead of a custody secret. It must only go to its
/// credential's `hosts`; anywhere else it is an exfiltration attempt.
#[derive(Debug, Clone)]
pub struct PlaceholderSecret {
    pub name: String,
    pub placeholder: String,
    pub hosts: Vec<String>,
}

/// The form in which a custody secret or placeholder was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EncodedForm {
    Raw,
    /// Standard base64 alphabet, any of the three alignments.
    Base64,
    /// URL-safe base64 alphabet, any of the three alignments.
    Base64Url,
    /// Percent-encoded (either hex case; `+` for space as in forms).
    UrlEncoded,
    HexLower,
    HexUpper,
}

impl fmt::Display for EncodedForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EncodedForm::Raw => "raw",
            EncodedForm::Base64 => "base64",
            EncodedForm::Base64Url => "base64url",
            EncodedForm::UrlEncoded => "urlencoded",
            EncodedForm::HexLower => "hex",
            EncodedForm::HexUpper => "HEX",
        })
    }
}

/// Every byte string that reveals `value` when it appears in a message, with its form.
///
/// Base64 of a value embedded in a longer stream depends on the value's offset modulo 3,
/// so each alignment contributes the run of characters that only the value's own bits
/// determine (the edge characters mix in neighbouring bytes and are left out).
pub(crate) fn encoded_forms(value: &[u8]) -> Vec<(Vec<u8>, EncodedForm)> {
    let mut forms: Vec<(Vec<u8>, EncodedForm)> = vec![(value.to_vec(), EncodedForm::Raw)];
    for (engine, form) in [
        (&STANDARD_NO_PAD, EncodedForm::Base64),
        (&URL_SAFE_NO_PAD, EncodedForm::Base64Url),
    ] {
        for align in 0..3usize {
            let mut padded = vec![0u8; align];
            padded.extend_from_slice(value);
            let encoded = engine.encode(&padded);
            let first = (8 * align).div_ceil(6);
            let last = 8 * (align + value.len()) / 6;
            if last > first {
                forms.push((encoded.as_bytes()[first..last].to_vec(), form));
            }
        }
    }
    for upper in [true, false] {
        let encoded = percent_encode(value, upper);
        forms.push((encoded.clone(), EncodedForm::UrlEncoded));
        if encoded.contains(&b'%') && value.contains(&b' ') {
            let plus: Vec<u8> = percent_encode(&spaces_as_plus(value), upper);
            forms.push((plus, EncodedForm::UrlEncoded));
        }
    }
    forms.push((hex_encode(value, false), EncodedForm::HexLower));
    forms.push((hex_encode(value, true), EncodedForm::HexUpper));
    // The same bytes under two forms (for example a value with nothing to percent-encode)
    // keep the first, most specific label.
    let mut unique: Vec<(Vec<u8>, EncodedForm)> = Vec::with_capacity(forms.len());
    for (needle, form) in forms {
        if !needle.is_empty() && !unique.iter().any(|(seen, _)| *seen == needle) {
            unique.push((needle, form));
        }
    }
    unique
}

/// Marks spaces for form encoding: `percent_encode` turns the sentinel into `+`.
fn spaces_as_plus(value: &[u8]) -> Vec<u8> {
    value
        .iter()
        .map(|&byte| if byte == b' ' { SPACE_AS_PLUS } else { byte })
        .collect()
}

/// 0xFF never appears in UTF-8, so it is free to mark "space as `+`".
const SPACE_AS_PLUS: u8 = 0xFF;

fn percent_encode(value: &[u8], upper: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &byte in value {
        if byte == SPACE_AS_PLUS {
            out.push(b'+');
        } else if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte);
        } else {
            out.push(b'%');
            out.extend_from_slice(&hex_encode(&[byte], upper));
        }
    }
    out
}

fn hex_encode(value: &[u8], upper: bool) -> Vec<u8> {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    let mut out = Vec::with_capacity(value.len() * 2);
    for &byte in value {
        out.push(digits[usize::from(byte >> 4)]);
        out.push(digits[usize::from(byte & 0x0F)]);
    }
    out
}

/// `pattern` is `name` or `*.suffix` (subdomains only); ASCII case and a trailing dot are
/// ignored. The same rule as the egress policy's host patterns in `bot-bottle-core`.
pub(crate) fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if let Some(suffix) = pattern.strip_prefix("*.") {
        let Some(head_len) = host.len().checked_sub(suffix.len() + 1) else {
            return false;
        };
        head_len > 0
            && host.is_char_boundary(head_len)
            && host.as_bytes()[head_len] == b'.'
            && host[head_len + 1..].eq_ignore_ascii_case(suffix)
    } else {
        pattern.eq_ignore_ascii_case(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needles(value: &str, form: EncodedForm) -> Vec<String> {
        encoded_forms(value.as_bytes())
            .into_iter()
            .filter(|(_, found)| *found == form)
            .map(|(needle, _)| String::from_utf8(needle).expect("ascii"))
            .collect()
    }

    #[test]
    fn base64_needles_cover_every_alignment() {
        let secret = "s3cr3t-VALUE/with+symbols?";
        for prefix in ["", "a", "ab", "abc", "user:"] {
            let whole = format!("{prefix}{secret}tail");
            for (engine, form) in [
                (&STANDARD_NO_PAD, EncodedForm::Base64),
                (&URL_SAFE_NO_PAD, EncodedForm::Base64Url),
            ] {
                let encoded = engine.encode(whole.as_bytes());
                // Identical needles of the two alphabets are kept once, under `Base64`.
                let mut candidates = needles(secret, form);
                candidates.extend(needles(secret, EncodedForm::Base64));
                assert!(
                    candidates
                        .iter()
                        .any(|needle| encoded.contains(needle.as_str())),
                    "{form} with prefix {prefix:?}"
                );
            }
        }
    }

    #[test]
    fn url_and_hex_forms() {
        assert_eq!(
            needles("a b/c", EncodedForm::UrlEncoded),
            vec!["a%20b%2Fc", "a+b%2Fc", "a%20b%2fc", "a+b%2fc"]
        );
        assert_eq!(needles("Az", EncodedForm::HexLower), vec!["417a"]);
        assert_eq!(needles("Az", EncodedForm::HexUpper), vec!["417A"]);
        // Nothing to percent-encode: the raw form already covers it.
        assert_eq!(
            needles("abc", EncodedForm::UrlEncoded),
            Vec::<String>::new()
        );
    }

    #[test]
    fn hosts() {
        assert!(host_matches("api.example.test", "API.example.test."));
        assert!(host_matches("*.example.test", "a.b.example.test"));
        assert!(!host_matches("*.example.test", "example.test"));
        assert!(!host_matches("*.example.test", "badexample.test"));
        assert!(!host_matches("api.example.test", "api.example.test.evil"));
    }

    #[test]
    fn debug_hides_the_value() {
        let secret = CustodySecret {
            name: "anthropic".to_owned(),
            value: "sk-real-value".to_owned(),
            hosts: vec![],
        };
        assert!(!format!("{secret:?}").contains("sk-real-value"));
    }
}
