//! Durable coordinator state: the model, the outer optimizer's momentum, the strategy's state,
//! the model version, the round and the run's counters, as one safetensors file per checkpoint.
//! Written atomically (temporary file, fsync, rename, fsync of the directory); pruning keeps the
//! newest `keep` up to the one just written and never touches a newer file; reading skips torn,
//! corrupt or foreign files, says why and moves them into `unusable/`.

use anyhow::{bail, Context};
use metaloop_proto::tensor::{Bundle, HostTensor};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Everything needed to continue a job exactly where it stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// Shared with the running job: a checkpoint does not copy the model.
    pub params: Arc<Bundle>,
    /// Shared with the running job, as the model.
    pub momentum: Option<Arc<Bundle>>,
    /// The strategy's named vectors (λ, optimizer moments, ...).
    pub outer: Vec<(String, Vec<f64>)>,
    pub version: u64,
    /// Rounds completed; the next round to run.
    pub rounds_done: u64,
    pub seed: u64,
    /// Hex state checksum of the above, recomputed on load to catch corruption.
    pub checksum: String,
    /// The run's cumulative counts, so a summary after a restart covers the whole run. Not part
    /// of the state checksum: they do not change what the job computes.
    pub counters: Counters,
}

/// Cumulative counts of a run, carried through checkpoints (metadata `counters`, JSON) so that
/// `summary.json` after a coordinator restart reports the whole run, not the last process.
/// Checkpoints written before this existed have none: they resume with zero counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub samples: u64,
    pub reassigned: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Results not applied, by reason.
    pub rejected: BTreeMap<String, u64>,
    pub workers_lost: BTreeMap<String, u64>,
    pub connections_refused: BTreeMap<String, u64>,
    pub checkpoint_failures: u64,
    /// Writes to the run's record (`metrics.jsonl`, plots) that failed.
    pub record_failures: u64,
    /// The round whose model did best on the meta set so far.
    pub best_meta: Option<BestMeta>,
}

/// The round whose model did best on the meta set (accuracy, then loss), and its test accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestMeta {
    pub round: u64,
    pub meta_accuracy: f64,
    /// JSON has no NaN (a diverged model's loss): written as `null`, read back as NaN.
    #[serde(deserialize_with = "nan_from_null")]
    pub meta_loss: f64,
    pub test_accuracy: f64,
}

fn nan_from_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

const MOMENTUM: &str = "outer.momentum.";

/// Entry `name` of a saved outer state (named vectors: λ, optimizer moments, Ω, ...), which must hold `len` values.
///
/// # Errors
/// When it is missing or has another length.
pub fn named(state: &[(String, Vec<f64>)], name: &str, len: usize) -> anyhow::Result<Vec<f64>> {
    let (_, v) = state
        .iter()
        .find(|(n, _)| n == name)
        .with_context(|| format!("outer state lacks `{name}`"))?;
    anyhow::ensure!(
        v.len() == len,
        "outer state `{name}` has {} values, expected {len}",
        v.len()
    );
    Ok(v.clone())
}

/// An AdamW optimizer's moments and step as named vectors under `prefix`.
pub fn adam_state(prefix: &str, adam: &metaloop_proto::weights::AdamW) -> Vec<(String, Vec<f64>)> {
    vec![
        (format!("{prefix}.adam_m"), adam.m.clone()),
        (format!("{prefix}.adam_v"), adam.v.clone()),
        (format!("{prefix}.adam_step"), vec![adam.t as f64]),
    ]
}

/// Restores what [`adam_state`] saved for an optimizer over `len` values.
///
/// # Errors
/// When an entry is missing or has the wrong length.
pub fn restore_adam(
    state: &[(String, Vec<f64>)],
    prefix: &str,
    adam: &mut metaloop_proto::weights::AdamW,
    len: usize,
) -> anyhow::Result<()> {
    let (m, v) = (
        named(state, &format!("{prefix}.adam_m"), len)?,
        named(state, &format!("{prefix}.adam_v"), len)?,
    );
    let t = named(state, &format!("{prefix}.adam_step"), 1)?[0];
    adam.m = m;
    adam.v = v;
    adam.t = t as u64;
    Ok(())
}

