//! Model-agnostic training machinery: optimiser, schedule, RNG, checkpoints, metrics, losses
//! and guards. Stages see parameters only as named `Var`s, so the same pieces train the
//! spiking encoders and the ANN baseline alike.

pub mod checkpoint;
pub mod data_parallel;
pub mod epoch;
pub mod grads;
pub mod guard;
pub mod init;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod rng;
pub mod schedule;
pub mod stage;
