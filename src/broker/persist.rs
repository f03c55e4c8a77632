//! What the broker remembers across restarts: durable vhosts, exchanges,
//! queues and bindings in the definitions store, and the recovery that
//! rebuilds them at start.
//!
//! Keys (see `store::defs`): exchanges and queues `key(vhost, name)`;
//! bindings `key(vhost, source, "q"|"e", destination, routing_key, args-json)`.
//! A binding is durable when both its ends are, as in RabbitMQ.
//!
//! # Queue and exchange state snapshots
//!
//! Two kinds of message-lifecycle state are saved with lazy writes (no
//! flush; see "Lazy writes" in `store::defs`), so they cost no fsync on the
//! hot path:
//!
//! | table | key | value | written |
//! |---|---|---|---|
//! | `dedup` | `key("q", num(queue id), "e", num(seq))` | `[id, expires_ms]` | by the queue actor, the entries added/removed since its last save, at most once a second while its cache changed, and on clean shutdown |
//! | `dedup` | `key("q", num(queue id), "h")` | `{"max_gid": n}`: every stored message up to gid n that reached the queue is covered by the saved entries | with the entries, atomically |
//! | `dedup` | `key("x", vhost, exchange, "e", num(seq))` | `[id, expires_ms]` | by one broker-wide task, once a second for each durable exchange whose cache changed, and on clean shutdown |
//! | `retry` | `key(num(queue id), num(gid))` | `{"due": ms, "count": n}` | by the queue actor when a stored message enters a retry delay (batched per actor turn); removed when the message leaves the queue |
//!
//! After a crash (SIGKILL, power loss) the saved state lags by at most the
//! save interval plus sled's background flush (about 1.5 s for dedup caches,
//! 0.5 s for retry waits): a deduplication cache may miss the ids accepted
//! in that window (a re-published duplicate of one of them gets through,
//! unless the original is still in the queue: ids of stored messages newer
//! than `max_gid` are read back at recovery), and a retry wait started in
//! that window is lost (the message is ready at once after the restart,
//! redelivered, with the count it had before that wait). Messages are never
//! lost or duplicated by this: the state only delays or counts them, and
//! the message store decides what exists. A clean shutdown saves
//! everything. Deleting a queue or exchange deletes its entries;
//! entries of queues and exchanges that no longer exist are removed at start.

use super::exchange::{Binding, Destination, Exchange, ExchangeKind};
use super::{Broker, VHost};
use crate::queue::core::{DedupCache, DedupDelta, DedupEntry, RetryState};
use crate::store::defs::{Batch, DefChange, Definitions, Table};
use crate::store::{MessageStore, StoreError};
use amq_protocol::types::FieldTable;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use tracing::warn;

/// The storage a broker runs on.
#[derive(Clone)]
pub struct Storage {
    /// Message bodies and per-queue message state.
    pub msgs: MessageStore,
    /// Definitions.
    pub defs: Definitions,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Storage")
    }
}

/// A durable vhost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VHostDef {
    /// Name.
    pub name: String,
}

/// A durable exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExchangeDef {
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Type name.
    pub kind: String,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Internal.
    pub internal: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

/// A durable queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueDef {
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Store id of the queue (message records refer to it).
    pub id: u64,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

/// A durable binding.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindingDef {
    /// Vhost.
    pub vhost: String,
    /// Source exchange.
    pub source: String,
    /// Destination is a queue (else an exchange).
    pub to_queue: bool,
    /// Destination name.
    pub destination: String,
    /// Binding key.
    pub routing_key: String,
    /// Arguments.
    pub arguments: FieldTable,
}

/// A binding in RabbitMQ's definitions JSON.
pub fn binding_json(b: &BindingDef) -> serde_json::Value {
    serde_json::json!({
        "vhost": b.vhost, "source": b.source, "destination": b.destination,
        "destination_type": if b.to_queue { "queue" } else { "exchange" },
        "routing_key": b.routing_key,
        "arguments": crate::mgmt::json::table_to_json(&b.arguments),
    })
}

fn binding_key(b: &BindingDef) -> String {
    let args = serde_json::to_string(&b.arguments).unwrap_or_default();
    Definitions::key(&[
        &b.vhost,
        &b.source,
        if b.to_queue { "q" } else { "e" },
        &b.destination,
        &b.routing_key,
        &args,
    ])
}

