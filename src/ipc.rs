//! The channel between the master and one worker, and everything that
//! crosses it.
//!
//! A `SOCK_SEQPACKET` Unix socketpair: every message arrives whole or not at
//! all, so the master can offer a batch of connections without blocking and,
//! if the worker's socket is full, keep them and try another worker: a
//! `sendmsg` that fails with EAGAIN transferred nothing. Connections travel
//! as fds in SCM_RIGHTS control data, up to [`MAX_FDS_PER_MESSAGE`] per
//! message, so one wakeup of the worker's receiver can carry many accepts.
//!
//! EOF on the channel tells a worker its master is gone (with
//! PR_SET_PDEATHSIG as the second line of defence).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg, setsockopt,
    socketpair, sockopt,
};
use nix::sys::time::TimeVal;

use crate::scoreboard::Charge;
use crate::sys;

/// Connections per message. The kernel caps SCM_RIGHTS at 253 fds
/// (SCM_MAX_FD); a round number below it keeps the control buffer small.
pub const MAX_FDS_PER_MESSAGE: usize = 128;

/// The kernel's cap on fds in one SCM_RIGHTS message.
const SCM_MAX_FD: usize = 253;

/// What the master tells a worker. The one type of everything that crosses
/// the channel in that direction, as nginx's channel commands.
#[derive(Debug)]
pub enum Command {
    /// Serve these accepted client connections, each with where its client
    /// address comes from (for per-address accounting).
    Serve(Vec<(OwnedFd, Origin)>),
    /// Stop taking connections; let open ones finish for `timeout`, then
    /// close them and exit. Sent on graceful stop, reload and scale-down.
    Drain { timeout: Duration },
    /// Close everything now and exit (fast stop).
    Quit,
}

/// Who a connection's client is, as far as the master knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The peer itself; the master checked `max_connections_per_ip` and
    /// charged the peer's address to the worker's table: this entry, which
    /// the worker discharges when the connection ends (it never reads or
    /// writes the entry's address: the master owns it).
    Direct(Charge),
    /// From a PROXY protocol listener: the peer is a balancer, the client is
    /// in a header the worker reads first. Nothing is charged yet; the
    /// worker checks and charges the real address (worker::proxied).
    Proxied,
}

/// `Origin::Proxied` on the wire, where entry indexes (below 2^31: a slot
/// has at most 2^31 entries) go.
const WIRE_PROXIED: u32 = u32::MAX;
/// Bytes per connection in a Serve message's payload.
const WIRE_ORIGIN: usize = 4;

impl Origin {
    fn to_wire(self) -> u32 {
        match self {
            Origin::Direct(Charge(entry)) => entry,
            Origin::Proxied => WIRE_PROXIED,
        }
    }

    fn from_wire(v: u32) -> Origin {
        if v == WIRE_PROXIED { Origin::Proxied } else { Origin::Direct(Charge(v)) }
    }
}

/// What a worker tells the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// Threads are up and the worker serves; the master may count it as
    /// capacity (and tell systemd READY=1 once all are).
    Ready,
    /// A connection finished while the master had paused accepting for lack
    /// of capacity: re-read the scoreboard (the room itself is there, not in
    /// this notice) and accept again if a worker has some.
    RecheckRoom,
}

const TAG_SERVE: u8 = 1;
const TAG_DRAIN: u8 = 2;
const TAG_QUIT: u8 = 3;
const TAG_READY: u8 = 16;
const TAG_RECHECK_ROOM: u8 = 17;

/// What a blocking receive on the worker side produced.
#[derive(Debug)]
pub enum Received {
    Command(Command),
    /// The receive timeout passed with nothing to read (heartbeat tick).
    Idle,
    /// The master closed its end (it exited).
    Closed,
    /// A `Serve` the kernel could not deliver whole (MSG_CTRUNC: this
    /// process is out of fds). `conns` arrived; the kernel closed the
    /// others, whose origins are `lost`: their clients see the connection
    /// end, and the worker must still count each one as finished.
    Truncated {
        conns: Vec<(OwnedFd, Origin)>,
        lost: Vec<Origin>,
    },
}

