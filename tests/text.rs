//! End to end on text: `metaloop local` fine-tuning the tiny random BERT (tests/data/tiny-bert)
//! on synthetic review sentences (tests/data/text/sentiment, made by make_sentiment.py) with every
//! outer strategy, real worker processes on loopback, and the text checks of `validate`; and a
//! TorchScript transformer (tests/data/torchscript/tiny-transformer.pt) on the same texts.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn metaloop() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_metaloop"));
    c.current_dir(root());
    // Tokenized sets are cached per user; keep the tests' cache to themselves.
    c.env("METALOOP_CACHE", std::env::temp_dir().join("metaloop-text-tests"));
    c
}

/// A text job on the tiny BERT: three domains (clean reviews, reviews with half their labels
/// flipped and a fifth of their tokens replaced, plot summaries with random labels), then
/// `strategy` (a whole `[strategy]` table).
fn config(dir: &Path, rounds: u32, shards: u32, strategy: &str) -> PathBuf {
    let data = root().join("tests/data/text/sentiment");
    let d = |f: &str| data.join(f).display().to_string();
    let text = format!(
        r#"seed = 3
rounds = {rounds}
eval_every = 2

[data]
labels = ["neg", "pos"]
test = "{test}"
meta = "{meta}"
meta_batch = 16
shards = {shards}

[[data.domains]]
name = "clean"
source = "{train}"
subset = {{ start = 0, count = 120 }}

[[data.domains]]
name = "noisy"
source = "{train}"
subset = {{ start = 120, count = 120 }}
label_noise = 0.5
token_noise = 0.2

[[data.domains]]
name = "plots"
source = "{plots}"
labels = ["plot"]
label_noise = 0.5

[model]
kind = "bert"
path = "{model}"
pooling = "mean"
max_len = 32

[inner]
optimizer = "adamw"
steps = 3
batch_size = 12
lr = 1e-3
weight_decay = 0.01
warmup_steps = 2
decay = "linear"
clip_norm = 1.0

[outer]
method = "average"
lr = 1.0
momentum = 0.0

{strategy}
"#,
        test = d("test.jsonl"),
        meta = d("meta.jsonl"),
        train = d("train.jsonl"),
        plots = d("plots.jsonl"),
        model = root().join("tests/data/tiny-bert").display(),
    );
    let path = dir.join("job.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn run_local(config: &Path, run_dir: &Path, workers: u32, extra: &[&str]) -> Value {
    let out = metaloop()
        .args(["local", "--quiet", "--workers", &workers.to_string(), "--config"])
        .arg(config)
        .arg("--run-dir")
        .arg(run_dir)
        .args(extra)
        .output()
        .expect("start metaloop");
    assert!(
        out.status.success(),
        "metaloop local failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(run_dir.join("worker-0.log")).unwrap_or_default()
    );
    let text = std::fs::read_to_string(run_dir.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary.json is JSON")
}

fn rounds(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn accuracy(s: &Value) -> f64 {
    s["test_accuracy"].as_f64().expect("test_accuracy")
}

#[test]
fn hypergradient_domain_weights_on_text_are_the_same_with_one_or_two_workers() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(
        dir.path(),
        4,
        2,
        "[strategy]\nkind = \"domain-weights\"\nmethod = \"hypergradient\"\ndirectional = \"exact\"\nlr = 0.05\nprobe = 16",
    );
    let two = run_local(&cfg, &dir.path().join("two"), 2, &["--no-baseline"]);
    let one = run_local(&cfg, &dir.path().join("one"), 1, &["--no-baseline"]);
    assert_eq!(one["final_state_checksum"], two["final_state_checksum"]);
    assert_eq!(two["rounds"], 4);
    let acc = accuracy(&two);
    assert!((0.0..=1.0).contains(&acc), "{acc}");
    // The weights moved away from uniform: the hypergradient reached the coordinator.
    let weights = two["domain_weights"].as_object().expect("weights");
    assert!(
        weights.values().any(|w| (w.as_f64().expect("w") - 1.0).abs() > 1e-3),
        "{weights:?}"
    );
    // Evaluated every second round and after the last; the others record no test figures.
    let tested: Vec<bool> = rounds(&dir.path().join("two"))
        .iter()
        .map(|r| r["test_accuracy"].is_f64())
        .collect();
    assert_eq!(tested, [false, true, false, true]);
    // What the corruptions did is recorded: half the labels of `noisy`, tokens replaced too.
    let domains: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("two/domains.json")).expect("domains.json"))
            .expect("JSON");
    let noisy = &domains[1];
    assert_eq!(noisy["samples"], 120);
    assert_eq!(noisy["flipped"].as_array().expect("flipped").len(), 60);
    assert!(noisy["tokens_replaced"].as_u64().expect("tokens") > 0);

    // bf16 autocast (double backward included): deterministic across worker counts too, and a
    // different model from the f32 run's, so the setting reached the workers' forward passes.
    let text = std::fs::read_to_string(&cfg).expect("config");
    let bf16 = dir.path().join("bf16.toml");
    std::fs::write(
        &bf16,
        text.replace("clip_norm = 1.0\n", "clip_norm = 1.0\nautocast = \"bf16\"\n"),
    )
    .expect("write");
    let two16 = run_local(&bf16, &dir.path().join("two16"), 2, &["--no-baseline"]);
    let one16 = run_local(&bf16, &dir.path().join("one16"), 1, &["--no-baseline"]);
    assert_eq!(one16["final_state_checksum"], two16["final_state_checksum"]);
    assert_ne!(two16["final_state_checksum"], two["final_state_checksum"]);
    assert!(
        (accuracy(&two16) - acc).abs() < 0.25,
        "bf16 {} vs f32 {acc}",
        accuracy(&two16)
    );
}

