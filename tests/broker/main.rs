//! Core broker behaviour through a real client (lapin) against a real
//! Warren on an ephemeral port.

#[path = "../common/mod.rs"]
mod common;

mod t10_basic;
