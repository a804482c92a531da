//! The bounded hand-off queue between a worker's receiver thread and its
//! handler threads (Apache's fdqueue).
//!
//! The receiver pushes each connection it takes off the channel; an idle
//! handler pops it and serves it to the end. The queue counts its own idle
//! handlers, so the receiver can tell, in the same critical section as the
//! push, whether someone is waiting for the connection or whether a new
//! thread is needed ([`Depth::needs_thread`]). `pop` reports the same, so a
//! handler taking work can start a helper while the receiver is busy.
//!
//! Bounded: when `capacity` connections are waiting, `push` blocks. The
//! receiver then stops reading the channel, the channel's socket buffer
//! fills, and the master sees the worker as full. Nothing grows without
//! bound. One lock acquisition per connection, none per byte.

use crate::sync::{Condvar, Mutex, MutexGuard};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A bounded multi-producer multi-consumer FIFO with idle-consumer accounting.
pub struct Queue<T> {
    state: Mutex<State<T>>,
    /// Signalled on push and close; handlers wait here.
    not_empty: Condvar,
    /// Signalled on pop and close; a blocked pusher waits here.
    not_full: Condvar,
    capacity: usize,
}

struct State<T> {
    items: VecDeque<T>,
    /// Consumers blocked in `pop` right now. Each will take one item, so
    /// `items.len() > idle` means some item has nobody coming for it.
    idle: usize,
    closed: bool,
    /// Pushes that found the queue full and had to wait: the sign that
    /// `queue_capacity` is what holds connections back, not the threads.
    full_waits: u64,
}

/// What `pop` produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop<T> {
    /// An item, and the queue as this pop left it.
    Item(T, Depth),
    /// Nothing arrived within the timeout (the caller may retire).
    TimedOut,
    /// The queue is closed and empty: no more work will come.
    Closed,
}

/// Why a push gave its item back.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<T> {
    /// Still full when the timeout passed.
    Full(T),
    /// Closed: no more work is accepted.
    Closed(T),
}

/// The queue right after a push or pop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    /// Items waiting (including one just pushed).
    pub queued: usize,
    /// Consumers waiting for items.
    pub idle: usize,
}

impl Depth {
    /// True when more items wait than there are idle consumers to take them.
    pub fn needs_thread(&self) -> bool {
        self.queued > self.idle
    }
}

impl<T> Queue<T> {
    pub fn new(capacity: usize) -> Queue<T> {
        Queue {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity.min(1024)),
                idle: 0,
                closed: false,
                full_waits: 0,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    /// Adds `item`, waiting while the queue is full, for at most `timeout`
    /// (forever if `None`). Gives the item back if the queue is (or gets)
    /// closed, or is still full when the timeout passes.
    pub fn push(&self, item: T, timeout: Option<Duration>) -> Result<Depth, PushError<T>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        if st.items.len() >= self.capacity && !st.closed {
            st.full_waits += 1;
        }
        while st.items.len() >= self.capacity && !st.closed {
            st = match deadline {
                None => self.not_full.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(PushError::Full(item));
                    }
                    self.not_full.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
        }
        if st.closed {
            return Err(PushError::Closed(item));
        }
        st.items.push_back(item);
        let pushed = Depth { queued: st.items.len(), idle: st.idle };
        drop(st);
        self.not_empty.notify_one();
        Ok(pushed)
    }

