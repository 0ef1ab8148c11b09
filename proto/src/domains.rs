//! Training domains: each is a safetensors file, optionally passed through deterministic,
//! seeded transforms (a subset, symmetric label noise, a fixed label permutation, additive
//! feature noise, a fixed permutation of the features). Coordinator and workers build domains with this same code from the same
//! spec, and compare checksums, so both sides train on identical data; the corruption applied
//! is recorded for the run directory.

use crate::dataset::{self, DataError, Dataset};
use crate::rng::{derive_seed, SplitMix64};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// One training domain as written in the job config (`[[data.domains]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    /// Shown in progress lines, metrics and the summary.
    pub name: String,
    /// Safetensors file with `x` and `y`, relative to the config file.
    pub source: PathBuf,
    /// Rows `start .. start + count` of the source (default: all of it).
    #[serde(default)]
    pub subset: Option<Subset>,
    /// Probability that a label is replaced by a different class, chosen uniformly.
    #[serde(default)]
    pub label_noise: f64,
    /// Relabel every sample through a fixed random permutation with no fixed point.
    #[serde(default)]
    pub permute_labels: bool,
    /// Standard deviation of Gaussian noise added to every feature.
    #[serde(default)]
    pub feature_noise: f64,
    /// Reorder every sample's features through one fixed random permutation (for images: the
    /// pixels are shuffled the same way in every image, a different task on the same labels).
    #[serde(default)]
    pub permute_features: bool,
    /// Text: the domain's own label names, the i-th being class i (default: `data.labels`);
    /// maps a source with other names (`plot`/`review`) into the task's classes.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// Text: the fraction of every text's tokens replaced by random vocabulary tokens (special
    /// tokens kept), an out-of-distribution version of the text.
    #[serde(default)]
    pub token_noise: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subset {
    pub start: usize,
    pub count: usize,
}

/// What was done to a domain's data, for the run directory.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DomainRecord {
    pub name: String,
    pub source: String,
    pub rows: (usize, usize),
    pub samples: usize,
    pub label_noise: f64,
    /// Rows (within the domain) whose label the noise changed.
    pub flipped: Vec<usize>,
    /// `permutation[c]` is the label given to class c.
    pub permutation: Option<Vec<i64>>,
    pub feature_noise: f64,
    /// `feature_permutation[j]` is the source feature placed at position j.
    pub feature_permutation: Option<Vec<usize>>,
    /// Text: the fraction of tokens replaced, and how many were.
    pub token_noise: f64,
    pub tokens_replaced: usize,
    pub checksum: String,
}

/// A built domain.
#[derive(Debug, Clone)]
pub struct Domain {
    pub data: Dataset,
    pub record: DomainRecord,
}

/// Why a domain could not be built. The message is whole in `Display` (the data error's text
/// included), so there is no error `source` for a chain printer to repeat.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("domain `{name}`: {error}")]
    Data { name: String, error: DataError },
    #[error("domain `{name}`: subset {start}..{end} is outside {path}, which has {len} samples")]
    Subset {
        name: String,
        start: usize,
        end: usize,
        path: PathBuf,
        len: usize,
    },
    #[error("domain `{name}` is empty")]
    Empty { name: String },
}

/// The seed of domain `index`'s corruptions (label permutation, then label noise, then feature
/// or token noise, drawn in that order from one stream).
pub fn corruption_seed(job_seed: u64, index: usize) -> u64 {
    derive_seed(job_seed, &[0xD0_0A1, index as u64])
}

/// Builds domain `index` of a job: loads its source and applies its transforms, seeded by
/// (job seed, domain index) so the same job always yields the same data.
///
/// # Errors
/// A bad source file or a subset outside it, naming the domain and file.
pub fn build(cfg: &DomainConfig, index: usize, classes: u32, job_seed: u64) -> Result<Domain, DomainError> {
    let full = dataset::load(&cfg.source, classes).map_err(|error| DomainError::Data {
        name: cfg.name.clone(),
        error,
    })?;
    let (start, end) = rows(cfg, full.len())?;
    let mut data = full.rows(start..end);
    let f = data.features;
    let mut rng = SplitMix64::new(corruption_seed(job_seed, index));
    let permutation = cfg.permute_labels.then(|| derangement(classes as usize, &mut rng));
    if let Some(p) = &permutation {
        for y in &mut data.y {
            *y = p[*y as usize];
        }
    }
    let mut flipped = Vec::new();
    if cfg.label_noise > 0.0 && classes > 1 {
        for (row, y) in data.y.iter_mut().enumerate() {
            if uniform(&mut rng) < cfg.label_noise {
                let other = rng.below(classes as usize - 1) as i64;
                *y = if other >= *y { other + 1 } else { other };
                flipped.push(row);
            }
        }
    }
    if cfg.feature_noise > 0.0 {
        for v in &mut data.x {
            *v += (cfg.feature_noise * gaussian(&mut rng)) as f32;
        }
    }
    // Its own stream, so adding it leaves the other transforms' draws unchanged.
    let feature_permutation = cfg.permute_features.then(|| {
        let mut p: Vec<usize> = (0..f).collect();
        SplitMix64::new(derive_seed(job_seed, &[0xFEA7, index as u64])).shuffle(&mut p);
        p
    });
    if let Some(p) = &feature_permutation {
        for row in data.x.chunks_exact_mut(f) {
            let original = row.to_vec();
            for (v, &j) in row.iter_mut().zip(p) {
                *v = original[j];
            }
        }
    }
    let record = DomainRecord {
        name: cfg.name.clone(),
        source: cfg.source.display().to_string(),
        rows: (start, end),
        samples: data.len(),
        label_noise: cfg.label_noise,
        flipped,
        permutation,
        feature_noise: cfg.feature_noise,
        feature_permutation,
        token_noise: 0.0,
        tokens_replaced: 0,
        checksum: crate::checksum::hex(&dataset_checksum(&data)),
    };
    Ok(Domain { data, record })
}

