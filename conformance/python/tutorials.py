#!/usr/bin/env python3
"""The six RabbitMQ tutorials, driven with pika, as automated checks.

Usage: AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python3 tutorials.py SCENARIO
       python3 tutorials.py --list

Each scenario checks the exact messages received (content, order where AMQP
guarantees it, counts), exits 0 on success and prints the reason of a failure
as its last line otherwise.  Every queue and exchange name carries a random
per-run suffix, so reruns (and leftovers of killed runs) never collide.
"""

import os
import subprocess
import sys
import threading
import time
import uuid

import pika
from pika.exceptions import ChannelClosedByBroker

URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
RUN = uuid.uuid4().hex[:10]
WAIT = 15.0  # seconds to wait for expected deliveries
GRACE = 0.4  # seconds to keep listening for unexpected extra deliveries


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def expect_eq(what, got, want):
    if got != want:
        raise Fail(f"{what}: expected {want!r}, got {got!r}")


def name(base):
    return f"conf.{base}.{RUN}"


def connect():
    params = pika.URLParameters(URL)
    params.socket_timeout = 10
    params.blocked_connection_timeout = 30
    return pika.BlockingConnection(params)


def close_quietly(conn):
    try:
        if conn is not None and conn.is_open:
            conn.close()
    except Exception:
        pass


class Sub:
    """A consumer on its own connection/channel that records (routing_key, body)."""

    def __init__(self, queue=None, exchange=None, keys=(), auto_ack=True, conn=None):
        self.conn = conn or connect()
        self.own_conn = conn is None
        self.ch = self.conn.channel()
        if queue is None:
            # tutorial style: server-named, exclusive queue
            res = self.ch.queue_declare(queue="", exclusive=True)
            queue = res.method.queue
        self.queue = queue
        for k in keys:
            self.ch.queue_bind(exchange=exchange, queue=queue, routing_key=k)
        self.got = []
        self.props = []
        self.ch.basic_consume(queue=queue, on_message_callback=self._on, auto_ack=auto_ack)

    def _on(self, ch, method, props, body):
        self.got.append((method.routing_key, body.decode()))
        self.props.append((method, props))

    def bodies(self):
        return [b for _, b in self.got]

    def close(self):
        if self.own_conn:
            close_quietly(self.conn)


def pump(subs, until, timeout=WAIT, grace=GRACE):
    """Drive the connections of `subs` until `until()` holds, then a short grace period."""
    conns = []
    for s in subs:
        if all(s.conn is not c for c in conns):
            conns.append(s.conn)
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for c in conns:
            c.process_data_events(time_limit=0.02)
    ok = until()
    end = time.monotonic() + grace
    while time.monotonic() < end:
        for c in conns:
            c.process_data_events(time_limit=0.02)
    return ok


def queue_depth(ch, queue):
    return ch.queue_declare(queue=queue, passive=True).method.message_count


# --------------------------------------------------------------------------
# 1. Hello World: default exchange, named queue
# --------------------------------------------------------------------------
def hello_world():
    q = name("hello")
    n = 10
    sender = connect()
    try:
        sch = sender.channel()
        sch.queue_declare(queue=q)
        # redeclaring with identical arguments is idempotent
        sch.queue_declare(queue=q)
        for i in range(n):
            sch.basic_publish(exchange="", routing_key=q, body=f"Hello World! #{i}")
        want = [f"Hello World! #{i}" for i in range(n)]

        rx = Sub(queue=q)
        try:
            rx.ch.queue_declare(queue=q)  # the receiver declares too, as in receive.py
            ok = pump([rx], lambda: len(rx.got) >= n)
            check(ok, f"received {len(rx.got)} of {n} messages")
            expect_eq("bodies", rx.bodies(), want)
            expect_eq("routing keys", sorted({k for k, _ in rx.got}), [q])
            for method, _ in rx.props:
                check(method.exchange == "", f"delivery exchange {method.exchange!r}, expected ''")
                check(not method.redelivered, "fresh message flagged redelivered")
        finally:
            rx.close()

        # basic.get path: publish three more, fetch them one by one, then empty
        for i in range(3):
            sch.basic_publish(exchange="", routing_key=q, body=f"get #{i}")
        deadline = time.monotonic() + WAIT
        while queue_depth(sch, q) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        expect_eq("message_count after 3 publishes", queue_depth(sch, q), 3)
        got = []
        for i in range(3):
            method, _props, body = sch.basic_get(queue=q, auto_ack=True)
            check(method is not None, f"basic.get #{i} returned get-empty")
            got.append(body.decode())
            expect_eq(f"basic.get #{i} message_count", method.message_count, 2 - i)
        expect_eq("basic.get bodies", got, [f"get #{i}" for i in range(3)])
        method, _, _ = sch.basic_get(queue=q, auto_ack=True)
        check(method is None, "basic.get on drained queue did not return get-empty")
        deleted = sch.queue_delete(queue=q)
        expect_eq("queue.delete-ok message_count", deleted.method.message_count, 0)
    finally:
        close_quietly(sender)
    print(f"ok: {n} consumed + 3 fetched in order")