/// One end of a master–worker channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair: (master end, worker end), both CLOEXEC.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Rebuilds a channel from an fd this process owns (after moving it).
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Makes blocking receives return [`Received::Idle`] after `every`, so
    /// the worker's receiver can tick its heartbeat while nothing arrives.
    pub fn set_receive_timeout(&self, every: Duration) -> io::Result<()> {
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &TimeVal::new(every.as_secs() as _, every.subsec_micros() as _))?;
        Ok(())
    }

    /// Master side: offers connections to the worker without blocking.
    ///
    /// On success the worker holds its own copies and the caller should drop
    /// (close) its ones. `WouldBlock` means the worker's socket is full and
    /// nothing was sent: the caller still owns every fd.
    pub fn send_serve(&self, conns: &[(BorrowedFd<'_>, Origin)]) -> io::Result<()> {
        debug_assert!(!conns.is_empty() && conns.len() <= MAX_FDS_PER_MESSAGE);
        let raw: Vec<RawFd> = conns.iter().map(|(f, _)| f.as_raw_fd()).collect();
        let mut payload = Vec::with_capacity(1 + WIRE_ORIGIN * conns.len());
        payload.push(TAG_SERVE);
        for (_, origin) in conns {
            payload.extend_from_slice(&origin.to_wire().to_le_bytes());
        }
        let cmsg = [ControlMessage::ScmRights(&raw)];
        self.send(&payload, &cmsg)
    }

    /// Master side: sends a control command (not `Serve`).
    pub fn send_command(&self, cmd: &Command) -> io::Result<()> {
        match cmd {
            Command::Serve(conns) => {
                let borrowed: Vec<(BorrowedFd, Origin)> = conns.iter().map(|(f, o)| (f.as_fd(), *o)).collect();
                self.send_serve(&borrowed)
            }
            Command::Drain { timeout } => {
                let mut msg = [0u8; 9];
                msg[0] = TAG_DRAIN;
                msg[1..].copy_from_slice(&(timeout.as_millis() as u64).to_le_bytes());
                self.send(&msg, &[])
            }
            Command::Quit => self.send(&[TAG_QUIT], &[]),
        }
    }

    /// Worker side: tells the master something, never blocking (a notice
    /// that does not fit is dropped; the master has a timer fallback).
    pub fn send_notice(&self, notice: Notice) -> io::Result<()> {
        let tag = match notice {
            Notice::Ready => TAG_READY,
            Notice::RecheckRoom => TAG_RECHECK_ROOM,
        };
        self.send(&[tag], &[])
    }

    fn send(&self, payload: &[u8], cmsgs: &[ControlMessage]) -> io::Result<()> {
        let iov = [IoSlice::new(payload)];
        loop {
            match sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL, None)
            {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Worker side: waits for the next command (up to the receive timeout).
    pub fn recv_command(&self) -> io::Result<Received> {
        // Room for the kernel's most (SCM_MAX_FD), not only ours: origins
        // beyond the fds that fit are still read, and counted as lost.
        let mut payload = [0u8; 1 + WIRE_ORIGIN * SCM_MAX_FD];
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
        let mut iov = [IoSliceMut::new(&mut payload)];
        let (len, truncated, mut fds) = loop {
            match recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => {
                    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                    let mut fds = Vec::new();
                    // nix refuses to walk control data marked truncated
                    // (ENOBUFS); what the kernel did install is read below.
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for cmsg in cmsgs {
                            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                                fds.extend(raw);
                            }
                        }
                    }
                    break (msg.bytes, truncated, fds);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Ok(Received::Idle),
                Err(e) => return Err(e.into()),
            }
        };
        if truncated {
            // This process is out of fds (EMFILE), or was sent more than it
            // has room for: the kernel installed the first connections of
            // the message and closed the rest. Those it installed are ours
            // all the same, and must not leak.
            fds = rights_in_truncated(&cmsg_space);
        }
        // The kernel just installed these fds in our table; nothing else
        // refers to them, so each gets exactly one owner.
        let fds: Vec<OwnedFd> = fds.into_iter().filter_map(sys::adopt_fd).collect();
        if len == 0 {
            return Ok(Received::Closed);
        }
        let command = match payload[0] {
            TAG_SERVE => {
                let mut origins = payload[1..len]
                    .chunks_exact(WIRE_ORIGIN)
                    .map(|b| Origin::from_wire(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                // The kernel installs in order and stops at the first fd it
                // cannot: the fds we got are the message's first ones. (An
                // fd without its origin cannot happen: one message carries
                // both; it would be served as charged to nothing.)
                let conns: Vec<(OwnedFd, Origin)> =
                    fds.into_iter().map(|fd| (fd, origins.next().unwrap_or(Origin::Direct(Charge::NONE)))).collect();
                if truncated {
                    return Ok(Received::Truncated { conns, lost: origins.collect() });
                }
                Command::Serve(conns)
            }
            TAG_DRAIN if len >= 9 => {
                let ms = u64::from_le_bytes(payload[1..9].try_into().unwrap_or_default());
                Command::Drain { timeout: Duration::from_millis(ms) }
            }
            TAG_QUIT => Command::Quit,
            tag => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown command tag {tag}")));
            }
        };
        Ok(Received::Command(command))
    }

    /// Master side: reads one notice without blocking. `Ok(None)` when there
    /// is none; `Err(UnexpectedEof)` when the worker's end is closed.
    pub fn try_recv_notice(&self) -> io::Result<Option<Notice>> {
        let mut buf = [0u8; 16];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let n = loop {
            match recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, None, MsgFlags::MSG_DONTWAIT) {
                Ok(msg) => break msg.bytes,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        };
        match (n, buf[0]) {
            (0, _) => Err(io::ErrorKind::UnexpectedEof.into()),
            (_, TAG_READY) => Ok(Some(Notice::Ready)),
            (_, TAG_RECHECK_ROOM) => Ok(Some(Notice::RecheckRoom)),
            (_, tag) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown notice tag {tag}"))),
        }
    }
}

/// The fds of the SCM_RIGHTS message at the start of `control`, a control
/// buffer the kernel marked truncated (which nix will not walk). The kernel
/// writes a whole header for the fds it installed (CMSG_LEN of their
/// count; nothing when it installed none, and the buffer starts zeroed),
/// laid out as `struct cmsghdr { size_t len; int level; int type; }`.
fn rights_in_truncated(control: &[u8]) -> Vec<RawFd> {
    const WORD: usize = std::mem::size_of::<usize>();
    let header = std::mem::size_of::<libc::cmsghdr>();
    let int = |at: usize| control.get(at..at + 4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let Some(len) = control.get(..WORD).and_then(|b| b.try_into().ok()).map(usize::from_ne_bytes) else {
        return Vec::new();
    };
    if int(WORD) != Some(libc::SOL_SOCKET) || int(WORD + 4) != Some(libc::SCM_RIGHTS) || len < header {
        return Vec::new();
    }
    let count = (len.min(control.len()) - header) / 4;
    (0..count).filter_map(|k| int(header + 4 * k)).collect()
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_and_commands_cross_the_channel() {
        let (master, worker) = Channel::pair().unwrap();
        worker.set_receive_timeout(Duration::from_millis(50)).unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let (_c, d) = UnixStream::pair().unwrap();
        master.send_serve(&[(b.as_fd(), Origin::Direct(Charge(4242))), (d.as_fd(), Origin::Proxied)]).unwrap();
        drop(b); // the master closes its copy after sending
        let Received::Command(Command::Serve(conns)) = worker.recv_command().unwrap() else { panic!("no Serve") };
        assert_eq!(conns.iter().map(|(_, o)| *o).collect::<Vec<_>>(), [Origin::Direct(Charge(4242)), Origin::Proxied]);
        let (fd, _) = conns.into_iter().next().unwrap();
        let mut passed = UnixStream::from(fd);
        passed.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");

        master.send_command(&Command::Drain { timeout: Duration::from_millis(1500) }).unwrap();
        match worker.recv_command().unwrap() {
            Received::Command(Command::Drain { timeout }) => {
                assert_eq!(timeout, Duration::from_millis(1500))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(worker.recv_command().unwrap(), Received::Idle));

        assert_eq!(master.try_recv_notice().unwrap(), None);
        worker.send_notice(Notice::Ready).unwrap();
        assert_eq!(master.try_recv_notice().unwrap(), Some(Notice::Ready));
        drop(master);
        assert!(matches!(worker.recv_command().unwrap(), Received::Closed));
    }

    /// More fds than the receiver has room for: the kernel installs the
    /// first ones and drops the rest (MSG_CTRUNC, as when the worker is out
    /// of fds). The ones installed are delivered with their own origins,
    /// the rest are reported lost, not turned into an error.
    #[test]
    fn a_truncated_serve_delivers_what_arrived_and_names_what_was_lost() {
        let (master, worker) = Channel::pair().unwrap();
        let n = MAX_FDS_PER_MESSAGE + 3;
        let pairs: Vec<(UnixStream, UnixStream)> = (0..n).map(|_| UnixStream::pair().unwrap()).collect();
        let raw: Vec<RawFd> = pairs.iter().map(|(_, b)| b.as_raw_fd()).collect();
        let mut payload = vec![TAG_SERVE];
        for i in 0..n {
            payload.extend_from_slice(&Origin::Direct(Charge(i as u32)).to_wire().to_le_bytes());
        }
        master.send(&payload, &[ControlMessage::ScmRights(&raw)]).unwrap();
        let Received::Truncated { conns, lost } = worker.recv_command().unwrap() else { panic!("not truncated") };
        let got: Vec<Origin> = conns.iter().map(|(_, o)| *o).collect();
        let direct = |i: usize| Origin::Direct(Charge(i as u32));
        assert_eq!(got, (0..MAX_FDS_PER_MESSAGE).map(direct).collect::<Vec<_>>());
        assert_eq!(lost, (MAX_FDS_PER_MESSAGE..n).map(direct).collect::<Vec<_>>());
        // And each delivered fd is the connection its origin names.
        let (fd, _) = conns.into_iter().nth(5).unwrap();
        UnixStream::from(fd).write_all(b"5").unwrap();
        let mut got = [0u8; 1];
        (&pairs[5].0).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"5");
    }

    #[test]
    fn a_full_channel_keeps_the_fds_with_the_sender() {
        let (master, _worker) = Channel::pair().unwrap();
        let (_a, b) = UnixStream::pair().unwrap();
        let mut sent = 0;
        let err = loop {
            match master.send_serve(&[(b.as_fd(), Origin::Direct(Charge(0)))]) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1_000_000, "channel never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // b is still ours and usable.
        assert!(b.peer_addr().is_ok());
    }
}
