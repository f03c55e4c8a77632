//! Users and permissions in the definitions store (tables `Users` and
//! `Permissions`; topic permissions in `Meta` under the
//! `topic_permissions` prefix), in RabbitMQ's definitions shapes, and
//! their recovery.
//!
//! Keys: users by name; permissions `key(vhost, user)`; topic permissions
//! `key("topic_permissions", vhost, user, exchange)`.

use super::Users;
use super::permissions::Permission;
use super::topic::TopicPermission;
use crate::store::StoreError;
use crate::store::defs::{Definitions, Table};
use base64::Engine;
use serde::{Deserialize, Serialize};

/// RabbitMQ's name for its salted SHA-256 scheme (the one Warren uses).
pub const SHA256: &str = "rabbit_password_hashing_sha256";

/// A user as stored and as in RabbitMQ's definitions files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserDef {
    /// Name.
    pub name: String,
    /// base64(salt ++ sha256(salt ++ password)); "" = no password login.
    pub password_hash: String,
    /// Hashing scheme.
    #[serde(default = "sha256")]
    pub hashing_algorithm: String,
    /// Tags.
    #[serde(default, deserialize_with = "tags_de")]
    pub tags: Vec<String>,
    /// Per-user limits (kept as given).
    #[serde(default)]
    pub limits: serde_json::Map<String, serde_json::Value>,
}

fn sha256() -> String {
    SHA256.to_string()
}

/// RabbitMQ before 3.13 wrote tags as one comma-separated string.
pub fn tags_de<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum T {
        S(String),
        V(Vec<String>),
    }
    Ok(match T::deserialize(d)? {
        T::S(s) => split_tags(&s),
        T::V(v) => v,
    })
}

/// "a,b" or "a b" → ["a", "b"].
pub fn split_tags(s: &str) -> Vec<String> {
    s.split([',', ' '])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

/// A permission as stored and as in RabbitMQ's definitions files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PermissionDef {
    /// User.
    pub user: String,
    /// Vhost.
    pub vhost: String,
    /// Configure pattern.
    pub configure: String,
    /// Write pattern.
    pub write: String,
    /// Read pattern.
    pub read: String,
}

/// A topic permission as stored and as in RabbitMQ's definitions files
/// (`topic_permissions`) and management API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicPermissionDef {
    /// User.
    pub user: String,
    /// Vhost.
    pub vhost: String,
    /// Topic exchange.
    pub exchange: String,
    /// Write pattern (routing keys of publishes).
    pub write: String,
    /// Read pattern (binding keys).
    pub read: String,
}

impl TopicPermissionDef {
    /// The stored form of a topic permission.
    pub fn of(user: &str, vhost: &str, p: &TopicPermission) -> TopicPermissionDef {
        TopicPermissionDef {
            user: user.into(),
            vhost: vhost.into(),
            exchange: p.exchange.clone(),
            write: p.write.clone(),
            read: p.read.clone(),
        }
    }
}

const TOPIC_PREFIX: &str = "topic_permissions";

fn topic_key(vhost: &str, user: &str, exchange: &str) -> String {
    Definitions::key(&[TOPIC_PREFIX, vhost, user, exchange])
}

fn stored_topic_permissions(
    defs: &Definitions,
) -> Result<Vec<(String, TopicPermissionDef)>, StoreError> {
    defs.list_prefix(Table::Meta, &Definitions::key(&[TOPIC_PREFIX, ""]))
}

/// Records a topic permission.
pub async fn put_topic_permission(
    defs: &Definitions,
    p: &TopicPermissionDef,
) -> Result<(), StoreError> {
    defs.put(Table::Meta, &topic_key(&p.vhost, &p.user, &p.exchange), p)
        .await
}

/// Forgets topic permissions: those of `user` in `vhost` (one exchange, or
/// all), or with `user`/`vhost` None every user's / every vhost's.
pub async fn delete_topic_permissions(
    defs: &Definitions,
    user: Option<&str>,
    vhost: Option<&str>,
    exchange: Option<&str>,
) -> Result<(), StoreError> {
    for (k, p) in stored_topic_permissions(defs)? {
        if user.is_none_or(|u| u == p.user)
            && vhost.is_none_or(|v| v == p.vhost)
            && exchange.is_none_or(|x| x == p.exchange)
        {
            defs.delete(Table::Meta, &k).await?;
        }
    }
    Ok(())
}

impl UserDef {
    /// The stored form of a user.
    pub fn of(u: &super::User) -> UserDef {
        UserDef {
            name: u.name.clone(),
            password_hash: if u.password_hash.is_empty() {
                String::new()
            } else {
                base64::engine::general_purpose::STANDARD.encode(&u.password_hash)
            },
            hashing_algorithm: SHA256.into(),
            tags: u.tags.clone(),
            limits: Default::default(),
        }
    }

