//! Page encodings: a dirty page travels as the smallest of
//! - `Zero`: all bytes zero (nothing sent);
//! - `Raw`: the 4 KiB as they are;
//! - `Xor`: the XOR with the previous version of the page (which the receiver holds),
//!   run-length coded as `(zero bytes u16, literal bytes u16, literals…)*`;
//! - `Lz4` / `Lz4Xor`: LZ4 of the raw page or of the XOR delta (optional).
//!
//! Decoding checks every length and offset; a malformed encoding is an error, never a panic.

use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// Page size.
pub const PAGE: usize = 4096;

/// One encoded page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageData {
    /// All zeros.
    Zero,
    /// The page itself.
    Raw(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Run-length coded XOR with the previous version.
    Xor(#[serde(with = "serde_bytes")] Vec<u8>),
    /// LZ4 of the page.
    Lz4(#[serde(with = "serde_bytes")] Vec<u8>),
    /// LZ4 of the XOR with the previous version.
    Lz4Xor(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl PageData {
    /// Bytes this encoding puts on the wire (payload only).
    pub fn wire_len(&self) -> usize {
        match self {
            PageData::Zero => 0,
            PageData::Raw(b) | PageData::Xor(b) | PageData::Lz4(b) | PageData::Lz4Xor(b) => b.len(),
        }
    }

    /// Whether it is a delta against the receiver's current version of the page (which a
    /// decoder must then have).
    pub fn relative(&self) -> bool {
        matches!(self, PageData::Xor(_) | PageData::Lz4Xor(_))
    }

    /// Short name (for statistics).
    pub fn name(&self) -> &'static str {
        match self {
            PageData::Zero => "zero",
            PageData::Raw(_) => "raw",
            PageData::Xor(_) => "xor",
            PageData::Lz4(_) => "lz4",
            PageData::Lz4Xor(_) => "lz4xor",
        }
    }
}

/// Which encodings the sender may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Delta against the previous version when the sender has it.
    pub xor: bool,
    /// Try LZ4.
    pub lz4: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            xor: true,
            lz4: false,
        }
    }
}

