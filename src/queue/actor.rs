//! The queue actor: one task per queue, the only owner of its [`QueueCore`].
//!
//! It drains its bounded inbox in batches, applies each command to the core,
//! then dispatches ready messages and sends each consumer's deliveries to its
//! connection as one batch. It never waits on a connection (connection
//! inboxes are unbounded and bounded in practice by prefetch and flow
//! credit), so a slow or dead client cannot stall a queue.

use super::core::{ConsumeRefused, ConsumerId, Envelope, Outcome, QueueCore};
use super::{QueueCmd, QueueRef};
use crate::broker::{ConnCmd, ConnTx, VHost};
use crate::protocol::error::AmqpError;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;
use tracing::{debug, trace};

struct Link {
    conn: ConnTx,
    channel: u16,
    tag: Arc<str>,
}

/// Owns one queue's state. Built and started by [`spawn`].
pub struct QueueActor {
    q: Arc<QueueRef>,
    vhost: Weak<VHost>,
    core: QueueCore,
    links: HashMap<ConsumerId, Link>,
    ever_consumed: bool,
    out: Vec<(ConsumerId, Envelope)>,
}

/// Creates a queue: its registry entry and its actor task.
pub fn spawn(
    make: impl FnOnce(mpsc::Sender<QueueCmd>) -> QueueRef,
    vhost: &Arc<VHost>,
    inbox: usize,
    window: usize,
) -> Arc<QueueRef> {
    let (tx, rx) = mpsc::channel(inbox.max(1));
    let q = Arc::new(make(tx));
    let actor = QueueActor {
        q: q.clone(),
        vhost: Arc::downgrade(vhost),
        core: QueueCore::new(window),
        links: HashMap::new(),
        ever_consumed: false,
        out: Vec::new(),
    };
    let span = tracing::debug_span!("queue", name = %q.name, vhost = %q.vhost);
    tokio::spawn(tracing::Instrument::instrument(actor.run(rx), span));
    q
}

enum Flow {
    Continue,
    Stop,
}

impl QueueActor {
    async fn run(mut self, mut rx: mpsc::Receiver<QueueCmd>) {
        let mut cmds = Vec::with_capacity(64);
        loop {
            if rx.recv_many(&mut cmds, 64).await == 0 {
                break;
            }
            for cmd in cmds.drain(..) {
                if let Flow::Stop = self.handle(cmd) {
                    debug!("queue deleted");
                    return;
                }
            }
            self.dispatch();
            if self.should_auto_delete() {
                self.delete();
                return;
            }
        }
    }

    fn should_auto_delete(&self) -> bool {
        self.q.auto_delete && self.ever_consumed && self.core.consumer_count() == 0
    }

    fn handle(&mut self, cmd: QueueCmd) -> Flow {
        match cmd {
            QueueCmd::Publish { msgs, confirm } => {
                trace!(n = msgs.len(), "enqueue");
                for m in msgs {
                    self.core.enqueue(m, 0);
                }
                if let Some(c) = confirm {
                    // In-memory enqueue is final: confirm at once. Durable
                    // queues confirm after their store flush instead.
                    let _ = c.conn.send(ConnCmd::Confirm {
                        channel: c.channel,
                        seqs: c.seqs,
                        nack: false,
                    });
                }
            }
            QueueCmd::Consume {
                spec,
                conn,
                tag,
                reply,
            } => {
                let id = spec.id;
                let channel = spec.owner.channel;
                let res = match self.core.add_consumer(spec) {
                    Ok(()) => {
                        self.links.insert(id, Link { conn, channel, tag });
                        self.ever_consumed = true;
                        Ok(())
                    }
                    Err(ConsumeRefused::ExclusiveInUse) => Err(AmqpError::new(
                        crate::protocol::error::code::ACCESS_REFUSED,
                        format!(
                            "queue '{}' in vhost '{}' in exclusive use",
                            self.q.name, self.q.vhost
                        ),
                    )),
                };
                let _ = reply.send(res);
            }
            QueueCmd::Cancel { consumer, reply } => {
                self.core.remove_consumer(consumer);
                self.links.remove(&consumer);
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            QueueCmd::Settle { ids, outcome } => {
                // Discarded messages are dropped here; dead-lettering hooks in
                // at this point once queues have a dead-letter exchange.
                let _ = self.core.settle(&ids, outcome);
            }
            QueueCmd::Get {
                owner,
                no_ack,
                reply,
            } => {
                let _ = reply.send(self.core.get(owner, no_ack));
            }
            QueueCmd::Credit { consumer, n } => self.core.credit(consumer, n),
            QueueCmd::ChannelClosed { owner } => {
                for id in self.core.channel_closed(owner) {
                    self.links.remove(&id);
                }
            }
            QueueCmd::Purge { reply } => {
                let _ = reply.send(self.core.purge().len() as u64);
            }
            QueueCmd::Stats { reply } => {
                let _ = reply.send(self.core.counts());
            }
            QueueCmd::Kick => {}
            QueueCmd::Delete {
                if_unused,
                if_empty,
                reply,
            } => {
                let counts = self.core.counts();
                let refused = if if_unused && counts.consumers > 0 {
                    Some(format!(
                        "queue '{}' in vhost '{}' in use",
                        self.q.name, self.q.vhost
                    ))
                } else if if_empty && counts.ready > 0 {
                    Some(format!(
                        "queue '{}' in vhost '{}' not empty",
                        self.q.name, self.q.vhost
                    ))
                } else {
                    None
                };
                if let Some(why) = refused {
                    if let Some(r) = reply {
                        let _ = r.send(Err(AmqpError::precondition(why)));
                    }
                    return Flow::Continue;
                }
                self.delete();
                if let Some(r) = reply {
                    let _ = r.send(Ok(counts.ready));
                }
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// Removes the queue from its vhost and tells consumers it is gone.
    fn delete(&mut self) {
        self.q.mark_deleted();
        if let Some(vhost) = self.vhost.upgrade() {
            vhost.forget_queue(&self.q);
        }
        for (id, link) in self.links.drain() {
            let _ = link.conn.send(ConnCmd::ConsumerCancelled {
                channel: link.channel,
                consumer: id,
            });
        }
    }

    fn dispatch(&mut self) {
        self.core.dispatch(&mut self.out);
        if self.out.is_empty() {
            return;
        }
        let mut batches: Vec<(ConsumerId, Vec<Envelope>)> = Vec::new();
        for (cid, env) in self.out.drain(..) {
            match batches.iter_mut().find(|(c, _)| *c == cid) {
                Some((_, v)) => v.push(env),
                None => batches.push((cid, vec![env])),
            }
        }
        for (cid, msgs) in batches {
            let Some(link) = self.links.get(&cid) else {
                let ids: Vec<_> = msgs.iter().map(|e| e.id).collect();
                self.core.settle(&ids, Outcome::Undeliverable);
                continue;
            };
            let ids: Vec<_> = msgs.iter().map(|e| e.id).collect();
            let cmd = ConnCmd::Deliver {
                channel: link.channel,
                consumer: cid,
                tag: link.tag.clone(),
                queue: self.q.clone(),
                msgs,
            };
            if link.conn.send(cmd).is_err() {
                // The connection is gone without telling us: take the
                // consumer off and put its messages back.
                self.links.remove(&cid);
                self.core.remove_consumer(cid);
                self.core.settle(&ids, Outcome::Undeliverable);
            }
        }
    }
}
