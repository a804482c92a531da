//! The pid file and `echod --signal`, the control command (#28.4): the file
//! names the master that serves, through an upgrade's drain and its
//! take-back; the command signals that master and no other process, and
//! waits for what a script needs to know. Real processes and signals on
//! 127.0.0.1; every process is killed by pid.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A directory `user` (nobody, when the tests run as root) can write the
/// pid file in, and the pid file's path there.
fn pid_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let path = dir.path().join("echod.pid");
    (dir, path)
}

fn oldbin(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.oldbin", path.display()))
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `echod --config config --signal command`: its exit status, stdout and
/// stderr. Bounded by the command's own waits (SLACK past the timeouts).
fn control(config: &Path, command: &str) -> (Option<i32>, String, String) {
    let out = Command::new(ECHOD)
        .arg("--config")
        .arg(config)
        .args(["--signal", command])
        .stdin(Stdio::null())
        .output()
        .expect("run echod --signal");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits for `cond`, up to `timeout`.
fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

#[test]
fn the_pid_file_follows_the_serving_master_through_an_upgrade_and_a_take_back() {
    let (_dir, path) = pid_dir();
    let e = start(&format!("workers = 1\nshutdown_timeout = 30\npid_file = \"{}\"\n", path.display()));
    let old = e.pid();
    assert_eq!(read_pid(&path), Some(old), "{}", e.log_text());
    // A held connection keeps the old generation draining after the upgrade.
    let mut held = connect(e.addr);
    assert_eq!(round_trip(&mut held, b"before").unwrap(), b"before");

    let (code, out, err) = control(&e.config, "upgrade");
    assert_eq!(code, Some(0), "{out}{err}\n{}", e.log_text());
    let new = read_pid(&path).expect("a pid after the upgrade");
    e.track(new);
    assert_ne!(new, old);
    assert!(out.contains(&format!("master {new} serves")), "{out}");
    assert_eq!(read_pid(&oldbin(&path)), Some(old), "the draining old master names itself in .oldbin");
    assert_eq!(round_trip(&mut held, b"draining").unwrap(), b"draining");

    // The new master dies while the old one drains: the old one takes
    // over again, and the files say so.
    let skip = e.log_len();
    kill(new, libc_sig::KILL);
    e.wait_log_after(skip, "taking over again", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no take-back:\n{}", e.log_text()));
    assert!(
        wait_until(Duration::from_secs(5), || read_pid(&path) == Some(old) && !oldbin(&path).exists()),
        "after the take-back: {:?}, .oldbin {:?}",
        read_pid(&path),
        read_pid(&oldbin(&path))
    );
    let mut fresh = connect(e.addr);
    assert_eq!(round_trip(&mut fresh, b"old master again").unwrap(), b"old master again");
    drop(fresh);

    // stop waits until the master has gone, and the files go with it.
    drop(held);
    let (code, out, err) = control(&e.config, "stop");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("master {old} has exited")), "{out}");
    assert!(!path.exists() && !oldbin(&path).exists(), "a pid file outlived its master");
}

#[test]
fn the_control_command_signals_only_a_running_echod() {
    let (dir, path) = pid_dir();
    let config = dir.path().join("echod.toml");
    std::fs::write(&config, format!("listen = [\"127.0.0.1:0\"]\npid_file = \"{}\"\n", path.display())).unwrap();
    let (code, _, err) = control(&config, "stop");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no echod is running"), "{err}");

    // A stale file (the master was SIGKILLed) whose pid another program
    // now has: that program is not signalled.
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(&path, format!("{}\n", other.id())).unwrap();
    let (code, _, err) = control(&config, "stop");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("names no running echod"), "{err}");
    assert!(other.try_wait().unwrap().is_none(), "the control command signalled a process that is not echod");
    let _ = other.kill();
    let _ = other.wait();

    std::fs::write(&config, "listen = [\"127.0.0.1:0\"]\n").unwrap();
    let (code, _, err) = control(&config, "stop");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("`pid_file` is not set"), "{err}");
}

