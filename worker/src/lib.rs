//! The metaloop worker: the inner loop. `client` speaks QUIC to the coordinator; `engine` runs
//! one `train::Trainer` replica per device (`devices`), each on a dedicated compute thread,
//! their gradients summed through a `collective`.

mod client;
pub mod collective;
pub mod devices;
mod engine;
pub mod primitives;
pub mod rescaler;
#[cfg(test)]
mod testing;
mod train;

pub use client::{run, WorkerOptions};
pub use train::{AssignmentOutcome, RoundAsks, TrainError, Trainer};
