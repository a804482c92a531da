//! Model checking with loom of the worker's bounded queue
//! (src/worker/queue.rs), its locked counters (src/worker/counters.rs) and
//! the scoreboard's per-address counts and capacity hand-shake
//! (src/scoreboard.rs): each model runs the real code (built on loom's
//! Mutex, Condvar, atomics and fences through `echod::sync`) under every
//! interleaving of its threads that loom can tell apart, and fails on a
//! deadlock (a lost wake-up), a lost or duplicated item, accounting that
//! does not come back to zero, or a total that is not exact.
//!
//!     RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test --release --test loom
//!
//! Without `--cfg loom` this file compiles to nothing. Timeouts are left
//! out of the models: loom has no clock, and a timed wait is a wait that
//! may also wake spuriously, which the blocking models already cover.
#![cfg(loom)]

use std::sync::atomic::{AtomicUsize, Ordering};

use loom::sync::Arc;
use loom::thread;

use std::time::Duration;

use std::net::IpAddr;

use echod::gate::AcceptGate;
use echod::scoreboard::{Admission, Scoreboard};
use echod::worker::counters::{Counters, Ending, Tally};
use echod::worker::queue::{Pop, PushError, Queue};

/// Runs `f` under loom and says how many interleavings it explored (the
/// figure the README quotes; `--nocapture` shows it).
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    // One counter per model: a static would be shared by the models that
    // the test harness runs in parallel, and each would print their sum.
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let (f, counted) = (std::sync::Arc::new(f), runs.clone());
    loom::model(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        f()
    });
    eprintln!("loom model {name}: {} interleavings explored", runs.load(Ordering::Relaxed));
}

fn item(p: Pop<u32>) -> Option<u32> {
    match p {
        Pop::Item(v, _) => Some(v),
        _ => None,
    }
}

/// Two producers, one blocking consumer: both items arrive exactly once,
/// and no one is left counted idle.
#[test]
fn every_pushed_item_is_popped_once() {
    model("every_pushed_item_is_popped_once", || {
        let q = Arc::new(Queue::new(4));
        let producers: Vec<_> = (0..2)
            .map(|i| {
                let q = q.clone();
                thread::spawn(move || q.push(i, None).map(|_| ()).map_err(|_| ()))
            })
            .collect();
        let mut got = vec![item(q.pop(None)).expect("an item"), item(q.pop(None)).expect("an item")];
        for p in producers {
            assert_eq!(p.join().unwrap(), Ok(()));
        }
        got.sort();
        assert_eq!(got, vec![0, 1]);
        assert_eq!(q.stats(), (0, 0), "nothing queued, nobody idle");
    });
}

/// Capacity 1 and two pushes: the second push waits for the pop, the
/// queue never holds more than its capacity, and order is kept.
#[test]
fn a_full_queue_blocks_the_pusher_and_keeps_order() {
    model("a_full_queue_blocks_the_pusher_and_keeps_order", || {
        let q = Arc::new(Queue::new(1));
        let q2 = q.clone();
        let producer = thread::spawn(move || {
            let a = q2.push(1, None).map(|d| d.queued).unwrap_or(usize::MAX);
            let b = q2.push(2, None).map(|d| d.queued).unwrap_or(usize::MAX);
            (a, b)
        });
        let first = item(q.pop(None));
        let second = item(q.pop(None));
        let (a, b) = producer.join().unwrap();
        assert_eq!((first, second), (Some(1), Some(2)), "FIFO");
        assert!(a <= 1 && b <= 1, "never more than capacity queued: {a} {b}");
        assert_eq!(q.stats(), (0, 0));
    });
}

/// `needs_thread` is the receiver's promise: when a push says no thread is
/// needed, an idle handler is waiting and gets the item. Modelled with one
/// waiting handler: whatever the interleaving, it gets the item (no lost
/// wake-up) and the idle count returns to zero.
#[test]
fn an_idle_handler_gets_what_is_pushed() {
    model("an_idle_handler_gets_what_is_pushed", || {
        let q = Arc::new(Queue::new(2));
        let q2 = q.clone();
        let handler = thread::spawn(move || item(q2.pop(None)));
        let depth = q.push(7, None).ok().expect("pushed");
        assert!(depth.idle <= 1 && depth.queued == 1, "{depth:?}");
        assert_eq!(handler.join().unwrap(), Some(7));
        assert_eq!(q.stats(), (0, 0));
    });
}

