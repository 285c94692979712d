//! `cargo bench -p protocol --bench encoding`: wire bytes per dirty page for each encoding, for
//! page patterns of the guest's workloads. Prints Markdown for docs/BENCHMARKS.md.
//!
//! - CHURN: the test guest's churn loop writes one byte per page per pass into a zeroed region;
//!   the previous version differs in that byte only.
//! - KV heap: a page of the guest's key-value store (keys/values and allocator metadata, mostly
//!   printable bytes) where one 40-byte record changed since the previous version.
//! - zero: a page that became all zeros.
//! - random: incompressible data, fully rewritten.

use std::time::Instant;

use protocol::checkpoint::{encode_frames, Checkpoint};
use protocol::message::Kind;
use protocol::page::{decode, encode, EncodeOptions, PageData, PAGE};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn patterns() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let mut rng = Rng(42);
    let mut churn_old = vec![0u8; PAGE];
    churn_old[0] = 41;
    let mut churn_new = churn_old.clone();
    churn_new[0] = 42;
    let kv_old: Vec<u8> = (0..PAGE)
        .map(|i| {
            if i % 64 < 40 {
                b'a' + (rng.next() % 26) as u8
            } else {
                (i / 64) as u8
            }
        })
        .collect();
    let mut kv_new = kv_old.clone();
    for b in &mut kv_new[1024..1064] {
        *b = b'A' + (rng.next() % 26) as u8;
    }
    let random_old: Vec<u8> = (0..PAGE).map(|_| rng.next() as u8).collect();
    let random_new: Vec<u8> = (0..PAGE).map(|_| rng.next() as u8).collect();
    vec![
        (
            "CHURN (one byte changed in a zero page)",
            churn_old,
            churn_new,
        ),
        ("KV heap (one 40-byte record changed)", kv_old, kv_new),
        ("zero page", random_old.clone(), vec![0u8; PAGE]),
        ("random, fully rewritten", random_old, random_new),
    ]
}

/// Wire bytes per page of a 256-page checkpoint (page data plus framing and run lists).
fn per_page_on_wire(old: &[u8], new: &[u8], opts: Option<EncodeOptions>) -> f64 {
    let pages: Vec<(u64, PageData)> = (0..256)
        .map(|g| {
            let d = match opts {
                Some(o) => encode(new, Some(old), o),
                None => PageData::Raw(new.to_vec()),
            };
            (g, d)
        })
        .collect();
    let cp = Checkpoint {
        epoch: 1,
        kind: Kind::Incremental,
        mem_size: 1 << 30,
        pages,
        disk: vec![],
        state: None,
    };
    let bytes: usize = encode_frames(1, 0, &cp).iter().map(Vec::len).sum();
    bytes as f64 / 256.0
}

fn main() {
    println!(
        "## Bytes on the wire per dirty page (256-page checkpoint: data + frames + run lists)\n"
    );
    println!("| page pattern | raw | XOR+RLE | LZ4 | best of XOR/LZ4 | encode µs/page (best) | encode + decode µs/page, XOR only (the default) |");
    println!("|---|---|---|---|---|---|---|");
    for (name, old, new) in patterns() {
        let raw = per_page_on_wire(&old, &new, None);
        let xor = per_page_on_wire(
            &old,
            &new,
            Some(EncodeOptions {
                xor: true,
                lz4: false,
            }),
        );
        let lz4 = per_page_on_wire(
            &old,
            &new,
            Some(EncodeOptions {
                xor: false,
                lz4: true,
            }),
        );
        let best = per_page_on_wire(
            &old,
            &new,
            Some(EncodeOptions {
                xor: true,
                lz4: true,
            }),
        );
        let timed = |lz4: bool| {
            let t = Instant::now();
            for _ in 0..20_000 {
                let e = encode(&new, Some(&old), EncodeOptions { xor: true, lz4 });
                assert_eq!(decode(0, &e, Some(&old)).unwrap(), new);
            }
            t.elapsed().as_secs_f64() * 1e6 / 20_000.0
        };
        let (us, us_xor) = (timed(true), timed(false));
        println!(
            "| {name} | {raw:.0} | {xor:.0} | {lz4:.0} | {best:.0} | {us:.1} (with decode) | {us_xor:.2} |"
        );
    }
}
