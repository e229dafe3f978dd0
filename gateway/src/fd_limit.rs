//! The open-file limit: raised to its hard limit at start (as Go's runtime does; systemd and
//! most shells give 1024 soft against a far higher hard limit), and the default connection cap
//! drawn from it, so a flood of client connections leaves descriptors for backends, Redis,
//! the ledger and the audit file instead of making every `accept` and `connect` fail.

/// Share of the open-file limit client connections may take when no listener sets
/// `max_connections`: the rest stays for everything else the gateway opens.
const CLIENT_SHARE_PERCENT: u64 = 90;
/// The least a listener's default cap is, however low the limit.
const MIN_DEFAULT: usize = 64;

fn read() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// Raises the soft open-file limit to the hard one (where it is lower, nothing happens).
pub fn raise() {
    let Some(lim) = read() else {
        return;
    };
    if lim.rlim_cur < lim.rlim_max {
        let wanted = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) };
    }
}

/// Each listener's `max_connections` when it sets none: nine tenths of the open-file limit,
/// shared by the `listeners`; `None` for no limit.
pub fn default_max_connections(listeners: usize) -> Option<usize> {
    let soft = read()?.rlim_cur;
    if soft == libc::RLIM_INFINITY {
        return None;
    }
    let share = soft.saturating_mul(CLIENT_SHARE_PERCENT) / 100;
    Some((usize::try_from(share).unwrap_or(usize::MAX) / listeners.max(1)).max(MIN_DEFAULT))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_cap_leaves_room_and_is_shared() {
        super::raise();
        let soft = super::read().unwrap().rlim_cur as usize;
        let one = super::default_max_connections(1).unwrap();
        assert!(one < soft && one >= soft * 9 / 10 - 1, "{one} of {soft}");
        let two = super::default_max_connections(2).unwrap();
        assert!(two <= one / 2 + 1 && two >= super::MIN_DEFAULT);
    }
}
