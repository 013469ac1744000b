//! The embedded default's adapters: everything baton needs on one machine with no AWS.
//!
//! - [`sqlite`]: the SQL port on one SQLite file.
//! - [`lambda`]: an in-process model of Lambda's asynchronous invocation (queue, reserved
//!   concurrency, per-invocation deadline, faults) implementing the next-hop port.
//! - [`outbox`]: the mail port as a folder of `.eml` files, with a send-rate cap and faults.
//! - [`faults`]: the fault schedule, decided by hashing a seed with the event's identity, so a
//!   seed reproduces the same faults whatever the thread scheduling.
//!
//! What runs a local run to its end (the model's queue, the sweeper's timer, progress) is the
//! local runtime, [`crate::runtime`], which uses these adapters like any others.

pub mod faults;
pub mod lambda;
pub mod outbox;
pub mod sqlite;
