//! The master's listening sockets.
//!
//! Bound with socket2: SO_REUSEADDR (restart without waiting out TIME_WAIT),
//! IPV6_V6ONLY on IPv6 addresses (so `[::]:7` and `0.0.0.0:7` can both be
//! listed), the configured backlog, non-blocking and close-on-exec. Sockets
//! passed by systemd (LISTEN_FDS) are used as they are and survive reloads.
//!
//! Per-connection options are set once here, on the listener, because Linux
//! copies them to every accepted socket: TCP_NODELAY and SO_SNDTIMEO. The
//! latter bounds only the blocking write-back of bytes that came with a
//! PROXY header (`worker::proxied`); echoes measure `write_timeout` as time
//! since the last byte the kernel took, in both handlers (`worker::echo`,
//! `worker::event`). Workers thus serve a connection without a setsockopt. The idle
//! timeout is *not* SO_RCVTIMEO: see `worker::pool::ConnSlot` for why.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use socket2::{Domain, Protocol, Socket, Type};

use super::tokens::Source;
use crate::config::Config;

/// One listening socket.
pub struct Listener {
    /// Stable id (poll token), unique for the master's life.
    pub id: usize,
    /// The address as configured (port 0 stays 0), to match on reload.
    pub configured: Option<SocketAddr>,
    /// The address actually bound.
    pub addr: SocketAddr,
    pub socket: Socket,
    /// systemd's name for it (FileDescriptorName=), if systemd passed it.
    pub name: Option<String>,
    /// Its clients send a PROXY protocol header first (`proxy_protocol`).
    pub proxy: bool,
    /// Readable and not yet drained to WouldBlock (edge-triggered poll).
    pub ready: bool,
}

/// All listening sockets.
#[derive(Default)]
pub struct Listeners {
    list: Vec<Listener>,
    next_id: usize,
}

impl Listeners {
    /// Binds every address of `config`. On failure nothing stays bound.
    pub fn bind(config: &Config) -> Result<Listeners, (SocketAddr, io::Error)> {
        let mut listeners = Listeners::default();
        for &addr in &config.listen {
            let socket = bind(addr, config).map_err(|e| (addr, e))?;
            listeners.push(Some(addr), None, socket, config).map_err(|e| (addr, e))?;
        }
        Ok(listeners)
    }

    /// Uses the sockets an earlier master passed on (binary upgrade, or
    /// systemd's fd store across a restart) for the addresses `config` still
    /// lists, each matched by the address it was configured with or bound
    /// to; binds the others. Inherited sockets no longer listed are closed.
    pub fn inherit(
        inherited: Vec<(OwnedFd, Option<SocketAddr>)>,
        config: &Config,
    ) -> Result<Listeners, (SocketAddr, io::Error)> {
        let mut pool: Vec<(Socket, Option<SocketAddr>, SocketAddr)> = inherited
            .into_iter()
            .filter_map(|(fd, configured)| {
                let socket = Socket::from(fd);
                let local = socket.local_addr().ok()?.as_socket()?;
                Some((socket, configured, local))
            })
            .collect();
        let mut listeners = Listeners::default();
        for &addr in &config.listen {
            let socket = match pool.iter().position(|(_, conf, local)| *conf == Some(addr) || *local == addr) {
                Some(i) => {
                    let (socket, _, _) = pool.swap_remove(i);
                    let adopt = |s: &Socket| {
                        s.set_nonblocking(true)?;
                        configure(s, config)?;
                        s.listen(config.backlog as i32)
                    };
                    adopt(&socket).map_err(|e| (addr, e))?;
                    socket
                }
                None => bind(addr, config).map_err(|e| (addr, e))?,
            };
            listeners.push(Some(addr), None, socket, config).map_err(|e| (addr, e))?;
        }
        for (_, _, local) in pool {
            log::info!("inherited socket {local} is no longer in `listen`; closing it");
        }
        Ok(listeners)
    }

    /// What a binary upgrade passes on: each socket, the address it was
    /// configured with (None: from systemd) and systemd's name for it.
    pub fn handover(&self) -> Vec<(std::os::fd::RawFd, Option<SocketAddr>, Option<String>)> {
        self.list.iter().map(|l| (l.socket.as_raw_fd(), l.configured, l.name.clone())).collect()
    }