/// Close wakes everyone: a handler blocked on an empty queue returns
/// Closed, a pusher blocked on a full queue gets its item back, and
/// nothing is lost: what was queued is either popped or taken by
/// `close_and_take`, exactly once.
#[test]
fn close_wakes_blocked_pushers_and_poppers_and_loses_nothing() {
    model("close_wakes_blocked_pushers_and_poppers_and_loses_nothing", || {
        let q = Arc::new(Queue::new(1));
        q.push(1, None).ok().expect("room for one");
        let (qp, qh) = (q.clone(), q.clone());
        // Blocks while 1 is queued; then pushed, or refused by the close.
        let pusher = thread::spawn(move || match qp.push(2, None) {
            Ok(_) => None,
            Err(PushError::Closed(v)) => Some(v),
            Err(PushError::Full(_)) => panic!("a push without timeout is never Full"),
        });
        let handler = thread::spawn(move || item(qh.try_pop()));
        let taken = q.close_and_take();
        let returned = pusher.join().unwrap();
        let popped = handler.join().unwrap();
        let mut all: Vec<u32> = taken.into_iter().chain(returned).chain(popped).collect();
        all.sort();
        assert_eq!(all, vec![1, 2], "each item once: queued-and-taken, popped, or handed back");
        assert!(matches!(q.pop(None), Pop::Closed), "closed stays closed");
        assert_eq!(q.stats().1, 0, "nobody idle");
    });
}

/// A handler blocked in pop with nothing ever pushed is woken by close.
#[test]
fn close_wakes_an_idle_handler() {
    model("close_wakes_an_idle_handler", || {
        let q: Arc<Queue<u32>> = Arc::new(Queue::new(1));
        let q2 = q.clone();
        let handler = thread::spawn(move || matches!(q2.pop(None), Pop::Closed));
        q.close();
        assert!(handler.join().unwrap(), "woken with Closed");
        assert_eq!(q.stats(), (0, 0));
    });
}

/// The accept gate (`echod::gate`), the calls both sides make: the master
/// closes the gate and then looks for room in the worker's finished count;
/// a worker publishes a finished connection and then looks at the gate (to
/// ask for a recheck). In every interleaving one of them sees the other: a
/// freed slot is never missed by both (store, SeqCst fence, load on each
/// side).
#[test]
fn a_freed_slot_is_never_missed_by_both_master_and_worker() {
    model("a_freed_slot_is_never_missed_by_both_master_and_worker", || {
        let sb = Scoreboard::new(1, 1).expect("a scoreboard");
        let gate = AcceptGate::new(sb);
        let worker = thread::spawn(move || {
            sb.slot(0).set_finished(1);
            let mut asked = false;
            gate.slot_freed(|| asked = true);
            asked
        });
        let closed = gate.close_unless(|| sb.slot(0).finished() == 1);
        let worker_asked = worker.join().unwrap();
        assert!(!closed || worker_asked, "both missed the freed slot: the gate stays closed and nobody asks");
    });
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an address")
}

/// Per-address counts: the master charges and reads the total while one
/// worker discharges and another is reaped (its slot vacated). The total
/// seen is always whole (before or after the vacate, never half-cleared),
/// and afterwards counts only the live worker, exactly.
#[test]
fn per_address_totals_are_exact_and_a_dead_workers_counts_vanish_whole() {
    model("per_address_totals_are_exact_and_a_dead_workers_counts_vanish_whole", || {
        let sb = Scoreboard::new(2, 1).expect("a scoreboard");
        let a = ip("192.0.2.1");
        sb.occupy(0);
        sb.occupy(1);
        let c0 = sb.charge_direct(0, a).expect("room");
        sb.charge_direct(1, a).expect("room");
        let c1 = sb.charge_direct(1, a).expect("room");
        // Worker 0 closes its connection; worker 1 dies and is reaped.
        let w0 = thread::spawn(move || sb.discharge(0, c0));
        let reaper = thread::spawn(move || sb.vacate(1));
        let seen = sb.ip_total(a);
        assert!(matches!(seen, 0..=3), "a whole total: {seen}");
        w0.join().unwrap();
        reaper.join().unwrap();
        assert_eq!(sb.ip_total(a), 0, "nothing left: worker 0 discharged, worker 1 is gone");
        // A discharge after the vacate (a late close) does not wrap around.
        sb.discharge(1, c1);
        sb.occupy(1);
        assert_eq!(sb.ip_total(a), 0, "a new worker in the slot starts from zero");
    });
}

