//! `warren`: load config, set up logging, run the broker until SIGINT/SIGTERM.

use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use warren::config::Config;

/// Warren, an AMQP 0-9-1 message broker.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (default: etc/warren.toml when present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on for AMQP (default 127.0.0.1).
    #[arg(long)]
    bind: Option<String>,
    /// AMQP port (default 5672; 0 picks a free port).
    #[arg(long)]
    port: Option<u16>,
    /// Data directory (default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace (default info).
    #[arg(long)]
    log_level: Option<String>,
    /// Management HTTP API port (default 15672; 0 picks a free port).
    #[arg(long)]
    mgmt_port: Option<u16>,
    /// Prometheus metrics port (default 15692; 0 picks a free port).
    #[arg(long)]
    metrics_port: Option<u16>,
    /// AMQP over TLS port (default 5671; 0 picks a free port). Setting it
    /// does not enable TLS: set tls.enabled, tls.cert_file and tls.key_file.
    #[arg(long)]
    tls_port: Option<u16>,
    /// Node name for clustering (default warren@localhost).
    #[arg(long)]
    node_name: Option<String>,
    /// Inter-node port (default 25672; 0 picks a free port). Enables clustering.
    #[arg(long)]
    cluster_port: Option<u16>,
    /// Another node's inter-node address (host:port); repeatable. Enables clustering.
    #[arg(long = "seed")]
    seeds: Vec<String>,
    /// Shared secret all nodes of the cluster must present.
    #[arg(long)]
    cluster_secret: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut cfg = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(b) = args.bind {
        cfg.amqp.bind = b;
    }
    if let Some(p) = args.port {
        cfg.amqp.port = p;
    }
    if let Some(d) = args.data_dir {
        cfg.storage.data_dir = d;
    }
    if let Some(l) = args.log_level {
        cfg.log.level = l;
    }
    if let Some(p) = args.mgmt_port {
        cfg.mgmt.port = p;
    }
    if let Some(p) = args.metrics_port {
        cfg.metrics.port = p;
    }
    if let Some(p) = args.tls_port {
        cfg.tls.port = p;
    }
    if let Some(n) = args.node_name {
        cfg.cluster.node_name = n;
    }
    if let Some(p) = args.cluster_port {
        cfg.cluster.port = p;
        cfg.cluster.enabled = true;
    }
    if !args.seeds.is_empty() {
        cfg.cluster.seeds = args.seeds;
        cfg.cluster.enabled = true;
    }
    if let Some(s) = args.cluster_secret {
        cfg.cluster.secret = s;
    }
    // openraft logs routine elections at info/warn; keep it to errors
    // unless the operator asks for it by name.
    let level = if cfg.log.level.contains("openraft") {
        cfg.log.level.clone()
    } else {
        format!("{},openraft=error", cfg.log.level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        if let Err(e) = std::fs::create_dir_all(&cfg.storage.data_dir) {
            tracing::error!(
                "cannot create data directory {}: {e}",
                cfg.storage.data_dir.display()
            );
            return std::process::ExitCode::from(1);
        }
        let server = match warren::server::start(Arc::new(cfg)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                return std::process::ExitCode::from(1);
            }
        };
        wait_for_signal().await;
        tracing::info!("shutdown signal received; closing connections");
        server.shutdown().await;
        std::process::ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
