//! The state a worker's receiver and handler threads share: the queue
//! between them, the locked counters, the scoreboard slot, the channel to
//! the master and what the receiver holds of each handler.

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::gate::AcceptGate;
use crate::ipc::{Channel, Notice, Origin};
use crate::ratelimit::RateLimited;
use crate::scoreboard::{Field, Scoreboard, Slot, monotonic_ms};
use crate::worker::access::{AccessLog, Ends, Entry, Reason};
use crate::worker::counters::Counters;
use crate::worker::handles::{self, Handle, OpenConnections};
use crate::worker::queue::Queue;

/// How often the receiver ticks when the channel is quiet.
pub const TICK: Duration = Duration::from_millis(250);

/// State shared by a worker's receiver and handler threads.
pub struct Shared {
    /// Scoreboard slot number.
    pub id: usize,
    pub config: Config,
    pub capacity: usize,
    pub slot: Slot,
    pub scoreboard: Scoreboard,
    /// Where a finished connection tells a master that waits for room.
    pub gate: AcceptGate,
    pub channel: Channel,
    /// Connections waiting for a thread, with where their client address
    /// comes from.
    pub queue: Queue<(TcpStream, Origin)>,
    pub counters: Counters,
    pub open: OpenConnections,
    /// The event loops (event mode; empty in thread mode).
    pub loops: Vec<Handle>,
    /// Handler threads alive (idle or busy; in event mode, the loops).
    pub threads: AtomicUsize,
    /// Connections being served (taken off the queue, not yet finished).
    pub busy: AtomicUsize,
    /// Receiver ticks so far: a clock handlers can read for the price of a
    /// relaxed load.
    pub ticks: AtomicU64,
    /// Paces the log lines of refused PROXY connections (`proxied`).
    pub refusal_log: std::sync::Mutex<RateLimited>,
    /// The connection log, when `access_log` is on.
    pub access: Option<AccessLog>,
}

impl Shared {
    /// Stops taking connections off the queue; handlers finish what they
    /// hold. Event loops are woken to notice.
    pub(super) fn close_queue(&self) {
        self.queue.close();
        handles::wake_all(&self.loops);
    }

    /// A connection ended (its finished count published): if the master
    /// stopped accepting for lack of room, tell it to look again. A full
    /// channel loses the notice harmlessly (see [`AcceptGate`]).
    pub fn slot_freed(&self) {
        self.gate.slot_freed(|| {
            let _ = self.channel.send_notice(Notice::RecheckRoom);
        });
    }

    /// Gives back what the master charged for a connection that is gone
    /// (a proxied one is charged only once its header is read).
    pub fn release(&self, origin: Origin) {
        if let Origin::Direct(charge) = origin {
            self.scoreboard.discharge(self.id, charge);
        }
    }

    /// Closes every connection being served, in either mode; returns how
    /// many there were.
    pub(super) fn cut_all(&self) -> usize {
        self.open.cut_all() + handles::cut_all(&self.loops)
    }

    /// Where a connection's log line will need its addresses from: read
    /// now (they may be gone at its end), and only with the log on.
    pub fn ends_of(&self, stream: &TcpStream) -> Option<Box<Ends>> {
        self.access.as_ref().map(|_| Box::new(Ends::of(stream)))
    }

    /// Writes a connection's line to the connection log, if it is on.
    pub fn log_connection(&self, ends: Option<&Ends>, started: Instant, bytes: (u64, u64), reason: Reason) {
        if let (Some(log), Some(ends)) = (&self.access, ends) {
            let (bytes_in, bytes_out) = bytes;
            log.log(&Entry { ends: *ends, lived: started.elapsed(), bytes_in, bytes_out, reason });
        }
    }

    /// Refreshes the heartbeat: this process runs. The receiver does it on
    /// every tick; busy handlers do it too (every few hundred echoes),
    /// because on a saturated CPU the receiver is one thread among
    /// thousands and may not run for seconds, and a busy worker must not be
    /// mistaken for a hung one. Only a process where nothing runs at all
    /// (stopped, wedged) goes stale.
    pub fn beat(&self) {
        let now = monotonic_ms();
        if now >= self.slot.get(Field::Heartbeat) + 100 {
            self.slot.set(Field::Heartbeat, now);
        }
    }
}
