//! Property tests of the wire decoders in `proto`, mirroring the fuzz targets in `fuzz/`
//! (`scripts/fuzz`): arbitrary bytes never panic a decoder; whatever decodes re-encodes and
//! decodes to the same value, bit for bit; valid encodings with one byte overwritten or cut
//! short give a value or a typed error (a cut one always `Truncated`).

use metaloop_proto::proto::{
    decode_body, decode_bundle, decode_frame, decode_payload, encode_bundle, encode_frame, encode_payload_as,
    frame_len, Ask, Assignment, AssignmentResult, BundleHeader, CoordinatorMsg, DType, DataRef, DirectionalMethod,
    DomainProbe, DomainSpec, DomainStat, Hello, HypergradientSpec, InnerSpec, JobSpec, ModelSource, ModelSpec,
    ModuleBytes, PayloadDecoder, ProtoError, RescaleMode, RescalerPlan, RoundPlan, Signal, SmallTensor, TensorMeta,
    TrainOn, Welcome, WorkerMsg, MAX_FRAME_BYTES,
};
use metaloop_proto::tensor::{Bundle, HostTensor};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

// ---------------------------------------------------------------------------------------------
// Checks shared by the properties

/// Postcard's canonical bytes of `v`: compares decoded values exactly (NaN payloads included).
fn canonical<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("a decoded value encodes")
}

fn same_bundle(a: &Bundle, b: &Bundle) -> bool {
    a.tensors.len() == b.tensors.len()
        && a.tensors.iter().zip(&b.tensors).all(|(x, y)| {
            x.name == y.name
                && x.shape == y.shape
                && x.data.len() == y.data.len()
                && x.data.iter().zip(&y.data).all(|(p, q)| p.to_bits() == q.to_bits())
        })
}

/// `msg` decoded from a body of `body_len` bytes: its canonical frame is no longer and decodes
/// to the same value.
fn assert_roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T, body_len: usize) {
    let bytes = encode_frame(msg).expect("a decoded message re-encodes");
    assert!(
        bytes.len() - 4 <= body_len,
        "canonical body longer than the decoded one"
    );
    let (back, used): (T, usize) = decode_frame("again", &bytes).expect("a re-encoded message decodes");
    assert_eq!(used, bytes.len());
    assert_eq!(canonical(&back), canonical(msg));
    // Without a NaN inside, `PartialEq` agrees too (NaN makes `==` irreflexive).
    #[allow(clippy::eq_op)]
    if msg == msg {
        assert_eq!(&back, msg);
    }
}

/// Decodes `bytes` as a `T` frame and as a bare `T` body: no panic, only the errors each can
/// give, and a round trip for whatever decodes.
fn check_frame<T: Serialize + DeserializeOwned + PartialEq + Debug>(bytes: &[u8]) {
    match decode_frame::<T>("prop", bytes) {
        Ok((msg, used)) => {
            let prefix: [u8; 4] = bytes[..4].try_into().expect("a prefix");
            assert_eq!(used, 4 + frame_len(prefix).expect("an accepted prefix"));
            assert_roundtrip(&msg, used - 4);
        }
        Err(ProtoError::Truncated { need, have }) => assert!(need > have && have == bytes.len()),
        Err(ProtoError::FrameTooLarge { len, .. }) => assert!(len > MAX_FRAME_BYTES),
        Err(ProtoError::Decode { .. } | ProtoError::Trailing { .. }) => {}
        Err(e) => panic!("decode_frame: unexpected {e:?}"),
    }
    match decode_body::<T>("prop", bytes) {
        Ok(msg) => assert_roundtrip(&msg, bytes.len()),
        Err(ProtoError::Decode { .. } | ProtoError::Trailing { .. }) => {}
        Err(e) => panic!("decode_body: unexpected {e:?}"),
    }
}

/// Every frame decoder on `bytes`.
fn check_frames(bytes: &[u8]) {
    check_frame::<WorkerMsg>(bytes);
    check_frame::<CoordinatorMsg>(bytes);
    check_frame::<BundleHeader>(bytes);
    if let Ok((header, _)) = decode_frame::<BundleHeader>("prop", bytes) {
        let _ = header.payload_len();
    }
}