impl BindingDef {
    /// The definition of a binding from `source`.
    pub fn of(vhost: &str, source: &str, b: &Binding) -> BindingDef {
        BindingDef {
            vhost: vhost.to_string(),
            source: source.to_string(),
            to_queue: matches!(b.dest, Destination::Queue(_)),
            destination: b.dest.name().to_string(),
            routing_key: b.routing_key.clone(),
            arguments: b.arguments.clone(),
        }
    }
}

/// True when a binding from `source` to `dest` survives a restart.
pub fn binding_is_durable(source: &Exchange, dest: &Destination) -> bool {
    let dest_durable = match dest {
        Destination::Queue(q) => q.durable && q.exclusive_owner.is_none(),
        Destination::Exchange(e) => e.durable,
    };
    source.durable && dest_durable && !source.name.is_empty()
}

impl Storage {
    /// Records a durable exchange (a new one: any saved deduplication cache
    /// left under its name by an earlier exchange is dropped).
    pub async fn put_exchange(&self, vhost: &str, ex: &Exchange) -> Result<(), StoreError> {
        self.defs
            .remove_prefix(Table::Dedup, &exchange_dedup_prefix(vhost, &ex.name))?;
        let def = ExchangeDef {
            vhost: vhost.to_string(),
            name: ex.name.clone(),
            kind: ex.type_name().to_string(),
            auto_delete: ex.auto_delete,
            internal: ex.internal,
            arguments: ex.arguments.clone(),
        };
        self.defs.replicate(DefChange::Import(
            serde_json::json!({"exchanges": [{
                "vhost": vhost, "name": ex.name, "type": ex.type_name(), "durable": true,
                "auto_delete": ex.auto_delete, "internal": ex.internal,
                "arguments": crate::mgmt::json::table_to_json(&ex.arguments),
            }]})
            .to_string(),
        ));
        self.defs
            .put(
                Table::Exchanges,
                &Definitions::key(&[vhost, &ex.name]),
                &def,
            )
            .await
    }

    /// Forgets an exchange, its deduplication cache and every binding from
    /// or to it.
    pub async fn delete_exchange(&self, vhost: &str, name: &str) -> Result<(), StoreError> {
        self.defs.replicate(DefChange::DeleteExchange(
            vhost.to_string(),
            name.to_string(),
        ));
        self.defs
            .remove_prefix(Table::Dedup, &exchange_dedup_prefix(vhost, name))?;
        self.defs
            .delete(Table::Exchanges, &Definitions::key(&[vhost, name]))
            .await?;
        self.delete_bindings_where(vhost, |b| {
            b.source == name || (!b.to_queue && b.destination == name)
        })
        .await
    }

    /// Records a durable queue.
    pub async fn put_queue(&self, def: &QueueDef) -> Result<(), StoreError> {
        self.defs
            .put(
                Table::Queues,
                &Definitions::key(&[&def.vhost, &def.name]),
                def,
            )
            .await
    }

    /// Forgets a queue's saved deduplication cache and retry waits, and
    /// the queue itself (if the stored one is this id) with its bindings.
    pub async fn delete_queue(&self, vhost: &str, name: &str, id: u64) -> Result<(), StoreError> {
        self.defs
            .remove_prefix(Table::Dedup, &queue_dedup_prefix(id))?;
        self.defs.remove_prefix(Table::Retry, &retry_prefix(id))?;
        let key = Definitions::key(&[vhost, name]);
        match self.defs.get::<QueueDef>(Table::Queues, &key)? {
            Some(d) if d.id == id => {
                self.defs.delete(Table::Queues, &key).await?;
            }
            _ => return self.defs.flush().await,
        }
        self.delete_bindings_where(vhost, |b| b.to_queue && b.destination == name)
            .await
    }

    /// Records a durable binding.
    pub async fn put_binding(&self, def: &BindingDef) -> Result<(), StoreError> {
        self.defs.replicate(DefChange::Import(
            serde_json::json!({"bindings": [binding_json(def)]}).to_string(),
        ));
        self.defs.put(Table::Bindings, &binding_key(def), def).await
    }

    /// Forgets a binding.
    pub async fn delete_binding(&self, def: &BindingDef) -> Result<(), StoreError> {
        self.defs
            .replicate(DefChange::Unbind(binding_json(def).to_string()));
        self.defs
            .delete(Table::Bindings, &binding_key(def))
            .await
            .map(|_| ())
    }

    async fn delete_bindings_where(
        &self,
        vhost: &str,
        pred: impl Fn(&BindingDef) -> bool,
    ) -> Result<(), StoreError> {
        let all: Vec<(String, BindingDef)> = self.defs.list(Table::Bindings)?;
        for (k, b) in all {
            if b.vhost == vhost && pred(&b) {
                self.defs.delete(Table::Bindings, &k).await?;
            }
        }
        Ok(())
    }

