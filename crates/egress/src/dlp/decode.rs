//! `Content-Encoding` decoding with a hard cap on the decoded size.

use std::borrow::Cow;
use std::io::Read;

/// The default cap on a body's decoded size: 8 MiB.
///
/// A body is buffered whole before it is scanned, so this bounds the gateway's memory per
/// request. Decoders stop producing output one byte past the cap, so a decompression bomb
/// costs at most this much memory and the CPU to inflate it.
pub const DEFAULT_MAX_DECODED: usize = 8 << 20;

/// zstd frames may ask for a window of up to 2 GiB. 2^23 bytes covers any frame whose
/// content fits under the default cap, and bounds the decoder's own allocation.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

#[derive(Debug)]
pub(crate) enum Decoded<'a> {
    /// The whole decoded body, within the cap.
    Complete(Cow<'a, [u8]>),
    /// The first `cap` decoded bytes; there was more.
    Truncated(Cow<'a, [u8]>),
    Failed(String),
}

/// Undoes the codings of a `Content-Encoding` value (applied in the order listed, so
/// undone in reverse).
pub(crate) fn decode<'a>(
    body: &'a [u8],
    content_encoding: Option<&str>,
    cap: usize,
) -> Decoded<'a> {
    let codings: Vec<String> = content_encoding
        .unwrap_or_default()
        .split(',')
        .map(|coding| coding.trim().to_ascii_lowercase())
        .filter(|coding| !coding.is_empty() && coding != "identity")
        .collect();
    let mut current: Cow<'a, [u8]> = Cow::Borrowed(body);
    // Once a stage overflows, later stages only see a prefix of their input, so their
    // decoders may fail at the cut; what they produced before it is still scanned.
    let mut truncated = false;
    for coding in codings.iter().rev() {
        let input: &[u8] = &current;
        let result = match coding.as_str() {
            "gzip" | "x-gzip" => read_capped(flate2::read::MultiGzDecoder::new(input), cap),
            "deflate" => {
                if looks_like_zlib(input) {
                    read_capped(flate2::read::ZlibDecoder::new(input), cap)
                } else {
                    // Some servers send raw deflate despite RFC 9110 saying zlib.
                    read_capped(flate2::read::DeflateDecoder::new(input), cap)
                }
            }
            "br" => read_capped(brotli::Decompressor::new(input, 4096), cap),
            "zstd" => match zstd::stream::read::Decoder::with_buffer(input) {
                Ok(mut decoder) => match decoder.window_log_max(ZSTD_WINDOW_LOG_MAX) {
                    Ok(()) => read_capped(decoder, cap),
                    Err(error) => Err((Vec::new(), error.to_string())),
                },
                Err(error) => Err((Vec::new(), error.to_string())),
            },
            other => {
                return Decoded::Failed(format!("unsupported content-encoding `{other}`"));
            }
        };
        current = match result {
            Ok((output, overflowed)) => {
                truncated |= overflowed;
                Cow::Owned(output)
            }
            Err((partial, _)) if truncated => Cow::Owned(partial),
            Err((_, reason)) => {
                return Decoded::Failed(format!("`{coding}` body does not decode: {reason}"));
            }
        };
    }
    if current.len() > cap {
        truncated = true;
        current = match current {
            Cow::Borrowed(bytes) => Cow::Borrowed(&bytes[..cap]),
            Cow::Owned(mut bytes) => {
                bytes.truncate(cap);
                Cow::Owned(bytes)
            }
        };
    }
    if truncated {
        Decoded::Truncated(current)
    } else {
        Decoded::Complete(current)
    }
}

/// Reads at most `cap` bytes; the flag says there was more. On error, returns what was
/// read before it.
fn read_capped(reader: impl Read, cap: usize) -> Result<(Vec<u8>, bool), (Vec<u8>, String)> {
    let mut output = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    match reader.take(limit).read_to_end(&mut output) {
        Ok(_) => {
            let overflowed = output.len() > cap;
            output.truncate(cap);
            Ok((output, overflowed))
        }
        Err(error) => Err((output, error.to_string())),
    }
}

