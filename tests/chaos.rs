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
