//! Tokenized sources cached as safetensors, one file per key: a SHA-256 of the source file's
//! bytes, `tokenizer.json`'s bytes, `max_len`, the column names and the label map (and this
//! format's version), so coordinator and workers with the same inputs find the same file and a
//! change of any input misses. Written atomically (temporary file, then rename); on load the
//! file's recorded key and data checksum are checked, and a file that fails is rebuilt.

use super::source::{format_of, parse_source, Categorical, SourceOptions};
use super::tokenized::TokenizedText;
use super::tokenizer::TextTokenizer;
use super::TextError;
use metaloop_proto::checksum::hex;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The version of the key and of the file layout; a change invalidates every cache file. It
/// names the `tokenizers` release the ids come from.
const FORMAT: &str = "metaloop-text-cache-v1 tokenizers-0.23";

/// Everything a tokenized source depends on besides the source itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextOptions {
    pub source: SourceOptions,
    /// A `tokenizer.json`, or a model directory holding one.
    pub tokenizer: PathBuf,
    /// Tokens per row at most, special tokens included.
    pub max_len: usize,
}

/// What [`load_tokenized_status`] found in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    /// No cache file: tokenized and written.
    Miss,
    /// A cache file that failed its checks (why): tokenized again and rewritten.
    Rebuilt {
        reason: String,
    },
}

/// The cache key of a source (its bytes and file name's format) under `options`, with the
/// tokenizer file's bytes.
pub fn cache_key(source: &[u8], source_path: &Path, tokenizer: &[u8], options: &TextOptions) -> [u8; 32] {
    let mut h = Sha256::new();
    let mut put = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    put(FORMAT.as_bytes());
    put(super::Format::of(source_path)
        .map_or("?", super::Format::name)
        .as_bytes());
    put(source);
    put(tokenizer);
    put(&(options.max_len as u64).to_le_bytes());
    let c = &options.source.columns;
    put(c.text.as_bytes());
    put(c.label.as_bytes());
    for opt in [&c.domain, &c.task] {
        match opt {
            Some(name) => {
                put(b"some");
                put(name.as_bytes());
            }
            None => put(b"none"),
        }
    }
    put(&(options.source.labels.len() as u64).to_le_bytes());
    for l in &options.source.labels {
        put(l.as_bytes());
    }
    h.finalize().into()
}

/// Where the cache file of `key` lives.
pub fn cache_path(cache_dir: &Path, key: &[u8; 32]) -> PathBuf {
    cache_dir.join(format!("text-{}.safetensors", hex(key)))
}

/// The tokenized rows of `source` under `options`, from `cache_dir` when a valid cache file is
/// there, else read, tokenized and cached.
///
/// # Errors
/// The source's or tokenizer's problems, or a cache file that cannot be written.
pub fn load_tokenized(source: &Path, options: &TextOptions, cache_dir: &Path) -> Result<TokenizedText, TextError> {
    load_tokenized_status(source, options, cache_dir).map(|(t, _)| t)
}

