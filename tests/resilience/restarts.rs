//! Stopping and restarting: SIGTERM and Ctrl-C drain and flush, kill -9 loses at most one
//! commit window, spend survives a restart.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::budget::*;
use crate::support::routing::MODEL;
use crate::support::*;

fn read_audit(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_streams_then_exits() {
    let m = mock().await;
    let mut gw = Gateway::start(&format!(
        "{}server: {{ threads: 2, drain_timeout: 5s }}\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let resp = client()
        .post(gw.url("/api/chat"))
        .header("x-mock-chunks", "10")
        .header("x-mock-delay-ms", "100")
        .json(&json!({"model": MODEL, "messages": []}))
        .send()
        .await
        .unwrap();
    let start = Instant::now();
    gw.signal("TERM");
    let body = resp.bytes().await.expect("the in-flight stream completes");
    assert!(String::from_utf8_lossy(&body).contains("\"done\":true"));
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(6)))
        .expect("exits after draining");
    assert!(status.success(), "{status}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "exited {:?} after SIGTERM",
        start.elapsed()
    );
    // The log counts the one running request once.
    let log = gw.log();
    assert!(
        log.contains("draining 1 in-flight requests"),
        "{}",
        log.lines()
            .filter(|l| l.contains("draining"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // New connections are refused once it is gone.
    assert!(client().get(gw.url("/health")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_that_runs_out_still_writes_what_finished() {
    // Operator review: with a request still running at `drain_timeout`, Pingora's grace
    // period (the same length, started first) ended the process before the final flush:
    // audit lines and ledger charges of requests that had finished were lost.
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &m, 100.0, 0.0, 10000.0, "")
        .replace(
            "filters:",
            "server: { threads: 2, drain_timeout: 1s }\nfilters:",
        )
        .replace(
            "  - use: budget\n",
            "  - use: budget\n    commit_interval: 10s\n",
        );
    let mut gw = Gateway::start(&cfg).await;
    let body = json!({"model": "llama3.1:8b", "prompt": "x", "stream": false});
    for _ in 0..3 {
        let r = client()
            .post(gw.url("/api/generate"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // One that outlives the drain.
    let running = tokio::spawn(
        client()
            .post(gw.url("/api/generate"))
            .bearer_auth(KEY)
            .header("x-mock-chunks", "40")
            .header("x-mock-delay-ms", "200")
            .json(&json!({"model": "llama3.1:8b", "prompt": "x"}))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.signal("TERM");
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)))
        .expect("exits after the drain");
    assert!(status.success(), "{status}");
    drop(running);
    let log = gw.log();
    assert!(log.contains("requests still in flight; exiting"), "{log}");
    // The three that finished are in the audit log and the ledger.
    let lines = read_audit(&dir.path().join("audit.jsonl"));
    assert!(lines.len() >= 3, "{} lines\n{log}", lines.len());
    let spent: Vec<Value> = spend_json(dir.path());
    let requests: u64 = spent.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert!(requests >= 3, "{spent:?}\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn spend_survives_a_restart() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &m, 0.12, 0.0, 10000.0, "");
    let body = json!({"model": "llama3.1:8b", "prompt": "x", "stream": false});
    let mut gw = Gateway::start(&cfg).await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(
            client()
                .post(gw.url("/api/generate"))
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(codes, [200, 200, 429]);
    gw.signal("TERM");
    tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10))).expect("exits");

    let gw = Gateway::start(&cfg).await;
    // The spend shows before the principal asks again.
    let report = spend_report(&gw).await;
    let buyer = account_of(&report, "buyer")
        .unwrap_or_else(|| panic!("no buyer account after restart: {report}"));
    assert_eq!(cents(buyer["spent_usd"].as_f64().unwrap()), 10, "{report}");
    let r = client()
        .post(gw.url("/api/generate"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "the restarted gateway remembers the spend");
    let (code, msg) = error_of(r).await;
    assert_eq!(code, "budget_exceeded");
    assert!(
        msg.contains("$0.12 per 1d") && msg.contains("resets at"),
        "{msg}"
    );
    let out = Command::new(BIN)
        .args([
            "spend",
            "--ledger",
            dir.path().join("spend.db").to_str().unwrap(),
            "--principal",
            "buyer",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("buyer") && text.contains("0.1000") && text.contains("total: $0.1000"),
        "{text}"
    );
}

/// The global budget counts everyone's spend, after a restart too: the ledger charges each
/// request to its principal, and the global account opens with all of them.
#[tokio::test(flavor = "multi_thread")]
async fn the_global_budget_survives_a_restart() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &m,
        100.0,
        0.0,
        10000.0,
        "    global: { max_usd: 0.12, period: 1d }\n",
    );
    let mut gw = Gateway::start(&cfg).await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(generate(gw.url("/api/generate")).await.0);
    }
    assert_eq!(codes, [200, 200, 429], "$0.05 each against $0.12");
    gw.signal("TERM");
    tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10))).expect("exits");
    let gw = Gateway::start(&cfg).await;
    // Shown before anyone asks again.
    let report = spend_report(&gw).await;
    let global = account_of(&report, "*")
        .unwrap_or_else(|| panic!("no global account after restart: {report}"));
    assert_eq!(cents(global["spent_usd"].as_f64().unwrap()), 10, "{report}");
    let r = client()
        .post(gw.url("/api/generate"))
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3.1:8b", "prompt": "x", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        429,
        "the restarted gateway remembers the global spend"
    );
    let (code, msg) = error_of(r).await;
    assert_eq!(code, "budget_exceeded");
    assert!(msg.contains("gateway"), "{msg}");
}

/// Four clients sending the buyer's requests one after another until one fails; the count of
/// answered requests.
fn buyer_load(gw: &Gateway) -> (Arc<AtomicU32>, Vec<tokio::task::JoinHandle<()>>) {
    let served = Arc::new(AtomicU32::new(0));
    let url = gw.url("/api/generate");
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (url, served) = (url.clone(), served.clone());
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                loop {
                    let r = c
                        .post(&url)
                        .bearer_auth(KEY)
                        .json(&json!({"model": "llama3.1:8b", "prompt": "x", "stream": false}))
                        .send()
                        .await;
                    let Ok(r) = r else { break };
                    if r.status() != 200 || r.bytes().await.is_err() {
                        break;
                    }
                    served.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    (served, workers)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_at_most_the_last_commit_window() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &m, 1_000_000.0, 0.0, 10000.0, "");
    let gw = Gateway::start(&cfg).await;
    let start = Instant::now();
    let (served, workers) = buyer_load(&gw);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.signal("KILL");
    for w in workers {
        let _ = w.await;
    }
    let elapsed = start.elapsed();
    let served = served.load(Ordering::SeqCst);
    let rows = spend_json(dir.path());
    let ledger = rows.first().map_or(0, |r| r["requests"].as_u64().unwrap()) as u32;
    let rate = f64::from(served) / elapsed.as_secs_f64();
    let bound = (rate * 0.25).ceil() as u32 + 4;
    println!("kill -9: {served} requests served, {ledger} in the ledger, lost {} (bound {bound} = 250 ms at {rate:.0} req/s + 4 in flight)", served - ledger.min(served));
    assert!(served > 100, "load ran: {served}");
    assert!(ledger <= served, "nothing is charged twice");
    assert!(
        served - ledger <= bound,
        "lost {} > bound {bound}",
        served - ledger
    );
    // What was committed is intact: a restart reads it, and shows it before anyone asks.
    let gw = Gateway::start(&cfg).await;
    let report = spend_report(&gw).await;
    let buyer = account_of(&report, "buyer").unwrap_or_else(|| panic!("{report}"));
    // Each request costs 5 completion tokens at $0.01.
    assert_eq!(
        cents(buyer["spent_usd"].as_f64().unwrap()),
        cents(f64::from(ledger) * 0.05),
        "{report}"
    );
}

/// Ctrl-C under load drains like SIGTERM: every answered request is in the ledger (Pingora's
/// own SIGINT would exit with the last commit window unwritten).
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_under_load_commits_every_charge() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &m, 1_000_000.0, 0.0, 10000.0, "");
    let mut gw = Gateway::start(&cfg).await;
    let (served, workers) = buyer_load(&gw);
    tokio::time::sleep(Duration::from_millis(800)).await;
    gw.signal("INT");
    for w in workers {
        let _ = w.await;
    }
    let status =
        tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(15))).expect("exits");
    assert!(status.success(), "{status}");
    let served = served.load(Ordering::SeqCst);
    let rows = spend_json(dir.path());
    let ledger = rows.first().map_or(0, |r| r["requests"].as_u64().unwrap()) as u32;
    assert!(served > 50, "load ran: {served}");
    assert_eq!(ledger, served, "every answered request is charged once");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_loses_no_audit_line() {
    signal_under_load_loses_no_audit_line("TERM").await;
}

