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

/// The most content codings (besides `identity`) a body may stack. Each stage can inflate
/// its input up to the cap, so layer after layer of gzip costs a full decode per layer;
/// real clients use one.
pub const MAX_CODINGS: usize = 3;

#[derive(Debug)]
pub(crate) enum Decoded<'a> {
    /// The whole decoded body, within the cap.
    Complete(Cow<'a, [u8]>),
    /// The first `cap` decoded bytes (or what a prefix of the body decodes to); there was
    /// more.
    Truncated(Cow<'a, [u8]>),
    Failed(String),
}

/// The codings of a `Content-Encoding` value (every header line joined with `,`), in the
/// order they were applied, `identity` left out.
///
/// # Errors
/// A coding the gateway cannot undo, or more than [`MAX_CODINGS`] of them.
pub(crate) fn codings(content_encoding: Option<&str>) -> Result<Vec<String>, String> {
    let codings: Vec<String> = content_encoding
        .unwrap_or_default()
        .split(',')
        .map(|coding| coding.trim().to_ascii_lowercase())
        .filter(|coding| !coding.is_empty() && coding != "identity")
        .collect();
    if let Some(other) = codings.iter().find(|coding| {
        !matches!(
            coding.as_str(),
            "gzip" | "x-gzip" | "deflate" | "br" | "zstd"
        )
    }) {
        return Err(format!("unsupported content-encoding `{other}`"));
    }
    if codings.len() > MAX_CODINGS {
        return Err(format!(
            "{} content codings stacked; at most {MAX_CODINGS} are accepted",
            codings.len()
        ));
    }
    Ok(codings)
}

/// Undoes the codings of a `Content-Encoding` value (applied in the order listed, so
/// undone in reverse).
#[cfg(test)]
pub(crate) fn decode<'a>(
    body: &'a [u8],
    content_encoding: Option<&str>,
    cap: usize,
) -> Decoded<'a> {
    decode_with(body, content_encoding, cap, false)
}

