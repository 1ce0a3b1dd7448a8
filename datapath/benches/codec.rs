//! Per-page cost of the frame codec on one core: the zero check, LZ4 attempt
//! and CRC on the way out; CRC check and unpack on the way in. These bound how
//! fast one engine thread can feed (or drain) a link.
//!
//! `cargo bench -p wanmig-datapath --bench codec`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wanmig_datapath::wire::{
    Compression, Decoded, FrameDecoder, FrameRef, Geometry, Limits, PROTOCOL_VERSION, UnitKind,
    encode_buffer_len, encode_unit,
};

const PAGE: usize = 4096;
const PAGES: usize = 256;

fn pages(kind: &str) -> Vec<u8> {
    let mut v = vec![0u8; PAGE * PAGES];
    let mut x = 0x1234_5678_9abc_def1u64;
    match kind {
        "random" => {
            for b in v.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        "text" => {
            let words = [
                "wanmig ", "page ", "dirty ", "round ", "1234 ", "link\n", "the ",
            ];
            let mut at = 0;
            while at < v.len() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let w = words[(x % words.len() as u64) as usize].as_bytes();
                let n = w.len().min(v.len() - at);
                v[at..at + n].copy_from_slice(&w[..n]);
                at += n;
            }
        }
        _ => {}
    }
    v
}

fn codec(c: &mut Criterion) {
    let geometry = Geometry::new(PAGE as u32, PAGES as u64, 64 << 10, 1, 1 << 20);
    let decoder = FrameDecoder::new(Limits::from_geometry(&geometry).unwrap(), PROTOCOL_VERSION);
    for kind in ["random", "text", "zero"] {
        let src = pages(kind);
        let mut out = vec![0u8; encode_buffer_len(PAGE, Compression::Lz4) * PAGES];
        let slot = encode_buffer_len(PAGE, Compression::Lz4);
        let mut g = c.benchmark_group(format!("codec/{kind}"));
        g.throughput(Throughput::Bytes((PAGE * PAGES) as u64));
        g.bench_function("encode_lz4", |b| {
            b.iter(|| {
                for (i, page) in src.chunks(PAGE).enumerate() {
                    let o = &mut out[i * slot..(i + 1) * slot];
                    encode_unit(o, UnitKind::Page, i as u64, page, Compression::Lz4).unwrap();
                }
            })
        });
        // A stream of encoded frames to decode.
        let mut stream = Vec::new();
        for (i, page) in src.chunks(PAGE).enumerate() {
            let mut o = vec![0u8; slot];
            let n = encode_unit(&mut o, UnitKind::Page, i as u64, page, Compression::Lz4)
                .unwrap()
                .len;
            stream.extend_from_slice(&o[..n]);
        }
        let mut dst = vec![0u8; PAGE * PAGES];
        g.bench_function("decode_unpack", |b| {
            b.iter(|| {
                let mut at = 0;
                while at < stream.len() {
                    let Decoded::Frame { frame, consumed } = decoder.decode(&stream[at..]).unwrap()
                    else {
                        panic!("incomplete")
                    };
                    if let FrameRef::Unit { index, payload, .. } = frame {
                        let i = index as usize * PAGE;
                        payload.unpack_into(&mut dst[i..i + PAGE]).unwrap();
                    }
                    at += consumed;
                }
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = codec
}
criterion_main!(benches);
