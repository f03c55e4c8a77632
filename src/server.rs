//! The one way in: [`start`] binds the listener, spawns the accept loop and
//! returns a [`ServerHandle`] with the bound address. `main.rs` and the tests
//! both use it.

use crate::broker::persist::{self, QueueDef, Storage};
use crate::broker::{Broker, VHost};
use crate::config::Config;
use crate::protocol::connection;
use crate::protocol::socket::Socket;
use crate::queue::args::QueueArgs;
use crate::queue::{QueueRef, actor};
use crate::store::defs::{Definitions, Table};
use crate::store::{MessageStore, StoreOptions};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, error, info, info_span, warn};

/// A running server.
pub struct ServerHandle {
    /// Where AMQP clients connect.
    pub amqp_addr: SocketAddr,
    /// Where AMQP-over-TLS clients connect (None when TLS is disabled).
    pub amqps_addr: Option<SocketAddr>,
    /// Where the management HTTP API listens (None when disabled).
    pub mgmt_addr: Option<SocketAddr>,
    /// Where Prometheus metrics are served (None when disabled).
    pub metrics_addr: Option<SocketAddr>,
    /// Where other nodes connect (None when clustering is disabled).
    pub cluster_addr: Option<SocketAddr>,
    /// The broker state (for in-process inspection by tests and management).
    pub broker: Arc<Broker>,
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
    accept_tls: Option<JoinHandle<()>>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listener could not be bound.
    #[error(
        "cannot listen for AMQP on {addr}: {source} (is another broker already using this port? choose another with --port)"
    )]
    Bind {
        /// Address tried.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The management or metrics HTTP listener could not be bound.
    #[error(
        "cannot listen for the {what} on {addr}: {source} (choose another port with {flag}, or 0 for a free one)"
    )]
    HttpBind {
        /// Which listener.
        what: &'static str,
        /// Address tried.
        addr: String,
        /// The flag that changes its port.
        flag: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// TLS is enabled but its certificate, key or CA cannot be used.
    #[error("{0}")]
    Tls(String),
    /// The cluster runtime (Raft log, inter-node listener) could not start.
    #[error("{0}")]
    Cluster(String),
    /// The data directory or the stores in it could not be opened.
    #[error("cannot open the data directory {dir}: {why}")]
    Storage {
        /// Data directory.
        dir: String,
        /// What went wrong (already phrased for an operator).
        why: String,
    },
}

