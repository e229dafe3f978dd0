//! A real `redis-server` (Debian's package; `tests/bootstrap.sh` installs it) on an
//! ephemeral port, without persistence, for the shared-state tests. `REDIS_SERVER` names
//! another server binary that takes the same options, such as `valkey-server`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// TLS only, with these files and a password (`start_tls`).
    tls: Option<(super::certs::Pki, String)>,
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis {
            child: None,
            port: super::free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            tls: None,
        };
        r.restart();
        r
    }

    /// A server that speaks only TLS (certificates from a test CA) and wants `password`.
    pub fn start_tls(password: &str) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = super::certs::make(dir.path());
        let mut r = Redis {
            child: None,
            port: super::free_port(),
            dir,
            tls: Some((pki, password.to_string())),
        };
        r.restart();
        r
    }

    /// The test CA's certificate (TLS servers only).
    pub fn ca(&self) -> String {
        self.tls
            .as_ref()
            .expect("a TLS server")
            .0
            .ca
            .display()
            .to_string()
    }

    /// `state:` for a gateway on this server (a short deadline; holds live 1 s).
    pub fn state(&self) -> String {
        format!(
            "state: {{ backend: redis, url: 'redis://127.0.0.1:{}/0', timeout: 100ms, lease_ttl: 1s, breaker_retry: 200ms }}\n",
            self.port
        )
    }

    /// `state:` for a gateway on this server's Unix socket, database `db` (plain servers only).
    pub fn state_unix(&self, db: u8) -> String {
        format!(
            "state: {{ backend: redis, url: 'unix://{}?db={db}', timeout: 100ms, lease_ttl: 1s, breaker_retry: 200ms }}\n",
            self.socket().display()
        )
    }

    /// The server's Unix socket (plain servers listen on one besides their port).
    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// Starts the server (again) on the same port, empty.
    pub fn restart(&mut self) {
        let mut cmd =
            Command::new(std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into()));
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ])
        .arg(self.dir.path());
        match &self.tls {
            None => cmd
                .args(["--port", &self.port.to_string(), "--unixsocket"])
                .arg(self.socket())
                .args(["--unixsocketperm", "700"]),
            Some((pki, password)) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&pki.server_cert)
                .arg("--tls-key-file")
                .arg(&pki.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&pki.ca)
                .args(["--tls-auth-clients", "no", "--requirepass", password]),
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server is installed (apt-get install redis-server, or tests/bootstrap.sh)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let ready = |r: &Redis| match r.tls {
            None => r.cmd(&["PING"]).as_deref() == Some("+PONG"),
            Some(_) => TcpStream::connect(("127.0.0.1", r.port)).is_ok(),
        };
        while !ready(self) {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` (`STOP`: the server hangs, answering nothing; `CONT`: it goes on).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `INFO commandstats`: how many times each command ran since the last `CONFIG RESETSTAT`.
    pub fn calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.info("commandstats")
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A counter of `INFO stats`, e.g. `total_reads_processed`: how many times the server
    /// read from its clients' sockets (pipelined commands that arrive together are one).
    pub fn stat(&self, name: &str) -> u64 {
        let prefix = format!("{name}:");
        self.info("stats")
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The text of `INFO section`.
    pub fn info(&self, section: &str) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!("*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len());
        let _ = s.write_all(req.as_bytes());
        let mut text = String::new();
        let mut buf = [0u8; 65536];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.ends_with("\r\n\r\n") || text.matches("\r\n").count() > 2 && n < buf.len() {
                break;
            }
        }
        text
    }

    /// One command; the first line of the answer.
    pub fn cmd(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        text.lines().next().map(str::to_string)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