/// The rows `start..end` of a source of `len` rows that domain `cfg` takes: its subset, or all.
///
/// # Errors
/// A subset outside the source, or no rows, naming the domain (and the file).
pub fn rows(cfg: &DomainConfig, len: usize) -> Result<(usize, usize), DomainError> {
    let (start, end) = match cfg.subset {
        Some(s) => (s.start, s.start.saturating_add(s.count)),
        None => (0, len),
    };
    if end > len || start > end {
        return Err(DomainError::Subset {
            name: cfg.name.clone(),
            start,
            end,
            path: cfg.source.clone(),
            len,
        });
    }
    if start == end {
        return Err(DomainError::Empty { name: cfg.name.clone() });
    }
    Ok((start, end))
}

/// The wire form of a domain, carrying the checksum of the coordinator's build.
pub fn to_spec(cfg: &DomainConfig, checksum: [u8; 32]) -> crate::proto::DomainSpec {
    crate::proto::DomainSpec {
        name: cfg.name.clone(),
        source: cfg.source.to_string_lossy().into_owned(),
        subset: cfg.subset.map(|s| (s.start as u64, s.count as u64)),
        label_noise: cfg.label_noise,
        permute_labels: cfg.permute_labels,
        feature_noise: cfg.feature_noise,
        permute_features: cfg.permute_features,
        labels: cfg.labels.clone(),
        token_noise: cfg.token_noise,
        checksum,
    }
}

/// The config a wire spec describes (the worker's side of [`to_spec`]).
pub fn from_spec(spec: &crate::proto::DomainSpec) -> DomainConfig {
    DomainConfig {
        name: spec.name.clone(),
        source: PathBuf::from(&spec.source),
        subset: spec.subset.map(|(start, count)| Subset {
            start: start as usize,
            count: count as usize,
        }),
        label_noise: spec.label_noise,
        permute_labels: spec.permute_labels,
        feature_noise: spec.feature_noise,
        permute_features: spec.permute_features,
        labels: spec.labels.clone(),
        token_noise: spec.token_noise,
    }
}

/// SHA-256 of a dataset's features and labels.
pub fn dataset_checksum(ds: &Dataset) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((ds.features as u64).to_le_bytes());
    for v in &ds.x {
        h.update(v.to_le_bytes());
    }
    for y in &ds.y {
        h.update(y.to_le_bytes());
    }
    h.finalize().into()
}

fn uniform(rng: &mut SplitMix64) -> f64 {
    rng.unit()
}

