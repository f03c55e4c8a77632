//! Headers exchange matching (x-match all / any / all-with-x / any-with-x).

use crate::protocol::error::AmqpError;
use amq_protocol::types::{AMQPValue, FieldTable};

/// How a headers binding matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XMatch {
    /// Every binding header must match (x- headers ignored).
    All,
    /// At least one must match (x- headers ignored).
    Any,
    /// Like All, x- headers included.
    AllWithX,
    /// Like Any, x- headers included.
    AnyWithX,
}

/// A parsed headers binding.
#[derive(Debug, Clone)]
pub struct HeadersMatcher {
    mode: XMatch,
    args: Vec<(String, AMQPValue)>,
}

impl HeadersMatcher {
    /// Parses binding arguments; a bad x-match is 406 as in RabbitMQ.
    pub fn new(args: &FieldTable) -> Result<Self, AmqpError> {
        let mode = match args.inner().get("x-match") {
            None => XMatch::All,
            Some(v) => match value_str(v).as_deref() {
                Some("all") => XMatch::All,
                Some("any") => XMatch::Any,
                Some("all-with-x") => XMatch::AllWithX,
                Some("any-with-x") => XMatch::AnyWithX,
                _ => {
                    return Err(AmqpError::precondition(format!(
                        "Invalid x-match field value {v:?}; expected all, any, all-with-x, or any-with-x"
                    )));
                }
            },
        };
        let with_x = matches!(mode, XMatch::AllWithX | XMatch::AnyWithX);
        let args = args
            .inner()
            .iter()
            .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.as_str().starts_with("x-")))
            .map(|(k, v)| (k.as_str().to_string(), v.clone()))
            .collect();
        Ok(HeadersMatcher { mode, args })
    }

    /// Does a message with `headers` match?
    pub fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let empty = FieldTable::default();
        let headers = headers.unwrap_or(&empty).inner();
        let one = |(k, v): &(String, AMQPValue)| match headers.get(k.as_str()) {
            None => false,
            Some(hv) => matches!(v, AMQPValue::Void) || values_equal(v, hv),
        };
        match self.mode {
            XMatch::All | XMatch::AllWithX => self.args.iter().all(one),
            XMatch::Any | XMatch::AnyWithX => self.args.iter().any(one),
        }
    }
}

/// Text of a string-typed value.
pub fn value_str(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Integer value of any integer-typed value.
pub fn value_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(i) => i64::from(*i),
        AMQPValue::ShortShortUInt(i) => i64::from(*i),
        AMQPValue::ShortInt(i) => i64::from(*i),
        AMQPValue::ShortUInt(i) => i64::from(*i),
        AMQPValue::LongInt(i) => i64::from(*i),
        AMQPValue::LongUInt(i) => i64::from(*i),
        AMQPValue::LongLongInt(i) => *i,
        AMQPValue::Timestamp(t) => i64::try_from(*t).ok()?,
        _ => return None,
    })
}

/// Equality that treats all integer widths and both string kinds alike, as
/// clients pick different encodings for the same value.
pub fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    if let (Some(x), Some(y)) = (value_int(a), value_int(b)) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (value_str(a), value_str(b)) {
        return x == y;
    }
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(kv: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in kv {
            t.insert((*k).into(), v.clone());
        }
        t
    }
    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    #[test]
    fn all_any_and_x() {
        let all =
            HeadersMatcher::new(&table(&[("format", s("pdf")), ("type", s("report"))])).unwrap();
        let any = HeadersMatcher::new(&table(&[
            ("x-match", s("any")),
            ("format", s("pdf")),
            ("type", s("log")),
        ]))
        .unwrap();
        let m1 = table(&[("format", s("pdf")), ("type", s("report"))]);
        let m2 = table(&[("format", s("pdf")), ("type", s("other"))]);
        assert!(all.matches(Some(&m1)));
        assert!(!all.matches(Some(&m2)));
        assert!(any.matches(Some(&m2)));
        assert!(!any.matches(None));
        let allx =
            HeadersMatcher::new(&table(&[("x-match", s("all-with-x")), ("x-k", s("v"))])).unwrap();
        assert!(allx.matches(Some(&table(&[("x-k", s("v"))]))));
        let all_ignores_x = HeadersMatcher::new(&table(&[("x-k", s("v"))])).unwrap();
        assert!(all_ignores_x.matches(None));
        assert!(HeadersMatcher::new(&table(&[("x-match", s("some"))])).is_err());
        let ints = HeadersMatcher::new(&table(&[("n", AMQPValue::LongInt(5))])).unwrap();
        assert!(ints.matches(Some(&table(&[("n", AMQPValue::ShortShortUInt(5))]))));
    }
}
