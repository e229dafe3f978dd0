//! The durable ledger: spend per UTC day, principal and model in an SQLite file (WAL mode).
//! Charges are summed in memory by a dedicated thread and committed in one transaction at
//! most every `commit_interval`, and on shutdown: no proxy thread waits on disk, and a crash
//! loses at most the last interval.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gateway_filter::batch::drain_in_batches;
use rusqlite::{params, Connection};
use tokio::sync::mpsc::{Receiver, Sender};

use crate::period::{day_of, parse_day};
use crate::prices::Nano;

pub enum Msg {
    Charge {
        day: String,
        principal: String,
        model: String,
        nano: Nano,
    },
    /// Commit now; answered with whether the commit succeeded.
    Flush(std::sync::mpsc::SyncSender<bool>),
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    // Made by the gateway for its own user only (SQLite gives its journal files the
    // database's mode): made by SQLite, it would take the umask's, 0644 by hand or in a
    // container, every user able to read who spent what.
    if std::fs::symlink_metadata(path).is_err() {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
    }
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS spend (
            day TEXT NOT NULL,
            principal TEXT NOT NULL,
            model TEXT NOT NULL,
            usd_nano INTEGER NOT NULL,
            requests INTEGER NOT NULL,
            PRIMARY KEY (day, principal, model)
        )",
    )?;
    Ok(conn)
}

/// What can go wrong with the ledger file.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{}: no such ledger", .0.display())]
    Missing(PathBuf),
    #[error("cannot start the ledger writer: {0}")]
    Writer(#[source] std::io::Error),
    /// A ledger that does not exist yet could not be made there.
    #[error("{0}")]
    Place(String),
}

/// Spend already in the ledger, per principal and day.
pub type History = HashMap<String, Vec<(String, Nano)>>;

/// The ledger's spend per (principal, day) as this process knows it.
pub type Seen = HashMap<(String, String), Nano>;

/// Called with spend another process wrote to the ledger: principal, day number, amount.
pub type OnForeign = Box<dyn Fn(&str, i64, Nano) + Send>;

/// How often the writer looks for spend another process wrote to the same ledger: the old
/// process of an upgrade (`--upgrade`, SIGUSR2) charges the requests it finishes while the
/// new one already serves.
const FOREIGN_SCAN: Duration = Duration::from_secs(1);

/// The first day the scan for foreign spend reads: other processes charge today (yesterday
/// just after midnight).
fn scan_from(now: i64) -> String {
    day_of(now - 86_400)
}

/// The part of `history` the scan for foreign spend compares with: what the ledger held, at
/// load, from the scan's first day on.
pub fn recent(history: &History, now: i64) -> Seen {
    let from = scan_from(now);
    let mut seen = Seen::new();
    for (principal, days) in history {
        for (day, nano) in days.iter().filter(|(d, _)| *d >= from) {
            let e = seen.entry((principal.clone(), day.clone())).or_default();
            *e = e.saturating_add(*nano);
        }
    }
    seen
}