/// Review of #28.4: a pid file naming a worker (a stale file whose pid a
/// worker now has) signals nothing: workers are `echod: worker N`, not
/// `echod`.
#[test]
fn a_pid_file_naming_a_worker_signals_nothing() {
    let (dir, path) = pid_dir();
    let e = start("workers = 1\n");
    let worker = e.wait_workers(1, Duration::from_secs(5))[0];
    let config = dir.path().join("echod.toml");
    std::fs::write(&config, format!("listen = [\"127.0.0.1:0\"]\npid_file = \"{}\"\n", path.display())).unwrap();
    std::fs::write(&path, format!("{worker}\n")).unwrap();
    let (code, _, err) = control(&config, "stop");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("names no running echod"), "{err}");
    assert!(alive(worker) && e.workers() == vec![worker], "the worker was signalled");
}

/// Review of #28.4: `quit` during an upgrade's drain stops the service, so
/// the command waits for the draining old master too, and says so.
#[test]
fn quit_during_a_drain_waits_for_both_masters() {
    let (_dir, path) = pid_dir();
    let e = start(&format!("workers = 1\nshutdown_timeout = 30\npid_file = \"{}\"\n", path.display()));
    let old = e.pid();
    let mut held = connect(e.addr);
    assert_eq!(round_trip(&mut held, b"held").unwrap(), b"held");
    let (code, out, err) = control(&e.config, "upgrade");
    assert_eq!(code, Some(0), "{out}{err}");
    let new = read_pid(&path).expect("the new master's pid");
    e.track(new);
    let (code, out, err) = control(&e.config, "quit");
    assert_eq!(code, Some(0), "{out}{err}\n{}", e.log_text());
    assert!(out.contains(&format!("master {new} has exited")), "{out}");
    assert!(out.contains(&format!("the draining old master {old} has exited")), "{out}");
    assert!(!path.exists() && !oldbin(&path).exists(), "a pid file outlived its master");
}

#[test]
fn a_second_instance_is_refused_the_pid_file_of_a_running_one() {
    let (dir, path) = pid_dir();
    let e = start(&format!("workers = 1\npid_file = \"{}\"\n", path.display()));
    let config = dir.path().join("second.toml");
    std::fs::write(&config, format!("listen = [\"127.0.0.1:0\"]\nworkers = 1\npid_file = \"{}\"\n", path.display()))
        .unwrap();
    let (code, err, _) = run_to_exit(&["--config", config.to_str().unwrap()], None);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains(&format!("{}:3: key `pid_file`", config.display())), "{err}");
    assert!(err.contains(&format!("names pid {}", e.pid())), "{err}");
    assert_eq!(read_pid(&path), Some(e.pid()), "the refused instance took the file");
}

#[test]
fn reload_through_the_control_command_checks_the_file_before_it_signals() {
    let (_dir, path) = pid_dir();
    let e = start(&format!("workers = 1\npid_file = \"{}\"\n", path.display()));
    let skip = e.log_len();
    let good = format!("listen = [\"{}\"]\nworkers = 1\npid_file = \"{}\"\n", e.addr, path.display());
    e.write_config(&format!("{good}buffer_size = \"big\"\n"));
    let (code, _, err) = control(&e.config, "reload");
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains(&format!("{}:4", e.config.display())) && err.contains("buffer_size"), "{err}");
    e.write_config(&format!("{good}buffer_size = 2048\n"));
    let (code, out, err) = control(&e.config, "reload");
    assert_eq!(code, Some(0), "{out}{err}");
    e.wait_log_after(skip, "] reloaded ", Duration::from_secs(10)).unwrap_or_else(|| panic!("{}", e.log_text()));
    let log = e.log_lines()[skip..].join("\n");
    assert!(!log.contains("reload failed"), "the broken file was signalled:\n{log}");
}

