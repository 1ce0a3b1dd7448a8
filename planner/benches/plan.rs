//! A full plan (model build + 101 x 101 grid + both ternary searches + the
//! chosen point's full prediction + rules) for a 1 TiB RAM + 16 TiB disk
//! guest, from its class histogram (`synth::class_profile`: the expected
//! histogram of the workload, so no 1.4 GB profile file is read; loading and
//! class-compressing a real profile is a separate, I/O-bound pass).
//!
//! Run: `cargo bench -p wanmig-planner --bench plan`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use wanmig_planner::model::{Link, ModelParams};
use wanmig_planner::plan::make_plan;
use wanmig_planner::search::SearchOptions;
use wanmig_planner::synth::{SynthConfig, Workload, class_profile};

const TIB: u64 = 1 << 40;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan_1TiB_ram_16TiB_disk");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    let links = [
        (
            "10gbit_20ms",
            Link {
                bandwidth: 10e9 / 8.0,
                rtt: 0.020,
            },
        ),
        (
            "40mbit_5ms",
            Link {
                bandwidth: 40e6 / 8.0,
                rtt: 0.005,
            },
        ),
    ];
    for workload in [Workload::MemoryHeavy, Workload::IoHeavy] {
        let classes = class_profile(&SynthConfig::new(TIB, 16 * TIB, workload));
        for (name, link) in links {
            let id = format!(
                "{workload}_{name}_{}+{}classes",
                classes.pages.len(),
                classes.chunks.len()
            );
            group.bench_function(id, |b| {
                b.iter(|| {
                    let plan = make_plan(
                        black_box(&classes),
                        None,
                        link,
                        ModelParams::default(),
                        &SearchOptions::default(),
                    )
                    .expect("plan");
                    black_box(plan.search.chosen)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
