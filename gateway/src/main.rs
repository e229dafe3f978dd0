use std::io::{BufRead, IsTerminal};
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use filter_auth::keygen;
use llm_gateway::audit_report;
use llm_gateway::chain::FilterChain;
use llm_gateway::cli::{summary, Cli, Command, KeysCommand};
use llm_gateway::config;
use llm_gateway::registry::Registry;

// glibc's malloc showed up at ~9% of a proxy thread's profile; mimalloc's per-thread heaps
// make the many small per-request allocations (headers, JSON, request ids) cheaper.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `arena_eager_commit` option (v3's `mi_option_e`; not named by libmimalloc-sys).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Arenas are committed as they are used, not up front: mimalloc's default on Linux commits
/// whole arena chunks eagerly, 9 MiB of the idle gateway's 22 MiB. The first arena is made by
/// the first allocation, before `main`: so this runs as a constructor, and allocates nothing.
/// `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still wins.
extern "C" fn allocator_options() {
    // SAFETY: getenv with a NUL-terminated name, and a process-wide allocator option for which
    // any value is valid; nothing else runs yet.
    unsafe {
        if libc::getenv(c"MIMALLOC_ARENA_EAGER_COMMIT".as_ptr()).is_null() {
            libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        }
    }
}

/// Freed memory goes back to the OS after mimalloc's purge delay (10 ms), but mimalloc acts on
/// expired purges only when it allocates again, so a worker that went quiet after a
/// connection flood kept every page (10,000 closed connections left 150 MiB resident). A
/// thread of its own collects once a second: arenas are shared, so their expired purges
/// happen whichever thread asks. Purging at once instead (a delay of 0) cost one `madvise`
/// and half a page fault per request under load, about a tenth of a core.
fn spawn_allocator_purge() {
    let spawned = std::thread::Builder::new()
        .name("allocator-purge".into())
        .spawn(|| {
            // A thread that never allocated has no heap of its own, and mimalloc's collect
            // returns at once on such a thread, purging nothing.
            // SAFETY: initialises this thread's allocator state; safe on any thread.
            unsafe { libmimalloc_sys::mi_thread_init() };
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                // SAFETY: mimalloc's collect is safe to call from any thread at any time.
                unsafe { libmimalloc_sys::mi_collect(false) };
            }
        });
    if let Err(e) = spawned {
        log::warn!(
            "no allocator purge thread ({e}): freed memory returns only as the workers allocate"
        );
    }
}

#[used]
#[link_section = ".init_array"]
static ALLOCATOR_OPTIONS: extern "C" fn() = allocator_options;

