//! A Warren running as a separate process (the real binary), for restart
//! and crash tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct WarrenProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl WarrenProcess {
    /// Starts `warren` on a free port with `data_dir`; waits for its ready line.
    pub fn start(data_dir: &Path) -> WarrenProcess {
        Self::start_with(data_dir, &[])
    }

    pub fn start_with(data_dir: &Path, extra: &[&str]) -> WarrenProcess {
        let log = data_dir.with_extension(format!("log-{}", std::process::id()));
        let logfile = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                "0",
                "--mgmt-port",
                "0",
                "--metrics-port",
                "0",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(logfile)
            .spawn()
            .expect("spawn warren");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log2)
                .ok();
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(o) = out.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(o, "{line}");
                }
                if !sent {
                    if let Some(i) = line.find("connections on ") {
                        let addr = line[i + "connections on ".len()..]
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .to_string();
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "warren did not become ready; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let addr: SocketAddr = addr
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .expect("address");
        WarrenProcess {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// SIGTERM and wait (graceful).
    pub fn stop(mut self) {
        unsafe_kill(self.child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("warren did not stop within 20 s of SIGTERM");
    }

    /// SIGKILL: a crash.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WarrenProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}
