//! A worker process: receives connections from the master and serves them.
//!
//! The process's main thread is the *receiver*: it reads the channel, puts
//! each connection into the bounded [`queue`], hands it to the handler, and
//! acts on the master's commands (drain, quit). The handler is what takes
//! connections off the queue, one of two kinds set by `handler` in the
//! config:
//! - [`pool`] (`thread`, the default): each connection gets a thread of its
//!   own for its whole life; the receiver starts threads when no idle one is
//!   waiting;
//! - [`event`] (`event`): `event_threads` threads each poll many connections;
//!   the receiver wakes the least-loaded one.
//!
//! Both count into the same [`counters`], obey the same limits and timeouts,
//! and stop by the same drain.
//!
//! Every 250 ms the receiver also ticks: a heartbeat in the scoreboard (so
//! the master notices a hung worker; busy handlers refresh it too), idle
//! timeouts (thread mode; event loops check their own), the gauges (threads,
//! busy, queued), and the coarse clock that paces counter flushes of long
//! connections.
//!
//! A worker acts on no signal of its own (they are ignored); it stops when the
//! master says so, or when the master disappears (EOF on the channel, or
//! PR_SET_PDEATHSIG).

pub mod access;
pub mod counters;
pub mod echo;
pub mod event;
pub mod handles;
pub mod pool;
pub mod proxied;
pub mod queue;
pub mod shared;

use std::net::TcpStream;
use std::process;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::config::{Config, Handler};
use crate::gate::AcceptGate;
use crate::ipc::{Channel, Command, Notice, Origin, Received};
use crate::ratelimit::RateLimited;
use crate::scoreboard::{Field, Scoreboard, monotonic_ms};
use crate::worker::access::AccessLog;
use crate::{logging, sys};
use counters::Counters;
use handles::OpenConnections;
use queue::{PushError, Queue};
pub use shared::{Shared, TICK};

/// The fd number the channel is moved to in the child (the first after stdio).
const CHANNEL_FD: i32 = 3;

/// Fault injection for the crash-loop and upgrade tests, with no other
/// effect: `startup` makes every worker exit with status 3 right after it
/// starts, `hang` makes it wait forever instead of reporting Ready,
/// `hang-but-first` does that to every worker but worker 0 (a master that
/// half serves).
pub const CRASH_ENV: &str = "ECHOD_TEST_WORKER_CRASH";

/// What a worker is handed at fork.
pub struct Args {
    /// Slot number; also the worker's name (`echod: worker 2`).
    pub id: usize,
    pub master_pid: Pid,
    pub config: Config,
    pub channel: Channel,
    pub scoreboard: Scoreboard,
    /// Connections this worker may serve at once (threads_per_worker or
    /// worker_connections, lowered by the master if RLIMIT_NOFILE cannot
    /// hold that many).
    pub capacity: usize,
    /// The config generation it serves: its log lines say it (`g3`).
    pub generation: u64,
}

/// The worker process's entry point, called in the child right after fork.
/// Never returns: the child must not unwind into (or drop) the master's
/// state it inherited.
pub fn run(args: Args) -> ! {
    let Args { id, master_pid, config, channel, scoreboard, capacity, generation } = args;
    // First: a line logged from here on (a setup error) names this worker,
    // not the master whose pid the logger cached before the fork.
    logging::set_worker(id, generation);
    let code = match setup(id, master_pid, channel) {
        Ok(channel) => serve(id, config, channel, scoreboard, capacity),
        Err(e) => {
            log::error!("worker {id} setup failed: {e}");
            1
        }
    };
    process::exit(code)
}

/// Turns the fresh child into a worker: signals, parent-death, fds, name.
/// Consumes our end of the channel and returns it at fd 3, every other
/// inherited fd (listeners, epoll, signal pipe, other workers' channels)
/// closed.
fn setup(id: usize, master_pid: Pid, channel: Channel) -> std::io::Result<Channel> {
    use Signal::*;
    sys::ignore_signals(&[SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGTTIN, SIGTTOU])?;
    sys::default_signal(SIGCHLD)?;
    nix::sys::prctl::set_pdeathsig(SIGKILL)?;
    if nix::unistd::getppid() != master_pid {
        // The master died between fork and prctl: nobody will kill us.
        process::exit(1);
    }
    // Workers only echo on sockets they are handed: no capability at all.
    crate::privileges::drop_all_capabilities();
    sys::set_process_title(&format!("echod: worker {id}"));
    let fd = sys::move_fd(channel.into_fd(), CHANNEL_FD)?;
    sys::close_fds_from(CHANNEL_FD + 1)?;
    Ok(Channel::from_fd(fd))
}