#[test]
fn every_other_strategy_runs_on_text() {
    let strategies = [
        (
            "fd",
            "[strategy]\nkind = \"domain-weights\"\nmethod = \"hypergradient\"\ndirectional = \"finite-difference\"\nlr = 0.05\nprobe = 16",
            2,
        ),
        ("doremi", "[strategy]\nkind = \"domain-weights\"\nmethod = \"doremi\"\nprobe = 16", 2),
        (
            "self-taught",
            "[strategy]\nkind = \"loss-rescaling\"\nmode = \"self-taught\"\nfeatures = [\"loss\", \"label-prob\", \"entropy\"]\nvirtual_lr = 0.01",
            2,
        ),
        (
            "clean-meta",
            "[strategy]\nkind = \"loss-rescaling\"\nmode = \"clean-meta\"\nfeatures = [\"loss\", \"label-prob\", \"entropy\"]\nvirtual_lr = 0.01",
            2,
        ),
        (
            "task-policy",
            "[strategy]\nkind = \"task-policy\"\npolicy = \"learned\"\ntarget_batch = 16\nfinetune_rounds = 1",
            1,
        ),
    ];
    for (name, strategy, shards) in strategies {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = config(dir.path(), 4, shards, strategy);
        if name == "task-policy" {
            // A low-resource target: 24 rows of the meta file, which each worker cuts as the
            // coordinator did (it checks the rows' checksum).
            let text = std::fs::read_to_string(&cfg).expect("read");
            let text = text.replacen(
                "meta_batch = 16\n",
                "meta_batch = 16\nmeta_subset = { start = 8, count = 24 }\n",
                1,
            );
            std::fs::write(&cfg, text).expect("write");
        }
        let s = run_local(&cfg, &dir.path().join("run"), 2, &["--no-baseline"]);
        assert_eq!(s["rounds"], 4, "{name}");
        assert_eq!(s["completed"], true, "{name}");
        let acc = accuracy(&s);
        assert!((0.0..=1.0).contains(&acc), "{name}: {acc}");
        match name {
            "self-taught" | "clean-meta" => {
                // Ω's separation of the flipped rows was measured on the coordinator, over
                // every training text: 60 of `noisy`'s 120 and 30 of the 60 plots are flipped.
                let r = &s["rescaler"];
                assert!(r["auc"].is_f64(), "{name}: {r}");
                assert_eq!(
                    (r["clean"].as_u64(), r["corrupted"].as_u64()),
                    (Some(210), Some(90)),
                    "{name}"
                );
            }
            "task-policy" => {
                let w = s["source_weights"].as_object().expect("source weights");
                assert_eq!(w.len(), 3, "{name}: {w:?}");
            }
            _ => {
                let w = s["domain_weights"].as_object().expect("domain weights");
                assert!(
                    w.values().any(|w| (w.as_f64().expect("w") - 1.0).abs() > 1e-6),
                    "{name}: {w:?}"
                );
            }
        }
    }
}

