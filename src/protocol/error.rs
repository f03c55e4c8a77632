//! AMQP exceptions: the one typed error every handler returns.
//!
//! An [`AmqpError`] knows its reply code, whether it closes the channel (soft)
//! or the whole connection (hard), and the class/method that caused it. Only the
//! connection loop turns it into a `channel.close` or `connection.close`.

use amq_protocol::types::ShortString;

/// Reply codes Warren sends, named as in the AMQP 0-9-1 spec.
#[allow(missing_docs)]
pub mod code {
    pub const REPLY_SUCCESS: u16 = 200;
    pub const CONTENT_TOO_LARGE: u16 = 311;
    pub const NO_ROUTE: u16 = 312;
    pub const NO_CONSUMERS: u16 = 313;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const INVALID_PATH: u16 = 402;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

/// An AMQP exception raised while handling a frame.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{text}")]
pub struct AmqpError {
    /// Reply code (see [`code`]).
    pub code: u16,
    /// Reply text, already prefixed with the code name (`NOT_FOUND - ...`).
    pub text: String,
    /// Class of the method that caused the error (0 when not method-related).
    pub class_id: u16,
    /// Method that caused the error (0 when not method-related).
    pub method_id: u16,
}

fn code_name(code: u16) -> &'static str {
    match code {
        code::CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
        code::NO_ROUTE => "NO_ROUTE",
        code::NO_CONSUMERS => "NO_CONSUMERS",
        code::CONNECTION_FORCED => "CONNECTION_FORCED",
        code::INVALID_PATH => "INVALID_PATH",
        code::ACCESS_REFUSED => "ACCESS_REFUSED",
        code::NOT_FOUND => "NOT_FOUND",
        code::RESOURCE_LOCKED => "RESOURCE_LOCKED",
        code::PRECONDITION_FAILED => "PRECONDITION_FAILED",
        code::FRAME_ERROR => "FRAME_ERROR",
        code::SYNTAX_ERROR => "SYNTAX_ERROR",
        code::COMMAND_INVALID => "COMMAND_INVALID",
        code::CHANNEL_ERROR => "CHANNEL_ERROR",
        code::UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        code::RESOURCE_ERROR => "RESOURCE_ERROR",
        code::NOT_ALLOWED => "NOT_ALLOWED",
        code::NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

impl AmqpError {
    /// Builds an error with `CODE_NAME - detail` as its reply text.
    pub fn new(code: u16, detail: impl std::fmt::Display) -> Self {
        AmqpError {
            code,
            text: format!("{} - {}", code_name(code), detail),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Attaches the class and method that caused the error.
    pub fn on(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }

    /// True when the error closes only the channel (3xx/4xx codes).
    pub fn is_soft(&self) -> bool {
        matches!(
            self.code,
            code::CONTENT_TOO_LARGE
                | code::NO_ROUTE
                | code::NO_CONSUMERS
                | code::ACCESS_REFUSED
                | code::NOT_FOUND
                | code::RESOURCE_LOCKED
                | code::PRECONDITION_FAILED
        )
    }

    /// The reply text as a wire short string (cut at 255 bytes on a char boundary).
    pub fn reply_text(&self) -> ShortString {
        short(&self.text)
    }

    /// 404 for a missing queue.
    pub fn queue_not_found(vhost: &str, name: &str) -> Self {
        Self::new(
            code::NOT_FOUND,
            format!("no queue '{name}' in vhost '{vhost}'"),
        )
    }

    /// 404 for a missing exchange.
    pub fn exchange_not_found(vhost: &str, name: &str) -> Self {
        Self::new(
            code::NOT_FOUND,
            format!("no exchange '{name}' in vhost '{vhost}'"),
        )
    }

    /// 405 for a queue exclusive to another connection.
    pub fn queue_locked(vhost: &str, name: &str) -> Self {
        Self::new(
            code::RESOURCE_LOCKED,
            format!(
                "cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'. \
                 It could be originally declared on another connection or the exclusive property \
                 value does not match that of the original declaration."
            ),
        )
    }

    /// 406 for a precondition.
    pub fn precondition(detail: impl std::fmt::Display) -> Self {
        Self::new(code::PRECONDITION_FAILED, detail)
    }

    /// 541 for a broker-side fault.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::new(code::INTERNAL_ERROR, detail)
    }
}

/// Converts text into a ShortString, cutting it at 255 bytes on a char boundary
/// (amq-protocol panics on longer strings, and reply texts may embed names).
pub fn short(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::try_new(&s[..end]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_and_hard() {
        assert!(AmqpError::queue_not_found("/", "q").is_soft());
        assert!(!AmqpError::new(code::FRAME_ERROR, "x").is_soft());
        assert_eq!(
            AmqpError::queue_not_found("/", "q").text,
            "NOT_FOUND - no queue 'q' in vhost '/'"
        );
    }

    #[test]
    fn short_cuts_on_char_boundary() {
        let long = "é".repeat(200);
        let s = short(&long);
        assert!(s.as_str().len() <= 255);
        assert!(s.as_str().chars().all(|c| c == 'é'));
    }
}
