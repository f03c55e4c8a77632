//! Flow control: resource alarms block publishers (connection.blocked) while
//! consumers keep draining; backpressure never loses a message.

#[path = "../common/mod.rs"]
mod common;

mod t10_alarm;
mod t20_resource_limits;
mod t30_flow_control;
