#!/usr/bin/env python3
"""Celery end to end against the broker at AMQP_URL, with real `celery worker` processes.

Usage: AMQP_URL=... python3 scenarios.py SCENARIO      (python3 scenarios.py --list)

Each scenario starts its own worker process(es) (`celery -A app worker`, from the
same venv) on a per-run queue, drives them through the Celery client API, checks
the exact results and the exact executions each task had (tasks record every
attempt in a per-run state directory), and stops the workers again (SIGTERM,
SIGKILL after a few seconds) whatever happens.  Every wait is bounded.  Exits 0
on success; otherwise the last line printed is the reason.

Worker logs go to $CONFORMANCE_LOGS/<scenario>-<worker>.log (or the state dir).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = uuid.uuid4().hex[:10]
QUEUE = f"conf.celery.{RUN}"
STATE = tempfile.mkdtemp(prefix=f"celery-state-{RUN}-")
LOGDIR = os.environ.get("CONFORMANCE_LOGS") or STATE
WAIT = 30.0  # seconds for a batch of results
CELERY = os.path.join(os.path.dirname(sys.executable), "celery")

os.environ["CONF_QUEUE"] = QUEUE
os.environ["CONF_STATE_DIR"] = STATE
sys.path.insert(0, HERE)


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


def records(kind):
    path = os.path.join(STATE, f"{kind}.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    if not cond():
        raise Fail(f"timed out after {timeout:.0f}s waiting for {what}")


def children_of(pid):
    """All descendants of pid (from /proc), deepest last."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