    /// The hash bytes; None if not valid base64 or not Warren's scheme.
    pub fn hash_bytes(&self) -> Option<Vec<u8>> {
        if self.password_hash.is_empty() {
            return Some(Vec::new());
        }
        if self.hashing_algorithm != SHA256 {
            return None;
        }
        base64::engine::general_purpose::STANDARD
            .decode(&self.password_hash)
            .ok()
    }
}

/// Records a user (replacing it).
pub async fn put_user(defs: &Definitions, u: &UserDef) -> Result<(), StoreError> {
    if let Ok(v) = serde_json::to_value(u) {
        defs.replicate(crate::store::defs::DefChange::Import(
            serde_json::json!({ "users": [v] }).to_string(),
        ));
    }
    defs.put(Table::Users, &u.name, u).await
}

/// Forgets a user and its permissions.
pub async fn delete_user(defs: &Definitions, name: &str) -> Result<(), StoreError> {
    defs.replicate(crate::store::defs::DefChange::DeleteUser(name.to_string()));
    defs.delete(Table::Users, name).await?;
    for (k, p) in defs.list::<PermissionDef>(Table::Permissions)? {
        if p.user == name {
            defs.delete(Table::Permissions, &k).await?;
        }
    }
    delete_topic_permissions(defs, Some(name), None, None).await
}

/// Records a permission.
pub async fn put_permission(defs: &Definitions, p: &PermissionDef) -> Result<(), StoreError> {
    if let Ok(v) = serde_json::to_value(p) {
        defs.replicate(crate::store::defs::DefChange::Import(
            serde_json::json!({ "permissions": [v] }).to_string(),
        ));
    }
    defs.put(
        Table::Permissions,
        &Definitions::key(&[&p.vhost, &p.user]),
        p,
    )
    .await
}

/// Forgets a permission.
pub async fn delete_permission(
    defs: &Definitions,
    user: &str,
    vhost: &str,
) -> Result<(), StoreError> {
    defs.replicate(crate::store::defs::DefChange::ClearPermissions(
        user.to_string(),
        vhost.to_string(),
    ));
    defs.delete(Table::Permissions, &Definitions::key(&[vhost, user]))
        .await
        .map(|_| ())
}

/// Forgets every permission on a vhost.
pub async fn delete_vhost_permissions(defs: &Definitions, vhost: &str) -> Result<(), StoreError> {
    for (k, p) in defs.list::<PermissionDef>(Table::Permissions)? {
        if p.vhost == vhost {
            defs.delete(Table::Permissions, &k).await?;
        }
    }
    delete_topic_permissions(defs, None, Some(vhost), None).await
}

/// At start: if the store has users, they (and their permissions) replace
/// the defaults from config; on first start the defaults are stored, so a
/// user deleted later stays deleted (as RabbitMQ's default user).
pub async fn recover(users: &Users, defs: &Definitions) -> Result<(usize, usize), StoreError> {
    let stored: Vec<(String, UserDef)> = defs.list(Table::Users)?;
    if stored.is_empty() {
        for u in users.list() {
            put_user(defs, &UserDef::of(&u)).await?;
        }
        for (user, vhost, p) in users.permissions() {
            put_permission(defs, &PermissionDef::of(&user, &vhost, &p)).await?;
        }
        return Ok((users.list().len(), users.permissions().len()));
    }
    users.clear();
    for (_, u) in &stored {
        match u.hash_bytes() {
            Some(h) => users.add_hashed(&u.name, h, u.tags.clone()),
            None => {
                tracing::warn!(user = %u.name, "stored user has an unsupported password hash ({}); password logins refused", u.hashing_algorithm)
            }
        }
        if u.hash_bytes().is_none() {
            users.add_hashed(&u.name, Vec::new(), u.tags.clone());
        }
    }
    let perms: Vec<(String, PermissionDef)> = defs.list(Table::Permissions)?;
    for (_, p) in &perms {
        match Permission::new(&p.configure, &p.write, &p.read) {
            Ok(perm) => users.set_permission(&p.user, &p.vhost, perm),
            Err(e) => {
                tracing::warn!(user = %p.user, vhost = %p.vhost, "skipping stored permission with an invalid pattern: {e}")
            }
        }
    }
    for (_, p) in stored_topic_permissions(defs)? {
        match TopicPermission::new(&p.user, &p.vhost, &p.exchange, &p.write, &p.read) {
            Ok(tp) => users.set_topic_permission(&p.user, &p.vhost, tp),
            Err(e) => {
                tracing::warn!(user = %p.user, vhost = %p.vhost, exchange = %p.exchange, "skipping stored topic permission with an invalid pattern: {e}")
            }
        }
    }
    Ok((stored.len(), perms.len()))
}

impl PermissionDef {
    /// The stored form of a permission.
    pub fn of(user: &str, vhost: &str, p: &Permission) -> PermissionDef {
        PermissionDef {
            user: user.into(),
            vhost: vhost.into(),
            configure: p.configure.clone(),
            write: p.write.clone(),
            read: p.read.clone(),
        }
    }
}
