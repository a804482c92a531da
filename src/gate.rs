//! The accept gate: how a master that stopped accepting for lack of room
//! learns that a worker has room again.
//!
//! The one unit both sides use, as Apache keeps its idle-worker count and
//! `wait_for_idler` in `fd_queue_info`. The master closes the gate when
//! connections wait and no serving worker has a free slot (its listen
//! backlog then holds new clients); a worker whose connection ends while the
//! gate is closed asks the master to look again
//! ([`crate::ipc::Notice::RecheckRoom`]:
//! the notice carries nothing, the master re-reads the scoreboard). The gate
//! is one word of the scoreboard, in memory shared by every process.
//!
//! # The race, and the fence that closes it
//!
//! Master: "close the gate, then look for room". Worker: "publish the
//! finished count ([`crate::scoreboard::Slot::set_finished`]), then look at
//! the gate". A slot freed between the master's look and its close would be
//! missed by both (the master sees no room, the worker saw the gate open and
//! sent nothing) and the master would wait for a notice that never comes,
//! with a backlog of clients. So each side stores, then issues a SeqCst
//! fence, then loads: in every interleaving at least one of them sees the
//! other's store: the master finds the room, or the worker finds the gate
//! closed and sends the notice. `tests/loom.rs`
//! (`a_freed_slot_is_never_missed_by_both_master_and_worker`) checks every
//! interleaving of exactly these calls.
//!
//! A notice can still be lost to a full channel; the master then finds the
//! room at its next periodic recheck (`master::dispatch::PAUSED_RECHECK`),
//! so a lost notice costs latency, never a stall.

use crate::scoreboard::Scoreboard;

/// A handle on the gate: cheap to copy, the same gate in every process.
#[derive(Clone, Copy)]
pub struct AcceptGate {
    scoreboard: Scoreboard,
}

impl AcceptGate {
    pub fn new(scoreboard: Scoreboard) -> AcceptGate {
        AcceptGate { scoreboard }
    }

    /// Master: closes the gate, then asks `room` (which must read the
    /// workers' finished counts from the scoreboard) whether a worker has a
    /// free slot after all; if so, opens it again. Returns whether the gate
    /// stays closed. Closing *before* the last look is what makes a slot
    /// freed in between impossible to miss (see the module header).
    pub fn close_unless(&self, room: impl FnOnce() -> bool) -> bool {
        self.scoreboard.set_accept_paused(true);
        if room() {
            self.scoreboard.set_accept_paused(false);
            return false;
        }
        true
    }

    /// Master: opens the gate (room found, or stopping: nobody need ask).
    pub fn open(&self) {
        if self.is_closed() {
            self.scoreboard.set_accept_paused(false);
        }
    }

    /// Whether the master waits for room.
    pub fn is_closed(&self) -> bool {
        self.scoreboard.accept_paused()
    }

    /// Worker: a connection ended and its finished count is published; if
    /// the master waits for room, `ask` is called to tell it. A lost
    /// request is harmless (see the module header).
    pub fn slot_freed(&self, ask: impl FnOnce()) {
        if self.is_closed() {
            ask();
        }
    }
}
