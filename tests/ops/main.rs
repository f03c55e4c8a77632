//! The operations layer: users, vhosts and permissions over AMQP, the
//! management HTTP API, definitions, metrics and warrenctl.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/process.rs"]
mod process;

mod http;
mod t10_permissions;
mod t15_topic_permissions;
mod t20_api;
mod t25_stats;
mod t30_definitions;
mod t40_metrics;
mod t50_warrenctl;
mod t60_restart;
mod t90_tls;