    /// Records a vhost.
    pub async fn put_vhost(&self, name: &str) -> Result<(), StoreError> {
        self.defs.replicate(DefChange::Import(
            serde_json::json!({"vhosts": [{"name": name}]}).to_string(),
        ));
        self.defs
            .put(
                Table::VHosts,
                name,
                &VHostDef {
                    name: name.to_string(),
                },
            )
            .await
    }
}

fn queue_dedup_prefix(qid: u64) -> String {
    Definitions::key(&["q", &Definitions::num(qid), ""])
}

fn exchange_dedup_prefix(vhost: &str, name: &str) -> String {
    Definitions::key(&["x", vhost, name, ""])
}

fn retry_prefix(qid: u64) -> String {
    Definitions::key(&[&Definitions::num(qid), ""])
}

/// What `key(.., "h")` of a queue's saved deduplication cache holds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct DedupHeader {
    /// Stored messages up to this gid that reached the queue are covered by
    /// the saved entries.
    max_gid: u64,
}

/// Adds a delta of a deduplication cache under `prefix` to `batch`.
fn dedup_batch(batch: &mut Batch, prefix: &str, delta: &DedupDelta) -> Result<(), StoreError> {
    for seq in &delta.del {
        batch.delete(&format!("{prefix}e\0{}", Definitions::num(*seq)));
    }
    for e in &delta.put {
        batch.put(
            &format!("{prefix}e\0{}", Definitions::num(e.seq)),
            &(&e.id, e.expires),
        )?;
    }
    Ok(())
}

