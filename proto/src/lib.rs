//! The pure core both sides of metaloop share: the wire protocol (`proto`: messages, framing and
//! the tensor-bundle codec), host-side tensors (`tensor`) and their checksums (`checksum`), the
//! job configuration and its validation (`config`), dataset loading (`dataset`) and the training
//! domains built from it (`domains`), deterministic randomness (`rng`), the domain-weight math
//! (`weights`) and the list of per-sample features Ω can see (`features`).
//!
//! Deliberately not here: libtorch (`tch`), async code, sockets and TLS, metrics. The only I/O is
//! reading the job's config and data files (`config`, `dataset`, `domains`); everything else is
//! plain data and computation, so this crate builds and tests without libtorch and the fuzz
//! targets link nothing else. What needs libtorch or the network is in `metaloop-common`.

pub mod checksum;
pub mod config;
pub mod dataset;
pub mod domains;
pub mod features;
pub mod proto;
pub mod rng;
pub mod tensor;
pub mod weights;
