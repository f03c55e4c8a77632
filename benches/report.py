#!/usr/bin/env python3
"""Turn compare.sh records (JSON lines) into a markdown table of medians and a bar chart.

usage: report.py RECORDS.jsonl OUT.md OUT.png [NOTE]
"""
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict

NAMES = {
    1: "transient 16 B, 1P/1C, auto-ack",
    2: "transient 1 KB, 1P/1C, auto-ack",
    3: "persistent 1 KB, confirms 256, manual ack, prefetch 256",
    4: "fanout x10, 10 consumers, 64 B",
    5: "RPC round trips, 1 outstanding, 64 B",
    6: "100P + 100C on 100 queues, 256 B",
    7: "backlog 100 B persistent: publish (confirms) then drain",
    8: "idle connections: memory per connection",
}

# (key, label, higher_is_better)
METRICS = {
    1: [("consume_rate", "consumed msg/s", True), ("publish_rate", "published msg/s", True)],
    2: [("consume_rate", "consumed msg/s", True), ("publish_rate", "published msg/s", True)],
    3: [("confirm_rate", "confirmed msg/s", True), ("consume_rate", "consumed msg/s", True),
        ("lat_p50", "latency p50 µs", False), ("lat_p99", "latency p99 µs", False)],
    4: [("consume_rate", "delivered msg/s (all queues)", True), ("publish_rate", "published msg/s", True)],
    5: [("consume_rate", "round trips/s", True), ("lat_p50", "RTT p50 µs", False), ("lat_p99", "RTT p99 µs", False)],
    6: [("consume_rate", "consumed msg/s", True), ("publish_rate", "published msg/s", True)],
    7: [("publish_time_s", "publish time s", False), ("drain_time_s", "drain time s", False),
        ("publish_rate", "publish msg/s", True), ("drain_rate", "drain msg/s", True)],
    8: [("kb_per_conn", "RSS per connection KiB", False)],
}
COMMON = [("broker_cpu_us_per_msg", "broker CPU µs/msg", False), ("broker_peak_rss_mb", "broker peak RSS MiB", False),
          ("gen_cpu_us_per_msg", "generator CPU µs/msg", False)]


def metrics_of(rec):
    s, g, x = rec["scenario"], rec.get("gen") or {}, rec.get("extra") or {}
    drain = x.get("drain") or {}
    if not g or not g.get("ok", True) or (s == 7 and drain and not drain.get("ok", True)):
        # Failed run: report the error, keep its numbers out of the medians.
        errs = (g.get("errors") or []) + (drain.get("errors") or [])
        return {"errors": ("; ".join(errs) or "generator produced no summary")[:300]}
    m = {}
    for k in ("consume_rate", "publish_rate", "confirm_rate", "publish_time_s"):
        if k in g:
            m[k] = g[k]
    lat = g.get("latency_us") or {}
    if "p50" in lat:
        m["lat_p50"], m["lat_p99"] = lat["p50"], lat["p99"]
    if rec["broker_peak_rss_kb"] > 0:
        m["broker_peak_rss_mb"] = rec["broker_peak_rss_kb"] / 1024
    if "cpu_us_per_msg" in g:
        m["gen_cpu_us_per_msg"] = g["cpu_us_per_msg"]
    msgs = max(g.get("published", 0), g.get("consumed", 0))
    if s == 7:
        d = x.get("drain") or {}
        if "consume_time_s" in d:
            m["drain_time_s"] = d["consume_time_s"]
            m["drain_rate"] = d.get("consume_rate", 0)
        msgs = g.get("published", 0)
        gen_cpu = g.get("cpu_s", 0) + d.get("cpu_s", 0)
        if msgs:
            m["gen_cpu_us_per_msg"] = gen_cpu * 1e6 / msgs
    if s == 8:
        if x.get("held") and x.get("rss_held_kb") and g.get("connections"):
            m["kb_per_conn"] = (x["rss_held_kb"] - x["rss_base_kb"]) / g["connections"]
        m.pop("gen_cpu_us_per_msg", None)
    else:
        # Broker CPU per message the broker fully handled: deliveries when there are
        # consumers (published-but-unconsumed messages are still in buffers/queues).
        if s != 7 and g.get("consumed", 0) > 0:
            msgs = g["consumed"]
        if msgs:
            m["broker_cpu_us_per_msg"] = rec["broker_cpu_s"] * 1e6 / msgs
    return m


