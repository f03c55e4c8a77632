//! Queue arguments: validation on declare and the equivalence check that
//! decides whether a redeclare matches, with RabbitMQ's reply texts.

use crate::broker::headers::{value_int, value_str};
use crate::protocol::error::AmqpError;
use amq_protocol::types::{AMQPValue, FieldTable};

/// Overflow behaviour when a length limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest.
    #[default]
    DropHead,
    /// Refuse the new message (nack with confirms).
    RejectPublish,
    /// Refuse and dead-letter the new message.
    RejectPublishDlx,
}

/// Which returned messages are delayed before they are ready again
/// (x-delayed-retry-type, RabbitMQ 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryType {
    /// No delay (the default).
    #[default]
    Disabled,
    /// Both failed and returned messages.
    All,
    /// nack/reject with requeue=true.
    Failed,
    /// Returned without a nack (channel closed, connection lost, consumer
    /// timeout).
    Returned,
}

/// How the retry delay grows with the delivery count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backoff {
    /// min × delivery-count.
    #[default]
    Linear,
    /// min × 2^(delivery-count − 1).
    Exponential,
}

/// Delayed retry settings (x-delayed-retry-*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryArgs {
    /// x-delayed-retry-type.
    pub kind: RetryType,
    /// x-delayed-retry-min (ms).
    pub min: u64,
    /// x-delayed-retry-max (ms), None = no cap.
    pub max: Option<u64>,
    /// x-delayed-retry-backoff.
    pub backoff: Backoff,
}

impl RetryArgs {
    /// The delay (ms) before a message returned for the `count`th time
    /// (count >= 1) is ready again; 0 = none. `failed` tells a nack/reject
    /// with requeue from a return without one.
    pub fn delay(&self, failed: bool, count: u64) -> u64 {
        let applies = match self.kind {
            RetryType::Disabled => false,
            RetryType::All => true,
            RetryType::Failed => failed,
            RetryType::Returned => !failed,
        };
        if !applies || self.min == 0 {
            return 0;
        }
        let count = count.max(1);
        let d = match self.backoff {
            Backoff::Linear => self.min.saturating_mul(count),
            Backoff::Exponential => self.min.saturating_mul(
                1u64.checked_shl((count - 1).min(63) as u32)
                    .unwrap_or(u64::MAX),
            ),
        };
        self.max.map_or(d, |m| d.min(m))
    }
}

/// Delayed retry settings once a policy is applied: each of the policy keys
/// delayed-retry-type, delayed-retry-min, delayed-retry-max and
/// delayed-retry-backoff is used where the queue has no x- argument for it.
/// Invalid policy values are ignored.
pub fn effective_retry<'a>(
    args: &QueueArgs,
    arguments: &FieldTable,
    policy: impl Fn(&str) -> Option<&'a serde_json::Value>,
) -> RetryArgs {
    let mut r = args.retry;
    let unset = |k: &str| !arguments.inner().contains_key(format!("x-{k}").as_str());
    if unset("delayed-retry-type") {
        match policy("delayed-retry-type").and_then(|v| v.as_str()) {
            Some("disabled") => r.kind = RetryType::Disabled,
            Some("all") => r.kind = RetryType::All,
            Some("failed") => r.kind = RetryType::Failed,
            Some("returned") => r.kind = RetryType::Returned,
            _ => {}
        }
    }
    if unset("delayed-retry-backoff") {
        match policy("delayed-retry-backoff").and_then(|v| v.as_str()) {
            Some("linear") => r.backoff = Backoff::Linear,
            Some("exponential") => r.backoff = Backoff::Exponential,
            _ => {}
        }
    }
    if unset("delayed-retry-min") {
        if let Some(v) = policy("delayed-retry-min").and_then(|v| v.as_u64()) {
            r.min = v;
        }
    }
    if unset("delayed-retry-max") {
        if let Some(v) = policy("delayed-retry-max").and_then(|v| v.as_u64()) {
            r.max = Some(v);
        }
    }
    r
}