/// Ctrl-C drains and flushes like SIGTERM (Pingora's own SIGINT would drop what is queued).
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_under_load_loses_no_audit_line() {
    signal_under_load_loses_no_audit_line("INT").await;
}

async fn signal_under_load_loses_no_audit_line(sig: &str) {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut gw = Gateway::start(&format!(
        "{}filters:\n  - use: audit\n    file: {}\n    queue: 4\n",
        backends(&[("local", &m.url())]),
        audit.display()
    ))
    .await;
    let url = gw.url("/api/generate");
    let mut tasks = Vec::new();
    for w in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let mut answered = 0u32;
            for i in 0..400 {
                let r = c
                    .post(&url)
                    .header("x-mock-delay-ms", if (w + i) % 5 == 0 { "20" } else { "0" })
                    .json(&json!({"model": "llama3.1:8b", "prompt": "x"}))
                    .send()
                    .await;
                match r {
                    Ok(r) => {
                        if r.bytes().await.is_ok() {
                            answered += 1;
                        }
                    }
                    Err(_) => break,
                }
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal(sig);
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    let status =
        tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(15))).expect("exits");
    assert!(status.success());
    let lines = read_audit(&audit).len();
    assert!(answered > 50, "load ran: {answered}");
    assert_eq!(
        lines as u32, answered,
        "every answered request has its audit line"
    );
}

