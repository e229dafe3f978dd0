//! Zero-downtime upgrades: a gateway started with `--upgrade` finds the running one through
//! the pid file next to `server.upgrade_sock`, tells it to hand its listening sockets over
//! (SIGQUIT) only once everything that can fail before that has succeeded (config, keys,
//! ledger, telemetry), and takes the sockets over through the upgrade socket.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("server.upgrade_sock: no folder safe for the upgrade socket (the config's folder is writable by other users, or belongs to one); set server.upgrade_sock to a path in a folder only this user can write")]
    NoSocket,
    #[error("no running gateway to take over: {0}; start it without --upgrade")]
    NoOldProcess(String),
    #[error("cannot signal the running gateway (pid {0}): {1}")]
    Signal(i32, std::io::Error),
}

/// The pid file of the gateway that owns `sock`.
pub fn pid_file(sock: &Path) -> PathBuf {
    sock.with_extension("pid")
}

/// Records this process as the one an `--upgrade` takes over from.
pub fn write_pid(sock: &Path) {
    let path = pid_file(sock);
    if let Err(e) = std::fs::write(&path, format!("{}\n", std::process::id())) {
        log::warn!(
            "cannot write {} ({e}): `--upgrade` will not find this process",
            path.display()
        );
    }
}

/// The running gateway named by the pid file, if it is one (a stale file may name an
/// unrelated process, which must never get the signal).
pub fn running(sock: &Path) -> Result<i32, UpgradeError> {
    let path = pid_file(sock);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| UpgradeError::NoOldProcess(format!("{}: {e}", path.display())))?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| UpgradeError::NoOldProcess(format!("{} holds no pid", path.display())))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if pid as u32 == std::process::id() || comm.trim() != "llm-gateway" {
        return Err(UpgradeError::NoOldProcess(format!(
            "{} names pid {pid}, which is not a running llm-gateway",
            path.display()
        )));
    }
    Ok(pid)
}

/// Asks the running gateway to hand its sockets over; it retries connecting to the upgrade
/// socket for a few seconds, so this may come just before this process listens there.
pub fn take_over_from(pid: i32) -> Result<(), UpgradeError> {
    // SAFETY: kill(2) with a pid checked to be a running llm-gateway.
    if unsafe { libc::kill(pid, libc::SIGQUIT) } != 0 {
        return Err(UpgradeError::Signal(pid, std::io::Error::last_os_error()));
    }
    log::info!("upgrade: asked the running gateway (pid {pid}) for its sockets");
    Ok(())
}

/// Tells systemd (`Type=notify`) about this process, when it runs under it: `READY=1` once
/// the sockets are in hand, and after an upgrade that this process is the service's main
/// process now (`MAINPID`, accepted with `NotifyAccess=all`). Without `NOTIFY_SOCKET`,
/// nothing.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket (containers).
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)?;
            }
            None => {
                sock.send_to(state.as_bytes(), &path)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = sent {
        log::warn!("cannot notify systemd ({state:?}): {e}");
    }
}

/// An upgrade started by SIGUSR2 is on its way (until its new process has taken the sockets
/// over, ended, or not done either within a minute): a second SIGUSR2 meanwhile is ignored.
static UPGRADING: AtomicBool = AtomicBool::new(false);

/// SIGUSR2 starts the binary at this process's path again with `--upgrade` (the nginx way):
/// the new process, inside the same systemd unit, takes the sockets over and tells systemd
/// it is the main process now.
pub fn spawn_on_usr2(config: PathBuf) {
    crate::server::on_signal(
        (signal_hook::consts::SIGUSR2, "SIGUSR2"),
        "`kill -USR2` upgrades are off",
        move || {
            if std::process::id() == 1 {
                // The init of a container: once it exits, the kernel ends every process of
                // its namespace, the new one too.
                return log::error!(
                    "SIGUSR2: this process is PID 1 (a container's init), which cannot hand over in place; restart the container instead"
                );
            }
            if crate::proxy::drain::draining() || UPGRADING.swap(true, Ordering::AcqRel) {
                return log::warn!("SIGUSR2: an upgrade or shutdown is already under way; ignored");
            }
            match start_new_process(&config) {
                Ok(pid) => {
                    std::thread::spawn(move || {
                        watch_new_process(pid);
                        UPGRADING.store(false, Ordering::Release);
                    });
                }
                Err(e) => {
                    UPGRADING.store(false, Ordering::Release);
                    log::error!("SIGUSR2: {e}");
                }
            }
        },
    );
}

/// Starts the binary now at this process's path (it may have been replaced on disk) with
/// `--upgrade`, and answers the new process's pid.
fn start_new_process(config: &Path) -> Result<i32, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find this binary's path: {e}"))?;
    let replaced = exe
        .to_string_lossy()
        .strip_suffix(" (deleted)")
        .map(PathBuf::from);
    let exe = replaced.unwrap_or(exe);
    log::info!("SIGUSR2: starting {} --upgrade", exe.display());
    spawn_orphan(&exe, config).map_err(|e| format!("cannot start {}: {e}", exe.display()))
}

