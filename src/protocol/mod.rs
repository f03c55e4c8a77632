//! The AMQP 0-9-1 front end: frames, the connection task, channel state
//! machines and AMQP errors. This layer knows AMQP; it asks `broker` to route
//! and sends commands to queue actors, and never touches storage.

pub mod channel;
pub mod connection;
pub mod error;
pub mod frame;
pub mod socket;
