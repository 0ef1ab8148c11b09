//! Loads a labelled dataset from a safetensors file: `x` float32 `[n, features]` and `y` int64
//! `[n]`. The bundled digits data goes through exactly this code, as users' own files do.

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::path::{Path, PathBuf};

/// A dataset held in host memory (row-major features).
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub x: Vec<f32>,
    pub y: Vec<i64>,
    pub features: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Rows `rows` (inside the set), as a set of their own.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Dataset {
        let f = self.features;
        Dataset {
            x: self.x[rows.start * f..rows.end * f].to_vec(),
            y: self.y[rows].to_vec(),
            features: f,
        }
    }

    /// Contiguous shard `index` of `count` (sizes differ by at most one).
    pub fn shard_range(&self, index: u32, count: u32) -> std::ops::Range<usize> {
        let (n, k, i) = (self.len(), count.max(1) as usize, index as usize);
        (i * n / k)..((i + 1) * n / k)
    }
}

/// What was wrong with a data file; every variant names the file (and tensor). The message is
/// whole in `Display`, so no variant has an error `source` (a chain printer such as anyhow's
/// `{:#}` would print the cause twice).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read data file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("data file {path} is not a valid safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("data file {path} has no tensor `{tensor}` (it has: {found})")]
    MissingTensor {
        path: PathBuf,
        tensor: &'static str,
        found: String,
    },
    #[error("tensor `{tensor}` in {path} has dtype {found}, expected {expected}")]
    Dtype {
        path: PathBuf,
        tensor: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("tensor `{tensor}` in {path} has shape {found:?}, expected {expected}")]
    Shape {
        path: PathBuf,
        tensor: &'static str,
        found: Vec<usize>,
        expected: String,
    },
    #[error("tensor `y` in {path}: label {label} at row {row} is outside 0..{classes}{}", also(*count, "labels"))]
    LabelOutOfRange {
        path: PathBuf,
        row: usize,
        label: i64,
        classes: u32,
        /// Labels outside the range in all, this one included.
        count: usize,
    },
    #[error("tensor `x` in {path}: non-finite value {value} at row {row}{}", also(*count, "values"))]
    NonFinite {
        path: PathBuf,
        row: usize,
        value: f32,
        /// Non-finite values in all, this one included.
        count: usize,
    },
    #[error("data file {path} holds no samples")]
    Empty { path: PathBuf },
}

/// The tail of a message about the first of `count` faults.
fn also(count: usize, what: &str) -> String {
    if count > 1 {
        format!(" ({count} {what} in all)")
    } else {
        String::new()
    }
}

/// Everything found in one data file: its size where the shapes could be read, and every
/// problem (not just the first), so a check of a whole job can report them all at once.
#[derive(Debug)]
pub struct Inspection {
    /// The data, when there was no problem.
    pub data: Option<Dataset>,
    /// Rows, when the shapes of `x` and `y` are readable and agree (even if labels are bad).
    pub rows: Option<usize>,
    /// Features per row, when the shape of `x` is readable.
    pub features: Option<usize>,
    pub problems: Vec<DataError>,
}

/// Loads and checks `path`, whose labels must lie in `0..classes`.
///
/// # Errors
/// A [`DataError`] naming the file and tensor at fault (the first of them; [`inspect`] gives
/// them all).
pub fn load(path: &Path, classes: u32) -> Result<Dataset, DataError> {
    let bytes = std::fs::read(path).map_err(|error| DataError::Read {
        path: path.into(),
        error,
    })?;
    parse(&bytes, path, classes)
}

/// Parses safetensors bytes; `path` is only used in errors.
///
/// # Errors
/// As [`load`].
pub fn parse(bytes: &[u8], path: &Path, classes: u32) -> Result<Dataset, DataError> {
    let mut found = examine(bytes, path, classes);
    match found.data.take() {
        Some(data) => Ok(data),
        None => Err(found.problems.swap_remove(0)),
    }
}

/// Reads `path` and reports every problem with it (what `validate` runs on every data file of
/// a job, before anything starts).
pub fn inspect(path: &Path, classes: u32) -> Inspection {
    match std::fs::read(path) {
        Ok(bytes) => examine(&bytes, path, classes),
        Err(error) => Inspection {
            data: None,
            rows: None,
            features: None,
            problems: vec![DataError::Read {
                path: path.into(),
                error,
            }],
        },
    }
}