/// Standard normal by Box–Muller.
fn gaussian(rng: &mut SplitMix64) -> f64 {
    let u1 = uniform(rng).max(f64::MIN_POSITIVE);
    let u2 = uniform(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A uniformly drawn permutation of 0..n with no fixed point (every label changes).
fn derangement(n: usize, rng: &mut SplitMix64) -> Vec<i64> {
    let mut p: Vec<i64> = (0..n as i64).collect();
    if n < 2 {
        return p;
    }
    loop {
        rng.shuffle(&mut p);
        if p.iter().enumerate().all(|(i, &v)| v != i as i64) {
            return p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(dir: &tempfile::TempDir, n: usize) -> PathBuf {
        let ds = Dataset {
            x: (0..n * 2).map(|v| v as f32).collect(),
            y: (0..n).map(|i| (i % 4) as i64).collect(),
            features: 2,
        };
        let p = dir.path().join("src.safetensors");
        std::fs::write(&p, dataset::to_safetensors(&ds).expect("ser")).expect("write");
        p
    }

    fn cfg(source: PathBuf) -> DomainConfig {
        DomainConfig {
            name: "d".into(),
            source,
            subset: None,
            label_noise: 0.0,
            permute_labels: false,
            feature_noise: 0.0,
            permute_features: false,
            labels: None,
            token_noise: 0.0,
        }
    }

    #[test]
    fn subset_and_permutation() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = DomainConfig {
            subset: Some(Subset { start: 4, count: 8 }),
            permute_labels: true,
            ..cfg(source(&dir, 20))
        };
        let d = build(&c, 0, 4, 1).expect("build");
        assert_eq!(d.data.len(), 8);
        assert_eq!(d.data.x[0], 8.0, "row 4 starts at feature 8");
        let p = d.record.permutation.clone().expect("recorded");
        for (row, y) in d.data.y.iter().enumerate() {
            let original = ((row + 4) % 4) as i64;
            assert_eq!(*y, p[original as usize]);
            assert_ne!(*y, original, "a derangement changes every label");
        }
    }

    #[test]
    fn label_noise_flips_about_p_and_records_exactly_which() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = DomainConfig {
            label_noise: 0.5,
            ..cfg(source(&dir, 2000))
        };
        let d = build(&c, 1, 4, 3).expect("build");
        let changed: Vec<usize> = (0..2000).filter(|&i| d.data.y[i] != (i % 4) as i64).collect();
        assert_eq!(changed, d.record.flipped);
        assert!((900..1100).contains(&changed.len()), "{}", changed.len());
        let again = build(&c, 1, 4, 3).expect("build");
        assert_eq!(again.record, d.record, "same seed, same corruption");
        assert_ne!(build(&c, 1, 4, 4).expect("build").record.flipped, d.record.flipped);
    }

    #[test]
    fn feature_noise_has_the_requested_scale() {
        let dir = tempfile::tempdir().expect("tmp");
        let clean = build(&cfg(source(&dir, 1000)), 0, 4, 0).expect("build");
        let noisy = build(
            &DomainConfig {
                feature_noise: 2.0,
                ..cfg(source(&dir, 1000))
            },
            0,
            4,
            0,
        )
        .expect("build");
        let diffs: Vec<f64> = noisy
            .data
            .x
            .iter()
            .zip(&clean.data.x)
            .map(|(a, b)| f64::from(a - b))
            .collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let sd = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / diffs.len() as f64).sqrt();
        assert!(mean.abs() < 0.1 && (sd - 2.0).abs() < 0.1, "mean {mean} sd {sd}");
        assert_eq!(noisy.data.y, clean.data.y);
    }

    #[test]
    fn feature_permutation_moves_the_same_columns_in_every_row() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = 50;
        let ds = Dataset {
            x: (0..n * 16).map(|v| v as f32).collect(),
            y: (0..n).map(|i| (i % 4) as i64).collect(),
            features: 16,
        };
        let path = dir.path().join("wide.safetensors");
        std::fs::write(&path, dataset::to_safetensors(&ds).expect("ser")).expect("write");
        let c = DomainConfig {
            permute_features: true,
            ..cfg(path)
        };
        let d = build(&c, 2, 4, 7).expect("build");
        let p = d.record.feature_permutation.clone().expect("recorded");
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>(), "a permutation");
        assert_ne!(p, sorted, "not the identity");
        for row in 0..n {
            for (j, &src) in p.iter().enumerate() {
                assert_eq!(d.data.x[row * 16 + j], ds.x[row * 16 + src]);
            }
        }
        assert_eq!(d.data.y, ds.y, "labels untouched");
        assert_eq!(build(&c, 2, 4, 7).expect("again").record, d.record);
    }

    #[test]
    fn bad_subsets_and_files_name_the_domain() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = DomainConfig {
            subset: Some(Subset { start: 15, count: 10 }),
            ..cfg(source(&dir, 20))
        };
        let e = build(&c, 0, 4, 0).expect_err("outside").to_string();
        assert!(
            e.contains("domain `d`") && e.contains("15..25") && e.contains("20 samples"),
            "{e}"
        );
        let e = build(&cfg(dir.path().join("missing.safetensors")), 0, 4, 0)
            .expect_err("missing")
            .to_string();
        assert!(e.contains("domain `d`") && e.contains("missing.safetensors"), "{e}");
    }

    /// The whole chain, as anyhow's `{:#}` prints it (each cause after a colon).
    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut next = e.source();
        while let Some(cause) = next {
            text += &format!(": {cause}");
            next = cause.source();
        }
        text
    }

    #[test]
    fn a_bad_file_is_named_once_in_the_whole_error_chain() {
        let dir = tempfile::tempdir().expect("tmp");
        let garbage = dir.path().join("garbage.safetensors");
        std::fs::write(&garbage, b"x").expect("write");
        for path in [garbage, dir.path().join("absent.safetensors")] {
            let e = build(&cfg(path.clone()), 0, 4, 0).expect_err("bad file");
            let text = chain(&e);
            let name = path.file_name().and_then(|n| n.to_str()).expect("name");
            assert_eq!(text.matches(name).count(), 1, "{text}");
            assert_eq!(text.matches("domain `d`").count(), 1, "{text}");
        }
    }
}