/// Decodes `bytes` as a bundle stream; returns what decoded after checking its round trip.
fn check_bundle(bytes: &[u8]) -> Result<(u64, Bundle), ProtoError> {
    let decoded = decode_bundle(bytes);
    match &decoded {
        Ok((transfer, bundle)) => {
            for t in &bundle.tensors {
                assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
            }
            let again = encode_bundle(*transfer, bundle).expect("a decoded bundle re-encodes");
            // Re-encoded as f32: no longer than the input when that was f32 too (a bf16 or int8
            // stream grows, e.g. a bf16 scalar from 2 bytes to 4).
            let all_f32 = decode_frame::<BundleHeader>("prop", bytes)
                .is_ok_and(|(h, _)| h.tensors.iter().all(|t| t.dtype == DType::F32));
            if all_f32 {
                assert!(again.len() <= bytes.len());
            }
            let (id, back) = decode_bundle(&again).expect("a re-encoded bundle decodes");
            assert_eq!(id, *transfer);
            assert!(same_bundle(&back, bundle));
        }
        Err(
            ProtoError::Truncated { .. }
            | ProtoError::Trailing { .. }
            | ProtoError::FrameTooLarge { .. }
            | ProtoError::Decode { .. }
            | ProtoError::BadTensor { .. }
            | ProtoError::BundleTooLarge { .. },
        ) => {}
        Err(e) => panic!("decode_bundle: unexpected {e:?}"),
    }
    decoded
}

/// `body` behind the length prefix it needs: random bytes that get past the framing.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

// ---------------------------------------------------------------------------------------------
// Valid messages

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn small_tensor() -> impl Strategy<Value = SmallTensor> {
    (text(), vec(any::<u32>(), 0..4), vec(any::<f32>(), 0..6)).prop_map(|(name, shape, data)| SmallTensor {
        name,
        shape,
        data,
    })
}

fn directional() -> impl Strategy<Value = DirectionalMethod> {
    prop_oneof![
        Just(DirectionalMethod::Exact),
        Just(DirectionalMethod::FiniteDifference)
    ]
}

fn signal() -> impl Strategy<Value = Signal> {
    prop_oneof![
        Just(Signal::Nothing),
        vec(
            (any::<f64>(), any::<u64>()).prop_map(|(d_sum, count)| DomainStat { d_sum, count }),
            0..3,
        )
        .prop_map(Signal::Hypergradient),
        vec(
            (vec(any::<u32>(), 0..4), vec(any::<f32>(), 0..4)).prop_map(|(rows, losses)| DomainProbe { rows, losses }),
            0..3,
        )
        .prop_map(Signal::Doremi),
        vec(small_tensor(), 0..3).prop_map(Signal::LossRescaling),
    ]
}

fn assignment_result() -> impl Strategy<Value = AssignmentResult> {
    (
        (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<f32>(),
            any::<u64>(),
            any::<f32>(),
        ),
        option::of(any::<f32>()),
        signal(),
    )
        .prop_map(
            |((round, assignment, delta_transfer, train_loss, samples, compute_seconds), meta_loss, signal)| {
                AssignmentResult {
                    round,
                    assignment,
                    delta_transfer,
                    train_loss,
                    samples,
                    compute_seconds,
                    meta_loss,
                    signal,
                }
            },
        )
}

fn worker_msg() -> impl Strategy<Value = WorkerMsg> {
    prop_oneof![
        (any::<u32>(), text()).prop_map(|(protocol_version, name)| WorkerMsg::Hello(Hello { protocol_version, name })),
        assignment_result().prop_map(WorkerMsg::Result),
        (any::<u64>(), any::<u32>(), text()).prop_map(|(round, assignment, reason)| WorkerMsg::Failed {
            round,
            assignment,
            reason
        }),
    ]
}

fn domain_spec() -> impl Strategy<Value = DomainSpec> {
    (
        (text(), text(), option::of((any::<u64>(), any::<u64>()))),
        (any::<f64>(), any::<bool>(), any::<f64>(), any::<bool>()),
        any::<[u8; 32]>(),
    )
        .prop_map(
            |((name, source, subset), (label_noise, permute_labels, feature_noise, permute_features), checksum)| {
                DomainSpec {
                    name,
                    source,
                    subset,
                    label_noise,
                    permute_labels,
                    feature_noise,
                    permute_features,
                    labels: None,
                    token_noise: 0.0,
                    checksum,
                }
            },
        )
}

