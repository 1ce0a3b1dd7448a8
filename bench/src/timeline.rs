//! A migration's timeline: the bytes the WAN carried towards the
//! destination, the phases (pre-copy rounds, the freeze, post-copy) and the
//! post-copy faults over time, as JSON ([`Timeline`]) and as a PNG
//! ([`draw`]).
//!
//! The bytes are counted by the emulated WAN's delay line ([`sample_wan`]),
//! not by the engine: what crossed the link, headers and retransmissions
//! included.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use serde::Serialize;
use wanmig_datapath::engine::FaultTimeline;
use wanmig_datapath::report::MigrationReport;
use wanmig_planner::heatmap::{self, HeatmapError};
use wanmig_wan::Wan;

/// Bytes forwarded from the source host towards the destination, sampled.
pub type WanSamples = Vec<(Instant, u64)>;

/// Runs `f` while a thread samples the bytes `wan` forwards from the source
/// host to the destination every `interval`; returns `f`'s result and the
/// samples (one before `f` starts and one after it ends included).
pub fn sample_wan<T>(wan: &Wan, interval: Duration, f: impl FnOnce() -> T) -> (T, WanSamples) {
    let bytes = || wan.stats().map_or(0, |s| s.src_to_dst.forwarded_bytes);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = vec![(Instant::now(), bytes())];
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(interval);
                samples.push((Instant::now(), bytes()));
            }
            samples
        });
        let out = f();
        stop.store(true, Ordering::Relaxed);
        let mut samples = sampler.join().unwrap_or_default();
        samples.push((Instant::now(), bytes()));
        (out, samples)
    })
}

/// One migration over time; times in seconds from the migration's start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    /// `(t, MB)`: megabytes the WAN carried towards the destination since
    /// the start.
    pub wan_mb: Vec<(f64, f64)>,
    /// Ends of the pre-copy rounds.
    pub round_ends_s: Vec<f64>,
    /// The source paused the guest.
    pub paused_s: f64,
    /// The destination resumed it.
    pub resumed_s: f64,
    /// The push finished.
    pub push_done_s: f64,
    /// Every page and chunk was at the destination.
    pub complete_s: f64,
    /// Post-copy faults per bin, the first bin starting at `resumed_s`.
    pub faults: FaultTimeline,
}

impl Timeline {
    /// The timeline of `report`'s migration with the WAN's `samples`
    /// (`None` if the report lacks the engines' milestones).
    pub fn of(report: &MigrationReport, samples: &[(Instant, u64)]) -> Option<Timeline> {
        let (src, dst) = (report.source.times?, report.destination.times?);
        let at = |t: Instant| {
            t.checked_duration_since(src.start).map_or_else(
                || -src.start.duration_since(t).as_secs_f64(),
                |d| d.as_secs_f64(),
            )
        };
        let base = samples
            .iter()
            .take_while(|(t, _)| *t <= src.start)
            .last()
            .or(samples.first())
            .map_or(0, |(_, b)| *b);
        let wan_mb = samples
            .iter()
            .filter(|(t, _)| *t >= src.start)
            .map(|(t, b)| (at(*t), b.saturating_sub(base) as f64 / 1e6))
            .collect();
        let round_ends_s = report
            .source
            .rounds
            .iter()
            .scan(0.0, |end, r| {
                *end += r.seconds;
                Some(*end)
            })
            .collect();
        Some(Timeline {
            wan_mb,
            round_ends_s,
            paused_s: at(src.paused),
            resumed_s: at(dst.resumed),
            push_done_s: at(src.push_done),
            complete_s: at(dst.complete.max(src.push_done)),
            faults: report.destination.fault_timeline.clone(),
        })
    }
}

/// Drawing a timeline failed.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// The font.
    #[error(transparent)]
    Font(#[from] HeatmapError),
    /// Drawing or encoding.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The output.
        path: PathBuf,
        /// The backend's message.
        message: String,
    },
}

/// Draws `t` into `out` (PNG, 1000 x 700): the WAN's megabytes over time
/// on the phases (pre-copy blue, the freeze red, post-copy green, round ends
/// as grey lines), and below it the post-copy faults per bin.
pub fn draw(out: &Path, t: &Timeline, title: &str) -> Result<(), TimelineError> {
    heatmap::load_font(Path::new(heatmap::DEFAULT_FONT))?;
    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    paint(&root, t, title)
        .and_then(|()| root.present().map_err(|e| e.to_string()))
        .map_err(|message| TimelineError::Draw {
            path: out.to_path_buf(),
            message,
        })
}