/// Every check of [`inspect`] on bytes already read; `data` is set exactly when `problems` is
/// empty.
fn examine(bytes: &[u8], path: &Path, classes: u32) -> Inspection {
    let mut out = Inspection {
        data: None,
        rows: None,
        features: None,
        problems: Vec::new(),
    };
    let st = match SafeTensors::deserialize(bytes) {
        Ok(st) => st,
        Err(e) => {
            out.problems.push(DataError::Format {
                path: path.into(),
                reason: e.to_string(),
            });
            return out;
        }
    };
    let mut get = |tensor: &'static str, want: Dtype, expected: &'static str| -> Option<TensorView<'_>> {
        let Ok(view) = st.tensor(tensor) else {
            let mut names: Vec<_> = st.names().into_iter().map(str::to_owned).collect();
            names.sort();
            out.problems.push(DataError::MissingTensor {
                path: path.into(),
                tensor,
                found: names.join(", "),
            });
            return None;
        };
        if view.dtype() != want {
            out.problems.push(DataError::Dtype {
                path: path.into(),
                tensor,
                found: format!("{:?}", view.dtype()),
                expected,
            });
            return None;
        }
        Some(view)
    };
    let x = get("x", Dtype::F32, "F32");
    let y = get("y", Dtype::I64, "I64");
    // A wrong dtype still has a readable shape.
    let shape = |tensor: &str| st.tensor(tensor).ok().map(|v| v.shape().to_vec());
    let (xs, ys) = (shape("x"), shape("y"));
    let mut n = None;
    if let Some(ys) = ys {
        if ys.len() == 1 {
            n = Some(ys[0]);
        } else {
            out.problems.push(DataError::Shape {
                path: path.into(),
                tensor: "y",
                found: ys,
                expected: "[n]".into(),
            });
        }
    }
    let mut x_ok = false;
    if let Some(xs) = xs {
        if xs.len() == 2 && xs[1] > 0 {
            out.features = Some(xs[1]);
        }
        if xs.len() == 2 && xs[1] > 0 && n.is_none_or(|n| xs[0] == n) {
            x_ok = true;
            out.rows = Some(xs[0]);
        } else {
            let rows = n.map_or_else(|| "n".to_string(), |n| n.to_string());
            out.problems.push(DataError::Shape {
                path: path.into(),
                tensor: "x",
                found: xs,
                expected: format!("[{rows}, features] (one row per label in `y`)"),
            });
        }
    }
    if out.rows == Some(0) {
        out.problems.push(DataError::Empty { path: path.into() });
        return out;
    }
    let xv: Option<Vec<f32>> = x.filter(|_| x_ok).map(|x| {
        x.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    });
    let yv: Option<Vec<i64>> = y.filter(|_| n.is_some()).map(|y| {
        y.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()
    });
    if let (Some(xv), Some(features)) = (&xv, out.features) {
        let mut bad = xv.iter().enumerate().filter(|(_, v)| !v.is_finite());
        if let Some((i, &value)) = bad.next() {
            out.problems.push(DataError::NonFinite {
                path: path.into(),
                row: i / features,
                value,
                count: 1 + bad.count(),
            });
        }
    }
    if let Some(yv) = &yv {
        let mut bad = yv.iter().enumerate().filter(|(_, &l)| l < 0 || l >= i64::from(classes));
        if let Some((row, &label)) = bad.next() {
            out.problems.push(DataError::LabelOutOfRange {
                path: path.into(),
                row,
                label,
                classes,
                count: 1 + bad.count(),
            });
        }
    }
    if out.problems.is_empty() {
        if let (Some(x), Some(y), Some(features)) = (xv, yv, out.features) {
            out.data = Some(Dataset { x, y, features });
        }
    }
    out
}

