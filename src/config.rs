//! Configuration: one typed struct, loaded once and passed down as
//! `Arc<Config>`. Sources, later ones winning: code defaults, the config file
//! (etc/warren.toml), `WARREN__SECTION__KEY` environment variables, flags.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// AMQP listener and protocol limits.
    pub amqp: AmqpConfig,
    /// Where data lives.
    pub storage: StorageConfig,
    /// Logging.
    pub log: LogConfig,
    /// Default user and vhost.
    pub auth: AuthConfig,
    /// Queue tuning.
    pub queue: QueueConfig,
    /// Resource alarms.
    pub resources: ResourceConfig,
    /// Management HTTP API.
    pub mgmt: MgmtConfig,
    /// Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
    /// AMQP over TLS (amqps).
    pub tls: TlsConfig,
    /// Clustering and quorum queues.
    pub cluster: ClusterConfig,
}

/// Clustering: this node's name, where other nodes reach it, whom to join.
/// Quorum queues work on a single node too (a Raft group of one); the
/// cluster listener only opens when `enabled` (or a seed is given).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Listen for other nodes and join the seeds.
    pub enabled: bool,
    /// Node name, RabbitMQ style ("warren@host"; "" = warren@<hostname>);
    /// must be unique in the cluster and stay the same across restarts.
    pub node_name: String,
    /// Address for inter-node traffic ("" = the same as amqp.bind).
    pub bind: String,
    /// Inter-node port (0 picks a free one).
    pub port: u16,
    /// Other nodes' inter-node addresses (host:port) to form or join a
    /// cluster with.
    pub seeds: Vec<String>,
    /// Shared secret every node must present (like Erlang's cookie).
    pub secret: String,
    /// A node is considered down after this long without an answer (ms).
    pub failure_timeout_ms: u64,
    /// A quorum queue replica snapshots its state after this many Raft log
    /// entries (or twice the messages it holds, if more); the log before
    /// the snapshot is then deleted.
    pub snapshot_min_entries: u64,
    /// "real=dial" address pairs: reach the node whose inter-node address
    /// is `real` by connecting to `dial` instead (a NAT, or the
    /// fault-injecting proxies of the partition tests).
    pub dial_overrides: Vec<String>,
    /// This node's certificate chain (PEM) for TLS between nodes; set it
    /// (with tls_key_file and tls_ca_file) to make every inter-node
    /// connection mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    /// Private key of tls_cert_file (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// CA certificates (PEM) every node's certificate must chain to.
    pub tls_ca_file: Option<PathBuf>,
    /// Name checked against the other node's certificate ("" = the host
    /// part of the address dialled).
    pub tls_server_name: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            node_name: String::new(),
            bind: String::new(),
            port: 25672,
            seeds: Vec::new(),
            secret: String::new(),
            failure_timeout_ms: 2000,
            snapshot_min_entries: 20_000,
            dial_overrides: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_server_name: String::new(),
        }
    }
}

/// AMQP over TLS (amqps), terminated with rustls.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Open the TLS listener at all.
    pub enabled: bool,
    /// Address to listen on ("" = the same as amqp.bind).
    pub bind: String,
    /// Port (0 picks a free one).
    pub port: u16,
    /// Server certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Private key of the certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates (PEM) client certificates must chain to; required
    /// when verify_peer is true.
    pub ca_file: Option<PathBuf>,
    /// Ask clients for a certificate and verify it against ca_file.
    pub verify_peer: bool,
    /// With verify_peer, refuse clients that present no certificate.
    pub fail_if_no_peer_cert: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: false,
            bind: String::new(),
            port: 5671,
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            ca_file: None,
            verify_peer: false,
            fail_if_no_peer_cert: false,
        }
    }
}

/// Management HTTP API (RabbitMQ's management plugin paths).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MgmtConfig {
    /// Serve the API at all.
    pub enabled: bool,
    /// Address to listen on.
    pub bind: String,
    /// Port (0 picks a free one).
    pub port: u16,
}

impl Default for MgmtConfig {
    fn default() -> Self {
        MgmtConfig {
            enabled: true,
            bind: "127.0.0.1".into(),
            port: 15672,
        }
    }
}

/// Prometheus `/metrics` endpoint (RabbitMQ's rabbitmq_prometheus port).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve metrics at all.
    pub enabled: bool,
    /// Address to listen on.
    pub bind: String,
    /// Port (0 picks a free one).
    pub port: u16,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            bind: "127.0.0.1".into(),
            port: 15692,
        }
    }
}

/// Resource alarm settings (RabbitMQ's vm_memory_high_watermark and
/// disk_free_limit).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceConfig {
    /// Fraction of physical memory above which publishers are blocked.
    pub memory_high_watermark: f64,
    /// Absolute limit in bytes; when set (> 0) it wins over the fraction.
    pub memory_high_watermark_bytes: u64,
    /// Free disk space (bytes) under the data directory below which
    /// publishers are blocked.
    pub disk_free_limit: u64,
    /// How often memory and disk are checked (ms).
    pub check_interval_ms: u64,
}

