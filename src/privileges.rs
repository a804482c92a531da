//! Dropping root after binding.
//!
//! Started as root (outside systemd, or under a unit without User=), the
//! master binds its sockets first, since port 7 needs privilege, and then becomes
//! `user`/`group` before it forks a single worker, so every worker is born
//! unprivileged. Under systemd the unit's DynamicUser= and
//! AmbientCapabilities=CAP_NET_BIND_SERVICE do this job and these keys are
//! ignored.
//!
//! The master drops too (as gunicorn does with `user`, unlike nginx whose
//! master stays root): a reload can then bind only unprivileged ports, unless
//! CAP_NET_BIND_SERVICE is granted by the service manager.

use nix::unistd::{Gid, Uid, geteuid, setgid, setgroups, setuid};

use crate::config::Config;
use crate::users::{find_group, find_user};

/// Becomes the configured user if running as root; refuses to stay root
/// unless `allow_root`. Returns a message for the log on success.
pub fn drop(config: &Config) -> Result<Option<String>, String> {
    if !geteuid().is_root() {
        return Ok(None); // systemd (or the user who started us) chose already
    }
    if config.user.is_empty() {
        if config.allow_root {
            return Ok(Some("running as root (allow_root = true)".into()));
        }
        return Err(
            "refusing to run as root with `user = \"\"`: set `user` (e.g. \"nobody\") or `allow_root = true`".into()
        );
    }
    let user = find_user(&config.user).ok_or_else(|| format!("no such user `{}`", config.user))?;
    let gid = if config.group.is_empty() {
        user.gid
    } else {
        find_group(&config.group).ok_or_else(|| format!("no such group `{}`", config.group))?.gid
    };
    become_user(user.uid, gid).map_err(|e| format!("cannot become {}:{gid}: {e}", config.user))?;
    Ok(Some(format!("dropped root: now uid {} gid {gid} ({})", user.uid, config.user)))
}

/// Supplementary groups first, then the group, then the user (after setuid
/// we could no longer change the others); then check root cannot come back.
fn become_user(uid: Uid, gid: Gid) -> nix::Result<()> {
    setgroups(&[gid])?;
    setgid(gid)?;
    setuid(uid)?;
    if uid.as_raw() != 0 && setuid(Uid::from_raw(0)).is_ok() {
        return Err(nix::errno::Errno::EPERM);
    }
    Ok(())
}
