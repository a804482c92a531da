//! The pid file: names the master that speaks for the service, so scripts and
//! `echod --signal` signal the right process, during an upgrade too.
//!
//! As nginx's `pid` and `pid.oldbin`: the main master's pid is in
//! `pid_file`; an old master that handed over to a new one and still drains
//! its connections is in `pid_file.oldbin`. The file follows the lifecycle's
//! one notion of "main" ([`PidFile::set_main`] is called where the notifier
//! learns it), so the pid file, MAINPID and the master that accepts never
//! disagree for longer than one hand-over message:
//!
//! - a master that becomes main (at start, told `go` by its predecessor, or
//!   taking over again from a new master that died) writes `pid_file`, and
//!   removes a `.oldbin` that names it;
//! - a main master that hands over writes `.oldbin` and leaves `pid_file`
//!   to its successor, which writes it when told `go`;
//! - a master that exits removes whichever of the two names it, so a stale
//!   file is only left by a master killed outright (SIGKILL), and
//!   `echod --signal` checks that the pid it reads is an echod.
//!
//! Each write goes to a temporary file in the same directory, renamed over
//! the old one: a reader sees the old pid or the new one, never a torn or
//! empty file, even when the old and the new master write at once (they
//! write different names). The directory must be writable by `user`: the
//! new master of an upgrade, already `user`, writes it; the start checks it.

use std::io;
use std::path::{Path, PathBuf};

use crate::config::Refusal;

/// The file an old, draining master names itself in (nginx's suffix).
pub const OLDBIN_SUFFIX: &str = ".oldbin";

/// This master's pid file, if `pid_file` is set.
#[derive(Debug)]
pub struct PidFile {
    /// `pid_file`, or None when unset (nothing is written).
    path: Option<PathBuf>,
    /// Whether this master last wrote itself as main (Some(true)), as the
    /// draining old master (Some(false)), or nothing yet (None: a new
    /// master not yet told `go`).
    written: Option<bool>,
}

impl PidFile {
    /// For `pid_file` (`""`: none). Checks that this process, now `user`,
    /// can write files in its directory, writing nothing else: a start
    /// refuses a path it could not keep up to date on an upgrade.
    pub fn open(pid_file: &str) -> Result<PidFile, Refusal> {
        if pid_file.is_empty() {
            return Ok(PidFile { path: None, written: None });
        }
        let path = PathBuf::from(pid_file);
        let dir = path.parent().unwrap_or(Path::new("/"));
        // access(2), as `user` (the real uid after the drop): no file is
        // created to find out, and no symlink is followed into.
        let wx = nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK;
        nix::unistd::access(dir, wx).map_err(|e| {
            Refusal::new(
                "pid_file",
                format!(
                    "uid {} cannot create files in {} ({e}); the master writes {} there, as its successor does on an \
                     upgrade (USR2): create the directory and give it to `user`",
                    nix::unistd::getuid(),
                    dir.display(),
                    path.display()
                ),
            )
        })?;
        Ok(PidFile { path: Some(path), written: None })
    }

    /// Called whenever the master learns whether it is main (see the module
    /// header): writes `pid_file` on becoming main, `.oldbin` on handing
    /// over; a failure is logged, and the master goes on.
    pub fn set_main(&mut self, main: bool) {
        let Some(path) = &self.path else { return };
        if self.written == Some(main) || (!main && self.written.is_none()) {
            return; // unchanged, or a new master that never was main
        }
        let pid = std::process::id();
        let (target, other) = if main { (path.clone(), oldbin(path)) } else { (oldbin(path), path.clone()) };
        match write_atomically(&target, pid) {
            Ok(()) => self.written = Some(main),
            Err(e) => log::warn!("cannot write the pid file {}: {e}", target.display()),
        }
        if main {
            remove_if_names(&other, pid);
        }
    }
}

impl Drop for PidFile {
    /// On the master's exit: removes the files that name this process
    /// (not any other: a fork that drops a copy has another pid).
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let pid = std::process::id();
            remove_if_names(path, pid);
            remove_if_names(&oldbin(path), pid);
        }
    }
}