fn is_zero(p: &[u8]) -> bool {
    p.chunks(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// The 8 bytes of `d` at `i` as a word (`i + 8 <= d.len()`).
fn word(d: &[u8], i: usize) -> u64 {
    match d.get(i..i + 8).and_then(|b| b.try_into().ok()) {
        Some(w) => u64::from_ne_bytes(w),
        None => u64::MAX,
    }
}

/// True if some byte of `w` is zero.
fn has_zero_byte(w: u64) -> bool {
    w.wrapping_sub(0x0101_0101_0101_0101) & !w & 0x8080_8080_8080_8080 != 0
}

/// Run-length codes `d` (mostly zero): `(zeros u16, literals u16, literal bytes)*`. Zero runs
/// are skipped a word at a time, and so are words of a literal run without a zero byte (no
/// run of four zeros can start in one); the runs are those of a byte-by-byte scan.
fn rle(d: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < d.len() {
        let z0 = i;
        while i + 8 <= d.len() && word(d, i) == 0 {
            i += 8;
        }
        while i < d.len() && d[i] == 0 {
            i += 1;
        }
        let zeros = i - z0;
        let l0 = i;
        // A literal run ends at 4 zero bytes in a row (cheaper to code as a zero run).
        loop {
            while i + 8 <= d.len() && !has_zero_byte(word(d, i)) {
                i += 8;
            }
            if i >= d.len() || (i + 4 <= d.len() && d[i..i + 4] == [0, 0, 0, 0]) {
                break;
            }
            i += 1;
        }
        if i - l0 == 0 && i == d.len() {
            // Trailing zeros: implicit.
            break;
        }
        out.extend_from_slice(&(zeros as u16).to_le_bytes());
        out.extend_from_slice(&((i - l0) as u16).to_le_bytes());
        out.extend_from_slice(&d[l0..i]);
    }
    out
}

fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

/// `a ^= b`, byte for byte.
fn xor_into(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

/// Encodes `new` (4 KiB), given the receiver's current version `old` if the sender knows it.
pub fn encode(new: &[u8], old: Option<&[u8]>, opts: EncodeOptions) -> PageData {
    debug_assert_eq!(new.len(), PAGE);
    if is_zero(new) {
        return PageData::Zero;
    }
    // The raw page is the fallback, built only if nothing smaller is found (a delta, the
    // common case, then costs no copy of the page).
    let mut best: Option<PageData> = None;
    let mut consider = |c: PageData| {
        if c.wire_len() < best.as_ref().map_or(PAGE, PageData::wire_len) {
            best = Some(c);
        }
    };
    let delta = match (opts.xor, old) {
        (true, Some(o)) if o.len() == PAGE => Some(xor(new, o)),
        _ => None,
    };
    if let Some(d) = &delta {
        consider(PageData::Xor(rle(d)));
    }
    if opts.lz4 {
        consider(PageData::Lz4(lz4_flex::compress(new)));
        if let Some(d) = &delta {
            consider(PageData::Lz4Xor(lz4_flex::compress(d)));
        }
    }
    best.unwrap_or_else(|| PageData::Raw(new.to_vec()))
}

/// Decodes a page; `old` is the receiver's current version of it (needed for XOR encodings).
pub fn decode(gfn: u64, data: &PageData, old: Option<&[u8]>) -> Result<Vec<u8>, ProtocolError> {
    let old = old.filter(|o| o.len() == PAGE);
    let mut page = match (data.relative(), old) {
        (true, None) => {
            return Err(ProtocolError::Page {
                gfn,
                why: "XOR encoding without a previous version".into(),
            })
        }
        (_, Some(o)) => o.to_vec(),
        (_, None) => vec![0u8; PAGE],
    };
    decode_into(gfn, data, &mut page)?;
    Ok(page)
}

/// Decodes a page in place: `page` holds the receiver's current version of it (what XOR
/// encodings are relative to) and the new version on return — no allocation for the common
/// encodings (zero, raw, XOR runs), one buffer for LZ4. On an error `page` is unchanged.
pub fn decode_into(gfn: u64, data: &PageData, page: &mut [u8]) -> Result<(), ProtocolError> {
    let bad = |why: String| ProtocolError::Page { gfn, why };
    if page.len() != PAGE {
        return Err(bad(format!("a page buffer of {} bytes", page.len())));
    }
    let lz4 = |b: &[u8]| {
        lz4_flex::decompress(b, PAGE)
            .ok()
            .filter(|v| v.len() == PAGE)
            .ok_or(ProtocolError::Page {
                gfn,
                why: "LZ4 data does not decode to 4 KiB".into(),
            })
    };
    match data {
        PageData::Zero => page.fill(0),
        PageData::Raw(b) if b.len() == PAGE => page.copy_from_slice(b),
        PageData::Raw(b) => return Err(bad(format!("raw page of {} bytes", b.len()))),
        PageData::Xor(b) => xor_runs_into(gfn, b, page)?,
        PageData::Lz4(b) => page.copy_from_slice(&lz4(b)?),
        PageData::Lz4Xor(b) => xor_into(page, &lz4(b)?),
    }
    Ok(())
}

/// The byte ranges `(offset, len)` of a page that an encoding can have changed, if it names
/// them: the literal runs of an XOR delta (every byte outside them is as it was). None for the
/// encodings that rewrite the whole page, and for a malformed delta. A backup journals only
/// these bytes of a page (`backup::journal`).
pub fn changed_ranges(data: &PageData) -> Option<Vec<(u16, u16)>> {
    let PageData::Xor(enc) = data else {
        return None;
    };
    let mut out = Vec::new();
    let (mut pos, mut i) = (0usize, 0usize);
    while i < enc.len() {
        let h = enc.get(i..i + 4)?;
        let zeros = usize::from(u16::from_le_bytes([h[0], h[1]]));
        let lits = usize::from(u16::from_le_bytes([h[2], h[3]]));
        i += 4 + lits;
        pos += zeros;
        if pos + lits > PAGE || i > enc.len() {
            return None;
        }
        if lits > 0 {
            out.push((pos as u16, lits as u16));
        }
        pos += lits;
    }
    Some(out)
}

/// XORs the run-length coded delta `enc` ([`rle`]) into `page`: every run is checked before
/// the page is touched, so a bad delta leaves it as it was.
fn xor_runs_into(gfn: u64, enc: &[u8], page: &mut [u8]) -> Result<(), ProtocolError> {
    let bad = |why: &str| ProtocolError::Page {
        gfn,
        why: format!("bad XOR run: {why}"),
    };
    for apply in [false, true] {
        let (mut pos, mut i) = (0usize, 0usize);
        while i < enc.len() {
            if enc.len() - i < 4 {
                return Err(bad("truncated run header"));
            }
            let zeros = usize::from(u16::from_le_bytes([enc[i], enc[i + 1]]));
            let lits = usize::from(u16::from_le_bytes([enc[i + 2], enc[i + 3]]));
            i += 4;
            pos += zeros;
            if pos + lits > PAGE || enc.len() - i < lits {
                return Err(bad("run past the end of the page"));
            }
            if apply {
                xor_into(&mut page[pos..pos + lits], &enc[i..i + lits]);
            }
            pos += lits;
            i += lits;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page(f: impl Fn(usize) -> u8) -> Vec<u8> {
        (0..PAGE).map(f).collect()
    }

    #[test]
    fn an_xor_delta_names_the_bytes_it_changes() {
        let old = page(|i| (i / 7) as u8);
        let mut new = old.clone();
        new[10] ^= 1;
        new[11] ^= 2;
        new[3000..3100].fill(0xee);
        let enc = encode(&new, Some(&old), EncodeOptions::default());
        let ranges = changed_ranges(&enc).unwrap();
        // Every changed byte is in a range; the ranges are few and small.
        for (i, (a, b)) in old.iter().zip(&new).enumerate() {
            let inside = ranges
                .iter()
                .any(|&(o, l)| (o as usize..(o + l) as usize).contains(&i));
            assert!(a == b || inside, "byte {i} changed outside the ranges");
        }
        assert!(
            ranges.iter().map(|r| r.1 as usize).sum::<usize>() <= 104,
            "{ranges:?}"
        );
        assert_eq!(changed_ranges(&PageData::Xor(Vec::new())), Some(Vec::new()));
        assert_eq!(changed_ranges(&PageData::Raw(new.clone())), None);
        assert_eq!(changed_ranges(&PageData::Zero), None);
        // Malformed: a truncated header, a run past the page or past the data.
        for bad in [
            vec![1, 0, 1],
            vec![0xff, 0x0f, 2, 0, 1, 2],
            vec![0, 0, 9, 0, 1],
        ] {
            assert_eq!(changed_ranges(&PageData::Xor(bad)), None);
        }
    }

    #[test]
    fn chooses_the_smallest_and_round_trips() {
        let zero = vec![0u8; PAGE];
        assert_eq!(
            encode(&zero, None, EncodeOptions::default()),
            PageData::Zero
        );
        let old = page(|i| (i * 7) as u8);
        let mut new = old.clone();
        new[100] ^= 0xff;
        new[3000..3008].copy_from_slice(b"changed!");
        let e = encode(&new, Some(&old), EncodeOptions::default());
        assert!(matches!(e, PageData::Xor(_)) && e.wire_len() < 32, "{e:?}");
        assert_eq!(decode(1, &e, Some(&old)).unwrap(), new);
        let e = encode(
            &new,
            Some(&old),
            EncodeOptions {
                xor: true,
                lz4: true,
            },
        );
        assert_eq!(decode(1, &e, Some(&old)).unwrap(), new);
        let text = page(|i| b"abcd"[i % 4]);
        let e = encode(
            &text,
            None,
            EncodeOptions {
                xor: false,
                lz4: true,
            },
        );
        assert!(matches!(e, PageData::Lz4(_)));
        assert_eq!(decode(2, &e, None).unwrap(), text);
    }

    #[test]
    fn malformed_encodings_are_errors() {
        assert!(decode(0, &PageData::Raw(vec![1; 10]), None).is_err());
        assert!(decode(0, &PageData::Xor(vec![0, 0, 1, 0]), Some(&[0; PAGE])).is_err());
        assert!(decode(0, &PageData::Xor(vec![]), None).is_err());
        assert!(decode(
            0,
            &PageData::Xor(vec![0xff, 0xff, 0x10, 0]),
            Some(&[0; PAGE])
        )
        .is_err());
        assert!(decode(0, &PageData::Lz4(vec![1, 2, 3]), None).is_err());
    }

    /// The byte-by-byte run-length coder the word-at-a-time one must equal.
    fn rle_bytewise(d: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < d.len() {
            let z0 = i;
            while i < d.len() && d[i] == 0 {
                i += 1;
            }
            let zeros = i - z0;
            let l0 = i;
            while i < d.len() && !(i + 4 <= d.len() && d[i..i + 4] == [0, 0, 0, 0]) {
                i += 1;
            }
            if i - l0 == 0 && i == d.len() {
                break;
            }
            out.extend_from_slice(&(zeros as u16).to_le_bytes());
            out.extend_from_slice(&((i - l0) as u16).to_le_bytes());
            out.extend_from_slice(&d[l0..i]);
        }
        out
    }

    #[test]
    fn runs_at_word_edges_code_as_byte_by_byte() {
        for at in 0..24 {
            for len in 1..12 {
                for gap in [0, 1, 3, 4, 5, 9] {
                    let mut d = vec![0u8; PAGE];
                    d[at..at + len].fill(0x5a);
                    d[at + len + gap..at + 2 * len + gap].fill(0xa5);
                    d[PAGE - 3 - at % 3] = 1;
                    assert_eq!(rle(&d), rle_bytewise(&d), "at {at} len {len} gap {gap}");
                }
            }
        }
        let mut tail = vec![0u8; PAGE];
        tail[PAGE - 1] = 7;
        assert_eq!(rle(&tail), rle_bytewise(&tail));
        assert_eq!(rle(&[1u8; PAGE]), rle_bytewise(&[1u8; PAGE]));
    }

    proptest! {
        #[test]
        fn the_run_length_coder_equals_the_bytewise_one(d in proptest::collection::vec(prop_oneof![3 => Just(0u8), 1 => any::<u8>()], 0..300)) {
            prop_assert_eq!(rle(&d), rle_bytewise(&d));
        }

        #[test]
        fn any_page_round_trips(new in proptest::collection::vec(any::<u8>(), PAGE), old in proptest::collection::vec(any::<u8>(), PAGE), sparse in any::<bool>(), lz4 in any::<bool>()) {
            let new = if sparse { new.iter().zip(&old).enumerate().map(|(i, (n, o))| if i % 97 == 0 { *n } else { *o }).collect() } else { new };
            let e = encode(&new, Some(&old), EncodeOptions { xor: true, lz4 });
            prop_assert_eq!(decode(9, &e, Some(&old)).unwrap(), new);
        }

        #[test]
        fn the_changed_ranges_over_the_old_page_make_the_new_one(new in proptest::collection::vec(any::<u8>(), PAGE), old in proptest::collection::vec(any::<u8>(), PAGE), every in 1usize..300) {
            let new: Vec<u8> = new.iter().zip(&old).enumerate().map(|(i, (n, o))| if i % every == 0 { *n } else { *o }).collect();
            let e = encode(&new, Some(&old), EncodeOptions::default());
            let mut page = old.clone();
            match changed_ranges(&e) {
                Some(ranges) => for (o, l) in ranges {
                    let r = usize::from(o)..usize::from(o) + usize::from(l);
                    page[r.clone()].copy_from_slice(&new[r]);
                },
                None => page.copy_from_slice(&new),
            }
            prop_assert_eq!(page, new);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), kind in 0u8..5) {
            let d = match kind { 0 => PageData::Raw(bytes), 1 => PageData::Xor(bytes), 2 => PageData::Lz4(bytes), 3 => PageData::Lz4Xor(bytes), _ => PageData::Zero };
            let _ = decode(3, &d, Some(&[7u8; PAGE]));
            let _ = decode(3, &d, None);
            let mut page = [7u8; PAGE];
            if decode_into(3, &d, &mut page).is_err() {
                prop_assert_eq!(page, [7u8; PAGE], "a bad page leaves the buffer as it was");
            }
        }

        #[test]
        fn decoding_in_place_equals_decoding(new in proptest::collection::vec(any::<u8>(), PAGE), old in proptest::collection::vec(any::<u8>(), PAGE), every in 1usize..300, lz4 in any::<bool>()) {
            let new: Vec<u8> = new.iter().zip(&old).enumerate().map(|(i, (n, o))| if i % every == 0 { *n } else { *o }).collect();
            let e = encode(&new, Some(&old), EncodeOptions { xor: true, lz4 });
            let mut page = old.clone();
            decode_into(5, &e, &mut page).unwrap();
            prop_assert_eq!(&page, &new);
            prop_assert_eq!(decode(5, &e, Some(&old)).unwrap(), new);
        }
    }
}