/// Parsed queue arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArgs {
    /// x-message-ttl (ms).
    pub message_ttl: Option<u64>,
    /// x-expires (ms).
    pub expires: Option<u64>,
    /// x-max-length.
    pub max_length: Option<u64>,
    /// x-max-length-bytes.
    pub max_length_bytes: Option<u64>,
    /// x-overflow.
    pub overflow: Overflow,
    /// x-dead-letter-exchange.
    pub dead_letter_exchange: Option<String>,
    /// x-dead-letter-routing-key.
    pub dead_letter_routing_key: Option<String>,
    /// x-max-priority.
    pub max_priority: Option<u8>,
    /// x-single-active-consumer.
    pub single_active_consumer: bool,
    /// x-delivery-limit.
    pub delivery_limit: Option<u64>,
    /// x-quorum-initial-group-size (quorum queues: replicas at declare).
    pub quorum_initial_group_size: Option<u64>,
    /// x-consumer-timeout (ms).
    pub consumer_timeout: Option<u64>,
    /// x-queue-type.
    pub queue_type: String,
    /// x-delayed-retry-type / -min / -max / -backoff.
    pub retry: RetryArgs,
    /// x-message-deduplication with x-cache-size / x-cache-ttl.
    pub dedup: Option<DedupArgs>,
}

/// Message deduplication settings (the community plugin's and LavinMQ's
/// x-message-deduplication, x-cache-size, x-cache-ttl).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DedupArgs {
    /// x-cache-size: most ids remembered (None = unbounded).
    pub cache_size: Option<u64>,
    /// x-cache-ttl (ms): how long an id is remembered (None = until evicted).
    pub cache_ttl: Option<u64>,
}

/// Arguments compared on redeclare (as RabbitMQ's declare_args list).
const EQUIVALENCE_CHECKED: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-type",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-delayed-retry-type",
    "x-delayed-retry-min",
    "x-delayed-retry-max",
    "x-delayed-retry-backoff",
    "x-message-deduplication",
    "x-cache-size",
    "x-cache-ttl",
];

/// Legacy arguments accepted but ignored, so older apps keep working.
const LEGACY_IGNORED: &[&str] = &["x-queue-mode", "x-queue-version", "x-queue-master-locator"];

/// RabbitMQ's name for a field type, used in reply texts.
pub fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

/// RabbitMQ's type classes for equivalence (all integers are one class).
fn type_class(v: &AMQPValue) -> &'static str {
    if value_int(v).is_some() && !matches!(v, AMQPValue::Timestamp(_)) {
        return "int";
    }
    match v {
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        other => type_name(other),
    }
}

