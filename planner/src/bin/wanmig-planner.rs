//! `wanmig-planner`: plan, predict, serve, draw and synthesise (see the
//! crate README for examples).
//!
//! Exit status: 0 on success; 1 on an error (printed as one line, the
//! causes joined with ": "); 2 from `plan` when live migration is
//! impossible on the link (the best plan available is still printed).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[cfg(feature = "heatmap")]
use wanmig_planner::heatmap::{self, HeatmapOptions};
use wanmig_planner::model::{FreezePolicy, Link, Model, ModelParams, Policy, Prediction, WireCost};
use wanmig_planner::plan::{Plan, PredictedReport, make_plan};
use wanmig_planner::profile::format::AtomicFile;
use wanmig_planner::profile::summary::Summary;
use wanmig_planner::profile::{self, ClassProfile, LoadedProfile};
use wanmig_planner::rule::{PrecopyRule, RuleMode};
use wanmig_planner::search::SearchOptions;
#[cfg(feature = "heatmap")]
use wanmig_planner::search::search;
use wanmig_planner::segment::Segment;
use wanmig_planner::serve::{ReplanPolicy, Server};
use wanmig_planner::synth::{self, SynthConfig, Workload};
use wanmig_planner::units::{ByteSize, Rate, format_duration, parse_duration};

#[derive(Parser, Debug)]
#[command(
    name = "wanmig-planner",
    version,
    about = "Plans adaptive live migration over a WAN: which fractions (M, S) of memory and storage to pre-copy"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Search (M, S) and print the plan.
    Plan(PlanArgs),
    /// Predict one plan (M, S).
    Predict(PredictArgs),
    /// Publish the plan into a shared-memory segment and re-plan from telemetry until SIGTERM/Ctrl-C.
    Serve(ServeArgs),
    /// Draw Gamma over the (M, S) grid as a PNG.
    #[cfg(feature = "heatmap")]
    Heatmap(HeatmapArgs),
    /// Write a synthetic profile.
    Synth(SynthArgs),
    /// Print (or write) the JSON summary of a profile.
    Summary(SummaryArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum PolicyArg {
    /// Gamma = dT / (D + DeltaT).
    Gamma,
    /// 1 / (w1 D + w2 P).
    Weighted,
}

/// The link and model parameters shared by the planning commands.
#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Profile: binary (wanmig-planner synth / the engine's profiler) or JSON summary.
    #[arg(long)]
    profile: PathBuf,
    /// Link bandwidth in bits/s, tc units (40mbit, 1gbit) or bytes (5MB/s).
    #[arg(long)]
    bandwidth: Rate,
    /// Round-trip time (5ms).
    #[arg(long, value_parser = parse_duration)]
    rtt: Duration,
    /// Downtime target: pre-copy stops once the freeze meets it; plans must meet it.
    #[arg(long, value_parser = parse_duration)]
    downtime_target: Option<Duration>,
    /// dT, the restoration window of Gamma.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    delta_t: Duration,
    /// Ranking horizon H (reported only: the ranking does not depend on it).
    #[arg(long, value_parser = parse_duration)]
    horizon: Option<Duration>,
    /// Pre-copy round limit, round 0 included (1: one pass).
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// What the freeze does with a dirty remainder that misses the downtime
    /// limit: `overflow` (what fits goes, hottest first; the coldest dirty
    /// pages are post-copied) or `classic` (everything dirty goes).
    #[arg(long, default_value = "overflow")]
    freeze: FreezePolicy,
    /// Minimum relative shrink of the dirty set for another round.
    #[arg(long, default_value_t = 0.05)]
    min_shrink: f64,
    /// Pre-copy converged when the remainder adds at most this fraction to the fixed freeze time.
    #[arg(long, default_value_t = 0.01)]
    converged: f64,
    /// Resume overhead added to the downtime.
    #[arg(long, value_parser = parse_duration, default_value = "0")]
    resume_overhead: Duration,
    /// Device/CPU state size (overrides the profile's estimate).
    #[arg(long)]
    state: Option<ByteSize>,
    /// Multiplier on every write rate.
    #[arg(long, default_value_t = 1.0)]
    write_scale: f64,
    /// Search objective.
    #[arg(long, value_enum, default_value_t = PolicyArg::Gamma)]
    policy: PolicyArg,
    /// Weight of D in the weighted policy.
    #[arg(long, default_value_t = 1.0)]
    w1: f64,
    /// Weight of P in the weighted policy.
    #[arg(long, default_value_t = 1.0)]
    w2: f64,
    /// Grid worker threads (default: available CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// Use each page's and chunk's own read count, not read rates pooled
    /// across the guest's pages and across its chunks (a unit never seen
    /// read then never faults in the model).
    #[arg(long)]
    per_page_reads: bool,
    /// How units compress on the wire, as `wanmig profile` reports it: unit
    /// bytes per link byte of pages the guest rewrites, the other pages,
    /// chunks it rewrites and the other chunks (e.g. `2.7,1.6,1.0,1.1`).
    /// Default: 1 for all (the link carries units uncompressed).
    #[arg(long, value_parser = parse_wire_ratios)]
    wire_ratios: Option<WireCost>,
}