/// Reads the saved entries under `prefix` (and the header, when present).
fn load_dedup(
    defs: &Definitions,
    prefix: &str,
) -> Result<(Vec<DedupEntry>, Option<DedupHeader>), StoreError> {
    let mut entries = Vec::new();
    let mut header = None;
    let rows: Vec<(String, serde_json::Value)> = defs.list_prefix(Table::Dedup, prefix)?;
    for (k, v) in rows {
        let rest = &k[prefix.len()..];
        if rest == "h" {
            header = serde_json::from_value(v).ok();
        } else if let Some(seq) = rest.strip_prefix("e\0") {
            let (Ok(seq), Ok((id, expires))) = (
                seq.parse::<u64>(),
                serde_json::from_value::<(String, u64)>(v),
            ) else {
                continue;
            };
            entries.push(DedupEntry { seq, id, expires });
        }
    }
    Ok((entries, header))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a durable queue finds saved at start (see the module docs).
#[derive(Debug, Default)]
pub struct QueueSnapshot {
    /// Its deduplication cache.
    pub dedup: Vec<DedupEntry>,
    /// Stored messages with a gid above this are not covered by `dedup`
    /// (reached the queue after the last save, or nothing was saved yet).
    pub dedup_max_gid: u64,
    /// Retry state of stored messages, by gid.
    pub retry: HashMap<u64, RetryState>,
}

impl Storage {
    /// Reads what queue `qid` saved of its deduplication cache and retry
    /// waits. Unreadable state is logged and skipped.
    pub fn load_queue_snapshot(&self, qid: u64) -> QueueSnapshot {
        let mut out = QueueSnapshot::default();
        match load_dedup(&self.defs, &queue_dedup_prefix(qid)) {
            Ok((entries, header)) => {
                out.dedup = entries;
                out.dedup_max_gid = header.map_or(0, |h| h.max_gid);
            }
            Err(e) => warn!(
                "could not read the saved deduplication cache ({e}); ids of messages consumed before the restart are forgotten"
            ),
        }
        let prefix = retry_prefix(qid);
        match self.defs.list_prefix::<RetryState>(Table::Retry, &prefix) {
            Ok(rows) => {
                for (k, v) in rows {
                    if let Ok(gid) = k[prefix.len()..].parse::<u64>() {
                        out.retry.insert(gid, v);
                    }
                }
            }
            Err(e) => warn!(
                "could not read the saved retry delays ({e}); messages that were waiting for a retry are ready at once"
            ),
        }
        out
    }

    /// Saves a delta of queue `qid`'s deduplication cache, with the gid up
    /// to which stored messages are covered. Lazy (no flush).
    pub fn save_queue_dedup(
        &self,
        qid: u64,
        delta: &DedupDelta,
        max_gid: u64,
    ) -> Result<(), StoreError> {
        let prefix = queue_dedup_prefix(qid);
        let mut batch = Batch::default();
        dedup_batch(&mut batch, &prefix, delta)?;
        batch.put(&format!("{prefix}h"), &DedupHeader { max_gid })?;
        self.defs.apply(Table::Dedup, batch)
    }

    /// Saves (`Some`) or forgets (`None`) the retry state of stored
    /// messages of queue `qid`. Lazy (no flush).
    pub fn save_retry(
        &self,
        qid: u64,
        changes: impl IntoIterator<Item = (u64, Option<RetryState>)>,
    ) -> Result<(), StoreError> {
        let q = Definitions::num(qid);
        let mut batch = Batch::default();
        for (gid, st) in changes {
            let key = Definitions::key(&[&q, &Definitions::num(gid)]);
            match st {
                Some(st) => batch.put(&key, &st)?,
                None => batch.delete(&key),
            }
        }
        self.defs.apply(Table::Retry, batch)
    }

    /// Saves what changed in the deduplication cache of durable exchange
    /// `ex` since the last save. Lazy (no flush).
    pub fn save_exchange_dedup(&self, vhost: &str, ex: &Exchange) -> Result<(), StoreError> {
        let Some(cache) = &ex.dedup else {
            return Ok(());
        };
        let delta = {
            let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
            if !c.is_dirty() {
                return Ok(());
            }
            c.take_delta()
        };
        let prefix = exchange_dedup_prefix(vhost, &ex.name);
        let mut batch = Batch::default();
        dedup_batch(&mut batch, &prefix, &delta)?;
        self.defs.apply(Table::Dedup, batch)?;
        if ex.is_deleted() {
            // Deleted while we saved: do not leave its entries behind.
            self.defs.remove_prefix(Table::Dedup, &prefix)?;
        }
        Ok(())
    }
}

/// Saves the deduplication caches of every durable exchange that changed.
fn save_exchange_caches(broker: &Broker, st: &Storage) {
    let vhosts: Vec<Arc<VHost>> = broker.vhosts.iter().map(|v| v.value().clone()).collect();
    for v in vhosts {
        let exchanges: Vec<Arc<Exchange>> = v
            .exchanges
            .iter()
            .filter(|e| e.durable && e.dedup.is_some())
            .map(|e| e.value().clone())
            .collect();
        for ex in exchanges {
            if let Err(e) = st.save_exchange_dedup(&v.name, &ex) {
                warn!(
                    exchange = %ex.name,
                    vhost = %v.name,
                    "could not save the exchange's deduplication cache ({e}); after a restart it may let duplicates through"
                );
            }
        }
    }
}

/// Starts the task that saves the deduplication caches of durable
/// exchanges once a second (those that changed). It ends at shutdown;
/// [`save_snapshots`] does the final save.
pub fn spawn_exchange_dedup_saver(broker: &Arc<Broker>) {
    let Some(st) = broker.storage.clone() else {
        return;
    };
    let weak = Arc::downgrade(broker);
    let mut shutdown = broker.shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let Some(b) = weak.upgrade() else { return };
            save_exchange_caches(&b, &st);
        }
    });
}

/// Clean shutdown: every durable queue saves its deduplication cache and
/// retry waits now, and so do durable exchanges (the caller then flushes
/// the definitions store). Bounded: queues that do not answer within 5 s
/// are skipped (logged).
pub async fn save_snapshots(broker: &Broker) {
    let Some(st) = &broker.storage else { return };
    let queues: Vec<Arc<crate::queue::QueueRef>> = broker
        .vhosts
        .iter()
        .flat_map(|v| {
            v.queues
                .iter()
                .filter(|q| q.is_stored())
                .map(|q| q.value().clone())
                .collect::<Vec<_>>()
        })
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut waiting = Vec::new();
    for q in queues {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = tokio::time::timeout_at(
            deadline,
            q.tx.send(crate::queue::QueueCmd::SaveSnapshot { reply: tx }),
        )
        .await;
        if matches!(sent, Ok(Ok(()))) {
            waiting.push((q, rx));
        }
    }
    for (q, rx) in waiting {
        if tokio::time::timeout_at(deadline, rx).await.is_err() {
            warn!(
                queue = %q.name,
                vhost = %q.vhost,
                "queue did not save its deduplication cache and retry delays at shutdown in time; the last second of them may be missing after the restart"
            );
        }
    }
    save_exchange_caches(broker, st);
}