/// Compares the ledger's recent spend with what this process knows it holds (`seen`: as
/// loaded, plus its own commits) and reports what is more, which another process wrote.
/// Returns the amount reported.
fn scan_foreign(
    conn: &Connection,
    seen: &mut Seen,
    on_foreign: &OnForeign,
    now: i64,
) -> rusqlite::Result<Nano> {
    let from = scan_from(now);
    let mut stmt = conn.prepare_cached(
        "SELECT principal, day, CAST(TOTAL(usd_nano) AS INTEGER) FROM spend WHERE day >= ?1 GROUP BY principal, day",
    )?;
    let rows = stmt.query_map(params![from], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut foreign = 0;
    for row in rows {
        let (principal, day, nano) = row?;
        let key = (principal, day);
        let known = seen.get(&key).copied().unwrap_or(0);
        if nano > known {
            if let Some(n) = parse_day(&key.1) {
                on_foreign(&key.0, n, nano - known);
                foreign = Nano::saturating_add(foreign, nano - known);
            }
        }
        // Less than known: rows were removed by hand; what was booked stays booked.
        seen.insert(key, nano);
    }
    seen.retain(|(_, day), _| *day >= from);
    Ok(foreign)
}

/// [`open`], with a place this user cannot write said as such: SQLite says only "unable to
/// open database file" (a read-only file system under ProtectSystem=strict, a folder the
/// service's user may not write, where the `-wal` file goes).
fn open_for_writing(path: &Path) -> Result<Connection, LedgerError> {
    open(path).map_err(|e| {
        let place = gateway_filter::BuildContext::check_writable(path).and_then(|()| {
            gateway_filter::BuildContext::check_writable(&gateway_filter::with_suffix(path, "-wal"))
        });
        match place {
            Err(why) => LedgerError::Place(why),
            Ok(()) => sqlite(path)(e),
        }
    })
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
    move |source| LedgerError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// For `llm-gateway check`: an existing ledger is a ledger (opened read-only); a missing one
/// could be made (its folder exists). Nothing is created or written.
pub fn check(path: &Path) -> Result<(), LedgerError> {
    if !path.exists() {
        return gateway_filter::BuildContext::check_writable(path).map_err(LedgerError::Place);
    }
    // Its header only: even a read-only open of a WAL database makes its `-wal` and `-shm`
    // files when they are missing.
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        // SQLite makes an empty file its database.
        return Ok(());
    }
    let mut header = [0u8; 16];
    let read = std::fs::File::open(path).and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut header)
    });
    match read {
        // An existing ledger must be writable too (and its folder, for the journal files).
        Ok(()) if &header == b"SQLite format 3\0" => {
            gateway_filter::BuildContext::check_writable(path).map_err(LedgerError::Place)?;
            let journal = gateway_filter::with_suffix(path, "-wal");
            gateway_filter::BuildContext::check_writable(&journal).map_err(LedgerError::Place)
        }
        Ok(()) => Err(LedgerError::Place(format!(
            "{} is not an SQLite database; point `ledger` at the gateway's ledger or a new file",
            path.display()
        ))),
        Err(e) => Err(LedgerError::Place(format!("{}: {e}", path.display()))),
    }
}

/// The spend already in the ledger, and the ledger's own id, made at its first use: the field
/// under which shared state (Redis) holds this replica's spend, so a restarted replica finds
/// and repairs its own share, and two replicas never write each other's.
pub fn load(path: &Path) -> Result<(History, String), LedgerError> {
    // A ledger that exists but holds nothing (truncated, or made by hand): every budget
    // starts this period from nothing, which must not pass unsaid. (Read before the first
    // open, which writes SQLite's header.)
    if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
        log::warn!(
            "budget: the ledger {} was an empty file: spend starts from nothing (if it held this period's spend, stop the gateway and restore it from a backup)",
            path.display()
        );
    }
    let conn = open_for_writing(path)?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        .map_err(sqlite(path))?;
    let fresh = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    conn.execute(
        "INSERT OR IGNORE INTO meta (k, v) VALUES ('replica_id', ?1)",
        params![fresh],
    )
    .map_err(sqlite(path))?;
    let id: String = conn
        .query_row("SELECT v FROM meta WHERE k = 'replica_id'", [], |r| {
            r.get(0)
        })
        .map_err(sqlite(path))?;
    let mut stmt = conn
        // TOTAL, not SUM: a sum past the integers' end is SQLite's error (no ledger could be
        // read, the gateway would not start); TOTAL is a float, cast back saturating.
        .prepare(
            "SELECT principal, day, CAST(TOTAL(usd_nano) AS INTEGER) FROM spend GROUP BY principal, day",
        )
        .map_err(sqlite(path))?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(sqlite(path))?;
    let mut h: History = HashMap::new();
    for row in rows {
        let (p, day, nano) = row.map_err(sqlite(path))?;
        h.entry(p).or_default().push((day, nano));
    }
    Ok((h, id))
}

fn commit(
    conn: &mut Connection,
    pending: &mut HashMap<(String, String, String), (Nano, i64)>,
    seen: &mut Seen,
) -> rusqlite::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO spend (day, principal, model, usd_nano, requests) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (day, principal, model) DO UPDATE SET usd_nano = MIN(usd_nano + ?4, 9223372036854775807), requests = requests + ?5",
        )?;
        for ((day, principal, model), (nano, n)) in pending.iter() {
            stmt.execute(params![day, principal, model, nano, n])?;
        }
    }
    tx.commit()?;
    for ((day, principal, _), (nano, _)) in pending.drain() {
        let e = seen.entry((principal, day)).or_default();
        *e = e.saturating_add(nano);
    }
    Ok(())
}

