//! Dropping root after binding, keeping only the capability the master needs.
//!
//! Started as root (outside systemd, or under a unit without User=), the
//! master binds its sockets first and then becomes `user`/`group` before it
//! forks a single worker, so every worker is born unprivileged. The master
//! keeps exactly one capability, CAP_NET_BIND_SERVICE (permitted, effective,
//! inheritable and ambient), and no root uid: like nginx's and Apache's
//! masters it can still bind port 7 when a reload adds it, but nothing
//! else. Ambient, because a binary upgrade execs the new master as `user`,
//! and only an ambient capability survives an exec by a non-root process.
//!
//! Workers keep no capability at all ([`drop_all_capabilities`], first thing
//! after fork): they only echo on sockets they are handed.
//!
//! Under systemd the unit's DynamicUser= and
//! AmbientCapabilities=CAP_NET_BIND_SERVICE do the master's part and these
//! keys are ignored; the workers still drop everything.

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid, geteuid, setgid, setgroups, setuid};

use crate::config::{Config, Refusal};
use crate::users::{find_group, find_user};

/// Why root could not be dropped. Each is about the `user` (or `group`)
/// key: [`DropError::key`] names it, for an error with file and line.
#[derive(Debug)]
pub enum DropError {
    /// Root, `user = ""` and no `allow_root`.
    StaysRoot,
    NoSuchUser(String),
    NoSuchGroup(String),
    /// A step of becoming the user failed (setgroups, setgid, setuid, a
    /// capability set), or root could be regained afterwards.
    Become {
        user: String,
        gid: Gid,
        why: String,
    },
}

impl DropError {
    /// The config key to change.
    pub fn key(&self) -> &'static str {
        match self {
            DropError::NoSuchGroup(_) => "group",
            _ => "user",
        }
    }
}

impl std::fmt::Display for DropError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DropError::StaysRoot => write!(
                f,
                "refusing to run as root with `user = \"\"`: set `user` (e.g. \"nobody\") or `allow_root = true`"
            ),
            DropError::NoSuchUser(u) => write!(f, "no such user `{u}`"),
            DropError::NoSuchGroup(g) => write!(f, "no such group `{g}`"),
            DropError::Become { user, gid, why } => write!(f, "cannot become {user}:{gid}: {why}"),
        }
    }
}

impl From<DropError> for Refusal {
    fn from(e: DropError) -> Refusal {
        Refusal::new(e.key(), e.to_string())
    }
}

/// Becomes the configured user if running as root; refuses to stay root
/// unless `allow_root`. Returns a message for the log on success.
pub fn drop(config: &Config) -> Result<Option<String>, DropError> {
    if !geteuid().is_root() {
        return Ok(None); // systemd (or the user who started us) chose already
    }
    if config.user.is_empty() {
        if config.allow_root {
            return Ok(Some("running as root (allow_root = true)".into()));
        }
        return Err(DropError::StaysRoot);
    }
    let user = find_user(&config.user).ok_or_else(|| DropError::NoSuchUser(config.user.clone()))?;
    let gid = if config.group.is_empty() {
        user.gid
    } else {
        find_group(&config.group).ok_or_else(|| DropError::NoSuchGroup(config.group.clone()))?.gid
    };
    become_user(user.uid, gid).map_err(|why| DropError::Become { user: config.user.clone(), gid, why })?;
    Ok(Some(format!(
        "dropped root: now uid {} gid {gid} ({}), keeping only CAP_NET_BIND_SERVICE",
        user.uid, config.user
    )))
}

