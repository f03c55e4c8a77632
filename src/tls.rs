//! AMQP over TLS (amqps) with rustls.
//!
//! The connection task is written against non-blocking sockets
//! (`readable`/`try_read`/`try_write` in one `select!`), which a TLS stream
//! does not offer. So TLS is terminated in a small task per connection that
//! copies bytes between the `TlsStream<TcpStream>` and one end of a
//! `UnixStream::pair()`; the connection task serves the other end exactly as
//! it serves a TCP socket ([`crate::protocol::socket::Socket`]). Plain TCP
//! connections are untouched. Peer and local addresses (loopback checks,
//! connection names) are those of the real TCP socket.

use crate::broker::Broker;
use crate::config::TlsConfig;
use crate::protocol::connection;
use crate::protocol::socket::Socket;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tracing::{Instrument, debug, info};

/// Buffer size of each direction of the TLS pump (one TLS record is at most
/// 16 KiB of plaintext; a few of them per read keeps syscalls down).
const PUMP_BUF: usize = 64 * 1024;
/// How long the pump keeps the TLS session open after the connection task
/// finished, for the client to read the last frames and close its side.
const LINGER: Duration = Duration::from_secs(5);

fn read_file(path: &Path, what: &str, key: &str) -> Result<Vec<u8>, String> {
    if path.as_os_str().is_empty() {
        return Err(format!("no TLS {what} configured; set tls.{key}"));
    }
    std::fs::read(path).map_err(|e| {
        format!(
            "cannot read TLS {what} {}: {e}; set tls.{key}",
            path.display()
        )
    })
}

fn read_certs(path: &Path, what: &str, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_file(path, what, key)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "cannot parse TLS {what} {}: {e}; set tls.{key} to a PEM file",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "no certificate found in TLS {what} {}; set tls.{key} to a PEM file with BEGIN CERTIFICATE blocks",
            path.display()
        ));
    }
    Ok(certs)
}

/// Builds the TLS acceptor from the `[tls]` section: certificate chain and
/// key, and, with `verify_peer`, client certificate verification against
/// `ca_file`. Errors are phrased for an operator.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, String> {
    let certs = read_certs(&cfg.cert_file, "certificate", "cert_file")?;
    let key_pem = read_file(&cfg.key_file, "private key", "key_file")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "cannot parse TLS private key {}: {e}; set tls.key_file to a PEM file (PKCS#8, PKCS#1 or SEC1)",
            cfg.key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = if cfg.verify_peer {
        let ca = cfg.ca_file.as_deref().ok_or(
            "tls.verify_peer = true needs tls.ca_file (the CA client certificates must chain to)",
        )?;
        let mut roots = RootCertStore::empty();
        for c in read_certs(ca, "CA certificate", "ca_file")? {
            roots
                .add(c)
                .map_err(|e| format!("invalid CA certificate in {}: {e}", ca.display()))?;
        }
        let mut vb = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        if !cfg.fail_if_no_peer_cert {
            vb = vb.allow_unauthenticated();
        }
        let verifier = vb.build().map_err(|e| {
            format!(
                "cannot verify client certificates with {}: {e}",
                ca.display()
            )
        })?;
        builder.with_client_cert_verifier(verifier)
    } else {
        if cfg.fail_if_no_peer_cert {
            tracing::warn!("tls.fail_if_no_peer_cert has no effect without tls.verify_peer = true");
        }
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "TLS certificate {} and key {} cannot be used together: {e}",
            cfg.cert_file.display(),
            cfg.key_file.display()
        )
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves one TCP connection accepted on the TLS port: TLS handshake (within
/// the AMQP handshake timeout), then the AMQP connection over a socket pair.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    broker: Arc<Broker>,
    acceptor: TlsAcceptor,
) {
    let local = tcp.local_addr().unwrap_or(peer);
    let timeout = Duration::from_millis(broker.config.amqp.handshake_timeout_ms);
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!("TLS handshake failed: {e}; closing");
            return;
        }
        Err(_) => {
            info!("client did not complete the TLS handshake within {timeout:?}; closing");
            return;
        }
    };
    let (ours, theirs) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            info!("cannot create the socket pair for a TLS connection: {e}; closing");
            return;
        }
    };
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let pump = tokio::spawn(pump(tls, theirs, done_rx).in_current_span());
    connection::serve(Socket::Unix(ours), peer, local, id, broker).await;
    drop(done_tx);
    let _ = pump.await;
}

/// Copies plaintext between the TLS session and the connection task's
/// socket until either side closes, or a while after the task is done.
async fn pump(
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
    mut unix: UnixStream,
    done: oneshot::Receiver<()>,
) {
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut unix, PUMP_BUF, PUMP_BUF);
    tokio::select! {
        r = copy => {
            if let Err(e) = r {
                debug!("TLS session ended: {e}");
            }
        }
        _ = async {
            let _ = done.await;
            tokio::time::sleep(LINGER).await;
        } => {}
    }
}