/// As [`load_tokenized`], saying what the cache held.
///
/// # Errors
/// As [`load_tokenized`].
pub fn load_tokenized_status(
    source: &Path,
    options: &TextOptions,
    cache_dir: &Path,
) -> Result<(TokenizedText, CacheStatus), TextError> {
    options.source.check()?;
    format_of(source)?;
    let read = |p: &Path| std::fs::read(p).map_err(|error| TextError::Read { path: p.into(), error });
    let src = read(source)?;
    let tok_path = if options.tokenizer.is_dir() {
        options.tokenizer.join("tokenizer.json")
    } else {
        options.tokenizer.clone()
    };
    let tok = read(&tok_path)?;
    let key = cache_key(&src, source, &tok, options);
    let path = cache_path(cache_dir, &key);
    let status = match std::fs::read(&path) {
        Ok(bytes) => match decode(&bytes, &key) {
            Ok(data) => return Ok((data, CacheStatus::Hit)),
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "text cache file failed its checks; rebuilding it");
                CacheStatus::Rebuilt { reason }
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => CacheStatus::Miss,
        Err(e) => CacheStatus::Rebuilt {
            reason: format!("unreadable: {e}"),
        },
    };
    let tokenizer = TextTokenizer::from_bytes(&tok, &tok_path, options.max_len)?;
    let rows = parse_source(src, source, &options.source)?;
    let data = TokenizedText::build(&rows, &options.source.labels, &tokenizer)?;
    let bytes = encode(&data, &key).map_err(|reason| TextError::Cache {
        path: path.clone(),
        reason,
    })?;
    write_atomic(cache_dir, &path, &bytes).map_err(|e| TextError::Cache {
        path: path.clone(),
        reason: format!("cannot write: {e}"),
    })?;
    Ok((data, status))
}

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn le32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn encode(t: &TokenizedText, key: &[u8; 32]) -> Result<Vec<u8>, String> {
    let json = |v: &[String]| serde_json::to_string(v).map_err(|e| e.to_string());
    let mut meta = HashMap::from([
        ("format".to_owned(), FORMAT.to_owned()),
        ("key".to_owned(), hex(key)),
        ("checksum".to_owned(), hex(&t.checksum())),
        ("label_names".to_owned(), json(&t.label_names)?),
        ("max_len".to_owned(), t.max_len.to_string()),
        ("pad_id".to_owned(), t.pad_id.to_string()),
        ("vocab_size".to_owned(), t.vocab_size.to_string()),
    ]);
    let mut tensors: Vec<(String, Dtype, Vec<u8>)> = vec![
        ("ids".into(), Dtype::U32, le32(&t.ids)),
        ("offsets".into(), Dtype::U32, le32(&t.offsets)),
        (
            "labels".into(),
            Dtype::I64,
            t.labels.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        ("truncated".into(), Dtype::U32, le32(&t.truncated)),
        ("special_ids".into(), Dtype::U32, le32(&t.special_ids)),
    ];
    for (what, c) in [("domain", &t.domains), ("task", &t.tasks)] {
        if let Some(c) = c {
            meta.insert(format!("{what}_names"), json(&c.names)?);
            tensors.push((format!("{what}_ids"), Dtype::U32, le32(&c.ids)));
        }
    }
    let views = tensors
        .iter()
        .map(|(name, dtype, data)| {
            let n = data.len() * 8 / dtype.bitsize();
            TensorView::new(*dtype, vec![n], data).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

/// A cache file back, if it is the file of `key` and its data has the recorded checksum.
fn decode(bytes: &[u8], key: &[u8; 32]) -> Result<TokenizedText, String> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format!("not safetensors: {e}"))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not safetensors: {e}"))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| meta.get(k).cloned().ok_or_else(|| format!("no `{k}` in its metadata"));
    if get("format")? != FORMAT {
        return Err(format!("format {:?}, expected {FORMAT:?}", get("format")?));
    }
    if get("key")? != hex(key) {
        return Err("the key recorded inside is another".into());
    }
    let num = |k: &str| -> Result<u32, String> { get(k)?.parse().map_err(|e| format!("`{k}`: {e}")) };
    let names =
        |k: &str| -> Result<Vec<String>, String> { serde_json::from_str(&get(k)?).map_err(|e| format!("`{k}`: {e}")) };
    let tensor = |name: &str, want: Dtype| -> Result<Vec<u8>, String> {
        let v = st.tensor(name).map_err(|e| format!("tensor `{name}`: {e}"))?;
        if v.dtype() != want || v.shape().len() != 1 {
            return Err(format!("tensor `{name}` is {:?} {:?}", v.dtype(), v.shape()));
        }
        Ok(v.data().to_vec())
    };
    let u32s = |name: &str| -> Result<Vec<u32>, String> {
        Ok(tensor(name, Dtype::U32)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let categorical = |what: &str| -> Result<Option<Categorical>, String> {
        if meta.contains_key(&format!("{what}_names")) {
            Ok(Some(Categorical {
                names: names(&format!("{what}_names"))?,
                ids: u32s(&format!("{what}_ids"))?,
            }))
        } else {
            Ok(None)
        }
    };
    let t = TokenizedText {
        ids: u32s("ids")?,
        offsets: u32s("offsets")?,
        labels: tensor("labels", Dtype::I64)?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        label_names: names("label_names")?,
        domains: categorical("domain")?,
        tasks: categorical("task")?,
        truncated: u32s("truncated")?,
        max_len: num("max_len")?,
        pad_id: num("pad_id")?,
        special_ids: u32s("special_ids")?,
        vocab_size: num("vocab_size")?,
    };
    if hex(&t.checksum()) != get("checksum")? {
        return Err("its data does not have the checksum recorded inside".into());
    }
    t.consistent()?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::{CacheStatus, SourceOptions};

    fn repo(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
    }

    fn options(max_len: usize) -> TextOptions {
        TextOptions {
            source: SourceOptions::new(&["neg", "pos"]),
            tokenizer: repo("tests/data/tiny-bert"),
            max_len,
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn cache_hits_misses_on_any_input_change_and_rebuilds_corrupt_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("rows.jsonl");
        std::fs::write(
            &src,
            "{\"text\": \"Hello, world! This is fine.\", \"label\": \"pos\"}\n{\"text\": \"abc def ghi jkl mno pqr\", \"label\": \"neg\"}\n",
        )
        .expect("write");
        let cache = dir.path().join("cache");
        let (a, s) = load_tokenized_status(&src, &options(8), &cache).expect("first");
        assert_eq!(s, CacheStatus::Miss);
        // transformers gives these ids at max_length 8.
        assert_eq!(
            (a.len(), a.row(1), &a.truncated[..]),
            (2, &[2, 25, 52, 53, 28, 55, 56, 3][..], &[0, 1][..])
        );
        let (b, s) = load_tokenized_status(&src, &options(8), &cache).expect("again");
        assert_eq!((s, &b), (CacheStatus::Hit, &a));
        assert_eq!(files(&cache).len(), 1, "no temporary file left: {:?}", files(&cache));
        // Every input is in the key.
        let (_, s) = load_tokenized_status(&src, &options(16), &cache).expect("max_len");
        assert_eq!(s, CacheStatus::Miss);
        let mut o = options(8);
        o.source.labels.reverse();
        let (c, s) = load_tokenized_status(&src, &o, &cache).expect("map");
        assert_eq!((s, &c.labels[..]), (CacheStatus::Miss, &[0, 1][..]));
        let mut o = options(8);
        o.source.columns.text = "text".into();
        o.source.columns.domain = Some("label".into());
        assert_eq!(
            load_tokenized_status(&src, &o, &cache).expect("columns").1,
            CacheStatus::Miss
        );
        let mut o = options(8);
        o.tokenizer = repo("tests/data/tiny-bert/tokenizer.json");
        assert_eq!(
            load_tokenized_status(&src, &o, &cache).expect("same file").1,
            CacheStatus::Hit
        );
        assert_eq!(files(&cache).len(), 4);
        // A corrupt file (a flipped id, a cut file, a foreign key) is rebuilt, not trusted.
        let key = cache_key(
            &std::fs::read(&src).expect("src"),
            &src,
            &std::fs::read(repo("tests/data/tiny-bert/tokenizer.json")).expect("tok"),
            &options(8),
        );
        let path = cache_path(&cache, &key);
        let good = std::fs::read(&path).expect("cache file");
        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 70] ^= 1;
        for (bad, why) in [
            (flipped, "checksum"),
            (good[..n - 9].to_vec(), "not safetensors"),
            (Vec::new(), "not safetensors"),
        ] {
            std::fs::write(&path, bad).expect("corrupt");
            let (d, s) = load_tokenized_status(&src, &options(8), &cache).expect("rebuilt");
            assert!(
                matches!(&s, CacheStatus::Rebuilt { reason } if reason.contains(why)),
                "{s:?}"
            );
            assert_eq!(d, a);
            // Rewritten whole (the bytes may differ: safetensors orders metadata as a HashMap).
            assert_eq!(decode(&std::fs::read(&path).expect("rewritten"), &key).as_ref(), Ok(&a));
        }
        let other = files(&cache).into_iter().find(|f| !path.ends_with(f)).expect("another");
        std::fs::copy(cache.join(other), &path).expect("copy");
        let (_, s) = load_tokenized_status(&src, &options(8), &cache).expect("foreign");
        assert!(
            matches!(&s, CacheStatus::Rebuilt { reason } if reason.contains("key")),
            "{s:?}"
        );
        // A changed source is another key.
        std::fs::write(&src, "{\"text\": \"fine\", \"label\": \"pos\"}\n").expect("write");
        assert_eq!(
            load_tokenized_status(&src, &options(8), &cache).expect("new").1,
            CacheStatus::Miss
        );
        // Source problems come through as they are.
        std::fs::write(&src, "{\"text\": \"fine\", \"label\": \"meh\"}\n").expect("write");
        let m = load_tokenized(&src, &options(8), &cache)
            .expect_err("bad label")
            .to_string();
        assert!(
            m.contains("rows.jsonl has 1 problem") && m.contains("row 1 (line 1), column `label`"),
            "{m}"
        );
    }

    /// The real corpus (`scripts/text-assets`): 10,216 reviews with MiniLM's tokenizer at
    /// max_len 48. Prints the time to tokenize, the cache's size, the time to load from the
    /// cache and the fraction truncated. `cargo test -p metaloop-common --release text -- --ignored --nocapture`
    #[test]
    #[ignore = "needs scripts/text-assets; prints figures"]
    fn reviews_corpus_smoke() {
        let src = repo("data/text/corpus/reviews-train.jsonl");
        let o = TextOptions {
            source: SourceOptions::new(&["rotten", "fresh"]),
            tokenizer: repo("data/text/all-MiniLM-L6-v2"),
            max_len: 48,
        };
        let dir = tempfile::tempdir().expect("tmp");
        let t0 = std::time::Instant::now();
        let (a, s) = load_tokenized_status(&src, &o, dir.path()).expect("tokenize");
        let built = t0.elapsed();
        assert_eq!((s, a.len()), (CacheStatus::Miss, 10_216));
        let t1 = std::time::Instant::now();
        let (b, s) = load_tokenized_status(&src, &o, dir.path()).expect("cached");
        let loaded = t1.elapsed();
        assert_eq!((s, &b), (CacheStatus::Hit, &a));
        let size: u64 = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").metadata().expect("meta").len())
            .sum();
        // transformers 5.20.2 on the same rows (truncation=True, max_length=48): SHA-256 of every
        // row's ids concatenated as little-endian u32, and 404 rows longer than 48.
        assert_eq!(
            hex(&Sha256::digest(le32(&a.ids))),
            "3375298dd820766b0dc28924230b3b7f8860dc50a4dd68a146673e7c1c3500e1"
        );
        assert_eq!(a.truncated.len(), 404);
        let lens: Vec<usize> = (0..a.len()).map(|i| a.row(i).len()).collect();
        let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
        println!(
            "reviews-train: {} rows, {} tokens (mean {mean:.1}/row, max {}), truncated at 48: {} ({:.2}%); \
             read+tokenize+write {built:.2?}, cache file {size} bytes, load from cache {loaded:.2?}",
            a.len(),
            a.ids.len(),
            lens.iter().max().unwrap_or(&0),
            a.truncated.len(),
            100.0 * a.truncated.len() as f64 / a.len() as f64
        );
    }
}
