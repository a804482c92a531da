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
    /// of capacity: accept again.
    SlotFreed,
}

const TAG_SERVE: u8 = 1;
const TAG_DRAIN: u8 = 2;
const TAG_QUIT: u8 = 3;
const TAG_READY: u8 = 16;
const TAG_SLOT_FREED: u8 = 17;

/// What a blocking receive on the worker side produced.
#[derive(Debug)]
pub enum Received {
    Command(Command),
    /// The receive timeout passed with nothing to read (heartbeat tick).
    Idle,
    /// The master closed its end (it exited).
    Closed,
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
            Notice::SlotFreed => TAG_SLOT_FREED,
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
        let mut payload = [0u8; 1 + WIRE_ORIGIN * MAX_FDS_PER_MESSAGE];
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
        let mut iov = [IoSliceMut::new(&mut payload)];
        let msg = loop {
            match recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => break msg,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Ok(Received::Idle),
                Err(e) => return Err(e.into()),
            }
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // The kernel just installed these fds in our table; nothing
                // else refers to them, so each gets exactly one owner.
                fds.extend(raw.into_iter().filter_map(sys::adopt_fd));
            }
        }
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        let len = msg.bytes;
        if len == 0 {
            return Ok(Received::Closed);
        }
        if truncated {
            // Happens when this process is out of fds (EMFILE): the kernel
            // drops the connections it could not install. The master sizes
            // capacity from RLIMIT_NOFILE so this should not occur.
            log::error!("channel: control data truncated: some connections were lost (out of file descriptors?)");
        }
        let command = match payload[0] {
            TAG_SERVE => {
                let origins = payload[1..len]
                    .chunks_exact(WIRE_ORIGIN)
                    .map(|b| Origin::from_wire(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                // An fd without its origin (cannot happen: one message
                // carries both) is served as charged to nothing.
                let none = std::iter::repeat(Origin::Direct(Charge::NONE));
                Command::Serve(fds.into_iter().zip(origins.chain(none)).collect())
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
            (_, TAG_SLOT_FREED) => Ok(Some(Notice::SlotFreed)),
            (_, tag) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unknown notice tag {tag}"))),
        }
    }
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
