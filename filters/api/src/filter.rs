use std::path::PathBuf;

use async_trait::async_trait;

use crate::{Rejection, RequestCtx};

/// One step of the chain. The chain runs `on_request` in config order before a backend is
/// chosen (the first rejection answers the client) and `on_complete` for every request once
/// it has ended, rejected ones included.
#[async_trait]
pub trait Filter: Send + Sync {
    /// The registry name (`auth`, `ratelimit`, …), used in logs and audit decisions.
    fn name(&self) -> &'static str;

    /// Whether `on_request` reads the held body (`ctx.json`, `ctx.model`, `ctx.max_tokens`).
    /// Filters that do not (address limits, authentication) run before the body is read, so
    /// a request they refuse costs no body.
    fn needs_body(&self) -> bool {
        false
    }

    /// Whether `on_complete` reads the request's JSON (`ctx.json`: the audit's prompt hash).
    /// The gateway lets a large body's tree go while the request runs and reads it again for
    /// the request's end only when a filter (or the trace) needs it.
    fn reads_body_at_end(&self) -> bool {
        false
    }

    /// Whether `on_request` may run while earlier filters' deferred checks
    /// ([`RequestCtx::defer`]) still wait for their answers: it neither reads what they
    /// conclude nor is costly to run for a request they may still refuse (what it holds gives
    /// itself back when dropped), or it awaits them itself
    /// ([`RequestCtx::settle_pending`]) before such a step (authentication: an address limit
    /// must answer before a password is hashed or a failure counted). The chain awaits the
    /// answers before a filter that says no.
    fn runs_alongside(&self) -> bool {
        false
    }

    /// Whether `on_request` may leave its check to the chain ([`RequestCtx::defer`]): the
    /// filters after it may then run while its answer travels, so what they decide on shared
    /// state may be given back. The first filter after which none does decides for good
    /// ([`BuildContext::first_in_chain`]).
    fn defers(&self) -> bool {
        false
    }

    /// Return `Err` to answer the client now with the rejection, or leave the end of the
    /// check to the chain with [`RequestCtx::defer`] (shared state: see [`crate::defer`]).
    async fn on_request(&self, _ctx: &mut RequestCtx) -> Result<(), Rejection> {
        Ok(())
    }

    /// The answer is known in full and its last bytes are about to go to the client (usage,
    /// status and `duration` so far are set): give back what the client's next request would
    /// otherwise meet (in-flight slots, token and spend reservations), so that a client that
    /// sends it the moment it has the answer never finds them still held. Runs exactly once
    /// per request, before `on_complete`: at the answer's end, or, for a request that ended
    /// otherwise (an error, a client that left), when it ends. Synchronous: it is on every
    /// request's way, and what must wait (a ledger write) belongs in `on_complete`.
    fn on_response_end(&self, _ctx: &mut RequestCtx) {}

    /// After the exchange, whatever its outcome. Never fails the request. Filters run in
    /// order and may note results for the ones after them; every filter's `on_response_end`
    /// ran before (budget set `cost_usd` there, which audit reads here).
    async fn on_complete(&self, _ctx: &mut RequestCtx) {}

    /// A report the admin listener serves at `/admin/NAME` (e.g. `spend`), if any.
    async fn admin_report(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }

    /// Where this filter takes identities from (`check` prints them), e.g. `API keys (keys.yaml)`.
    fn identity_sources(&self) -> Vec<String> {
        Vec::new()
    }

    /// Re-reads the filter's files (SIGHUP). On error the filter keeps its old state and the
    /// error is logged.
    fn reload(&self) -> Result<(), ReloadError> {
        Ok(())
    }

    /// The gateway is about to exit: finish what is queued (e.g. flush audit lines). Called
    /// once, from a plain thread, after the last request ended.
    fn shutdown(&self) {}
}

/// A reload that failed: the filter kept its previous state. Carries the filter's own error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ReloadError(pub Box<dyn std::error::Error + Send + Sync>);

impl ReloadError {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ReloadError(Box::new(e))
    }
}