/// Serialises a dataset in the format [`load`] reads (used by tests and tools).
///
/// # Errors
/// When safetensors refuses the layout.
pub fn to_safetensors(ds: &Dataset) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let xb: Vec<u8> = ds.x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let yb: Vec<u8> = ds.y.iter().flat_map(|v| v.to_le_bytes()).collect();
    let x = TensorView::new(Dtype::F32, vec![ds.len(), ds.features], &xb)?;
    let y = TensorView::new(Dtype::I64, vec![ds.len()], &yb)?;
    safetensors::serialize([("x", x), ("y", y)], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        Dataset {
            x: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            y: vec![0, 2, 1],
            features: 2,
        }
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    }

    fn raw(tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) -> Vec<u8> {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| ((*n).to_string(), TensorView::new(*d, s.clone(), b).expect("view")))
            .collect();
        safetensors::serialize(views, None).expect("serialize")
    }

    #[test]
    fn roundtrip_and_shards() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = write(&dir, "ok.safetensors", &to_safetensors(&tiny()).expect("ser"));
        let ds = load(&p, 3).expect("load");
        assert_eq!(ds, tiny());
        assert_eq!(ds.shard_range(0, 2), 0..1);
        assert_eq!(ds.shard_range(1, 2), 1..3);
    }

    #[test]
    fn bundled_digits_load_through_the_same_code() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/digits");
        let sizes: Vec<usize> = ["train", "meta", "test"]
            .iter()
            .map(|s| load(&root.join(format!("{s}.safetensors")), 10).expect("digits").len())
            .collect();
        assert_eq!(sizes, vec![1358, 100, 339]);
    }

    #[test]
    fn inspect_reports_every_problem_of_a_file_with_its_numbers() {
        let dir = tempfile::tempdir().expect("tmp");
        let yb: Vec<u8> = [0i64, 12, 1, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let p = write(
            &dir,
            "two.safetensors",
            &raw(vec![
                ("x", Dtype::F64, vec![4, 3], vec![0; 96]),
                ("y", Dtype::I64, vec![4], yb),
            ]),
        );
        let found = inspect(&p, 3);
        let text: Vec<String> = found.problems.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(
            text[0].contains("`x`") && text[0].contains("dtype F64, expected F32"),
            "{text:?}"
        );
        assert!(
            text[1].contains("label 12 at row 1 is outside 0..3 (2 labels in all)"),
            "{text:?}"
        );
        assert_eq!(
            (found.rows, found.features),
            (Some(4), Some(3)),
            "sizes from the shapes"
        );
        assert!(found.data.is_none());

        let mut bad = tiny();
        bad.x[1] = f32::NAN;
        bad.x[4] = f32::NEG_INFINITY;
        let p = write(&dir, "nan2.safetensors", &to_safetensors(&bad).expect("ser"));
        let m = load(&p, 3).expect_err("non-finite").to_string();
        assert!(m.contains("non-finite value NaN at row 0 (2 values in all)"), "{m}");
        let ok = write(&dir, "ok.safetensors", &to_safetensors(&tiny()).expect("ser"));
        let found = inspect(&ok, 3);
        assert!(found.problems.is_empty() && found.data == Some(tiny()), "{found:?}");
    }

    #[test]
    fn errors_name_the_file_and_the_tensor() {
        let dir = tempfile::tempdir().expect("tmp");
        let msg = |r: Result<Dataset, DataError>| r.expect_err("should fail").to_string();

        let missing = dir.path().join("nope.safetensors");
        assert!(msg(load(&missing, 3)).contains("nope.safetensors"));

        let p = write(&dir, "garbage.safetensors", b"\x05\0\0\0\0\0\0\0hello");
        assert!(msg(load(&p, 3)).contains("not a valid safetensors"));

        let p = write(
            &dir,
            "noy.safetensors",
            &raw(vec![("x", Dtype::F32, vec![1, 1], vec![0; 4])]),
        );
        let m = msg(load(&p, 3));
        assert!(m.contains("no tensor `y`") && m.contains("noy.safetensors"), "{m}");

        let p = write(
            &dir,
            "dtype.safetensors",
            &raw(vec![
                ("x", Dtype::F64, vec![1, 1], vec![0; 8]),
                ("y", Dtype::I64, vec![1], vec![0; 8]),
            ]),
        );
        let m = msg(load(&p, 3));
        assert!(m.contains("`x`") && m.contains("F64"), "{m}");

        let p = write(
            &dir,
            "shape.safetensors",
            &raw(vec![
                ("x", Dtype::F32, vec![2, 1], vec![0; 8]),
                ("y", Dtype::I64, vec![1], vec![0; 8]),
            ]),
        );
        assert!(msg(load(&p, 3)).contains("shape [2, 1]"));

        let mut bad = tiny();
        bad.y[2] = 7;
        let p = write(&dir, "label.safetensors", &to_safetensors(&bad).expect("ser"));
        let m = msg(load(&p, 3));
        assert!(m.contains("label 7 at row 2") && m.contains("0..3"), "{m}");

        let mut bad = tiny();
        bad.x[3] = f32::NAN;
        let p = write(&dir, "nan.safetensors", &to_safetensors(&bad).expect("ser"));
        assert!(msg(load(&p, 3)).contains("row 1"));

        let mut bad = tiny();
        bad.x[0] = f32::INFINITY;
        let p = write(&dir, "inf.safetensors", &to_safetensors(&bad).expect("ser"));
        let m = msg(load(&p, 3));
        assert!(m.contains("non-finite value inf at row 0") && m.contains("`x`"), "{m}");

        let whole = to_safetensors(&tiny()).expect("ser");
        let p = write(&dir, "cut.safetensors", &whole[..whole.len() - 5]);
        let m = msg(load(&p, 3));
        assert!(
            m.contains("cut.safetensors") && m.contains("not a valid safetensors"),
            "{m}"
        );

        let p = write(
            &dir,
            "rank.safetensors",
            &raw(vec![
                ("x", Dtype::F32, vec![2], vec![0; 8]),
                ("y", Dtype::I64, vec![2], vec![0; 16]),
            ]),
        );
        let m = msg(load(&p, 3));
        assert!(m.contains("`x`") && m.contains("shape [2]"), "{m}");

        let empty = Dataset {
            x: Vec::new(),
            y: Vec::new(),
            features: 2,
        };
        let p = write(&dir, "empty.safetensors", &to_safetensors(&empty).expect("ser"));
        let m = msg(load(&p, 3));
        assert!(m.contains("empty.safetensors") && m.contains("no samples"), "{m}");
    }
}
