//! `integrations bench`: a pgbench for the pool. Runs one statement through
//! the pool from many concurrent callers and reports throughput, latency,
//! pool waits and errors, so users can size `connection_limit` on their own
//! workload (and we can measure ourselves).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use db_pool::types::Type;
use db_pool::{Param, Pool, PoolConfig};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::embedded::Target;
use super::{DatabaseArgs, EXIT_INVALID_INPUT};

/// Options of `integrations bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    db: DatabaseArgs,

    /// The statement to run, e.g. "SELECT id FROM integrations WHERE user_id = 'user' || $1".
    #[arg(long)]
    sql: String,

    /// Range for $1, e.g. 1..100000: each call binds a random integer from it,
    /// as an integer or as text, whichever the server infers for $1.
    #[arg(long, value_parser = parse_range)]
    param_range: Option<RangeInclusive<i64>>,

    /// Concurrent callers (tasks), each running the statement in a loop.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    concurrency: u32,

    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    duration: u64,

    /// Threads driving the callers: 1 (the default) runs them all on one
    /// thread, like `pgbench -j 1`, which leaves the other cores to the
    /// server when it runs on the same machine; 0 uses one per core.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=1024))]
    threads: u16,

    /// Split the run over this many threads, each with its own
    /// single-threaded runtime, its own pool (connection_limit divided
    /// among them) and its share of the callers: pgbench's model
    /// (`pgbench -j N`, each thread owning its clients' connections) and
    /// the thread-per-core one. 1 (the default): one pool for all callers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256), conflicts_with_all = ["threads", "sweep"])]
    runtimes: u16,

    /// Run once per connection_limit in this list (e.g. 2,5,10,20,50) and
    /// print a table of throughput, p99 latency and p99 pool wait per size.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=100_000))]
    sweep: Vec<u32>,

    /// With --sweep: write an SVG chart of throughput and p99 latency
    /// against pool size to this file.
    #[arg(long, requires = "sweep")]
    plot: Option<PathBuf>,

    /// Print one JSON object instead of a report (with --sweep, an array
    /// of them, one per size).
    #[arg(long)]
    json: bool,

    /// Run each statement with `Pool::query` (pipelined on shared
    /// connections) instead of an exclusive checkout per statement; the
    /// pool wait and overhead columns then read 0.
    #[arg(long)]
    pipelined: bool,
}

fn parse_range(s: &str) -> Result<RangeInclusive<i64>, String> {
    let err = || {
        format!("'{s}' is not a range; accepted: FROM..TO with whole numbers, FROM <= TO (e.g. 1..100000)")
    };
    let (a, b) = s.split_once("..").ok_or_else(err)?;
    let b = b.strip_prefix('=').unwrap_or(b);
    let (a, b): (i64, i64) = (
        a.trim().parse().map_err(|_| err())?,
        b.trim().parse().map_err(|_| err())?,
    );
    if a > b {
        return Err(err());
    }
    Ok(a..=b)
}

/// How `$1` is bound.
#[derive(Debug, Clone, Copy)]
enum Binding {
    None,
    Int2,
    Int4,
    Int8,
    Text,
}

/// The report, as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Statements completed per second (errors not counted).
    pub ops_per_sec: f64,
    /// Statements completed.
    pub ops: u64,
    /// Checkout plus statement, per call.
    pub latency_ms: Latency,
    /// Time to check out a connection, per call.
    pub pool_wait_ms: Waits,
    /// The pool's own cost per call, checkout plus return, in microseconds.
    pub pool_overhead_us: Waits,
    /// Failed calls by error code (P2024, P1001, ... or the SQLSTATE).
    pub errors: BTreeMap<String, u64>,
    /// The most connections checked out at once.
    pub max_in_use: usize,
    /// The pool's connection_limit.
    pub connection_limit: usize,
    /// Concurrent callers.
    pub concurrency: u32,
    /// Seconds the run lasted.
    pub duration_secs: f64,
    /// Threads driving the callers (0: one per core).
    pub threads: u16,
    /// Threads each with its own runtime and pool (1: one pool).
    pub runtimes: u16,
}

