//! The metaloop worker: the inner loop. `client` speaks QUIC to the coordinator; `engine` runs
//! one `train::Trainer` replica per device (`devices`), each on a dedicated compute thread,
//! their gradients summed through a `collective`. A trainer draws its batches from `data`, takes
//! the inner steps in `inner` and answers the round's ask with the strategy's `signal` producer.

mod adamw_cpu;
mod client;
mod collective;
mod data;
pub mod devices;
mod engine;
mod inner;
mod primitives;
mod rescaler;
mod signal;
#[cfg(test)]
mod testing;
mod train;

pub use client::{run, WorkerOptions};
pub use train::{AssignmentOutcome, RoundAsks, TrainError, Trainer};