/// After the drop: what this master will need as `user` later, checked now
/// rather than at the first HUP or USR2. A config file only root can read
/// would pass every check at start and then fail every reload and upgrade
/// until a restart; an `upgrade_binary` the user cannot execute would fail
/// every upgrade. Returns the key to blame and why; or, when only the
/// default upgrade binary (`own_exe`, echod's own path, `upgrade_binary`
/// unset) is out of reach, a warning: nobody asked for upgrades then, and
/// refusing to start over it would be harsh.
pub fn check_reachable(
    config: &Config,
    own_exe: &std::path::Path,
    source: Option<&std::path::Path>,
) -> Result<Option<String>, Refusal> {
    let who = if config.user.is_empty() {
        format!("uid {}", nix::unistd::getuid())
    } else {
        format!("`user` \"{}\"", config.user)
    };
    if let Some(path) = source {
        // access(2), not open: it asks for the real uid, which is `user`
        // after the drop, and never blocks (the file may be a FIFO).
        if let Err(e) = nix::unistd::access(path, nix::unistd::AccessFlags::R_OK) {
            return Err(Refusal::new(
                "user",
                format!(
                    "{who} cannot read {} ({e}), and every reload (HUP) and upgrade (USR2) reads it as that user: make \
                     it readable by {} (e.g. chgrp {} {p} && chmod 0640 {p})",
                    path.display(),
                    config.user,
                    if config.group.is_empty() { &config.user } else { &config.group },
                    p = path.display()
                ),
            ));
        }
    }
    let binary = match config.upgrade_binary.as_str() {
        "" => own_exe.to_path_buf(),
        b => std::path::PathBuf::from(b),
    };
    match nix::unistd::access(&binary, nix::unistd::AccessFlags::X_OK) {
        Ok(()) => Ok(None),
        Err(e) if config.upgrade_binary.is_empty() => Ok(Some(format!(
            "{who} cannot execute echod's own path `{}` ({e}): an upgrade (USR2) would fail; set `upgrade_binary` to \
             a path it can execute",
            binary.display()
        ))),
        Err(e) => Err(Refusal::new(
            "upgrade_binary",
            format!("{who} cannot execute `{}` ({e}), so every upgrade (USR2) would fail", binary.display()),
        )),
    }
}

/// Supplementary groups first, then the group, then the user (after setuid
/// we could no longer change the others), keeping the permitted
/// capabilities across setuid (PR_SET_KEEPCAPS) so CAP_NET_BIND_SERVICE can
/// be kept alone; then check root cannot come back.
fn become_user(uid: Uid, gid: Gid) -> Result<(), String> {
    setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
    setgid(gid).map_err(|e| format!("setgid: {e}"))?;
    nix::sys::prctl::set_keepcaps(true).map_err(|e| format!("PR_SET_KEEPCAPS: {e}"))?;
    setuid(uid).map_err(|e| format!("setuid: {e}"))?;
    let kept = keep_only(Capability::CAP_NET_BIND_SERVICE);
    let _ = nix::sys::prctl::set_keepcaps(false);
    kept?;
    if uid.as_raw() != 0 && setuid(Uid::from_raw(0)).is_ok() {
        return Err("root could be regained".into());
    }
    Ok(())
}

/// Narrows every capability set to `cap` alone, and raises it in the
/// ambient set so an exec (the binary upgrade) keeps it.
fn keep_only(cap: Capability) -> Result<(), String> {
    let only: CapsHashSet = [cap].into_iter().collect();
    // Inheritable first (ambient needs it), effective before permitted (a
    // capability cannot stay effective once it is no longer permitted).
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::set(None, set, &only).map_err(|e| format!("cannot keep only {cap}: {set:?}: {e}"))?;
    }
    caps::raise(None, CapSet::Ambient, cap).map_err(|e| format!("cannot keep {cap} across exec: {e}"))
}

/// A worker, right after fork: no capability in any set, ambient included,
/// whatever the master kept (CAP_NET_BIND_SERVICE, or all of root's with
/// `allow_root`, or what systemd granted).
///
/// A sandbox that refuses capset (a unit that filters `@privileged`
/// without allowing `capset` back; `systemd/echod.service` allows it) or an
/// old kernel without ambient capabilities leaves the worker with what it
/// inherited: that is logged, not fatal, because a worker that cannot start
/// serves nobody.
pub fn drop_all_capabilities() {
    let dropped = (|| -> Result<(), String> {
        if caps::read(None, CapSet::Permitted).map_err(|e| format!("capget: {e}"))?.is_empty() {
            return Ok(()); // nothing to drop (the common case for a non-root start)
        }
        caps::clear(None, CapSet::Ambient).map_err(|e| format!("ambient: {e}"))?;
        for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
            caps::clear(None, set).map_err(|e| format!("{set:?}: {e}"))?;
        }
        Ok(())
    })();
    if let Err(e) = dropped {
        log::warn!("cannot drop the capabilities this worker inherited ({e}); allow capset to the service");
    }
}
