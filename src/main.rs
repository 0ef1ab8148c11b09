//! The `metaloop` command line: parses arguments and hands off to the library crates.

mod bench;
mod local;

use anyhow::Context;
use clap::{Parser, Subcommand};
use metaloop_common::net::TlsFiles;
use metaloop_proto::config::JobConfig;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "metaloop",
    version,
    about = "Distributed orchestrator for bi-level (meta-learning) training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: human-readable lines, or JSON lines for log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "METALOOP_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a coordinator and N worker processes on this machine (default: the quickstart).
    Local(local::LocalArgs),
    /// Run the coordinator of a job.
    Coordinator(CoordinatorArgs),
    /// Run a worker that joins a coordinator.
    Worker(WorkerArgs),
    /// Check a job config and report every problem in it.
    Validate {
        /// The job config (TOML).
        config: PathBuf,
    },
    /// Certificates for a cluster.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Benchmarks (print Markdown tables with ratios against a reference in the same run).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// The PKI directory: what pods may mount at its top, the CA key apart in `DIR/ca/` (never in a
/// Secret). Existing files are never overwritten.
#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a new CA (key kept in DIR/ca/ca.key, mode 0600), a coordinator certificate and an
    /// empty revocation list (DIR/crl.pem) into DIR.
    Init {
        /// Output directory.
        dir: PathBuf,
    },
    /// Issue a worker certificate whose identity is NAME (DIR/NAME.pem, DIR/NAME.key), signed by
    /// the CA in DIR. The coordinator names the worker by it in logs and records.
    Issue {
        /// The directory `certs init` wrote.
        dir: PathBuf,
        /// The worker identity: a DNS label (a-z, 0-9, '-'; at most 63), e.g. worker-0.
        name: String,
    },
    /// Revoke worker NAME: rewrite DIR/crl.pem, signed by the CA, with its certificate added.
    /// A coordinator started with --crl refuses it after SIGHUP (and drops it if connected).
    Revoke {
        /// The directory `certs init` wrote.
        dir: PathBuf,
        /// The worker identity to revoke.
        name: String,
    },
}

/// Mutual TLS is the only mode: there is no plaintext or anonymous connection.
#[derive(Debug, clap::Args)]
struct TlsArgs {
    /// CA certificate (PEM) that peers must chain to.
    #[arg(long, env = "METALOOP_CA")]
    ca: PathBuf,
    /// This party's certificate (PEM).
    #[arg(long, env = "METALOOP_CERT")]
    cert: PathBuf,
    /// This party's private key (PEM).
    #[arg(long, env = "METALOOP_KEY")]
    key: PathBuf,
}

impl TlsArgs {
    fn files(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// Command-line overrides of a job config.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Overrides {
    /// Override the config's number of rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// Override the config's seed.
    #[arg(long)]
    seed: Option<u64>,
}

/// Loads and validates a config and its data files (all of it, before anything starts),
/// prints the warnings and applies the overrides; on a bad config or bad data prints every
/// problem and returns the usage exit code.
pub(crate) fn load_config(path: &std::path::Path, overrides: &Overrides) -> Result<JobConfig, ExitCode> {
    let checked = JobConfig::load_checked(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_USAGE)
    })?;
    print_warnings(path, &checked.warnings);
    let mut config = checked.config;
    if !print_file_problems(path, &config) {
        return Err(ExitCode::from(EXIT_USAGE));
    }
    if let Some(r) = overrides.rounds {
        config.rounds = r;
    }
    if let Some(s) = overrides.seed {
        config.seed = s;
    }
    // The overrides may make the config inconsistent (e.g. fewer rounds than a phase needs).
    let problems = config.problems();
    if !problems.is_empty() {
        eprintln!(
            "{} with the command-line overrides has {} problem(s):",
            path.display(),
            problems.len()
        );
        for p in problems {
            eprintln!("  - {p}");
        }
        return Err(ExitCode::from(EXIT_USAGE));
    }
    Ok(config)
}

/// Checks what the config's own checks cannot (a text job's model directory and data files, a
/// TorchScript module) and prints every problem; whether there were none.
fn print_file_problems(path: &std::path::Path, config: &JobConfig) -> bool {
    let mut problems = metaloop_common::text::check_job(config);
    problems.extend(metaloop_common::torchscript::check_job(config));
    if !problems.is_empty() {
        eprintln!("config {} has {} problem(s):", path.display(), problems.len());
        for p in &problems {
            eprintln!("  - {p}");
        }
    }
    problems.is_empty()
}

/// Prints a config's warnings (settings the job clamps to its data) on stderr.
fn print_warnings(path: &std::path::Path, warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {}: {w}", path.display());
    }
}

