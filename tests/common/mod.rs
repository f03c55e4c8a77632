//! Test fixtures: a real Warren on an ephemeral loopback port, and helpers
//! to talk to it with lapin or raw bytes.
#![allow(dead_code)]

use lapin::{Connection, ConnectionProperties};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use warren::config::Config;
use warren::server::{self, ServerHandle};

/// A broker running in this process on 127.0.0.1:0.
pub struct TestBroker {
    pub handle: Option<ServerHandle>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

fn init_logs() {
    if std::env::var("WARREN_TEST_VERBOSE").is_ok() {
        let _ = tracing_subscriber::fmt().with_env_filter("debug").try_init();
    }
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::default();
        cfg.amqp.port = 0;
        cfg.storage.data_dir = dir.path().to_path_buf();
        tweak(&mut cfg);
        let handle = server::start(Arc::new(cfg)).await.expect("server starts");
        let addr = handle.amqp_addr;
        TestBroker { handle: Some(handle), addr, dir }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default()).await.expect("connect")
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

/// Waits for `fut` at most `secs` seconds, failing the test otherwise.
pub async fn within<T>(secs: u64, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut).await.expect("timed out")
}