/// RFC 1950 header check: CM = 8 (deflate) and the 16-bit header is a multiple of 31.
fn looks_like_zlib(input: &[u8]) -> bool {
    match input {
        [cmf, flg, ..] => cmf & 0x0F == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;

    use super::*;

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).expect("in memory");
        encoder.finish().expect("in memory")
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).expect("in memory");
        encoder.finish().expect("in memory")
    }

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(data).expect("in memory");
        encoder.finish().expect("in memory")
    }

    fn brotli(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut writer = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
            writer.write_all(data).expect("in memory");
        }
        out
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        zstd::encode_all(data, 3).expect("in memory")
    }

    fn complete(decoded: Decoded<'_>) -> Vec<u8> {
        match decoded {
            Decoded::Complete(bytes) => bytes.into_owned(),
            other => panic!("expected a complete body, got {other:?}"),
        }
    }

    #[test]
    fn every_coding_round_trips() {
        let body = b"{\"prompt\": \"hello world\"}".repeat(50);
        for (coding, encoded) in [
            ("gzip", gzip(&body)),
            ("x-gzip", gzip(&body)),
            ("deflate", zlib(&body)),
            ("deflate", raw_deflate(&body)),
            ("br", brotli(&body)),
            ("zstd", zstd(&body)),
            ("identity", body.clone()),
        ] {
            assert_eq!(
                complete(decode(&encoded, Some(coding), DEFAULT_MAX_DECODED)),
                body,
                "{coding}"
            );
        }
        assert_eq!(complete(decode(&body, None, DEFAULT_MAX_DECODED)), body);
    }

    #[test]
    fn stacked_codings_are_undone_in_reverse() {
        let body = b"layered body".to_vec();
        let encoded = brotli(&gzip(&body));
        assert_eq!(
            complete(decode(&encoded, Some("gzip, br"), DEFAULT_MAX_DECODED)),
            body
        );
    }

    #[test]
    fn unknown_and_corrupt_bodies_fail() {
        assert!(matches!(
            decode(b"abc", Some("compress"), 100),
            Decoded::Failed(reason) if reason.contains("`compress`")
        ));
        assert!(matches!(
            decode(b"definitely not gzip", Some("gzip"), 100),
            Decoded::Failed(_)
        ));
    }

    /// About 1 GiB of zeros in about 1 MiB: one compressed MiB of zeros repeated as
    /// concatenated members (gzip) or frames (zstd), which decoders must accept.
    pub(crate) fn gzip_bomb() -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&vec![0u8; 1 << 20]).expect("in memory");
        encoder.finish().expect("in memory").repeat(1024)
    }

    #[test]
    fn bomb_stops_at_the_cap() {
        let cap = 1 << 20;
        let bomb = gzip_bomb();
        assert!(bomb.len() < 2 << 20, "bomb is {} bytes", bomb.len());
        match decode(&bomb, Some("gzip"), cap) {
            Decoded::Truncated(prefix) => assert_eq!(prefix.len(), cap),
            other => panic!("expected truncation, got {other:?}"),
        }
        let zstd_bomb = zstd(&vec![0u8; 1 << 20]).repeat(1024);
        match decode(&zstd_bomb, Some("zstd"), cap) {
            Decoded::Truncated(prefix) => assert_eq!(prefix.len(), cap),
            other => panic!("expected truncation, got {other:?}"),
        }
    }

    #[test]
    fn identity_over_the_cap_is_truncated() {
        match decode(&[b'x'; 10], None, 4) {
            Decoded::Truncated(prefix) => assert_eq!(&*prefix, b"xxxx"),
            other => panic!("expected truncation, got {other:?}"),
        }
    }
}