/// `PW,PU,CW,CU` compression ratios as the planner's wire costs (their
/// inverses).
fn parse_wire_ratios(s: &str) -> Result<WireCost, String> {
    let r: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{s:?}: {e}"))?;
    match r[..] {
        [pw, pu, cw, cu] if r.iter().all(|x| x.is_finite() && *x > 0.0) => Ok(WireCost {
            page_written: 1.0 / pw,
            page_unwritten: 1.0 / pu,
            chunk_written: 1.0 / cw,
            chunk_unwritten: 1.0 / cu,
        }),
        _ => Err(format!(
            "{s:?}: four positive ratios (pages rewritten, other pages, chunks rewritten, other chunks)"
        )),
    }
}

impl ModelArgs {
    fn link(&self) -> Link {
        Link {
            wire: self.wire_ratios.unwrap_or(WireCost::ONE),
            ..Link::new(self.bandwidth, self.rtt)
        }
    }

    fn params(&self) -> ModelParams {
        let dt = self.delta_t.as_secs_f64();
        ModelParams {
            delta_t: dt,
            horizon: self.horizon.map_or(dt, |h| h.as_secs_f64()),
            downtime_target: self.downtime_target.map(|d| d.as_secs_f64()),
            max_rounds: self.max_rounds,
            min_shrink: self.min_shrink,
            converged: self.converged,
            resume_overhead: self.resume_overhead.as_secs_f64(),
            write_scale: self.write_scale,
            state_bytes: self.state.map(|s| s.bytes()),
            pool_reads: !self.per_page_reads,
            freeze: self.freeze,
            policy: match self.policy {
                PolicyArg::Gamma => Policy::Gamma,
                PolicyArg::Weighted => Policy::Weighted {
                    w1: self.w1,
                    w2: self.w2,
                },
            },
        }
    }

    fn search(&self) -> SearchOptions {
        let mut s = SearchOptions::default();
        if let Some(t) = self.threads {
            s.threads = t.max(1);
        }
        s
    }

    fn load(&self) -> Result<LoadedProfile> {
        // The load errors name the file.
        Ok(profile::load(&self.profile)?)
    }
}

#[derive(Args, Debug)]
struct PlanArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Fraction of memory pre-copied.
    #[arg(long)]
    m: f64,
    /// Fraction of storage pre-copied.
    #[arg(long)]
    s: f64,
    /// Treat memory as instantly copied (the seed's storage step).
    #[arg(long)]
    storage_only: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Segment name (/dev/shm/NAME), or a path containing '/'.
    #[arg(long)]
    segment: String,
    #[command(flatten)]
    model: ModelArgs,
    /// Telemetry poll interval.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    poll: Duration,
    /// Relative bandwidth departure that triggers a re-plan.
    #[arg(long, default_value_t = 0.20)]
    bandwidth_threshold: f64,
    /// Relative dirty-rate departure that triggers a re-plan.
    #[arg(long, default_value_t = 0.25)]
    dirty_threshold: f64,
    /// Minimum time between re-plans.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    min_replan_interval: Duration,
}