/// A reload that moves `pid_file` says the move needs a restart, and the
/// file stays where the running master wrote it (so `echod -s` with the
/// old config still finds it); the old master SIGKILLed in an upgrade's
/// drain leaves a stale `.oldbin` that names no running echod, and a fresh
/// start is not refused over it.
#[test]
fn pid_file_is_fixed_at_start_and_a_stale_oldbin_refuses_nothing() {
    let (_dir, path) = pid_dir();
    let (_other_dir, other) = pid_dir();
    let with_pid_file = |p: &Path| format!("workers = 1\nshutdown_timeout = 30\npid_file = \"{}\"\n", p.display());
    let mut e = start(&with_pid_file(&path));
    let old = e.pid();
    let skip = e.log_len();
    e.write_config(&format!("listen = [\"{}\"]\n{}", e.addr, with_pid_file(&other)));
    e.signal(libc_sig::HUP);
    e.wait_log_after(skip, "`pid_file` changed", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no restart-only warning:\n{}", e.log_text()));
    assert_eq!(read_pid(&path), Some(old));
    assert!(!other.exists(), "a reload does not move the pid file");

    // Back to the first path, then an upgrade with a held connection, and
    // the old master dies mid-drain.
    e.write_config(&format!("listen = [\"{}\"]\n{}", e.addr, with_pid_file(&path)));
    let mut held = connect(e.addr);
    assert_eq!(round_trip(&mut held, b"held").unwrap(), b"held");
    let (code, out, err) = control(&e.config, "upgrade");
    assert_eq!(code, Some(0), "{out}{err}\n{}", e.log_text());
    let new = read_pid(&path).expect("the new master's pid");
    e.track(new);
    assert_eq!(read_pid(&oldbin(&path)), Some(old));
    kill(old, libc_sig::KILL);
    assert!(wait_until(Duration::from_secs(5), || !alive(old)), "the old master is gone");
    let _ = e.wait_exit(Duration::from_secs(5));
    assert_eq!(read_pid(&oldbin(&path)), Some(old), "a SIGKILLed master leaves its .oldbin");
    // The new master serves on; stop it, then a fresh start over the
    // stale .oldbin is not refused.
    let mut fresh = connect(e.addr);
    assert_eq!(round_trip(&mut fresh, b"new").unwrap(), b"new");
    drop((held, fresh));
    let (code, out, err) = control(&e.config, "stop");
    assert_eq!(code, Some(0), "{out}{err}");
    let again = start(&format!("workers = 1\npid_file = \"{}\"\n", path.display()));
    assert_eq!(read_pid(&path), Some(again.pid()), "{}", again.log_text());
}

/// #28: every control action is logged with who asked: the sender's pid and
/// uid (from siginfo) and its name, for the control command as for kill.
#[test]
fn the_master_logs_who_sent_each_signal() {
    let (_dir, path) = pid_dir();
    let e = start(&format!("workers = 1\npid_file = \"{}\"\n", path.display()));
    let uid = nix::unistd::getuid().as_raw();
    let child = std::process::Command::new(ECHOD)
        .arg("--config")
        .arg(&e.config)
        .args(["--signal", "stats"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sender = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    // (The sender's name follows when it is still running as the master
    // reads it; `-s stats` does not wait, so it may be gone.)
    let want = format!("signal USR1 from pid {sender} (uid {uid}");
    e.wait_log(&want, Duration::from_secs(5)).unwrap_or_else(|| panic!("no `{want}`:\n{}", e.log_text()));
    let kill = std::process::Command::new("kill").args(["-TTIN", &e.pid().to_string()]).spawn().unwrap();
    let sender = kill.id();
    assert!(kill.wait_with_output().unwrap().status.success());
    let want = format!("signal TTIN from pid {sender} (uid {uid}");
    e.wait_log(&want, Duration::from_secs(5)).unwrap_or_else(|| panic!("no `{want}`:\n{}", e.log_text()));
}
