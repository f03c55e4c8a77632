//! Resource alarms, as RabbitMQ's: when resident memory passes the high
//! watermark or free disk space under the data directory falls below the
//! limit, publishing connections are blocked (connection.blocked, and no
//! longer read from) while consumers keep draining; when it clears they are
//! unblocked. One monitor task checks every `check_interval_ms`, and at once
//! when an operator changes a limit.

use super::Broker;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{info, warn};

/// Current limits; changeable at run time.
#[derive(Debug, Default)]
pub struct Limits {
    /// Resident memory above which publishers are blocked (bytes, 0 = off).
    pub memory_bytes: AtomicU64,
    /// Free disk below which publishers are blocked (bytes, 0 = off).
    pub disk_free_bytes: AtomicU64,
    /// Last measured resident memory.
    pub memory_used: AtomicU64,
    /// Last measured free disk.
    pub disk_free: AtomicU64,
    changed: Notify,
}

impl Limits {
    /// Sets the memory high watermark in bytes (like
    /// `rabbitmqctl set_vm_memory_high_watermark absolute N`).
    pub fn set_memory_bytes(&self, n: u64) {
        self.memory_bytes.store(n, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Sets the free disk limit in bytes (like `rabbitmqctl set_disk_free_limit N`).
    pub fn set_disk_free_bytes(&self, n: u64) {
        self.disk_free_bytes.store(n, Ordering::Relaxed);
        self.changed.notify_one();
    }
}

/// Resident set size of this process, from /proc/self/statm.
pub fn resident_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Total physical memory, from /proc/meminfo.
pub fn total_memory_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    s.lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Free space for unprivileged writers on the file system holding `dir`.
pub fn disk_free_bytes(dir: &Path) -> Option<u64> {
    fs2::available_space(dir).ok()
}

/// Runs the monitor until the broker shuts down.
pub async fn monitor(broker: Arc<Broker>, data_dir: std::path::PathBuf, interval: Duration) {
    let mut shutdown = broker.shutdown.clone();
    let mut last: Option<String> = None;
    loop {
        let limits = &broker.limits;
        let mem = resident_bytes();
        let disk = disk_free_bytes(&data_dir).unwrap_or(u64::MAX);
        limits.memory_used.store(mem, Ordering::Relaxed);
        limits.disk_free.store(disk, Ordering::Relaxed);
        let mem_limit = limits.memory_bytes.load(Ordering::Relaxed);
        let disk_limit = limits.disk_free_bytes.load(Ordering::Relaxed);
        let reason = if mem_limit > 0 && mem > mem_limit {
            Some("low on memory".to_string())
        } else if disk_limit > 0 && disk < disk_limit {
            Some("low on disk".to_string())
        } else {
            None
        };
        if reason != last {
            match &reason {
                Some(r) if r.contains("memory") => warn!(
                    "memory resource limit alarm set: resident memory {mem} bytes is above the high watermark {mem_limit} bytes; publishers are blocked until it falls"
                ),
                Some(_) => warn!(
                    "disk resource limit alarm set: {disk} bytes free under {} is below the limit {disk_limit} bytes; publishers are blocked until space is freed",
                    data_dir.display()
                ),
                None => info!("resource alarm cleared; publishers unblocked"),
            }
            broker.set_alarm(reason.clone());
            last = reason;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = limits.changed.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
