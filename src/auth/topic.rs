//! Topic permissions, as RabbitMQ's topic authorisation: per (user, vhost,
//! exchange) a write and a read regular expression, matched against routing
//! keys on topic exchanges only.
//!
//! - basic.publish to a topic exchange checks the routing key against the
//!   write pattern;
//! - queue.bind/unbind and exchange.bind/unbind with a topic exchange as
//!   source check the binding key against the read pattern.
//!
//! A user with no topic permission for an exchange may use every key on it
//! (RabbitMQ's internal backend answers `true` when there is none). An empty
//! pattern means `^$`. Patterns may contain `{username}` and `{vhost}`,
//! replaced (unescaped, as RabbitMQ does) by the connection's user and
//! vhost; since both are fixed for a (user, vhost) entry, the patterns are
//! expanded and compiled once, when they are set.
//!
//! The publish hot path: each connection keeps a [`TopicCache`] (the
//! user's compiled permissions for its vhost, loaded at open) and reloads it
//! only when [`super::Users::topic_generation`] moved, one relaxed atomic
//! load. A connection whose user has none pays that load on topic exchanges
//! and nothing on others.

use super::permissions::Perm;
use crate::broker::exchange::{Exchange, ExchangeKind};
use crate::protocol::connection::Connection;
use crate::protocol::error::{AmqpError, code};
use regex::Regex;
use std::collections::HashMap;
use std::sync::Arc;

/// One topic permission: the patterns as given and as compiled for its
/// user and vhost.
#[derive(Debug, Clone)]
pub struct TopicPermission {
    /// Topic exchange name.
    pub exchange: String,
    /// Write pattern, as given.
    pub write: String,
    /// Read pattern, as given.
    pub read: String,
    write_re: Regex,
    read_re: Regex,
}

/// RabbitMQ's expansion: "" means "^$"; `{username}` then `{vhost}` are
/// replaced verbatim.
pub fn expand(pattern: &str, user: &str, vhost: &str) -> String {
    if pattern.is_empty() {
        return "^$".into();
    }
    pattern
        .replace("{username}", user)
        .replace("{vhost}", vhost)
}

impl TopicPermission {
    /// Expands and compiles both patterns for `user` in `vhost`; an invalid
    /// one is an error the caller reports (HTTP 400).
    pub fn new(
        user: &str,
        vhost: &str,
        exchange: &str,
        write: &str,
        read: &str,
    ) -> Result<TopicPermission, regex::Error> {
        Ok(TopicPermission {
            exchange: exchange.to_string(),
            write: write.to_string(),
            read: read.to_string(),
            write_re: Regex::new(&expand(write, user, vhost))?,
            read_re: Regex::new(&expand(read, user, vhost))?,
        })
    }

    /// Whether `perm` (write or read) allows this routing key. Configure
    /// does not apply to topics and is always refused.
    pub fn allows(&self, perm: Perm, routing_key: &str) -> bool {
        match perm {
            Perm::Write => self.write_re.is_match(routing_key),
            Perm::Read => self.read_re.is_match(routing_key),
            Perm::Configure => false,
        }
    }
}

/// One user's topic permissions in one vhost, by exchange name.
pub type TopicPerms = HashMap<String, Arc<TopicPermission>>;

/// RabbitMQ's refusal (rabbit_access_control:check_topic_access):
/// `ACCESS_REFUSED - write access to topic 'a.b' in exchange 'amq.topic' in vhost '/' refused for user 'bob'`.
pub fn refused(
    perm: Perm,
    routing_key: &str,
    exchange: &str,
    vhost: &str,
    user: &str,
) -> AmqpError {
    AmqpError::new(
        code::ACCESS_REFUSED,
        format!(
            "{} access to topic '{routing_key}' in exchange '{exchange}' in vhost '{vhost}' refused for user '{user}'",
            perm.as_str()
        ),
    )
}

/// Whether topic authorisation applies to this exchange: topic exchanges
/// only (an x-delayed-message exchange routing as topic is not one, as in
/// RabbitMQ, where its type is x-delayed-message).
pub fn applies(ex: &Exchange) -> bool {
    ex.kind == ExchangeKind::Topic && !ex.delayed
}