# --------------------------------------------------------------------------
# 2. Work queues: durable queue, persistent messages, prefetch=1, manual acks
# --------------------------------------------------------------------------
def _worker(q, label, delay, ready, stop, log, lock, errors):
    conn = None
    try:
        conn = connect()
        ch = conn.channel()
        ch.queue_declare(queue=q, durable=True)
        ch.basic_qos(prefetch_count=1)

        def on_task(ch, method, props, body):
            time.sleep(delay)  # "work"
            with lock:
                log.append((label, body.decode(), method.redelivered, props.delivery_mode))
            ch.basic_ack(delivery_tag=method.delivery_tag)

        ch.basic_consume(queue=q, on_message_callback=on_task)
        ready.set()
        while not stop.is_set():
            conn.process_data_events(time_limit=0.05)
    except Exception as e:  # reported by the main thread
        errors.append(f"worker {label}: {e!r}")
        ready.set()
    finally:
        close_quietly(conn)


def work_queues():
    q = name("task_queue")
    n = 20
    conn = connect()
    try:
        ch = conn.channel()
        ch.queue_declare(queue=q, durable=True)
        # a queue cannot be redeclared with different properties (tutorial 2)
        ch2 = conn.channel()
        try:
            ch2.queue_declare(queue=q, durable=False)
            raise Fail("redeclaring a durable queue as non-durable did not fail")
        except ChannelClosedByBroker as e:
            expect_eq("reply code for inequivalent redeclare", e.reply_code, 406)

        lock = threading.Lock()
        log, errors = [], []
        stop = threading.Event()
        workers = []
        for label, delay in (("fast", 0.01), ("slow", 0.6)):
            ready = threading.Event()
            t = threading.Thread(target=_worker, args=(q, label, delay, ready, stop, log, lock, errors), daemon=True)
            t.start()
            check(ready.wait(WAIT), f"worker {label} did not start consuming")
            workers.append(t)
        check(not errors, "; ".join(errors))

        want = [f"task {i}{'.' * (i % 3)}" for i in range(n)]
        for body in want:
            ch.basic_publish(exchange="", routing_key=q, body=body,
                             properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))

        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            with lock:
                if len(log) >= n:
                    break
            time.sleep(0.05)
        time.sleep(GRACE + 0.6)  # let a slow in-flight task (or a bogus extra delivery) land
        stop.set()
        for t in workers:
            t.join(10)
        check(not errors, "; ".join(errors))

        bodies = [b for _, b, _, _ in log]
        check(len(bodies) == len(set(bodies)), f"some task was processed twice: {sorted(bodies)}")
        expect_eq("processed tasks", sorted(bodies), sorted(want))
        check(all(not r for _, _, r, _ in log), "a task was flagged redelivered")
        check(all(dm == 2 for _, _, _, dm in log), "a task arrived without delivery_mode=2 (persistent)")
        per = {lbl: [b for l, b, _, _ in log if l == lbl] for lbl in ("fast", "slow")}
        check(per["fast"] and per["slow"], f"not both workers got work: fast={len(per['fast'])} slow={len(per['slow'])}")
        check(len(per["slow"]) <= n // 4,
              f"prefetch=1 fair dispatch not honoured: slow worker got {len(per['slow'])} of {n}")
        # each worker sees its own share in publish order (one queue, one publisher)
        for lbl, got in per.items():
            expect_eq(f"order seen by {lbl} worker", got, [b for b in want if b in set(got)])
        expect_eq("queue depth after all acks", queue_depth(ch, q), 0)
        ch.queue_delete(queue=q)
    finally:
        close_quietly(conn)
    print(f"ok: fast={len(per['fast'])} slow={len(per['slow'])}")


