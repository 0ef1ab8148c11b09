//! A job's data of either kind behind one type: dense features (safetensors `x`/`y`, for the
//! MLP) or tokenized text (JSONL, CSV or Parquet through the model's tokenizer, for BERT). The
//! coordinator and the workers build every domain, the meta set and the test set with this same
//! code from the same job spec and compare checksums; batches of rows from one or several sets
//! become the model's [`Inputs`] here, and nowhere else.

use crate::model::{Inputs, Model, ModelError};
use crate::text::{self, Columns, SourceOptions, TextError, TextOptions, TokenizedText};
use metaloop_proto::dataset::{self, DataError, Dataset};
use metaloop_proto::domains::{self, DomainConfig, DomainError, DomainRecord};
use metaloop_proto::proto::TextSpec;
use metaloop_proto::rng::derive_seed;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Rows of one data set: features or tokenized text, with a class label each.
#[derive(Debug, Clone)]
pub enum Data {
    Dense(Dataset),
    Text(TokenizedText),
}

/// Why a job's data could not be built; the message names the domain or file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    File(#[from] DataError),
    #[error("{what}: {error}")]
    Text { what: String, error: TextError },
    #[error("{what}: rows {start}..{end} are not inside {path}, which has {len} rows")]
    Rows {
        what: String,
        start: usize,
        end: usize,
        path: PathBuf,
        len: usize,
    },
}

