//! What both sides of metaloop share that needs libtorch or I/O, built on the pure core in
//! `metaloop-proto` (wire protocol, tensors, config, datasets): the model zoo and its conversions
//! to and from host tensors (`model`), a job's data of either kind and its batches (`data`), the
//! BERT encoder loaded from Hugging Face files (`bert`), a user's TorchScript module
//! (`torchscript`), Ω's features computed from a model (`features`), the
//! compute thread that owns libtorch state (`compute`), the QUIC/TLS set-up (`net`), the CA on
//! disk (`pki`), the metric names (`metrics`) and the HTTP endpoint that serves them (`http`).
//! `net` and `http` are the only modules here that do network I/O; the only file I/O is `pki`'s
//! (the CA, certificates and revocation list it reads and writes), `net`'s (reading the PEM
//! files of a TLS identity; `write_pki` for tests), `bert`'s (a Hugging Face model
//! directory: `config.json` and `model.safetensors`), `text`'s (text sources and their cache)
//! and `torchscript`'s (a module file).

pub mod autocast;
pub mod bert;
pub mod classifier;
pub mod compute;
pub mod data;
pub mod features;
pub mod http;
pub mod metrics;
pub mod model;
pub mod net;
pub mod pki;
pub mod text;
pub mod torchscript;