/// Checks a routing key against a set of topic permissions.
pub fn check_in(
    perms: Option<&TopicPerms>,
    ex: &Exchange,
    perm: Perm,
    routing_key: &str,
    vhost: &str,
    user: &str,
) -> Result<(), AmqpError> {
    if !applies(ex) {
        return Ok(());
    }
    match perms.and_then(|m| m.get(&ex.name)) {
        Some(p) if !p.allows(perm, routing_key) => {
            Err(refused(perm, routing_key, &ex.name, vhost, user))
        }
        _ => Ok(()),
    }
}

/// Checks a routing key for a user in a vhost by looking the permissions
/// up (management API paths; connections use their [`TopicCache`]).
pub fn check(
    users: &super::Users,
    user: &str,
    vhost: &str,
    ex: &Exchange,
    perm: Perm,
    routing_key: &str,
) -> Result<(), AmqpError> {
    if !applies(ex) {
        return Ok(());
    }
    let perms = users.topic_permissions_of(user, vhost);
    check_in(perms.as_deref(), ex, perm, routing_key, vhost, user)
}

/// A connection's copy of its user's topic permissions in its vhost.
#[derive(Debug, Default)]
pub struct TopicCache {
    generation: u64,
    perms: Option<Arc<TopicPerms>>,
}

impl TopicCache {
    /// The current permissions of `user` in `vhost`.
    pub fn load(users: &super::Users, user: &str, vhost: &str) -> TopicCache {
        // Generation first: a change racing with this load bumps it after
        // storing, so the next check reloads.
        let generation = users.topic_generation();
        TopicCache {
            generation,
            perms: users.topic_permissions_of(user, vhost),
        }
    }
}

impl Connection {
    /// Topic authorisation for `perm` with `routing_key` on `ex` (a no-op
    /// unless `ex` is a topic exchange).
    pub(crate) fn check_topic(
        &mut self,
        ex: &Exchange,
        perm: Perm,
        routing_key: &str,
    ) -> Result<(), AmqpError> {
        if !applies(ex) {
            return Ok(());
        }
        if self.broker.users.topic_generation() != self.topic_perms.generation {
            self.topic_perms = TopicCache::load(&self.broker.users, &self.user, &self.vhost.name);
        }
        check_in(
            self.topic_perms.perms.as_deref(),
            ex,
            perm,
            routing_key,
            &self.vhost.name,
            &self.user,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::FieldTable;

    fn topic(name: &str) -> Exchange {
        Exchange::new(
            name,
            ExchangeKind::Topic,
            true,
            false,
            false,
            FieldTable::default(),
        )
    }

    #[test]
    fn expansion_and_empty_pattern() {
        assert_eq!(expand("", "bob", "/"), "^$");
        assert_eq!(
            expand("^{username}\\.{vhost}\\.", "bob", "v1"),
            "^bob\\.v1\\."
        );
        let p = TopicPermission::new("bob", "/", "amq.topic", "^{username}\\.", "").unwrap();
        assert!(p.allows(Perm::Write, "bob.x"));
        assert!(!p.allows(Perm::Write, "alice.x"));
        assert!(p.allows(Perm::Read, ""));
        assert!(!p.allows(Perm::Read, "a"));
        assert!(TopicPermission::new("bob", "/", "x", "(", ".*").is_err());
    }

    #[test]
    fn only_topic_exchanges_and_only_listed_ones() {
        let mut m = TopicPerms::new();
        m.insert(
            "t".into(),
            Arc::new(TopicPermission::new("bob", "/", "t", "^a", "^b").unwrap()),
        );
        let t = topic("t");
        assert!(check_in(Some(&m), &t, Perm::Write, "a.1", "/", "bob").is_ok());
        let e = check_in(Some(&m), &t, Perm::Write, "b.1", "/", "bob").unwrap_err();
        assert_eq!(e.code, 403);
        assert_eq!(
            e.text,
            "ACCESS_REFUSED - write access to topic 'b.1' in exchange 't' in vhost '/' refused for user 'bob'"
        );
        assert!(check_in(Some(&m), &topic("other"), Perm::Write, "b", "/", "bob").is_ok());
        assert!(check_in(None, &t, Perm::Write, "b", "/", "bob").is_ok());
        let direct = Exchange::new(
            "t",
            ExchangeKind::Direct,
            true,
            false,
            false,
            FieldTable::default(),
        );
        assert!(check_in(Some(&m), &direct, Perm::Write, "b", "/", "bob").is_ok());
    }
}