fn job_spec() -> impl Strategy<Value = JobSpec> {
    (
        any::<u64>(),
        (
            any::<u32>(),
            vec(any::<u32>(), 0..4),
            any::<u32>(),
            any::<f32>(),
            any::<bool>(),
        ),
        vec(domain_spec(), 0..3),
        option::of(
            (text(), option::of((any::<u64>(), any::<u64>())), any::<[u8; 32]>())
                .prop_map(|(path, subset, checksum)| DataRef { path, subset, checksum }),
        ),
        any::<u32>(),
        (any::<u32>(), any::<f64>(), any::<f64>(), any::<f64>()),
    )
        .prop_map(
            |(
                seed,
                (inputs, hidden, classes, dropout, torchscript),
                domains,
                meta,
                shards,
                (batch_size, lr, momentum, weight_decay),
            )| JobSpec {
                seed,
                model: if torchscript {
                    // The module's bytes travel apart from the spec (`ModulePart`s).
                    ModelSpec::TorchScript {
                        sha256: [inputs as u8; 32],
                        size: u64::from(inputs),
                        layout: vec![("l0.weight".into(), hidden)],
                        classes,
                        module: ModuleBytes::default(),
                    }
                } else {
                    ModelSpec::Mlp {
                        inputs,
                        hidden,
                        classes,
                        dropout,
                    }
                },
                domains,
                meta,
                shards,
                inner: InnerSpec {
                    batch_size,
                    lr,
                    momentum,
                    weight_decay,
                    ..InnerSpec::default()
                },
                delta_dtype: DType::F32,
                text: None,
                meta_batch: 0,
            },
        )
}

fn model_source() -> impl Strategy<Value = ModelSource> {
    prop_oneof![
        (any::<u64>(), any::<[u8; 32]>(), any::<u64>()).prop_map(|(version, checksum, transfer)| ModelSource::Full {
            version,
            checksum,
            transfer
        }),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>(), any::<u64>()).prop_map(
            |(base, version, checksum, transfer)| {
                ModelSource::Step {
                    base,
                    version,
                    checksum,
                    transfer,
                }
            }
        ),
        (any::<u64>(), any::<[u8; 32]>()).prop_map(|(version, checksum)| ModelSource::Unchanged { version, checksum }),
    ]
}

fn rescaler_plan() -> impl Strategy<Value = RescalerPlan> {
    (
        prop_oneof![Just(RescaleMode::CleanMeta), Just(RescaleMode::SelfTaught)],
        vec(small_tensor(), 0..3),
        vec(any::<u8>(), 0..4),
        any::<bool>(),
        directional(),
        any::<f32>(),
        any::<u32>(),
    )
        .prop_map(
            |(mode, omega, features, normalize, directional, progress, passes)| RescalerPlan {
                mode,
                omega,
                features,
                normalize,
                directional,
                progress,
                passes,
            },
        )
}

fn assignment() -> impl Strategy<Value = Assignment> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        prop_oneof![
            Just(TrainOn::Mixture),
            any::<u32>().prop_map(TrainOn::Domain),
            Just(TrainOn::Meta)
        ],
    )
        .prop_map(|(index, shard, steps, seed, data)| Assignment {
            index,
            shard,
            steps,
            seed,
            data,
        })
}

fn ask() -> impl Strategy<Value = Ask> {
    prop_oneof![
        Just(Ask::Nothing),
        (directional(), any::<u32>())
            .prop_map(|(directional, probe)| Ask::Hypergradient(HypergradientSpec { directional, probe })),
        any::<u32>().prop_map(|probe| Ask::Doremi { probe }),
        rescaler_plan().prop_map(Ask::LossRescaling),
        vec(any::<u32>(), 0..4).prop_map(|target_rows| Ask::TaskPolicy { target_rows }),
    ]
}

fn round_plan() -> impl Strategy<Value = RoundPlan> {
    (
        any::<u64>(),
        model_source(),
        vec(any::<f64>(), 0..4),
        ask(),
        vec(assignment(), 0..4),
    )
        .prop_map(|(round, model, domain_weights, ask, assignments)| RoundPlan {
            round,
            model,
            domain_weights,
            ask,
            assignments,
        })
}

fn coordinator_msg() -> impl Strategy<Value = CoordinatorMsg> {
    prop_oneof![
        (any::<u32>(), any::<u64>(), job_spec()).prop_map(|(protocol_version, worker_id, job)| {
            CoordinatorMsg::Welcome(Box::new(Welcome {
                protocol_version,
                worker_id,
                job,
            }))
        }),
        text().prop_map(|reason| CoordinatorMsg::Reject { reason }),
        round_plan().prop_map(CoordinatorMsg::Round),
        (text(), any::<bool>()).prop_map(|(reason, finished)| CoordinatorMsg::Shutdown { reason, finished }),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(offset, bytes)| CoordinatorMsg::ModulePart { offset, bytes }),
    ]
}

