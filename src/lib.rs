//! Warren: an AMQP 0-9-1 message broker that RabbitMQ clients talk to
//! unchanged.
//!
//! # Layout
//! - [`server`]: the entry point, [`server::start`], and the accept loop.
//! - [`protocol`]: the wire (frames), the connection task and channel state
//!   machines, AMQP errors. Never touches storage.
//! - [`broker`]: vhosts, exchanges, bindings, routing, the queue registry.
//! - [`queue`]: the deterministic queue core and the queue actor.
//! - [`cluster`]: nodes, the inter-node transport and the Raft groups
//!   (metadata and quorum queues).
//! - [`auth`]: users, password hashes, per-vhost permissions.
//! - [`mgmt`]: the management HTTP API and Prometheus metrics.
//! - [`config`]: the typed configuration.
//!
//! ARCHITECTURE.md at the repository root has the task table and the life of
//! a message.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![warn(missing_docs)]

pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod mgmt;
pub mod protocol;
pub mod queue;
pub mod server;
pub mod store;
pub mod tls;
