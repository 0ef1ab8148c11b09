//! The checks of a job config that need its data files: every file is opened once and checked
//! whole (format, dtypes, shapes, labels, finite values), then the files against each other
//! (features per row) and against the settings that count rows (subsets, shards, batch and
//! probe sizes), so `validate`, `local` and `coordinator` refuse bad data before anything starts.
//!
//! What is an error and what a warning: a setting the job cannot run with (a subset past the
//! end of its file, more shards than a domain has rows, a file that does not load) is an error.
//! A sample count larger than the rows it draws from (`strategy.probe` beyond a shard,
//! `strategy.target_batch` beyond the target, `inner.batch_size` beyond a shard or a domain) is
//! a warning: the worker already clamps each of them to the rows there are, deterministically,
//! so the job runs exactly as with the smaller setting and stays reproducible; refusing it
//! would only make a config tuned for a large dataset unusable on a small cut of it. The
//! warning says what the setting effectively becomes.

use super::{Finding, JobConfig, StrategyKind, WeightMethod};
use crate::dataset::{self, DataError, Inspection};
use std::path::{Path, PathBuf};

/// What the data checks found: problems (the job cannot run) and warnings (it runs, but a
/// setting is clamped to the data).
#[derive(Debug, Default)]
pub(super) struct DataFindings {
    pub problems: Vec<Finding>,
    pub warnings: Vec<Finding>,
}

/// One data file of the job, opened once however many keys name it.
struct File {
    path: PathBuf,
    /// The key paths that name this file, in config order (a domain's source, `data.meta`,
    /// `data.test`).
    keys: Vec<String>,
    /// `domain `name`: ` when the first key is a domain's source (else empty), to begin a
    /// message with.
    what: String,
    found: Inspection,
}

impl File {
    /// The first key naming the file, and the others as a tail for a message.
    fn key_and_others(&self) -> (String, String) {
        let first = self.keys[0].clone();
        let others = if self.keys.len() > 1 {
            format!(" (the same file as {})", self.keys[1..].join(", "))
        } else {
            String::new()
        };
        (first, others)
    }
}

/// A training domain as the size checks see it.
struct DomainRows<'a> {
    name: &'a str,
    path: &'a Path,
    /// Rows of the domain (its subset, or the whole file).
    rows: usize,
}

/// Opens every data file `cfg` names (each once) and checks it, the files against each other
/// and the settings against the rows there are. Files that do not exist are left to the
/// config's own checks, which report them.
pub(super) fn check(cfg: &JobConfig) -> DataFindings {
    let mut out = DataFindings::default();
    let d = &cfg.data;
    let domain_key = |i: usize| {
        if d.train_shorthand {
            "data.train".to_string()
        } else {
            format!("data.domains[{i}].source")
        }
    };
    let mut named: Vec<(String, &Path, String)> = d
        .domains
        .iter()
        .enumerate()
        .map(|(i, dom)| (domain_key(i), dom.source.as_path(), format!("domain `{}`: ", dom.name)))
        .collect();
    if let Some(meta) = &d.meta {
        named.push(("data.meta".into(), meta, String::new()));
    }
    named.push(("data.test".into(), &d.test, String::new()));
    let mut files: Vec<File> = Vec::new();
    for (key, path, what) in named {
        if !path.is_file() {
            continue;
        }
        match files.iter_mut().find(|f| f.path == path) {
            Some(f) => f.keys.push(key),
            None => files.push(File {
                path: path.to_owned(),
                keys: vec![key],
                what,
                found: dataset::inspect(path, d.classes),
            }),
        }
    }
    for f in &files {
        let (key, others) = f.key_and_others();
        for problem in &f.found.problems {
            let uses: Vec<String> = match problem {
                // With fewer than two classes (reported by itself) every label would be out.
                DataError::LabelOutOfRange { .. } if d.classes < 2 => continue,
                DataError::LabelOutOfRange { .. } => vec!["data.classes".into()],
                _ => Vec::new(),
            };
            out.problems.push(Finding {
                key: key.clone(),
                uses,
                why: format!("{}{problem}{others}", f.what),
            });
        }
    }
    let file = |path: &Path| files.iter().find(|f| f.path == path);
    features_agree(&files, &mut out);

    // Rows of every domain whose file could be read; a subset past the end is an error.
    let mut domains = Vec::new();
    for (i, dom) in d.domains.iter().enumerate() {
        let Some(rows) = file(&dom.source).and_then(|f| f.found.rows) else {
            continue;
        };
        let rows = match dom.subset {
            Some(s) => {
                let end = s.start.saturating_add(s.count);
                if end > rows {
                    out.problems.push(Finding {
                        key: format!("data.domains[{i}].subset"),
                        uses: Vec::new(),
                        why: format!(
                            "rows {}..{end} are past the end of {}, which has {rows} rows",
                            s.start,
                            dom.source.display()
                        ),
                    });
                    continue;
                }
                s.count
            }
            None => rows,
        };
        if dom.subset.is_none() && rows < d.shards as usize {
            out.problems.push(Finding {
                key: "data.shards".into(),
                uses: vec![domain_key(i)],
                why: format!(
                    "{} shards, but domain `{}` ({}) has only {rows} rows; every shard needs at least one",
                    d.shards,
                    dom.name,
                    dom.source.display()
                ),
            });
            continue;
        }
        domains.push(DomainRows {
            name: &dom.name,
            path: &dom.source,
            rows,
        });
    }
    let meta_rows = d
        .meta
        .as_deref()
        .and_then(|m| file(m).and_then(|f| f.found.rows).map(|rows| (m, rows)))
        .and_then(|(m, rows)| match meta_subset_rows(d.meta_subset, m, rows) {
            Ok(rows) => Some((m, rows)),
            Err(why) => {
                out.problems.push(Finding {
                    key: "data.meta_subset".into(),
                    uses: vec!["data.meta".into()],
                    why,
                });
                None
            }
        });
    sizes_fit(cfg, &domains, meta_rows, &mut out.warnings);
    out
}

