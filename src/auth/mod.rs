//! Users and authentication.
//!
//! Passwords are kept as salted SHA-256 hashes in RabbitMQ's format
//! (base64 of 4-byte salt + sha256(salt + password)), so a definitions file
//! exported from RabbitMQ carries hashes Warren can check.

use crate::config::AuthConfig;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};

/// A user account.
#[derive(Debug, Clone)]
pub struct User {
    /// Name.
    pub name: String,
    /// Salt (4 bytes) followed by sha256(salt ++ password).
    pub password_hash: Vec<u8>,
    /// Tags (administrator, monitoring, ...).
    pub tags: Vec<String>,
    /// Vhosts this user may open.
    pub vhosts: HashSet<String>,
}

/// All users.
#[derive(Debug, Default)]
pub struct Users {
    users: DashMap<String, User>,
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

    /// Adds or replaces a user.
    pub fn add(&self, name: &str, password: &str, tags: Vec<String>) {
        let vhosts = self
            .users
            .get(name)
            .map(|u| u.vhosts.clone())
            .unwrap_or_default();
        self.users.insert(
            name.to_string(),
            User {
                name: name.to_string(),
                password_hash: hash_password(password),
                tags,
                vhosts,
            },
        );
    }

    /// Lets a user open a vhost.
    pub fn grant(&self, user: &str, vhost: &str) {
        if let Some(mut u) = self.users.get_mut(user) {
            u.vhosts.insert(vhost.to_string());
        }
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
        if !check_password(&u.password_hash, password) {
            return Err(LoginError::BadCredentials);
        }
        if !from_loopback && self.loopback_only.contains(name) {
            return Err(LoginError::LoopbackOnly);
        }
        Ok(u)
    }

    /// May this user open this vhost?
    pub fn can_access(&self, user: &str, vhost: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.vhosts.contains(vhost))
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