/// Human form of a value for reply texts.
pub fn show(v: &AMQPValue) -> String {
    if let Some(i) = value_int(v) {
        return i.to_string();
    }
    if let Some(s) = value_str(v) {
        return s;
    }
    match v {
        AMQPValue::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn invalid(name: &str, vhost: &str, arg: &str, why: String) -> AmqpError {
    AmqpError::precondition(format!(
        "invalid arg '{arg}' for queue '{name}' in vhost '{vhost}': {why}"
    ))
}

impl QueueArgs {
    /// Validates and parses declare arguments.
    pub fn parse(args: &FieldTable, name: &str, vhost: &str) -> Result<QueueArgs, AmqpError> {
        let mut out = QueueArgs {
            queue_type: "classic".into(),
            ..Default::default()
        };
        let int = |k: &str, v: &AMQPValue, min: i64| -> Result<u64, AmqpError> {
            match value_int(v) {
                None => Err(invalid(
                    name,
                    vhost,
                    k,
                    format!("{{unacceptable_type,{}}}", type_name(v)),
                )),
                Some(i) if i < min => Err(invalid(
                    name,
                    vhost,
                    k,
                    format!(
                        "{{{},{i}}}",
                        if min == 0 {
                            "value_negative"
                        } else {
                            "value_zero"
                        }
                    ),
                )),
                Some(i) => Ok(i as u64),
            }
        };
        let string = |k: &str, v: &AMQPValue| -> Result<String, AmqpError> {
            value_str(v).ok_or_else(|| {
                invalid(
                    name,
                    vhost,
                    k,
                    format!("{{unacceptable_type,{}}}", type_name(v)),
                )
            })
        };
        for (k, v) in args.inner() {
            let k = k.as_str();
            match k {
                "x-message-ttl" => out.message_ttl = Some(int(k, v, 0)?),
                "x-expires" => out.expires = Some(int(k, v, 1)?),
                "x-max-length" => out.max_length = Some(int(k, v, 0)?),
                "x-max-length-bytes" => out.max_length_bytes = Some(int(k, v, 0)?),
                "x-delivery-limit" => out.delivery_limit = Some(int(k, v, 0)?),
                "x-quorum-initial-group-size" => {
                    out.quorum_initial_group_size = Some(int(k, v, 1)?)
                }
                "x-consumer-timeout" => out.consumer_timeout = Some(int(k, v, 0)?),
                "x-message-deduplication" => match v {
                    AMQPValue::Boolean(true) => {
                        out.dedup.get_or_insert_with(DedupArgs::default);
                    }
                    AMQPValue::Boolean(false) => {}
                    _ => {
                        return Err(invalid(
                            name,
                            vhost,
                            k,
                            format!("{{unacceptable_type,{}}}", type_name(v)),
                        ));
                    }
                },
                "x-delayed-retry-min" => out.retry.min = int(k, v, 0)?,
                "x-delayed-retry-max" => out.retry.max = Some(int(k, v, 0)?),
                "x-delayed-retry-type" => {
                    out.retry.kind = match string(k, v)?.as_str() {
                        "disabled" => RetryType::Disabled,
                        "all" => RetryType::All,
                        "failed" => RetryType::Failed,
                        "returned" => RetryType::Returned,
                        other => {
                            return Err(invalid(
                                name,
                                vhost,
                                k,
                                format!("{{unknown_delayed_retry_type,<<\"{other}\">>}}"),
                            ));
                        }
                    }
                }
                "x-delayed-retry-backoff" => {
                    out.retry.backoff = match string(k, v)?.as_str() {
                        "linear" => Backoff::Linear,
                        "exponential" => Backoff::Exponential,
                        other => {
                            return Err(invalid(
                                name,
                                vhost,
                                k,
                                format!("{{unknown_delayed_retry_backoff,<<\"{other}\">>}}"),
                            ));
                        }
                    }
                }
                "x-max-priority" => {
                    let p = int(k, v, 0)?;
                    if p > 255 {
                        return Err(invalid(
                            name,
                            vhost,
                            k,
                            format!("{{value_too_large,{p},255}}"),
                        ));
                    }
                    out.max_priority = Some(p as u8);
                }
                "x-overflow" => {
                    out.overflow = match string(k, v)?.as_str() {
                        "drop-head" => Overflow::DropHead,
                        "reject-publish" => Overflow::RejectPublish,
                        "reject-publish-dlx" => Overflow::RejectPublishDlx,
                        other => {
                            return Err(invalid(
                                name,
                                vhost,
                                k,
                                format!("{{unknown_overflow_type,<<\"{other}\">>}}"),
                            ));
                        }
                    }
                }
                "x-dead-letter-exchange" => out.dead_letter_exchange = Some(string(k, v)?),
                "x-dead-letter-routing-key" => out.dead_letter_routing_key = Some(string(k, v)?),
                "x-single-active-consumer" => match v {
                    AMQPValue::Boolean(b) => out.single_active_consumer = *b,
                    _ => {
                        return Err(invalid(
                            name,
                            vhost,
                            k,
                            format!("{{unacceptable_type,{}}}", type_name(v)),
                        ));
                    }
                },
                "x-queue-type" => {
                    let t = string(k, v)?;
                    if t != "classic" && t != "stream" && t != "quorum" {
                        return Err(invalid(
                            name,
                            vhost,
                            k,
                            format!(
                                "queue type '{t}' is not available on this Warren node (supported: classic, quorum, stream)"
                            ),
                        ));
                    }
                    out.queue_type = t;
                }
                k if LEGACY_IGNORED.contains(&k) => {
                    tracing::warn!(
                        queue = name,
                        vhost,
                        argument = k,
                        "queue argument {k} is a legacy setting that Warren accepts and ignores"
                    );
                }
                _ => {}
            }
        }
        if let Some(d) = out.dedup.as_mut() {
            for (k, slot, min) in [
                ("x-cache-size", &mut d.cache_size, 1),
                ("x-cache-ttl", &mut d.cache_ttl, 1),
            ] {
                if let Some(v) = args.inner().get(k) {
                    *slot = Some(int(k, v, min)?);
                }
            }
        }
        if let Some(max) = out.retry.max.filter(|m| *m < out.retry.min) {
            return Err(invalid(
                name,
                vhost,
                "x-delayed-retry-max",
                format!("{{value_less_than_min,{max},{}}}", out.retry.min),
            ));
        }
        if out.dead_letter_routing_key.is_some() && out.dead_letter_exchange.is_none() {
            return Err(invalid(
                name,
                vhost,
                "x-dead-letter-routing-key",
                "{routing_key_but_no_dlx_defined}".into(),
            ));
        }
        Ok(out)
    }
}

/// The redeclare equivalence check over the arguments RabbitMQ compares.
pub fn check_equivalent(
    current: &FieldTable,
    requested: &FieldTable,
    name: &str,
    vhost: &str,
) -> Result<(), AmqpError> {
    for k in EQUIVALENCE_CHECKED {
        let a = requested.inner().get(*k);
        let b = current.inner().get(*k);
        let same = match (a, b) {
            (None, None) => true,
            (Some(x), Some(y)) => crate::broker::headers::values_equal(x, y),
            // x-queue-type classic is the default: omitting it is equivalent.
            (Some(x), None) | (None, Some(x)) if *k == "x-queue-type" => {
                value_str(x).as_deref() == Some("classic")
            }
            _ => false,
        };
        if !same {
            // As RabbitMQ: bare values when both sides have the argument
            // with the same class of type, typed values otherwise.
            let same_class = matches!((a, b), (Some(x), Some(y)) if type_class(x) == type_class(y));
            let fmt = |v: Option<&AMQPValue>| match v {
                None => "none".to_string(),
                Some(v) if same_class => format!("'{}'", show(v)),
                Some(v) => format!("the value '{}' of type '{}'", show(v), type_name(v)),
            };
            return Err(AmqpError::precondition(format!(
                "inequivalent arg '{k}' for queue '{name}' in vhost '{vhost}': received {} but current is {}",
                fmt(a),
                fmt(b)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(kv: &[(&str, AMQPValue)]) -> FieldTable {
        let mut f = FieldTable::default();
        for (k, v) in kv {
            f.insert((*k).into(), v.clone());
        }
        f
    }

    #[test]
    fn parse_and_reject() {
        let a =
            QueueArgs::parse(&t(&[("x-message-ttl", AMQPValue::LongInt(100))]), "q", "/").unwrap();
        assert_eq!(a.message_ttl, Some(100));
        let e = QueueArgs::parse(&t(&[("x-message-ttl", AMQPValue::LongInt(-1))]), "q", "/")
            .unwrap_err();
        assert_eq!(
            e.text,
            "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue 'q' in vhost '/': {value_negative,-1}"
        );
        let e = QueueArgs::parse(
            &t(&[("x-max-length", AMQPValue::LongString("x".into()))]),
            "q",
            "/",
        )
        .unwrap_err();
        assert!(e.text.ends_with("{unacceptable_type,longstr}"));
        assert!(
            QueueArgs::parse(
                &t(&[("x-queue-mode", AMQPValue::LongString("lazy".into()))]),
                "q",
                "/"
            )
            .is_ok()
        );
    }

    #[test]
    fn equivalence() {
        let cur = t(&[("x-max-length", AMQPValue::LongInt(10))]);
        assert!(
            check_equivalent(
                &cur,
                &t(&[("x-max-length", AMQPValue::ShortShortUInt(10))]),
                "q",
                "/"
            )
            .is_ok()
        );
        let e = check_equivalent(&cur, &t(&[]), "q", "/").unwrap_err();
        assert_eq!(
            e.text,
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'q' in vhost '/': received none but current is the value '10' of type 'signedint'"
        );
        assert!(
            check_equivalent(
                &t(&[]),
                &t(&[("x-queue-mode", AMQPValue::LongString("lazy".into()))]),
                "q",
                "/"
            )
            .is_ok()
        );
    }
}