def _dying_worker():
    """Helper process: take one task with manual ack, announce it, then wait to be SIGKILLed."""
    q = sys.argv[2]
    conn = connect()
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1)

    def on_task(ch, method, props, body):
        print(f"got {body.decode()} redelivered={method.redelivered}", flush=True)

    ch.basic_consume(queue=q, on_message_callback=on_task)
    while True:
        conn.process_data_events(time_limit=1)


def work_queues_redelivery():
    """Tutorial 2, 'message acknowledgment': a worker that dies before acking loses nothing."""
    q = name("task_queue_ack")
    conn = connect()
    try:
        ch = conn.channel()
        ch.queue_declare(queue=q, durable=True)
        want = [f"job {i}" for i in range(3)]
        for body in want:
            ch.basic_publish(exchange="", routing_key=q, body=body,
                             properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_dying_worker", q],
                                stdout=subprocess.PIPE, text=True, env=os.environ)
        try:
            line = proc.stdout.readline().strip()
            expect_eq("dying worker's delivery", line, "got job 0 redelivered=False")
            time.sleep(0.3)  # no further delivery while job 0 is unacked (prefetch=1)
        finally:
            proc.kill()  # SIGKILL: the TCP connection just drops, no ack, no close
            proc.wait()
        rest = proc.stdout.read()
        expect_eq("extra deliveries to the dying worker", rest.strip(), "")

        delivered = []

        def on(chn, method, props, body):
            delivered.append((body.decode(), method.redelivered))
            chn.basic_ack(method.delivery_tag)

        rch = conn.channel()
        rch.basic_qos(prefetch_count=1)
        rch.basic_consume(queue=q, on_message_callback=on)
        deadline = time.monotonic() + WAIT
        while len(delivered) < 3 and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.02)
        conn.process_data_events(time_limit=GRACE)
        ok = len(delivered) == 3
        check(ok, f"only {len(delivered)} of 3 jobs delivered after the worker died: {delivered}")
        expect_eq("deliveries after the worker died",
                  delivered, [("job 0", True), ("job 1", False), ("job 2", False)])
        expect_eq("queue depth after acks", queue_depth(ch, q), 0)
        ch.queue_delete(queue=q)
    finally:
        close_quietly(conn)
    print("ok: unacked job redelivered first with redelivered=True")


