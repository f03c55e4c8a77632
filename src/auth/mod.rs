//! Users and authentication.
//!
//! Passwords are kept as salted SHA-256 hashes in RabbitMQ's format
//! (base64 of 4-byte salt + sha256(salt + password)), so a definitions file
//! exported from RabbitMQ carries hashes Warren can check.
//!
//! Per-vhost permissions (configure/write/read regular expressions) live in
//! [`permissions`], topic permissions (write/read patterns over routing keys
//! of topic exchanges) in [`topic`]; [`store`] persists users and both kinds
//! of permissions in the definitions store and recovers them at start.

pub mod permissions;
pub mod store;
pub mod topic;

use crate::config::AuthConfig;
use dashmap::DashMap;
use permissions::Permission;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use topic::{TopicPermission, TopicPerms};

/// A user account.
#[derive(Debug, Clone)]
pub struct User {
    /// Name.
    pub name: String,
    /// Salt (4 bytes) followed by sha256(salt ++ password).
    pub password_hash: Vec<u8>,
    /// Tags (administrator, monitoring, ...).
    pub tags: Vec<String>,
}

impl User {
    /// Has this tag.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// All users.
#[derive(Debug, Default)]
pub struct Users {
    users: DashMap<String, User>,
    /// (user, vhost) → permission. A user may open a vhost iff it has an
    /// entry here, as in RabbitMQ.
    perms: DashMap<(String, String), Arc<Permission>>,
    /// (user, vhost) → topic permissions by exchange, replaced as a whole
    /// on every change (connections hold the `Arc` they loaded).
    topic: DashMap<(String, String), Arc<TopicPerms>>,
    /// Bumped after every topic permission change, so connections know to
    /// reload theirs.
    topic_gen: AtomicU64,
    loopback_only: HashSet<String>,
}

/// Why a login failed (logged; the client only sees ACCESS_REFUSED).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    /// No such user or wrong password.
    BadCredentials,
    /// A loopback-only user (guest) connecting from elsewhere.
    LoopbackOnly,
}

fn random_salt() -> [u8; 4] {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    (h.finish() as u32).to_be_bytes()
}

/// Hashes a password with a fresh salt.
pub fn hash_password(password: &str) -> Vec<u8> {
    hash_with_salt(&random_salt(), password)
}

fn hash_with_salt(salt: &[u8; 4], password: &str) -> Vec<u8> {
    let mut d = Sha256::new();
    d.update(salt);
    d.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&d.finalize());
    out
}