/// The pid `path` names if that process is a running echod master (named
/// exactly `echod`: workers are `echod: worker N`; not a zombie): another
/// instance using the same file, which a fresh start must not take the
/// file from, or the master `echod --signal` may signal.
pub fn running_echod(path: &Path) -> Option<u32> {
    let pid = read(path).ok().flatten()?;
    let (name, state) = proc_state(pid)?;
    (pid != std::process::id() && name == "echod" && state != 'Z').then_some(pid)
}

/// `pid`'s name and state letter from /proc/PID/stat (None: no such
/// process). A zombie ('Z') has exited, reaped or not.
pub fn proc_state(pid: u32) -> Option<(String, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (name, fields) = crate::metrics::process::split_stat(&stat)?;
    Some((name.to_string(), fields.first()?.chars().next()?))
}

/// `path` with `.oldbin` appended.
pub fn oldbin(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(OLDBIN_SUFFIX);
    PathBuf::from(name)
}

/// The pid a pid file names, if it names one.
pub fn read(path: &Path) -> io::Result<Option<u32>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().parse().ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.tmp", std::process::id()));
    PathBuf::from(name)
}

/// Writes `pid` to a new temporary file and renames it over `path`. The
/// temporary file is created with O_EXCL|O_NOFOLLOW: a name planted in the
/// directory (a symlink to a file to truncate) is removed, not written
/// through.
fn write_atomically(path: &Path, pid: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = temp_name(path);
    let create = || {
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).custom_flags(libc_nofollow()).open(&tmp)
    };
    let mut file = match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&tmp)?; // unlinks the name, never its target
            create()?
        }
        other => other?,
    };
    file.write_all(format!("{pid}\n").as_bytes()).and_then(|()| std::fs::rename(&tmp, path)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn libc_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Removes `path` if it names `pid`. (Read, then remove: a successor
/// renaming its own pid in between would lose its file; only `.oldbin` and
/// a take-back's old `pid_file` get here while another master runs, and
/// neither is written by another master then.)
fn remove_if_names(path: &Path, pid: u32) {
    if read(path).ok().flatten() == Some(pid) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_writes_the_file_handing_over_writes_oldbin_and_exit_removes_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echod.pid");
        let me = std::process::id();
        let mut p = PidFile::open(path.to_str().unwrap()).unwrap();
        p.set_main(false); // a new master not yet told `go`: nothing
        assert_eq!(read(&path).unwrap(), None);
        p.set_main(true);
        assert_eq!(read(&path).unwrap(), Some(me));
        p.set_main(false); // handed over; the successor writes pid_file
        std::fs::write(&path, "4242\n").unwrap();
        assert_eq!(read(&oldbin(&path)).unwrap(), Some(me));
        p.set_main(true); // took over again: .oldbin goes
        assert_eq!((read(&path).unwrap(), read(&oldbin(&path)).unwrap()), (Some(me), None));
        p.set_main(false);
        std::fs::write(&path, "4242\n").unwrap();
        drop(p);
        // Its .oldbin is gone; the successor's pid_file stays.
        assert_eq!((read(&path).unwrap(), read(&oldbin(&path)).unwrap()), (Some(4242), None));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary file was left");
    }

    /// Review of #28.4: a symlink planted at the temporary name must not be
    /// written through (it truncated the file it pointed to).
    #[test]
    fn a_symlink_planted_at_the_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echod.pid");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, temp_name(&path)).unwrap();
        let mut p = PidFile::open(path.to_str().unwrap()).unwrap();
        p.set_main(true);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(read(&path).unwrap(), Some(std::process::id()));
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_refused_by_key() {
        let r = PidFile::open("/nonexistent-dir/echod.pid").unwrap_err();
        assert_eq!(r.key, "pid_file");
        assert!(r.why.contains("/nonexistent-dir"), "{}", r.why);
    }
}