/// Opens the ledger now (a bad path is a startup error) and starts the writer thread, which
/// also reports spend other processes write to the ledger (`seen`: its recent spend as
/// loaded, see [`recent`]).
pub fn spawn(
    path: PathBuf,
    interval: Duration,
    rx: Receiver<Msg>,
    mut seen: Seen,
    on_foreign: OnForeign,
) -> Result<std::thread::JoinHandle<()>, LedgerError> {
    let mut conn = open_for_writing(&path)?;
    let mut committing = gateway_filter::failing::FailureLog::new(format!(
        "budget: committing to the ledger {}",
        path.display()
    ));
    std::thread::Builder::new()
        .name("budget-ledger".into())
        .spawn(move || {
            let mut pending: HashMap<(String, String, String), (Nano, i64)> = HashMap::new();
            let (mut committed, mut scanned) = (Instant::now(), Instant::now());
            // Drained in batches on a timer (`gateway_filter::batch`): nothing wakes this
            // thread per charge.
            drain_in_batches(rx, |batch| {
                for msg in batch.drain(..) {
                    match msg {
                        Msg::Charge { day, principal, model, nano } => {
                            let e = pending.entry((day, principal, model)).or_insert((0, 0));
                            e.0 = e.0.saturating_add(nano);
                            e.1 += 1;
                        }
                        Msg::Flush(ack) => {
                            let done = commit(&mut conn, &mut pending, &mut seen);
                            match &done {
                                Err(e) => {
                                    crate::METRICS.ledger_failures.inc();
                                    committing.failed(e);
                                }
                                Ok(()) => committing.worked(),
                            }
                            committed = Instant::now();
                            let _ = ack.send(done.is_ok());
                        }
                    }
                }
                if committed.elapsed() >= interval {
                    // Charges wait in memory and are tried again: a full disk is said when it
                    // starts, every 10 s while it lasts, and when it ends.
                    match commit(&mut conn, &mut pending, &mut seen) {
                        Err(e) => {
                            crate::METRICS.ledger_failures.inc();
                            committing.failed(format_args!("{e} (charges are kept and tried again)"));
                        }
                        Ok(()) => committing.worked(),
                    }
                    committed = Instant::now();
                }
                if scanned.elapsed() >= FOREIGN_SCAN {
                    scanned = Instant::now();
                    match scan_foreign(&conn, &mut seen, &on_foreign, crate::period::now_secs()) {
                        Ok(0) => {}
                        Ok(n) => log::info!(
                            "budget: ${:.4} of spend written to the ledger by another process (an upgrade's old one) is counted",
                            n as f64 / 1e9
                        ),
                        Err(e) => log::warn!("budget: cannot read the ledger for other processes' spend: {e}"),
                    }
                }
            });
            let _ = commit(&mut conn, &mut pending, &mut seen);
        })
        .map_err(LedgerError::Writer)
}

/// Handle the filter keeps.
pub struct Ledger {
    pub tx: Sender<Msg>,
}

/// One row of a spend report.
#[derive(Debug, serde::Serialize, PartialEq)]
pub struct ReportRow {
    pub principal: String,
    pub model: String,
    pub usd: f64,
    pub requests: i64,
}

