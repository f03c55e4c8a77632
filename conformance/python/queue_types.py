#!/usr/bin/env python3
"""Queue types (x-queue-type classic / quorum / stream), driven with pika and kombu.

Usage: AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python3 queue_types.py SCENARIO
       python3 queue_types.py --list

SCENARIO is CLIENT_TYPE with CLIENT pika or kombu and TYPE classic, quorum or
stream.  The same checks run through both clients (a small adapter per client):

classic  durable queue declared with x-queue-type=classic (twice: idempotent);
         redeclare with x-queue-type=quorum -> 406; 20 persistent messages;
         basic.get + reject/nack(requeue) of the first -> the same message
         again at the head, redelivered=True, acked; then a consumer with
         prefetch 5 and manual acks gets the other 19 bodies in publish order
         (delivery_mode 2, not redelivered); depth 0 after.
quorum   the same with x-queue-type=quorum, plus: a non-durable quorum queue ->
         406; redeclare as classic -> 406; the requeued message is not
         fetched again at once (RabbitMQ 3.10 quorum queues re-enqueue it at
         the back): the consumer gets the other 19 in order plus the requeued
         one with redelivered=True and x-delivery-count=1.
stream   durable x-queue-type=stream; 20 messages published with publisher
         confirms; a consumer with basic.qos(prefetch 5), manual acks and
         x-stream-offset=first reads all 20 in order, each delivery carrying
         x-stream-offset header 0..19; then a second consumer on a new channel
         replays exactly the same 20 from the start (streams are not drained),
         and a third with x-stream-offset=15 gets offsets 15..19.

Exits 0 on success; otherwise the last line printed is the reason.
"""

