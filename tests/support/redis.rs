//! A real `redis-server` (Debian's package; `tests/bootstrap.sh` installs it) on an
//! ephemeral port, without persistence, for the shared-state tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let mut r = Redis {
            child: None,
            port: super::free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        r.restart();
        r
    }

    /// `state:` for a gateway on this server (a short deadline; holds live 1 s).
    pub fn state(&self) -> String {
        format!(
            "state: {{ backend: redis, url: 'redis://127.0.0.1:{}/0', timeout: 100ms, lease_ttl: 1s, breaker_retry: 200ms }}\n",
            self.port
        )
    }

    /// Starts the server (again) on the same port, empty.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server is installed (apt-get install redis-server, or tests/bootstrap.sh)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cmd(&["PING"]).as_deref() != Some("+PONG") {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
