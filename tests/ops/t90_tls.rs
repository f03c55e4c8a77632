//! AMQP over TLS (amqps): end to end through the TLS listener, a plain-text
//! client on the TLS port, client certificate verification, and the startup
//! error for an unreadable certificate. Certificates are generated here with
//! rcgen (a test CA, a server certificate for localhost/127.0.0.1, and client
//! certificates).

use crate::common::*;
use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, basic, queue as q_m};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// A test PKI written to a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    /// A client certificate signed by the CA, and its key.
    client: (CertificateDer<'static>, PrivateKeyDer<'static>),
    /// A self-signed client certificate (not from the CA), and its key.
    stranger: (CertificateDer<'static>, PrivateKeyDer<'static>),
}

fn key_der(k: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::try_from(k.serialize_der()).expect("key der")
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Warren test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut sp =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "localhost");
    sp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server = sp.signed_by(&server_key, &ca).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(vec!["client".to_string()]).unwrap();
    cp.distinguished_name.push(DnType::CommonName, "client");
    cp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = cp.signed_by(&client_key, &ca).unwrap();

    let stranger_key = KeyPair::generate().unwrap();
    let mut xp = CertificateParams::new(vec!["stranger".to_string()]).unwrap();
    xp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let stranger = xp.self_signed(&stranger_key).unwrap();

    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    Pki {
        ca: ca.der().clone(),
        client: (client.der().clone(), key_der(&client_key)),
        stranger: (stranger.der().clone(), key_der(&stranger_key)),
        dir,
    }
}

impl Pki {
    fn path(&self, f: &str) -> std::path::PathBuf {
        self.dir.path().join(f)
    }

    /// A broker with TLS on a free port; `verify` turns on client
    /// certificate verification with fail_if_no_peer_cert.
    async fn broker(&self, verify: bool) -> (TestBroker, SocketAddr) {
        let b = TestBroker::start_with(|c| {
            c.tls.enabled = true;
            c.tls.port = 0;
            c.tls.cert_file = self.path("server.pem");
            c.tls.key_file = self.path("server.key");
            if verify {
                c.tls.ca_file = Some(self.path("ca.pem"));
                c.tls.verify_peer = true;
                c.tls.fail_if_no_peer_cert = true;
            }
        })
        .await;
        let tls = b
            .handle
            .as_ref()
            .unwrap()
            .amqps_addr
            .expect("amqps_addr is set when TLS is enabled");
        (b, tls)
    }

    /// A client trusting the test CA, with an optional client certificate.
    fn client_config(
        &self,
        cert: Option<&(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let b =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        Arc::new(match cert {
            Some((c, k)) => b
                .with_client_auth_cert(vec![c.clone()], k.clone_key())
                .unwrap(),
            None => b.with_no_client_auth(),
        })
    }
}

async fn tls_connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true).ok();
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(cfg).connect(name, tcp).await
}

/// True when the server refuses the TLS session: the handshake fails, or
/// (TLS 1.3 verifies the client certificate after the client considers the
/// handshake done) the first read fails or ends without an AMQP answer.
async fn refused(addr: SocketAddr, cfg: Arc<ClientConfig>) -> bool {
    let Ok(mut s) = within(10, tls_connect(addr, cfg)).await else {
        return true;
    };
    if s.write_all(AMQP_HEADER).await.is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    match within(10, s.read(&mut buf)).await {
        Ok(0) | Err(_) => true,
        Ok(_) => false,
    }
}

fn publish_frames(queue: &str, body: &[u8], frame_max: usize) -> Vec<AMQPFrame> {
    let mut v = vec![
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: queue.into(),
                mandatory: false,
                immediate: false,
            })),
        ),
        AMQPFrame::Header(
            1,
            amq_protocol::frame::AMQPContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties: Default::default(),
            },
        ),
    ];
    for chunk in body.chunks(frame_max - 8) {
        v.push(AMQPFrame::Body(1, chunk.to_vec()));
    }
    v
}

/// Reads one delivery (deliver, header, bodies) and returns its body.
async fn next_delivery(raw: &mut RawClient) -> Vec<u8> {
    match raw.method().await {
        (1, AMQPClass::Basic(basic::AMQPMethod::Deliver(_))) => {}
        other => panic!("expected basic.deliver, got {other:?}"),
    }
    let size = match raw.next().await {
        RawEvent::Frame(AMQPFrame::Header(1, h)) => h.body_size as usize,
        other => panic!("expected a content header, got {other:?}"),
    };
    let mut body = Vec::with_capacity(size);
    while body.len() < size {
        match raw.next().await {
            RawEvent::Frame(AMQPFrame::Body(1, b)) => body.extend_from_slice(&b),
            other => panic!("expected a body frame, got {other:?}"),
        }
    }
    body
}