#[derive(Debug, clap::Args)]
struct CoordinatorArgs {
    /// The job config (TOML).
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    overrides: Overrides,
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    #[command(flatten)]
    tls: TlsArgs,
    /// Where summary.json and metrics.jsonl go.
    #[arg(long)]
    run_dir: PathBuf,
    /// Start once this many workers have joined.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Seconds to wait with no worker connected before giving up.
    #[arg(long, default_value_t = 300)]
    worker_wait: u64,
    /// Continue from the newest valid checkpoint in the run directory.
    #[arg(long)]
    resume: bool,
    /// Seconds a worker may hold assignments without returning a result before it is dropped
    /// and its work reassigned. Default: adaptive, 4x the slowest of the last 64 results, at
    /// least 30 s (120 s for a worker's first result), and 600 s until a result was seen.
    #[arg(long, value_name = "S")]
    assignment_timeout: Option<u64>,
    /// Test hook: pause this long between writing a checkpoint and renaming it into place.
    #[arg(long, default_value_t = 0, hide = true)]
    checkpoint_pause_ms: u64,
    /// Connections admitted at once between their first packet and their hello (4 s each at
    /// most); when all are taken the oldest is evicted for the newcomer, one address may hold a
    /// quarter of them, and beyond half unvalidated addresses must answer a QUIC retry.
    #[arg(long, default_value_t = 64)]
    max_handshakes: usize,
    /// Workers connected at the same time; more are told so and refused.
    #[arg(long, default_value_t = 1024)]
    max_workers: usize,
    /// Serve /metrics (Prometheus), /healthz and /readyz over HTTP on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Certificate revocation list (PEM, signed by the CA; `metaloop certs revoke` writes it):
    /// read at start and again on SIGHUP; a revoked worker is refused and, if connected, dropped.
    #[arg(long, env = "METALOOP_CRL")]
    crl: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct WorkerArgs {
    /// Coordinator address, HOST:PORT (a name is resolved again at every reconnect).
    #[arg(long, env = "METALOOP_COORDINATOR")]
    coordinator: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Name shown in the coordinator's logs (default: the host name and process id).
    #[arg(long)]
    name: Option<String>,
    /// libtorch threads for each model replica.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Devices to train on, one model replica each: cpu, cuda:N, a comma-separated list
    /// (cuda:0,cuda:1; cpu,cpu), or auto (every CUDA device libtorch sees, else cpu). Replicas
    /// split every batch and sum their gradients (NCCL between GPUs).
    #[arg(long, default_value = "cpu", env = "METALOOP_DEVICES")]
    devices: String,
    /// Seconds to keep trying to reach a coordinator that went away (it may be restarting).
    #[arg(long, default_value_t = 60)]
    reconnect_for: u64,
    /// Serve /metrics (Prometheus), /healthz and /readyz over HTTP on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command, cli.log_format)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A run directory that holds another job is the caller's mistake, like a bad config.
            if e.chain().any(|c| c.is::<metaloop_coordinator::AnotherJob>()) {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Exit code for a usage error (bad arguments, bad config or data), as sysexits' EX_USAGE.
pub(crate) const EXIT_USAGE: u8 = 64;

/// Prints what clap says about the command line; `--help` and `--version` exit 0, every usage
/// error EX_USAGE (clap's own default is 2), as for a bad config.
fn usage_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

async fn dispatch(command: Command, log_format: LogFormat) -> anyhow::Result<ExitCode> {
    match command {
        Command::Local(args) => {
            survive_file_size_limit();
            local::run(args, log_format == LogFormat::Json).await
        }
        Command::Bench(b) => {
            bench::run(b).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs(command) => certs(command),
        Command::Validate { config } => match JobConfig::load_checked(&config) {
            Ok(checked) => {
                print_warnings(&config, &checked.warnings);
                if !print_file_problems(&config, &checked.config) {
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
                match checked.warnings.len() {
                    0 => println!("{}: ok", config.display()),
                    n => println!("{}: ok, with {n} warning(s)", config.display()),
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(EXIT_USAGE))
            }
        },
        Command::Coordinator(args) => {
            init_stderr_logs(log_format);
            survive_file_size_limit();
            let config = match load_config(&args.config, &args.overrides) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let shutdown = signal_token();
            let ready = serve_telemetry(args.metrics_listen).await?;
            let coordinator = metaloop_coordinator::Coordinator::bind(metaloop_coordinator::CoordinatorOptions {
                listen: args.listen,
                tls: args.tls.files(),
                run_dir: args.run_dir.clone(),
                min_workers: args.min_workers,
                worker_wait: Duration::from_secs(args.worker_wait),
                resume: args.resume,
                assignment_timeout: args.assignment_timeout.map(Duration::from_secs),
                checkpoint_pause: Duration::from_millis(args.checkpoint_pause_ms),
                max_handshakes: args.max_handshakes,
                max_workers: args.max_workers,
                ready,
                revocation: metaloop_coordinator::Revocation {
                    crl: args.crl.clone(),
                    reload: sighup_notify(),
                },
            })?;
            // The first line on stdout is the bound address, for scripts that listen on port 0.
            println!("listening on {}", coordinator.local_addr()?);
            let outcome = coordinator
                .run(
                    config,
                    |r| {
                        tracing::info!(
                            round = r.round,
                            train_loss = r.train_loss,
                            test_accuracy = r.test_accuracy.unwrap_or(f64::NAN),
                            seconds = r.seconds,
                            "round done"
                        )
                    },
                    shutdown,
                )
                .await;
            let summary = match outcome {
                // `--resume` on a finished job: nothing to do, and not a failure.
                Err(e) if e.is::<metaloop_coordinator::Complete>() => {
                    println!("{e}");
                    return Ok(ExitCode::SUCCESS);
                }
                other => other?,
            };
            if !summary.completed {
                println!(
                    "stopped after {} rounds; run again with --resume to continue",
                    summary.rounds
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "test accuracy {:.2}% after {} rounds; summary in {}",
                summary.test_accuracy * 100.0,
                summary.rounds,
                args.run_dir.join("summary.json").display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker(args) => {
            init_stderr_logs(log_format);
            let devices = match metaloop_worker::devices::resolve(&args.devices) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: --devices: {e}");
                    return Ok(ExitCode::from(EXIT_USAGE));
                }
            };
            let ready = serve_telemetry(args.metrics_listen).await?;
            let name = args.name.unwrap_or_else(|| format!("worker-{}", std::process::id()));
            let opts = metaloop_worker::WorkerOptions {
                coordinator: args.coordinator,
                tls: args.tls.files(),
                name,
                threads: args.threads,
                devices,
                reconnect_for: Duration::from_secs(args.reconnect_for),
                ready,
            };
            metaloop_worker::run(opts, signal_token()).await.context("worker")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `metaloop certs …`: prints what was written and what goes where.
fn certs(command: CertsCommand) -> anyhow::Result<ExitCode> {
    use metaloop_common::{net::NetError, pki};
    let usage = |e: NetError| match e {
        NetError::Name(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(EXIT_USAGE))
        }
        e => Err(e.into()),
    };
    match command {
        CertsCommand::Init { dir } => {
            let coordinator = pki::init(&dir)?;
            println!("CA certificate:          {}", coordinator.ca.display());
            println!(
                "CA key:                  {} (keep it off the cluster: never in a Secret)",
                dir.join(pki::CA_KEY).display()
            );
            println!(
                "coordinator certificate: {} (key {})",
                coordinator.cert.display(),
                coordinator.key.display()
            );
            println!("revocation list:         {}", dir.join(pki::CRL).display());
            println!(
                "the coordinator certificate names `{}`; workers verify that name",
                metaloop_common::net::SERVER_NAME
            );
            println!(
                "issue one certificate per worker: metaloop certs issue {} NAME",
                dir.display()
            );
        }
        CertsCommand::Issue { dir, name } => match pki::issue(&dir, &name) {
            Ok(files) => println!(
                "worker `{name}`: certificate {} (key {})",
                files.cert.display(),
                files.key.display()
            ),
            Err(e) => return usage(e),
        },
        CertsCommand::Revoke { dir, name } => match pki::revoke(&dir, &name) {
            Ok(pki::Revoked::Added(crl)) => println!(
                "revoked `{name}` in {}; send the coordinator SIGHUP (it must run with --crl on this file)",
                crl.display()
            ),
            Ok(pki::Revoked::Already(crl)) => println!("`{name}` is already revoked in {}", crl.display()),
            Err(e) => return usage(e),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Notified on every SIGHUP (the coordinator reads its revocation list again).
fn sighup_notify() -> Arc<tokio::sync::Notify> {
    let notify = Arc::new(tokio::sync::Notify::new());
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let n = notify.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reading the revocation list again");
                n.notify_one();
            }
        });
    }
    notify
}

fn init_stderr_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("METALOOP_LOG").unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

/// Installs the metrics recorder and serves /metrics, /healthz and /readyz when asked; returns
/// the readiness flag for the process to raise.
pub(crate) async fn serve_telemetry(listen: Option<SocketAddr>) -> anyhow::Result<Arc<AtomicBool>> {
    let Some(addr) = listen else {
        return Ok(Arc::default());
    };
    let telemetry = metaloop_common::http::install()?;
    let ready = telemetry.ready.clone();
    let bound = metaloop_common::http::serve(addr, telemetry).await?;
    tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    Ok(ready)
}

/// Turns SIGXFSZ (a write past the file-size limit) from "terminate the process" into an
/// ordinary write error, which the checkpoint code reports and survives like a full disk.
fn survive_file_size_limit() {
    // SIGXFSZ is 25 on Linux (x86, ARM) and on the BSDs and macOS.
    const SIGXFSZ: i32 = 25;
    if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(SIGXFSZ)) {
        tokio::spawn(async move { while s.recv().await.is_some() {} });
    }
}

/// A token cancelled on SIGINT or SIGTERM.
fn signal_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            Some(()) = async { match term.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {}
        }
        tracing::warn!("signal received; stopping");
        t.cancel();
    });
    token
}