/// Rows of the meta set: its subset's count, or the file's `rows`; a subset past the end of the
/// file is the error message. (Also the text checks', which read the file their own way.)
pub fn meta_subset_rows(subset: Option<crate::domains::Subset>, path: &Path, rows: usize) -> Result<usize, String> {
    let Some(s) = subset else { return Ok(rows) };
    let end = s.start.saturating_add(s.count);
    if end > rows {
        return Err(format!(
            "rows {}..{end} are past the end of {}, which has {rows} rows",
            s.start,
            path.display()
        ));
    }
    Ok(s.count)
}

/// Every file must have as many features per row as the test data (the model's input); each
/// file that differs is one problem naming both files.
fn features_agree(files: &[File], out: &mut DataFindings) {
    // The test file is the reference: the model's input width is taken from it. When it is
    // unreadable, the first readable file stands in.
    let reference = files
        .iter()
        .find(|f| f.keys.iter().any(|k| k == "data.test") && f.found.features.is_some())
        .or_else(|| files.iter().find(|f| f.found.features.is_some()));
    let Some(reference) = reference else { return };
    let Some(want) = reference.found.features else {
        return;
    };
    let ref_key = reference.keys.last().cloned().unwrap_or_default();
    for f in files {
        let Some(got) = f.found.features else { continue };
        if got == want {
            continue;
        }
        let (key, others) = f.key_and_others();
        out.problems.push(Finding {
            key,
            uses: Vec::new(),
            why: format!(
                "{}{} has {got} features per row, but {ref_key} ({}) has {want}; every file of a job \
                 needs the same features{others}",
                f.what,
                f.path.display(),
                reference.path.display()
            ),
        });
    }
}