# --------------------------------------------------------------------------
# 3. Publish/Subscribe: fanout exchange, server-named exclusive queues
# --------------------------------------------------------------------------
def publish_subscribe():
    ex = name("logs")
    n = 10
    pub = connect()
    subs = []
    try:
        pch = pub.channel()
        pch.exchange_declare(exchange=ex, exchange_type="fanout")
        subs = [Sub(exchange=ex, keys=[""]) for _ in range(2)]
        for s in subs:
            check(s.queue.startswith("amq.gen-"), f"server-named queue {s.queue!r} does not start with amq.gen-")
        check(subs[0].queue != subs[1].queue, "two server-named queues got the same name")

        # an exclusive queue belongs to its connection
        other = pub.channel()
        try:
            other.queue_declare(queue=subs[0].queue, passive=True)
            raise Fail("another connection could declare someone else's exclusive queue")
        except ChannelClosedByBroker as e:
            expect_eq("reply code for touching another connection's exclusive queue", e.reply_code, 405)

        want = [f"log line {i}: info: Hello World!" for i in range(n)]
        for i, body in enumerate(want):
            # the routing key is ignored by fanout exchanges
            pch.basic_publish(exchange=ex, routing_key=f"ignored.{i}", body=body)
        ok = pump(subs, lambda: all(len(s.got) >= n for s in subs))
        check(ok, f"received {[len(s.got) for s in subs]} of {n} each")
        for i, s in enumerate(subs):
            expect_eq(f"subscriber {i} bodies", s.bodies(), want)

        # exclusive queues go away with their connection
        gone = subs[0].queue
        subs[0].close()
        subs = subs[1:]
        probe = pub.channel()
        try:
            probe.queue_declare(queue=gone, passive=True)
            raise Fail("exclusive queue survived its connection")
        except ChannelClosedByBroker as e:
            expect_eq("reply code for passive declare of deleted exclusive queue", e.reply_code, 404)
        pub.channel().exchange_delete(exchange=ex)
    finally:
        for s in subs:
            s.close()
        close_quietly(pub)
    print(f"ok: 2 subscribers x {n} messages")


# --------------------------------------------------------------------------
# 4. Routing: direct exchange, bindings by severity
# --------------------------------------------------------------------------
def routing():
    ex = name("direct_logs")
    pub = connect()
    subs = []
    try:
        pch = pub.channel()
        pch.exchange_declare(exchange=ex, exchange_type="direct")
        errors_only = Sub(exchange=ex, keys=["error"])
        all_but_debug = Sub(exchange=ex, keys=["info", "warning", "error"])
        # binding the same key twice is idempotent (no duplicate deliveries)
        all_but_debug.ch.queue_bind(exchange=ex, queue=all_but_debug.queue, routing_key="info")
        subs = [errors_only, all_but_debug]
        sent = []
        for i, sev in enumerate(["info", "warning", "error", "debug", "error", "info", "critical", "warning", "error", "debug"]):
            body = f"{sev}: message {i}"
            pch.basic_publish(exchange=ex, routing_key=sev, body=body)
            sent.append((sev, body))
        want_err = [(k, b) for k, b in sent if k == "error"]
        want_all = [(k, b) for k, b in sent if k in ("info", "warning", "error")]
        ok = pump(subs, lambda: len(errors_only.got) >= len(want_err) and len(all_but_debug.got) >= len(want_all))
        check(ok, f"received {len(errors_only.got)}/{len(want_err)} and {len(all_but_debug.got)}/{len(want_all)}")
        expect_eq("error-only consumer", errors_only.got, want_err)
        expect_eq("info+warning+error consumer", all_but_debug.got, want_all)

        # after unbinding 'info', info messages stop arriving there
        all_but_debug.ch.queue_unbind(queue=all_but_debug.queue, exchange=ex, routing_key="info")
        pch.basic_publish(exchange=ex, routing_key="info", body="info: after unbind")
        pch.basic_publish(exchange=ex, routing_key="warning", body="warning: after unbind")
        ok = pump(subs, lambda: len(all_but_debug.got) >= len(want_all) + 1)
        check(ok, "warning after unbind not delivered")
        expect_eq("deliveries after unbinding info", all_but_debug.got[len(want_all):],
                  [("warning", "warning: after unbind")])
        expect_eq("error-only consumer after unbind", errors_only.got, want_err)
        pch.exchange_delete(exchange=ex)
    finally:
        for s in subs:
            s.close()
        close_quietly(pub)
    print("ok: exact severities per consumer")