fn main() -> ExitCode {
    llm_gateway::log_limit::Limited::install();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Check { config }) => return check(&config),
        Some(Command::Doctor { config, json }) => return doctor(config.as_deref(), json),
        Some(Command::Init(options)) => init(&options),
        Some(Command::Run { config, upgrade }) => return run(&config, upgrade),
        Some(Command::Keys(KeysCommand::New { id, name })) => keys_new(&id, name.as_deref()),
        Some(Command::Keys(KeysCommand::Hash)) => {
            read_secret("key").map(|k| println!("{}", keygen::hash_key(&k)))
        }
        Some(Command::HashPassword { user, cost }) => hash_password(user.as_deref(), cost),
        Some(Command::Spend {
            ledger,
            period,
            principal,
            json,
        }) => spend(&ledger, &period, principal.as_deref(), json),
        Some(Command::Audit {
            files,
            top,
            failures,
            since,
            key,
            follow,
            json,
            limit,
        }) => audit(
            &files,
            top,
            failures,
            since.as_deref(),
            key,
            follow,
            json,
            limit,
        ),
        None => match cli.config {
            Some(config) => return run(&config, cli.upgrade),
            None => {
                eprintln!("error: no config file given; run `llm-gateway --config conf/gateway.yaml` (see --help)");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(path: &Path) -> ExitCode {
    let registry = Registry::builtin();
    let result = config::load(path).and_then(|s| FilterChain::check(&s, &registry).map(|c| (s, c)));
    match result {
        Ok((settings, chain)) => {
            print!("{}", summary(&settings, &chain));
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } == 0 {
                eprintln!("note: checked as root, who may read and write every file: whether the service's user may was not checked; run it as that user too (sudo -u llm-gateway llm-gateway check --config ...)");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(path: &Path, upgrade: bool) -> ExitCode {
    // Before any thread exists (building the chain starts the audit writer).
    llm_gateway::server::block_ctrl_c();
    llm_gateway::server::ignore_sighup_until_handled();
    spawn_allocator_purge();
    llm_gateway::fd_limit::raise();
    let registry = Registry::builtin();
    match config::load(path).and_then(|s| llm_gateway::server::prepare(s, &registry, upgrade)) {
        Ok(prepared) => llm_gateway::server::run(prepared),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn doctor(config: Option<&Path>, json: bool) -> ExitCode {
    let findings = llm_gateway::doctor::run(config);
    if json {
        let out = serde_json::json!({"ok": findings.is_empty(), "findings": findings});
        println!("{out}");
    } else {
        print!("{}", llm_gateway::doctor::report(&findings));
    }
    if findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn init(o: &llm_gateway::init::InitOptions) -> Result<(), String> {
    let w = llm_gateway::init::run(o).map_err(|e| e.to_string())?;
    for f in &w.files {
        println!("wrote {} (0600)", f.display());
    }
    println!("\nThe admin key (scope admin); it is shown only this once, store it now:");
    println!("{}", w.admin_key);
    println!(
        "\nNext:\n  llm-gateway check --config {c}\n  llm-gateway --config {c}\n  llm-gateway doctor --config {c}    # is anything still open?",
        c = w.config.display()
    );
    Ok(())
}

fn keys_new(id: &str, name: Option<&str>) -> Result<(), String> {
    if id.is_empty() {
        return Err("--id must not be empty".into());
    }
    let key = keygen::new_key().map_err(|e| e.to_string())?;
    println!("# API key for {id}; it is shown only this once, store it now:");
    println!("{key}");
    println!("# Add this entry under `keys:` in the keys file (it holds only the key's hash):");
    print!("{}", keygen::key_entry(id, name, &key));
    Ok(())
}

/// One line of stdin without its line ending; refuses an empty one.
fn read_secret(what: &str) -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the {what} from stdin: {e}"))?;
    let secret = line.trim_end_matches(['\r', '\n']).to_string();
    if secret.is_empty() {
        return Err(format!("no {what} on stdin"));
    }
    Ok(secret)
}

fn hash_password(user: Option<&str>, cost: u32) -> Result<(), String> {
    if user.is_some_and(|u| u.contains(':') || u.is_empty()) {
        return Err("--user must be non-empty and must not contain ':'".into());
    }
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("the passwords differ".into());
        }
        if first.is_empty() {
            return Err("empty password".into());
        }
        first
    } else {
        read_secret("password")?
    };
    let hash = keygen::hash_password(&password, cost).map_err(|e| e.to_string())?;
    match user {
        Some(u) => println!("{u}:{hash}"),
        None => println!("{hash}"),
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn audit(
    files: &[std::path::PathBuf],
    top: Option<audit_report::TopBy>,
    failures: bool,
    since: Option<&str>,
    key: Option<String>,
    follow: bool,
    json: bool,
    limit: usize,
) -> Result<(), String> {
    let sel = audit_report::Selection::new(since, key)?;
    if follow {
        let last = files.last().ok_or("no file to follow")?;
        if !json {
            println!(
                "{}",
                audit_report::FOLLOW_COLUMNS
                    .map(str::to_uppercase)
                    .join("  ")
            );
        }
        return audit_report::follow(last, &sel, json);
    }
    let question = match (top, failures) {
        (Some(by), _) => audit_report::Question::Top(by),
        (None, true) => audit_report::Question::Failures,
        (None, false) => audit_report::Question::Summary,
    };
    let mut tally = audit_report::Tally::new(question);
    let bad = audit_report::read_lines(files, &sel, |l| tally.add(l))?;
    if bad > 0 {
        eprintln!("warning: skipped {bad} lines that are not JSON");
    }
    let columns: Vec<&str> = match question {
        audit_report::Question::Top(by) => vec![
            audit_report::field(by),
            "requests",
            "errors",
            "prompt_tokens",
            "completion_tokens",
        ],
        audit_report::Question::Failures => vec!["status", "decision", "requests"],
        audit_report::Question::Summary => {
            let s = tally.summary();
            if json {
                println!("{s}");
            } else {
                for (k, v) in s.as_object().into_iter().flatten() {
                    println!(
                        "{k:<18} {}",
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    );
                }
            }
            return Ok(());
        }
    };
    let rows = tally.rows(limit);
    if json {
        println!("{}", serde_json::Value::Array(rows));
    } else {
        print!("{}", audit_report::table(&rows, &columns));
    }
    Ok(())
}

fn spend(
    ledgers: &[std::path::PathBuf],
    period: &str,
    principal: Option<&str>,
    json: bool,
) -> Result<(), String> {
    let bounds = match period {
        "all" => None,
        "current" => {
            let today = filter_budget::day_of(filter_budget::now_secs());
            let (y, m) = (
                today[..4].parse().unwrap_or(1970),
                today[5..7].parse().unwrap_or(1),
            );
            Some(filter_budget::month_days(y, m))
        }
        p => {
            let bad = || format!("--period {p:?}: use current, all or YYYY-MM");
            let (y, m) = p.split_once('-').ok_or_else(bad)?;
            let (y, m): (i64, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if !(1..=12).contains(&m) {
                return Err(bad());
            }
            Some(filter_budget::month_days(y, m))
        }
    };
    let (from, to) = match &bounds {
        Some((f, t)) => (Some(f.as_str()), Some(t.as_str())),
        None => (None, None),
    };
    // Several replicas' ledgers add up: each holds only its own charges.
    let mut sums: std::collections::BTreeMap<(String, String), (f64, i64)> = Default::default();
    for ledger in ledgers {
        for r in filter_budget::report(ledger, from, to, principal).map_err(|e| e.to_string())? {
            let e = sums.entry((r.principal, r.model)).or_default();
            e.0 += r.usd;
            e.1 += r.requests;
        }
    }
    let mut rows: Vec<filter_budget::ReportRow> = sums
        .into_iter()
        .map(
            |((principal, model), (usd, requests))| filter_budget::ReportRow {
                principal,
                model,
                usd,
                requests,
            },
        )
        .collect();
    rows.sort_by(|a, b| b.usd.total_cmp(&a.usd));
    if json {
        println!(
            "{}",
            serde_json::to_string(&rows).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let values: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::json!({"principal": r.principal, "model": r.model, "usd": format!("{:.4}", r.usd), "requests": r.requests}))
        .collect();
    print!(
        "{}",
        audit_report::table(&values, &["principal", "model", "usd", "requests"])
    );
    // Plus 0.0: an empty float sum is -0.0, printed "$-0.0000".
    let total: f64 = rows.iter().map(|r| r.usd).sum::<f64>() + 0.0;
    println!(
        "total: ${total:.4} ({})",
        if period == "current" {
            "this month"
        } else {
            period
        }
    );
    Ok(())
}
