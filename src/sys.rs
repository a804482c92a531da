//! The operating-system calls that Rust cannot check for us.
//!
//! Every `unsafe` block of echod lives in this module, each with the argument
//! for why it is sound. The rest of the crate calls the safe wrappers below.
//! Keeping them together makes the process-model assumptions (single-threaded
//! master at fork time, fds owned by nobody after `close_range`) reviewable in
//! one sitting.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64};

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::unistd::{ForkResult, Pid};

/// Which side of a `fork` we are on.
pub enum Forked {
    Parent(Pid),
    Child,
}

/// Forks the calling process.
///
/// Only the master calls this, and the master never starts a thread (rule 1
/// of DESIGN.md), so no lock can be held by a thread that the child lacks.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: fork is unsafe because a multi-threaded parent may leave locks
    // (malloc, stdio, logger) held forever in the child. The master is
    // single-threaded by construction: it never spawns threads (it uses one
    // mio Poll and drives every timer from the poll timeout), and signal-hook
    // delivers signals through a self-pipe instead of a thread.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        ForkResult::Child => Ok(Forked::Child),
    }
}

/// Atomics that can live in memory shared between processes.
///
/// Sealed: only the integer atomics, whose all-zero bit pattern is a valid
/// value and which hold no pointers, are allowed.
pub trait SharedAtomic: sealed::Sealed + Sync + 'static {}
impl SharedAtomic for AtomicU64 {}
impl SharedAtomic for AtomicU32 {}
mod sealed {
    pub trait Sealed {}
    impl Sealed for std::sync::atomic::AtomicU64 {}
    impl Sealed for std::sync::atomic::AtomicU32 {}
}

/// MAP_NORESERVE: the scoreboard's per-address tables reserve room for
/// every slot a reload could use (MBs per slot in event mode), of which
/// only the occupied slots' pages are ever touched; without it the whole
/// reservation would be charged against the commit limit up front.
const SHARED_FLAGS: MapFlags = MapFlags::MAP_SHARED.union(MapFlags::MAP_NORESERVE);

/// Maps `len` zeroed atomics in an anonymous `MAP_SHARED` region.
///
/// Created by the master before it forks, the region is the same physical
/// memory in every worker: the scoreboard. It is never unmapped, so the
/// returned slice is `'static` in every process that inherits it.
pub fn shared_zeroed<T: SharedAtomic>(len: usize) -> io::Result<&'static [T]> {
    let bytes = len
        .checked_mul(size_of::<T>())
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty shared region"))?;
    // SAFETY: an anonymous mapping has no file behind it; the kernel returns
    // page-aligned (so suitably aligned for T), zero-filled memory of the
    // requested size, or an error.
    let ptr = unsafe { mmap_anonymous(None, bytes, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, SHARED_FLAGS) }?;
    // SAFETY: the region is `len * size_of::<T>()` bytes, aligned and zeroed;
    // zero is a valid value of every SharedAtomic type; the mapping is never
    // unmapped so the lifetime is 'static; atomics make concurrent access from
    // several threads and processes data-race free.
    Ok(unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<T>(), len) })
}

/// Takes ownership of an fd the process got from outside Rust (systemd's
/// LISTEN_FDS, or SCM_RIGHTS control data).
///
/// Returns `None` for a negative number. The caller must know that nothing
/// else owns `fd`; both callers do (see their comments).
pub fn adopt_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: callers pass fds that the kernel just installed for us
    // (recvmsg's SCM_RIGHTS) or that systemd passed at exec time
    // (LISTEN_FDS, checked against LISTEN_PID); no Rust object owns them yet.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the signals a worker must not act on to SIG_IGN, replacing the
/// handlers the master installed before it forked.
///
/// Why: signal-hook's handler writes to the master's self-pipe. The worker
/// closes that pipe, so the fd number may later belong to a client
/// connection; a stray signal must never write into it. Workers act only on
/// what the master says over the channel (DESIGN.md, section 2).
pub fn ignore_signals(signals: &[Signal]) -> io::Result<()> {
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    for &sig in signals {
        // SAFETY: installing SIG_IGN runs no code in signal context, so none
        // of sigaction's async-signal-safety hazards apply.
        unsafe { sigaction(sig, &ignore) }?;
    }
    Ok(())
}

/// Restores the default disposition of `sig` (used for SIGCHLD in workers,
/// which inherit the master's handler).
pub fn default_signal(sig: Signal) -> io::Result<()> {
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: as above, SIG_DFL runs no code of ours.
    unsafe { sigaction(sig, &dfl) }?;
    Ok(())
}