    /// Takes the oldest item, waiting up to `timeout` (forever if `None`).
    /// After `close`, remaining items are still handed out, then `Closed`.
    pub fn pop(&self, timeout: Option<Duration>) -> Pop<T> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            if let Some(item) = st.items.pop_front() {
                let depth = Depth { queued: st.items.len(), idle: st.idle };
                drop(st);
                self.not_full.notify_one();
                return Pop::Item(item, depth);
            }
            if st.closed {
                return Pop::Closed;
            }
            st.idle += 1;
            st = match deadline {
                None => self.not_empty.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    self.not_empty.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
            st.idle -= 1;
            if deadline.is_some_and(|d| Instant::now() >= d) && st.items.is_empty() && !st.closed {
                return Pop::TimedOut;
            }
        }
    }

    /// Takes the oldest item if there is one, never waiting and never
    /// counting the caller as idle: for event loops, which poll the queue
    /// when woken rather than block on it. `TimedOut` means empty right now.
    pub fn try_pop(&self) -> Pop<T> {
        let mut st = self.lock();
        match st.items.pop_front() {
            Some(item) => {
                let depth = Depth { queued: st.items.len(), idle: st.idle };
                drop(st);
                self.not_full.notify_one();
                Pop::Item(item, depth)
            }
            None if st.closed => Pop::Closed,
            None => Pop::TimedOut,
        }
    }

    /// Refuses further pushes and wakes everyone. Items already queued are
    /// still popped (a draining worker serves what it accepted).
    pub fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }

    /// Closes the queue and takes every waiting item (fast stop).
    pub fn close_and_take(&self) -> Vec<T> {
        let mut st = self.lock();
        st.closed = true;
        let items = st.items.drain(..).collect();
        drop(st);
        self.not_empty.notify_all();
        self.not_full.notify_all();
        items
    }

    /// Items the queue holds before `push` waits.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// (waiting items, idle consumers), for the scoreboard.
    pub fn stats(&self) -> (usize, usize) {
        let st = self.lock();
        (st.items.len(), st.idle)
    }

    /// How many pushes so far found the queue full and waited for room.
    pub fn full_waits(&self) -> u64 {
        self.lock().full_waits
    }

    /// A poisoned lock means a thread panicked while holding it; the queue's
    /// state is still a consistent VecDeque and counters, so carry on.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::thread;

    #[test]
    fn fifo_and_accounting() {
        let q = Queue::new(4);
        assert_eq!(q.push(1, None), Ok(Depth { queued: 1, idle: 0 }));
        assert!(q.push(2, None).unwrap().needs_thread());
        assert_eq!(q.stats(), (2, 0));
        assert_eq!(q.pop(None), Pop::Item(1, Depth { queued: 1, idle: 0 }));
        assert_eq!(q.pop(Some(Duration::ZERO)), Pop::Item(2, Depth { queued: 0, idle: 0 }));
        assert_eq!(q.pop(Some(Duration::from_millis(20))), Pop::TimedOut);
    }

    #[test]
    fn try_pop_never_waits_nor_counts_as_idle() {
        let q = Queue::new(2);
        assert_eq!(q.try_pop(), Pop::TimedOut);
        q.push(1, None).unwrap();
        q.push(2, None).unwrap();
        assert_eq!(q.try_pop(), Pop::Item(1, Depth { queued: 1, idle: 0 }));
        q.close();
        assert_eq!(q.try_pop(), Pop::Item(2, Depth { queued: 0, idle: 0 }));
        assert_eq!(q.try_pop(), Pop::Closed);
        assert_eq!(q.stats(), (0, 0));
    }

    #[test]
    fn idle_consumers_are_counted() {
        let q = Arc::new(Queue::new(4));
        let q2 = q.clone();
        let t = thread::spawn(move || q2.pop(None));
        while q.stats().1 == 0 {
            thread::yield_now();
        }
        let pushed = q.push(7, None).unwrap();
        assert_eq!(pushed, Depth { queued: 1, idle: 1 });
        assert!(!pushed.needs_thread(), "the waiting consumer will take it");
        assert!(matches!(t.join().unwrap(), Pop::Item(7, _)));
        assert_eq!(q.stats(), (0, 0));
    }

    #[test]
    fn push_blocks_when_full_until_a_pop() {
        let q = Arc::new(Queue::new(2));
        q.push(1, None).unwrap();
        q.push(2, None).unwrap();
        assert_eq!(q.full_waits(), 0);
        assert_eq!(q.push(9, Some(Duration::from_millis(10))), Err(PushError::Full(9)));
        assert_eq!(q.full_waits(), 1, "a push that found no room is counted");
        let q2 = q.clone();
        let t = thread::spawn(move || q2.push(3, None).map(|p| p.queued));
        thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "push must wait while the queue is full");
        assert!(matches!(q.pop(None), Pop::Item(1, _)));
        assert_eq!(t.join().unwrap(), Ok(2));
        assert_eq!(q.full_waits(), 2);
        assert!(matches!(q.pop(None), Pop::Item(2, _)));
        q.push(4, None).unwrap();
        assert_eq!(q.full_waits(), 2, "a push with room is not a wait");
    }

    /// A timeout is a bound on the wait, not a poll: a pop or push with
    /// time left is still waiting when the other side acts. (The helper
    /// acts once the waiter is seen waiting, so no timing is assumed.)
    #[test]
    fn timed_waits_last_until_the_other_side_acts() {
        let q = Arc::new(Queue::new(1));
        let q2 = q.clone();
        // Bounded, so a broken pop fails the test instead of hanging it.
        let seen = |f: &dyn Fn() -> bool| {
            let give_up = Instant::now() + Duration::from_secs(10);
            while !f() && Instant::now() < give_up {
                thread::yield_now();
            }
        };
        let pusher = thread::spawn(move || {
            seen(&|| q2.stats().1 > 0);
            q2.push(7, None)
        });
        assert!(matches!(q.pop(Some(Duration::from_secs(30))), Pop::Item(7, _)));
        pusher.join().unwrap().unwrap();

        q.push(1, None).unwrap();
        let q2 = q.clone();
        let popper = thread::spawn(move || {
            seen(&|| q2.full_waits() > 0);
            q2.pop(None)
        });
        assert!(q.push(2, Some(Duration::from_secs(30))).is_ok(), "a timed push waits for room");
        assert!(matches!(popper.join().unwrap(), Pop::Item(1, _)));
        assert!(matches!(q.pop(Some(Duration::ZERO)), Pop::Item(2, _)));
        // And with nobody acting, each waits its whole timeout (a lower
        // bound: a loaded machine only makes the wait longer).
        let t = Instant::now();
        assert!(matches!(q.pop(Some(Duration::from_millis(50))), Pop::TimedOut));
        assert!(t.elapsed() >= Duration::from_millis(50), "pop gave up after {:?}", t.elapsed());
        q.push(3, None).unwrap();
        let t = Instant::now();
        assert_eq!(q.push(4, Some(Duration::from_millis(50))), Err(PushError::Full(4)));
        assert!(t.elapsed() >= Duration::from_millis(50), "push gave up after {:?}", t.elapsed());
    }

    /// A woken consumer may find its item already taken (a `try_pop` or a
    /// consumer that never slept got there first). An untimed pop then
    /// waits again: only a timed one may report `TimedOut`. Repeated, since
    /// who wins the lock after the wake-up is up to the scheduler.
    #[test]
    fn a_consumer_robbed_of_its_wake_up_waits_again() {
        let q = Arc::new(Queue::new(4));
        for i in 0..200 {
            let q2 = q.clone();
            let a = thread::spawn(move || q2.pop(None));
            let give_up = Instant::now() + Duration::from_secs(10);
            while q.stats().1 == 0 && Instant::now() < give_up {
                thread::yield_now();
            }
            q.push(i, None).unwrap();
            if let Pop::Item(..) = q.try_pop() {
                q.push(i + 1000, None).unwrap(); // robbed: give it another
            }
            assert!(matches!(a.join().unwrap(), Pop::Item(..)), "round {i}: an untimed pop gave up");
        }
        // The same, made certain: a wake-up with nothing queued (what a
        // robbed or spurious wake-up looks like to the sleeper). The pop
        // must still be waiting 200 ms later, and then take the item.
        let q2 = q.clone();
        let a = thread::spawn(move || q2.pop(None));
        let give_up = Instant::now() + Duration::from_secs(10);
        while q.stats().1 == 0 && Instant::now() < give_up {
            thread::yield_now();
        }
        q.not_empty.notify_all();
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until && !a.is_finished() {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(!a.is_finished(), "an untimed pop returned after an empty wake-up");
        q.push(7, None).unwrap();
        assert!(matches!(a.join().unwrap(), Pop::Item(7, _)));
    }

    #[test]
    fn close_serves_what_was_queued_then_reports_closed() {
        let q = Queue::new(4);
        q.push("a", None).unwrap();
        q.close();
        assert_eq!(q.push("b", None), Err(PushError::Closed("b")));
        assert_eq!(q.pop(None), Pop::Item("a", Depth { queued: 0, idle: 0 }));
        assert_eq!(q.pop(None), Pop::Closed);
    }

    #[test]
    fn close_wakes_blocked_consumers_and_producers() {
        let q = Arc::new(Queue::<u32>::new(1));
        q.push(0, None).unwrap();
        let pusher = {
            let q = q.clone();
            thread::spawn(move || q.push(1, None))
        };
        thread::sleep(Duration::from_millis(20));
        assert_eq!(q.close_and_take(), vec![0]);
        assert_eq!(pusher.join().unwrap(), Err(PushError::Closed(1)));
        let popper = {
            let q = q.clone();
            thread::spawn(move || q.pop(None))
        };
        assert_eq!(popper.join().unwrap(), Pop::Closed);
    }

    #[test]
    fn many_producers_and_consumers_lose_nothing() {
        let q = Arc::new(Queue::new(8));
        let sum = Arc::new(AtomicUsize::new(0));
        let consumers: Vec<_> = (0..4)
            .map(|_| {
                let (q, sum) = (q.clone(), sum.clone());
                thread::spawn(move || {
                    while let Pop::Item(v, _) = q.pop(None) {
                        sum.fetch_add(v, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let q = q.clone();
                thread::spawn(move || (0..1000).for_each(|i| q.push(p * 1000 + i, None).map(|_| ()).unwrap()))
            })
            .collect();
        // Bounded: a lost wake-up (a close that wakes one waiter, a push
        // that wakes nobody) fails the test instead of hanging it.
        let give_up = Instant::now() + Duration::from_secs(60);
        let all_done = |ts: &[thread::JoinHandle<()>]| {
            while !ts.iter().all(|t| t.is_finished()) {
                assert!(Instant::now() < give_up, "a thread is still blocked after 60 s: a lost wake-up");
                thread::sleep(Duration::from_millis(5));
            }
        };
        all_done(&producers);
        producers.into_iter().for_each(|t| t.join().unwrap());
        q.close();
        all_done(&consumers);
        consumers.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(sum.load(Ordering::Relaxed), (0..4000).sum::<usize>());
    }
}
