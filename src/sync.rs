//! The locks the worker's queue is built on: std's, or loom's when built
//! with `--cfg loom`, so `tests/loom.rs` can run the real queue under a
//! model checker that tries every interleaving of its threads.

#[cfg(loom)]
pub use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub use std::sync::{Condvar, Mutex, MutexGuard};
