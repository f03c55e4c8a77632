//! Durability through the real binary: restart, crash (SIGKILL), unacked
//! redelivery, confirms under fast consumers, paging.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/process.rs"]
mod process;

mod t10_restart;
mod t20_crash;
mod t30_paging;
mod t40_delayed_restart;
mod t50_priority_restart;
mod t60_retry_dedup_restart;