def fmt(v):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}" if a < 1 else f"{v:.2f}"


def main():
    recs_path, md_path, png_path = sys.argv[1:4]
    note = sys.argv[4] if len(sys.argv) > 4 else ""
    recs = [json.loads(l) for l in open(recs_path) if l.strip()]
    vals = defaultdict(list)  # (scenario, broker, metric) -> [values]
    errors = defaultdict(list)
    brokers = []
    for r in recs:
        if r["broker"] not in brokers:
            brokers.append(r["broker"])
        for k, v in metrics_of(r).items():
            if k == "errors":
                errors[(r["scenario"], r["broker"])].append(v)
            elif isinstance(v, (int, float)):
                vals[(r["scenario"], r["broker"], k)].append(float(v))
    brokers.sort(key=lambda b: 0 if b == "warren" else 1)
    med = {k: statistics.median(v) for k, v in vals.items()}
    scenarios = sorted({r["scenario"] for r in recs})
    both = "warren" in brokers and "rabbitmq" in brokers

    try:
        rev = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
    except Exception:
        rev = ""
    lines = ["# Warren vs RabbitMQ — latest comparison", ""]
    lines.append(f"Medians over rounds ({note}; commit {rev or '?'}; {os.cpu_count()} CPUs, "
                 "broker and generator share the machine). Generated by `benches/compare.sh`.")
    lines.append("")
    hdr = "| # | scenario | metric | " + " | ".join(brokers) + (" | Warren/RabbitMQ |" if both else " |")
    lines.append(hdr)
    lines.append("|" + "---|" * (3 + len(brokers) + (1 if both else 0)))
    for s in scenarios:
        first = True
        for key, label, _hib in METRICS[s] + COMMON:
            row_vals = [med.get((s, b, key)) for b in brokers]
            if all(v is None for v in row_vals):
                continue
            cells = [fmt(v) for v in row_vals]
            ratio = ""
            if both:
                w, r = med.get((s, "warren", key)), med.get((s, "rabbitmq", key))
                ratio = f"{w / r:.2f}×" if (w is not None and r) else "–"
            name = f"{NAMES[s]}" if first else ""
            num = str(s) if first else ""
            lines.append(f"| {num} | {name} | {label} | " + " | ".join(cells) + (f" | {ratio} |" if both else " |"))
            first = False
    errs = [(k, v) for k, v in errors.items() if v]
    if errs:
        lines += ["", "Errors reported by the generator:", ""]
        for (s, b), v in sorted(errs):
            lines.append(f"- scenario {s} {b}: {v[0]}")
    lines += ["", "Ratios: for rates higher is better for Warren; for times, latencies, CPU and memory lower is better.", ""]
    with open(md_path, "w") as f:
        f.write("\n".join(lines))

    # Chart: one panel per scenario, primary metric, bars per broker.
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print("report.py: matplotlib not available — skipping the chart "
              "(pip install matplotlib to get benches/results/LATEST.png)", file=sys.stderr)
        return
    panels = []
    for s in scenarios:
        for key, label, hib in METRICS[s][:1] + [COMMON[0]]:
            if any((s, b, key) in med for b in brokers):
                panels.append((s, key, label, hib))
    if not panels:
        return
    cols = 4
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    colors = {"warren": "#2a7ab0", "rabbitmq": "#f08a24"}
    for ax, (s, key, label, hib) in zip(axes.flat, panels):
        ys = [med.get((s, b, key), 0) for b in brokers]
        bars = ax.bar(brokers, ys, color=[colors.get(b, "grey") for b in brokers])
        for bar, y in zip(bars, ys):
            ax.annotate(fmt(y), (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{s}. {NAMES[s]}"[:48], fontsize=8)
        ax.set_ylabel(label + (" (higher=better)" if hib else " (lower=better)"), fontsize=7)
        ax.tick_params(labelsize=7)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Warren vs RabbitMQ (medians)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"report.py: chart written to {png_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