/// Shapes that fit a small payload, with zero and scalar (empty) shapes among them.
fn host_tensor() -> impl Strategy<Value = HostTensor> {
    (text(), vec(0usize..4, 0..4)).prop_flat_map(|(name, shape)| {
        let n = shape.iter().product::<usize>();
        vec(any::<f32>(), n).prop_map(move |data| HostTensor {
            name: name.clone(),
            shape: shape.clone(),
            data,
        })
    })
}

fn bundle() -> impl Strategy<Value = Bundle> {
    vec(host_tensor(), 0..5).prop_map(|tensors| Bundle { tensors })
}

/// Headers as a peer might lie: small dims, zero dims, dims near the overflow and size limits,
/// too high a rank.
fn lying_header() -> impl Strategy<Value = BundleHeader> {
    let dim = prop_oneof![
        4 => 0u64..5,
        1 => Just(u64::MAX),
        1 => Just(1u64 << 32),
        1 => Just(1u64 << 61),
        1 => any::<u64>(),
    ];
    let dtype = prop_oneof![
        Just(DType::F32),
        Just(DType::BF16),
        (0u32..6).prop_map(|block| DType::Int8 { block }),
        any::<u32>().prop_map(|block| DType::Int8 { block }),
    ];
    let meta = (text(), vec(dim, 0..10), dtype).prop_map(|(name, shape, dtype)| TensorMeta { name, dtype, shape });
    (any::<u64>(), vec(meta, 0..4)).prop_map(|(transfer, tensors)| BundleHeader { transfer, tensors })
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        check_frames(&bytes);
        let _ = check_bundle(&bytes);
    }

    /// Random bodies behind a correct prefix reach the body decoder instead of failing on it.
    #[test]
    fn arbitrary_bodies_never_panic(body in vec(any::<u8>(), 0..2048), payload in vec(any::<u8>(), 0..64)) {
        let frame = framed(&body);
        check_frames(&frame);
        for r in [
            decode_frame::<WorkerMsg>("prop", &frame).map(|_| ()),
            decode_frame::<CoordinatorMsg>("prop", &frame).map(|_| ()),
            decode_frame::<BundleHeader>("prop", &frame).map(|_| ()),
        ] {
            prop_assert!(matches!(r, Ok(()) | Err(ProtoError::Decode { .. } | ProtoError::Trailing { .. })), "{r:?}");
        }
        let mut stream = frame;
        stream.extend_from_slice(&payload);
        let _ = check_bundle(&stream);
    }

    #[test]
    fn valid_messages_roundtrip(w in worker_msg(), c in coordinator_msg()) {
        let bytes = encode_frame(&w).expect("encode");
        let (back, used): (WorkerMsg, usize) = decode_frame("prop", &bytes).expect("decode");
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(canonical(&back), canonical(&w));
        let bytes = encode_frame(&c).expect("encode");
        let (back, used): (CoordinatorMsg, usize) = decode_frame("prop", &bytes).expect("decode");
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(canonical(&back), canonical(&c));
    }

    #[test]
    fn corrupted_messages_never_panic(w in worker_msg(), c in coordinator_msg(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        for mut bytes in [encode_frame(&w).expect("encode"), encode_frame(&c).expect("encode")] {
            let i = at.index(bytes.len());
            bytes[i] = byte;
            check_frames(&bytes);
            check_frames(&bytes[4..]);
        }
    }

    #[test]
    fn truncated_messages_are_truncated(w in worker_msg(), c in coordinator_msg(), at in any::<prop::sample::Index>()) {
        let w = encode_frame(&w).expect("encode");
        let cut = &w[..at.index(w.len())];
        let r = decode_frame::<WorkerMsg>("prop", cut);
        prop_assert!(matches!(r, Err(ProtoError::Truncated { .. })), "{:?}", r);
        check_frames(cut);
        let c = encode_frame(&c).expect("encode");
        let cut = &c[..at.index(c.len())];
        let r = decode_frame::<CoordinatorMsg>("prop", cut);
        prop_assert!(matches!(r, Err(ProtoError::Truncated { .. })), "{:?}", r);
        check_frames(cut);
    }

    #[test]
    fn valid_bundles_roundtrip(b in bundle(), transfer in any::<u64>()) {
        let bytes = encode_bundle(transfer, &b).expect("encode");
        let (id, back) = check_bundle(&bytes).expect("decode");
        prop_assert_eq!(id, transfer);
        prop_assert!(same_bundle(&back, &b));
    }

    /// A corrupted payload byte still decodes (to the same layout); a corrupted header byte gives
    /// a bundle or a typed error.
    #[test]
    fn corrupted_bundles_never_panic(b in bundle(), transfer in any::<u64>(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = encode_bundle(transfer, &b).expect("encode");
        let header_end = bytes.len() - b.byte_len();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let decoded = check_bundle(&bytes);
        if i >= header_end {
            let (id, back) = decoded.expect("a payload byte cannot break the layout");
            prop_assert_eq!(id, transfer);
            prop_assert!(back.same_layout(&b));
        }
    }

    #[test]
    fn truncated_bundles_are_truncated(b in bundle(), transfer in any::<u64>(), at in any::<prop::sample::Index>()) {
        let bytes = encode_bundle(transfer, &b).expect("encode");
        let cut = &bytes[..at.index(bytes.len())];
        let r = check_bundle(cut);
        prop_assert!(matches!(r, Err(ProtoError::Truncated { .. })), "{r:?}");
    }

    /// The payload decoder accepts exactly the byte count the header announces, whatever the
    /// header claims, and never allocates for a claim the bytes do not back.
    #[test]
    fn lying_headers_are_checked_against_the_payload(header in lying_header(), payload in vec(any::<u8>(), 0..256)) {
        let announced = header.payload_len();
        let decoded = decode_payload(&header, &payload);
        match (&announced, &decoded) {
            (Ok(n), Ok(b)) => {
                prop_assert_eq!(*n, payload.len() as u64);
                for (t, meta) in b.tensors.iter().zip(&header.tensors) {
                    prop_assert_eq!(t.data.len() as u64, meta.shape.iter().product::<u64>());
                }
            }
            (Ok(n), Err(ProtoError::Truncated { .. })) => prop_assert!(*n > payload.len() as u64),
            (Ok(n), Err(ProtoError::Trailing { .. })) => prop_assert!(*n < payload.len() as u64),
            (Err(a), Err(d)) => prop_assert_eq!(a, d),
            _ => prop_assert!(false, "payload_len {announced:?} but decode_payload {decoded:?}"),
        }
        // The same header and payload as one stream.
        if let Ok(mut stream) = encode_frame(&header) {
            stream.extend_from_slice(&payload);
            let _ = check_bundle(&stream);
        }
    }

    /// int8 deltas: decoding in chunks of any size gives the same values as decoding whole; each
    /// finite value comes back within half its block's step (max|x| / 254); a block holding a
    /// NaN or an infinity comes back NaN; the payload is one byte per value plus a scale per block.
    #[test]
    fn int8_bundles_decode_in_any_chunks_within_half_a_step(
        b in bundle(), block in 1u32..70, cuts in vec(any::<prop::sample::Index>(), 0..6)
    ) {
        let dtype = DType::Int8 { block };
        let header = BundleHeader::for_bundle_as(1, &b, dtype);
        let payload = encode_payload_as(&b, dtype);
        prop_assert_eq!(Some(payload.len() as u64), header.payload_len().ok());
        let whole = decode_payload(&header, &payload).expect("decode");
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(payload.len() + 1)).collect();
        at.sort_unstable();
        let mut d = PayloadDecoder::new(&header).expect("header");
        let mut from = 0;
        for &to in at.iter().chain([payload.len()].iter()) {
            d.push(&payload[from..to]).expect("push");
            from = to;
        }
        let chunked = d.finish().expect("finish");
        prop_assert!(same_bundle(&whole, &chunked));
        for (t, back) in b.tensors.iter().zip(&whole.tensors) {
            for (xs, ys) in t.data.chunks(block as usize).zip(back.data.chunks(block as usize)) {
                if xs.iter().any(|x| !x.is_finite()) {
                    prop_assert!(ys.iter().all(|y| y.is_nan()));
                    continue;
                }
                let step = xs.iter().fold(0.0f32, |a, x| a.max(x.abs())) / 127.0;
                for (x, y) in xs.iter().zip(ys) {
                    prop_assert!((x - y).abs() <= step * 0.5 * (1.0 + 1e-5) + f32::MIN_POSITIVE, "{x} -> {y}, step {step}");
                }
            }
        }
    }
}

/// Found by the property test above: a bf16 stream decodes, and re-encoded (as f32) it grows.
#[test]
fn a_bf16_scalar_stream_decodes_and_reencodes_as_f32() {
    let header = BundleHeader {
        transfer: 0,
        tensors: vec![TensorMeta {
            name: String::new(),
            dtype: DType::BF16,
            shape: vec![],
        }],
    };
    let mut stream = encode_frame(&header).expect("header");
    stream.extend_from_slice(&[0, 0]);
    let (_, bundle) = check_bundle(&stream).expect("a bf16 scalar decodes");
    assert_eq!(bundle.tensors[0].data, vec![0.0]);
}