#[test]
fn validate_names_the_file_row_and_column_of_bad_text_and_the_model_s_limits() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"good film\", \"label\": \"pos\"}\n{\"text\": \"\", \"label\": \"neg\"}\n{\"text\": \"bad\", \"label\": \"meh\"}\n{\"label\": \"pos\"}\n",
    )
    .expect("write");
    let cfg = config(
        dir.path(),
        2,
        1,
        "[strategy]\nkind = \"domain-weights\"\nmethod = \"uniform\"",
    );
    let text = std::fs::read_to_string(&cfg)
        .expect("read")
        .replacen(
            &root()
                .join("tests/data/text/sentiment/test.jsonl")
                .display()
                .to_string(),
            &bad.display().to_string(),
            1,
        )
        .replace("max_len = 32", "max_len = 100")
        .replace(
            "meta_batch = 16\n",
            "meta_batch = 16\nmeta_subset = { start = 30, count = 20 }\n",
        );
    std::fs::write(&cfg, text).expect("write");
    let out = metaloop().arg("validate").arg(&cfg).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "data.test:",
        "bad.jsonl",
        "row 2",
        "row 3",
        "\"meh\"",
        "row 4",
        "`text`",
        "model.max_len: 100 tokens, but the model has 64 positions",
        "data.meta_subset: rows 30..50 are past the end of",
        "meta.jsonl, which has 40 rows",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

/// The job of `config` with the export script's transformer as a TorchScript module
/// (tests/data/torchscript/tiny-transformer.pt), tokenized by the tiny BERT's tokenizer.json.
fn torchscript_config(dir: &Path, strategy: &str) -> PathBuf {
    let cfg = config(dir, 4, 2, strategy);
    let text = std::fs::read_to_string(&cfg).expect("config");
    let bert = format!(
        "kind = \"bert\"\npath = \"{}\"\npooling = \"mean\"\nmax_len = 32\n",
        root().join("tests/data/tiny-bert").display()
    );
    assert!(text.contains(&bert), "{text}");
    let module = format!(
        "kind = \"torchscript\"\npath = \"{}\"\ntokenizer = \"{}\"\nmax_len = 32\n",
        root().join("tests/data/torchscript/tiny-transformer.pt").display(),
        root().join("tests/data/tiny-bert/tokenizer.json").display()
    );
    std::fs::write(&cfg, text.replace(&bert, &module)).expect("write");
    cfg
}

#[test]
fn a_torchscript_transformer_trains_on_text_with_first_order_strategies() {
    let dir = tempfile::tempdir().expect("tmp");
    let fd = torchscript_config(
        dir.path(),
        "[strategy]\nkind = \"domain-weights\"\nmethod = \"hypergradient\"\ndirectional = \"finite-difference\"\nlr = 0.05\nprobe = 16",
    );
    let two = run_local(&fd, &dir.path().join("two"), 2, &["--no-baseline"]);
    let one = run_local(&fd, &dir.path().join("one"), 1, &["--no-baseline"]);
    assert_eq!(one["final_state_checksum"], two["final_state_checksum"]);
    assert_eq!(two["rounds"], 4);
    assert!((0.0..=1.0).contains(&accuracy(&two)));
    let weights = two["domain_weights"].as_object().expect("weights");
    assert!(
        weights.values().any(|w| (w.as_f64().expect("w") - 1.0).abs() > 1e-3),
        "the finite-difference hypergradient reached the coordinator: {weights:?}"
    );
    // Trained by the module's own parameter names.
    let finals = std::fs::read(dir.path().join("two/final.safetensors")).expect("final.safetensors");
    let header = String::from_utf8_lossy(&finals[..finals.len().min(4096)]).into_owned();
    assert!(header.contains("encoder.layers.0.self_attn.in_proj_weight"), "{header}");

    let dir2 = tempfile::tempdir().expect("tmp");
    let self_taught = torchscript_config(
        dir2.path(),
        "[strategy]\nkind = \"loss-rescaling\"\nmode = \"self-taught\"\ndirectional = \"finite-difference\"\n\
         features = [\"loss\", \"label-prob\", \"entropy\"]\nvirtual_lr = 0.01",
    );
    let s = run_local(&self_taught, &dir2.path().join("run"), 2, &["--no-baseline"]);
    assert_eq!(s["rounds"], 4);
    // Ω's meta-gradient by finite differences through the module, and its separation measured
    // with the module on the coordinator.
    assert!(s["rescaler"]["auc"].is_f64(), "{s}");

    // A tokenizer whose ids the module's embedding table does not cover (MiniLM's 30,522 tokens,
    // installed by ./dev) is refused by `validate`, naming the module and libtorch's reason.
    let text = std::fs::read_to_string(&fd).expect("config");
    let minilm = root().join("data/text/all-MiniLM-L6-v2/tokenizer.json");
    let tiny = root().join("tests/data/tiny-bert/tokenizer.json");
    let wrong = dir.path().join("wrong-tokenizer.toml");
    let replaced = text.replace(&tiny.display().to_string(), &minilm.display().to_string());
    std::fs::write(&wrong, replaced).expect("write");
    let out = metaloop().arg("validate").arg(&wrong).output().expect("validate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("tiny-transformer.pt: forward(ids Int64") && err.contains("index out of range"),
        "{err}"
    );
}