/// `--upgrade` under steady load: the new process asks the old one for its listening sockets
/// (SIGQUIT) once it is ready and takes them over; the old one finishes its running stream
/// and exits as soon as it has nothing in flight (well before its drain time); no request
/// fails: not on new connections, not on kept-alive ones, not the stream on the old process.
#[tokio::test(flavor = "multi_thread")]
async fn upgrade_takes_the_sockets_over_without_failing_a_request() {
    let m = mock().await;
    let mut old = Gateway::start(&format!(
        "{}server: {{ threads: 2, drain_timeout: 60s, upgrade_sock: up.sock }}\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicU32::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    // Four clients with kept-alive connections, one that connects anew for every request.
    for fresh in [false, false, false, false, true] {
        let (stop, ok, failures, url) = (
            stop.clone(),
            ok.clone(),
            failures.clone(),
            old.url("/api/chat"),
        );
        load.push(tokio::spawn(async move {
            let c = if fresh {
                reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap()
            } else {
                client()
            };
            while !stop.load(Ordering::Relaxed) {
                let r = c.post(&url).json(&chat()).send().await;
                match r {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failures.lock().unwrap().push(format!("body: {e:?}"));
                            0
                        }
                    },
                    Ok(r) => {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("status {}", r.status()));
                        0
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(format!("{e:?}"));
                        0
                    }
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    // A stream that runs on the old process through the whole hand-over (30 chunks, 8 s).
    let stream = client()
        .post(old.url("/api/chat"))
        .header("x-mock-chunks", "30")
        .header("x-mock-delay-ms", "270")
        .json(&json!({"model": MODEL, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = ok.load(Ordering::Relaxed);
    let quit = Instant::now();
    let mut new = old.start_upgrade().await;
    let body = stream.bytes().await.expect("the running stream completes");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(body.lines().count(), 31, "{body}");
    assert!(body.contains("\"done\":true"), "{body}");
    let status = tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(20)))
        .unwrap_or_else(|| panic!("the old process did not exit:\n{}", old.log()));
    let exited = quit.elapsed();
    assert!(status.success(), "{status}");
    // Gone once nothing ran (the stream, and Pingora's fixed 5 s of accepting on both), not
    // after its 60 s drain time.
    assert!(
        exited < Duration::from_secs(15),
        "old exited {exited:?} after SIGQUIT"
    );
    // The new process serves alone for a while.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        ok.load(Ordering::Relaxed) > before + 100,
        "load ran through the hand-over"
    );
    let health = client().get(new.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(new.log().contains("listening"), "{}", new.log());
    assert!(old.log().contains("SIGQUIT"), "{}", old.log());
    assert!(
        new.wait_exit(Duration::from_millis(10)).is_none(),
        "the new process runs on"
    );
}

/// Spend across an upgrade: the old process charges the stream it finishes after the new one
/// took over; the new one counts that charge within a second or two (both write one ledger),
/// without waiting for a restart.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_keeps_the_spend_the_old_process_charges_while_draining() {
    let m = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}server: {{ drain_timeout: 60s, upgrade_sock: {}/up.sock }}\n",
        config(dir.path(), &m, 100.0, 0.0, 10000.0, ""),
        dir.path().display()
    );
    let mut old = Gateway::start(&cfg).await;
    // A stream that runs on the old process through the hand-over, charged when it ends.
    let stream = client()
        .post(old.url("/api/chat"))
        .bearer_auth(KEY)
        .header("x-mock-chunks", "5")
        .header("x-mock-delay-ms", "400")
        .json(&json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let new = old.start_upgrade().await;
    let body = stream
        .bytes()
        .await
        .expect("the stream completes on the old process");
    assert!(String::from_utf8_lossy(&body).contains("\"done\":true"));
    tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(20)))
        .unwrap_or_else(|| panic!("the old process did not exit:\n{}", old.log()));
    // The new process had read the ledger before that charge; it serves the buyer now.
    assert_eq!(generate(new.url("/api/generate")).await.0, 200);
    // The ledger of record has both charges (5 tokens at $10,000 per 1M each); the new
    // process counts both.
    let ledger = || -> f64 {
        spend_json(dir.path())
            .iter()
            .filter(|r| r["principal"] == "buyer")
            .map(|r| r["usd"].as_f64().unwrap())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut book, mut of_record) = (spent_of(&spend_report(&new).await, "buyer"), ledger());
    while (cents(book), cents(of_record)) != (10, 10) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (book, of_record) = (spent_of(&spend_report(&new).await, "buyer"), ledger());
    }
    assert_eq!(cents(of_record), 10, "both charges are in the ledger");
    assert_eq!(
        cents(book),
        10,
        "the new process's book against the ledger:\n{}",
        new.log()
    );
}

/// An upgrade that cannot start (a broken config, or no gateway running) leaves the running
/// gateway untouched: it is never told to go.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_upgrade_leaves_the_running_gateway_serving() {
    let m = mock().await;
    let mut old = Gateway::start(&format!(
        "{}server: {{ threads: 1, upgrade_sock: up.sock }}\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let upgrade = || {
        Command::new(BIN)
            .arg("--config")
            .arg(old.config_path())
            .arg("--upgrade")
            .output()
            .unwrap()
    };
    // The new config is broken: the new process stops before asking for anything.
    let good = std::fs::read_to_string(old.config_path()).unwrap();
    std::fs::write(
        old.config_path(),
        format!("{good}limits: {{ max_bdy: 1MiB }}\n"),
    )
    .unwrap();
    let out = upgrade();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_bdy"));
    // No gateway behind the pid file: refused, naming why.
    std::fs::write(old.config_path(), &good).unwrap();
    let pid_file = old.dir.path().join("up.pid");
    let real = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(real.trim(), old.pid().to_string());
    std::fs::write(&pid_file, "1\n").unwrap();
    let out = upgrade();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a running llm-gateway"), "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        old.wait_exit(Duration::from_millis(10)).is_none(),
        "the old gateway runs on"
    );
    let health = client().get(old.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

/// A listener the new config no longer has is closed by the upgrade, not left accepting
/// connections nobody answers.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_closes_the_listeners_the_new_config_dropped() {
    let m = mock().await;
    let dropped = free_port();
    let mut old = Gateway::start(&format!(
        "  - addr: 127.0.0.1:{dropped}\n{}server: {{ threads: 1, upgrade_sock: up.sock }}\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let url = format!("http://127.0.0.1:{dropped}/health");
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
    let config = std::fs::read_to_string(old.config_path()).unwrap();
    std::fs::write(
        old.config_path(),
        config.replace(&format!("  - addr: 127.0.0.1:{dropped}\n"), ""),
    )
    .unwrap();
    let new = old.start_upgrade().await;
    tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(20)))
        .unwrap_or_else(|| panic!("the old process did not exit:\n{}", old.log()));
    assert_eq!(
        client()
            .get(new.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let r = c.get(&url).send().await;
    assert!(
        r.as_ref().is_err_and(|e| e.is_connect()),
        "the dropped listener still takes connections: {r:?}"
    );
}

/// `kill -USR2` (what `systemctl kill -s USR2` sends under systemd) starts the binary again
/// with `--upgrade`, which takes the sockets over; with `NOTIFY_SOCKET` set the first process
/// says `READY=1`, and the new one names itself the main process. The new process is not the
/// old one's child: systemd supervises a main process that is not its own child as "alien"
/// and SIGKILLs it at once on `systemctl stop` (seen under systemd 252), so it is orphaned at
/// once and handed to init (here: to whatever adopts orphans).
#[tokio::test(flavor = "multi_thread")]
async fn usr2_upgrades_in_place_and_tells_systemd() {
    let m = mock().await;
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let recv = |notify: &std::os::unix::net::UnixDatagram| {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let mut old = Gateway::start_env(
        &format!(
            "{}server: {{ threads: 1, upgrade_sock: up.sock }}\n",
            backends(&[("local", &m.url())])
        ),
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    )
    .await;
    assert_eq!(tokio::task::block_in_place(|| recv(&notify)), "READY=1");
    old.signal("USR2");
    let said = tokio::task::block_in_place(|| recv(&notify));
    let new_pid: u32 = said
        .strip_prefix("MAINPID=")
        .and_then(|s| s.strip_suffix("\nREADY=1"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{said:?}\n{}", old.log()));
    assert_ne!(new_pid, old.pid());
    // The new process is nobody's child here: it is stopped however the test ends.
    let _new = KillOnDrop(new_pid);
    assert_ne!(
        parent_of(new_pid),
        old.pid(),
        "the new process is the old one's child"
    );
    tokio::task::block_in_place(|| old.wait_exit(Duration::from_secs(20)))
        .unwrap_or_else(|| panic!("the old process did not exit:\n{}", old.log()));
    let health = client().get(old.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200, "the new process serves");
    let pid_file = std::fs::read_to_string(old.dir.path().join("up.pid")).unwrap();
    assert_eq!(pid_file.trim(), new_pid.to_string());
}

/// Sends SIGTERM to a process when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.to_string()).status();
    }
}

/// The parent of a running process, from `/proc`.
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command's name in parentheses: the state, then the parent's pid.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no parent in {stat:?}"))
}

/// A new process that stops before taking the sockets over (here: a config that no longer
/// parses) leaves the old one serving, and the old one says so; the new process says why.
#[tokio::test(flavor = "multi_thread")]
async fn usr2_with_a_broken_config_leaves_the_old_process_serving() {
    let m = mock().await;
    let old = Gateway::start(&format!(
        "{}server: {{ threads: 1, upgrade_sock: up.sock }}\n",
        backends(&[("local", &m.url())])
    ))
    .await;
    let config = std::fs::read_to_string(old.config_path()).unwrap();
    std::fs::write(old.config_path(), format!("{config}bogus_key: 1\n")).unwrap();
    old.signal("USR2");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !old.log().contains("ended before taking the sockets over") {
        assert!(
            std::time::Instant::now() < deadline,
            "the old process never said the upgrade failed:\n{}",
            old.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = old.log();
    assert!(log.contains("unknown field `bogus_key`"), "{log}");
    let health = client().get(old.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200, "the old process serves on");
}
