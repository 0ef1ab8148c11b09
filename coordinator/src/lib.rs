//! The metaloop coordinator: the outer loop. `round` makes every decision of a round without
//! I/O (with `scheduler`: who runs what; `outer`: the model update; `strategy`: the outer
//! strategy); `job` drives it with the network (`server`), evaluation, checkpoints and the
//! run's record (`rundir`).

mod checkpoint;
mod evaluate;
mod identity;
mod job;
mod outer;
mod plot;
mod prepare;
mod round;
mod rundir;
mod scheduler;
mod server;
mod strategy;
mod telemetry;

pub use identity::Revocation;
pub use job::{Complete, Coordinator, CoordinatorOptions, Stopped};
pub use rundir::{AnotherJob, RoundRecord, RunDir, Summary};
