//! The metaloop coordinator: the outer loop. `job` runs rounds, `scheduler` decides who runs
//! what (pure state machine), `outer` makes the model update, `server` moves the bytes and
//! `rundir` writes the run's record.

mod checkpoint;
mod identity;
mod job;
mod outer;
mod plot;
mod policy;
mod rescaler;
mod rundir;
mod scheduler;
mod server;
mod strategy;
mod telemetry;

pub use identity::Revocation;
pub use job::{Complete, Coordinator, CoordinatorOptions, Stopped};
pub use outer::OuterOptimizer;
pub use rundir::{AnotherJob, RoundRecord, RunDir, Summary};
pub use scheduler::{Dispatch, Rejection, Scheduler};