/// Rebuilds vhosts, exchanges and bindings from the definitions store;
/// returns the queue definitions for the caller to start.
pub fn recover_definitions(
    broker: &Arc<Broker>,
    defs: &Definitions,
) -> Result<Vec<QueueDef>, StoreError> {
    for (_, v) in defs.list::<VHostDef>(Table::VHosts)? {
        broker
            .vhosts
            .entry(v.name.clone())
            .or_insert_with(|| VHost::new(&v.name));
    }
    for (_, e) in defs.list::<ExchangeDef>(Table::Exchanges)? {
        let delayed = e.kind == super::exchange::DELAYED_TYPE;
        let kind_name = if delayed {
            e.arguments
                .inner()
                .get("x-delayed-type")
                .and_then(super::headers::value_str)
                .unwrap_or_default()
        } else {
            e.kind.clone()
        };
        let Some(kind) = ExchangeKind::parse(&kind_name) else {
            tracing::warn!(exchange = %e.name, vhost = %e.vhost, "skipping stored exchange of unknown type '{}'", e.kind);
            continue;
        };
        let vhost = broker
            .vhosts
            .entry(e.vhost.clone())
            .or_insert_with(|| VHost::new(&e.vhost))
            .value()
            .clone();
        let mut ex = Exchange::new(&e.name, kind, true, e.auto_delete, e.internal, e.arguments);
        if delayed {
            ex = ex.into_delayed();
        }
        if let Some(cache) = &ex.dedup {
            restore_exchange_dedup(defs, &e.vhost, &e.name, cache);
        }
        vhost.exchanges.insert(e.name.clone(), Arc::new(ex));
    }
    let queues: Vec<QueueDef> = defs
        .list::<QueueDef>(Table::Queues)?
        .into_iter()
        .map(|(_, q)| q)
        .collect();
    forget_orphan_snapshots(broker, defs, &queues);
    Ok(queues)
}

fn restore_exchange_dedup(
    defs: &Definitions,
    vhost: &str,
    name: &str,
    cache: &std::sync::Mutex<DedupCache>,
) {
    match load_dedup(defs, &exchange_dedup_prefix(vhost, name)) {
        Ok((entries, _)) => {
            let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
            c.restore(entries, now_ms());
            tracing::debug!(
                exchange = name,
                vhost,
                ids = c.len(),
                "deduplication cache restored"
            );
        }
        Err(e) => warn!(
            exchange = name,
            vhost,
            "could not read the exchange's saved deduplication cache ({e}); ids seen before the restart are forgotten"
        ),
    }
}

/// Removes saved deduplication caches and retry waits of queues and
/// exchanges that no longer exist (deleted while a write was in flight, or
/// with the whole vhost). Failures only leave garbage behind: logged.
fn forget_orphan_snapshots(broker: &Broker, defs: &Definitions, queues: &[QueueDef]) {
    let qids: std::collections::HashSet<String> =
        queues.iter().map(|q| Definitions::num(q.id)).collect();
    let queue_gone = |k: &str, at: usize| k.split('\0').nth(at).is_none_or(|id| !qids.contains(id));
    let exchange_gone = |k: &str| {
        let mut parts = k.split('\0').skip(1);
        let (Some(v), Some(x)) = (parts.next(), parts.next()) else {
            return true;
        };
        broker
            .vhost(v)
            .and_then(|vh| vh.exchange(x))
            .is_none_or(|ex| !ex.durable || ex.dedup.is_none())
    };
    let results = [
        defs.remove_prefix_where(Table::Dedup, "q\0", |k| queue_gone(k, 1)),
        defs.remove_prefix_where(Table::Dedup, "x\0", exchange_gone),
        defs.remove_prefix_where(Table::Retry, "", |k| queue_gone(k, 0)),
    ];
    for r in results {
        if let Err(e) = r {
            warn!("could not remove saved state of deleted queues or exchanges: {e}");
        }
    }
}

/// Re-creates stored bindings once exchanges and queues exist.
pub fn recover_bindings(broker: &Arc<Broker>, defs: &Definitions) -> Result<usize, StoreError> {
    let mut n = 0;
    for (_, b) in defs.list::<BindingDef>(Table::Bindings)? {
        let Some(vhost) = broker.vhost(&b.vhost) else {
            continue;
        };
        let Some(src) = vhost.exchange(&b.source) else {
            continue;
        };
        let dest = if b.to_queue {
            vhost.queue(&b.destination).map(Destination::Queue)
        } else {
            vhost.exchange(&b.destination).map(Destination::Exchange)
        };
        let Some(dest) = dest else { continue };
        if src
            .bind(Binding {
                dest,
                routing_key: b.routing_key,
                arguments: b.arguments,
            })
            .is_ok()
        {
            n += 1;
        }
    }
    Ok(n)
}