#[cfg(feature = "heatmap")]
#[derive(Args, Debug)]
struct HeatmapArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
    /// TrueType font for labels.
    #[arg(long, default_value = heatmap::DEFAULT_FONT)]
    font: PathBuf,
    /// Image width.
    #[arg(long, default_value_t = 960)]
    width: u32,
    /// Image height.
    #[arg(long, default_value_t = 800)]
    height: u32,
}

#[derive(Args, Debug)]
struct SynthArgs {
    /// Memory size (4GiB).
    #[arg(long)]
    ram: ByteSize,
    /// Storage size (32GiB).
    #[arg(long)]
    disk: ByteSize,
    /// Workload: memory-heavy, io-heavy, idle, web.
    #[arg(long)]
    workload: Workload,
    /// Output binary profile.
    #[arg(long)]
    out: PathBuf,
    /// Also write the JSON summary here.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Write only the JSON summary (expected class histogram, no per-unit sampling) to --out.
    #[arg(long)]
    classes_only: bool,
    /// Sample intervals n.
    #[arg(long, default_value_t = 60)]
    samples: u32,
    /// Interval length tau.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    interval: Duration,
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Page size.
    #[arg(long, default_value = "4096")]
    page_size: ByteSize,
    /// Chunk size.
    #[arg(long, default_value = "64KiB")]
    chunk_size: ByteSize,
    /// Device-state estimate.
    #[arg(long, default_value = "1MiB")]
    state: ByteSize,
}

