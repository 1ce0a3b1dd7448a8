//! `wanmig-planner heatmap`: `Gamma` over the `(M, S)` grid as a PNG, with
//! the chosen point, the grid optimum, the ternary answer and the plan
//! family's named strategies ([`Candidate`](crate::search::Candidate))
//! marked.
//!
//! The grid is drawn under the search's strategy (its freeze policy and
//! round limit, named in the caption); grey cells miss the downtime limit
//! `L`. A marked point that misses `L` says so in the legend, with its
//! downtime, and its `Gamma` only as what it would be were it allowed: an
//! infeasible point is never a candidate for the plan.
//!
//! Drawn with plotters' bitmap backend and no system libraries: text is
//! rendered with `ab_glyph` from a TrueType file, by default
//! [`DEFAULT_FONT`] (Debian package `fonts-dejavu-core`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::model::{FreezePolicy, GRID_STEPS};
use crate::search::{Point, SearchResult};

/// The font used for labels unless another is given.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Heatmap errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeatmapError {
    /// The font file could not be read.
    #[error(
        "font {path}: cannot read it (install fonts-dejavu-core, or pass --font PATH to a .ttf)"
    )]
    FontMissing {
        /// The font path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The font file is not a usable TrueType font.
    #[error("font {path}: not a TrueType/OpenType font")]
    FontInvalid {
        /// The font path.
        path: PathBuf,
    },
    /// Drawing or encoding the image failed.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The output path.
        path: PathBuf,
        /// The backend's message.
        message: String,
    },
}

/// Heatmap options.
#[derive(Debug, Clone, PartialEq)]
pub struct HeatmapOptions {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// TrueType font for the labels.
    pub font: PathBuf,
    /// Title line.
    pub title: String,
}

impl Default for HeatmapOptions {
    fn default() -> Self {
        HeatmapOptions {
            width: 960,
            height: 800,
            font: PathBuf::from(DEFAULT_FONT),
            title: "Gamma over (M, S)".to_string(),
        }
    }
}