class Worker:
    """A `celery -A app worker` process of this run."""

    def __init__(self, label, pool="prefork", concurrency=2, backend="rpc://", conf=None):
        self.label = label
        self.log = os.path.join(LOGDIR, f"{SCENARIO}-{label}.log")
        env = dict(os.environ)
        env["CONF_RESULT_BACKEND"] = backend
        env["CONF_WORKER_LABEL"] = label
        env["CONF_CELERY_CONF"] = json.dumps(conf or {})
        env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [CELERY, "-A", "app", "worker", f"--pool={pool}", f"--concurrency={concurrency}",
               "-Q", QUEUE, "-n", f"{label}.{RUN}@localhost", "--without-gossip", "--without-mingle",
               "--loglevel=INFO"]
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT)

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def wait_ready(self, timeout=45):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log_text():
                return
            if self.proc.poll() is not None:
                raise Fail(f"worker {self.label} exited with {self.proc.returncode} before it was ready "
                           f"(see {self.log}): {self.last_log_line()}")
            time.sleep(0.1)
        raise Fail(f"worker {self.label} not ready after {timeout}s (see {self.log}): {self.last_log_line()}")

    def last_log_line(self):
        lines = [l for l in self.log_text().splitlines() if l.strip()]
        return lines[-1][-200:] if lines else "(empty log)"

    def kill9(self):
        """SIGKILL the worker and all its processes at once (a crash: no ack, TCP drop)."""
        pids = [self.proc.pid] + children_of(self.proc.pid)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            kids = children_of(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                pass
            for p in [self.proc.pid] + kids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        else:
            for p in children_of(self.proc.pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.logf.close()


WORKERS = []


def start_worker(*args, **kw):
    w = Worker(*args, **kw)
    WORKERS.append(w)
    return w


def client_app(backend="rpc://", conf=None):
    os.environ["CONF_RESULT_BACKEND"] = backend
    os.environ["CONF_CELERY_CONF"] = json.dumps(conf or {})
    import app as appmod  # noqa: E402  (configured from the environment above)
    return appmod


def purge_queue(appmod):
    with appmod.app.connection_for_write() as conn:
        ch = conn.default_channel
        try:
            ch.queue_delete(QUEUE)
        except Exception:
            pass


# --------------------------------------------------------------------------
def batch():
    """N tasks through a prefork worker pair, exact results over rpc://, each executed once."""
    m = client_app()
    n = 60
    w1 = start_worker("w1", pool="prefork", concurrency=2)
    w2 = start_worker("w2", pool="solo")
    w1.wait_ready()
    w2.wait_ready()
    results = [m.add.delay(i, 1000 * i) for i in range(n)]
    got = [r.get(timeout=WAIT) for r in results]
    expect_eq("results", got, [1001 * i for i in range(n)])
    expect_eq("states", {r.state for r in results}, {"SUCCESS"})
    time.sleep(0.5)
    recs = records("add")
    ids = sorted(r["task_id"] for r in recs)
    expect_eq("executions (each task exactly once)", ids, sorted(r.id for r in results))
    redel = [r for r in recs if r["redelivered"]]
    check(not redel, f"fresh tasks delivered with redelivered=True: {redel[:2]}")
    per = {lab: sum(1 for r in recs if r["worker"] == lab) for lab in ("w1", "w2")}
    check(per["w1"] > 0 and per["w2"] > 0, f"not both workers got tasks: {per}")
    print(f"ok: {n} tasks, exact results; executions per worker {per}")


def retry():
    """self.retry and autoretry_for with a small countdown: success on exactly the 3rd attempt."""
    m = client_app()
    start_worker("w1", pool="prefork", concurrency=2)
    k1, k2 = f"manual-{RUN}", f"auto-{RUN}"
    r1 = m.flaky_retry.delay(k1, 2)
    r2 = m.flaky_auto.delay(k2, 2)
    expect_eq("self.retry result", r1.get(timeout=WAIT), f"{k1} ok after 3 attempts")
    expect_eq("autoretry result", r2.get(timeout=WAIT), f"{k2} ok after 3 attempts")
    time.sleep(1.0)  # nothing may run after the successful attempt
    for kind, key, r in (("flaky_retry", k1, r1), ("flaky_auto", k2, r2)):
        recs = [x for x in records(kind) if x["key"] == key]
        expect_eq(f"{kind} attempts", [x["attempt"] for x in recs], [1, 2, 3])
        expect_eq(f"{kind} task ids (a retry keeps the id)", {x["task_id"] for x in recs}, {r.id})
        expect_eq(f"{kind} final state", r.state, "SUCCESS")
    print("ok: both retry styles succeeded on attempt 3 after exactly 2 failures")


def rpc_results():
    """Results over rpc://: several JSON types, an exception, results fetched out of order."""
    m = client_app()
    start_worker("w1", pool="prefork", concurrency=2)
    values = [0, -7, 3.5, "text ünïcode", [1, [2, 3]], {"k": [None, True, False]}, None, "x" * 20000]
    rs = [m.echo.delay(v) for v in values]
    failing = m.boom.delay(f"boom {RUN}")
    more = [m.add.delay(i, i) for i in range(10)]
    # fetch in reverse order: the rpc backend must keep results that arrived for others
    for r, v in reversed(list(zip(rs, values))):
        expect_eq(f"echo result for {str(v)[:30]!r}", r.get(timeout=WAIT), v)
    try:
        failing.get(timeout=WAIT)
        raise Fail("boom task: expected the exception to be re-raised by get(), got a result")
    except Fail:
        raise
    except Exception as e:  # the exception class is rebuilt from the result message
        expect_eq("boom exception", (type(e).__name__, str(e)), ("Boom", f"boom {RUN}"))
    expect_eq("boom state", failing.state, "FAILURE")
    expect_eq("add results", [r.get(timeout=WAIT) for r in more], [2 * i for i in range(10)])
    print(f"ok: {len(values) + 11} results over rpc://, including a FAILURE with its exception")


def group():
    """A group over rpc://: exact combined result in order."""
    from celery import group as cgroup
    m = client_app()
    start_worker("w1", pool="prefork", concurrency=2)
    g = cgroup(m.mul.s(i, i) for i in range(20))()
    expect_eq("group result", g.get(timeout=WAIT), [i * i for i in range(20)])
    expect_eq("group completed", (g.ready(), g.successful(), g.completed_count()), (True, True, 20))
    expect_eq("mul executions", len(records("mul")), 20)
    print("ok: group of 20 gave the exact list")


def chord():
    """A chord (header of adds, body xsum) with the filesystem result backend; also a group there."""
    from celery import chord as cchord, group as cgroup
    backend_dir = os.path.join(STATE, "results")
    os.makedirs(backend_dir)
    backend = f"file://{backend_dir}"
    m = client_app(backend=backend)
    start_worker("w1", pool="prefork", concurrency=2, backend=backend)
    c = cchord((m.add.s(i, i) for i in range(10)), m.xsum.s())()
    expect_eq("chord result", c.get(timeout=WAIT), sum(2 * i for i in range(10)))
    xs = records("xsum")
    expect_eq("chord body executions", [sorted(x["args"][0]) for x in xs], [[2 * i for i in range(10)]])
    g = cgroup(m.mul.s(i, 3) for i in range(8))()
    expect_eq("group result (file backend)", g.get(timeout=WAIT), [3 * i for i in range(8)])
    c2 = cchord([m.mul.s(i, 10) for i in range(5)], m.xsum.s())()
    expect_eq("second chord result", c2.get(timeout=WAIT), 100)
    time.sleep(0.5)
    expect_eq("xsum executions", len(records("xsum")), 2)
    print("ok: chord(10 adds -> xsum) = 90, chord(5 muls -> xsum) = 100, group of 8 exact")


def acks_late():
    """acks_late + prefetch 1: SIGKILL the worker mid-task; another worker gets it redelivered."""
    conf = {"task_acks_late": True, "worker_prefetch_multiplier": 1}
    m = client_app(conf=conf)
    a = start_worker("a", pool="solo", conf=conf)
    a.wait_ready()
    r = m.slow_square.delay(12, 4.0)
    wait_until(lambda: any(x["task_id"] == r.id for x in records("slow_start")), WAIT,
               "worker a to start the long task")
    first = [x for x in records("slow_start") if x["task_id"] == r.id]
    expect_eq("first execution", [(x["worker"], x["redelivered"]) for x in first], [("a", False)])
    b = start_worker("b", pool="prefork", concurrency=1, conf=conf)
    b.wait_ready()
    time.sleep(0.3)
    check(not records("slow_end"), "the long task finished before the worker could be killed")
    a.kill9()
    expect_eq("worker a exit status", a.proc.returncode, -signal.SIGKILL)
    expect_eq("redelivered task result", r.get(timeout=WAIT), 144)
    time.sleep(1.0)  # no third execution
    starts = [(x["worker"], x["redelivered"]) for x in records("slow_start") if x["task_id"] == r.id]
    ends = [x["worker"] for x in records("slow_end") if x["task_id"] == r.id]
    expect_eq("executions (worker, redelivered)", starts, [("a", False), ("b", True)])
    expect_eq("completed executions", ends, ["b"])
    print("ok: task killed on worker a was redelivered (redelivered=True) to worker b, result 144")


SCENARIOS = {
    "batch": batch,
    "retry": retry,
    "rpc_results": rpc_results,
    "group": group,
    "chord": chord,
    "acks_late": acks_late,
}
SCENARIO = "?"


def _on_term(signum, frame):
    raise SystemExit(f"killed by signal {signum} (time limit?)")


def main():
    global SCENARIO
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    if sys.argv[1] == "--list":
        print("\n".join(SCENARIOS))
        return 0
    fn = SCENARIOS.get(sys.argv[1])
    if fn is None:
        print(f"unknown scenario {sys.argv[1]!r}")
        return 2
    SCENARIO = f"celery-{sys.argv[1].replace('_', '-')}"
    signal.signal(signal.SIGTERM, _on_term)
    rc = 1
    reason = None
    try:
        fn()
        rc = 0
    except Fail as e:
        reason = str(e)
    except BaseException as e:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        reason = f"{type(e).__name__}: {e}"
    finally:
        for w in WORKERS:
            try:
                w.stop()
            except Exception as e:
                print(f"stopping worker {w.label}: {e}", file=sys.stderr)
        try:
            if "app" in sys.modules:
                purge_queue(sys.modules["app"])
        except Exception:
            pass
    if rc != 0:
        for w in WORKERS:
            print(f"worker {w.label} log: {w.log} (last line: {w.last_log_line()})")
        print(reason, flush=True)
    if rc == 0 or LOGDIR != STATE:
        shutil.rmtree(STATE, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