/// The image's size.
const SIZE: (u32, u32) = (1000, 700);
/// Pre-copy, freeze and post-copy backgrounds, and the fault bars.
const PRECOPY: RGBColor = RGBColor(200, 220, 250);
const FREEZE: RGBColor = RGBColor(250, 170, 170);
const POSTCOPY: RGBColor = RGBColor(200, 240, 200);
const FAULT_BAR: RGBColor = RGBColor(220, 40, 40);

/// Paints `t` on `root` (the font registered).
fn paint<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    t: &Timeline,
    title: &str,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let end = t
        .wan_mb
        .last()
        .map_or(t.complete_s, |(s, _)| *s)
        .max(t.complete_s)
        .max(1.0);
    let top_mb = t.wan_mb.iter().map(|(_, mb)| *mb).fold(1.0, f64::max) * 1.05;
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (upper, lower) = root.split_vertically(470);

    let mut chart = ChartBuilder::on(&upper)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..end, 0f64..top_mb)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("MB sent over the WAN")
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    let phases = [
        (0.0, t.paused_s, PRECOPY, "pre-copy"),
        (t.paused_s, t.resumed_s, FREEZE, "freeze (downtime)"),
        (t.resumed_s, t.complete_s, POSTCOPY, "post-copy"),
    ];
    for (a, b, c, label) in phases {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a, 0.0), (b.max(a), top_mb)],
                c.filled(),
            )))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
    }
    chart
        .draw_series(
            t.round_ends_s
                .iter()
                .map(|&x| PathElement::new(vec![(x, 0.0), (x, top_mb)], RGBColor(150, 150, 150))),
        )
        .map_err(|e| err(&e))?;
    chart
        .draw_series(std::iter::once(PathElement::new(
            t.wan_mb.clone(),
            BLUE.stroke_width(2),
        )))
        .map_err(|e| err(&e))?
        .label("bytes towards the destination")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;

    let bin = t.faults.bin_s;
    let top_faults = t.faults.faults.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.1;
    let mut faults = ChartBuilder::on(&lower)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..end, 0f64..top_faults)
        .map_err(|e| err(&e))?;
    faults
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("seconds since the migration started")
        .y_desc(format!("faults per {:.0} ms", bin * 1000.0))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    faults
        .draw_series(t.faults.faults.iter().enumerate().map(|(i, &n)| {
            let x = t.resumed_s + i as f64 * bin;
            Rectangle::new([(x, 0.0), (x + bin, n as f64)], FAULT_BAR.filled())
        }))
        .map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline(resumed: f64, complete: f64, faults: Vec<u32>) -> Timeline {
        Timeline {
            wan_mb: (0..=40).map(|i| (i as f64, i as f64 * 5.0)).collect(),
            round_ends_s: vec![10.0, 15.0],
            paused_s: 30.0,
            resumed_s: resumed,
            push_done_s: complete,
            complete_s: complete,
            faults: FaultTimeline {
                bin_s: 0.25,
                stall_s: vec![0.01; faults.len()],
                faults,
            },
        }
    }

    /// Pixels of `colour` in the image of `t`.
    fn pixels(t: &Timeline, colour: RGBColor) -> usize {
        heatmap::load_font(Path::new(heatmap::DEFAULT_FONT)).expect("fonts-dejavu-core");
        let mut buf = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
            paint(&root, t, "test").unwrap();
            root.present().unwrap();
        }
        buf.chunks(3)
            .filter(|p| *p == [colour.0, colour.1, colour.2])
            .count()
    }

    #[test]
    fn phases_and_faults_are_drawn_in_proportion() {
        let t = timeline(30.5, 40.0, vec![3, 0, 5, 1]);
        let (pre, freeze, post) = (
            pixels(&t, PRECOPY),
            pixels(&t, FREEZE),
            pixels(&t, POSTCOPY),
        );
        // 30 s of pre-copy, 0.5 s frozen, 9.5 s of post-copy: the areas
        // follow (the legend box and round lines hide some pre-copy).
        assert!(freeze > 0 && freeze * 30 < pre, "{pre} {freeze} {post}");
        let ratio = post as f64 / pre as f64;
        assert!((0.3..0.4).contains(&ratio), "{pre} {post}");
        assert!(pixels(&t, FAULT_BAR) > 0);
        // No post-copy, no fault: neither is drawn (bar the legend).
        let t = timeline(30.5, 30.5, vec![]);
        assert!(pixels(&t, POSTCOPY) < 200);
        assert_eq!(pixels(&t, FAULT_BAR), 0);
    }
}
