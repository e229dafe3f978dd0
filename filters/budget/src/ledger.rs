//! The durable ledger: spend per UTC day, principal and model in an SQLite file (WAL mode).
//! Charges are summed in memory by a dedicated thread and committed in one transaction at
//! most every `commit_interval`, and on shutdown: no proxy thread waits on disk, and a crash
//! loses at most the last interval.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection};
use tokio::sync::mpsc::{Receiver, Sender};

use crate::prices::Nano;

pub enum Msg {
    Charge {
        day: String,
        principal: String,
        model: String,
        nano: Nano,
    },
    Flush(std::sync::mpsc::SyncSender<()>),
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
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
}

/// Spend already in the ledger, per principal and day.
pub type History = HashMap<String, Vec<(String, Nano)>>;

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
    move |source| LedgerError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// The spend already in the ledger, and the ledger's own id, made at its first use: the field
/// under which shared state (Redis) holds this replica's spend, so a restarted replica finds
/// and repairs its own share, and two replicas never write each other's.
pub fn load(path: &Path) -> Result<(History, String), LedgerError> {
    let conn = open(path).map_err(sqlite(path))?;
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
        .prepare("SELECT principal, day, SUM(usd_nano) FROM spend GROUP BY principal, day")
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
) -> rusqlite::Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO spend (day, principal, model, usd_nano, requests) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (day, principal, model) DO UPDATE SET usd_nano = usd_nano + ?4, requests = requests + ?5",
        )?;
        for ((day, principal, model), (nano, n)) in pending.iter() {
            stmt.execute(params![day, principal, model, nano, n])?;
        }
    }
    tx.commit()?;
    pending.clear();
    Ok(())
}

/// Opens the ledger now (a bad path is a startup error) and starts the writer thread.
pub fn spawn(
    path: PathBuf,
    interval: Duration,
    mut rx: Receiver<Msg>,
) -> Result<std::thread::JoinHandle<()>, LedgerError> {
    let mut conn = open(&path).map_err(sqlite(&path))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(LedgerError::Writer)?;
    std::thread::Builder::new()
        .name("budget-ledger".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut pending: HashMap<(String, String, String), (Nano, i64)> = HashMap::new();
                let mut tick = tokio::time::interval(interval);
                loop {
                    tokio::select! {
                        msg = rx.recv() => match msg {
                            Some(Msg::Charge { day, principal, model, nano }) => {
                                let e = pending.entry((day, principal, model)).or_insert((0, 0));
                                e.0 += nano;
                                e.1 += 1;
                            }
                            Some(Msg::Flush(ack)) => {
                                if let Err(e) = commit(&mut conn, &mut pending) {
                                    log::error!("budget: ledger commit failed: {e}");
                                }
                                let _ = ack.send(());
                            }
                            None => break,
                        },
                        _ = tick.tick() => {
                            if let Err(e) = commit(&mut conn, &mut pending) {
                                log::error!("budget: ledger commit failed, will retry: {e}");
                            }
                        }
                    }
                }
                let _ = commit(&mut conn, &mut pending);
            })
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
            "SELECT principal, model, SUM(usd_nano), SUM(requests) FROM spend
             WHERE (?1 IS NULL OR day >= ?1) AND (?2 IS NULL OR day < ?2) AND (?3 IS NULL OR principal = ?3)
             GROUP BY principal, model ORDER BY SUM(usd_nano) DESC, principal, model",
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

    #[test]
    fn batches_survive_and_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spend.db");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let h = spawn(path.clone(), Duration::from_millis(50), rx).unwrap();
        for (p, n) in [("alice", 1_000_000_000), ("alice", 500_000_000), ("bob", 1)] {
            tx.blocking_send(Msg::Charge {
                day: "2026-11-23".into(),
                principal: p.into(),
                model: "m".into(),
                nano: n,
            })
            .unwrap();
        }
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        tx.blocking_send(Msg::Flush(ack)).unwrap();
        done.recv().unwrap();
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
}
