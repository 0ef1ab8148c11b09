//! `metaloop bench coordinator`: the coordinator's own cost, with the workers' compute taken
//! out. A real `metaloop coordinator` process runs a job whose workers are simulated by a
//! second process (`metaloop bench sim-workers`): real QUIC connections with mutual TLS that
//! join, receive every model version and return a zero delta of the model's size for each
//! assignment at once. Every round's wall time is then the coordinator's overhead: planning,
//! sending the model, receiving and averaging deltas, the outer step, evaluation, records.
//!
//! Two tables: scaling (1…256 workers on the digits MLP: round time p50/p99, coordinator CPU
//! per round, peak RSS) and memory (a model of `--model-mib` MiB: the coordinator's peak RSS
//! over the model's bytes, with and without the process's baseline).

use anyhow::{bail, ensure, Context};
use metaloop_common::model;
use metaloop_common::net::{self, EncodedBundle, Inbox, TlsFiles};
use metaloop_proto::proto::{self, AssignmentResult, CoordinatorMsg, Hello, ModelSource, WorkerMsg};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// Simulated worker counts for the scaling table.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    workers: Vec<usize>,
    /// Rounds per scaling run (the first, which sends every worker the full model, is not
    /// counted).
    #[arg(long, default_value_t = 40)]
    rounds: u64,
    /// Delta dtypes (`[outer] delta_dtype`) for the scaling table: what every simulated worker
    /// sends back each round.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    deltas: Vec<String>,
    /// Model size for the memory table, in MiB of f32 parameters (0: skip the table).
    #[arg(long, default_value_t = 256)]
    model_mib: usize,
    /// Simulated worker counts for the memory table.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    memory_workers: Vec<usize>,
    /// Delta dtypes (`[outer] delta_dtype`) for the memory table.
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    memory_deltas: Vec<String>,
    /// `[outer] max_receiving` values for the memory table.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    memory_receiving: Vec<u32>,
    /// `[outer] method` for the memory table: `nesterov` (the default; its momentum is one
    /// more model) or `average`.
    #[arg(long, default_value = "nesterov")]
    memory_outer: String,
    #[arg(long, default_value_t = 3)]
    memory_rounds: u64,
    /// The digits data (train, test and meta safetensors).
    #[arg(long, default_value = "data/digits")]
    data: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    #[arg(long)]
    coordinator: std::net::SocketAddr,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    ca: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
}

/// What one coordinator run cost.
struct Cost {
    /// Round wall seconds, from the second round on.
    rounds: Vec<f64>,
    /// Coordinator CPU seconds between the end of the first round and the end of the last.
    cpu: f64,
    peak_rss: u64,
}

pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    ensure!(args.rounds >= 2, "--rounds must be at least 2");
    let data =
        std::fs::canonicalize(&args.data).with_context(|| format!("the data directory {}", args.data.display()))?;
    let digits = "hidden = [256]";
    println!(
        "Simulated workers (no compute) on loopback, digits MLP (64→256→10, {} KiB), {} rounds, first round not counted; {}.",
        model_bytes(&[256]) / 1024,
        args.rounds,
        super::machine()
    );
    println!();
    println!(
        "| workers | deltas | round p50 | round p99 | coordinator CPU / round | CPU / worker | coordinator peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut baseline_rss = None;
    for dtype in &args.deltas {
        for &n in &args.workers {
            let outer = format!("delta_dtype = \"{dtype}\"");
            let mut c = one_run(&data, n, args.rounds, digits, &outer).await?;
            baseline_rss.get_or_insert(c.peak_rss);
            let p50 = super::quantile(&mut c.rounds, 0.5);
            let p99 = super::quantile(&mut c.rounds, 0.99);
            let per_round = c.cpu / (args.rounds - 1) as f64 * 1e3;
            println!(
                "| {n} | {dtype} | {:.1} ms | {:.1} ms | {per_round:.1} ms | {:.2} ms | {} MiB |",
                p50 * 1e3,
                p99 * 1e3,
                per_round / n as f64,
                c.peak_rss >> 20
            );
        }
    }
    if args.model_mib > 0 {
        // Two hidden layers of h: about h² parameters.
        let h = ((args.model_mib as f64 * 1024.0 * 1024.0 / 4.0).sqrt()) as u32;
        let bytes = model_bytes(&[h, h]);
        println!();
        println!(
            "Memory: MLP 64→{h}→{h}→10 ({} MiB of f32), {} rounds.",
            bytes >> 20,
            args.memory_rounds
        );
        println!();
        println!(
            "| model | outer | workers | deltas | max_receiving | coordinator peak RSS | peak RSS / model | (peak − small-model peak) / model |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let outer = &args.memory_outer;
        for &workers in &args.memory_workers {
            for dtype in &args.memory_deltas {
                for &receiving in &args.memory_receiving {
                    let c = one_run(
                        &data,
                        workers,
                        args.memory_rounds,
                        &format!("hidden = [{h}, {h}]"),
                        &format!("method = \"{outer}\"\ndelta_dtype = \"{dtype}\"\nmax_receiving = {receiving}"),
                    )
                    .await?;
                    let base = baseline_rss.unwrap_or(0);
                    println!(
                        "| {} MiB | {outer} | {workers} | {dtype} | {receiving} | {} MiB | {:.2} | {:.2} |",
                        bytes >> 20,
                        c.peak_rss >> 20,
                        c.peak_rss as f64 / bytes as f64,
                        c.peak_rss.saturating_sub(base) as f64 / bytes as f64
                    );
                }
            }
        }
    }
    Ok(())
}

/// Bytes of the digits-shaped MLP with these hidden widths.
fn model_bytes(hidden: &[u32]) -> u64 {
    let spec = proto::ModelSpec::Mlp {
        inputs: 64,
        hidden: hidden.to_vec(),
        classes: 10,
        dropout: 0.0,
    };
    model::init_params(&spec, 0).byte_len() as u64
}

/// One coordinator process with `workers` simulated workers for `rounds` rounds.
/// `model` and `outer` are lines of the job's `[model]` and `[outer]` tables.
async fn one_run(data: &Path, workers: usize, rounds: u64, model: &str, outer: &str) -> anyhow::Result<Cost> {
    let dir = super::scratch_dir("coordinator")?;
    let (coord_tls, worker_tls) = net::write_pki(&dir.join("certs"))?;
    let config = dir.join("job.toml");
    let d = data.display();
    std::fs::write(
        &config,
        format!(
            "seed = 0\nrounds = {rounds}\n\n[data]\ntest = \"{d}/test.safetensors\"\nmeta = \"{d}/meta.safetensors\"\n\
             classes = 10\nshards = {workers}\n\n[[data.domains]]\nname = \"all\"\nsource = \"{d}/train.safetensors\"\n\n\
             [model]\nkind = \"mlp\"\n{model}\n\n[inner]\nsteps = 1\n\n[outer]\n{outer}\n\n[strategy]\nkind = \"domain-weights\"\nmethod = \"uniform\"\n\n\
             [checkpoint]\nevery = {rounds}\n"
        ),
    )?;
    let port = free_udp_port()?;
    let exe = std::env::current_exe()?;
    let tls_args = |t: &TlsFiles| {
        [
            "--ca".into(),
            t.ca.clone().into_os_string(),
            "--cert".into(),
            t.cert.clone().into_os_string(),
            "--key".into(),
            t.key.clone().into_os_string(),
        ]
    };
    let mut coordinator = Command::new(&exe)
        .arg("coordinator")
        .arg("--config")
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(["--min-workers", &workers.to_string(), "--max-handshakes", "1024"])
        .args(tls_args(&coord_tls))
        .stdout(Stdio::null())
        // A file, not a pipe: a pipe nobody reads fills up with join logs and stalls the
        // coordinator until its connections time out.
        .stderr(std::fs::File::create(dir.join("coordinator.log"))?)
        .spawn()
        .context("starting the coordinator")?;
    let mut sims = Command::new(&exe)
        .args(["bench", "sim-workers", "--coordinator", &format!("127.0.0.1:{port}")])
        .args(["--count", &workers.to_string()])
        .args(tls_args(&worker_tls))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sim-workers.log"))?)
        .spawn()
        .context("starting the simulated workers")?;
    let cost = watch(&mut coordinator, &mut sims, &dir.join("run/metrics.jsonl"), rounds);
    let cost = match cost {
        Ok(c) => c,
        Err(e) => {
            let _ = coordinator.kill();
            let _ = sims.kill();
            return Err(e.context(format!(
                "coordinator: {}; simulated workers: {}",
                log_tail(&dir.join("coordinator.log")),
                log_tail(&dir.join("sim-workers.log"))
            )));
        }
    };
    let status = coordinator.wait()?;
    let sim_status = sims.wait()?;
    if !status.success() || !sim_status.success() {
        bail!(
            "coordinator exited {status}: {}; simulated workers exited {sim_status}: {}",
            log_tail(&dir.join("coordinator.log")),
            log_tail(&dir.join("sim-workers.log"))
        );
    }
    let run: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("run/metrics.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let rounds_seconds = run.iter().skip(1).filter_map(|r| r["seconds"].as_f64()).collect();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Cost {
        rounds: rounds_seconds,
        ..cost
    })
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    s.trim().lines().rev().take(5).collect::<Vec<_>>().join(" | ")
}