/// Warnings for sample counts larger than the rows they draw from (see the module comment for
/// why these are warnings): the probe, the task policy's target batch, the inner batch.
fn sizes_fit(cfg: &JobConfig, domains: &[DomainRows<'_>], meta: Option<(&Path, usize)>, out: &mut Vec<Finding>) {
    let s = &cfg.strategy;
    let shards = cfg.data.shards.max(1) as usize;
    let warn = |out: &mut Vec<Finding>, key: &str, why: String| {
        out.push(Finding {
            key: key.into(),
            uses: Vec::new(),
            why,
        });
    };
    // The smallest shard of any domain (shard sizes differ by at most one: the smallest is
    // rows / shards, rounded down).
    let smallest_shard = domains.iter().min_by_key(|dom| dom.rows / shards);
    let shard_text = |dom: &DomainRows<'_>| {
        if shards == 1 {
            format!("domain `{}` ({})", dom.name, dom.path.display())
        } else {
            format!(
                "a shard of domain `{}` ({}: {} rows in {shards} shards)",
                dom.name,
                dom.path.display(),
                dom.rows
            )
        }
    };
    let probes =
        s.kind == StrategyKind::DomainWeights && matches!(s.method, WeightMethod::Hypergradient | WeightMethod::Doremi);
    if let Some(dom) = smallest_shard.filter(|_| probes) {
        let rows = dom.rows / shards;
        if s.probe as usize > rows {
            warn(
                out,
                "strategy.probe",
                format!(
                    "{} is more than the {rows} rows of {}; the probe is clamped to those {rows} rows",
                    s.probe,
                    shard_text(dom)
                ),
            );
        }
    }
    let batch = cfg.inner.batch_size as usize;
    if s.kind == StrategyKind::TaskPolicy {
        if let Some((path, rows)) = meta {
            if s.target_batch as usize > rows {
                warn(
                    out,
                    "strategy.target_batch",
                    format!(
                        "{} is more than the {rows} rows of the target (data.meta, {}); every round \
                         measures all {rows}",
                        s.target_batch,
                        path.display()
                    ),
                );
            }
        }
        // A source assignment trains on a whole domain; fine-tuning on the target.
        let smallest = domains
            .iter()
            .map(|dom| (dom.rows, format!("domain `{}` ({})", dom.name, dom.path.display())))
            .chain(meta.map(|(path, rows)| (rows, format!("the target (data.meta, {})", path.display()))))
            .min_by_key(|(rows, _)| *rows);
        if let Some((rows, what)) = smallest {
            if batch > rows {
                warn(
                    out,
                    "inner.batch_size",
                    format!("{batch} is more than the {rows} rows of {what}; its batches are those {rows} rows"),
                );
            }
        }
    } else if let Some(dom) = smallest_shard {
        // The mixture: every batch takes batch / K rows from each domain's shard.
        let k = cfg.data.domains.len().max(1);
        let share = (batch / k).max(1);
        let rows = dom.rows / shards;
        if share > rows {
            let per = if k > 1 {
                format!(" gives each of the {k} domains {share} rows per batch, which")
            } else {
                String::new()
            };
            warn(
                out,
                "inner.batch_size",
                format!(
                    "{batch}{per} is more than the {rows} rows of {}; its batches are those {rows} rows",
                    shard_text(dom)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{JobConfig, ParseFailure};
    use crate::dataset::{to_safetensors, Dataset};
    use safetensors::{tensor::TensorView, Dtype};
    use std::path::Path;

    /// `n` rows of `features` features, labels cycling through 0..classes.
    fn data(n: usize, features: usize, classes: i64) -> Dataset {
        Dataset {
            x: (0..n * features).map(|v| v as f32 / 10.0).collect(),
            y: (0..n as i64).map(|i| i % classes).collect(),
            features,
        }
    }

    fn write(dir: &Path, name: &str, ds: &Dataset) {
        std::fs::write(dir.join(name), to_safetensors(ds).expect("serialise")).expect("write");
    }

    /// A safetensors file with `x` of dtype F64 (the rest right).
    fn write_f64(dir: &Path, name: &str, n: usize, features: usize) {
        let xb = vec![0u8; n * features * 8];
        let yb: Vec<u8> = (0..n as i64).flat_map(|v| (v % 2).to_le_bytes()).collect();
        let x = TensorView::new(Dtype::F64, vec![n, features], &xb).expect("x");
        let y = TensorView::new(Dtype::I64, vec![n], &yb).expect("y");
        let bytes = safetensors::serialize([("x", x), ("y", y)], None).expect("serialise");
        std::fs::write(dir.join(name), bytes).expect("write");
    }

    fn problems(text: &str, dir: &Path) -> Vec<String> {
        match JobConfig::parse_checked(text, dir) {
            Err(ParseFailure::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn warnings(text: &str, dir: &Path) -> Vec<String> {
        JobConfig::parse_checked(text, dir).expect("valid").warnings
    }

    fn contains_all(line: &str, parts: &[&str]) -> bool {
        parts.iter().all(|p| line.contains(p))
    }

    #[test]
    fn every_bad_file_is_reported_at_once_with_its_key_file_and_numbers() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        write(d, "test.st", &data(20, 4, 3));
        write(d, "good.st", &data(40, 4, 3));
        std::fs::write(d.join("text.st"), "not a tensor file\n").expect("write");
        write_f64(d, "f64.st", 10, 4);
        let mut labels = data(30, 4, 3);
        labels.y[7] = 3;
        labels.y[9] = -1;
        write(d, "labels.st", &labels);
        write(d, "narrow.st", &data(30, 3, 3));
        let shape = {
            let xb = vec![0u8; 5 * 4 * 4];
            let yb = vec![0u8; 6 * 8];
            let x = TensorView::new(Dtype::F32, vec![5, 4], &xb).expect("x");
            let y = TensorView::new(Dtype::I64, vec![6], &yb).expect("y");
            safetensors::serialize([("x", x), ("y", y)], None).expect("serialise")
        };
        std::fs::write(d.join("shape.st"), shape).expect("write");
        write(d, "meta.st", &data(10, 5, 3));
        let mut text =
            "rounds = 2\n[data]\ntest = \"test.st\"\nmeta = \"meta.st\"\nclasses = 3\nshards = 1\n".to_string();
        for (name, file) in [
            ("good", "good.st"),
            ("text", "text.st"),
            ("f64", "f64.st"),
            ("labels", "labels.st"),
            ("narrow", "narrow.st"),
            ("shape", "shape.st"),
        ] {
            text += &format!("[[data.domains]]\nname = \"{name}\"\nsource = \"{file}\"\n");
        }
        let p = problems(&text, d);
        let joined = p.join("\n");
        let expect: [&[&str]; 6] = [
            &[
                "data.domains[1].source: domain `text`: data file ",
                "text.st",
                "not a valid safetensors file",
            ],
            &[
                "data.domains[2].source: ",
                "tensor `x`",
                "f64.st",
                "dtype F64, expected F32",
            ],
            &[
                "data.domains[3].source: ",
                "labels.st",
                "label 3 at row 7 is outside 0..3",
                "(2 labels in all)",
            ],
            &[
                "data.domains[4].source: ",
                "narrow.st has 3 features per row",
                "data.test (",
                "test.st) has 4",
            ],
            &[
                "data.domains[5].source: ",
                "shape.st",
                "shape [5, 4], expected [6, features]",
            ],
            &["data.meta: ", "meta.st has 5 features per row", "test.st) has 4"],
        ];
        for parts in expect {
            assert!(
                p.iter().any(|l| contains_all(l, parts)),
                "no line with {parts:?} in:\n{joined}"
            );
        }
        assert_eq!(p.len(), expect.len(), "{joined}");
        // Each line names its key once and never the domain twice.
        for line in &p {
            assert_eq!(
                line.matches("data.").count(),
                line.matches("data.test").count() + 1,
                "{line}"
            );
            assert!(line.matches("domain `").count() <= 1, "{line}");
        }
    }

    #[test]
    fn a_file_shared_by_several_keys_is_reported_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        write(d, "test.st", &data(20, 4, 3));
        std::fs::write(d.join("bad.st"), [0u8; 3]).expect("write");
        let text = "rounds = 2\n[data]\ntest = \"test.st\"\nclasses = 3\nshards = 1\n\
            [[data.domains]]\nname = \"a\"\nsource = \"bad.st\"\n\
            [[data.domains]]\nname = \"b\"\nsource = \"bad.st\"\nlabel_noise = 0.5\n";
        let p = problems(text, d);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("data.domains[0].source: ") && p[0].ends_with("(the same file as data.domains[1].source)"),
            "{p:?}"
        );
    }

    #[test]
    fn rows_the_settings_need_must_exist() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        write(d, "test.st", &data(20, 4, 3));
        write(d, "small.st", &data(3, 4, 3));
        write(d, "big.st", &data(50, 4, 3));
        let text = "rounds = 2\n[data]\ntest = \"test.st\"\nclasses = 3\nshards = 4\n\
            [[data.domains]]\nname = \"small\"\nsource = \"small.st\"\n\
            [[data.domains]]\nname = \"cut\"\nsource = \"big.st\"\nsubset = { start = 40, count = 20 }\n";
        let p = problems(text, d);
        let joined = p.join("\n");
        assert!(
            p.iter()
                .any(|l| l.starts_with("data.shards: 4 shards, but domain `small` (")
                    && l.contains("small.st) has only 3 rows")),
            "{joined}"
        );
        assert!(
            p.iter().any(
                |l| l.starts_with("data.domains[1].subset: rows 40..60 are past the end of ")
                    && l.ends_with("big.st, which has 50 rows")
            ),
            "{joined}"
        );
        assert_eq!(p.len(), 2, "{joined}");
    }

    #[test]
    fn settings_larger_than_the_data_are_warnings_naming_key_file_and_numbers() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        write(d, "test.st", &data(20, 4, 3));
        write(d, "meta.st", &data(15, 4, 3));
        write(d, "a.st", &data(72, 4, 3));
        write(d, "b.st", &data(100, 4, 3));
        let head = "rounds = 10\n[data]\ntest = \"test.st\"\nmeta = \"meta.st\"\nclasses = 3\n";
        let domains = "[[data.domains]]\nname = \"a\"\nsource = \"a.st\"\n\
            [[data.domains]]\nname = \"b\"\nsource = \"b.st\"\n";
        // 72 rows in 2 shards: 36 per shard, below probe = 64 and the 40 rows per domain of a
        // batch of 80.
        let text = format!(
            "{head}shards = 2\n{domains}[inner]\nbatch_size = 80\n[strategy]\nmethod = \"hypergradient\"\nprobe = 64\n"
        );
        let w = warnings(&text, d);
        let a = d.join("a.st");
        assert_eq!(
            w,
            [
                format!(
                    "strategy.probe: 64 is more than the 36 rows of a shard of domain `a` ({}: 72 rows in 2 \
                     shards); the probe is clamped to those 36 rows",
                    a.display()
                ),
                format!(
                    "inner.batch_size: 80 gives each of the 2 domains 40 rows per batch, which is more than the \
                     36 rows of a shard of domain `a` ({}: 72 rows in 2 shards); its batches are those 36 rows",
                    a.display()
                ),
            ]
        );
        let text = format!(
            "{head}shards = 1\n{domains}[inner]\nbatch_size = 16\n[strategy]\nkind = \"task-policy\"\ntarget_batch = 64\n"
        );
        let w = warnings(&text, d);
        let meta = d.join("meta.st");
        assert_eq!(
            w,
            [
                format!(
                    "strategy.target_batch: 64 is more than the 15 rows of the target (data.meta, {}); every \
                     round measures all 15",
                    meta.display()
                ),
                format!(
                    "inner.batch_size: 16 is more than the 15 rows of the target (data.meta, {}); its batches \
                     are those 15 rows",
                    meta.display()
                ),
            ]
        );
        let fits = format!(
            "{head}shards = 2\n{domains}[inner]\nbatch_size = 64\n[strategy]\nmethod = \"doremi\"\nprobe = 36\n"
        );
        assert_eq!(warnings(&fits, d), Vec::<String>::new());
    }

    #[test]
    fn data_checks_that_read_a_broken_key_are_left_out() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        write(d, "test.st", &data(20, 4, 3));
        write(d, "train.st", &data(20, 4, 3));
        // A wrong type for `classes` leaves a placeholder 0: no label may be reported for it.
        let p = problems(
            "rounds = 2\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = \"three\"\n",
            d,
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("data.classes: wrong type"), "{p:?}");
        // Without data checks, parse does not open the files.
        std::fs::write(d.join("train.st"), "x").expect("write");
        JobConfig::parse(
            "rounds = 2\n[data]\ntrain = \"train.st\"\ntest = \"test.st\"\nclasses = 3\n",
            d,
        )
        .expect("parse only checks that files exist");
    }
}
