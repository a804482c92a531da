//! The locks and atomics the worker's queue, its counters and the
//! scoreboard are built on: std's, or loom's when built with `--cfg loom`,
//! so `tests/loom.rs` can run the real code under a model checker that
//! tries every interleaving of its threads.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicU32, AtomicU64, fence};
#[cfg(loom)]
pub use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicU32, AtomicU64, fence};
#[cfg(not(loom))]
pub use std::sync::{Condvar, Mutex, MutexGuard};