#[tokio::test]
async fn publish_and_consume_through_amqps() {
    let pki = pki();
    let (b, tls_addr) = pki.broker(false).await;
    assert_ne!(tls_addr, b.addr);
    // guest may only connect from loopback: this login working through the
    // socket pair shows the real TCP peer address is used.
    let tls = within(10, tls_connect(tls_addr, pki.client_config(None)))
        .await
        .expect("TLS handshake");
    let mut raw = within(10, RawClient::over(tls).handshake_as_guest(0)).await;
    let frame_max = raw.tune.as_ref().unwrap().frame_max as usize;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Queue(q_m::AMQPMethod::Declare(q_m::Declare {
            queue: "tls-q".into(),
            ..Default::default()
        })),
    )
    .await;
    match raw.method().await {
        (1, AMQPClass::Queue(q_m::AMQPMethod::DeclareOk(_))) => {}
        other => panic!("expected queue.declare-ok, got {other:?}"),
    }
    // Publish through TLS (one message spanning several frames and TLS
    // records), consume over plain AMQP.
    let big: Vec<u8> = (0..600_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut bytes = Vec::new();
    for body in [&b"one"[..], &big[..], &b"three"[..]] {
        for f in publish_frames("tls-q", body, frame_max) {
            bytes.extend_from_slice(&encode_frame(&f));
        }
    }
    raw.send(&bytes).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..50 {
        got.extend(drain(&ch, "tls-q").await);
        if got.len() >= 3 {
            break;
        }
        settle().await;
    }
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], "one");
    assert_eq!(got[1].as_bytes(), &big[..]);
    assert_eq!(got[2], "three");

    // Publish over plain AMQP, consume through TLS.
    for i in 0..3 {
        publish(&ch, "", "tls-q", format!("plain-{i}").as_bytes()).await;
    }
    publish(&ch, "", "tls-q", &big).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "tls-q".into(),
            consumer_tag: "tls".into(),
            no_local: false,
            no_ack: true,
            exclusive: false,
            nowait: false,
            arguments: Default::default(),
        })),
    )
    .await;
    match raw.method().await {
        (1, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))) => {}
        other => panic!("expected basic.consume-ok, got {other:?}"),
    }
    for i in 0..3 {
        assert_eq!(
            next_delivery(&mut raw).await,
            format!("plain-{i}").into_bytes()
        );
    }
    assert_eq!(next_delivery(&mut raw).await, big);

    // The connection shows up in management with its real peer address.
    let peers: Vec<SocketAddr> = b
        .handle
        .as_ref()
        .unwrap()
        .broker
        .connections
        .iter()
        .map(|c| c.value().peer)
        .collect();
    assert!(peers.iter().all(|p| p.ip().is_loopback()), "{peers:?}");
    assert_eq!(peers.len(), 2);

    // Clean close through TLS.
    use amq_protocol::protocol::connection as conn_m;
    raw.send_method(
        0,
        AMQPClass::Connection(conn_m::AMQPMethod::Close(conn_m::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )
    .await;
    match raw.method().await {
        (0, AMQPClass::Connection(conn_m::AMQPMethod::CloseOk(_))) => {}
        other => panic!("expected connection.close-ok, got {other:?}"),
    }
    raw.expect_eof().await;
}

#[tokio::test]
async fn plain_text_client_on_the_tls_port_fails_cleanly() {
    let pki = pki();
    let (b, tls_addr) = pki.broker(false).await;
    let mut raw = RawClient::connect(tls_addr).await;
    raw.send(AMQP_HEADER).await;
    // No AMQP answer: at most a TLS alert, then the socket closes.
    let started = std::time::Instant::now();
    loop {
        match raw.next().await {
            RawEvent::Eof => break,
            RawEvent::Bytes(b) => {
                assert_ne!(&b[..4], b"AMQP", "the TLS port answered in plain text")
            }
            RawEvent::Frame(f) => panic!("the TLS port answered with an AMQP frame: {f:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Both listeners still work.
    let tls = within(10, tls_connect(tls_addr, pki.client_config(None)))
        .await
        .expect("TLS handshake");
    let mut ok = within(10, RawClient::over(tls).handshake_as_guest(0)).await;
    ok.open_channel(1).await;
    let conn = b.connect().await;
    conn.create_channel().await.unwrap();
}

#[tokio::test]
async fn client_certificates_are_verified_when_required() {
    let pki = pki();
    let (_b, tls_addr) = pki.broker(true).await;
    assert!(
        refused(tls_addr, pki.client_config(None)).await,
        "a client without a certificate was accepted"
    );
    assert!(
        refused(tls_addr, pki.client_config(Some(&pki.stranger))).await,
        "a client certificate not signed by the CA was accepted"
    );
    let tls = within(
        10,
        tls_connect(tls_addr, pki.client_config(Some(&pki.client))),
    )
    .await
    .expect("TLS handshake with a CA-signed client certificate");
    let mut raw = within(10, RawClient::over(tls).handshake_as_guest(0)).await;
    raw.open_channel(1).await;
}

#[tokio::test]
async fn unreadable_certificate_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = warren::config::Config::default();
    cfg.amqp.port = 0;
    cfg.mgmt.enabled = false;
    cfg.metrics.enabled = false;
    cfg.storage.data_dir = dir.path().join("data");
    cfg.tls.enabled = true;
    cfg.tls.port = 0;
    let missing = dir.path().join("nope.pem");
    cfg.tls.cert_file = missing.clone();
    cfg.tls.key_file = dir.path().join("nope.key");
    let err = match warren::server::start(Arc::new(cfg)).await {
        Ok(_) => panic!("started without a certificate"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.starts_with(&format!(
            "cannot read TLS certificate {}: ",
            missing.display()
        )),
        "{err}"
    );
    assert!(err.ends_with("; set tls.cert_file"), "{err}");
}