/// Like [`decode`]; with `body_is_prefix`, `body` is only the start of the body (the rest
/// was not read), so each decoder may stop at the cut, but only there: input that is not
/// a valid start of its coding still fails.
pub(crate) fn decode_with<'a>(
    body: &'a [u8],
    content_encoding: Option<&str>,
    cap: usize,
    body_is_prefix: bool,
) -> Decoded<'a> {
    let codings = match codings(content_encoding) {
        Ok(codings) => codings,
        Err(reason) => return Decoded::Failed(reason),
    };
    let mut current: Cow<'a, [u8]> = Cow::Borrowed(body);
    // Once a stage overflows (or the body itself is a prefix), later stages only see a
    // prefix of their input, so their decoders may hit its end early; what they produced
    // before it is still scanned.
    let mut truncated = body_is_prefix;
    for coding in codings.iter().rev() {
        let input: &[u8] = &current;
        let result = match coding.as_str() {
            "gzip" | "x-gzip" => read_capped(flate2::read::MultiGzDecoder::new(input), cap),
            "deflate" => {
                if looks_like_zlib(input) {
                    read_all_capped(flate2::bufread::ZlibDecoder::new(input), cap, truncated)
                } else {
                    // Some servers send raw deflate despite RFC 9110 saying zlib.
                    read_all_capped(flate2::bufread::DeflateDecoder::new(input), cap, truncated)
                }
            }
            "br" => brotli_capped(input, cap, truncated),
            _ => match zstd::stream::read::Decoder::with_buffer(input) {
                Ok(mut decoder) => match decoder.window_log_max(ZSTD_WINDOW_LOG_MAX) {
                    Ok(()) => read_capped(decoder, cap),
                    Err(error) => Err((Vec::new(), error.kind(), error.to_string())),
                },
                Err(error) => Err((Vec::new(), error.kind(), error.to_string())),
            },
        };
        current = match result {
            Ok((output, overflowed)) => {
                truncated |= overflowed;
                Cow::Owned(output)
            }
            // Cut input ends mid-stream: that is where it was cut, not corruption.
            Err((partial, std::io::ErrorKind::UnexpectedEof, _)) if truncated => {
                Cow::Owned(partial)
            }
            Err((_, _, reason)) => {
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

type ReadResult = Result<(Vec<u8>, bool), (Vec<u8>, std::io::ErrorKind, String)>;

/// Reads at most `cap` bytes; the flag says there was more. On error, returns what was
/// read before it.
fn read_capped(reader: impl Read, cap: usize) -> ReadResult {
    let mut output = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    match reader.take(limit).read_to_end(&mut output) {
        Ok(_) => {
            let overflowed = output.len() > cap;
            output.truncate(cap);
            Ok((output, overflowed))
        }
        Err(error) => Err((output, error.kind(), error.to_string())),
    }
}

/// A zlib or raw deflate decoder over a slice, which can say what input it left.
trait Remainder: Read {
    fn remainder(&self) -> usize;
}

impl Remainder for flate2::bufread::ZlibDecoder<&[u8]> {
    fn remainder(&self) -> usize {
        self.get_ref().len()
    }
}

impl Remainder for flate2::bufread::DeflateDecoder<&[u8]> {
    fn remainder(&self) -> usize {
        self.get_ref().len()
    }
}

/// [`read_capped`] for a stream that ends by itself: bytes after its end would reach the
/// origin unscanned, so they fail the decode (unless the input was cut, or the output
/// overflowed, and so the end was never reached). A stream that stops without its end
/// marker is cut (`UnexpectedEof`).
fn read_all_capped<R: Remainder>(mut reader: R, cap: usize, input_cut: bool) -> ReadResult {
    let mut output = Vec::new();
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    match (&mut reader).take(limit).read_to_end(&mut output) {
        Ok(_) if output.len() > cap => {
            output.truncate(cap);
            Ok((output, true))
        }
        Ok(_) if reader.remainder() > 0 && !input_cut => Err((
            output,
            std::io::ErrorKind::InvalidData,
            format!("{} bytes after the end of the stream", reader.remainder()),
        )),
        Ok(_) => Ok((output, false)),
        Err(error) => Err((output, error.kind(), error.to_string())),
    }
}

/// Brotli through its stream API, which tells the three endings apart: the input ran out
/// mid-stream (`UnexpectedEof`, a cut), the data is invalid, or bytes follow the end of
/// the stream (which would reach the origin unscanned).
fn brotli_capped(input: &[u8], cap: usize, input_cut: bool) -> ReadResult {
    use brotli::{BrotliDecompressStream, BrotliResult, BrotliState, HeapAlloc};
    let mut state = BrotliState::new(
        HeapAlloc::<u8>::new(0),
        HeapAlloc::<u32>::new(0),
        HeapAlloc::<brotli::HuffmanCode>::new(brotli::HuffmanCode::default()),
    );
    let mut output = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut available_in = input.len();
    let mut input_offset = 0;
    let mut total_out = 0;
    loop {
        let mut available_out = chunk.len();
        let mut output_offset = 0;
        let result = BrotliDecompressStream(
            &mut available_in,
            &mut input_offset,
            input,
            &mut available_out,
            &mut output_offset,
            &mut chunk,
            &mut total_out,
            &mut state,
        );
        output.extend_from_slice(&chunk[..output_offset]);
        if output.len() > cap {
            output.truncate(cap);
            return Ok((output, true));
        }
        match result {
            BrotliResult::NeedsMoreOutput => {}
            BrotliResult::ResultSuccess if available_in > 0 && !input_cut => {
                return Err((
                    output,
                    std::io::ErrorKind::InvalidData,
                    format!("{available_in} bytes after the end of the stream"),
                ));
            }
            BrotliResult::ResultSuccess => return Ok((output, false)),
            BrotliResult::NeedsMoreInput => {
                return Err((
                    output,
                    std::io::ErrorKind::UnexpectedEof,
                    "the stream ends early".to_owned(),
                ));
            }
            BrotliResult::ResultFailure => {
                return Err((
                    output,
                    std::io::ErrorKind::InvalidData,
                    "invalid brotli data".to_owned(),
                ));
            }
        }
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
    fn identity_lines_do_not_hide_a_coding_and_stages_are_capped() {
        let body = b"hello layered".to_vec();
        assert_eq!(
            complete(decode(
                &gzip(&body),
                Some("identity, gzip"),
                DEFAULT_MAX_DECODED
            )),
            body
        );
        let three = gzip(&gzip(&gzip(&body)));
        assert_eq!(
            complete(decode(
                &three,
                Some("gzip, gzip, gzip"),
                DEFAULT_MAX_DECODED
            )),
            body
        );
        let four = gzip(&three);
        assert!(matches!(
            decode(&four, Some("gzip, gzip, gzip, gzip"), DEFAULT_MAX_DECODED),
            Decoded::Failed(reason) if reason.contains("at most 3")
        ));
        // An unknown coding anywhere in the list fails before anything is decoded.
        assert!(matches!(
            decode(&gzip(&body), Some("compress, gzip"), DEFAULT_MAX_DECODED),
            Decoded::Failed(reason) if reason.contains("`compress`")
        ));
    }

    #[test]
    fn bytes_after_a_deflate_stream_fail() {
        let mut zlib_tail = zlib(b"short");
        zlib_tail.extend_from_slice(b"AKIA-hidden-after-the-stream");
        assert!(matches!(
            decode(&zlib_tail, Some("deflate"), DEFAULT_MAX_DECODED),
            Decoded::Failed(reason) if reason.contains("after the end")
        ));
        let mut raw_tail = raw_deflate(b"short");
        raw_tail.extend_from_slice(b"AKIA-hidden-after-the-stream");
        assert!(matches!(
            decode(&raw_tail, Some("deflate"), DEFAULT_MAX_DECODED),
            Decoded::Failed(_)
        ));
        let mut brotli_tail = brotli(b"short");
        brotli_tail.extend_from_slice(b"AKIA-hidden-after-the-stream");
        assert!(matches!(
            decode(&brotli_tail, Some("br"), DEFAULT_MAX_DECODED),
            Decoded::Failed(reason) if reason.contains("after the end")
        ));
        let mut gzip_tail = gzip(b"short");
        gzip_tail.extend_from_slice(b"AKIA-hidden-after-the-stream");
        assert!(matches!(
            decode(&gzip_tail, Some("gzip"), DEFAULT_MAX_DECODED),
            Decoded::Failed(_)
        ));
    }

    #[test]
    fn a_cut_body_decodes_up_to_the_cut_but_garbage_fails() {
        // Incompressible-ish text so that the cut falls inside the compressed data.
        let body: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("line {i} {} ", i.wrapping_mul(2_654_435_761)).into_bytes())
            .collect();
        for (coding, encoded) in [
            ("gzip", gzip(&body)),
            ("deflate", zlib(&body)),
            ("deflate", raw_deflate(&body)),
            ("br", brotli(&body)),
            ("zstd", zstd(&body)),
        ] {
            let prefix = &encoded[..encoded.len() / 2];
            match decode_with(prefix, Some(coding), DEFAULT_MAX_DECODED, true) {
                Decoded::Truncated(start) => {
                    assert!(!start.is_empty(), "{coding}: nothing decoded");
                    assert!(body.starts_with(&start), "{coding}");
                }
                other => panic!("{coding}: expected a truncated start, got {other:?}"),
            }
            let garbage = b"this is not compressed at all, just text".repeat(50);
            assert!(
                matches!(
                    decode_with(&garbage, Some(coding), DEFAULT_MAX_DECODED, true),
                    Decoded::Failed(_)
                ),
                "{coding}: garbage prefix decoded"
            );
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
