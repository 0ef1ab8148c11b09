//! Everything both sides of metaloop share: the wire protocol (`proto`), host-side tensors and
//! their codec, job configuration, dataset loading, the model zoo, deterministic randomness and
//! the QUIC/TLS set-up (`net`), the metric names (`metrics`) and the HTTP endpoint that serves
//! them (`http`); `net` and `http` are the only modules here that do network I/O.

pub mod bert;
pub mod checksum;
pub mod compute;
pub mod config;
pub mod dataset;
pub mod domains;
pub mod features;
pub mod http;
pub mod metrics;
pub mod model;
pub mod net;
pub mod pki;
pub mod proto;
pub mod rng;
pub mod tensor;
pub mod weights;