/// Samples the coordinator's CPU time when the first round is recorded and when the last
/// is, and its peak RSS then.
fn watch(child: &mut Child, sims: &mut Child, records: &Path, rounds: u64) -> anyhow::Result<Cost> {
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first_cpu = None;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the coordinator exited early ({status})");
        }
        if let Some(status) = sims.try_wait()? {
            bail!("the simulated workers exited early ({status})");
        }
        ensure!(Instant::now() < deadline, "the job did not finish within 10 minutes");
        let done = std::fs::read_to_string(records).map_or(0, |s| s.lines().count() as u64);
        if done >= 1 && first_cpu.is_none() {
            first_cpu = Some(cpu_seconds(pid)?);
        }
        if done >= rounds {
            let cpu = cpu_seconds(pid)? - first_cpu.unwrap_or(0.0);
            return Ok(Cost {
                rounds: Vec::new(),
                cpu,
                peak_rss: peak_rss(pid)?,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// User + system CPU seconds of a process (/proc/PID/stat fields 14 and 15).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // procfs counts in USER_HZ ticks, which Linux fixes at 100 for user space on every
    // architecture it supports.
    Ok(ticks / 100.0)
}

/// Peak resident set size (VmHWM) of a process, in bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The simulated workers: `count` connections that join and answer every assignment at once.
pub async fn sim_workers(args: SimArgs) -> anyhow::Result<()> {
    let tls = TlsFiles {
        ca: args.ca,
        cert: args.cert,
        key: args.key,
    };
    let endpoint = net::client_endpoint(&tls, "127.0.0.1:0".parse()?)?;
    let zero: Arc<tokio::sync::OnceCell<EncodedBundle>> = Arc::default();
    // Joins go a few at a time, as the handshakes of a real fleet would be spread out; each
    // connection attempt is retried like a real worker's.
    let joining = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.count {
        let (endpoint, zero, joining) = (endpoint.clone(), zero.clone(), joining.clone());
        tasks.spawn(async move { sim_worker(&endpoint, args.coordinator, i, &zero, &joining).await });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    endpoint.wait_idle().await;
    Ok(())
}

async fn sim_worker(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    i: usize,
    zero: &tokio::sync::OnceCell<EncodedBundle>,
    joining: &tokio::sync::Semaphore,
) -> anyhow::Result<()> {
    let (conn, mut send, mut recv, welcome) = {
        let _turn = joining.acquire().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match join(endpoint, addr, i).await {
                Ok(joined) => break joined,
                Err(e) if attempt < 5 => tracing::warn!(i, error = %format!("{e:#}"), "join failed; retrying"),
                Err(e) => return Err(e.context(format!("simulated worker {i}: {attempt} attempts"))),
            }
        }
    };
    // One zero delta of the model's layout, encoded once and shared by every simulated worker
    // (their process shares the cores with the coordinator: it should spend nothing per send).
    let delta = zero
        .get_or_init(|| async {
            EncodedBundle::with_dtype(
                &model::init_params(&welcome.job.model, 0).zeros_like(),
                welcome.job.delta_dtype,
            )
        })
        .await;
    let inbox = Arc::new(Inbox::new(metaloop_proto::proto::BundleLayout::of(
        &model::init_params(&welcome.job.model, 0),
        metaloop_proto::proto::DType::F32,
    )));
    let filler = {
        let (inbox, conn) = (inbox.clone(), conn.clone());
        tokio::spawn(async move { inbox.fill(&conn).await })
    };
    let mut transfer = 0u64;
    // As a worker does: the result first, the delta in the background.
    let mut sends = tokio::task::JoinSet::new();
    loop {
        while let Some(sent) = sends.try_join_next() {
            sent??;
        }
        match net::read_frame::<CoordinatorMsg>(&mut recv, "control frame").await? {
            Some(CoordinatorMsg::Round(plan)) => {
                match plan.model {
                    ModelSource::Full { transfer, .. } | ModelSource::Step { transfer, .. } => {
                        inbox.take(transfer).await?;
                    }
                    ModelSource::Unchanged { .. } => {}
                }
                for a in plan.assignments {
                    transfer += 1;
                    let result = AssignmentResult {
                        train_loss: 1.0,
                        samples: 1,
                        ..AssignmentResult::new(plan.round, a.index, transfer)
                    };
                    net::write_frame(&mut send, &WorkerMsg::Result(result)).await?;
                    let (conn, delta, transfer) = (conn.clone(), delta.clone(), transfer);
                    sends.spawn(async move { net::send_encoded(&conn, transfer, &delta).await });
                }
            }
            Some(CoordinatorMsg::Shutdown { .. }) | None => break,
            Some(other) => bail!("simulated worker {i}: unexpected {other:?}"),
        }
    }
    filler.abort();
    conn.close(0u32.into(), b"done");
    Ok(())
}

async fn join(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    i: usize,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream, proto::Welcome)> {
    let conn = net::connect(endpoint, addr).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = WorkerMsg::Hello(Hello {
        protocol_version: proto::PROTOCOL_VERSION,
        name: format!("sim-{i}"),
    });
    net::write_frame(&mut send, &hello).await?;
    match net::read_frame(&mut recv, "welcome").await? {
        Some(CoordinatorMsg::Welcome(welcome)) => Ok((conn, send, recv, *welcome)),
        other => bail!("expected a welcome, got {other:?}"),
    }
}
