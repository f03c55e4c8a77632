//! Stream queue arguments: retention (`x-max-length-bytes`, `x-max-age`),
//! segment size (`x-stream-max-segment-size-bytes`) and the Bloom filter
//! size (`x-stream-filter-size-bytes`), parsed once at declare or recovery.

use crate::broker::headers::{value_int, value_str};
use amq_protocol::types::FieldTable;

/// RabbitMQ's default segment size: 500 MB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 500_000_000;
/// RabbitMQ's default filter size per chunk.
pub const DEFAULT_FILTER_SIZE: usize = 16;

/// How a stream stores and retains its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// Total bytes kept (whole old segments are deleted beyond it).
    pub max_length_bytes: Option<u64>,
    /// Age beyond which whole old segments are deleted, in milliseconds.
    pub max_age_ms: Option<u64>,
    /// A segment is sealed and a new one started beyond this size.
    pub max_segment_size: u64,
    /// Bytes of Bloom filter per chunk (RabbitMQ: 16..=255).
    pub filter_size: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            max_length_bytes: None,
            max_age_ms: None,
            max_segment_size: DEFAULT_SEGMENT_SIZE,
            filter_size: DEFAULT_FILTER_SIZE,
        }
    }
}

impl StreamSettings {
    /// Parses the stream arguments of a queue.declare. The error is the
    /// detail of RabbitMQ's "invalid arg" text: (argument, why).
    pub fn from_args(args: &FieldTable) -> Result<StreamSettings, (String, String)> {
        let mut s = StreamSettings::default();
        for (k, v) in args.inner() {
            let k = k.as_str();
            let positive = |v| match value_int(v) {
                Some(i) if i >= 0 => Ok(i as u64),
                Some(i) => Err((k.to_string(), format!("{{value_negative,{i}}}"))),
                None => Err((
                    k.to_string(),
                    "{unacceptable_type,not_an_integer}".to_string(),
                )),
            };
            match k {
                "x-max-length-bytes" => s.max_length_bytes = Some(positive(v)?),
                "x-stream-max-segment-size-bytes" => s.max_segment_size = positive(v)?.max(1),
                "x-stream-filter-size-bytes" => {
                    let n = positive(v)?;
                    if !(16..=255).contains(&n) {
                        return Err((k.to_string(), format!("{{value_out_of_range,{n},16,255}}")));
                    }
                    s.filter_size = n as usize;
                }
                "x-max-age" => {
                    let text = value_str(v).ok_or_else(|| {
                        (
                            k.to_string(),
                            "{unacceptable_type,not_a_string}".to_string(),
                        )
                    })?;
                    s.max_age_ms = Some(parse_age(&text).ok_or_else(|| {
                        (k.to_string(), format!("{{invalid_max_age,<<\"{text}\">>}}"))
                    })?);
                }
                _ => {}
            }
        }
        Ok(s)
    }
}

/// Parses RabbitMQ's age strings ("7D", "12h", "30m", "10s", "1Y", "2M")
/// into milliseconds. Units as `rabbit_amqqueue:check_max_age`: Y = 365
/// days, M = 30 days.
pub fn parse_age(s: &str) -> Option<u64> {
    let s = s.trim();
    let unit = s.chars().last()?;
    let n: u64 = s.get(..s.len() - unit.len_utf8())?.parse().ok()?;
    let secs = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    n.checked_mul(secs)?.checked_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::AMQPValue;

    #[test]
    fn ages() {
        assert_eq!(parse_age("7D"), Some(7 * 86_400_000));
        assert_eq!(parse_age("12h"), Some(12 * 3_600_000));
        assert_eq!(parse_age("30m"), Some(1_800_000));
        assert_eq!(parse_age("10s"), Some(10_000));
        assert_eq!(parse_age("1Y"), Some(365 * 86_400_000));
        assert_eq!(parse_age("10"), None);
        assert_eq!(parse_age("h"), None);
        assert_eq!(parse_age("-1h"), None);
    }

    #[test]
    fn args() {
        let mut t = FieldTable::default();
        t.insert("x-max-age".into(), AMQPValue::LongString("2h".into()));
        t.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongInt(1000),
        );
        t.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(5000));
        let s = StreamSettings::from_args(&t).unwrap();
        assert_eq!(s.max_age_ms, Some(7_200_000));
        assert_eq!(s.max_segment_size, 1000);
        assert_eq!(s.max_length_bytes, Some(5000));
        t.insert("x-max-age".into(), AMQPValue::LongString("2x".into()));
        assert!(StreamSettings::from_args(&t).is_err());
    }
}