/// Opens the stores under the data directory and rebuilds every durable
/// vhost, exchange, queue (with its messages) and binding.
async fn open_broker(
    config: Arc<Config>,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<Broker>, StartError> {
    let dir = config.storage.data_dir.clone();
    let err = |why: String| StartError::Storage {
        dir: dir.display().to_string(),
        why,
    };
    std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
    let started = std::time::Instant::now();
    let defs = Definitions::open(&dir).map_err(|e| err(e.to_string()))?;
    let opts = StoreOptions {
        segment_size: config.storage.segment_size,
        ..StoreOptions::default()
    };
    let (msgs, mut recovery) = MessageStore::open(&dir, opts).map_err(|e| err(e.to_string()))?;
    let queue_defs: Vec<QueueDef> = defs
        .list(Table::Queues)
        .map_err(|e| err(e.to_string()))?
        .into_iter()
        .map(|(_, q)| q)
        .collect();
    let first_id = queue_defs.iter().map(|q| q.id).max().unwrap_or(0) + 1;
    let storage = Storage {
        msgs,
        defs: defs.clone(),
    };
    let broker = Broker::new(
        config.clone(),
        shutdown,
        Some(storage.clone()),
        first_id,
        recovery.max_gid + 1,
    );
    let _ = broker
        .delayed
        .set(crate::broker::delayed::DelayedScheduler::spawn(
            Arc::downgrade(&broker),
        ));
    if !config.auth.default_vhost.is_empty() {
        storage
            .put_vhost(&config.auth.default_vhost)
            .await
            .map_err(|e| err(e.to_string()))?;
    }
    crate::auth::store::recover(&broker.users, &defs)
        .await
        .map_err(|e| err(e.to_string()))?;
    persist::recover_definitions(&broker, &defs).map_err(|e| err(e.to_string()))?;
    let mut queues = 0usize;
    let mut messages = 0usize;
    for qd in queue_defs {
        let vhost = broker
            .vhosts
            .entry(qd.vhost.clone())
            .or_insert_with(|| VHost::new(&qd.vhost))
            .value()
            .clone();
        let args = QueueArgs::parse(&qd.arguments, &qd.name, &qd.vhost).unwrap_or_else(|e| {
            warn!(queue = %qd.name, vhost = %qd.vhost, "stored queue arguments no longer valid ({}); using defaults", e.text);
            QueueArgs { queue_type: "classic".into(), ..Default::default() }
        });
        if args.queue_type == "stream" {
            let init = crate::queue::stream::StreamInit {
                vhost: vhost.clone(),
                inbox: config.queue.inbox_capacity,
                data_dir: config.storage.data_dir.clone(),
                storage: Some(storage.clone()),
                fresh: false,
                repl: None,
            };
            let make = |tx| {
                QueueRef::new(
                    qd.id,
                    qd.name.clone(),
                    qd.vhost.clone(),
                    true,
                    None,
                    qd.auto_delete,
                    qd.arguments.clone(),
                    args,
                    tx,
                )
            };
            match crate::queue::stream::spawn(make, init) {
                Ok(q) => {
                    vhost.queues.insert(qd.name.clone(), q);
                    queues += 1;
                }
                Err(e) => {
                    error!(queue = %qd.name, vhost = %qd.vhost, "cannot recover stream: {}", e.text)
                }
            }
            continue;
        }
        let recovered = recovery.queues.remove(&qd.id).unwrap_or_default();
        messages += recovered.len();
        let q = actor::spawn(
            |tx| {
                QueueRef::new(
                    qd.id,
                    qd.name.clone(),
                    qd.vhost.clone(),
                    true,
                    None,
                    qd.auto_delete,
                    qd.arguments.clone(),
                    args,
                    tx,
                )
            },
            actor::QueueInit {
                vhost: vhost.clone(),
                inbox: config.queue.inbox_capacity,
                window: config.queue.max_in_memory,
                storage: Some(storage.clone()),
                recovered,
                flow_threshold: config.queue.flow_control_threshold,
                gids: Some({
                    let b = broker.clone();
                    Arc::new(move || b.next_gid())
                }),
                on_delete: crate::cluster::classic::delete_hook(&broker),
            },
        );
        vhost.queues.insert(qd.name.clone(), q);
        queues += 1;
    }
    persist::recover_bindings(&broker, &defs).map_err(|e| err(e.to_string()))?;
    persist::spawn_exchange_dedup_saver(&broker);
    // Policies: parsed per vhost and applied to the recovered queues.
    let vnames: Vec<String> = broker.vhosts.iter().map(|v| v.key().clone()).collect();
    for v in vnames {
        crate::broker::policy::reload(&broker, &v).await;
    }
    // Persistent messages waiting in delayed exchanges.
    let mut delayed_n = 0usize;
    if let Some(list) = recovery
        .queues
        .remove(&crate::broker::delayed::DELAYED_QUEUE_ID)
    {
        for m in list {
            let parsed = storage
                .msgs
                .read(m.gid)
                .ok()
                .and_then(crate::queue::message::Message::from_parts)
                .and_then(crate::broker::delayed::from_stored);
            match (parsed, broker.delayed.get()) {
                (Some((due, vhost, msg)), Some(s)) => {
                    s.schedule(crate::broker::delayed::Delayed {
                        due,
                        vhost,
                        msg: Arc::new(msg),
                        gid: m.gid,
                    });
                    delayed_n += 1;
                }
                _ => {
                    let _ = storage
                        .msgs
                        .ack(crate::broker::delayed::DELAYED_QUEUE_ID, vec![m.gid])
                        .await;
                }
            }
        }
    }
    if delayed_n > 0 {
        info!("recovered {delayed_n} delayed messages");
    }
    // Messages of queues that no longer exist (deleted while the broker
    // was down, or exclusive queues): forget them.
    for (qid, msgs) in recovery.queues.drain() {
        let gids: Vec<u64> = msgs.iter().map(|m| m.gid).collect();
        let _ = storage.msgs.drop_queue(qid, gids).await;
    }
    info!(
        queues,
        messages,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered {queues} durable queues with {messages} messages from {}",
        dir.display()
    );
    Ok(broker)
}

/// Binds and starts serving. Returns once the listener accepts connections.
pub async fn start(config: Arc<Config>) -> Result<ServerHandle, StartError> {
    let addr = format!("{}:{}", config.amqp.bind, config.amqp.port);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let amqp_addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    // TLS: load the certificate and bind before opening the stores, so a
    // misconfiguration fails fast.
    let tls = if config.tls.enabled {
        let acceptor = crate::tls::acceptor(&config.tls).map_err(StartError::Tls)?;
        let bind = if config.tls.bind.is_empty() {
            &config.amqp.bind
        } else {
            &config.tls.bind
        };
        let addr = format!("{}:{}", bind, config.tls.port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::HttpBind {
                what: "TLS (amqps) connections",
                addr: addr.clone(),
                flag: "--tls-port",
                source,
            })?;
        let local = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        Some((listener, local, acceptor))
    } else {
        None
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let broker = open_broker(config.clone(), shutdown_rx.clone()).await?;
    let cluster = crate::cluster::Cluster::start(&broker)
        .await
        .map_err(|e| StartError::Cluster(e.to_string()))?;
    let cluster_addr = cluster.listen;
    let _ = broker.cluster.set(cluster);
    let res = &config.resources;
    let mem_limit = if res.memory_high_watermark_bytes > 0 {
        res.memory_high_watermark_bytes
    } else {
        (crate::broker::alarms::total_memory_bytes() as f64 * res.memory_high_watermark) as u64
    };
    broker.limits.set_memory_bytes(mem_limit);
    broker.limits.set_disk_free_bytes(res.disk_free_limit);
    tokio::spawn(crate::broker::alarms::monitor(
        broker.clone(),
        config.storage.data_dir.clone(),
        Duration::from_millis(res.check_interval_ms.max(10)),
    ));
    let (mgmt_addr, metrics_addr) = crate::mgmt::serve(&broker, shutdown_rx.clone()).await?;
    let limit = Arc::new(Semaphore::new(broker.config.amqp.max_connections));
    let mut amqps_addr = None;
    let accept_tls = tls.map(|(listener, local, acceptor)| {
        amqps_addr = Some(local);
        info!(amqps_addr = %local, "accepting AMQP 0-9-1 over TLS on {local}");
        tokio::spawn(accept_loop(
            listener,
            broker.clone(),
            shutdown_rx.clone(),
            limit.clone(),
            Some(acceptor),
        ))
    });
    let accept = tokio::spawn(accept_loop(
        listener,
        broker.clone(),
        shutdown_rx,
        limit,
        None,
    ));
    info!(%amqp_addr, "Warren ready: accepting AMQP 0-9-1 connections on {amqp_addr}");
    Ok(ServerHandle {
        amqp_addr,
        amqps_addr,
        accept_tls,
        mgmt_addr,
        metrics_addr,
        cluster_addr,
        broker,
        shutdown,
        accept,
    })
}

impl ServerHandle {
    /// Stops accepting, closes every connection with 320 CONNECTION_FORCED
    /// and waits (bounded) for them to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.accept.await;
        if let Some(a) = self.accept_tls {
            let _ = a.await;
        }
        // Give connections a moment to send their close frames.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while self.shutdown.receiver_count() > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Deduplication caches and retry delays (lazy writes) are saved
        // now, then made durable by the flush below.
        persist::save_snapshots(&self.broker).await;
        if let Some(c) = self.broker.cluster.get() {
            c.shutdown().await;
        }
        if let Some(st) = &self.broker.storage {
            if let Err(e) = st.msgs.sync().await {
                error!("final sync of the message store failed: {e}");
            }
            if let Err(e) = st.defs.flush().await {
                error!("final flush of the definitions store failed: {e}");
            }
        }
        info!("Warren stopped");
    }
}

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
    limit: Arc<Semaphore>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((socket, peer)) => {
                backoff = Duration::from_millis(5);
                let _ = socket.set_nodelay(true);
                let id = broker.next_id();
                let broker = broker.clone();
                let span = info_span!("conn", id, %peer, tls = tls.is_some(), user = tracing::field::Empty, vhost = tracing::field::Empty);
                let tls = tls.clone();
                tokio::spawn(
                    async move {
                        match tls {
                            Some(acceptor) => {
                                crate::tls::serve(socket, peer, id, broker, acceptor).await
                            }
                            None => {
                                let local = socket.local_addr().unwrap_or(peer);
                                connection::serve(Socket::Tcp(socket), peer, local, id, broker)
                                    .await;
                            }
                        }
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // Usually EMFILE: out of file descriptors. Back off rather
                // than spin, and say what to do.
                if backoff >= Duration::from_secs(1) {
                    error!(
                        "accepting AMQP connections keeps failing: {e}; check the open-file limit (ulimit -n)"
                    );
                } else {
                    warn!("accept failed: {e}; retrying in {backoff:?}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