impl Default for ResourceConfig {
    fn default() -> Self {
        ResourceConfig {
            memory_high_watermark: 0.4,
            memory_high_watermark_bytes: 0,
            disk_free_limit: 50_000_000,
            check_interval_ms: 1000,
        }
    }
}

/// AMQP listener settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// Address to listen on.
    pub bind: String,
    /// Port (0 picks a free one).
    pub port: u16,
    /// Largest frame we accept and propose in connection.tune (bytes).
    pub frame_max: u32,
    /// Highest channel number we accept.
    pub channel_max: u16,
    /// Heartbeat interval proposed to clients (seconds, 0 = off).
    pub heartbeat: u16,
    /// Time allowed from TCP accept to connection.open (ms).
    pub handshake_timeout_ms: u64,
    /// Largest message body accepted (bytes), as RabbitMQ's max_message_size.
    pub max_message_size: u64,
    /// Most connections accepted at once.
    pub max_connections: usize,
}

/// Storage settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Message store segment file size (bytes); whole segments are reclaimed
    /// once every message in them is acked.
    pub segment_size: u64,
}

/// Logging settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "warren=debug".
    pub level: String,
}

/// Default user and vhost.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Default user created at first start ("" to disable).
    pub default_user: String,
    /// Its password.
    pub default_pass: String,
    /// Default vhost created at first start ("" to disable).
    pub default_vhost: String,
    /// Users that may only connect from loopback addresses.
    pub loopback_users: Vec<String>,
}

/// Queue tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Capacity of each queue's inbox (batches). A full inbox makes
    /// publishers wait: that is the backpressure.
    pub inbox_capacity: usize,
    /// Deliveries in flight to a consumer's connection (not yet written to
    /// the socket) before the queue waits for the connection: bounds memory
    /// even for consumers with unlimited prefetch.
    pub delivery_window: u32,
    /// Ready message bodies each queue keeps in memory; beyond this,
    /// persistent messages of durable queues live only in the store and are
    /// read back ahead of delivery.
    pub max_in_memory: usize,
    /// Flow control: when a queue with consumers has more ready messages
    /// than this, its publishers are slowed until it drains (RabbitMQ's
    /// credit flow plays this role).
    pub flow_control_threshold: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            bind: "127.0.0.1".into(),
            port: 5672,
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
            handshake_timeout_ms: 10_000,
            max_message_size: 134_217_728,
            max_connections: 65_536,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("data"),
            segment_size: 64 << 20,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            default_user: "guest".into(),
            default_pass: "guest".into(),
            default_vhost: "/".into(),
            loopback_users: vec!["guest".into()],
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            inbox_capacity: 1024,
            delivery_window: 2000,
            max_in_memory: 20_000,
            flow_control_threshold: 50_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            amqp: AmqpConfig::default(),
            storage: StorageConfig::default(),
            log: LogConfig::default(),
            auth: AuthConfig::default(),
            queue: QueueConfig::default(),
            resources: ResourceConfig::default(),
            mgmt: MgmtConfig::default(),
            metrics: MetricsConfig::default(),
            tls: TlsConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

/// A configuration error, said so an operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or parsed.
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Settings that are lists (parsed from comma-separated environment values).
const LIST_KEYS: &[&str] = &[
    "auth.loopback_users",
    "cluster.seeds",
    "cluster.dial_overrides",
];

impl Config {
    /// Loads defaults < file (if given, or etc/warren.toml when present) < env.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut b = config::Config::builder();
        match file {
            Some(p) => b = b.add_source(config::File::from(p).required(true)),
            None => {
                b = b.add_source(config::File::from(Path::new("etc/warren.toml")).required(false))
            }
        }
        // Lists from the environment are comma-separated, e.g.
        // WARREN__CLUSTER__SEEDS=10.0.0.2:25672,10.0.0.3:25672 or
        // WARREN__AUTH__LOOPBACK_USERS= (empty: none).
        let mut env = config::Environment::with_prefix("WARREN")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",");
        for key in LIST_KEYS {
            env = env.with_list_parse_key(key);
        }
        b = b.add_source(env);
        let cfg: Config = b.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.amqp.frame_max < 4096 {
            return Err(ConfigError::Invalid(format!(
                "amqp.frame_max = {} is below the AMQP minimum of 4096",
                self.amqp.frame_max
            )));
        }
        if self.amqp.channel_max == 0 {
            return Err(ConfigError::Invalid(
                "amqp.channel_max must be at least 1".into(),
            ));
        }
        if self.queue.inbox_capacity == 0 || self.queue.delivery_window == 0 {
            return Err(ConfigError::Invalid(
                "queue.inbox_capacity and queue.delivery_window must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
