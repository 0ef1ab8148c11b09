//! Shared by the fuzz targets: an allocation meter (a decoder must not allocate more than its
//! input justifies), exact (bitwise) comparisons of decoded values, and seed inputs built from
//! valid encodings.

use metaloop_proto::proto::{
    encode_bundle, encode_frame, Ask, Assignment, AssignmentResult, BundleHeader, CoordinatorMsg, DType, DataRef,
    DirectionalMethod, DomainSpec, DomainStat, Hello, InnerSpec, JobSpec, ModelSource, ModelSpec, RescaleMode,
    RescalerPlan, RoundPlan, Signal, SmallTensor, TensorMeta, TrainOn, Welcome, WorkerMsg,
};
use metaloop_proto::tensor::{Bundle, HostTensor};
use serde::Serialize;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

// ---------------------------------------------------------------------------------------------
// Allocation meter

/// The system allocator, counting live bytes and their peak.
pub struct Meter;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Count the new block before the old one goes: a moving realloc holds both.
            grow(new_size);
            LIVE.fetch_sub(layout.size(), Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Meter = Meter;

fn grow(size: usize) {
    let live = LIVE.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(live, Relaxed);
}

/// Runs `f` and returns its value and the most bytes it held allocated at once (beyond what was
/// live when it started). The fuzzer runs one input at a time, so no other thread interferes.
pub fn peak_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let r = f();
    (r, PEAK.load(Relaxed).saturating_sub(base))
}

/// What an input of `len` bytes may make a decoder hold at once. Every decoded element costs at
/// least one input byte and at most a few hundred bytes of Rust values (a `TensorMeta` and its
/// `HostTensor` with their vectors, growth slack included); a fixed allowance covers the error
/// message. A header that announces more than the input holds (a length of 2^60, a 16 GiB
/// shape) must not reach the allocator: that is what this bound catches.
pub fn alloc_budget(len: usize) -> usize {
    64 * 1024 + 256 * len
}

// ---------------------------------------------------------------------------------------------
// Exact comparisons

/// Postcard's canonical encoding of `v` (floats as their bits), for comparing decoded values
/// exactly, NaN payloads and signed zeros included.
pub fn canonical<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("a decoded value encodes")
}

/// True when two bundles hold the same names, shapes and float bits.
pub fn same_bundle(a: &Bundle, b: &Bundle) -> bool {
    a.tensors.len() == b.tensors.len()
        && a.tensors.iter().zip(&b.tensors).all(|(x, y)| {
            x.name == y.name
                && x.shape == y.shape
                && x.data.len() == y.data.len()
                && x.data.iter().zip(&y.data).all(|(p, q)| p.to_bits() == q.to_bits())
        })
}

// ---------------------------------------------------------------------------------------------
// Seeds

/// When `METALOOP_FUZZ_SEEDS` names a directory, writes `seeds` there (as `seed-<name>`, once).
/// `scripts/fuzz` points it at the target's corpus; libFuzzer reads the corpus afterwards.
pub fn write_seeds(seeds: &[(&str, Vec<u8>)]) {
    let Some(dir) = std::env::var_os("METALOOP_FUZZ_SEEDS") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create the seed directory");
    for (name, bytes) in seeds {
        let path = dir.join(format!("seed-{name}"));
        if !path.exists() {
            std::fs::write(&path, bytes).expect("write a seed");
        }
    }
}

fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    encode_frame(msg).expect("a seed encodes")
}

fn job() -> JobSpec {
    JobSpec {
        seed: 42,
        model: ModelSpec::Mlp {
            inputs: 64,
            hidden: vec![128, 64],
            classes: 10,
            dropout: 0.1,
        },
        domains: vec![DomainSpec {
            name: "clean".into(),
            source: "/data/train.safetensors".into(),
            subset: Some((0, 300)),
            label_noise: 0.5,
            permute_labels: true,
            feature_noise: 1.0,
            permute_features: false,
            labels: None,
            token_noise: 0.0,
            checksum: [9; 32],
        }],
        meta: Some(DataRef {
            path: "/data/meta.safetensors".into(),
            subset: None,
            checksum: [4; 32],
        }),
        shards: 4,
        inner: InnerSpec {
            batch_size: 32,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-4,
            ..InnerSpec::default()
        },
        delta_dtype: DType::F32,
        text: None,
        meta_batch: 0,
    }
}

fn round(model: ModelSource) -> CoordinatorMsg {
    CoordinatorMsg::Round(RoundPlan {
        round: 3,
        model,
        domain_weights: vec![1.5, 0.5],
        ask: Ask::LossRescaling(RescalerPlan {
            mode: RescaleMode::SelfTaught,
            omega: vec![SmallTensor {
                name: "l0.weight".into(),
                shape: vec![1, 2],
                data: vec![0.1, 0.2],
            }],
            features: vec![0, 1, 2],
            normalize: true,
            directional: DirectionalMethod::Exact,
            progress: 0.25,
            passes: 4,
        }),
        assignments: vec![
            Assignment {
                index: 0,
                shard: 1,
                steps: 20,
                seed: 77,
                data: TrainOn::Mixture,
            },
            Assignment {
                index: 1,
                shard: 0,
                steps: 5,
                seed: 78,
                data: TrainOn::Domain(2),
            },
            Assignment {
                index: 2,
                shard: 0,
                steps: 0,
                seed: 79,
                data: TrainOn::Meta,
            },
        ],
    })
}