/// Adds named vectors to a state checksum.
pub fn hash_named(h: &mut metaloop_proto::checksum::StateHasher, state: &[(String, Vec<f64>)]) {
    for (name, values) in state {
        h.bytes(name.as_bytes());
        for v in values {
            h.bytes(&v.to_le_bytes());
        }
    }
}

/// Serialises a state in memory: the bytes [`write_state`] writes.
#[cfg(test)]
fn encode(state: &State) -> anyhow::Result<Vec<u8>> {
    let (tensors, metadata) = views(state)?;
    Ok(safetensors::serialize(tensors, Some(metadata))?)
}

/// A state as safetensors views over its own memory, and the file's metadata.
type Views<'a> = (Vec<(String, TensorView<'a>)>, HashMap<String, String>);

fn views(state: &State) -> anyhow::Result<Views<'_>> {
    let model =
        std::iter::once(("", state.params.as_ref())).chain(state.momentum.iter().map(|m| (MOMENTUM, m.as_ref())));
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for (prefix, b) in model {
        for t in &b.tensors {
            views.push((
                format!("{prefix}{}", t.name),
                TensorView::new(Dtype::F32, t.shape.clone(), le_bytes(&t.data))?,
            ));
        }
    }
    for (n, v) in &state.outer {
        views.push((n.clone(), TensorView::new(Dtype::F64, vec![v.len()], le_bytes(v))?));
    }
    let names = |b: &Bundle| b.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>().join(",");
    let metadata = HashMap::from([
        ("model_tensors".to_string(), names(&state.params)),
        (
            "outer_state".to_string(),
            state.outer.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>().join(","),
        ),
        ("version".to_string(), state.version.to_string()),
        ("rounds_done".to_string(), state.rounds_done.to_string()),
        ("seed".to_string(), state.seed.to_string()),
        ("state_checksum".to_string(), state.checksum.clone()),
        ("counters".to_string(), serde_json::to_string(&state.counters)?),
    ]);
    Ok((views, metadata))
}

/// The little-endian bytes of numbers in memory. Only little-endian targets are built, where
/// that is the memory itself (`bytemuck` checks size and alignment).
fn le_bytes<T: bytemuck::Pod>(v: &[T]) -> &[u8] {
    const { assert!(cfg!(target_endian = "little"), "checkpoints are little-endian") };
    bytemuck::cast_slice(v)
}

/// Parses a state written by [`encode`].
///
/// # Errors
/// A message saying what is missing or malformed.
pub fn decode(bytes: &[u8]) -> anyhow::Result<State> {
    let (_, header) = SafeTensors::read_metadata(bytes).context("not a complete safetensors file")?;
    let st = SafeTensors::deserialize(bytes).context("not a complete safetensors file")?;
    let meta = header.metadata().clone().context("no metadata")?;
    let field = |k: &str| meta.get(k).cloned().with_context(|| format!("metadata lacks `{k}`"));
    let number = |k: &str| -> anyhow::Result<u64> {
        field(k)?
            .parse()
            .with_context(|| format!("metadata `{k}` is not a number"))
    };
    let f32s = |name: &str| -> anyhow::Result<HostTensor> {
        let v = st.tensor(name).with_context(|| format!("tensor `{name}` is missing"))?;
        if v.dtype() != Dtype::F32 {
            bail!("tensor `{name}` is {:?}, expected F32", v.dtype());
        }
        let data = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(HostTensor {
            name: name.to_string(),
            shape: v.shape().to_vec(),
            data,
        })
    };
    let list = |s: String| -> Vec<String> { s.split(',').filter(|n| !n.is_empty()).map(str::to_string).collect() };
    let model_names = list(field("model_tensors")?);
    let params = Bundle {
        tensors: model_names.iter().map(|n| f32s(n)).collect::<anyhow::Result<_>>()?,
    };
    let momentum = if st.names().iter().any(|n| n.starts_with(MOMENTUM)) {
        let tensors = model_names
            .iter()
            .map(|n| f32s(&format!("{MOMENTUM}{n}")).map(|t| HostTensor { name: n.clone(), ..t }))
            .collect::<anyhow::Result<_>>()?;
        Some(Arc::new(Bundle { tensors }))
    } else {
        None
    };
    let mut outer = Vec::new();
    for name in list(field("outer_state")?) {
        let v = st
            .tensor(&name)
            .with_context(|| format!("tensor `{name}` is missing"))?;
        if v.dtype() != Dtype::F64 {
            bail!("tensor `{name}` is {:?}, expected F64", v.dtype());
        }
        let data = v
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        outer.push((name, data));
    }
    Ok(State {
        params: Arc::new(params),
        momentum,
        outer,
        version: number("version")?,
        rounds_done: number("rounds_done")?,
        seed: number("seed")?,
        checksum: field("state_checksum")?,
        counters: match meta.get("counters") {
            Some(json) => serde_json::from_str(json).context("metadata `counters` is not valid")?,
            None => Counters::default(),
        },
    })
}