fn serve(id: usize, config: Config, channel: Channel, scoreboard: Scoreboard, capacity: usize) -> i32 {
    let slot = scoreboard.slot(id);
    slot.set(Field::Pid, process::id() as u64);
    slot.set(Field::Heartbeat, monotonic_ms());
    slot.set(Field::OpenFds, crate::metrics::process::count_open_fds());
    if let Err(e) = channel.set_receive_timeout(TICK) {
        log::error!("cannot set channel timeout: {e}");
        return 1;
    }
    let event_loops = if config.handler == Handler::Event { config.event_threads } else { 0 };
    let (loops, polls) = match event::prepare(event_loops) {
        Ok(v) => v,
        Err(e) => {
            log::error!("cannot create event loops: {e}");
            return 1;
        }
    };
    let access = match config.access_log.then(AccessLog::start).transpose() {
        Ok(access) => access,
        Err(e) => {
            log::error!("cannot start the connection log's thread: {e}");
            return 1;
        }
    };
    let w = Arc::new(Shared {
        id,
        capacity,
        slot,
        scoreboard,
        gate: AcceptGate::new(scoreboard),
        channel,
        queue: Queue::new(config.queue_capacity),
        counters: Counters::new(slot),
        open: OpenConnections::default(),
        loops,
        threads: AtomicUsize::new(0),
        busy: AtomicUsize::new(0),
        ticks: AtomicU64::new(0),
        refusal_log: std::sync::Mutex::new(RateLimited::default()),
        access,
        config,
    });
    if let Err(e) = start_handlers(&w, polls) {
        log::error!("cannot start handler threads: {e}");
        return 1;
    }
    match std::env::var(CRASH_ENV).as_deref() {
        Ok("startup") => {
            log::error!("{CRASH_ENV}=startup: exiting at start-up (fault injection)");
            return 3;
        }
        Ok("hang") => {
            log::error!("{CRASH_ENV}=hang: never reporting ready (fault injection)");
            loop {
                std::thread::park();
            }
        }
        Ok("hang-but-first") if id != 0 => {
            log::error!("{CRASH_ENV}=hang-but-first: worker {id} never reports ready (fault injection)");
            loop {
                std::thread::park();
            }
        }
        _ => {}
    }
    publish_gauges(&w);
    if let Err(e) = w.channel.send_notice(Notice::Ready) {
        log::error!("cannot report ready to the master: {e}");
        return 1;
    }
    let code = receive(&w);
    if let Some(access) = &w.access {
        access.close(ACCESS_LOG_FLUSH);
        w.slot.set(Field::LogDropped, access.dropped());
    }
    code
}

/// At exit, how long the connection log may take to write what is queued.
const ACCESS_LOG_FLUSH: Duration = Duration::from_millis(500);

/// Starts the handler: the event loops, or the thread pool's spare threads.
fn start_handlers(w: &Arc<Shared>, polls: Vec<mio::Poll>) -> std::io::Result<()> {
    for (i, poll) in polls.into_iter().enumerate() {
        event::spawn(w, i, poll)?;
    }
    if w.loops.is_empty() {
        for _ in 0..w.config.min_spare_threads.min(w.capacity) {
            if let Err(e) = pool::spawn_handler(w) {
                // Fewer spares is not fatal: the pool grows on demand.
                log::error!("cannot start handler thread: {e}");
                break;
            }
        }
    }
    Ok(())
}