/// #27.7: an entry re-keyed while another process sums an address. Under
/// loom every address hashes to the same entry, so the master re-uses
/// entry 0 for `b` as soon as the worker has discharged `a`. The reader
/// sums `a` and `torn`, an address made of `a`'s high half and `b`'s low
/// half: it must never take `b`'s count for `a`, nor a half-written
/// address for a real one (a read without the generation check fails
/// here: "a half-written address was counted").
#[test]
fn a_reader_is_never_fooled_by_an_entry_re_keyed_under_it() {
    model("a_reader_is_never_fooled_by_an_entry_re_keyed_under_it", || {
        let sb = Scoreboard::new(1, 1).expect("a scoreboard");
        let (a, b, torn) = (ip("2001:db8::1"), ip("2001:db9::2"), ip("2001:db8::2"));
        sb.occupy(0);
        let ca = sb.charge_direct(0, a).expect("room");
        let worker = thread::spawn(move || sb.discharge(0, ca));
        let reader = thread::spawn(move || (sb.ip_total(a), sb.ip_total(torn)));
        // The master, after the worker's close: b twice, in the entry a
        // had (re-keyed while the reader may be reading it).
        worker.join().unwrap();
        assert_eq!(sb.charge_direct(0, b).map(|c| c.0), Some(0), "re-keyed in place");
        sb.charge_direct(0, b).expect("room");
        let (seen_a, seen_torn) = reader.join().unwrap();
        assert!(seen_a <= 1, "b's count taken for a: {seen_a}");
        assert_eq!(seen_torn, 0, "a half-written address was counted");
        assert_eq!((sb.ip_total(a), sb.ip_total(b)), (0, 2), "exact afterwards");
    });
}

/// Two workers admit the same PROXY client at once, with room for one:
/// each charges its own table and then sums both, so at most one admits
/// (both may refuse), and nothing stays charged for a refusal.
#[test]
fn two_workers_never_both_admit_a_proxy_client_past_the_limit() {
    model("two_workers_never_both_admit_a_proxy_client_past_the_limit", || {
        let sb = Scoreboard::new(2, 1).expect("a scoreboard");
        let a = ip("198.51.100.7");
        sb.occupy(0);
        sb.occupy(1);
        let other = thread::spawn(move || sb.admit_proxied(1, a, 1));
        let mine = sb.admit_proxied(0, a, 1);
        let theirs = other.join().unwrap();
        let admitted = [mine, theirs].iter().filter(|x| matches!(x, Admission::Admitted(_))).count();
        assert!(admitted <= 1, "both admitted: {mine:?} {theirs:?}");
        assert_eq!(sb.ip_total(a), admitted as u64, "a refusal leaves nothing charged");
    });
}

/// The locked counters: two handler threads finish a connection each while
/// the master snapshots the slot. Totals end exact, and no snapshot shows
/// more finished connections than there were.
#[test]
fn counters_total_exactly_under_concurrent_finishes() {
    model("counters_total_exactly_under_concurrent_finishes", || {
        let sb = Scoreboard::new(1, 1).expect("a scoreboard");
        let counters = Arc::new(Counters::new(sb.slot(0)));
        let handlers: Vec<_> = (0..2)
            .map(|_| {
                let c = counters.clone();
                thread::spawn(move || {
                    let mut t = Tally { bytes_in: 10, bytes_out: 10 };
                    c.finish(&mut t, Ending::Closed, Duration::from_millis(1));
                })
            })
            .collect();
        let mid = sb.slot(0).finished();
        assert!(mid <= 2, "{mid}");
        handlers.into_iter().for_each(|h| h.join().unwrap());
        let s = sb.slot(0).snapshot();
        assert_eq!((s.finished, s.bytes_in, s.bytes_out), (2, 20, 20), "exact totals");
    });
}

/// Close wakes *every* waiter, not one: two handlers blocked in pop on an
/// empty queue both return Closed, and two pushers blocked on a full one
/// both get their item back. (With one waiter per side, as in the models
/// above, a close that notifies one waiter looks right; this model
/// deadlocks on it.)
#[test]
fn close_wakes_every_blocked_waiter() {
    model("close_wakes_every_blocked_waiter", || {
        let q: Arc<Queue<u32>> = Arc::new(Queue::new(1));
        let handlers: Vec<_> = (0..2)
            .map(|_| {
                let q = q.clone();
                thread::spawn(move || matches!(q.pop(None), Pop::Closed))
            })
            .collect();
        q.close();
        for h in handlers {
            assert!(h.join().unwrap(), "every blocked handler woken with Closed");
        }
        assert_eq!(q.stats(), (0, 0), "nobody left idle");
    });
    model("close_wakes_every_blocked_pusher", || {
        let q: Arc<Queue<u32>> = Arc::new(Queue::new(1));
        q.push(0, None).ok().expect("room for one");
        let pushers: Vec<_> = (1..3)
            .map(|i| {
                let q = q.clone();
                thread::spawn(move || matches!(q.push(i, None), Err(PushError::Closed(v)) if v == i))
            })
            .collect();
        assert_eq!(q.close_and_take(), vec![0]);
        for p in pushers {
            assert!(p.join().unwrap(), "every blocked pusher gets its item back");
        }
    });
}
