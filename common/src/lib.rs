//! Everything both sides of metaloop share: the wire protocol (`proto`), host-side tensors and
//! their codec, job configuration, dataset loading, the model zoo, deterministic randomness and
//! the QUIC/TLS set-up (`net`, the only module here that does network I/O).

pub mod checksum;
pub mod compute;
pub mod config;
pub mod dataset;
pub mod domains;
pub mod features;
pub mod model;
pub mod net;
pub mod proto;
pub mod rng;
pub mod tensor;
pub mod weights;