/// Checks a password against a stored hash.
pub fn check_password(hash: &[u8], password: &str) -> bool {
    if hash.len() != 36 {
        return false;
    }
    let mut salt = [0u8; 4];
    salt.copy_from_slice(&hash[..4]);
    let candidate = hash_with_salt(&salt, password);
    // Constant-time compare.
    candidate
        .iter()
        .zip(hash)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

impl Users {
    /// Users from config: the default user (unless disabled).
    pub fn new(cfg: &AuthConfig) -> Users {
        let u = Users {
            users: DashMap::new(),
            perms: DashMap::new(),
            topic: DashMap::new(),
            topic_gen: AtomicU64::new(0),
            loopback_only: cfg.loopback_users.iter().cloned().collect(),
        };
        if !cfg.default_user.is_empty() {
            u.add(
                &cfg.default_user,
                &cfg.default_pass,
                vec!["administrator".into()],
            );
            u.grant(&cfg.default_user, &cfg.default_vhost);
        }
        u
    }

    /// Adds or replaces a user (keeping its permissions).
    pub fn add(&self, name: &str, password: &str, tags: Vec<String>) {
        self.add_hashed(name, hash_password(password), tags);
    }

    /// Adds or replaces a user with an already hashed password (definitions
    /// import, recovery). An empty hash means password logins are refused.
    pub fn add_hashed(&self, name: &str, password_hash: Vec<u8>, tags: Vec<String>) {
        self.users.insert(
            name.to_string(),
            User {
                name: name.to_string(),
                password_hash,
                tags,
            },
        );
    }

    /// Gives a user full permissions (".*" ".*" ".*") on a vhost.
    pub fn grant(&self, user: &str, vhost: &str) {
        if let Ok(p) = Permission::new(".*", ".*", ".*") {
            self.set_permission(user, vhost, p);
        }
    }

    /// One user.
    pub fn get(&self, name: &str) -> Option<User> {
        self.users.get(name).map(|u| u.clone())
    }

    /// Every user, sorted by name.
    pub fn list(&self) -> Vec<User> {
        let mut v: Vec<User> = self.users.iter().map(|u| u.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Removes a user and its permissions; false if there was none.
    pub fn remove(&self, name: &str) -> bool {
        self.perms.retain(|(u, _), _| u != name);
        self.topic.retain(|(u, _), _| u != name);
        self.topic_changed();
        self.users.remove(name).is_some()
    }

    /// Removes every user and permission (before recovery replaces them).
    pub fn clear(&self) {
        self.users.clear();
        self.perms.clear();
        self.topic.clear();
        self.topic_changed();
    }

    /// Sets a user's permissions on a vhost.
    pub fn set_permission(&self, user: &str, vhost: &str, p: Permission) {
        self.perms
            .insert((user.to_string(), vhost.to_string()), Arc::new(p));
    }

    /// Clears a user's permissions on a vhost; false if it had none.
    pub fn clear_permission(&self, user: &str, vhost: &str) -> bool {
        self.perms
            .remove(&(user.to_string(), vhost.to_string()))
            .is_some()
    }

    /// Forgets every permission on a vhost (the vhost was deleted).
    pub fn clear_vhost(&self, vhost: &str) {
        self.perms.retain(|(_, v), _| v != vhost);
        self.topic.retain(|(_, v), _| v != vhost);
        self.topic_changed();
    }

    fn topic_changed(&self) {
        self.topic_gen.fetch_add(1, Ordering::Release);
    }

    /// Changes whenever any topic permission changes.
    pub fn topic_generation(&self) -> u64 {
        self.topic_gen.load(Ordering::Acquire)
    }

    /// Sets a user's topic permission for one exchange in a vhost
    /// (replacing the one it had for that exchange).
    pub fn set_topic_permission(&self, user: &str, vhost: &str, p: TopicPermission) {
        let key = (user.to_string(), vhost.to_string());
        let mut map: TopicPerms = self
            .topic
            .get(&key)
            .map(|m| m.value().as_ref().clone())
            .unwrap_or_default();
        map.insert(p.exchange.clone(), Arc::new(p));
        self.topic.insert(key, Arc::new(map));
        self.topic_changed();
    }

    /// Clears a user's topic permissions in a vhost: for one exchange, or
    /// all of them. False if there was none.
    pub fn clear_topic_permissions(&self, user: &str, vhost: &str, exchange: Option<&str>) -> bool {
        let key = (user.to_string(), vhost.to_string());
        let removed = match exchange {
            None => self.topic.remove(&key).is_some(),
            Some(x) => {
                let Some(cur) = self.topic.get(&key).map(|m| m.value().clone()) else {
                    return false;
                };
                if !cur.contains_key(x) {
                    return false;
                }
                let mut map = cur.as_ref().clone();
                map.remove(x);
                if map.is_empty() {
                    self.topic.remove(&key);
                } else {
                    self.topic.insert(key, Arc::new(map));
                }
                true
            }
        };
        if removed {
            self.topic_changed();
        }
        removed
    }

    /// A user's topic permissions in a vhost, if any.
    pub fn topic_permissions_of(&self, user: &str, vhost: &str) -> Option<Arc<TopicPerms>> {
        self.topic
            .get(&(user.to_string(), vhost.to_string()))
            .map(|m| m.value().clone())
    }

    /// Every (user, vhost, topic permission), sorted by vhost, user, exchange.
    pub fn topic_permissions(&self) -> Vec<(String, String, Arc<TopicPermission>)> {
        let mut v: Vec<_> = self
            .topic
            .iter()
            .flat_map(|e| {
                let (u, vh) = e.key().clone();
                e.value()
                    .values()
                    .map(|p| (u.clone(), vh.clone(), p.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        v.sort_by(|a, b| (&a.1, &a.0, &a.2.exchange).cmp(&(&b.1, &b.0, &b.2.exchange)));
        v
    }

    /// A user's permissions on a vhost.
    pub fn permission(&self, user: &str, vhost: &str) -> Option<Arc<Permission>> {
        self.perms
            .get(&(user.to_string(), vhost.to_string()))
            .map(|p| p.value().clone())
    }

    /// Every (user, vhost, permission), sorted.
    pub fn permissions(&self) -> Vec<(String, String, Arc<Permission>)> {
        let mut v: Vec<_> = self
            .perms
            .iter()
            .map(|e| (e.key().0.clone(), e.key().1.clone(), e.value().clone()))
            .collect();
        v.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
        v
    }

    /// Checks credentials for a connection from a loopback or remote peer.
    pub fn login(
        &self,
        name: &str,
        password: &str,
        from_loopback: bool,
    ) -> Result<User, LoginError> {
        let u = self
            .users
            .get(name)
            .map(|u| u.clone())
            .ok_or(LoginError::BadCredentials)?;
        if password.is_empty() || !check_password(&u.password_hash, password) {
            return Err(LoginError::BadCredentials);
        }
        if !from_loopback && self.loopback_only.contains(name) {
            return Err(LoginError::LoopbackOnly);
        }
        Ok(u)
    }

    /// May this user open this vhost?
    pub fn can_access(&self, user: &str, vhost: &str) -> bool {
        self.users.contains_key(user)
            && self
                .perms
                .contains_key(&(user.to_string(), vhost.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_roundtrip() {
        let h = hash_password("secret");
        assert!(check_password(&h, "secret"));
        assert!(!check_password(&h, "Secret"));
    }

    #[test]
    fn guest_only_from_loopback() {
        let u = Users::new(&AuthConfig::default());
        assert!(u.login("guest", "guest", true).is_ok());
        assert_eq!(
            u.login("guest", "guest", false).unwrap_err(),
            LoginError::LoopbackOnly
        );
        assert_eq!(
            u.login("guest", "nope", true).unwrap_err(),
            LoginError::BadCredentials
        );
    }
}
