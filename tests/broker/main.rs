//! Core broker behaviour through a real client (lapin) against a real
//! Warren on an ephemeral port.

#[path = "../common/mod.rs"]
mod common;

mod t10_basic;
mod t11_connection;
mod t12_raw_frames;
mod t20_exchanges;
mod t30_routing;
mod t40_queues;
mod t50_consumers;
mod t60_confirms_tx;
mod t70_rpc;
mod t80_properties;
