"""Celery application used by the conformance scenarios (conformance/celery/scenarios.py).

Everything comes from the environment, so that the scenario process (client) and
the `celery -A app worker` processes it starts share one configuration:

  AMQP_URL               broker URL (the broker under test)
  CONF_RESULT_BACKEND    result backend URL (default rpc://)
  CONF_QUEUE             per-run task queue name (unique per run)
  CONF_STATE_DIR         directory where tasks record each execution attempt
  CONF_CELERY_CONF       JSON object merged into app.conf (e.g. acks_late settings)
"""

import json
import os
import time

from celery import Celery

app = Celery("conformance")
app.conf.update(
    broker_url=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
    result_backend=os.environ.get("CONF_RESULT_BACKEND", "rpc://"),
    task_default_queue=os.environ.get("CONF_QUEUE", "conf.celery"),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    broker_connection_timeout=10,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    enable_utc=True,
)
app.conf.update(json.loads(os.environ.get("CONF_CELERY_CONF") or "{}"))

STATE_DIR = os.environ.get("CONF_STATE_DIR", "/tmp")


def record(kind, **fields):
    """Append one JSON line per execution to <state>/<kind>.jsonl (atomic O_APPEND write)."""
    fields["pid"] = os.getpid()
    fields["worker"] = os.environ.get("CONF_WORKER_LABEL", "?")
    line = (json.dumps(fields, sort_keys=True) + "\n").encode()
    fd = os.open(os.path.join(STATE_DIR, f"{kind}.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _redelivered(task):
    return bool((task.request.delivery_info or {}).get("redelivered"))


@app.task(bind=True)
def add(self, x, y):
    record("add", task_id=self.request.id, args=[x, y], redelivered=_redelivered(self))
    return x + y


@app.task(bind=True)
def mul(self, x, y):
    record("mul", task_id=self.request.id, args=[x, y])
    return x * y


@app.task(bind=True)
def xsum(self, numbers):
    record("xsum", task_id=self.request.id, args=[numbers])
    return sum(numbers)


@app.task(bind=True)
def echo(self, value):
    return value


class Boom(Exception):
    pass


@app.task(bind=True)
def boom(self, msg):
    raise Boom(msg)


class Flaky(Exception):
    pass


@app.task(bind=True, max_retries=5)
def flaky_retry(self, key, fail_times):
    """Raises on its first `fail_times` attempts and retries itself with self.retry."""
    attempt = self.request.retries + 1
    record("flaky_retry", key=key, attempt=attempt, task_id=self.request.id)
    if attempt <= fail_times:
        raise self.retry(exc=Flaky(f"attempt {attempt} of {key} fails"), countdown=0.3)
    return f"{key} ok after {attempt} attempts"


@app.task(bind=True, autoretry_for=(Flaky,), retry_backoff=False, default_retry_delay=0.3, max_retries=5)
def flaky_auto(self, key, fail_times):
    """Same, but the retry comes from autoretry_for."""
    attempt = self.request.retries + 1
    record("flaky_auto", key=key, attempt=attempt, task_id=self.request.id)
    if attempt <= fail_times:
        raise Flaky(f"attempt {attempt} of {key} fails")
    return f"{key} ok after {attempt} attempts"


@app.task(bind=True)
def slow_square(self, x, seconds):
    """A long task: records that it started (and where), sleeps, records the end."""
    record("slow_start", task_id=self.request.id, x=x, redelivered=_redelivered(self))
    time.sleep(seconds)
    record("slow_end", task_id=self.request.id, x=x)
    return x * x