/// Writes `bytes` to `dir/name` atomically and durably: temporary file, fsync, rename, fsync of
/// the directory, so a crash leaves either the old file or the new one.
///
/// # Errors
/// On any I/O failure (a full disk, say), naming the file; the temporary file is removed.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    write_atomic_with(dir, name, Duration::ZERO, |tmp| Ok(std::fs::write(tmp, bytes)?))
}

/// Writes `state` to `dir/name` as [`write_atomic`] does, streamed from the state's own memory
/// into the file: no copy of the file is made in memory.
///
/// # Errors
/// As [`write_atomic`], or when safetensors refuses the layout.
pub fn write_state(dir: &Path, name: &str, state: &State) -> anyhow::Result<PathBuf> {
    write_state_slowly(dir, name, state, Duration::ZERO)
}

/// [`write_state`] with a pause between writing the temporary file and renaming it, so tests
/// can kill the process inside that window.
fn write_state_slowly(dir: &Path, name: &str, state: &State, pause: Duration) -> anyhow::Result<PathBuf> {
    write_atomic_with(dir, name, pause, |tmp| {
        let (tensors, metadata) = views(state)?;
        Ok(safetensors::serialize_to_file(tensors, Some(metadata), tmp)?)
    })
}

/// `write` fills the temporary file; then fsync, `pause`, rename, fsync of the directory.
fn write_atomic_with(
    dir: &Path,
    name: &str,
    pause: Duration,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp)?.sync_all()?;
        std::thread::sleep(pause);
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(path)
}

fn file_name(rounds_done: u64) -> String {
    format!("round-{rounds_done:08}.safetensors")
}

/// Checkpoints in `dir`, newest first (by round in the file name).
fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let round = name
                .strip_prefix("round-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((round, e.path()))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found
}

/// Which checkpoints to delete after writing the one for round `written`: of those for earlier
/// rounds, all but the newest `keep − 1` (so `keep` remain with the new one). A file for a later
/// round is never deleted: it is not this run's (a resume moves such files aside first), and
/// a number in a file name proves nothing about what the file holds.
fn prune_plan(found: &[(u64, PathBuf)], written: u64, keep: usize) -> Vec<PathBuf> {
    let mut older: Vec<&(u64, PathBuf)> = found.iter().filter(|(r, _)| *r < written).collect();
    older.sort_by_key(|f| std::cmp::Reverse(f.0));
    older
        .into_iter()
        .skip(keep.max(1) - 1)
        .map(|(_, p)| p.clone())
        .collect()
}

/// Writes a checkpoint into `dir` and prunes older ones ([`prune_plan`]). `pause` (zero outside
/// tests) widens the window between writing and renaming.
///
/// # Errors
/// On an I/O failure, naming the file.
pub fn save(dir: &Path, state: &State, keep: usize, pause: Duration) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = write_state_slowly(dir, &file_name(state.rounds_done), state, pause)?;
    for old in prune_plan(&list(dir), state.rounds_done, keep) {
        if let Err(e) = std::fs::remove_file(&old) {
            tracing::warn!(path = %old.display(), error = %e, "could not remove an old checkpoint");
        }
    }
    Ok(path)
}

/// Where [`newest_valid`] moves the files it cannot use, inside the checkpoint directory.
pub const UNUSABLE: &str = "unusable";

