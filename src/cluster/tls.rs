//! Optional TLS between nodes: mutual TLS with certificates from one CA.
//!
//! With `cluster.tls_cert_file` set, every inter-node connection is TLS in
//! both directions: a node presents its certificate when it dials and when
//! it accepts, and accepts only peers whose certificate chains to
//! `cluster.tls_ca_file`. The cluster secret handshake still runs inside
//! the TLS session (a certificate alone does not make a node a member).

use crate::config::ClusterConfig;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A byte stream between nodes (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed inter-node stream.
pub type BoxIo = Box<dyn Io>;

/// TLS settings for inter-node connections.
pub struct NodeTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    /// Name checked against the peer's certificate ("" = the dialled host).
    server_name: String,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn certs(path: &std::path::Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read cluster.{key} {} ({e}); set it to a readable PEM file",
            path.display()
        )
    })?;
    let out: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot parse cluster.{key} {}: {e}", path.display()))?;
    if out.is_empty() {
        return Err(format!(
            "no certificate in cluster.{key} {}; it needs BEGIN CERTIFICATE blocks",
            path.display()
        ));
    }
    Ok(out)
}

/// Builds the inter-node TLS settings; None when `cluster.tls_cert_file`
/// is not set. Errors are phrased for an operator.
pub fn load(cfg: &ClusterConfig) -> Result<Option<Arc<NodeTls>>, String> {
    let Some(cert_file) = cfg.tls_cert_file.as_deref() else {
        return Ok(None);
    };
    let key_file = cfg
        .tls_key_file
        .as_deref()
        .ok_or("cluster.tls_cert_file needs cluster.tls_key_file (its private key)")?;
    let ca_file = cfg.tls_ca_file.as_deref().ok_or(
        "cluster.tls_cert_file needs cluster.tls_ca_file (the CA every node's certificate chains to)",
    )?;
    let chain = certs(cert_file, "tls_cert_file")?;
    let key_pem = std::fs::read(key_file).map_err(|e| {
        format!(
            "cannot read cluster.tls_key_file {} ({e})",
            key_file.display()
        )
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "cannot parse cluster.tls_key_file {}: {e}; use PEM (PKCS#8, PKCS#1 or SEC1)",
            key_file.display()
        )
    })?;
    let mut roots = RootCertStore::empty();
    for c in certs(ca_file, "tls_ca_file")? {
        roots
            .add(c)
            .map_err(|e| format!("invalid CA certificate in {}: {e}", ca_file.display()))?;
    }
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| {
            format!(
                "cannot verify node certificates with {}: {e}",
                ca_file.display()
            )
        })?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| {
            format!(
                "cluster.tls_cert_file {} and cluster.tls_key_file {} cannot be used together: {e}",
                cert_file.display(),
                key_file.display()
            )
        })?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("cannot use the node certificate as a client certificate: {e}"))?;
    Ok(Some(Arc::new(NodeTls {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: TlsConnector::from(Arc::new(client)),
        server_name: cfg.tls_server_name.clone(),
    })))
}

impl NodeTls {
    /// TLS over a connection this node dialled to `addr` (host:port).
    pub async fn connect(&self, addr: &str, tcp: tokio::net::TcpStream) -> std::io::Result<BoxIo> {
        let name = if self.server_name.is_empty() {
            addr.rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                .unwrap_or(addr)
                .to_string()
        } else {
            self.server_name.clone()
        };
        let sn = ServerName::try_from(name.clone()).map_err(|e| {
            std::io::Error::other(format!(
                "'{name}' cannot be checked against a certificate: {e}"
            ))
        })?;
        Ok(Box::new(self.connector.connect(sn, tcp).await?))
    }

    /// TLS over a connection another node opened.
    pub async fn accept(&self, tcp: tokio::net::TcpStream) -> std::io::Result<BoxIo> {
        Ok(Box::new(self.acceptor.accept(tcp).await?))
    }
}
