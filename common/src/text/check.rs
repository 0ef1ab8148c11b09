//! The checks of a text job that need its files, run by `validate` and before any job starts
//! (`metaloop-proto`'s config checks cover the settings; it does not link a tokenizer or read
//! Parquet): the model directory loads and fits the tokenizer and `max_len` (for a TorchScript
//! model: its tokenizer loads), and every data file
//! reads whole with the job's columns and label map, each problem named by key, file, row and
//! column. The files are read, not tokenized: tokenizing is the job's first step, and cached.

use super::{read_source, Columns, SourceOptions, TextTokenizer};
use crate::bert::{Bert, BertConfig};
use metaloop_proto::config::{meta_subset_rows, JobConfig, ModelConfig};
use std::path::Path;

/// Every problem of a text job's model directory and data files, each prefixed with its key
/// path; empty for a job without text (nothing to check here).
pub fn check_job(cfg: &JobConfig) -> Vec<String> {
    let Some((tokenizer, max_len)) = cfg.model.tokenizer() else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    match &cfg.model {
        ModelConfig::Bert { path, .. } => check_model(path, max_len, &mut problems),
        // A TorchScript module's own checks (it loads, its forward takes these inputs) are
        // `torchscript::check_job`'s.
        _ if tokenizer.is_file() => {
            if let Err(e) = TextTokenizer::load(&tokenizer, max_len as usize) {
                problems.push(format!("model.tokenizer: {e}"));
            }
        }
        _ => {}
    }
    let d = &cfg.data;
    let columns = Columns {
        text: d.text_column.clone(),
        label: d.label_column.clone(),
        domain: None,
        task: None,
    };
    let options = |labels: Option<&Vec<String>>| SourceOptions {
        columns: columns.clone(),
        labels: labels.unwrap_or(&d.labels).clone(),
    };
    let read = |key: &str, file: &Path, opts: SourceOptions, problems: &mut Vec<String>| -> Option<usize> {
        if !file.is_file() {
            // The config's own checks report a missing file.
            return None;
        }
        match read_source(file, &opts) {
            Ok(rows) => Some(rows.len()),
            Err(e) => {
                problems.push(format!("{key}: {}", e.to_string().replace('\n', "\n    ")));
                None
            }
        }
    };
    for (i, dom) in d.domains.iter().enumerate() {
        let key = if d.train_shorthand {
            "data.train".to_string()
        } else {
            format!("data.domains[{i}].source")
        };
        let Some(rows) = read(&key, &dom.source, options(dom.labels.as_ref()), &mut problems) else {
            continue;
        };
        let (start, count) = dom.subset.map_or((0, rows), |s| (s.start, s.count));
        if start.saturating_add(count) > rows {
            problems.push(format!(
                "{key}: domain `{}`: subset {start}..{} is outside {}, which has {rows} rows",
                dom.name,
                start.saturating_add(count),
                dom.source.display()
            ));
        } else if count < d.shards as usize {
            problems.push(format!(
                "{key}: domain `{}` has {count} rows, fewer than data.shards = {}",
                dom.name, d.shards
            ));
        }
    }
    if let Some(meta) = &d.meta {
        let rows = read("data.meta", meta, options(None), &mut problems);
        if let Some(Err(why)) = rows.map(|rows| meta_subset_rows(d.meta_subset, meta, rows)) {
            problems.push(format!("data.meta_subset: {why}"));
        }
    }
    read("data.test", &d.test, options(None), &mut problems);
    problems
}

/// The model directory: the encoder loads (config and every tensor), the tokenizer loads, its
/// ids fit the embedding table and `max_len` fits the position embeddings.
fn check_model(dir: &Path, max_len: u32, problems: &mut Vec<String>) {
    if !dir.is_dir() {
        // The config's own checks report it.
        return;
    }
    let config = match BertConfig::load(&dir.join("config.json")) {
        Ok(c) => c,
        Err(e) => {
            problems.push(format!("model.path: {e}"));
            return;
        }
    };
    if let Err(e) = Bert::load(dir, tch::Device::Cpu, tch::Kind::Float) {
        problems.push(format!("model.path: {e}"));
    }
    if i64::from(max_len) > config.max_position_embeddings {
        problems.push(format!(
            "model.max_len: {max_len} tokens, but the model has {} positions",
            config.max_position_embeddings
        ));
    }
    match TextTokenizer::load(&dir.join("tokenizer.json"), max_len as usize) {
        Ok(t) if t.vocab_size() as i64 > config.vocab_size => problems.push(format!(
            "model.path: tokenizer.json has {} tokens but the model's embedding table has {} rows",
            t.vocab_size(),
            config.vocab_size
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("model.path: {e}")),
    }
}
