//! Message lifecycle: TTLs, dead-lettering with x-death, length limits,
//! delivery limits, queue expiry — through lapin against a real Warren.

#[path = "../common/mod.rs"]
mod common;

mod t10_ttl_dlx;
mod t20_limits;