/// Percentiles of a latency distribution.
#[derive(Debug, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// Percentiles of a wait distribution.
#[derive(Debug, Serialize)]
pub struct Waits {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

struct Recorder {
    latency_ns: Histogram<u64>,
    wait_ns: Histogram<u64>,
    overhead_ns: Histogram<u64>,
    errors: BTreeMap<String, u64>,
}

impl Recorder {
    #[allow(clippy::expect_used)]
    fn new() -> Recorder {
        // Constant, valid bounds: 1 ns to 1 hour at 3 significant figures.
        let h = || Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds");
        Recorder {
            latency_ns: h(),
            wait_ns: h(),
            overhead_ns: h(),
            errors: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Recorder) {
        let _ = self.latency_ns.add(&other.latency_ns);
        let _ = self.wait_ns.add(&other.wait_ns);
        let _ = self.overhead_ns.add(&other.overhead_ns);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// Runs the command: 0 after a run (errors during it are counted, not
/// fatal), 2 on invalid input.
pub fn run(args: BenchArgs) -> ExitCode {
    let target = match Target::of(&args.db) {
        Ok(target) => target,
        Err(code) => return code,
    };
    let threads = usize::from(args.threads);
    super::block_on_threads(
        threads,
        target.run(|cfg, _| async move {
            if !args.sweep.is_empty() {
                return sweep(cfg, args).await;
            }
            let spinner = super::progress::Progress::spinner(format!(
                "{} callers for {}s",
                args.concurrency, args.duration
            ));
            let result = bench(cfg, &args).await;
            spinner.finish();
            match result {
                Ok(report) => {
                    print_report(&report, &args);
                    ExitCode::SUCCESS
                }
                Err(Failed {
                    message,
                    invalid_input,
                }) => {
                    eprintln!("{message}");
                    ExitCode::from(if invalid_input { EXIT_INVALID_INPUT } else { 1 })
                }
            }
        }),
    )
}

/// `--sweep`: one run per pool size, a table, and optionally a chart.
async fn sweep(cfg: PoolConfig, args: BenchArgs) -> ExitCode {
    let mut reports = Vec::new();
    let steps = args.sweep.len();
    for (step, &size) in args.sweep.iter().enumerate() {
        let mut cfg = cfg.clone();
        cfg.connection_limit = size as usize;
        // The current step on a terminal; nothing in a pipe.
        let spinner = super::progress::Progress::spinner(format!(
            "connection_limit={size} ({} of {steps}): {}s",
            step + 1,
            args.duration
        ));
        let result = bench(cfg, &args).await;
        spinner.finish();
        match result {
            Ok(r) => reports.push(r),
            Err(Failed {
                message,
                invalid_input,
            }) => {
                eprintln!("{message}");
                return ExitCode::from(if invalid_input { EXIT_INVALID_INPUT } else { 1 });
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&reports).unwrap_or_default());
    } else {
        println!("statement  {}", args.sql);
        println!(
            "callers    {} for {}s per size",
            args.concurrency, args.duration
        );
        println!();
        println!(
            "{:>16}  {:>12}  {:>14}  {:>18}  {:>7}",
            "connection_limit", "ops/s", "p99 latency ms", "p99 pool wait ms", "errors"
        );
        for r in &reports {
            println!(
                "{:>16}  {:>12.0}  {:>14.3}  {:>18.3}  {:>7}",
                r.connection_limit,
                r.ops_per_sec,
                r.latency_ms.p99,
                r.pool_wait_ms.p99,
                r.errors.values().sum::<u64>()
            );
        }
    }
    if let Some(path) = &args.plot {
        if let Err(e) = plot(&reports, &args.sql, path) {
            eprintln!("error: cannot write the chart to {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("chart written to {}", path.display());
    }
    ExitCode::SUCCESS
}

/// Throughput (left axis), p99 latency and p99 pool wait (right axis)
/// against pool size, with x ticks at the swept sizes only.
fn plot(
    reports: &[Report],
    sql: &str,
    path: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;

    let max_size = reports
        .iter()
        .map(|r| r.connection_limit)
        .max()
        .unwrap_or(1) as f64;
    let max_ops = reports.iter().map(|r| r.ops_per_sec).fold(1.0, f64::max);
    let max_p99 = reports
        .iter()
        .map(|r| r.latency_ms.p99.max(r.pool_wait_ms.p99))
        .fold(0.1, f64::max);
    let sizes: Vec<f64> = reports.iter().map(|r| r.connection_limit as f64).collect();
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let title: String = sql.chars().take(90).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Pool size sweep: {title}"), ("sans-serif", 18))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(
            SweepAxis::new(max_size * 1.05, sizes.clone()),
            0f64..max_ops * 1.15,
        )?
        .set_secondary_coord(SweepAxis::new(max_size * 1.05, sizes), 0f64..max_p99 * 1.15);
    chart
        .configure_mesh()
        .x_desc("connection_limit")
        .y_desc("throughput (ops/s)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("p99 latency and pool wait (ms)")
        .draw()?;
    let ops: Vec<(f64, f64)> = reports
        .iter()
        .map(|r| (r.connection_limit as f64, r.ops_per_sec))
        .collect();
    let p99: Vec<(f64, f64)> = reports
        .iter()
        .map(|r| (r.connection_limit as f64, r.latency_ms.p99))
        .collect();
    chart
        .draw_series(LineSeries::new(ops.clone(), BLUE.stroke_width(2)))?
        .label("throughput (ops/s)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart.draw_series(ops.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))?;
    chart
        .draw_secondary_series(LineSeries::new(p99.clone(), RED.stroke_width(2)))?
        .label("p99 latency (ms)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart.draw_secondary_series(p99.iter().map(|p| Circle::new(*p, 4, RED.filled())))?;
    let wait: Vec<(f64, f64)> = reports
        .iter()
        .map(|r| (r.connection_limit as f64, r.pool_wait_ms.p99))
        .collect();
    let green = RGBColor(0, 140, 60);
    chart
        .draw_secondary_series(LineSeries::new(wait.clone(), green.stroke_width(2)))?
        .label("p99 pool wait (ms)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], green));
    chart.draw_secondary_series(wait.iter().map(|p| Circle::new(*p, 4, green.filled())))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The x axis of the sweep chart: 0 to `max`, with ticks exactly at the
/// swept pool sizes. Written here because plotters' own `with_key_points`
/// wrapper has no label formatter for `f64`, and its default ticks fall
/// between sizes (rounded, they read `0 0 1 2 2 ...`).
struct SweepAxis {
    inner: plotters::coord::types::RangedCoordf64,
    ticks: Vec<f64>,
}

impl SweepAxis {
    fn new(max: f64, ticks: Vec<f64>) -> SweepAxis {
        SweepAxis {
            inner: (0f64..max).into(),
            ticks,
        }
    }
}

impl plotters::coord::ranged1d::Ranged for SweepAxis {
    type ValueType = f64;
    type FormatOption = plotters::coord::ranged1d::DefaultFormatting;

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: plotters::coord::ranged1d::KeyPointHint>(&self, _: Hint) -> Vec<f64> {
        self.ticks.clone()
    }
}

/// Why the benchmark could not run at all.
pub struct Failed {
    /// What went wrong, and the hint.
    pub message: String,
    /// The statement or its parameters are at fault (exit 2), rather than
    /// the server (exit 1).
    pub invalid_input: bool,
}

impl Failed {
    fn server(e: &db_pool::Error) -> Failed {
        Failed {
            message: format!("{e}\nhint: {}", e.hint()),
            invalid_input: matches!(e, db_pool::Error::Config(_)),
        }
    }

    fn input(message: String) -> Failed {
        Failed {
            message,
            invalid_input: true,
        }
    }
}

/// Runs the benchmark and returns its report. Fails only when the
/// statement cannot be run at all (unreachable server, statement invalid,
/// $1 of a type the bench cannot bind).
pub async fn bench(cfg: PoolConfig, args: &BenchArgs) -> Result<Report, Failed> {
    let limit = cfg.connection_limit;
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let started = Instant::now();
    let (all, max_in_use) = if args.runtimes > 1 {
        sharded(&cfg, args, deadline)?
    } else {
        shard(cfg, args, 0..args.concurrency, deadline).await?
    };
    let elapsed = started.elapsed().as_secs_f64();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e6;
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    let ops = all.latency_ns.len();
    Ok(Report {
        ops_per_sec: ops as f64 / elapsed,
        ops,
        latency_ms: Latency {
            p50: ms(&all.latency_ns, 0.5),
            p99: ms(&all.latency_ns, 0.99),
            max: all.latency_ns.max() as f64 / 1e6,
        },
        pool_wait_ms: Waits {
            p50: ms(&all.wait_ns, 0.5),
            p99: ms(&all.wait_ns, 0.99),
        },
        pool_overhead_us: Waits {
            p50: us(&all.overhead_ns, 0.5),
            p99: us(&all.overhead_ns, 0.99),
        },
        errors: all.errors,
        max_in_use,
        connection_limit: limit,
        concurrency: args.concurrency,
        duration_secs: elapsed,
        threads: args.threads,
        runtimes: args.runtimes,
    })
}

/// `--runtimes N`: N threads, each running [`shard`] on its own
/// single-threaded runtime with its part of the connections and callers.
/// Blocks the calling runtime's thread until they end (it has nothing else
/// to do meanwhile).
fn sharded(
    cfg: &PoolConfig,
    args: &BenchArgs,
    deadline: Instant,
) -> Result<(Recorder, usize), Failed> {
    let n = u32::from(args.runtimes);
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let mut cfg = cfg.clone();
                // Connections and callers dealt out as evenly as they go.
                let (limit, share) = (cfg.connection_limit, n as usize);
                cfg.connection_limit =
                    (limit / share + usize::from((i as usize) < limit % share)).max(1);
                let callers = args.concurrency * i / n..args.concurrency * (i + 1) / n;
                scope.spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| Failed {
                            message: format!("error: cannot start the async runtime: {e}"),
                            invalid_input: false,
                        })?;
                    runtime.block_on(shard(cfg, args, callers, deadline))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Failed {
                        message: "error: a bench thread panicked".into(),
                        invalid_input: false,
                    })
                })
            })
            .collect()
    });
    let mut all = Recorder::new();
    let mut max_in_use = 0;
    for result in results {
        let (rec, max) = result?;
        all.merge(rec);
        // Each pool's own most at once, added: at most the true figure.
        max_in_use += max;
    }
    Ok((all, max_in_use))
}

/// One pool and the callers numbered `callers`, until `deadline`: what
/// they recorded and the most connections checked out at once.
async fn shard(
    cfg: PoolConfig,
    args: &BenchArgs,
    callers: std::ops::Range<u32>,
    deadline: Instant,
) -> Result<(Recorder, usize), Failed> {
    let pool = Pool::new(cfg).map_err(|e| Failed::server(&e))?;
    let binding = {
        let mut conn = pool.get().await.map_err(|e| Failed::server(&e))?;
        let types = conn.param_types(&args.sql).await.map_err(|e| match e {
            db_pool::Error::Query { .. } => {
                Failed::input(format!("the statement cannot be prepared: {e}"))
            }
            other => Failed::server(&other),
        })?;
        binding(&types, args.param_range.is_some()).map_err(Failed::input)?
    };
    let range = args.param_range.clone().unwrap_or(1..=1);
    let in_use = Arc::new(AtomicUsize::new(0));
    let max_in_use = Arc::new(AtomicUsize::new(0));
    let sql: Arc<str> = Arc::from(args.sql.as_str());
    let pipelined = args.pipelined;
    let tasks: Vec<_> = callers
        .map(|i| {
            let (pool, sql, range) = (pool.clone(), sql.clone(), range.clone());
            let (in_use, max_in_use) = (in_use.clone(), max_in_use.clone());
            tokio::spawn(async move {
                let mut rng = SmallRng::seed_from_u64(u64::from(i));
                let mut rec = Recorder::new();
                while Instant::now() < deadline {
                    let value = rng.gen_range(range.clone());
                    let t0 = Instant::now();
                    if pipelined {
                        let bound = Bound::new(binding, value);
                        let result = match bound.param() {
                            Some(p) => pool.query(&sql, &[p]).await,
                            None => pool.query(&sql, &[]).await,
                        };
                        match result {
                            Ok(_) => {
                                let _ = rec.latency_ns.record(nanos(t0.elapsed()));
                                let _ = rec.wait_ns.record(0);
                                let _ = rec.overhead_ns.record(0);
                            }
                            Err(e) => {
                                let key = e
                                    .sqlstate()
                                    .map_or_else(|| e.code().to_string(), str::to_string);
                                *rec.errors.entry(key).or_default() += 1;
                            }
                        }
                        continue;
                    }
                    let mut conn = match pool.get().await {
                        Ok(conn) => conn,
                        Err(e) => {
                            *rec.errors.entry(e.code().to_string()).or_default() += 1;
                            continue;
                        }
                    };
                    let waited = t0.elapsed();
                    let now = in_use.fetch_add(1, Ordering::Relaxed) + 1;
                    max_in_use.fetch_max(now, Ordering::Relaxed);
                    let result = call(&mut conn, &sql, binding, value).await;
                    in_use.fetch_sub(1, Ordering::Relaxed);
                    let t_return = Instant::now();
                    drop(conn);
                    let returned = t_return.elapsed();
                    match result {
                        Ok(()) => {
                            let _ = rec.latency_ns.record(nanos(t0.elapsed()));
                            let _ = rec.wait_ns.record(nanos(waited));
                            let _ = rec.overhead_ns.record(nanos(waited + returned));
                        }
                        Err(e) => {
                            let key = e
                                .sqlstate()
                                .map_or_else(|| e.code().to_string(), str::to_string);
                            *rec.errors.entry(key).or_default() += 1;
                        }
                    }
                }
                rec
            })
        })
        .collect();
    let mut all = Recorder::new();
    for t in tasks {
        if let Ok(rec) = t.await {
            all.merge(rec);
        }
    }
    pool.close(Duration::from_secs(5)).await;
    Ok((all, max_in_use.load(Ordering::Relaxed)))
}

fn binding(types: &[Type], has_range: bool) -> Result<Binding, String> {
    match (types, has_range) {
        ([], _) => Ok(Binding::None),
        (_, false) => Err("the statement has parameters: give --param-range FROM..TO for $1".into()),
        ([t], true) => match *t {
            Type::INT2 => Ok(Binding::Int2),
            Type::INT4 => Ok(Binding::Int4),
            Type::INT8 => Ok(Binding::Int8),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Ok(Binding::Text),
            ref other => Err(format!(
                "the server infers {other} for $1; bench binds an integer or text (cast it, e.g. $1::int8)"
            )),
        },
        (more, true) => Err(format!(
            "the statement has {} parameters; bench binds only $1",
            more.len()
        )),
    }
}

/// `$1`'s value, as the type the server infers.
enum Bound {
    None,
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Text(String),
}

impl Bound {
    fn new(binding: Binding, value: i64) -> Bound {
        match binding {
            Binding::None => Bound::None,
            Binding::Int2 => Bound::Int2(i16::try_from(value).unwrap_or(i16::MAX)),
            Binding::Int4 => Bound::Int4(i32::try_from(value).unwrap_or(i32::MAX)),
            Binding::Int8 => Bound::Int8(value),
            Binding::Text => Bound::Text(value.to_string()),
        }
    }