impl Data {
    pub fn len(&self) -> usize {
        self.labels().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `rows` (inside the set) as a set of their own; all of them as they are.
    fn rows(self, rows: Range<usize>) -> Data {
        if rows == (0..self.len()) {
            return self;
        }
        match self {
            Data::Dense(d) => Data::Dense(d.rows(rows)),
            Data::Text(t) => Data::Text(t.select(&rows.collect::<Vec<_>>())),
        }
    }

    /// Every row's class.
    pub fn labels(&self) -> &[i64] {
        match self {
            Data::Dense(d) => &d.y,
            Data::Text(t) => &t.labels,
        }
    }

    /// Rows of contiguous shard `index` of `count`.
    pub fn shard_range(&self, index: u32, count: u32) -> Range<usize> {
        let (n, k, i) = (self.len(), count.max(1) as usize, index as usize);
        (i * n / k)..((i + 1) * n / k)
    }

    /// SHA-256 of the rows and labels: equal on two machines exactly when the data is.
    pub fn checksum(&self) -> [u8; 32] {
        match self {
            Data::Dense(d) => domains::dataset_checksum(d),
            Data::Text(t) => t.checksum(),
        }
    }

    /// Features per row (dense data), the width the MLP's input layer takes.
    pub fn features(&self) -> Option<usize> {
        match self {
            Data::Dense(d) => Some(d.features),
            Data::Text(_) => None,
        }
    }

    /// Rows `rows` as model inputs and labels on `device`.
    pub fn batch(&self, rows: &[usize], device: Device) -> (Inputs, Tensor) {
        let mut r = Rows::default();
        r.push(self, rows);
        r.tensors(device)
    }
}

/// Rows gathered from one or more data sets of one kind, to become one batch.
#[derive(Debug, Default)]
pub struct Rows {
    labels: Vec<i64>,
    /// Dense: the features, row-major.
    x: Vec<f32>,
    features: usize,
    /// Text: every row's ids, concatenated, and where each row ends.
    ids: Vec<u32>,
    ends: Vec<usize>,
    pad_id: u32,
    text: bool,
}

impl Rows {
    /// Appends rows `rows` of `d`.
    ///
    /// # Panics
    /// A row out of range, or sets of two kinds in one batch (a job's sets are of one kind).
    pub fn push(&mut self, d: &Data, rows: &[usize]) {
        match d {
            Data::Dense(ds) => {
                assert!(!self.text, "dense rows added to a text batch");
                let f = ds.features;
                self.features = f;
                for &i in rows {
                    self.x.extend_from_slice(&ds.x[i * f..(i + 1) * f]);
                    self.labels.push(ds.y[i]);
                }
            }
            Data::Text(t) => {
                assert!(self.labels.is_empty() || self.text, "text rows added to a dense batch");
                self.text = true;
                self.pad_id = t.pad_id;
                for &i in rows {
                    self.ids.extend_from_slice(t.row(i));
                    self.ends.push(self.ids.len());
                    self.labels.push(t.labels[i]);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The rows as model inputs (text padded to the longest row, with its attention mask) and
    /// their labels, on `device`.
    pub fn tensors(&self, device: Device) -> (Inputs, Tensor) {
        let n = self.labels.len() as i64;
        let y = Tensor::from_slice(&self.labels).to_device(device);
        if !self.text {
            let x = Tensor::from_slice(&self.x).reshape([n, self.features as i64]);
            return (Inputs::Dense(x.to_device(device)), y);
        }
        let mut start = 0;
        let spans: Vec<Range<usize>> = self
            .ends
            .iter()
            .map(|&end| {
                let r = start..end;
                start = end;
                r
            })
            .collect();
        let len = spans.iter().map(ExactSizeIterator::len).max().unwrap_or(0);
        let mut ids = vec![i64::from(self.pad_id); spans.len() * len];
        let mut mask = vec![0i64; spans.len() * len];
        for (b, span) in spans.iter().enumerate() {
            for (j, &id) in self.ids[span.clone()].iter().enumerate() {
                ids[b * len + j] = i64::from(id);
                mask[b * len + j] = 1;
            }
        }
        let shape = [n, len as i64];
        (
            Inputs::Tokens {
                ids: Tensor::from_slice(&ids).reshape(shape).to_device(device),
                mask: Tensor::from_slice(&mask).reshape(shape).to_device(device),
            },
            y,
        )
    }
}

/// Where tokenized text is cached: `$METALOOP_CACHE/tokenized`, else
/// `$XDG_CACHE_HOME/metaloop/tokenized`, else `~/.cache/metaloop/tokenized` (shared by the
/// coordinator and the workers of one machine; keyed by content, so any of them may fill it).
pub fn text_cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let base = env("METALOOP_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("metaloop")))
        .or_else(|| env("HOME").map(|h| h.join(".cache").join("metaloop")))
        .unwrap_or_else(|| std::env::temp_dir().join("metaloop"));
    base.join("tokenized")
}

/// How a text file of the job is read: the job's columns and `labels` (a domain's own label
/// names, else the job's).
fn text_options(spec: &TextSpec, labels: Option<&[String]>) -> TextOptions {
    TextOptions {
        source: SourceOptions {
            columns: Columns {
                text: spec.text_column.clone(),
                label: spec.label_column.clone(),
                domain: None,
                task: None,
            },
            labels: labels.unwrap_or(&spec.labels).to_vec(),
        },
        tokenizer: PathBuf::from(&spec.tokenizer),
        max_len: spec.max_len as usize,
    }
}

/// Reads and tokenizes one text file (through the cache); `what` names it in errors.
fn load_text(path: &Path, spec: &TextSpec, labels: Option<&[String]>, what: &str) -> Result<TokenizedText, LoadError> {
    let mut t = text::load_tokenized(path, &text_options(spec, labels), &text_cache_dir()).map_err(|error| {
        LoadError::Text {
            what: what.into(),
            error,
        }
    })?;
    // A domain's own names were only its map into the task's classes.
    t.label_names.clone_from(&spec.labels);
    Ok(t)
}

/// A data file (the test or the meta set), whole or the `subset` rows `(start, count)` of it:
/// dense when `text` is `None`.
///
/// # Errors
/// The file's problems, or a subset that is empty or not inside it, named.
/// How a text job's files are read and tokenized (`None`: a job on dense features).
pub fn text_spec(config: &metaloop_proto::config::JobConfig) -> Option<TextSpec> {
    let (tokenizer, max_len) = config.model.tokenizer()?;
    let d = &config.data;
    Some(TextSpec {
        tokenizer: tokenizer.to_string_lossy().into_owned(),
        max_len,
        labels: d.labels.clone(),
        text_column: d.text_column.clone(),
        label_column: d.label_column.clone(),
    })
}

pub fn load_set(
    path: &Path,
    subset: Option<(usize, usize)>,
    classes: u32,
    text: Option<&TextSpec>,
    what: &str,
) -> Result<Data, LoadError> {
    let full = match text {
        None => Data::Dense(dataset::load(path, classes)?),
        Some(spec) => Data::Text(load_text(path, spec, None, what)?),
    };
    let Some((start, count)) = subset else {
        return Ok(full);
    };
    let end = start.saturating_add(count);
    if count == 0 || end > full.len() {
        return Err(LoadError::Rows {
            what: what.into(),
            start,
            end,
            path: path.to_path_buf(),
            len: full.len(),
        });
    }
    Ok(full.rows(start..end))
}

/// Builds domain `index` of a job: its source (dense when `text` is `None`), subset and seeded
/// corruptions (seeded by the job's seed and the index, as every machine does).
///
/// # Errors
/// A bad source, or a subset outside it; named by domain and file.
pub fn build_domain(
    cfg: &DomainConfig,
    index: usize,
    classes: u32,
    job_seed: u64,
    text: Option<&TextSpec>,
) -> Result<(Data, DomainRecord), LoadError> {
    let Some(spec) = text else {
        let d = domains::build(cfg, index, classes, job_seed)?;
        return Ok((Data::Dense(d.data), d.record));
    };
    let full = load_text(
        &cfg.source,
        spec,
        cfg.labels.as_deref(),
        &format!("domain `{}`", cfg.name),
    )?;
    let (start, end) = domains::rows(cfg, full.len())?;
    let mut data = if (start, end) == (0, full.len()) {
        full
    } else {
        full.select(&(start..end).collect::<Vec<_>>())
    };
    let seed = domains::corruption_seed(job_seed, index);
    let mut flipped = Vec::new();
    let permutation = cfg.permute_labels.then(|| {
        let (p, _) = text::permute_labels(&mut data, derive_seed(seed, &[1]));
        p
    });
    if cfg.label_noise > 0.0 {
        flipped = text::label_noise(&mut data, cfg.label_noise, derive_seed(seed, &[2]));
    }
    let noise = (cfg.token_noise > 0.0).then(|| text::token_noise(&mut data, cfg.token_noise, derive_seed(seed, &[3])));
    let record = DomainRecord {
        name: cfg.name.clone(),
        source: cfg.source.display().to_string(),
        rows: (start, end),
        samples: data.len(),
        label_noise: cfg.label_noise,
        flipped,
        permutation,
        feature_noise: 0.0,
        feature_permutation: None,
        token_noise: cfg.token_noise,
        tokens_replaced: noise.map_or(0, |n| n.tokens),
        checksum: metaloop_proto::checksum::hex(&data.checksum()),
    };
    Ok((Data::Text(data), record))
}

/// Rows per forward pass when a whole set is evaluated: bounds the activations a transformer
/// holds at once; a dense set is small and goes in one pass.
const EVAL_ROWS: usize = 64;

/// The model's loss on every row of `d` (no gradients; stochastic layers as the model is set).
///
/// # Errors
/// When libtorch cannot read the losses back.
pub fn per_sample_losses(model: &dyn Model, d: &Data, device: Device) -> Result<Vec<f64>, ModelError> {
    let mut out = Vec::with_capacity(d.len());
    for rows in eval_chunks(d) {
        let (x, y) = d.batch(&rows, device);
        let l = tch::no_grad(|| {
            let logp = model.forward(&x).log_softmax(-1, Kind::Double);
            -logp.gather(1, &y.unsqueeze(1), false).squeeze_dim(1)
        });
        out.extend(Vec::<f64>::try_from(&l)?);
    }
    Ok(out)
}

/// Mean cross-entropy and accuracy of a model on a whole set.
///
/// # Errors
/// When libtorch fails.
pub fn evaluate(model: &dyn Model, d: &Data, device: Device) -> Result<(f64, f64), ModelError> {
    if let Data::Dense(ds) = d {
        return crate::model::evaluate(model, ds, device);
    }
    let (mut loss, mut correct) = (0.0, 0i64);
    for rows in eval_chunks(d) {
        let (x, y) = d.batch(&rows, device);
        let (l, c) = tch::no_grad(|| -> Result<(f64, i64), ModelError> {
            let logits = model.forward(&x);
            let l = logits
                .f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Sum, -100, 0.0)?
                .f_double_value(&[])?;
            let c = logits
                .f_argmax(-1, false)?
                .f_eq_tensor(&y)?
                .f_sum(Kind::Int64)?
                .f_int64_value(&[])?;
            Ok((l, c))
        })?;
        loss += l;
        correct += c;
    }
    let n = d.len().max(1) as f64;
    Ok((loss / n, correct as f64 / n))
}

/// A set's rows in evaluation passes: all at once for dense data, [`EVAL_ROWS`] at a time for
/// text.
pub fn eval_chunks(d: &Data) -> Vec<Vec<usize>> {
    let per = match d {
        Data::Dense(_) => d.len().max(1),
        Data::Text(_) => EVAL_ROWS,
    };
    (0..d.len())
        .collect::<Vec<_>>()
        .chunks(per)
        .map(<[usize]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(rows: &[&[u32]], labels: &[i64]) -> Data {
        let mut ids = Vec::new();
        let mut offsets = vec![0u32];
        for r in rows {
            ids.extend_from_slice(r);
            offsets.push(ids.len() as u32);
        }
        Data::Text(TokenizedText {
            ids,
            offsets,
            labels: labels.to_vec(),
            label_names: vec!["a".into(), "b".into()],
            domains: None,
            tasks: None,
            truncated: Vec::new(),
            max_len: 8,
            pad_id: 0,
            special_ids: vec![0, 1, 2],
            vocab_size: 50,
        })
    }

    #[test]
    fn rows_from_two_text_sets_pad_to_the_longest_with_a_mask() {
        let a = text(&[&[1, 5, 6, 2], &[1, 7, 2]], &[0, 1]);
        let b = text(&[&[1, 8, 9, 10, 11, 2]], &[1]);
        let mut rows = Rows::default();
        rows.push(&a, &[1, 0]);
        rows.push(&b, &[0]);
        assert_eq!(rows.len(), 3);
        let (inputs, y) = rows.tensors(Device::Cpu);
        let Inputs::Tokens { ids, mask } = inputs else {
            panic!("text rows become tokens")
        };
        assert_eq!(ids.size(), vec![3, 6]);
        let ids = Vec::<i64>::try_from(ids.view(-1)).expect("ids");
        let mask = Vec::<i64>::try_from(mask.view(-1)).expect("mask");
        assert_eq!(&ids[..6], &[1, 7, 2, 0, 0, 0]);
        assert_eq!(&ids[6..12], &[1, 5, 6, 2, 0, 0]);
        assert_eq!(&ids[12..], &[1, 8, 9, 10, 11, 2]);
        assert_eq!(&mask[..6], &[1, 1, 1, 0, 0, 0]);
        assert_eq!(&mask[12..], &[1; 6]);
        assert_eq!(Vec::<i64>::try_from(&y).expect("y"), vec![1, 0, 1]);
    }

    #[test]
    fn dense_rows_keep_their_features_and_shards_split_evenly() {
        let d = Data::Dense(Dataset {
            x: (0..12).map(|v| v as f32).collect(),
            y: vec![0, 1, 0, 1, 0, 1],
            features: 2,
        });
        let (x, y) = d.batch(&[5, 0], Device::Cpu);
        assert_eq!(
            Vec::<f32>::try_from(x.dense().view(-1)).expect("x"),
            vec![10.0, 11.0, 0.0, 1.0]
        );
        assert_eq!(Vec::<i64>::try_from(&y).expect("y"), vec![1, 0]);
        assert_eq!(d.shard_range(0, 4), 0..1);
        assert_eq!(d.shard_range(3, 4), 4..6);
        assert_eq!(d.features(), Some(2));
    }

    #[test]
    fn a_subset_of_a_set_takes_its_rows_and_one_outside_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.safetensors");
        let ds = Dataset {
            x: (0..10).map(|v| v as f32).collect(),
            y: vec![0, 1, 1, 0, 1],
            features: 2,
        };
        std::fs::write(&path, dataset::to_safetensors(&ds).expect("encode")).expect("write");
        let Data::Dense(d) = load_set(&path, Some((1, 3)), 2, None, "the meta set").expect("subset") else {
            panic!("dense")
        };
        assert_eq!(d.y, vec![1, 1, 0]);
        assert_eq!(d.x, vec![2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        assert_eq!(load_set(&path, None, 2, None, "the meta set").expect("whole").len(), 5);
        for bad in [(3, 3), (0, 0), (6, 1)] {
            let msg = load_set(&path, Some(bad), 2, None, "the meta set")
                .expect_err("outside")
                .to_string();
            assert!(msg.starts_with("the meta set: rows"), "{msg}");
            assert!(msg.contains("meta.safetensors, which has 5 rows"), "{msg}");
        }
    }

    #[test]
    fn evaluation_in_chunks_counts_every_row_once() {
        let rows: Vec<Vec<u32>> = (0..150).map(|i| vec![1, 3 + (i % 40) as u32, 2]).collect();
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let labels: Vec<i64> = (0..150).map(|i| i % 2).collect();
        let d = text(&refs, &labels);
        let chunks = eval_chunks(&d);
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![64, 64, 22]);
        assert_eq!(chunks.concat(), (0..150).collect::<Vec<_>>());
    }
}
