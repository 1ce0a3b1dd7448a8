//! Model tests: the class model against the per-unit reference, and the
//! sanity properties a modeller checks.

use proptest::prelude::*;

use super::reference::{self, UnitProfile};
use super::*;
use crate::profile::ClassProfile;

fn classes_of(p: &UnitProfile) -> ClassProfile {
    ClassProfile::from_units(
        p.samples,
        p.interval_s,
        p.page_size,
        p.chunk_size,
        p.state_bytes,
        &p.pages,
        &p.chunks,
    )
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 1e-12
}

fn counters(n: u32, chunk: bool) -> impl Strategy<Value = UnitCounters> {
    (0..=n, 0..=n, 0..=n, prop::bool::weighted(0.2)).prop_map(move |(r, w, o, zero)| UnitCounters {
        r,
        w,
        o: if chunk { o.min(w) } else { 0 },
        zero,
    })
}

fn unit_profile() -> impl Strategy<Value = UnitProfile> {
    (1u32..=6).prop_flat_map(|n| {
        (
            Just(n),
            prop::sample::select(vec![0.25, 1.0, 2.0]),
            prop::sample::select(vec![4096u64, 65536]),
            0u64..2_000_000,
            prop::collection::vec(counters(n, false), 0..40),
            prop::collection::vec(counters(n, true), 0..30),
        )
            .prop_map(
                |(samples, interval_s, chunk_size, state_bytes, pages, chunks)| UnitProfile {
                    samples,
                    interval_s,
                    page_size: 4096,
                    chunk_size,
                    state_bytes,
                    pages,
                    chunks,
                },
            )
    })
}

