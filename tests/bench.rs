//! The benchmarks run end to end on tiny settings and print their tables. Their numbers are
//! for BENCHMARKS.md and never asserted: only that each runs, and where a benchmark checks
//! correctness itself (the PyTorch reference computing the same function), that it passes.

use std::process::Command;

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_metaloop"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "metaloop bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The last column of the table row that starts with `prefix`.
fn last_cell(text: &str, prefix: &str) -> String {
    let row = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no row {prefix} in\n{text}"));
    row.trim_end_matches('|')
        .rsplit('|')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The cell of the row starting with `prefix` under the column headed `column`.
fn cell(text: &str, prefix: &str, column: &str) -> String {
    let cells = |l: &str| -> Vec<String> {
        l.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let header = text
        .lines()
        .find(|l| l.starts_with("| model |"))
        .unwrap_or_else(|| panic!("no table header in\n{text}"));
    let at = cells(header)
        .iter()
        .position(|c| c == column)
        .unwrap_or_else(|| panic!("no column `{column}` in {header}"));
    let row = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no row {prefix} in\n{text}"));
    cells(row)[at].clone()
}

#[test]
fn the_transport_benchmark_prints_a_ratio() {
    let text = bench(&["transport", "--sizes", "1", "--repeats", "1"]);
    let ratio: f64 = last_cell(&text, "| 1 MiB").parse().expect("ratio");
    assert!(ratio > 0.0 && ratio.is_finite(), "{text}");
}

/// Both sides of the step benchmark compute the same function: the benchmark itself fails
/// when the reference's check results differ from the worker's by more than 1e-2 relative.
#[test]
fn the_step_benchmark_reference_computes_what_the_worker_computes() {
    let text = bench(&[
        "step",
        "--models",
        "digits",
        "--cases",
        "inner,hyper-exact",
        "--assignments",
        "2",
        "--threads",
        "1",
        "--trials",
        "1",
    ]);
    for case in ["| digits | (a)", "| digits | (b)"] {
        let diff: f64 = cell(&text, case, "check (max rel. diff)")
            .parse()
            .expect("check column");
        assert!(diff <= 1e-4, "{case}: {diff}\n{text}");
        // Each side's timed process reports its peak memory.
        let rss: f64 = cell(&text, case, "RSS metaloop / PyTorch")
            .parse()
            .expect("memory column");
        assert!(rss > 0.0 && rss.is_finite(), "{case}: {rss}\n{text}");
    }
}

/// Simulated workers join a real coordinator process, every round completes, and both tables
/// have their figures (the scaling table with f32 and int8 deltas, the memory table at a tiny
/// model, with deltas read one at a time).
#[test]
fn the_coordinator_benchmark_runs_simulated_workers() {
    let text = bench(&[
        "coordinator",
        "--workers",
        "3",
        "--rounds",
        "3",
        "--deltas",
        "f32,int8",
        "--model-mib",
        "1",
        "--memory-workers",
        "3",
        "--memory-receiving",
        "1",
        "--memory-deltas",
        "int8",
    ]);
    for row in ["| 3 | f32 |", "| 3 | int8 |"] {
        assert!(last_cell(&text, row).ends_with("MiB"), "{row}: {text}");
    }
    let ratio: f64 = last_cell(&text, "| 1 MiB | nesterov | 3 | int8 | 1 |")
        .parse()
        .expect("ratio");
    assert!(ratio > 0.0, "{text}");
}

#[test]
fn the_overhead_benchmark_reads_a_local_run() {
    let text = bench(&["overhead", "--config", "configs/local-sgd.toml", "--repeats", "1"]);
    let share = last_cell(&text, "| rounds only");
    let v: f64 = share.trim_end_matches('%').parse().expect("share");
    assert!((0.0..100.0).contains(&v), "{text}");
}

fn script(name: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg(format!("scripts/{name}"))
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_delta_dtype_comparison_runs_each_dtype() {
    let runs = tempfile::tempdir().expect("tmp");
    let text = script(
        "delta-dtypes",
        &[
            "--bin",
            env!("CARGO_BIN_EXE_metaloop"),
            "--seeds",
            "0",
            "--runs",
            runs.path().to_str().expect("path"),
            "configs/local-sgd.toml",
        ],
    );
    // Bytes are counted, not timed: int8 deltas are about a quarter of f32's.
    let ratio = |row: &str| -> f64 {
        let cells: Vec<&str> = text
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row} in\n{text}"))
            .split('|')
            .collect();
        cells[3].trim().parse().expect("ratio")
    };
    assert_eq!(ratio("| f32 |"), 1.0, "{text}");
    assert!((0.2..0.32).contains(&ratio("| int8 |")), "{text}");
}

#[test]
fn scale_on_paper_prints_a_table_per_model_size() {
    let text = script("scale-on-paper", &[]);
    assert_eq!(
        text.matches("| workers | link | f32 | bf16 | int8 |").count(),
        3,
        "{text}"
    );
}