/// The newest checkpoint in `dir` that decodes and that `accept` takes (it recomputes the state
/// checksum and checks the checkpoint is this job's). Every newer file it skips is reported with
/// its reason and moved into `dir/unusable/`, so that it can neither be taken by a later resume
/// nor outrank the checkpoints this run writes; nothing is deleted.
pub fn newest_valid<T>(dir: &Path, mut accept: impl FnMut(State) -> anyhow::Result<T>) -> Option<(PathBuf, T)> {
    for (_, path) in list(dir) {
        let outcome = std::fs::read(&path)
            .context("cannot read it")
            .and_then(|b| decode(&b))
            .and_then(&mut accept);
        match outcome {
            Ok(t) => return Some((path, t)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "skipping an unusable checkpoint");
                let moved = set_aside(dir, &path)
                    .map(|to| format!("moved to {}", to.display()))
                    .unwrap_or_else(|m| format!("could not move it aside: {m:#}"));
                eprintln!("skipping checkpoint {}: {e:#}; {moved}", path.display());
            }
        }
    }
    None
}

/// Moves `path` into `dir/unusable/` under a name not taken yet.
fn set_aside(dir: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    let aside = dir.join(UNUSABLE);
    std::fs::create_dir_all(&aside).with_context(|| format!("creating {}", aside.display()))?;
    let name = path.file_name().context("no file name")?.to_string_lossy().into_owned();
    let mut to = aside.join(&name);
    let mut n = 1;
    while to.exists() {
        to = aside.join(format!("{name}.{n}"));
        n += 1;
    }
    std::fs::rename(path, &to).with_context(|| format!("renaming {} to {}", path.display(), to.display()))?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(round: u64) -> State {
        let t = |name: &str, v: f32| HostTensor {
            name: name.into(),
            shape: vec![2],
            data: vec![v, -v],
        };
        State {
            params: Arc::new(Bundle {
                tensors: vec![t("l0.weight", 1.5), t("l0.bias", 0.25)],
            }),
            momentum: Some(Arc::new(Bundle {
                tensors: vec![t("l0.weight", 0.5), t("l0.bias", 0.125)],
            })),
            outer: vec![
                ("domain_weights.lambda".into(), vec![0.1, -0.2]),
                ("domain_weights.adam_step".into(), vec![3.0]),
            ],
            version: round,
            rounds_done: round,
            seed: 7,
            checksum: "abc".into(),
            counters: Counters::default(),
        }
    }

    #[test]
    fn roundtrip_keeps_order_and_bits() {
        let s = state(4);
        assert_eq!(decode(&encode(&s).expect("encode")).expect("decode"), s);
        let no_momentum = State {
            momentum: None,
            ..state(1)
        };
        assert_eq!(
            decode(&encode(&no_momentum).expect("encode")).expect("decode"),
            no_momentum
        );
    }

    /// The file streamed from the state's memory is the in-memory encoding (the same length;
    /// the metadata's order differs from one encoding to the next), it decodes to the state, and
    /// nothing is left behind but it.
    #[test]
    fn a_written_state_is_its_encoding() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = state(4);
        let path = write_state(dir.path(), "final.safetensors", &s).expect("write");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes.len(), encode(&s).expect("encode").len());
        assert_eq!(decode(&bytes).expect("decode"), s);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("final.safetensors")]);
    }

    #[test]
    fn counters_roundtrip_and_old_checkpoints_have_none() {
        let mut s = state(4);
        s.counters.workers_lost.insert("disconnected".into(), 2);
        s.counters.connections_refused.insert("tls_handshake".into(), 5);
        s.counters.checkpoint_failures = 3;
        s.counters.record_failures = 1;
        s.counters.best_meta = Some(BestMeta {
            round: 3,
            meta_accuracy: 0.5,
            meta_loss: f64::NAN,
            test_accuracy: 0.25,
        });
        let back = decode(&encode(&s).expect("encode")).expect("decode");
        let best = back.counters.best_meta.expect("best");
        assert!(best.meta_loss.is_nan(), "NaN survives JSON as null");
        assert_eq!(back.counters.workers_lost, s.counters.workers_lost);
        assert_eq!(back.counters.connections_refused, s.counters.connections_refused);
        assert_eq!(back.counters.checkpoint_failures, 3);

        // A checkpoint from before the counters existed: no `counters` metadata at all.
        let old = state(2);
        let bytes = encode(&old).expect("encode");
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("header");
        let mut meta = header.metadata().clone().expect("metadata");
        meta.remove("counters");
        let st = SafeTensors::deserialize(&bytes).expect("st");
        let views: Vec<(String, TensorView<'_>)> = st.tensors();
        let without = safetensors::serialize(views, Some(meta)).expect("serialize");
        assert_eq!(decode(&without).expect("old checkpoints stay readable"), old);
    }

    #[test]
    fn pruning_never_deletes_what_was_just_written_nor_a_later_file() {
        let p = |r: u64| (r, PathBuf::from(file_name(r)));
        // Unusable files with higher numbers (torn, another job's) and the run's own.
        let found = vec![p(390), p(380), p(370), p(30), p(20), p(10), p(5)];
        // Keep 3: the one just written (30) and the two before it.
        assert_eq!(prune_plan(&found, 30, 3), vec![PathBuf::from(file_name(5))]);
        let all_older: Vec<PathBuf> = [20, 10, 5].map(|r| PathBuf::from(file_name(r))).into();
        assert_eq!(prune_plan(&found, 30, 1), all_older);
        assert_eq!(prune_plan(&found, 30, 0), all_older, "keep 0 still keeps the new one");
        assert_eq!(prune_plan(&[p(10)], 10, 3), Vec::<PathBuf>::new());
    }

    /// The defect this guards against: torn checkpoints numbered above the resumed round used to
    /// win "keep the newest K", so the checkpoints the resumed run wrote were deleted at once.
    #[test]
    fn a_resume_past_torn_newer_files_keeps_its_own_checkpoints() {
        let dir = tempfile::tempdir().expect("tmp");
        for r in [370, 380, 390] {
            save(dir.path(), &state(r), 3, Duration::ZERO).expect("save");
            let path = dir.path().join(file_name(r));
            let bytes = std::fs::read(&path).expect("read");
            std::fs::write(&path, &bytes[..bytes.len() / 3]).expect("tear");
        }
        assert!(newest_valid(dir.path(), Ok).is_none(), "all torn");
        let aside: Vec<_> = std::fs::read_dir(dir.path().join(UNUSABLE))
            .expect("unusable/")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(aside.len(), 3, "moved aside, not deleted: {aside:?}");
        let written = save(dir.path(), &state(10), 3, Duration::ZERO).expect("save");
        assert!(written.exists(), "the checkpoint just written survives its own pruning");
        let (path, s) = newest_valid(dir.path(), Ok).expect("valid");
        assert_eq!((path, s.rounds_done), (written, 10));
    }

    #[test]
    fn keeps_the_newest_and_skips_torn_files() {
        let dir = tempfile::tempdir().expect("tmp");
        for r in [5, 10, 15, 20] {
            save(dir.path(), &state(r), 3, Duration::ZERO).expect("save");
        }
        let rounds: Vec<u64> = list(dir.path()).iter().map(|(r, _)| *r).collect();
        assert_eq!(rounds, vec![20, 15, 10], "only the newest 3 are kept");
        // Tear the newest: the one before it is used instead, and the torn one is set aside.
        let newest = dir.path().join(file_name(20));
        let bytes = std::fs::read(&newest).expect("read");
        std::fs::write(&newest, &bytes[..bytes.len() / 2]).expect("tear");
        let (path, s) = newest_valid(dir.path(), Ok).expect("an older one survives");
        assert_eq!(s.rounds_done, 15);
        assert!(path.ends_with(file_name(15)));
        assert!(dir.path().join(UNUSABLE).join(file_name(20)).exists());
        // A checkpoint the caller rejects (say, a checksum mismatch) is skipped too.
        let (_, s) = newest_valid(dir.path(), |s| {
            if s.rounds_done == 15 {
                bail!("checksum mismatch")
            } else {
                Ok(s)
            }
        })
        .expect("older");
        assert_eq!(s.rounds_done, 10);
        assert!(newest_valid(tempfile::tempdir().expect("tmp").path(), Ok).is_none());
    }
}