fn params() -> impl Strategy<Value = (Link, ModelParams)> {
    (
        1e4f64..1e7,
        prop::sample::select(vec![0.0, 0.005, 0.1]),
        prop::sample::select(vec![0.05, 0.5, 20.0]),
        prop::option::of(0.0f64..3.0),
        1u32..8,
        prop::sample::select(vec![0.0, 0.05, 0.3]),
        prop::sample::select(vec![0.5, 1.0, 3.0]),
        prop::bool::ANY,
    )
        .prop_map(|(bw, rtt, dt, target, rounds, shrink, scale, weighted)| {
            (
                Link { bandwidth: bw, rtt },
                ModelParams {
                    delta_t: dt,
                    horizon: dt,
                    downtime_target: target,
                    max_rounds: rounds,
                    min_shrink: shrink,
                    converged: if weighted { 0.0 } else { 0.01 },
                    resume_overhead: 0.0,
                    write_scale: scale,
                    state_bytes: None,
                    policy: if weighted {
                        Policy::Weighted { w1: 1.0, w2: 0.5 }
                    } else {
                        Policy::Gamma
                    },
                },
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The class-compressed model equals the per-unit model.
    #[test]
    fn class_model_equals_per_unit_model(
        p in unit_profile(),
        (link, params) in params(),
        m in 0.0f64..=1.0,
        s in 0.0f64..=1.0,
        magic in prop::bool::weighted(0.2),
    ) {
        let model = Model::new(&classes_of(&p), link, params).unwrap();
        let sel = model.selection(m, s);
        let got = model.predict_selection(sel, magic);
        let want = reference::predict(&p, link, &params, sel, magic);
        let pairs = [
            ("precopy", got.precopy_s, want.precopy_s),
            ("remainder", got.remainder_bytes, want.remainder),
            ("D", got.downtime_s, want.downtime),
            ("U", got.uptime_s, want.uptime),
            ("T", got.total_s, want.total),
            ("P", got.penalty_s, want.penalty),
            ("faults", got.expected_faults, want.faults),
            ("window", got.window_stall_s, want.window_stall),
            ("gamma", got.gamma, want.gamma),
            ("gamma_w", got.gamma_weighted, want.gamma_weighted),
        ];
        for (what, a, b) in pairs {
            prop_assert!(close(a, b), "{what}: class {a} vs unit {b}");
        }
        prop_assert_eq!(got.rounds.len() as u32, want.rounds);
        // The fast path (search) agrees with the full prediction.
        let mut scratch = Scratch::default();
        let fast = if magic {
            model.run(&mut scratch, None, Part::Units(sel.chunks), false, None).0
        } else {
            model.run(&mut scratch, Some(Part::Units(sel.pages)), Part::Units(sel.chunks), false, None).0
        };
        prop_assert!(close(fast.delta_t, got.delta_t_s), "fast dT {} vs {}", fast.delta_t, got.delta_t_s);
        prop_assert!(close(fast.downtime, got.downtime_s));
    }

    /// Grid snapshots give the same evaluation as explicit unit counts.
    #[test]
    fn grid_points_match_explicit_selections(
        p in unit_profile(),
        (link, params) in params(),
        i in 0usize..=100,
        j in 0usize..=100,
    ) {
        let model = Model::new(&classes_of(&p), link, params).unwrap();
        let mut scratch = Scratch::default();
        let a = model.evaluate_grid(&mut scratch, i, j);
        let b = model.evaluate(&mut scratch, grid_fraction(i), grid_fraction(j));
        prop_assert!(close(a.objective, b.objective), "{a:?} vs {b:?}");
    }
}

fn never_writing() -> impl Strategy<Value = UnitProfile> {
    unit_profile().prop_map(|mut p| {
        for c in p.pages.iter_mut().chain(p.chunks.iter_mut()) {
            c.w = 0;
            c.o = 0;
        }
        p
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// A guest that never writes: at M = S = 1, D = state / B + RTT exactly,
    /// and nothing is left for post-copy (P = 0, U = 0).
    #[test]
    fn never_writing_guest_at_full_precopy(p in never_writing(), (link, mut params) in params()) {
        params.resume_overhead = 0.0;
        let classes = classes_of(&p);
        let model = Model::new(&classes, link, params).unwrap();
        let pred = model.predict(1.0, 1.0);
        let expected = p.state_bytes as f64 / link.bandwidth + link.rtt;
        prop_assert_eq!(pred.downtime_s, expected);
        prop_assert_eq!(pred.penalty_s, 0.0);
        prop_assert_eq!(pred.uptime_s, 0.0);
        prop_assert_eq!(pred.remainder_bytes, 0.0);
        prop_assert!(pred.rounds.len() <= 1);
        let window = params.delta_t;
        prop_assert_eq!(pred.gamma, window / (expected + window));
    }

    /// M = S = 0 gives the smallest downtime of all plans.
    #[test]
    fn no_precopy_gives_the_smallest_downtime(
        p in unit_profile(),
        (link, params) in params(),
        plans in prop::collection::vec((0.0f64..=1.0, 0.0f64..=1.0), 1..20),
    ) {
        let model = Model::new(&classes_of(&p), link, params).unwrap();
        let d0 = model.predict(0.0, 0.0).downtime_s;
        prop_assert_eq!(d0, model.min_downtime());
        for (m, s) in plans {
            prop_assert!(model.predict(m, s).downtime_s >= d0);
        }
    }
}

#[test]
fn rank_boundaries_cover_the_selection() {
    let p = UnitProfile {
        samples: 4,
        interval_s: 1.0,
        page_size: 4096,
        chunk_size: 65536,
        state_bytes: 0,
        pages: vec![
            UnitCounters::rw(4, 0),
            UnitCounters::rw(4, 0),
            UnitCounters::rw(1, 1),
            UnitCounters::ZERO,
        ],
        chunks: vec![],
    };
    let model = Model::new(
        &classes_of(&p),
        Link {
            bandwidth: 1e6,
            rtt: 0.0,
        },
        ModelParams::default(),
    )
    .unwrap();
    let b = model.boundary(Kind::Page, 1);
    assert_eq!(b.boundary, Some(UnitCounters::rw(4, 0)));
    assert_eq!((b.take, b.boundary_count), (1, 2));
    let b = model.boundary(Kind::Page, 2);
    assert_eq!(b.boundary, Some(UnitCounters::rw(1, 1)));
    assert_eq!(b.take, 0);
    assert_eq!(model.boundary(Kind::Page, 4).boundary, None);
    assert_eq!(model.boundary(Kind::Page, 0).boundary, None);
}

#[test]
fn invalid_inputs_are_refused() {
    let p = classes_of(&UnitProfile {
        samples: 4,
        interval_s: 1.0,
        page_size: 4096,
        chunk_size: 65536,
        state_bytes: 0,
        pages: vec![UnitCounters::rw(1, 1)],
        chunks: vec![],
    });
    let link = Link {
        bandwidth: 1e6,
        rtt: 0.0,
    };
    let bad_link = Link {
        bandwidth: 0.0,
        rtt: 0.0,
    };
    assert!(matches!(
        Model::new(&p, bad_link, ModelParams::default()),
        Err(ModelError::Invalid {
            what: "bandwidth",
            ..
        })
    ));
    let params = ModelParams {
        delta_t: 0.0,
        ..ModelParams::default()
    };
    assert!(matches!(
        Model::new(&p, link, params),
        Err(ModelError::Invalid {
            what: "delta_t",
            ..
        })
    ));
    let params = ModelParams {
        min_shrink: 1.0,
        ..ModelParams::default()
    };
    assert!(Model::new(&p, link, params).is_err());
    let mut broken = p.clone();
    broken.page_count = 7;
    assert!(matches!(
        Model::new(&broken, link, ModelParams::default()),
        Err(ModelError::Profile(_))
    ));
}