/// Closes every fd from `first` upwards.
///
/// A freshly forked worker holds copies of everything the master had open:
/// listeners, the epoll fd, the signal pipe, other workers' channels, metrics
/// connections. It keeps only stdio and its own channel (moved below `first`
/// by the caller), so the kernel, not a list we might forget to update,
/// decides what is closed (rule 2 of DESIGN.md).
pub fn close_fds_from(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors. The Rust objects in the
    // child that owned them (inherited copies of the master's state) are
    // never used or dropped afterwards: the worker entry point never returns
    // and exits with `process::exit`, which runs no destructors.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, 0) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Moves `fd` to number `target` (dup2 + close of the old number), keeping
/// CLOEXEC, and returns the new owner.
pub fn move_fd(fd: OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    if fd.as_raw_fd() == target {
        return Ok(fd);
    }
    // SAFETY: dup3 onto `target` silently closes whatever was there; callers
    // use it in a fresh child before `close_fds_from(target + 1)`, where the
    // only live object at `target` (if any) is an inherited copy that will
    // never be used. The returned number is owned by the new OwnedFd alone.
    let rc = unsafe { libc::dup3(fd.as_raw_fd(), target, libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(fd);
    adopt_fd(rc).ok_or_else(io::Error::last_os_error)
}

/// Rewrites the process title shown by `ps` (argv[0] area) and the kernel's
/// `comm` name, as nginx and PostgreSQL do: `echod: worker 2`.
///
/// The argv strings live in a writable region the kernel reports in
/// /proc/self/stat (`arg_start`, `arg_end`). The title is truncated to fit.
pub fn set_process_title(title: &str) {
    if let Ok(name) = std::ffi::CString::new(title.as_bytes().iter().take(15).copied().collect::<Vec<u8>>()) {
        let _ = nix::sys::prctl::set_name(&name);
    }
    let Some((start, end)) = argv_area() else {
        return;
    };
    let len = end.saturating_sub(start);
    if len < 2 {
        return;
    }
    let mut bytes = vec![0u8; len];
    let n = title.len().min(len - 1);
    bytes[..n].copy_from_slice(&title.as_bytes()[..n]);
    // SAFETY: [start, end) is this process's own argv string area as reported
    // by the kernel: mapped, writable (it is on the initial stack) and not
    // aliased by any Rust reference. std keeps pointers into it for
    // `std::env::args`, which workers never call after this; they would read
    // the new title, still NUL-terminated (bytes[len-1] stays 0).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), start as *mut u8, len) };
}

/// `arg_start` and `arg_end` from /proc/self/stat (fields 48 and 49).
fn argv_area() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The comm field may contain spaces; fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state), so field N is fields[N - 3].
    let start = fields.get(48 - 3)?.parse().ok()?;
    let end = fields.get(49 - 3)?.parse().ok()?;
    (start != 0 && end > start).then_some((start, end))
}

/// Puts the calling thread under SCHED_BATCH.
///
/// A batch thread does not preempt the running thread when it is woken; it
/// waits for the current one to block. Handler threads block after every
/// echo anyway, so this costs them no latency worth measuring and spares the
/// kernel a reschedule (an IPI, in a VM an exit) per message.
pub fn set_batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 means the calling thread; `param` is a valid, initialised
    // sched_param that outlives the call; the kernel only reads it.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Replaces the process image with `path`, passing `fds` as 3, 4, ... (the
/// LISTEN_FDS convention) and nothing else: every other fd of the master is
/// CLOEXEC (rule 2). Returns only on failure.
///
/// Called in a freshly forked child of the single-threaded master (binary
/// upgrade), which owns nothing it must keep: the fd numbers it overwrites
/// belong to inherited copies of the master's objects, never used again.
pub fn exec_with_fds(
    path: &std::path::Path,
    args: &[std::ffi::OsString],
    env: &[std::ffi::OsString],
    fds: &[RawFd],
) -> io::Error {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cstr =
        |s: &std::ffi::OsStr| CString::new(s.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (path, args, env) = match (
        cstr(path.as_os_str()),
        args.iter().map(|a| cstr(a)).collect::<io::Result<Vec<_>>>(),
        env.iter().map(|e| cstr(e)).collect::<io::Result<Vec<_>>>(),
    ) {
        (Ok(p), Ok(a), Ok(e)) => (p, a, e),
        _ => return io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path, argument or environment"),
    };
    let first = 3;
    let above = first + fds.len() as RawFd;
    // Two steps, so that moving one fd never overwrites another still to be
    // moved: first copy each above the target range, then onto its place.
    let mut staged = Vec::with_capacity(fds.len());
    for &fd in fds {
        // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor and touches no
        // existing one.
        let rc = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
        if rc < 0 {
            return io::Error::last_os_error();
        }
        staged.push(rc);
    }
    for (i, &fd) in staged.iter().enumerate() {
        // SAFETY: dup2 onto 3 + i closes whatever held that number: in this
        // child, an inherited copy of a master object that is never used
        // again (see the function doc). The new number is not CLOEXEC, so it
        // survives the exec; the staged copy is, so it does not.
        if unsafe { libc::dup2(fd, first + i as RawFd) } < 0 {
            return io::Error::last_os_error();
        }
    }
    match nix::unistd::execve(&path, &args, &env) {
        Err(e) => io::Error::from(e),
        Ok(never) => match never {},
    }
}

/// A handler thread's echo buffer in its own anonymous mapping.
///
/// Why not a `Vec`: glibc serves a 16 KiB allocation from a heap arena, and
/// `calloc` clears memory that a retired thread's buffer used before, so
/// every buffer ends up fully resident, 16 KiB per connection even when
/// clients send 64 bytes. A fresh mapping costs a page only once the kernel
/// writes into it: a connection that echoes small messages holds one page.
pub struct PageBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone (never shared or
// aliased), so moving it to another thread is as safe as moving a Vec.
unsafe impl Send for PageBuffer {}

impl PageBuffer {
    pub fn new(len: usize) -> io::Result<PageBuffer> {
        let size = NonZeroUsize::new(len).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty buffer"))?;
        // SAFETY: an anonymous private mapping has no file behind it and
        // aliases nothing; the kernel returns zero-filled, page-aligned
        // memory of `len` bytes or an error.
        let ptr =
            unsafe { mmap_anonymous(None, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_PRIVATE) }?;
        Ok(PageBuffer { ptr: ptr.cast(), len })
    }
}

impl std::ops::Deref for PageBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes owned by
        // self; the shared borrow of self prevents a concurrent `&mut`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for PageBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and the exclusive borrow of self makes this
        // the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this address and
        // length and no reference to it outlives self.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

/// Adds one to `counter` on every delivery of `sig`, in signal context.
///
/// signal-hook's pipe reports a signal once per pass however many times it
/// arrived; this counts each delivery (TTIN x 4 is four workers more).
/// Registered before the pipe's own action, it runs first on each delivery
/// (signal-hook runs actions in the order of registration), so a count is
/// always in place by the time the loop is woken for it.
pub fn count_deliveries(sig: i32, counter: std::sync::Arc<std::sync::atomic::AtomicUsize>) -> io::Result<()> {
    // SAFETY: the action runs in signal context, so it must be
    // async-signal-safe: it only does an atomic add on memory the moved Arc
    // keeps alive for as long as the action is registered (for the process's
    // life). No allocation, no lock, no errno change.
    unsafe {
        signal_hook::low_level::register(sig, move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
    }?;
    Ok(())
}

/// How full the stream behind `fd` is, as (bytes queued that its reader
/// has not taken, what it holds at most), for a pipe or a socket; None for
/// anything else (a file or a terminal, whose writes wait on no reader).
/// The connection log writes only while this leaves room for the daemon's
/// own log lines (`worker::access`).
/// `kind` is [`stream_kind`]'s answer for `fd`, asked once.
pub fn stream_fill(fd: std::os::fd::BorrowedFd, kind: StreamKind) -> Option<(usize, usize)> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let mut queued: libc::c_int = 0;
    if kind == StreamKind::Pipe {
        // SAFETY: FIONREAD writes one c_int through the pointer, which
        // points at a live c_int of ours; `raw` is borrowed, so open.
        let rc = unsafe { libc::ioctl(raw, libc::FIONREAD, &mut queued) };
        // SAFETY: F_GETPIPE_SZ takes no argument and only reads the fd.
        let size = unsafe { libc::fcntl(raw, libc::F_GETPIPE_SZ) };
        (rc == 0 && size > 0).then(|| (queued.max(0) as usize, size as usize))
    } else if kind == StreamKind::Socket {
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int, as above.
        let rc = unsafe { libc::ioctl(raw, libc::TIOCOUTQ, &mut queued) };
        let size = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SndBuf).ok()?;
        (rc == 0).then(|| (queued.max(0) as usize, size))
    } else {
        None
    }
}

/// What an fd writes to, as far as [`stream_fill`] cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Pipe,
    Socket,
    /// A file, a terminal: its writes wait on no reader.
    Other,
}

pub fn stream_kind(fd: std::os::fd::BorrowedFd) -> StreamKind {
    match nix::sys::stat::fstat(fd).map(|st| st.st_mode & libc::S_IFMT) {
        Ok(libc::S_IFIFO) => StreamKind::Pipe,
        Ok(libc::S_IFSOCK) => StreamKind::Socket,
        _ => StreamKind::Other,
    }
}
