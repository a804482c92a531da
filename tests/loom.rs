//! Model checking of the worker's bounded queue (src/worker/queue.rs) with
//! loom: each model runs the real `Queue` (built on loom's Mutex and
//! Condvar through `echod::sync`) under every interleaving of its threads
//! that loom can tell apart, and fails on a deadlock (a lost wake-up), a
//! lost or duplicated item, or idle/capacity accounting that does not come
//! back to zero.
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

use echod::worker::queue::{Pop, PushError, Queue};

/// Runs `f` under loom and says how many interleavings it explored (the
/// figure the README quotes; `--nocapture` shows it).
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let before = RUNS.load(Ordering::Relaxed);
    let f = std::sync::Arc::new(f);
    loom::model(move || {
        RUNS.fetch_add(1, Ordering::Relaxed);
        f()
    });
    eprintln!("loom model {name}: {} interleavings explored", RUNS.load(Ordering::Relaxed) - before);
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
