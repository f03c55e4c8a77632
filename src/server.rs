//! The one way in: [`start`] binds the listener, spawns the accept loop and
//! returns a [`ServerHandle`] with the bound address. `main.rs` and the tests
//! both use it.

use crate::broker::Broker;
use crate::config::Config;
use crate::protocol::connection;
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
    /// The broker state (for in-process inspection by tests and management).
    pub broker: Arc<Broker>,
    shutdown: watch::Sender<bool>,
    accept: JoinHandle<()>,
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
    let (shutdown, shutdown_rx) = watch::channel(false);
    let broker = Broker::new(config.clone(), shutdown_rx.clone());
    let accept = tokio::spawn(accept_loop(listener, broker.clone(), shutdown_rx));
    info!(%amqp_addr, "Warren ready: accepting AMQP 0-9-1 connections on {amqp_addr}");
    Ok(ServerHandle {
        amqp_addr,
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
        // Give connections a moment to send their close frames.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while self.shutdown.receiver_count() > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        info!("Warren stopped");
    }
}

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(broker.config.amqp.max_connections));
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
                let span = info_span!("conn", id, %peer, user = tracing::field::Empty, vhost = tracing::field::Empty);
                tokio::spawn(
                    async move {
                        connection::serve(socket, peer, id, broker).await;
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