/// Without an upgrade socket (no folder safe for it), SIGUSR2 only says why: left to its
/// default action, it would end the gateway.
pub fn refuse_usr2() {
    crate::server::on_signal(
        (signal_hook::consts::SIGUSR2, "SIGUSR2"),
        "`kill -USR2` ends the gateway",
        || {
            log::error!(
                "SIGUSR2: upgrades are off: no folder is safe for the upgrade socket; set server.upgrade_sock to a path in a folder only this user can write"
            )
        },
    );
}

/// Starts `exe --config CONFIG --upgrade` as an orphan and answers its pid.
///
/// Not as this process's child: systemd supervises a main process (`MAINPID`) that is not
/// its own child as "alien", cannot wait for it, and on `systemctl stop` kills it at once
/// with SIGKILL, with neither drain nor the final flush of audit lines and ledger charges.
/// Forked twice, the new process is handed to init (systemd, PID 1) or the nearest
/// subreaper before it execs, so long before it names itself the main process.
///
/// It starts with SIGUSR2 ignored, until it sets its own handler: `systemctl kill -s USR2`
/// signals every process of the unit, the new one too if it exists by then, and SIGUSR2's
/// default action would end it.
fn spawn_orphan(exe: &Path, config: &Path) -> std::io::Result<i32> {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors on success, which are then owned here.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors from pipe2, owned by nothing else.
    let (mut pid_reader, pid_writer) = unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(fds[0])),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let writer_fd = pid_writer.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--config").arg(config).arg("--upgrade");
    // SAFETY: between fork and exec only async-signal-safe calls (signal, fork, getppid,
    // write, nanosleep, _exit) on memory allocated before the fork. fork runs the atfork
    // handlers: glibc's own (which re-initialise its locks in the child) and none of the
    // allocator's (mimalloc registers none).
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGUSR2, libc::SIG_IGN);
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                // The new process: on to exec once the go-between has left and it has been
                // adopted (at most a second).
                0 => {
                    let go_between = libc::getppid();
                    let pause = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 1_000_000,
                    };
                    for _ in 0..1000 {
                        if libc::getppid() != go_between {
                            break;
                        }
                        libc::nanosleep(&pause, std::ptr::null_mut());
                    }
                    Ok(())
                }
                // The go-between: tells the parent the new process's pid, and leaves.
                child => {
                    let bytes = child.to_ne_bytes();
                    let written = libc::write(writer_fd, bytes.as_ptr().cast(), bytes.len());
                    libc::_exit(if written == bytes.len() as isize {
                        0
                    } else {
                        1
                    })
                }
            }
        });
    }
    let mut go_between = cmd.spawn()?;
    drop(cmd);
    drop(pid_writer);
    let mut bytes = [0u8; 4];
    let read = pid_reader.read_exact(&mut bytes);
    let told = go_between.wait().is_ok_and(|s| s.success());
    if read.is_err() || !told {
        return Err(std::io::Error::other(
            "the new process was started, but its pid did not come back",
        ));
    }
    Ok(i32::from_ne_bytes(bytes))
}

/// Until the new process takes the sockets over (this one then drains), it may stop on an
/// error of its own (its log says which): this one serves on, and says so. Watched through a
/// pidfd, which also sees an exit its adopter has not reaped yet and cannot mistake a reused
/// pid for it.
fn watch_new_process(pid: i32) {
    // SAFETY: pidfd_open takes a pid and flags, and answers a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return;
    };
    if fd < 0 {
        return log::debug!(
            "SIGUSR2: cannot watch the new process (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a fresh descriptor from pidfd_open, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let until = Instant::now() + Duration::from_secs(60);
    while !crate::proxy::drain::draining() {
        if Instant::now() >= until {
            return log::warn!(
                "SIGUSR2: the new process (pid {pid}) has not taken the sockets over within a minute"
            );
        }
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 200) } > 0 {
            return log::error!(
                "SIGUSR2: the new process (pid {pid}) ended before taking the sockets over; this one serves on"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    /// What `systemctl kill -s USR2` needs of the new process: not this process's child (so
    /// systemd can adopt it), and SIGUSR2 ignored until it sets its own handler. A script
    /// stands in for the binary and writes what `/proc` says of it.
    #[test]
    fn the_new_process_is_an_orphan_that_ignores_sigusr2_at_first() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("llm-gateway");
        std::fs::write(
            &exe,
            "#!/bin/sh\n# $1 --config, $2 the config, $3 --upgrade\n\
             { echo \"Pid: $$\"; grep -E '^(PPid|SigIgn):' /proc/$$/status; } > \"$2.tmp\"\n\
             mv \"$2.tmp\" \"$2.out\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("gateway.yaml");
        let pid = super::spawn_orphan(&exe, &config).unwrap();
        let out = dir.path().join("gateway.yaml.out");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !out.exists() {
            assert!(Instant::now() < deadline, "the new process wrote nothing");
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = std::fs::read_to_string(out).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {name} in {status}"))
                .to_string()
        };
        assert_eq!(field("Pid:"), pid.to_string(), "the pid that came back");
        assert_ne!(
            field("PPid:"),
            std::process::id().to_string(),
            "the new process is this one's child"
        );
        let ignored = u64::from_str_radix(&field("SigIgn:"), 16).unwrap();
        assert_ne!(
            ignored & (1 << (libc::SIGUSR2 - 1)),
            0,
            "SIGUSR2 is not ignored: {status}"
        );
    }
}