import os
import socket
import sys
import time
import uuid

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
RUN = uuid.uuid4().hex[:10]
WAIT = 15.0
GRACE = 0.4
N = 20


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def expect_eq(what, got, want):
    if got != want:
        if isinstance(got, list) and isinstance(want, list) and len(repr(want)) > 120:
            i = next((k for k, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
            raise Fail(f"{what}: {len(want)} expected, {len(got)} got; first difference at index {i}: "
                       f"expected {want[i:i + 3]!r}, got {got[i:i + 3]!r}")
        raise Fail(f"{what}: expected {want!r}, got {got!r}")


def name(base):
    return f"conf.{base}.{RUN}"


# --------------------------------------------------------------------------
# client adapters: the same small surface for pika and kombu
# --------------------------------------------------------------------------
class PikaClient:
    label = "pika"

    def __init__(self):
        import pika
        self.pika = pika
        params = pika.URLParameters(URL)
        params.socket_timeout = 10
        params.blocked_connection_timeout = 30
        self.conn = pika.BlockingConnection(params)
        self.ch = self.conn.channel()

    def declare(self, q, durable, args):
        """queue.declare; returns 0 or the channel-close reply code."""
        from pika.exceptions import ChannelClosedByBroker
        try:
            self.ch.queue_declare(queue=q, durable=durable, arguments=args)
            return 0
        except ChannelClosedByBroker as e:
            self.ch = self.conn.channel()
            return e.reply_code

    def publish(self, q, bodies, confirm=False):
        ch = self.conn.channel()
        if confirm:
            ch.confirm_delivery()
        for b in bodies:
            ch.basic_publish(exchange="", routing_key=q, body=b.encode(),
                             properties=self.pika.BasicProperties(delivery_mode=2, content_type="text/plain"))
        ch.close()

    def get(self, q):
        method, props, body = self.ch.basic_get(queue=q, auto_ack=False)
        if method is None:
            return None
        return {"body": body.decode(), "redelivered": method.redelivered, "headers": props.headers or {},
                "tag": method.delivery_tag, "delivery_mode": props.delivery_mode}

    def requeue(self, msg):
        self.ch.basic_nack(delivery_tag=msg["tag"], requeue=True)

    def ack(self, msg):
        self.ch.basic_ack(delivery_tag=msg["tag"])

    def consume(self, q, n, prefetch, args=None):
        ch = self.conn.channel()
        ch.basic_qos(prefetch_count=prefetch)
        got = []

        def on(c, method, props, body):
            got.append({"body": body.decode(), "redelivered": method.redelivered,
                        "headers": props.headers or {}, "delivery_mode": props.delivery_mode})
            c.basic_ack(delivery_tag=method.delivery_tag)

        tag = ch.basic_consume(queue=q, on_message_callback=on, auto_ack=False, arguments=args or {})
        deadline = time.monotonic() + WAIT
        while len(got) < n and time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.05)
        end = time.monotonic() + GRACE
        while time.monotonic() < end:
            self.conn.process_data_events(time_limit=0.05)
        ch.basic_cancel(tag)
        ch.close()
        return got

    def depth(self, q):
        return self.ch.queue_declare(queue=q, passive=True).method.message_count

    def delete(self, q):
        self.ch.queue_delete(queue=q)

    def close(self):
        try:
            if self.conn.is_open:
                self.conn.close()
        except Exception:
            pass


class KombuClient:
    """kombu with a per-run durable direct exchange; queues bound by their own name."""
    label = "kombu"

    def __init__(self):
        from kombu import Connection, Exchange
        self.conn = Connection(URL, connect_timeout=10)
        self.conn.connect()
        self.ch = self.conn.channel()
        self.ex = Exchange(name("kombu-x"), type="direct", durable=True)
        self.args = {}

    def queue(self, q, durable=True, args=None, consumer_args=None):
        from kombu import Queue
        return Queue(q, exchange=self.ex, routing_key=q, durable=durable,
                     queue_arguments=args, consumer_arguments=consumer_args)

    def declare(self, q, durable, args):
        try:
            self.queue(q, durable, args)(self.ch).declare()
            self.args[q] = args
            return 0
        except Exception as e:  # amqp.exceptions.PreconditionFailed & co
            code = getattr(e, "reply_code", None) or getattr(e, "code", None)
            if code is None:
                raise
            self.ch = self.conn.channel()
            return code

    def publish(self, q, bodies, confirm=False):
        from kombu import Connection, Producer
        opts = {"confirm_publish": True} if confirm else {}
        with Connection(URL, connect_timeout=10, transport_options=opts) as c:
            p = Producer(c.channel(), exchange=self.ex)
            for b in bodies:
                p.publish(b, routing_key=q, delivery_mode=2, content_type="text/plain",
                          content_encoding="utf-8", retry=False)

    def _msg(self, m):
        return {"body": m.body.decode() if isinstance(m.body, bytes) else m.body,
                "redelivered": bool(m.delivery_info.get("redelivered")),
                "headers": m.headers or {}, "delivery_mode": m.properties.get("delivery_mode"), "m": m}

    def get(self, q):
        m = self.queue(q, args=self.args.get(q))(self.ch).get(no_ack=False)
        return None if m is None else self._msg(m)

    def requeue(self, msg):
        msg["m"].requeue()  # basic.reject(requeue=True)

    def ack(self, msg):
        msg["m"].ack()

    def consume(self, q, n, prefetch, args=None):
        from kombu import Consumer
        ch = self.conn.channel()
        got = []

        def on(body, message):
            got.append(self._msg(message))
            message.ack()

        queue = self.queue(q, args=self.args.get(q), consumer_args=args)
        with Consumer(ch, queues=[queue], callbacks=[on], prefetch_count=prefetch, no_ack=False,
                      accept=["text/plain"]):
            deadline = time.monotonic() + WAIT
            end = None
            while True:
                now = time.monotonic()
                if end is None and (len(got) >= n or now >= deadline):
                    end = now + GRACE
                if end is not None and now >= end:
                    break
                try:
                    self.conn.drain_events(timeout=0.05)
                except socket.timeout:
                    pass
        ch.close()
        for g in got:
            g.pop("m", None)
        return got

    def depth(self, q):
        _, count, _ = self.queue(q, args=self.args.get(q))(self.ch).queue_declare(passive=True)
        return count

    def delete(self, q):
        self.queue(q)(self.ch).delete()

    def close(self):
        try:
            self.ex(self.conn.channel()).delete()
        except Exception:
            pass
        try:
            self.conn.release()
        except Exception:
            pass


CLIENTS = {"pika": PikaClient, "kombu": KombuClient}


# --------------------------------------------------------------------------
def classic_or_quorum(c, qtype):
    other = "quorum" if qtype == "classic" else "classic"
    q = name(f"{c.label}-{qtype}")
    args = {"x-queue-type": qtype}
    expect_eq(f"declare durable {qtype} queue", c.declare(q, True, args), 0)
    expect_eq(f"redeclare durable {qtype} queue (same arguments)", c.declare(q, True, args), 0)
    expect_eq(f"reply code for redeclaring the {qtype} queue as {other}",
              c.declare(q, True, {"x-queue-type": other}), 406)
    if qtype == "quorum":
        expect_eq("reply code for a non-durable quorum queue",
                  c.declare(name(f"{c.label}-quorum-transient"), False, args), 406)
    want = [f"{qtype} message {i}" for i in range(N)]
    c.publish(q, want, confirm=True)
    deadline = time.monotonic() + WAIT
    while c.depth(q) < N and time.monotonic() < deadline:
        time.sleep(0.05)
    expect_eq("queue depth after publishing", c.depth(q), N)

    first = c.get(q)
    check(first is not None, "basic.get returned get-empty")
    expect_eq("basic.get body", first["body"], want[0])
    check(not first["redelivered"], "fresh message flagged redelivered")
    c.requeue(first)
    if qtype == "classic":
        # classic queues put a requeued message back at its original position (the head)
        again = c.get(q)
        check(again is not None, "basic.get after requeue returned get-empty")
        expect_eq("basic.get after requeue (body, redelivered)",
                  (again["body"], again["redelivered"]), (want[0], True))
        c.ack(again)
        got = c.consume(q, N - 1, prefetch=5)
        expect_eq("consumed bodies", [g["body"] for g in got], want[1:])
        fresh = got
    else:
        # quorum queues (RabbitMQ 3.10) re-enqueue a returned message at the back
        got = c.consume(q, N, prefetch=5)
        expect_eq("consumed bodies (sorted)", sorted(g["body"] for g in got), sorted(want))
        fresh = [g for g in got if g["body"] != want[0]]
        expect_eq("consumed bodies other than the requeued one", [g["body"] for g in fresh], want[1:])
        again = [g for g in got if g["body"] == want[0]][0]
        expect_eq("requeued message: redelivered, x-delivery-count header",
                  (again["redelivered"], again["headers"].get("x-delivery-count")), (True, 1))
    bad = [g["body"] for g in fresh if g["redelivered"] or g["delivery_mode"] != 2]
    check(not bad, f"messages redelivered or not persistent: {bad[:3]}")
    expect_eq("queue depth after acks", c.depth(q), 0)
    c.delete(q)
    print(f"ok: {c.label} {qtype}: declare/inequivalence, get+requeue, consumed in order")


def stream(c):
    q = name(f"{c.label}-stream")
    args = {"x-queue-type": "stream"}
    expect_eq("declare durable stream", c.declare(q, True, args), 0)
    expect_eq("redeclare durable stream (same arguments)", c.declare(q, True, args), 0)
    want = [f"stream message {i}" for i in range(N)]
    c.publish(q, want, confirm=True)
    for replay in (1, 2):
        got = c.consume(q, N, prefetch=5, args={"x-stream-offset": "first"})
        expect_eq(f"replay {replay} from first: bodies", [g["body"] for g in got], want)
        expect_eq(f"replay {replay}: x-stream-offset headers",
                  [g["headers"].get("x-stream-offset") for g in got], list(range(N)))
    got = c.consume(q, 5, prefetch=5, args={"x-stream-offset": 15})
    expect_eq("from offset 15: bodies", [g["body"] for g in got], want[15:])
    c.delete(q)
    print(f"ok: {c.label} stream: {N} messages replayed twice from the start, and from offset 15")


def run(client, qtype):
    c = CLIENTS[client]()
    try:
        if qtype == "stream":
            stream(c)
        else:
            classic_or_quorum(c, qtype)
    finally:
        c.close()


SCENARIOS = {f"{cl}_{t}": (cl, t) for cl in ("pika", "kombu") for t in ("classic", "quorum", "stream")}


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    if sys.argv[1] == "--list":
        print("\n".join(SCENARIOS))
        return 0
    sc = SCENARIOS.get(sys.argv[1])
    if sc is None:
        print(f"unknown scenario {sys.argv[1]!r}")
        return 2
    try:
        run(*sc)
    except Fail as e:
        print(f"{e}", flush=True)
        return 1
    except Exception as e:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        print(f"{type(e).__name__}: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
