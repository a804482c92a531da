//! echod: a TCP echo server daemon (RFC 862).
//!
//! A single-threaded master accepts connections and passes each, as a file
//! descriptor over a Unix socket, to one of a prefork pool of worker
//! processes; a worker serves every connection on a thread of its own (or
//! in an event loop). The module map, one line per module, is DESIGN.md §8
//! (the one list, checked by `tests/structure.rs`); each module's own `//!`
//! header says what it is for. README.md and docs/ say how to run it.

pub mod cli;
pub mod config;
pub mod control;
pub mod gate;
pub mod ipc;
pub mod limits;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod privileges;
pub mod ratelimit;
pub mod scoreboard;
pub mod stats;
pub mod sync;
#[allow(unsafe_code)] // the one module with unsafe code, each block with its SAFETY argument
pub mod sys;
pub mod systemd;
pub mod users;
pub mod worker;