/// The receiver loop: commands from the master until told to stop.
fn receive(w: &Arc<Shared>) -> i32 {
    let mut last_tick = Instant::now();
    loop {
        match w.channel.recv_command() {
            Ok(Received::Command(Command::Serve(fds))) => take(w, fds, &mut last_tick),
            Ok(Received::Truncated { conns, lost }) => {
                lose(w, lost);
                take(w, conns, &mut last_tick);
            }
            Ok(Received::Command(Command::Drain { timeout })) => return drain(w, timeout),
            Ok(Received::Command(Command::Quit)) => return quit(w),
            Ok(Received::Idle) => {}
            Ok(Received::Closed) => {
                log::warn!("master is gone; closing all connections");
                return quit(w);
            }
            Err(e) if transient(&e) => {
                // Out of fds or kernel memory for one message: that message
                // is lost, not the connections this worker holds.
                log::error!("channel: {e}; a message from the master may be lost, serving on");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                log::error!("channel: {e}; closing all connections");
                return quit(w);
            }
        }
        if last_tick.elapsed() >= TICK {
            tick(w);
            last_tick = Instant::now();
        }
    }
}

/// A receive error that says the process (or the machine) is short of fds
/// or memory right now, not that the channel is broken.
fn transient(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error()
        .is_some_and(|n| [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM].contains(&Errno::from_raw(n)))
}

/// Accounts for connections the kernel closed on their way to us (this
/// worker was out of fds): each counts as finished, as it would had it
/// been served (DESIGN rule 6), and gives back its client's charge.
fn lose(w: &Shared, lost: Vec<Origin>) {
    if lost.is_empty() {
        return;
    }
    w.slot.set(Field::Received, w.slot.get(Field::Received) + lost.len() as u64);
    w.counters.abandon(lost.len() as u64);
    for origin in &lost {
        w.release(*origin);
    }
    log::error!(
        "out of file descriptors: the kernel dropped {} connection(s) passed to this worker; serving on \
         (raise LimitNOFILE= or `ulimit -n`)",
        lost.len()
    );
    w.slot_freed();
}

/// Queues newly received connections, starting threads (thread mode) or
/// waking a loop (event mode) as needed.
fn take(w: &Arc<Shared>, conns: Vec<(std::os::fd::OwnedFd, Origin)>, last_tick: &mut Instant) {
    w.slot.set(Field::Received, w.slot.get(Field::Received) + conns.len() as u64);
    let waits_before = w.queue.full_waits();
    for (fd, origin) in conns {
        let mut stream = (TcpStream::from(fd), origin);
        loop {
            match w.queue.push(stream, Some(TICK)) {
                Ok(depth) if !w.loops.is_empty() => {
                    // The next push would wait for room that only a loop
                    // makes: wake one now, not after the batch (or after
                    // that push has waited out its timeout).
                    if depth.queued >= w.queue.capacity() {
                        handles::notify(&w.loops);
                    }
                    break;
                }
                Ok(depth) => {
                    // With a thread waiting, the one that pops will start
                    // helpers as needed (pool::handler); the receiver, which
                    // may be starved of CPU, only steps in when nobody waits.
                    if depth.idle == 0 && depth.needs_thread() {
                        grow(w);
                    }
                    break;
                }
                Err(PushError::Full(s)) => {
                    // Every thread is busy and the queue is full; keep the
                    // heartbeat going while we wait for room.
                    stream = s;
                    if !w.loops.is_empty() {
                        // Loops were woken when it filled and never block
                        // on a client: this is a worker starved of CPU.
                        log::warn!(
                            "the event loops took nothing from the full queue ({}) for {} ms",
                            w.config.queue_capacity,
                            TICK.as_millis()
                        );
                    }
                    handles::notify(&w.loops);
                    tick(w);
                    *last_tick = Instant::now();
                }
                Err(PushError::Closed((_, origin))) => {
                    w.release(origin);
                    break;
                }
            }
        }
    }
    // One wake-up per batch: the loop takes everything queued.
    handles::notify(&w.loops);
    let waits = w.queue.full_waits() - waits_before;
    if waits > 0 {
        log::debug!(
            "queue full ({} waiting) {waits} time(s) in this batch; held back until a handler took one",
            w.config.queue_capacity
        );
    }
}