    fn param(&self) -> Option<Param<'_>> {
        match self {
            Bound::None => None,
            Bound::Int2(v) => Some(v),
            Bound::Int4(v) => Some(v),
            Bound::Int8(v) => Some(v),
            Bound::Text(v) => Some(v),
        }
    }
}

async fn call(
    conn: &mut db_pool::Conn,
    sql: &str,
    binding: Binding,
    value: i64,
) -> Result<(), db_pool::Error> {
    let bound = Bound::new(binding, value);
    match bound.param() {
        Some(p) => conn.query(sql, &[p]).await.map(drop),
        None => conn.query(sql, &[]).await.map(drop),
    }
}

fn print_report(r: &Report, args: &BenchArgs) {
    if args.json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    let errors = if r.errors.is_empty() {
        "none".to_string()
    } else {
        r.errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("statement     {}", args.sql);
    println!(
        "load          {} callers on {} for {:.1}s, connection_limit={}",
        r.concurrency,
        match (r.runtimes, r.threads) {
            (n, _) if n > 1 => format!("{n} threads, each with its own pool"),
            (_, 0) => "every core".to_string(),
            (_, 1) => "one thread".to_string(),
            (_, n) => format!("{n} threads"),
        },
        r.duration_secs,
        r.connection_limit
    );
    println!("throughput    {:.0} ops/s ({} ops)", r.ops_per_sec, r.ops);
    println!(
        "latency       p50 {:.3} ms   p99 {:.3} ms   max {:.3} ms",
        r.latency_ms.p50, r.latency_ms.p99, r.latency_ms.max
    );
    println!(
        "pool wait     p50 {:.3} ms   p99 {:.3} ms",
        r.pool_wait_ms.p50, r.pool_wait_ms.p99
    );
    println!(
        "pool cost     p50 {:.2} us   p99 {:.2} us   (checkout + return)",
        r.pool_overhead_us.p50, r.pool_overhead_us.p99
    );
    println!("errors        {errors}");
    println!("max in use    {} of {}", r.max_in_use, r.connection_limit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("1..100000"), Ok(1..=100_000));
        assert_eq!(parse_range("5..=5"), Ok(5..=5));
        assert!(parse_range("10..1").is_err());
        assert!(parse_range("a..b").unwrap_err().contains("FROM..TO"));
    }
}