# --------------------------------------------------------------------------
# 5. Topics: '*' and '#' bindings, exact routing table
# --------------------------------------------------------------------------
TOPIC_BINDINGS = {
    "Q1": ["*.orange.*"],
    "Q2": ["*.*.rabbit", "lazy.#"],
    "all": ["#"],
    "kern": ["kern.*"],
    "critical": ["*.critical"],
    "mid": ["#.fox.#"],
}
# routing key -> set of queues that must receive it (exactly once each)
TOPIC_TABLE = [
    ("quick.orange.rabbit", {"Q1", "Q2", "all"}),
    ("lazy.orange.elephant", {"Q1", "Q2", "all"}),
    ("quick.orange.fox", {"Q1", "all", "mid"}),
    ("lazy.brown.fox", {"Q2", "all", "mid"}),
    ("lazy.pink.rabbit", {"Q2", "all"}),          # matches both Q2 bindings: delivered once
    ("quick.brown.fox", {"all", "mid"}),
    ("orange", {"all"}),
    ("quick.orange.new.rabbit", {"all"}),
    ("lazy.orange.new.rabbit", {"Q2", "all"}),
    ("quick.orange.male.rabbit", {"all"}),
    ("lazy", {"Q2", "all"}),                       # '#' matches zero words
    ("kern.critical", {"all", "kern", "critical"}),
    ("kern", {"all"}),                             # '*' needs exactly one word
    ("kern.disk.critical", {"all"}),
    ("a.critical", {"all", "critical"}),
    ("fox", {"all", "mid"}),
    ("a.b.fox.c.d", {"all", "mid"}),
    ("foxes.orange.x", {"Q1", "all"}),             # words match whole, not as prefixes
]


def topics():
    ex = name("topic_logs")
    pub = connect()
    sub_conn = connect()
    subs = {}
    try:
        pch = pub.channel()
        pch.exchange_declare(exchange=ex, exchange_type="topic")
        for qn, keys in TOPIC_BINDINGS.items():
            subs[qn] = Sub(exchange=ex, keys=keys, conn=sub_conn)
        want = {qn: [] for qn in subs}
        for i, (key, targets) in enumerate(TOPIC_TABLE):
            body = f"{key} #{i}"
            pch.basic_publish(exchange=ex, routing_key=key, body=body)
            for qn in targets:
                want[qn].append((key, body))
        ok = pump(list(subs.values()), lambda: all(len(subs[q].got) >= len(want[q]) for q in subs))
        for qn in subs:
            if subs[qn].got != want[qn]:
                got_keys = [k for k, _ in subs[qn].got]
                want_keys = [k for k, _ in want[qn]]
                raise Fail(f"queue {qn} bound {TOPIC_BINDINGS[qn]}: expected keys {want_keys}, got {got_keys}")
        check(ok, "not all expected deliveries arrived")
        pch.exchange_delete(exchange=ex)
    finally:
        close_quietly(sub_conn)
        close_quietly(pub)
    print(f"ok: {len(TOPIC_TABLE)} routing keys x {len(TOPIC_BINDINGS)} queues match the table")


# --------------------------------------------------------------------------
# 6. RPC: reply_to + correlation_id
# --------------------------------------------------------------------------
def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _rpc_server(q, ready, stop, seen_reply_to, errors):
    conn = None
    try:
        conn = connect()
        ch = conn.channel()
        ch.queue_declare(queue=q)
        ch.basic_qos(prefetch_count=1)

        def on_request(ch, method, props, body):
            seen_reply_to.append(props.reply_to)
            n = int(body)
            ch.basic_publish(exchange="", routing_key=props.reply_to,
                             properties=pika.BasicProperties(correlation_id=props.correlation_id),
                             body=str(fib(n)))
            ch.basic_ack(delivery_tag=method.delivery_tag)

        ch.basic_consume(queue=q, on_message_callback=on_request)
        ready.set()
        while not stop.is_set():
            conn.process_data_events(time_limit=0.05)
    except Exception as e:
        errors.append(f"rpc server: {e!r}")
        ready.set()
    finally:
        close_quietly(conn)