/// Spend per principal and model for days `from..to` (inclusive `from`, exclusive `to`, as
/// `YYYY-MM-DD`; `None` = no bound), optionally for one principal.
pub fn report(
    path: &Path,
    from: Option<&str>,
    to: Option<&str>,
    principal: Option<&str>,
) -> Result<Vec<ReportRow>, LedgerError> {
    if !path.exists() {
        return Err(LedgerError::Missing(path.to_path_buf()));
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sqlite(path))?;
    let mut stmt = conn
        .prepare(
            "SELECT principal, model, CAST(TOTAL(usd_nano) AS INTEGER), SUM(requests) FROM spend
             WHERE (?1 IS NULL OR day >= ?1) AND (?2 IS NULL OR day < ?2) AND (?3 IS NULL OR principal = ?3)
             GROUP BY principal, model ORDER BY TOTAL(usd_nano) DESC, principal, model",
        )
        .map_err(sqlite(path))?;
    let rows = stmt
        .query_map(params![from, to, principal], |r| {
            Ok(ReportRow {
                principal: r.get(0)?,
                model: r.get(1)?,
                usd: r.get::<_, i64>(2)? as f64 / 1e9,
                requests: r.get(3)?,
            })
        })
        .map_err(sqlite(path))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sqlite(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger writer on `path` with nothing known before and no other process.
    fn writer(path: &Path) -> (Sender<Msg>, std::thread::JoinHandle<()>) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let h = spawn(
            path.to_path_buf(),
            Duration::from_millis(50),
            rx,
            Seen::new(),
            Box::new(|_, _, _| {}),
        )
        .unwrap();
        (tx, h)
    }

    /// Commits now; whether the commit succeeded.
    fn flush(tx: &Sender<Msg>) -> bool {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        tx.blocking_send(Msg::Flush(ack)).unwrap();
        done.recv().unwrap()
    }

    #[test]
    fn batches_survive_and_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spend.db");
        let (tx, h) = writer(&path);
        for (p, n) in [("alice", 1_000_000_000), ("alice", 500_000_000), ("bob", 1)] {
            tx.blocking_send(Msg::Charge {
                day: "2026-11-23".into(),
                principal: p.into(),
                model: "m".into(),
                nano: n,
            })
            .unwrap();
        }
        flush(&tx);
        // Its owner's alone, whatever the umask, the journal files too.
        use std::os::unix::fs::PermissionsExt;
        for f in ["spend.db", "spend.db-wal", "spend.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let rows = report(&path, Some("2026-11-01"), Some("2026-12-01"), None).unwrap();
        assert_eq!(
            rows[0],
            ReportRow {
                principal: "alice".into(),
                model: "m".into(),
                usd: 1.5,
                requests: 2
            }
        );
        assert_eq!(rows.len(), 2);
        assert!(report(&path, Some("2026-12-01"), None, None)
            .unwrap()
            .is_empty());
        drop(tx);
        h.join().unwrap();
        let (history, _) = load(&path).unwrap();
        assert_eq!(
            history["alice"],
            vec![("2026-11-23".to_string(), 1_500_000_000)]
        );
    }

    /// Review: rows near the integers' end (charges at the cap, over many models) made
    /// `SUM()` fail with SQLite's integer overflow, and no ledger could be read at start.
    #[test]
    fn sums_past_the_integers_end_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spend.db");
        let (tx, h) = writer(&path);
        for model in ["a", "b", "c"] {
            tx.blocking_send(Msg::Charge {
                day: "2026-11-23".into(),
                principal: "big".into(),
                model: model.into(),
                nano: i64::MAX / 2,
            })
            .unwrap();
        }
        assert!(flush(&tx));
        drop(tx);
        h.join().unwrap();
        let (history, _) = load(&path).unwrap();
        assert_eq!(history["big"], vec![("2026-11-23".to_string(), i64::MAX)]);
        assert_eq!(report(&path, None, None, None).unwrap().len(), 3);
    }

    fn charge(tx: &Sender<Msg>, principal: &str, nano: Nano) {
        tx.blocking_send(Msg::Charge {
            day: day_of(crate::period::now_secs()),
            principal: principal.into(),
            model: "m".into(),
            nano,
        })
        .unwrap();
        flush(tx);
    }

    #[test]
    fn spend_another_process_writes_is_reported_once() {
        use std::sync::{Arc, Mutex};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spend.db");
        let (history, _) = load(&path).unwrap();
        let got = Arc::new(Mutex::new(HashMap::<String, Nano>::new()));
        let sink = got.clone();
        let (tx_a, rx_a) = tokio::sync::mpsc::channel(16);
        let a = spawn(
            path.clone(),
            Duration::from_millis(20),
            rx_a,
            recent(&history, crate::period::now_secs()),
            Box::new(move |p, day, n| {
                *sink
                    .lock()
                    .unwrap()
                    .entry(format!("{p}@{day}"))
                    .or_default() += n;
            }),
        )
        .unwrap();
        // A second process on the same file (an upgrade's old one).
        let (tx_b, rx_b) = tokio::sync::mpsc::channel(16);
        let b = spawn(
            path.clone(),
            Duration::from_millis(20),
            rx_b,
            Seen::new(),
            Box::new(|_, _, _| {}),
        )
        .unwrap();
        charge(&tx_a, "alice", 100);
        charge(&tx_b, "alice", 30);
        charge(&tx_b, "bob", 7);
        charge(&tx_a, "alice", 1);
        let today = crate::period::now_secs() / 86_400;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Two scans later nothing more: each amount is reported once, and never its own.
        std::thread::sleep(FOREIGN_SCAN * 2 + Duration::from_millis(200));
        let got = got.lock().unwrap().clone();
        // Charged on the day they were written (the test may cross midnight).
        let on_day = |who: &str| {
            [today, today + 1]
                .iter()
                .filter_map(|d| got.get(&format!("{who}@{d}")))
                .sum::<Nano>()
        };
        assert_eq!((on_day("alice"), on_day("bob")), (30, 7), "{got:?}");
        drop((tx_a, tx_b));
        a.join().unwrap();
        b.join().unwrap();
    }
}
