//! What is timed, per iteration, for a 1 TiB RAM + 16 TiB disk guest
//! (268 M pages, 268 M chunks), from its class histogram
//! (`synth::class_profile`, the expected histogram of the workload; built
//! once, outside the timing):
//!
//! `make_plan(classes, None, ..)` = `Model::new` (ranking, the post-copy
//! stall tables, the grid byte vectors) + `search` (101 storage-only
//! evaluations, both ternary searches, the 101 x 101 grid on the available
//! cores) + the chosen point's full prediction + the two rules.
//!
//! Not timed here: reading and class-compressing a per-unit profile (an
//! I/O-bound pass over a 1.4 GB file) and resolving the rules' address
//! cutoffs against it (a partial pass; see the README for both figures,
//! measured with `plan --json`'s `elapsed_ms` and `resolve_ms`).
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
                wire: wanmig_planner::model::WireCost::ONE,
            },
        ),
        (
            "40mbit_5ms",
            Link {
                bandwidth: 40e6 / 8.0,
                rtt: 0.005,
                wire: wanmig_planner::model::WireCost::ONE,
            },
        ),
    ];
    // The default limit L = dT makes most of the 1 TiB grid infeasible
    // (D > 20 s), and infeasible points skip the post-copy integration;
    // a 10^9 s downtime target makes every point feasible: the worst case.
    let limits = [("", None), ("_all_feasible", Some(1e9))];
    for workload in [Workload::MemoryHeavy, Workload::IoHeavy] {
        let classes = class_profile(&SynthConfig::new(TIB, 16 * TIB, workload));
        for (name, link) in links {
            for (limit_name, target) in limits {
                let id = format!(
                    "{workload}_{name}{limit_name}_{}+{}classes",
                    classes.pages.len(),
                    classes.chunks.len()
                );
                let params = ModelParams {
                    downtime_target: target,
                    ..ModelParams::default()
                };
                group.bench_function(id, |b| {
                    b.iter(|| {
                        let plan = make_plan(
                            black_box(&classes),
                            None,
                            link,
                            params,
                            &SearchOptions::default(),
                        )
                        .expect("plan");
                        black_box(plan.search.chosen)
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
