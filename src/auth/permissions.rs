//! Per-vhost permissions, as RabbitMQ's: three regular expressions per
//! (user, vhost), matched against queue and exchange names for the
//! configure (declare, delete), write (publish, bind destination) and read
//! (consume, get, purge, bind source) operations.
//!
//! The channel handlers call [`Connection::check_perm`] at their start. The
//! publish path checks only when its per-channel exchange cache misses, so a
//! steady publisher pays one regex match per channel and exchange — like
//! RabbitMQ, whose channels cache authorised resources, a permission change
//! reaches open channels when they reconnect.

use crate::protocol::connection::Connection;
use crate::protocol::error::{AmqpError, code};
use regex::Regex;

/// A kind of access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// Create, delete or alter a resource.
    Configure,
    /// Inject messages (publish, bind destination).
    Write,
    /// Retrieve messages (consume, get, purge, bind source).
    Read,
}

impl Perm {
    /// RabbitMQ's word for it, used in reply texts.
    pub fn as_str(self) -> &'static str {
        match self {
            Perm::Configure => "configure",
            Perm::Write => "write",
            Perm::Read => "read",
        }
    }
}

/// What a permission is checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    /// A queue.
    Queue,
    /// An exchange.
    Exchange,
}

impl ResourceKind {
    /// RabbitMQ's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Queue => "queue",
            ResourceKind::Exchange => "exchange",
        }
    }
}

/// One user's permissions on one vhost: the three patterns as given and
/// compiled.
#[derive(Debug, Clone)]
pub struct Permission {
    /// Configure pattern, as given.
    pub configure: String,
    /// Write pattern, as given.
    pub write: String,
    /// Read pattern, as given.
    pub read: String,
    compiled: [Option<Regex>; 3],
}

fn compile(p: &str) -> Result<Option<Regex>, regex::Error> {
    // RabbitMQ: an empty pattern grants nothing (it would otherwise match
    // every name); any other pattern is searched for, not anchored.
    if p.is_empty() {
        Ok(None)
    } else {
        Regex::new(p).map(Some)
    }
}

impl Permission {
    /// Compiles the three patterns; an invalid one is an error the caller
    /// reports (HTTP 400).
    pub fn new(configure: &str, write: &str, read: &str) -> Result<Permission, regex::Error> {
        Ok(Permission {
            compiled: [compile(configure)?, compile(write)?, compile(read)?],
            configure: configure.to_string(),
            write: write.to_string(),
            read: read.to_string(),
        })
    }

    /// Whether `perm` on a resource called `name` is allowed.
    pub fn allows(&self, perm: Perm, name: &str) -> bool {
        let re = match perm {
            Perm::Configure => &self.compiled[0],
            Perm::Write => &self.compiled[1],
            Perm::Read => &self.compiled[2],
        };
        re.as_ref().is_some_and(|r| r.is_match(name))
    }
}

/// The name permissions are checked against: RabbitMQ checks the default
/// exchange as "amq.default".
pub fn resource_name(kind: ResourceKind, name: &str) -> &str {
    if kind == ResourceKind::Exchange && name.is_empty() {
        "amq.default"
    } else {
        name
    }
}

/// RabbitMQ's refusal (rabbit_access_control):
/// `ACCESS_REFUSED - write access to exchange 'x' in vhost '/' refused for user 'bob'`.
pub fn refused(perm: Perm, kind: ResourceKind, name: &str, vhost: &str, user: &str) -> AmqpError {
    AmqpError::new(
        code::ACCESS_REFUSED,
        format!(
            "{} access to {} '{}' in vhost '{vhost}' refused for user '{user}'",
            perm.as_str(),
            kind.as_str(),
            resource_name(kind, name)
        ),
    )
}

/// Checks `perm` on a resource for a user in a vhost.
pub fn check(
    users: &super::Users,
    user: &str,
    vhost: &str,
    perm: Perm,
    kind: ResourceKind,
    name: &str,
) -> Result<(), AmqpError> {
    let ok = users
        .permission(user, vhost)
        .is_some_and(|p| p.allows(perm, resource_name(kind, name)));
    if ok {
        Ok(())
    } else {
        Err(refused(perm, kind, name, vhost, user))
    }
}

impl Connection {
    /// Checks that this connection's user has `kind` access to the named
    /// resource in this connection's vhost.
    pub(crate) fn check_perm(
        &self,
        kind: Perm,
        resource: ResourceKind,
        name: &str,
    ) -> Result<(), AmqpError> {
        check(
            &self.broker.users,
            &self.user,
            &self.vhost.name,
            kind,
            resource,
            name,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_search_unanchored_and_empty_denies() {
        let p = Permission::new("^q-", "", ".*").unwrap();
        assert!(p.allows(Perm::Configure, "q-1"));
        assert!(!p.allows(Perm::Configure, "xq-1"));
        assert!(!p.allows(Perm::Write, "anything"));
        assert!(!p.allows(Perm::Write, ""));
        assert!(p.allows(Perm::Read, "x"));
        let p = Permission::new("foo", "foo", "foo").unwrap();
        assert!(p.allows(Perm::Read, "a-foo-b"));
        assert!(Permission::new("(", ".*", ".*").is_err());
    }

    #[test]
    fn refusal_text_is_rabbitmqs() {
        let e = refused(Perm::Write, ResourceKind::Exchange, "", "/", "bob");
        assert_eq!(e.code, 403);
        assert_eq!(
            e.text,
            "ACCESS_REFUSED - write access to exchange 'amq.default' in vhost '/' refused for user 'bob'"
        );
    }
}
