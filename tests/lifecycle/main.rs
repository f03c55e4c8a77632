//! Message lifecycle: TTLs, dead-lettering with x-death, length limits,
//! delivery limits, queue expiry, priority queues, single active consumer,
//! consumer priorities and timeouts — through lapin against a real Warren.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/process.rs"]
mod process;

mod util;

mod t10_ttl_dlx;
mod t20_limits;
mod t30_priority;
mod t40_consumers;
mod t50_delayed;
mod t60_policies;
mod t70_retry;
mod t80_dedup;
