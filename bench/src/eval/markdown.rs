//! The evaluation's Markdown: per workload, predicted vs measured with the
//! floored relative errors, every mode's Gamma with its spread and
//! integrity, the targets judged, and the per-unit predictability tables.

use super::{EvalReport, MAX_ERROR_TARGET, MEDIAN_ERROR_TARGET, MODES, RECOVERED_TARGET};
use crate::predictability::{Predictability, UnitPredictionAccuracy};

fn pct(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{:.1} %", x * 100.0))
}

/// The Markdown tables: per workload, predicted vs measured with the
/// floored relative error, every mode's Gamma with its spread, the targets.
pub fn markdown(r: &EvalReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{} run(s) per mode; a failed run, or one whose integrity does not hold or was not checked, counts as Gamma 0.\n\n",
        r.repeat
    ));
    if let Some(io) = &r.io {
        s.push_str(&format!(
            "The engines' link: {} (sealed in {}), I/O {}; QEMU's own migration streams run unencrypted.\n\n",
            io.cipher, io.cipher_in, io.backend
        ));
    }
    for w in &r.workloads {
        let plan = w.plan.map_or("no planned run completed".into(), |p| {
            format!("M = {:.2}, S = {:.2}", p.m, p.s)
        });
        s.push_str(&format!(
            "### {} ({plan}){}\n\n",
            w.name,
            if w.intact {
                ""
            } else {
                " — INTEGRITY FAILED"
            }
        ));
        if let (Some(p), Some(m), Some(e)) = (w.predicted, w.measured, w.prediction_error) {
            s.push_str(
                "| figure | predicted | measured | error (floored) |\n|---|---:|---:|---:|\n",
            );
            for (name, p, m, err) in [
                ("T (s)", p.total_s, m.total_s, e.total_s),
                ("U (s)", p.uptime_s, m.uptime_s, e.uptime_s),
                ("D (s)", p.downtime_s, m.downtime_s, e.downtime_s),
                ("P (s)", p.penalty_s, m.penalty_s, e.penalty_s),
            ] {
                s.push_str(&format!(
                    "| {name} | {p:.3} | {m:.3} | {:+.1} % |\n",
                    err * 100.0
                ));
            }
            s.push('\n');
        }
        s.push_str(
            "| mode | T (s) | U (s) | D (s) | P (s) | faults | MB sent | Gamma | spread | integrity | note |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---|---|---|\n",
        );
        for mode in MODES {
            let Some(r) = w.modes.get(mode) else {
                s.push_str(&format!("| {mode} | | | | | | | not run | | | |\n"));
                continue;
            };
            let i = &r.integrity;
            let integrity = if !i.checked {
                "NOT CHECKED".to_string()
            } else if i.holds() {
                "ok".to_string()
            } else {
                format!("FAILED ({})", i.failure())
            };
            let mut notes: Vec<String> = r
                .runs
                .iter()
                .map(|x| x.note.clone())
                .filter(|n| !n.is_empty())
                .collect();
            notes.dedup();
            if let Some(e) = &r.error {
                notes.insert(0, format!("failed: {e}"));
            }
            let spread = format!("{:.3}-{:.3}", r.gamma_spread.min, r.gamma_spread.max);
            match &r.measured {
                Some(m) => s.push_str(&format!(
                    "| {mode} | {:.1} | {:.1} | {:.3} | {:.2} | {} | {:.0} | {:.3} | {spread} | {integrity} | {} |\n",
                    m.total_s,
                    m.uptime_s,
                    m.downtime_s,
                    m.penalty_s,
                    m.faults,
                    m.bytes_sent as f64 / 1e6,
                    r.gamma,
                    notes.join("; ")
                )),
                None => s.push_str(&format!(
                    "| {mode} | | | | | | | {:.3} | {spread} | {integrity} | {} |\n",
                    r.gamma,
                    notes.join("; ")
                )),
            }
        }
        let yes = |b: bool| if b { "met" } else { "missed" };
        s.push_str(&format!(
            "\nGamma regret (best other mode minus the plan): {:+.3} (target <= {}: {}). ",
            w.gamma_regret,
            r.gamma_regret_bound,
            yes(w.targets.gamma_regret)
        ));
        s.push_str(&match (w.gamma_recovered, w.targets.gamma_recovered) {
            (_, None) => "Gamma recovered: no QEMU mode ran.\n\n".to_string(),
            (Some(x), Some(met)) => format!(
                "Gamma recovered over the best QEMU mode: {x:.2} (target >= {RECOVERED_TARGET}, or within 0.005 of a best QEMU mode at 0.98 or more: {}).\n\n",
                yes(met)
            ),
            (None, Some(met)) => format!(
                "Gamma recovered: the best QEMU mode reached 1 ({}).\n\n",
                yes(met)
            ),
        });
        if let Some(u) = &w.unit_prediction_accuracy {
            s.push_str(&predictability_markdown(u));
        }
    }
    s.push_str(&format!(
        "Prediction error |predicted - measured| / max(measured, floor) (floors T, U 1 s, D 100 ms, P 500 ms) over T, U, D, P of every workload: median {} (target <= {:.0} %), largest {} (target <= {:.0} %).\n",
        pct(r.median_prediction_error_floored),
        MEDIAN_ERROR_TARGET * 100.0,
        pct(r.max_prediction_error_floored),
        MAX_ERROR_TARGET * 100.0
    ));
    s.push_str(&format!(
        "Every target met: {}.\n",
        if r.all_targets_met { "yes" } else { "no" }
    ));
    s
}

/// The per-unit predictability tables: the seed's per-unit predictor and
/// the planner's own, side by side.
fn predictability_markdown(u: &UnitPredictionAccuracy) -> String {
    let mut s = format!(
        "Per-unit predictability within {:.0} s (predicted / accessed):\n\n\
         | units | predictor | accuracy | yes / yes | yes / no | no / yes | no / no |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
        u.horizon_s
    );
    let planner = if u.planner.pooled_reads {
        "planner (pooled reads)"
    } else {
        "planner"
    };
    let rows: [(&str, &str, Option<&Predictability>); 8] = [
        ("memory read", "per unit", Some(&u.memory_read)),
        ("memory read", planner, Some(&u.planner.memory_read)),
        ("memory write", "per unit", Some(&u.memory_write)),
        ("memory write", planner, Some(&u.planner.memory_write)),
        ("storage read", "per unit", u.storage_read.as_ref()),
        ("storage read", planner, u.planner.storage_read.as_ref()),
        ("storage write", "per unit", u.storage_write.as_ref()),
        ("storage write", planner, u.planner.storage_write.as_ref()),
    ];
    for (name, predictor, p) in rows {
        if let Some(p) = p {
            let t = &p.table;
            s.push_str(&format!(
                "| {name} | {predictor} | {:.1} % | {} | {} | {} | {} |\n",
                p.accuracy * 100.0,
                t.predicted_and_accessed,
                t.predicted_not_accessed,
                t.accessed_not_predicted,
                t.neither
            ));
        }
    }
    s.push_str("\n(The seed: memory 86.1 / 96.1 %, storage 96.9 / 96.6 %, read / write.)\n\n");
    s
}