fn header() -> BundleHeader {
    BundleHeader {
        transfer: 7,
        tensors: vec![
            TensorMeta {
                name: "l0.weight".into(),
                dtype: DType::F32,
                shape: vec![2, 3],
            },
            TensorMeta {
                name: "l0.bias".into(),
                dtype: DType::F32,
                shape: vec![2],
            },
        ],
    }
}

/// Valid frames of every message kind the `frame` target decodes.
pub fn frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "hello",
            frame(&WorkerMsg::Hello(Hello {
                protocol_version: 1,
                name: "w0".into(),
            })),
        ),
        (
            "result",
            frame(&WorkerMsg::Result(AssignmentResult {
                train_loss: 0.25,
                samples: 640,
                compute_seconds: 1.5,
                meta_loss: Some(0.5),
                signal: Signal::Hypergradient(vec![DomainStat { d_sum: -1.5, count: 64 }]),
                ..AssignmentResult::new(7, 3, 99)
            })),
        ),
        (
            "failed",
            frame(&WorkerMsg::Failed {
                round: 2,
                assignment: 1,
                reason: "checksum".into(),
            }),
        ),
        (
            "welcome",
            frame(&CoordinatorMsg::Welcome(Box::new(Welcome {
                protocol_version: 1,
                worker_id: 5,
                job: job(),
            }))),
        ),
        ("reject", frame(&CoordinatorMsg::Reject { reason: "full".into() })),
        (
            "module-part",
            frame(&CoordinatorMsg::ModulePart {
                offset: 0,
                bytes: b"PK\x03\x04".to_vec(),
            }),
        ),
        (
            "round-full",
            frame(&round(ModelSource::Full {
                version: 0,
                checksum: [1; 32],
                transfer: 1,
            })),
        ),
        (
            "round-step",
            frame(&round(ModelSource::Step {
                base: 1,
                version: 2,
                checksum: [2; 32],
                transfer: 3,
            })),
        ),
        (
            "round-unchanged",
            frame(&round(ModelSource::Unchanged {
                version: 2,
                checksum: [3; 32],
            })),
        ),
        (
            "shutdown",
            frame(&CoordinatorMsg::Shutdown {
                reason: "done".into(),
                finished: true,
            }),
        ),
        ("header", frame(&header())),
    ]
    .into_iter()
    .chain(lying_headers().into_iter().map(|(name, h)| (name, frame(&h))))
    .collect()
}

/// Headers a peer might send to make the receiver over-allocate or overflow: one of every
/// rejection `payload_len` makes, and an accepted zero-sized tensor with absurd dimensions.
/// Random mutation rarely builds the long varints these need.
fn lying_headers() -> Vec<(&'static str, BundleHeader)> {
    let meta = |shape: Vec<u64>| TensorMeta {
        name: "t".into(),
        dtype: DType::F32,
        shape,
    };
    let header = |tensors: Vec<TensorMeta>| BundleHeader { transfer: 1, tensors };
    vec![
        ("lie-too-large", header(vec![meta(vec![1 << 20, 1 << 20])])),
        ("lie-shape-overflow", header(vec![meta(vec![u64::MAX, 2])])),
        (
            "lie-sum-overflow",
            header(vec![meta(vec![1]), meta(vec![(1 << 62) - 1])]),
        ),
        ("lie-rank", header(vec![meta(vec![1; 9])])),
        ("lie-zero-sized", header(vec![meta(vec![0, u64::MAX, 1 << 40])])),
        (
            "lie-too-many",
            header(vec![
                TensorMeta {
                    name: String::new(),
                    dtype: DType::F32,
                    shape: vec![],
                };
                4097
            ]),
        ),
    ]
}

/// Valid bundle streams: empty, scalar, zero-sized and ordinary tensors.
pub fn bundle_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let t = |name: &str, shape: Vec<usize>, data: Vec<f32>| HostTensor {
        name: name.into(),
        shape,
        data,
    };
    let bundles = [
        ("empty", Bundle { tensors: vec![] }),
        (
            "mlp",
            Bundle {
                tensors: vec![
                    t("l0.weight", vec![2, 3], vec![1., -2., 3.5, 0., 1e-8, -0.]),
                    t("l0.bias", vec![2], vec![f32::MAX, f32::MIN]),
                    t("s", vec![], vec![7.0]),
                ],
            },
        ),
        (
            "zero-sized",
            Bundle {
                tensors: vec![t("none", vec![0, 5], vec![]), t("nan", vec![1], vec![f32::NAN])],
            },
        ),
    ];
    bundles
        .into_iter()
        .map(|(name, b)| (name, encode_bundle(11, &b).expect("a seed encodes")))
        .chain(lying_headers().into_iter().map(|(name, h)| {
            let mut bytes = frame(&h);
            bytes.extend_from_slice(&[0; 8]);
            (name, bytes)
        }))
        .collect()
}
