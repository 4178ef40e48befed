"""Draw the benchmark figures in ``bench/results/*.json`` as PNG charts.

    pip install -e '.[bench]'      # matplotlib, only needed for this script
    python bench/plot.py           # writes bench/results/*.png

Two pictures say more than their tables:

- ``embedded_put_scaling.png``: durable puts/s against writer threads, the
  embedded store beside its peers of the same run: raw LMDB, sqlite3 (WAL,
  synchronous=FULL), LevelDB and RocksDB when installed (``bench/embedded.py``).
- ``paxos_core.png``: commands/s of three pure Paxos replicas against the
  commands batched per log entry, one line per pipeline window and kernel
  build (``bench/paxos_core.py``).
- ``cluster.png``: a 3-node local cluster (``bench/cluster.py``): durable puts
  and linearizable gets per second against requests in flight, PySyncObj's
  sets beside them (it never fsyncs), the same load run inside the process
  of an embedded replica that leads (dashed), and the latency CDF of each
  row where the results carry one.
- ``cluster_etcd.png``: one put, one get at a time, kvstore beside etcd 3.4 in
  the same sitting (``bench/cluster.py``'s ``versus_etcd``): the latency CDFs
  of the sync and asyncio clients' rows.

A results file that is missing (or predates the sweep) is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import figures


def skip(reason: str) -> bool:
    """Say on stderr why a chart is not drawn (the others still are); False."""
    print(f"skipped: {reason}", file=sys.stderr)
    return False


def save(plt, fig, out: str) -> bool:
    """Lay ``fig`` out, write it to ``out`` as a PNG and free it: every chart alike; True."""
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def load(results_dir: str, name: str) -> dict | None:
    path = os.path.join(results_dir, f"{name}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        skip(f"{os.path.relpath(path)} not found; run bench/{name}.py first")
        return None


def plot_put_scaling(plt, results: dict, out: str) -> bool:
    """Durable puts/s by writer threads for kvstore and each peer of the same run
    (results that predate the peers: kvstore beside raw LMDB)."""
    points = results.get("put_scaling")
    if not points:
        return skip("embedded.json has no put_scaling sweep; rerun bench/embedded.py")
    threads = [p["threads"] for p in points]
    peers = points[0].get("peers") or {"kvstore": None, "raw LMDB": None}
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    styles = ["o-", "s-", "^-", "v-", "D-", "x-"]
    top = 0.0
    for style, name in zip(styles, peers):
        if points[0].get("peers"):
            ys = [p["peers"][name] for p in points]
        else:
            ys = [p["kvstore_ops" if name == "kvstore" else "raw_lmdb_ops"] for p in points]
        top = max(top, *ys)
        ax.plot(threads, ys, style, label=name, linewidth=2.2 if name == "kvstore" else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(threads, [str(t) for t in threads])
    ax.set_xlabel("writer threads")
    ax.set_ylabel("durable puts/s (best of the interleaved rounds)")
    ax.set_ylim(0, top * 1.45)  # room for the legend above the lines
    cfg = results.get("config", {})
    ax.set_title(f"Durable puts, {cfg.get('key_size', '?')}-byte keys, "
                 f"{cfg.get('value_size', '?')}-byte values, same run")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left")
    return save(plt, fig, out)


def plot_paxos_core(plt, results: dict, out: str) -> bool:
    rows = results.get("table") or []
    if not rows:
        return skip("paxos_core.json has no table; rerun bench/paxos_core.py")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    windows = sorted({r["pipeline_window"] for r in rows})
    colours = {w: f"C{i}" for i, w in enumerate(windows)}  # a colour per window
    for kernels in sorted({r["kernels"] for r in rows}, reverse=True):  # native first
        for window in windows:
            line = sorted((r["batch_commands"], r["commands_per_s"]) for r in rows
                          if r["kernels"] == kernels and r["pipeline_window"] == window)
            if line:
                ax.plot([b for b, _ in line], [c for _, c in line],
                        "o-" if kernels == "native" else "s:", color=colours[window],
                        label=f"{kernels} kernels, window {window}")
    batches = sorted({r["batch_commands"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yscale("log")
    ax.set_xlabel("client commands per log entry")
    ax.set_ylabel("committed commands/s")
    ax.set_title(f"Pure Multi-Paxos core, {results.get('replicas', 3)} replicas, no I/O")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return save(plt, fig, out)


def plot_cluster(plt, results: dict, out: str) -> bool:
    rows = results.get("rows") or []
    if not rows:
        return skip("cluster.json has no rows; rerun bench/cluster.py")
    with_cdf = [("", r) for r in rows if r.get("cdf_ms")]
    with_cdf += [("embedded ", r) for r in (results.get("embedded") or {}).get("rows") or []
                 if r.get("cdf_ms")]
    fig, axes = plt.subplots(1, 2 if with_cdf else 1, figsize=(11 if with_cdf else 6.4, 4.2),
                             squeeze=False)
    ax = axes[0][0]
    embedded = (results.get("embedded") or {}).get("rows") or []
    series = [("put", rows, "o-", "kvstore durable puts"), ("get", rows, "s-", "kvstore linearizable gets"),
              ("put", embedded, "o--", "puts, load in the embedded leader's process"),
              ("get", embedded, "s--", "gets, load in the embedded leader's process"),
              ("put", results.get("pysyncobj") or [], "^:", "PySyncObj sets (never fsyncs)")]
    for op, source, style, label in series:
        line = sorted((r["in_flight"], r["ops_per_s"]) for r in source if r["op"] == op)
        if line:
            ax.plot([i for i, _ in line], [o for _, o in line], style, label=label)
    in_flight = sorted({r["in_flight"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(in_flight, [str(i) for i in in_flight])
    ax.set_xlabel("requests in flight (asyncio client)")
    ax.set_ylabel("operations/s")
    ax.set_title(f"{results.get('nodes', 3)} local nodes, {results.get('key_bytes', '?')}-byte keys, "
                 f"{results.get('value_bytes', '?')}-byte values")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    if with_cdf:
        cdf = axes[0][1]
        levels = sorted({r["in_flight"] for _, r in with_cdf})
        for where, r in with_cdf:  # a colour per concurrency, a line style per op and place
            points = sorted((float(q), ms) for q, ms in r["cdf_ms"].items())
            style = ("-" if r["op"] == "put" else "--") if not where else \
                (":" if r["op"] == "put" else "-.")
            cdf.plot([ms for _, ms in points], [q / 100 for q, _ in points], style,
                     color=f"C{levels.index(r['in_flight'])}",
                     label=f"{where}{r['op']}, {r['in_flight']} in flight")
        floor = results.get("floor_ms") or {}
        if floor:
            cdf.axvline(floor.get("fdatasync", 0) + floor.get("loopback_rtt", 0), color="grey",
                        linestyle=":", linewidth=1, label="floor: fdatasync + round trip")
        cdf.set_xscale("log")
        from matplotlib.ticker import NullFormatter, ScalarFormatter
        cdf.xaxis.set_major_formatter(ScalarFormatter())
        cdf.xaxis.set_minor_formatter(NullFormatter())  # no 2x10^-1 clutter between decades
        cdf.set_xlabel("latency (ms)")
        cdf.set_ylabel("fraction of requests")
        cdf.set_title("Latency CDF")
        cdf.grid(True, which="both", alpha=0.3)
        cdf.legend(fontsize="x-small")
    return save(plt, fig, out)


def plot_versus_etcd(plt, results: dict, out: str) -> bool:
    """One request at a time, kvstore beside etcd in the same sitting (``versus_etcd`` of
    cluster.json): the latency CDF of each one-in-flight row, the best round's."""
    versus = results.get("versus_etcd") or {}
    rows = [r for r in versus.get("rows") or [] if r["in_flight"] == 1]
    if not rows:
        return skip("cluster.json has no etcd comparison; rerun bench/cluster.py with etcd")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, op in zip(axes[0], ("put", "get")):
        for i, r in enumerate(x for x in rows if x["op"] == op):
            for side, style in (("kvstore", "-"), ("etcd", "--")):
                cdf = (r.get(side) or {}).get("cdf_ms")
                if side == "etcd" and "lease reads" in r["row"]:
                    continue  # etcd's read-index get again: the sequential get's curve
                if cdf:
                    points = sorted((float(q), ms) for q, ms in cdf.items())
                    ax.plot([ms for _, ms in points], [q / 100 for q, _ in points], style,
                            color=f"C{i}", label=f"{side}: {r['row'].split(', ', 1)[1]}")
        ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter, ScalarFormatter
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"one {'durable put' if op == 'put' else 'linearizable get'} at a time, "
                     f"3 nodes (etcd {versus.get('etcd_version', '?')})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return save(plt, fig, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=figures.RESULTS_DIR,
                   help="directory of the JSON figures (default: %(default)s)")
    p.add_argument("--out", default=None, help="directory for the PNG files (default: --results)")
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/plot.py needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    args.out = args.out or args.results
    os.makedirs(args.out, exist_ok=True)
    charts = [("embedded", "embedded_put_scaling.png", plot_put_scaling),
              ("paxos_core", "paxos_core.png", plot_paxos_core),
              ("cluster", "cluster.png", plot_cluster),
              ("cluster", "cluster_etcd.png", plot_versus_etcd)]
    for name, filename, draw in charts:
        results = load(args.results, name)
        out = os.path.join(args.out, filename)
        if results is not None and draw(plt, results, out):
            print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
