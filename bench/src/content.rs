//! Synthetic page contents for benchmarks and tests, deterministic from a
//! seed so a receiver can check every byte.
//!
//! - `random`: xorshift bytes, incompressible (LZ4 ratio 1.0).
//! - `text`: English-like words and numbers, as in logs, source and config
//!   files; LZ4 compresses a 4 KiB page of it roughly 1.5-2.5×.
//! - `zero`: all-zero pages (freshly allocated or freed memory).
//! - `mixed`: per page, 30 % zero, 40 % text, 30 % random, the rough make-up of
//!   a running general-purpose guest's RAM.

use std::fmt;
use std::str::FromStr;

/// What the benchmark pages contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    /// Incompressible bytes.
    Random,
    /// Compressible text.
    Text,
    /// All zero.
    Zero,
    /// A mix of the three.
    Mixed,
}

impl FromStr for Content {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(Content::Random),
            "text" => Ok(Content::Text),
            "zero" => Ok(Content::Zero),
            "mixed" => Ok(Content::Mixed),
            _ => Err(format!("unknown content {s:?} (random, text, zero, mixed)")),
        }
    }
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Content::Random => "random",
            Content::Text => "text",
            Content::Zero => "zero",
            Content::Mixed => "mixed",
        })
    }
}

const WORDS: &[&str] = &[
    "the",
    "migration",
    "of",
    "a",
    "virtual",
    "machine",
    "page",
    "dirty",
    "round",
    "link",
    "over",
    "wan",
    "kernel",
    "memory",
    "storage",
    "chunk",
    "error",
    "info",
    "request",
    "response",
    "user",
    "session",
    "timeout",
    "connection",
    "server",
    "client",
    "value",
    "config",
    "=",
    "true",
    "false",
    "null",
    "{",
    "}",
    "(",
    ")",
    ";",
    "return",
    "if",
    "else",
    "for",
    "while",
    "let",
    "fn",
];

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn fill_random(out: &mut [u8], seed: u64) {
    let mut x = splitmix(seed) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

fn fill_text(out: &mut [u8], seed: u64) {
    let mut x = splitmix(seed);
    let mut at = 0;
    while at < out.len() {
        x = splitmix(x);
        let piece = if x % 7 == 0 {
            format!("{} ", x % 100_000)
        } else {
            let w = WORDS[(x >> 8) as usize % WORDS.len()];
            if x % 11 == 0 {
                format!("{w}\n")
            } else {
                format!("{w} ")
            }
        };
        let n = piece.len().min(out.len() - at);
        out[at..at + n].copy_from_slice(&piece.as_bytes()[..n]);
        at += n;
    }
}

/// Fills `out` with page `index`'s content.
pub fn fill_page(content: Content, seed: u64, index: u64, out: &mut [u8]) {
    let s = splitmix(seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93));
    match content {
        Content::Random => fill_random(out, s),
        Content::Text => fill_text(out, s),
        Content::Zero => out.fill(0),
        Content::Mixed => match s % 10 {
            0..=2 => out.fill(0),
            3..=6 => fill_text(out, s),
            _ => fill_random(out, s),
        },
    }
}

/// Fills a whole region, page by page.
pub fn fill_region(content: Content, seed: u64, page_size: usize, region: &mut [u8]) {
    for (i, page) in region.chunks_mut(page_size).enumerate() {
        fill_page(content, seed, i as u64, page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use wanmig_datapath::wire::{Compression, UnitKind, encode_buffer_len, encode_unit};

    /// Page bytes per payload byte as the datapath encodes them.
    fn lz4_ratio(content: Content) -> f64 {
        let mut page = vec![0u8; 4096];
        let mut out = vec![0u8; encode_buffer_len(4096, Compression::Lz4)];
        let (mut raw, mut packed) = (0usize, 0usize);
        for i in 0..256 {
            fill_page(content, 1, i, &mut page);
            raw += page.len();
            packed += encode_unit(&mut out, UnitKind::Page, i, &page, Compression::Lz4)
                .unwrap()
                .payload_len;
        }
        raw as f64 / packed as f64
    }

    #[test]
    fn contents_have_the_documented_compressibility() {
        assert!(lz4_ratio(Content::Random) < 1.01);
        let t = lz4_ratio(Content::Text);
        assert!((1.5..3.0).contains(&t), "text ratio {t}");
    }

    #[test]
    fn pages_are_deterministic_and_distinct() {
        let (mut a, mut b, mut c) = (vec![0; 4096], vec![0; 4096], vec![0; 4096]);
        fill_page(Content::Text, 5, 9, &mut a);
        fill_page(Content::Text, 5, 9, &mut b);
        fill_page(Content::Text, 5, 10, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let zeros = (0..1000)
            .filter(|&i| {
                fill_page(Content::Mixed, 3, i, &mut a);
                a.iter().all(|&x| x == 0)
            })
            .count();
        assert!((200..400).contains(&zeros), "mixed zero pages {zeros}/1000");
    }
}