/// The font file registered with plotters (process-wide), if any.
static FONT: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Registers `path` as plotters' `sans-serif` font unless it already is
/// (for this module's heatmap and any other chart drawn in the process).
/// plotters keeps fonts in a process-wide registry for the life of the
/// process, so each distinct font file is read and leaked once; a later
/// call with another file replaces the registration.
pub fn load_font(path: &Path) -> Result<(), HeatmapError> {
    let mut current = FONT.lock().unwrap_or_else(|e| e.into_inner());
    if current.as_deref() == Some(path) {
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(|source| HeatmapError::FontMissing {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
        HeatmapError::FontInvalid {
            path: path.to_path_buf(),
        }
    })?;
    *current = Some(path.to_path_buf());
    Ok(())
}

/// A perceptually ordered colour map (viridis anchors, linear in between).
fn colour(t: f64) -> RGBColor {
    const ANCHORS: [(u8, u8, u8); 6] = [
        (68, 1, 84),
        (65, 68, 135),
        (42, 120, 142),
        (34, 168, 132),
        (122, 209, 81),
        (253, 231, 37),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (ANCHORS.len() - 1) as f64;
    let i = (x.floor() as usize).min(ANCHORS.len() - 2);
    let f = x - i as f64;
    let lerp = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (ANCHORS[i], ANCHORS[i + 1]);
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

/// What the legend says of a marked point: its `(M, S)` and `Gamma` when
/// it meets the downtime limit `limit`; otherwise that it misses it, by
/// how much, and its `Gamma` only as what it would be (never as if it
/// were a candidate).
pub fn describe_point(p: &Point, limit: f64) -> String {
    if p.feasible {
        format!("M={:.2} S={:.2} Gamma={:.4}", p.m, p.s, p.gamma)
    } else {
        format!(
            "M={:.2} S={:.2} INFEASIBLE: D={:.3} s > L={:.3} s (Gamma {:.4} if it were allowed)",
            p.m, p.s, p.downtime_s, limit, p.gamma
        )
    }
}

/// A strategy in a few words: its freeze policy and round limit.
pub fn describe_strategy(p: &Point) -> String {
    let freeze = match p.strategy.freeze {
        FreezePolicy::Classic => "classic freeze",
        FreezePolicy::Overflow => "overflow freeze",
    };
    match p.strategy.max_rounds {
        1 => format!("{freeze}, one pass"),
        r => format!("{freeze}, <= {r} rounds"),
    }
}

/// Draws the heatmap of `result` into `out` (PNG).
pub fn draw(out: &Path, result: &SearchResult, opts: &HeatmapOptions) -> Result<(), HeatmapError> {
    load_font(&opts.font)?;
    let draw_err = |e: &dyn std::fmt::Display| HeatmapError::Draw {
        path: out.to_path_buf(),
        message: e.to_string(),
    };
    let n = GRID_STEPS + 1;
    let v = &result.values;
    let feasible_gammas = v
        .gamma
        .iter()
        .zip(&v.feasible)
        .filter(|&(_, &ok)| ok)
        .map(|(g, _)| *g);
    let (lo, hi) = feasible_gammas.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), g| {
        (a.min(g), b.max(g))
    });
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 1e-9, lo + 1e-9)
    } else {
        (0.0, 1.0)
    };
    let step = 1.0 / GRID_STEPS as f64;

    let root = BitMapBackend::new(out, (opts.width, opts.height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let (main, bar) = root.split_horizontally(opts.width.saturating_sub(130));
    let limit = result.live.limit_s;
    let caption = format!(
        "{} ({}; grey: D > L = {:.3} s)",
        opts.title,
        describe_strategy(&result.grid),
        limit
    );
    let mut chart = ChartBuilder::on(&main)
        .caption(&caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..1.0 + step, 0f64..1.0 + step)
        .map_err(|e| draw_err(&e))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("M (fraction of memory pre-copied)")
        .y_desc("S (fraction of storage pre-copied)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(|e| draw_err(&e))?;
    let cells = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| {
            let k = i * n + j;
            let (x, y) = (i as f64 * step, j as f64 * step);
            let fill = if v.feasible[k] {
                colour((v.gamma[k] - lo) / (hi - lo)).filled()
            } else {
                RGBColor(170, 170, 170).filled()
            };
            Rectangle::new([(x, y), (x + step, y + step)], fill)
        });
    chart.draw_series(cells).map_err(|e| draw_err(&e))?;
    let centre = |m: f64, s: f64| (m + step / 2.0, s + step / 2.0);
    let marks = [
        (result.grid, "grid optimum", RED, 11),
        (result.ternary, "ternary (seed recursion)", WHITE, 7),
    ];
    for (p, label, c, size) in marks {
        let at = centre(p.m, p.s);
        chart
            .draw_series(std::iter::once(Circle::new(at, size, c.stroke_width(3))))
            .map_err(|e| draw_err(&e))?
            .label(format!("{label}: {}", describe_point(&p, limit)))
            .legend(move |(x, y)| Circle::new((x + 10, y), 6, c.stroke_width(3)));
    }
    // The named strategies (several may share a point: each its own
    // colour, offset a little towards the origin).
    let colours = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(204, 121, 167),
        RGBColor(0, 158, 115),
    ];
    for (k, c) in result.candidates.iter().enumerate() {
        let colour = colours[k % colours.len()];
        let (x, y) = centre(c.point.m, c.point.s);
        let shift = 1.5 * step * k as f64;
        let at = (x - shift, y - shift);
        chart
            .draw_series(std::iter::once(TriangleMarker::new(at, 7, colour.filled())))
            .map_err(|e| draw_err(&e))?
            .label(format!(
                "{} ({}): {}",
                c.name,
                describe_strategy(&c.point),
                describe_point(&c.point, limit)
            ))
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, colour.filled()));
    }
    let chosen = centre(result.chosen.m, result.chosen.s);
    chart
        .draw_series(std::iter::once(Cross::new(
            chosen,
            6,
            BLACK.stroke_width(2),
        )))
        .map_err(|e| draw_err(&e))?
        .label(format!(
            "chosen plan (from {}, {}): {}",
            result.chosen_from,
            describe_strategy(&result.chosen),
            describe_point(&result.chosen, limit)
        ))
        .legend(|(x, y)| Cross::new((x + 10, y), 5, BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| draw_err(&e))?;

    // Colour bar.
    let mut cb = ChartBuilder::on(&bar)
        .margin_top(50)
        .margin_bottom(60)
        .margin_right(10)
        .y_label_area_size(70)
        .caption("Gamma", ("sans-serif", 16))
        .build_cartesian_2d(0f64..1.0, lo..hi)
        .map_err(|e| draw_err(&e))?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(8)
        .y_label_formatter(&|y| format!("{y:.3}"))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| draw_err(&e))?;
    let bands = 200;
    cb.draw_series((0..bands).map(|b| {
        let (y0, y1) = (
            lo + (hi - lo) * b as f64 / bands as f64,
            lo + (hi - lo) * (b + 1) as f64 / bands as f64,
        );
        Rectangle::new(
            [(0.0, y0), (1.0, y1)],
            colour(b as f64 / bands as f64).filled(),
        )
    }))
    .map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}
