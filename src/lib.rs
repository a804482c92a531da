//! echod: a TCP echo server daemon (RFC 862).
//!
//! A single-threaded master accepts connections and passes each, as a file
//! descriptor over a Unix socket, to one of a prefork pool of worker
//! processes; a worker serves every connection on a thread of its own. See
//! DESIGN.md and README.md for the process model and its rules.
//!
//! Module map:
//! - [`cli`]: both binaries' command lines (clap), and the version;
//! - [`config`]: the file, its defaults and its errors (exit 78);
//! - [`master`]: the master's loop, listeners, dispatch, supervisor,
//!   signals and the /metrics endpoint;
//! - [`worker`]: the receiver, the fd queue, the handler pool, the echo
//!   and the locked counters;
//! - [`ipc`]: the master-worker channel and its one `Command` type;
//! - [`scoreboard`]: per-worker numbers in shared memory;
//! - [`stats`] and [`metrics`]: one snapshot, rendered for logs and
//!   Prometheus;
//! - [`proxy`]: the PROXY protocol header (v1, v2) and the trust list;
//! - [`systemd`], [`logging`], [`limits`], [`privileges`] (with [`users`],
//!   the name lookup config validation shares), [`ratelimit`];
//! - [`sys`]: every `unsafe` call, each with its argument;
//! - [`sync`]: the queue's locks, std's or loom's (`--cfg loom`);
//! - [`load`]: the engine of the `echo-load` harness.

pub mod cli;
pub mod config;
pub mod ipc;
pub mod limits;
pub mod load;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod privileges;
pub mod proxy;
pub mod ratelimit;
pub mod scoreboard;
pub mod stats;
pub mod sync;
pub mod sys;
pub mod systemd;
pub mod users;
pub mod worker;
