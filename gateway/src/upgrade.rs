//! Zero-downtime upgrades: a gateway started with `--upgrade` finds the running one through
//! the pid file next to `server.upgrade_sock`, tells it to hand its listening sockets over
//! (SIGQUIT) only once everything that can fail before that has succeeded (config, keys,
//! ledger, telemetry), and takes the sockets over through the upgrade socket.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("server.upgrade_sock: no folder safe for the upgrade socket (the config's folder is writable by every user); set server.upgrade_sock to a path in a folder only this user can write")]
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