class RpcClient:
    def __init__(self, rpc_queue, direct_reply_to=False):
        self.rpc_queue = rpc_queue
        self.conn = connect()
        self.ch = self.conn.channel()
        if direct_reply_to:
            self.reply_to = "amq.rabbitmq.reply-to"
            # must consume (no-ack) from the pseudo-queue before publishing
            self.ch.basic_consume(queue=self.reply_to, on_message_callback=self._on, auto_ack=True)
        else:
            res = self.ch.queue_declare(queue="", exclusive=True)
            self.reply_to = res.method.queue
            self.ch.basic_consume(queue=self.reply_to, on_message_callback=self._on, auto_ack=True)
        self.replies = {}
        self.stray = []

    def _on(self, ch, method, props, body):
        if props.correlation_id in self.replies and self.replies[props.correlation_id] is None:
            self.replies[props.correlation_id] = body.decode()
        else:
            self.stray.append((props.correlation_id, body))

    def send(self, n):
        corr = str(uuid.uuid4())
        self.replies[corr] = None
        self.ch.basic_publish(exchange="", routing_key=self.rpc_queue,
                              properties=pika.BasicProperties(reply_to=self.reply_to, correlation_id=corr),
                              body=str(n))
        return corr

    def wait(self, corrs):
        deadline = time.monotonic() + WAIT
        while any(self.replies[c] is None for c in corrs) and time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.05)
        missing = [c for c in corrs if self.replies[c] is None]
        check(not missing, f"{len(missing)} of {len(corrs)} RPC replies missing")

    def call(self, n):
        corr = self.send(n)
        self.wait([corr])
        return self.replies[corr]


def _rpc(direct_reply_to):
    q = name("rpc_queue")
    ready, stop = threading.Event(), threading.Event()
    seen, errors = [], []
    t = threading.Thread(target=_rpc_server, args=(q, ready, stop, seen, errors), daemon=True)
    t.start()
    client = None
    try:
        check(ready.wait(WAIT), "rpc server did not start")
        check(not errors, "; ".join(errors))
        client = RpcClient(q, direct_reply_to)
        # sequential calls, as rpc_client.py does
        for n in (0, 1, 2, 10, 30):
            got = client.call(n)
            expect_eq(f"fib({n})", got, str(fib(n)))
        # several calls in flight at once; replies matched by correlation id
        ns = [5, 7, 11, 13, 17, 19, 23, 29]
        corrs = {client.send(n): n for n in ns}
        client.wait(list(corrs))
        for c, n in corrs.items():
            expect_eq(f"pipelined fib({n}) [corr {c[:8]}]", client.replies[c], str(fib(n)))
        client.conn.process_data_events(time_limit=GRACE)
        check(not client.stray, f"unexpected replies: {client.stray[:3]}")
        check(not errors, "; ".join(errors))
        expect_eq("requests seen by server", len(seen), 5 + len(ns))
        if direct_reply_to:
            bad = [r for r in seen if not (r or "").startswith("amq.rabbitmq.reply-to.")]
            check(not bad, f"server saw reply_to {bad[:1]}, expected amq.rabbitmq.reply-to.<token>")
        else:
            check(all(r == client.reply_to for r in seen), f"server saw reply_to {set(seen)}")
        client.ch.queue_delete(queue=q)
    finally:
        stop.set()
        t.join(10)
        if client:
            close_quietly(client.conn)
    print(f"ok: {5 + len(ns)} calls answered with matching correlation ids")


def rpc():
    _rpc(direct_reply_to=False)


def rpc_direct_reply_to():
    _rpc(direct_reply_to=True)


SCENARIOS = {
    "hello_world": hello_world,
    "work_queues": work_queues,
    "work_queues_redelivery": work_queues_redelivery,
    "publish_subscribe": publish_subscribe,
    "routing": routing,
    "topics": topics,
    "rpc": rpc,
    "rpc_direct_reply_to": rpc_direct_reply_to,
}


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    if sys.argv[1] == "--list":
        print("\n".join(SCENARIOS))
        return 0
    if sys.argv[1] == "_dying_worker":
        _dying_worker()
        return 0
    fn = SCENARIOS.get(sys.argv[1])
    if fn is None:
        print(f"unknown scenario {sys.argv[1]!r}")
        return 2
    try:
        fn()
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
