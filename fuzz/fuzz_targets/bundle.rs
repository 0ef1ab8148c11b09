//! Arbitrary bytes as a whole tensor-bundle stream (header frame, then raw payload). Nothing may
//! panic, nothing may allocate more than the input justifies (a header can announce 16 GiB in a
//! few bytes), and whatever decodes must re-encode and decode to the same bundle, bit for bit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metaloop_fuzz::{alloc_budget, bundle_seeds, peak_alloc, same_bundle, write_seeds};
use metaloop_proto::proto::{decode_bundle, encode_bundle, BundleHeader, ProtoError};

fn check(data: &[u8]) {
    let (decoded, peak) = peak_alloc(|| decode_bundle(data));
    assert!(
        peak <= alloc_budget(data.len()),
        "decode_bundle held {peak} bytes for {} input bytes",
        data.len()
    );
    match decoded {
        Ok((transfer, bundle)) => {
            let mut payload = 0usize;
            for t in &bundle.tensors {
                assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "tensor `{}`", t.name);
                payload += 4 * t.data.len();
            }
            assert!(payload <= data.len());
            let bytes = encode_bundle(transfer, &bundle).expect("a decoded bundle re-encodes");
            assert!(
                bytes.len() <= data.len(),
                "canonical stream of {} bytes from {}",
                bytes.len(),
                data.len()
            );
            let (again, back) = decode_bundle(&bytes).expect("a re-encoded bundle decodes");
            assert_eq!(again, transfer);
            assert!(same_bundle(&back, &bundle), "round trip changed the bundle");
        }
        Err(
            ProtoError::Truncated { .. }
            | ProtoError::Trailing { .. }
            | ProtoError::FrameTooLarge { .. }
            | ProtoError::Decode { .. }
            | ProtoError::BadTensor { .. }
            | ProtoError::BundleTooLarge { .. },
        ) => {}
        Err(e) => panic!("decode_bundle returned an unexpected error: {e:?}"),
    }
}

fuzz_target!(init: write_seeds(&bundle_seeds()), |data: &[u8]| {
    check(data);
    // Insertions and deletions in the header break its length prefix; also try the input with
    // the prefix the header it starts with needs, so such mutations still reach the payload.
    if let Ok((_, rest)) = postcard::take_from_bytes::<BundleHeader>(data) {
        let used = data.len() - rest.len();
        let mut framed = Vec::with_capacity(4 + data.len());
        framed.extend_from_slice(&(used as u32).to_le_bytes());
        framed.extend_from_slice(data);
        check(&framed);
    }
});