/// Starts a handler for a connection nobody is waiting for.
fn grow(w: &Arc<Shared>) {
    if let Err(e) = pool::spawn_handler(w) {
        // The connection stays queued until a busy thread frees up.
        log::warn!("cannot start handler thread ({} running): {e}", w.threads.load(Ordering::Relaxed));
    }
}

/// Heartbeat, gauges, idle timeouts and the handlers' coarse clock.
fn tick(w: &Shared) {
    let now = w.ticks.fetch_add(1, Ordering::Relaxed) + 1;
    w.beat();
    if let Some(idle) = w.config.idle_timeout.nonzero() {
        let idle_ticks = idle.as_millis().div_ceil(TICK.as_millis()).max(1) as u64;
        let cut = w.open.cut_idle(now, idle_ticks);
        if cut > 0 {
            log::debug!("closed {cut} idle connection(s)");
        }
    }
    publish_gauges(w);
    if let Some(access) = &w.access {
        w.slot.set(Field::LogDropped, access.dropped());
    }
    if now % OPEN_FDS_EVERY == 0 {
        w.slot.set(Field::OpenFds, crate::metrics::process::count_open_fds());
    }
}

/// Ticks between two counts of the worker's open fds (one a second): the
/// count reads a directory as long as the worker holds connections.
const OPEN_FDS_EVERY: u64 = 4;

fn publish_gauges(w: &Shared) {
    let (queued, _idle) = w.queue.stats();
    w.slot.set(Field::Queued, queued as u64);
    w.slot.set(Field::Threads, w.threads.load(Ordering::Relaxed) as u64);
    let busy = if w.loops.is_empty() { w.busy.load(Ordering::Relaxed) } else { handles::busy_loops(&w.loops) };
    w.slot.set(Field::Busy, busy as u64);
}

/// Graceful stop: no new connections; open ones run until `timeout`, then
/// are cut. Keeps reading the channel so a Quit (or the master's death)
/// still ends it at once.
fn drain(w: &Arc<Shared>, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    w.close_queue();
    log::info!(
        "draining {} connection(s) for up to {:.1}s",
        w.busy.load(Ordering::Relaxed) + w.queue.stats().0,
        timeout.as_secs_f64()
    );
    // Poll the channel (and the handlers) every 50 ms so the exit is
    // prompt, but tick on the 250 ms clock: the tick is what idle timeouts
    // and flushes count in, and it must not run fast during a drain.
    let _ = w.channel.set_receive_timeout(Duration::from_millis(50));
    let mut last_tick = Instant::now();
    while w.threads.load(Ordering::Acquire) > 0 {
        if Instant::now() >= deadline {
            let cut = w.cut_all();
            log::info!("drain deadline reached: closing {cut} connection(s)");
            wait_for_handlers(w, Duration::from_secs(2));
            break;
        }
        match w.channel.recv_command() {
            Ok(Received::Command(Command::Quit)) => return quit(w),
            Ok(Received::Closed) => return quit(w),
            Ok(Received::Truncated { lost, .. }) => lose(w, lost),
            Err(e) if !transient(&e) => return quit(w),
            Ok(_) | Err(_) => {}
        }
        if last_tick.elapsed() >= TICK {
            tick(w);
            last_tick = Instant::now();
        }
    }
    tick(w);
    log::info!("drained; exiting");
    0
}

/// Fast stop: cut everything and exit now.
fn quit(w: &Shared) -> i32 {
    let unserved = w.queue.close_and_take();
    w.counters.abandon(unserved.len() as u64);
    let now = Instant::now();
    for (stream, origin) in unserved {
        // Never served: a line all the same (closed by the stop, no bytes).
        let cut = access::Reason::Ended(crate::worker::counters::Ending::Cut);
        w.log_connection(w.ends_of(&stream).as_deref(), now, (0, 0), cut);
        w.release(origin);
    }
    w.cut_all(); // also wakes the event loops, which then see the queue closed
    // Give handlers a moment to record the connections they just lost, so
    // the master's totals stay close; never long.
    wait_for_handlers(w, Duration::from_millis(200));
    tick(w);
    0
}

fn wait_for_handlers(w: &Shared, at_most: Duration) {
    let until = Instant::now() + at_most;
    while w.busy.load(Ordering::Acquire) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}