#[derive(Args, Debug)]
struct SummaryArgs {
    /// Binary profile or summary.
    #[arg(long)]
    profile: PathBuf,
    /// Write here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Plan(a) => cmd_plan(a),
        Cmd::Predict(a) => cmd_predict(a).map(|()| ExitCode::SUCCESS),
        Cmd::Serve(a) => cmd_serve(a).map(|()| ExitCode::SUCCESS),
        #[cfg(feature = "heatmap")]
        Cmd::Heatmap(a) => cmd_heatmap(a).map(|()| ExitCode::SUCCESS),
        Cmd::Synth(a) => cmd_synth(a).map(|()| ExitCode::SUCCESS),
        Cmd::Summary(a) => cmd_summary(a).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, each printed once.
            eprintln!("wanmig-planner: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, joined with ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

fn gib(bytes: u128) -> String {
    ByteSize(bytes.min(u64::MAX as u128) as u64).to_string()
}

fn describe_profile(path: &Path, c: &ClassProfile) {
    println!(
        "profile {}: memory {} ({} pages, {} classes), storage {} ({} chunks of {}, {} classes), n = {}, tau = {} s, state {} bytes",
        path.display(),
        gib(u128::from(c.page_count) * u128::from(c.page_size)),
        c.page_count,
        c.pages.len(),
        gib(u128::from(c.chunk_count) * u128::from(c.chunk_size)),
        c.chunk_count,
        ByteSize(c.chunk_size),
        c.chunks.len(),
        c.samples,
        c.interval_s,
        c.state_bytes
    );
}

fn describe_link(a: &ModelArgs, p: &ModelParams) {
    println!(
        "link {} RTT {}, dT {} s, downtime target {}, policy {:?}",
        a.bandwidth,
        format_duration(a.rtt),
        p.delta_t,
        p.downtime_target
            .map_or("none".to_string(), |t| format!("{t} s")),
        p.policy
    );
}

fn describe_prediction(p: &Prediction) {
    println!(
        "  predicted: T = {:.3} s (pre-copy {:.3} s in {} round(s), stop: {:?}), D = {:.4} s, U = {:.3} s, P = {:.4} s ({:.1} faults), DeltaT = {:.4} s",
        p.total_s,
        p.precopy_s,
        p.rounds.len(),
        p.stop,
        p.downtime_s,
        p.uptime_s,
        p.penalty_s,
        p.expected_faults,
        p.delta_t_s
    );
    println!(
        "  Gamma = {:.5}, weighted 1/(w1 D + w2 P) = {:.5}, downtime limit {} s met: {}",
        p.gamma, p.gamma_weighted, p.downtime_limit_s, p.meets_downtime_limit
    );
    println!(
        "  freeze: {} policy, at most {} round(s); {:.0} dirty bytes sent while frozen{}",
        p.strategy.freeze,
        p.strategy.max_rounds,
        p.remainder_bytes,
        if p.overflow_bytes > 0.0 {
            format!(
                ", {:.0} bytes ({:.1} pages) did not fit the limit: post-copied first",
                p.overflow_bytes, p.overflow_pages
            )
        } else {
            String::new()
        }
    );
}

fn describe_rule(r: &PrecopyRule) -> String {
    match r.mode {
        RuleMode::None => "none".to_string(),
        RuleMode::All => "all".to_string(),
        RuleMode::Boundary => format!(
            "{} units: every class ranked above (r={}, w={}, o={}, zero={}), plus its first {} units{}",
            r.selected,
            r.boundary.r,
            r.boundary.w,
            r.boundary.o,
            r.boundary.zero,
            r.take,
            r.cutoff.map_or(
                " (cutoff unresolved: summary profile)".to_string(),
                |c| format!(" (index < {c})")
            )
        ),
    }
}

fn print_plan(path: &Path, a: &ModelArgs, classes: &ClassProfile, plan: &Plan) {
    let r = &plan.search;
    describe_profile(path, classes);
    describe_link(a, &plan.params);
    if !r.live.possible {
        println!(
            "LIVE MIGRATION IMPOSSIBLE: {}",
            r.live.reason.as_deref().unwrap_or("")
        );
    } else if let Some(s) = r.live.max_live_s {
        println!(
            "live migration possible: storage pre-copy converges up to S = {s:.2} (memory instantly copied, D <= {} s)",
            r.live.limit_s
        );
    }
    let from = if r.chosen_from == "grid" {
        "grid optimum".to_string()
    } else {
        format!("named strategy {}", r.chosen_from)
    };
    println!(
        "plan: M = {:.2}, S = {:.2} ({from}; the seed recursion {} the grid optimum)",
        r.chosen.m,
        r.chosen.s,
        if r.ternary_is_global {
            "also finds"
        } else {
            "misses"
        }
    );
    describe_prediction(&plan.prediction);
    println!(
        "  grid optimum: M = {:.2}, S = {:.2}, objective {:.5}",
        r.grid.m, r.grid.s, r.grid.objective
    );
    println!(
        "  ternary (seed recursion): S step {:.2} -> M = {:.2}, S = {:.2}, objective {:.5}; global optimum: {} ({} evaluations)",
        r.storage_step.s,
        r.ternary.m,
        r.ternary.s,
        r.ternary.objective,
        if r.ternary_is_global { "yes" } else { "no" },
        r.ternary_evaluations
    );
    for c in &r.candidates {
        println!(
            "  {}: {}",
            c.name,
            if c.point.feasible {
                format!(
                    "objective {:.5} (Gamma {:.5}, D {:.4} s)",
                    c.point.objective, c.point.gamma, c.point.downtime_s
                )
            } else {
                format!(
                    "infeasible: D {:.4} s > L {} s",
                    c.point.downtime_s, r.live.limit_s
                )
            }
        );
    }
    println!("  pages:  {}", describe_rule(&plan.page_rule));
    println!("  chunks: {}", describe_rule(&plan.chunk_rule));
    println!(
        "  planned in {:.2} ms ({} evaluations, {} + {} classes, {} write groups); rules resolved in {:.1} ms",
        plan.elapsed.as_secs_f64() * 1e3,
        r.evaluations,
        plan.classes.0,
        plan.classes.1,
        plan.write_groups,
        plan.resolve_elapsed.as_secs_f64() * 1e3
    );
}

fn cmd_plan(a: PlanArgs) -> Result<ExitCode> {
    let loaded = a.model.load()?;
    let plan = make_plan(
        &loaded.classes,
        loaded.units.as_ref(),
        a.model.link(),
        a.model.params(),
        &a.model.search(),
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan.report())?);
    } else {
        print_plan(&a.model.profile, &a.model, &loaded.classes, &plan);
    }
    if !plan.search.live.possible {
        eprintln!(
            "wanmig-planner: {}",
            plan.search.live.reason.as_deref().unwrap_or("")
        );
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_predict(a: PredictArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&a.m) || !(0.0..=1.0).contains(&a.s) {
        bail!("--m and --s are fractions in [0, 1]");
    }
    let loaded = a.model.load()?;
    let model = Model::new(&loaded.classes, a.model.link(), a.model.params())?;
    let p = if a.storage_only {
        model.predict_storage_only(a.s)
    } else {
        model.predict(a.m, a.s)
    };
    p.check_finite()?;
    if a.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            m: f64,
            s: f64,
            storage_only: bool,
            predicted: PredictedReport,
            prediction: &'a Prediction,
        }
        let out = Out {
            m: p.m,
            s: p.s,
            storage_only: a.storage_only,
            predicted: (&p).into(),
            prediction: &p,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        describe_profile(&a.model.profile, &loaded.classes);
        describe_link(&a.model, model.params());
        println!(
            "prediction for M = {:.4}, S = {:.4}{}:",
            p.m,
            p.s,
            if a.storage_only {
                " (memory instantly copied)"
            } else {
                ""
            }
        );
        describe_prediction(&p);
        for r in &p.rounds {
            println!(
                "    round {}: {:.0} bytes in {:.3} s, {:.0} bytes dirty after",
                r.index, r.bytes, r.duration_s, r.dirty_bytes
            );
        }
    }
    Ok(())
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_signal` is an `extern "C"` function that only stores to
        // a static atomic, which is async-signal-safe; the sigaction struct
        // is fully initialised (zeroed, then handler and empty mask set).
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing signal handlers");
        }
    }
    Ok(())
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    install_signal_handlers()?;
    let loaded = a.model.load()?;
    if loaded.units.is_none() {
        eprintln!(
            "wanmig-planner: warning: {} is a summary; the published rules have no address cutoff (the engine must scan units in address order with PrecopyRule::scanner, which takes the first `take` units of each boundary class)",
            a.model.profile.display()
        );
    }
    let segment = Segment::create(&a.segment)?;
    let policy = ReplanPolicy {
        bandwidth_threshold: a.bandwidth_threshold,
        dirty_threshold: a.dirty_threshold,
        min_interval: a.min_replan_interval,
        ..ReplanPolicy::default()
    };
    let mut server = Server::start(
        &loaded.classes,
        loaded.units.as_ref(),
        &segment,
        a.model.link(),
        a.model.params(),
        a.model.search(),
        policy,
    )?;
    let plan = server.plan();
    eprintln!(
        "wanmig-planner: serving {} generation {}: M = {:.2}, S = {:.2}, Gamma {:.4}, D {:.4} s{}",
        segment.path().display(),
        server.generation(),
        plan.search.chosen.m,
        plan.search.chosen.s,
        plan.prediction.gamma,
        plan.prediction.downtime_s,
        if plan.search.live.possible {
            ""
        } else {
            " (live migration impossible on this link)"
        }
    );
    server.run(&STOP, a.poll, |e| match e {
        Ok(e) => eprintln!(
            "wanmig-planner: re-planned, generation {}: {}",
            e.generation,
            serde_json::to_string(e).unwrap_or_default()
        ),
        Err(e) => eprintln!(
            "wanmig-planner: warning: {} (the previous plan stays published)",
            chain(e)
        ),
    });
    eprintln!(
        "wanmig-planner: stopping; removing {}",
        segment.path().display()
    );
    drop(segment);
    Ok(())
}

#[cfg(feature = "heatmap")]
fn cmd_heatmap(a: HeatmapArgs) -> Result<()> {
    let loaded = a.model.load()?;
    let model = Model::new(&loaded.classes, a.model.link(), a.model.params())?;
    let result = search(&model, &a.model.search());
    result.check_finite()?;
    let opts = HeatmapOptions {
        width: a.width,
        height: a.height,
        font: a.font.clone(),
        title: format!(
            "Gamma over (M, S): {} at {} RTT {}",
            a.model
                .profile
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
            a.model.bandwidth,
            format_duration(a.model.rtt)
        ),
    };
    heatmap::draw(&a.out, &result, &opts)?;
    println!(
        "wrote {}: chosen M = {:.2}, S = {:.2}, Gamma {:.4} (ternary M = {:.2}, S = {:.2}, global: {})",
        a.out.display(),
        result.chosen.m,
        result.chosen.s,
        result.chosen.gamma,
        result.ternary.m,
        result.ternary.s,
        result.ternary_is_global
    );
    Ok(())
}

fn cmd_synth(a: SynthArgs) -> Result<()> {
    let page_size = u32::try_from(a.page_size.bytes()).context("--page-size too large")?;
    let chunk_size = u32::try_from(a.chunk_size.bytes()).context("--chunk-size too large")?;
    let interval_ns = u64::try_from(a.interval.as_nanos()).context("--interval too large")?;
    if a.samples == 0 || interval_ns == 0 || page_size == 0 || chunk_size == 0 {
        bail!("--samples, --interval, --page-size and --chunk-size must be positive");
    }
    let cfg = SynthConfig {
        ram: a.ram.bytes(),
        disk: a.disk.bytes(),
        workload: a.workload,
        samples: a.samples,
        interval_ns,
        page_size,
        chunk_size,
        state_bytes: a.state.bytes(),
        seed: a.seed,
    };
    let start = std::time::Instant::now();
    if a.classes_only {
        let s = Summary::new(synth::class_profile(&cfg))?;
        s.write(&a.out)?;
        println!(
            "wrote {} (class summary: {} + {} classes) in {:.2} s",
            a.out.display(),
            s.profile.pages.len(),
            s.profile.chunks.len(),
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    // Written under a temporary name and renamed into place: a reader of an
    // older profile at the same path is never disturbed.
    let file =
        AtomicFile::create(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let out = synth::write_profile(&cfg, std::io::BufWriter::with_capacity(1 << 20, file))
        .with_context(|| format!("writing {}", a.out.display()))?;
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(AtomicFile::commit)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let h = cfg.header();
    println!(
        "wrote {}: {} {} / {}, {} pages + {} chunks in {:.2} s",
        a.out.display(),
        cfg.workload,
        a.ram,
        a.disk,
        h.page_count,
        h.chunk_count,
        start.elapsed().as_secs_f64()
    );
    if let Some(path) = a.summary {
        let loaded = profile::load(&a.out)?;
        Summary::new(loaded.classes)?.write(&path)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn cmd_summary(a: SummaryArgs) -> Result<()> {
    let loaded = profile::load(&a.profile)?;
    let s = Summary::new(loaded.classes)?;
    match a.out {
        Some(path) => {
            s.write(&path)?;
            println!(
                "wrote {} ({} page classes, {} chunk classes)",
                path.display(),
                s.stats.page_classes,
                s.stats.chunk_classes
            );
        }
        None => println!("{}", serde_json::to_string_pretty(&s)?),
    }
    Ok(())
}
