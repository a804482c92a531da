//! echod: a TCP echo server daemon (RFC 862).
//!
//! A single-threaded master accepts connections and passes each, as a file
//! descriptor over a Unix socket, to one of a prefork pool of worker
//! processes; a worker serves every connection on a thread of its own. See
//! DESIGN.md and README.md for the process model and its rules.
//!
//! Module map: [`config`] (the file and its errors), [`master`] (listeners,
//! dispatch, supervisor, signals), [`worker`] (queue, pool, echo, counters),
//! [`ipc`] (the master–worker channel), [`scoreboard`] (shared per-worker
//! numbers), [`stats`] (snapshots for logs), [`metrics`] (Prometheus text), [`systemd`], [`logging`],
//! [`limits`], [`privileges`], [`ratelimit`], and [`sys`] (every `unsafe` call).
//! [`load`] is the engine of the `echo-load` harness.

pub mod config;
pub mod ipc;
pub mod limits;
pub mod load;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod privileges;
pub mod ratelimit;
pub mod scoreboard;
pub mod stats;
pub mod sys;
pub mod systemd;
pub mod worker;
