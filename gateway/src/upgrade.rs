//! Zero-downtime upgrades: a gateway started with `--upgrade` finds the running one through
//! the pid file next to `server.upgrade_sock`, tells it to hand its listening sockets over
//! (SIGQUIT) only once everything that can fail before that has succeeded (config, keys,
//! ledger, telemetry), and takes the sockets over through the upgrade socket.

use std::path::{Path, PathBuf};

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

/// SIGUSR2 starts the binary at this process's path again with `--upgrade` (the nginx way):
/// the new process, a child of this one and so inside the same systemd unit, takes the
/// sockets over and tells systemd it is the main process now.
pub fn spawn_on_usr2(config: PathBuf) {
    crate::server::on_signal(
        (signal_hook::consts::SIGUSR2, "SIGUSR2"),
        "`kill -USR2` upgrades are off",
        move || {
            // The binary may have been replaced on disk: start what is at the path now.
            let exe = match std::env::current_exe() {
                Ok(p) => {
                    let s = p.to_string_lossy();
                    PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s).to_string())
                }
                Err(e) => return log::error!("SIGUSR2: cannot find this binary's path: {e}"),
            };
            log::info!("SIGUSR2: starting {} --upgrade", exe.display());
            match std::process::Command::new(&exe)
                .arg("--config")
                .arg(&config)
                .arg("--upgrade")
                .spawn()
            {
                // Reaped here; a new process that stopped before asking for the sockets
                // leaves this one serving, and says why in the log.
                Ok(mut child) => {
                    std::thread::spawn(move || match child.wait() {
                        Ok(s) if !s.success() => log::error!(
                            "SIGUSR2: the new process exited with {s}; this one serves on"
                        ),
                        _ => {}
                    });
                }
                Err(e) => log::error!("SIGUSR2: cannot start {}: {e}", exe.display()),
            }
        },
    );
}
