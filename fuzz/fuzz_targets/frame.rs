//! Arbitrary bytes as a control frame (and as a bare frame body) of every message type on the
//! wire. Nothing may panic; whatever decodes must re-encode and decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metaloop_fuzz::{alloc_budget, canonical, frame_seeds, peak_alloc, write_seeds};
use metaloop_proto::proto::{
    decode_body, decode_frame, encode_frame, frame_len, BundleHeader, CoordinatorMsg, ProtoError, WorkerMsg,
    MAX_FRAME_BYTES,
};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// Decodes `data` as a `T` frame and as a `T` body and checks the round trip of what decodes.
fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    let (framed, peak) = peak_alloc(|| decode_frame::<T>("fuzz frame", data));
    assert!(
        peak <= alloc_budget(data.len()),
        "decode_frame held {peak} bytes for {} input bytes",
        data.len()
    );
    match framed {
        Ok((msg, used)) => {
            let len = frame_len(data[..4].try_into().expect("4 bytes")).expect("accepted prefix");
            assert_eq!(used, 4 + len);
            assert!(used <= data.len());
            roundtrip(&msg, len);
        }
        Err(ProtoError::Truncated { need, have }) => {
            assert_eq!(have, data.len());
            assert!(need > have);
        }
        Err(ProtoError::FrameTooLarge { len, limit }) => {
            assert_eq!(limit, MAX_FRAME_BYTES);
            assert!(len > limit);
        }
        Err(ProtoError::Decode { .. } | ProtoError::Trailing { .. }) => {}
        Err(e) => panic!("decode_frame returned an unexpected error: {e:?}"),
    }

    let (body, peak) = peak_alloc(|| decode_body::<T>("fuzz body", data));
    assert!(
        peak <= alloc_budget(data.len()),
        "decode_body held {peak} bytes for {} input bytes",
        data.len()
    );
    match body {
        Ok(msg) => roundtrip(&msg, data.len()),
        Err(ProtoError::Decode { .. } | ProtoError::Trailing { .. }) => {}
        Err(e) => panic!("decode_body returned an unexpected error: {e:?}"),
    }
}

/// `msg` was decoded from a body of `body_len` bytes: its canonical frame is no longer, and
/// decodes to the same value, bit for bit.
fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T, body_len: usize) {
    let bytes = encode_frame(msg).expect("a decoded message re-encodes");
    assert!(
        bytes.len() - 4 <= body_len,
        "canonical body of {} bytes from {body_len}",
        bytes.len() - 4
    );
    let (back, used) = decode_frame::<T>("fuzz roundtrip", &bytes).expect("a re-encoded message decodes");
    assert_eq!(used, bytes.len());
    assert_eq!(canonical(&back), canonical(msg), "round trip changed the value");
    // Values without NaN also compare equal with their own `PartialEq`.
    #[allow(clippy::eq_op)]
    if msg == msg {
        assert_eq!(&back, msg);
    }
}

fuzz_target!(init: write_seeds(&frame_seeds()), |data: &[u8]| {
    check::<WorkerMsg>(data);
    check::<CoordinatorMsg>(data);
    check::<BundleHeader>(data);
    if let Ok((header, _)) = decode_frame::<BundleHeader>("fuzz header", data) {
        // The size check itself must not panic (overflowing shapes, too many tensors).
        let _ = header.payload_len();
    }
});
