//! The metaloop worker: the inner loop. `client` speaks QUIC to the coordinator; `train` holds
//! the model on a dedicated compute thread and runs assignments.

mod client;
pub mod primitives;
pub mod rescaler;
#[cfg(test)]
mod testing;
mod train;

pub use client::{run, WorkerOptions};
pub use train::{AssignmentOutcome, RoundAsks, TrainError, Trainer};
