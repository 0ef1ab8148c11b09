//! A few trials of `scripts/chaos` against this build: coordinator and workers killed at random
//! moments (a fixed schedule seed), restarted as an operator would, and every run must end with
//! the undisturbed `final_state_checksum` and one `metrics.jsonl` line per round.

mod common;

use common::*;
use std::process::Command;

#[test]
fn random_kills_and_restarts_end_in_the_undisturbed_result() {
    let out = Command::new("python3")
        .current_dir(ROOT)
        .arg("scripts/chaos")
        .args(["--bin", BIN, "--trials", "3", "--seed", "20261202", "--rounds", "40"])
        .args(["--max-kills", "3", "--trial-timeout", "240"])
        .output()
        .expect("run scripts/chaos (needs python3)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "chaos trials failed:\n{stdout}");
    assert!(stdout.contains("chaos: 3 passed, 0 failed"), "{stdout}");
}

/// The same with int8 deltas: quantization is a function of the delta alone, so a killed and
/// restarted worker or coordinator still ends where the undisturbed int8 run ends.
#[test]
fn kills_with_int8_deltas_end_in_the_undisturbed_result() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("int8.toml");
    let text = std::fs::read_to_string(format!("{ROOT}/configs/quickstart.toml"))
        .expect("quickstart")
        .replace("\"../data/", &format!("\"{ROOT}/data/"))
        .replace("[outer]\n", "[outer]\ndelta_dtype = \"int8\"\n");
    assert!(text.contains("delta_dtype = \"int8\""));
    std::fs::write(&config, text).expect("write");
    let out = Command::new("python3")
        .current_dir(ROOT)
        .arg("scripts/chaos")
        .args(["--bin", BIN, "--trials", "2", "--seed", "20261203", "--rounds", "40"])
        .args(["--max-kills", "3", "--trial-timeout", "240", "--config"])
        .arg(&config)
        .output()
        .expect("run scripts/chaos (needs python3)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "chaos trials failed:\n{stdout}");
    assert!(stdout.contains("chaos: 2 passed, 0 failed"), "{stdout}");
}