    /// The sockets this master bound (not systemd's socket unit's), for
    /// systemd's fd store.
    pub fn own_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.list.iter().filter(|l| l.configured.is_some()).map(|l| l.socket.as_fd()).collect()
    }

    /// Uses sockets passed by systemd (with their FileDescriptorName=)
    /// instead of binding.
    pub fn adopt(fds: Vec<(OwnedFd, String)>, config: &Config) -> io::Result<Listeners> {
        let mut listeners = Listeners::default();
        for (fd, name) in fds {
            let socket = Socket::from(fd);
            socket.set_nonblocking(true)?;
            configure(&socket, config)?;
            listeners.push(None, Some(name), socket, config)?;
        }
        Ok(listeners)
    }

    fn push(
        &mut self,
        configured: Option<SocketAddr>,
        name: Option<String>,
        socket: Socket,
        config: &Config,
    ) -> io::Result<()> {
        let addr = bound_addr(&socket)?;
        let proxy = config.proxy_protocol.covers(configured, addr, name.as_deref());
        self.list.push(Listener { id: self.next_id, configured, addr, socket, name, proxy, ready: true });
        self.next_id += 1;
        Ok(())
    }

    /// The listeners that expect a PROXY header, for the start-up log.
    pub fn proxied(&self) -> Vec<SocketAddr> {
        self.list.iter().filter(|l| l.proxy).map(|l| l.addr).collect()
    }

    /// Applies `proxy_protocol` of a reloaded config: connections accepted
    /// from now on follow it.
    fn set_proxy(&mut self, config: &Config) {
        for l in &mut self.list {
            let proxy = config.proxy_protocol.covers(l.configured, l.addr, l.name.as_deref());
            if proxy != l.proxy {
                let now = if proxy { "now expects" } else { "no longer expects" };
                log::info!("{} {now} a PROXY protocol header", l.addr);
            }
            l.proxy = proxy;
        }
        self.warn_unmatched_proxy(config);
    }

    /// Says so when a `proxy_protocol` entry names no listener (a socket
    /// name without socket activation, or a typo in one): its clients'
    /// headers would be echoed as data.
    pub fn warn_unmatched_proxy(&self, config: &Config) {
        if let crate::config::ProxyProtocol::Listeners(entries) = &config.proxy_protocol {
            for entry in entries {
                let one = crate::config::ProxyProtocol::Listeners(vec![entry.clone()]);
                if !self.list.iter().any(|l| one.covers(l.configured, l.addr, l.name.as_deref())) {
                    log::warn!("proxy_protocol entry `{entry}` matches no listener");
                }
            }
        }
    }

    pub fn token(l: &Listener) -> Token {
        Source::Listener(l.id).token()
    }

    pub fn register(&self, registry: &Registry) -> io::Result<()> {
        self.list.iter().try_for_each(|l| register(l, registry))
    }

    pub fn mark_ready(&mut self, id: usize) {
        if let Some(l) = self.list.iter_mut().find(|l| l.id == id) {
            l.ready = true;
        }
    }

    pub fn any_ready(&self) -> bool {
        self.list.iter().any(|l| l.ready)
    }

    pub fn ready_mut(&mut self) -> impl Iterator<Item = &mut Listener> {
        self.list.iter_mut().filter(|l| l.ready)
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.list.iter().map(|l| l.addr).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Stops accepting but keeps every socket open, so connects still
    /// queue in the backlog (a binary upgrade's new master takes them) and
    /// [`Listeners::resume`] can start again.
    pub fn pause(&mut self, registry: &Registry) {
        for l in &mut self.list {
            let _ = registry.deregister(&mut SourceFd(&l.socket.as_raw_fd()));
            l.ready = false;
        }
    }

    /// Accepts again after [`Listeners::pause`]. Marked ready: connections
    /// queued meanwhile raise no new edge.
    pub fn resume(&mut self, registry: &Registry) -> io::Result<()> {
        for l in &mut self.list {
            register(l, registry)?;
            l.ready = true;
        }
        Ok(())
    }

    /// Closes every listener (stopping): new clients are refused by the
    /// kernel from now on.
    pub fn close_all(&mut self, registry: &Registry) {
        for l in self.list.drain(..) {
            let _ = registry.deregister(&mut SourceFd(&l.socket.as_raw_fd()));
        }
    }

    /// Applies a reloaded config: binds addresses that are new, closes those
    /// no longer listed, re-applies options and backlog on the rest. All or
    /// nothing: if one new address cannot be bound, nothing changes.
    /// Systemd's sockets are kept as they are.
    pub fn reconcile(&mut self, config: &Config, registry: &Registry) -> Result<(), (SocketAddr, io::Error)> {
        if self.list.iter().any(|l| l.configured.is_none()) {
            // Socket-activated: systemd owns the addresses; `listen` is
            // ignored, as at start. Only the per-connection options change.
            for l in &self.list {
                configure(&l.socket, config).map_err(|e| (l.addr, e))?;
            }
            self.set_proxy(config);
            return Ok(());
        }
        // An address names an existing listener if it is what that listener
        // was configured with or what it is bound to (`:0` became a port).
        let names = |l: &Listener, a: &SocketAddr| l.configured == Some(*a) || l.addr == *a;
        // Everything that can fail comes first, and nothing that serves
        // changes until all of it succeeded: bind and register the new
        // sockets (undone on failure), then re-apply options.
        let mut fresh: Vec<Listener> = Vec::new();
        let undo = |fresh: &[Listener]| {
            for l in fresh {
                let _ = registry.deregister(&mut SourceFd(&l.socket.as_raw_fd()));
            }
        };
        for &addr in config.listen.iter().filter(|a| !self.list.iter().any(|l| names(l, a))) {
            let l = bind(addr, config).and_then(|socket| {
                let bound = bound_addr(&socket)?;
                let l = Listener {
                    id: self.next_id + fresh.len(),
                    configured: Some(addr),
                    addr: bound,
                    socket,
                    name: None,
                    proxy: config.proxy_protocol.covers(Some(addr), bound, None),
                    ready: true,
                };
                register(&l, registry)?;
                Ok(l)
            });
            match l {
                Ok(l) => fresh.push(l),
                Err(e) => {
                    undo(&fresh);
                    return Err((addr, e));
                }
            }
        }
        for l in &self.list {
            let applied = configure(&l.socket, config)
                .and_then(|()| if l.configured.is_some() { l.socket.listen(config.backlog as i32) } else { Ok(()) });
            if let Err(e) = applied {
                undo(&fresh);
                return Err((l.addr, e));
            }
        }
        // Nothing fails from here.
        self.next_id += fresh.len();
        let (keep, gone): (Vec<Listener>, Vec<Listener>) =
            std::mem::take(&mut self.list).into_iter().partition(|l| config.listen.iter().any(|a| names(l, a)));
        self.list = keep;
        for l in gone {
            log::info!("no longer listening on {}", l.addr);
            let _ = registry.deregister(&mut SourceFd(&l.socket.as_raw_fd()));
        }
        for l in fresh {
            log::info!("listening on {}", l.addr);
            self.list.push(l);
        }
        self.set_proxy(config);
        Ok(())
    }
}

/// The address a socket is bound to.
fn bound_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket.local_addr()?.as_socket().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))
}

fn register(l: &Listener, registry: &Registry) -> io::Result<()> {
    registry.register(&mut SourceFd(&l.socket.as_raw_fd()), Listeners::token(l), Interest::READABLE)
}

/// Creates, configures, binds and listens on one address.
fn bind(addr: SocketAddr, config: &Config) -> io::Result<Socket> {
    // socket2 creates sockets with SOCK_CLOEXEC on Linux.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    configure(&socket, config)?;
    socket.bind(&addr.into())?;
    socket.listen(config.backlog as i32)?;
    Ok(socket)
}

/// Options accepted sockets inherit (see the module docs).
fn configure(socket: &Socket, config: &Config) -> io::Result<()> {
    socket.set_tcp_nodelay(config.tcp_nodelay)?;
    socket.set_write_timeout(config.write_timeout.nonzero())?;
    Ok(())
}