/// What a filter constructor may need besides its options.
#[derive(Clone, Default)]
pub struct BuildContext {
    /// Folder of the config file: relative paths in options are resolved against it.
    pub config_dir: PathBuf,
    /// Shared state when replicas share limits and spend (`state: { backend: redis }`).
    pub state: Option<std::sync::Arc<dyn crate::SharedState>>,
    /// No filter before this one may defer its check ([`Filter::defers`]): nothing is ever
    /// waiting when it runs, so what it decides on shared state is final (nothing gives it
    /// back).
    pub first_in_chain: bool,
    /// Label values for metrics labelled by model or principal (bounded, shared with the
    /// gateway's own metrics).
    pub labels: std::sync::Arc<crate::labels::MetricLabels>,
    /// Only validating (`llm-gateway check`): create and write nothing (an audit log, a
    /// ledger) and start no threads; check instead that what would be opened can be.
    pub check_only: bool,
}

impl std::fmt::Debug for BuildContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildContext")
            .field("config_dir", &self.config_dir)
            .field("shared_state", &self.state.is_some())
            .field("first_in_chain", &self.first_in_chain)
            .field("check_only", &self.check_only)
            .finish()
    }
}

/// `path` with `suffix` added to its file name (`spend.db` → `spend.db-wal`), bytes kept as
/// they are (a name that is not UTF-8 too).
pub fn with_suffix(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(suffix);
    PathBuf::from(p)
}

/// Whether this process may access `path` as `mode` asks (`access(2)` with the effective
/// ids, as opening it would be judged).
/// Whether this user may reach `path` with `mode`; the refusal's reason when not.
fn access(path: &std::path::Path, mode: libc::c_int) -> Result<(), std::io::Error> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    match unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_EACCESS) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// What to do about a file or folder this user may not write, by why.
fn write_fix(e: &std::io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EROFS) {
        "it is on a read-only file system (systemd's ProtectSystem=strict leaves only ReadWritePaths writable): put it under /var/lib/llm-gateway or /var/log/llm-gateway, or add its folder to ReadWritePaths"
    } else {
        "make it owned by the user the gateway runs as (and run `check` as that user)"
    }
}

impl BuildContext {
    /// For [`Self::check_only`]: whether a file the filter would create or append to can be
    /// opened by the user running the check, without creating it. An existing file must be a
    /// file this user may write; a missing one needs a folder this user may create it in.
    /// (Run as root, this tells nothing of the service's user: `check` says so.)
    pub fn check_writable(path: &std::path::Path) -> Result<(), String> {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => match access(path, libc::W_OK) {
                Ok(()) => Ok(()),
                Err(e) => Err(format!(
                    "{} cannot be written by this user: {}",
                    path.display(),
                    write_fix(&e)
                )),
            },
            Ok(_) => Err(format!("{} is not a file", path.display())),
            // There, but not to be reached (a parent folder this user may not enter).
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!(
                "{} cannot be reached by this user ({e}): {}",
                path.display(),
                write_fix(&e)
            )),
            Err(_) => {
                let folder = path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                if !folder.is_dir() {
                    Err(format!(
                        "the folder {} does not exist; create it, owned by the user the gateway runs as",
                        folder.display()
                    ))
                } else if let Err(e) = access(folder, libc::W_OK | libc::X_OK) {
                    Err(format!(
                        "{} cannot be created in {}, which this user may not write: {}",
                        path.display(),
                        folder.display(),
                        write_fix(&e)
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }

    pub fn resolve(&self, path: &std::path::Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.config_dir.join(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_file_system_is_named_as_such() {
        let ro = std::io::Error::from_raw_os_error(libc::EROFS);
        assert!(write_fix(&ro).contains("read-only file system"));
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        assert!(write_fix(&denied).contains("owned by the user"));
        // A folder this user may write: no complaint.
        let dir = std::env::temp_dir().join(format!("check-writable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(BuildContext::check_writable(&dir.join("spend.db")), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
