#!/usr/bin/env python3
"""Writes docs/BENCHMARKS.md and its plots from the load generator's JSON lines.

Usage: benches/report.py RESULTS.jsonl OUT.md LATENCY.svg [DELIVERED.svg]
(benches/run.sh calls it). The plots go beside OUT.md, which links them by file name; without
DELIVERED.svg the delivered-against-offered plot is written as bench-fanout-delivered.svg beside
LATENCY.svg. The hand-written narrative, benches/NOTES.md, is appended once.
Standard library only, so the report regenerates anywhere Python 3 runs.
"""
import json
import math
import os
import platform
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timezone

# A step keeps up when at least this share of the offered deliveries arrived within the
# publishing window and the backlog drained within KEEP_UP_DRAIN_SECS after it (the same rule
# as loadgen's --stop-after-misses).
KEEP_UP_SHARE = 0.95
KEEP_UP_DRAIN_SECS = 1.0
TARGET_CEILING_RATIO = 1.5
TARGET_SINGLE_P99_MS = 1.0
# The history issue's targets for durable rooms: the fan-out ceiling stays at least this many
# times nats-server's, and p99 at 10k deliveries/s rises by at most this much.
TARGET_DURABLE_CEILING_RATIO = 3.0
TARGET_DURABLE_P99_RISE_MS = 2.0
SYSTEMS = ("roomwire", "nats")
COLORS = {"roomwire": "#1f77b4", "nats": "#d62728"}


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    try:
        nats = subprocess.run([os.environ.get("NATS_SERVER", ".venv-nats/bin/nats-server"), "--version"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        nats = ""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (f"{os.cpu_count()} cores ({cpu}), {mem_kb / 1048576:.0f} GiB RAM, Linux {platform.release()}; "
            f"roomwire at commit `{commit}`; peer {nats or 'nats-server (version unknown)'}")


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "n/a"


def fmt(n, digits=0):
    return "n/a" if n is None else f"{n:,.{digits}f}"


def ms(v):
    """A latency in milliseconds, to three significant figures or so."""
    if v is None:
        return "n/a"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def lat(r, keys=("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")):
    return "n/a" if not r else " / ".join(ms(r["latency"].get(k)) for k in keys)


def cores(r, key="server_cpu_cores"):
    v = r and r["resources"].get(key)
    return "n/a" if v is None else f"{v:.2f}"


def in_window(r):
    """Deliveries/s counted at the end of the publishing window (older results: all received)."""
    return r and r.get("in_window_deliveries_per_sec", r.get("deliveries_per_sec"))


def drain(r):
    if not r:
        return "n/a"
    d = r.get("drain_secs")
    return f"{d:.2f}" if d is not None else "gave up"


def loss(r):
    if not r:
        return "n/a"
    closed = r.get("closed_members")
    return f"{r['lost']:,}, {r['out_of_order']:,}" + (f" ({closed} closed)" if closed else "")


def keeps_up(r):
    return bool(r) and (in_window(r) or 0) >= KEEP_UP_SHARE * r["offered_deliveries_per_sec"] \
        and r.get("drain_secs") is not None and r["drain_secs"] <= KEEP_UP_DRAIN_SECS


def yes(r):
    return "n/a" if not r else ("yes" if keeps_up(r) else "no")


def at(rows, offered):
    return next((r for r in rows if r["offered_deliveries_per_sec"] == offered), None)


def breakdown(r):
    """Server CPU per process and their sum: "a + b + c = sum"."""
    if not r:
        return "n/a"
    each = r["resources"].get("server_cpu_cores_each") or []
    parts = " + ".join("n/a" if c is None else f"{c:.2f}" for c in each)
    return f"{parts} = {cores(r)}"


def rate(v):
    return f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"


def ceiling(rows):
    """(highest offered deliveries/s that kept up or None, whether the highest step run kept up)."""
    rows = sorted(rows, key=lambda r: r["offered_deliveries_per_sec"])
    kept = [r["offered_deliveries_per_sec"] for r in rows if keeps_up(r)]
    return (max(kept) if kept else None), bool(rows) and keeps_up(rows[-1])


def step_secs(rows):
    w = sorted(r["window_secs"] for r in rows if r.get("window_secs"))
    return f"{w[len(w) // 2]:.0f}" if w else "?"


def durable_fanout_section(durable, memory, nats_ceiling, nats_top_kept):
    """(b), durable: the same room stored in JetStream before each acknowledgement, against the
    standalone node (history in memory) and nats-server's ceiling."""
    c, top_kept = ceiling(durable)
    verdict = "n/a"
    if c and nats_ceiling and not nats_top_kept:
        r = c / nats_ceiling
        verdict = (f"{'≥ ' if top_kept else ''}{r:.2f} × nats-server's (target ≥ {TARGET_DURABLE_CEILING_RATIO:g}: "
                   f"{'met' if r >= TARGET_DURABLE_CEILING_RATIO else 'not met'})")
    offered = {r["offered_deliveries_per_sec"] for r in durable}
    low = 10_000 if 10_000 in offered else min(offered)
    d, m = at(durable, low), at(memory, low)
    rise = "n/a"
    if d and m:
        delta = d["latency"]["p99_ms"] - m["latency"]["p99_ms"]
        rise = (f"{ms(d['latency']['p99_ms'])} ms against {ms(m['latency']['p99_ms'])} ms in memory: "
                f"{delta:+.2f} ms (target ≤ +{TARGET_DURABLE_P99_RISE_MS:g} ms: "
                f"{'met' if delta <= TARGET_DURABLE_P99_RISE_MS else 'not met'})")
    out = ["**The room durable.** The same load on one roomwire node meshed over a nats-server with "
           "JetStream: every message is appended to the room's stream and acknowledged, and fanned out, "
           "only once JetStream has it (the standalone node above keeps the room's history in memory). "
           "CPU is the node and the backbone.", "",
           f"- **Ceiling, durable:** {f'{c:,} deliveries/s' if c else 'no step kept up'}{' (not reached)' if top_kept else ''}; "
           f"ratio: {verdict}",
           f"- **p99 at {low:,} deliveries/s:** {rise}", "",
           "| offered deliveries/s | durable delivered/s | p50 / p90 / p99 / p99.9 / max ms | drain s | keeps up | lost, out of order | CPU: node + backbone = sum |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(durable, key=lambda r: r["offered_deliveries_per_sec"]):
        out.append(f"| {r['offered_deliveries_per_sec']:,} | {fmt(in_window(r))} | {lat(r)} | {drain(r)} | "
                   f"{yes(r)} | {loss(r)} | {breakdown(r)} |")
    return out + [""]


def svg_plot(path, title, xlabel, ylabel, series, logy=False, diagonal=False):
    """A line plot: series = [(name, color, dash, [(x, y), ...])]; x linear from 0, y linear or log."""
    series = [s for s in series if s[3]]
    if not series:
        return False
    width, height, left, bottom, top, right = 780, 430, 80, 50, 34, 180
    xs = [x for *_, pts in series for x, _ in pts]
    ys = [y for *_, pts in series for _, y in pts if y and y > 0]
    xmax = max(xs) or 1
    if logy:
        lo = math.floor(math.log10(min(ys))) if ys else 0
        hi = max(math.ceil(math.log10(max(ys))) if ys else 1, lo + 1)
        sy = lambda y: height - bottom - (height - bottom - top) * (math.log10(max(y, 10 ** lo)) - lo) / (hi - lo)
        yticks = [10 ** e for e in range(lo, hi + 1)]
    else:
        ymax = max(max(ys) if ys else 1, xmax if diagonal else 0)
        sy = lambda y: height - bottom - (height - bottom - top) * y / ymax
        yticks = [ymax * i / 5 for i in range(6)]
    sx = lambda x: left + (width - left - right) * x / xmax
    tick = lambda v: rate(v) if v >= 1000 else f"{v:g}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">{title}</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']
    for i in range(6):
        x = xmax * i / 5
        out.append(f'<text x="{sx(x):.0f}" y="{height - bottom + 16}" text-anchor="middle">{tick(x)}</text>')
    for y in yticks:
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.0f}" text-anchor="end">{tick(y)}</text>')
        out.append(f'<line x1="{left}" y1="{sy(y):.0f}" x2="{width - right}" y2="{sy(y):.0f}" stroke="#eee"/>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text x="16" y="{(top + height - bottom) / 2}" transform="rotate(-90 16,{(top + height - bottom) / 2})" text-anchor="middle">{ylabel}</text>')
    if diagonal:
        out.append(f'<line x1="{sx(0):.1f}" y1="{sy(0):.1f}" x2="{sx(xmax):.1f}" y2="{sy(xmax):.1f}" stroke="#999" stroke-dasharray="2,3"/>')
        series = series + [("offered", "#999", "2,3", [])]
    for i, (name, color, dash, pts) in enumerate(series):
        if pts:
            d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
            for x, y in pts:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>')
        ly = top + 20 + i * 18
        out.append(f'<line x1="{width - right + 15}" y1="{ly}" x2="{width - right + 45}" y2="{ly}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        out.append(f'<text x="{width - right + 50}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    return True


def fanout_plots(fanout, latency_svg, delivered_svg, members):
    by_offered = {t: sorted(rows, key=lambda r: r["offered_deliveries_per_sec"]) for t, rows in fanout.items()}
    lat_series, del_series = [], []
    for target in SYSTEMS:
        rows = by_offered.get(target, [])
        for pct, dash in (("p50_ms", ""), ("p99_ms", "6,4")):
            lat_series.append((f"{target} {pct[:3]}", COLORS[target], dash,
                               [(r["offered_deliveries_per_sec"], r["latency"][pct]) for r in rows]))
        del_series.append((f"{target} in-window", COLORS[target], "",
                           [(r["offered_deliveries_per_sec"], in_window(r)) for r in rows]))
    plots = []
    if svg_plot(latency_svg, f"Fan-out: publish-to-receive latency vs offered load ({members:,} members, 64 B)",
                "offered deliveries per second", "latency (ms, log scale)", lat_series, logy=True):
        plots.append(("latency against offered load", latency_svg))
    if delivered_svg and svg_plot(delivered_svg, f"Fan-out: deliveries within the publishing window ({members:,} members)",
                                  "offered deliveries per second", "delivered per second", del_series, diagonal=True):
        plots.append(("delivered against offered load", delivered_svg))
    return plots


def main(results_path, md_path, svg_path, delivered_svg=None):
    if delivered_svg is None:
        delivered_svg = os.path.join(os.path.dirname(svg_path), "bench-fanout-delivered.svg")
    rows = [json.loads(line) for line in open(results_path) if line.strip()]
    by = defaultdict(lambda: defaultdict(list))
    transports = [r for r in rows if r.get("label") == "transports"]
    mesh = defaultdict(list)
    owner = {}
    failover = [r for r in rows if r["scenario"] == "failover"]
    storms = [r for r in rows if r["scenario"] == "storm"]
    meshchat = [r for r in rows if r.get("label", "").startswith("meshchat-")]
    presence = defaultdict(list)
    durable_fanout = []
    for r in rows:
        if r["scenario"] == "presence":
            presence[r["room_users"]].append(r)
    for r in rows:
        if r["scenario"] in ("failover", "storm", "presence"):
            continue
        if r["scenario"] == "mesh-owner":
            owner[r["phase"]] = r
        elif r.get("label") == "mesh":
            mesh[r["target"]].append(r)
        elif r.get("label", "").startswith("meshchat-"):
            continue
        elif r.get("label") == "mesh-nohistory":
            mesh["roomwire-nohistory"].append(r)
        elif r.get("label") == "fanout-durable":
            durable_fanout.append(r)
        elif r.get("label") != "transports":
            by[r["scenario"]][r["target"]].append(r)
    threads = sorted({r.get("threads", 1) for r in rows if r["scenario"] not in ("mesh-owner", "failover", "storm", "presence")}) or [1]

    md = ["# roomwire benchmarks", "",
          "Generated by `benches/run.sh` (which calls `benches/report.py`); do not edit by hand. "
          "Every figure comes from one run on one machine, roomwire and the peer measured side by side.", "",
          f"- **Machine:** {machine()}",
          # When the last figure was written, so regenerating the report alone keeps the date.
          f"- **Run:** {datetime.fromtimestamp(os.path.getmtime(results_path), timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
          "- **Peer:** nats-server's WebSocket listener (`websocket { no_tls: true }`), driven by the same "
          "generator speaking the NATS text protocol (CONNECT / SUB / PUB / MSG) over WebSocket.",
          "- **Generator:** `cargo build --release --example loadgen` (`benches/loadgen.rs`): one process per "
          f"scenario (two for chat), a tokio runtime with {' or '.join(map(str, threads))} worker thread(s) "
          "(`--threads`), payload = publisher sequence + send timestamp, HDR histograms.",
          "- **Delivered/s** is counted at the end of each publishing window (deliveries that arrived while "
          "the publisher was still publishing, divided by the window); **drain** is the time after the window "
          "until every expected delivery had arrived (\"gave up\": some never did, see lost). Lost and "
          "out-of-order are counted after the drain.",
          "- **Ratios** are roomwire / nats-server: above 1 is better for throughput and connect rate, "
          "below 1 is better for memory, CPU and latency.", ""]

    idle = by.get("idle", {})
    if idle:
        md += ["## (a) Idle sessions: memory per session", "",
               "A fresh server per size; RSS of the server process before and after the sessions connect "
               "(`/proc/<pid>/status` VmRSS), divided by the number of sessions. Kernel socket memory "
               "(about 4.3 KB per socket here) is not in RSS and not counted.", "",
               "| sessions | roomwire bytes/session | nats bytes/session | ratio | roomwire connects/s | nats connects/s | ratio |",
               "|---:|---:|---:|---:|---:|---:|---:|"]
        sizes = sorted({r["sessions"] for t in idle.values() for r in t})
        for n in sizes:
            rw = next((r for r in idle.get("roomwire", []) if r["sessions"] == n), {})
            na = next((r for r in idle.get("nats", []) if r["sessions"] == n), {})
            md.append(f"| {n:,} | {fmt(rw.get('rss_per_session_bytes'))} | {fmt(na.get('rss_per_session_bytes'))} | "
                      f"{ratio(rw.get('rss_per_session_bytes'), na.get('rss_per_session_bytes'))} | "
                      f"{fmt(rw.get('connects_per_sec'))} | {fmt(na.get('connects_per_sec'))} | "
                      f"{ratio(rw.get('connects_per_sec'), na.get('connects_per_sec'))} |")
        md.append("")

    fanout = by.get("fanout", {})
    if fanout:
        all_rows = [r for t in fanout.values() for r in t]
        members = all_rows[0]["members"]
        md += ["## (b) One large room: fan-out", "",
               f"One publisher, {members:,} members in one room, 64-byte messages; the offered rate is stepped up "
               f"({step_secs(all_rows)} s per step; a system stops after two steps in a row that do not keep up). "
               "Lost and out-of-order are per member and must be 0 (\"closed\": members the server "
               "disconnected). CPU is cores used over the step and its drain (`/proc/<pid>/stat`). "
               "Latency is over every delivery of the step, the drained backlog included.", "",
               f"**Rule for the ceiling:** a step *keeps up* when the deliveries that arrived within the "
               f"publishing window are at least {KEEP_UP_SHARE:.0%} of those offered and the backlog after it "
               f"drains within {KEEP_UP_DRAIN_SECS:g} s; a system's fan-out ceiling is the highest offered "
               "rate at which it kept up.", ""]
        ceilings = {t: ceiling(fanout.get(t, [])) for t in SYSTEMS}
        def describe(t):
            c, top_kept = ceilings[t]
            if c is None:
                return "no step kept up"
            return f"≥ {c:,} deliveries/s (not reached: the highest step kept up)" if top_kept else f"{c:,} deliveries/s"
        rw_c, na_c = ceilings["roomwire"][0], ceilings["nats"][0]
        verdict = "n/a"
        if rw_c and na_c:
            sign = "≥ " if ceilings["roomwire"][1] and not ceilings["nats"][1] else ""
            if ceilings["nats"][1]:
                verdict = f"{rw_c / na_c:.2f} (nats-server's ceiling not reached, so this bounds nothing)"
            else:
                verdict = (f"{sign}{rw_c / na_c:.2f} (target ≥ {TARGET_CEILING_RATIO}: "
                           f"{'met' if rw_c / na_c >= TARGET_CEILING_RATIO else ('not shown' if sign else 'not met')})")
        md += [f"- **Ceiling, roomwire:** {describe('roomwire')}",
               f"- **Ceiling, nats-server:** {describe('nats')}",
               f"- **Ratio of ceilings (roomwire / nats):** {verdict}", "",
               "| offered deliveries/s | roomwire delivered/s | nats delivered/s | ratio | drain s (rw / nats) | keeps up (rw / nats) | roomwire p50 / p90 / p99 / p99.9 / max ms | nats p50 / p90 / p99 / p99.9 / max ms | server CPU (rw / nats) | generator CPU (rw / nats) | lost, out of order (rw / nats) |",
               "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for o in sorted({r["offered_deliveries_per_sec"] for r in all_rows}):
            rw, na = at(fanout.get("roomwire", []), o), at(fanout.get("nats", []), o)
            nr = lambda r: fmt(in_window(r)) if r else "not run"
            md.append(f"| {o:,} | {nr(rw)} | {nr(na)} | {ratio(in_window(rw), in_window(na))} | "
                      f"{drain(rw)} / {drain(na)} | {yes(rw)} / {yes(na)} | {lat(rw)} | {lat(na)} | "
                      f"{cores(rw)} / {cores(na)} | {cores(rw, 'loadgen_cpu_cores')} / {cores(na, 'loadgen_cpu_cores')} | "
                      f"{loss(rw)} / {loss(na)} |")
        md += ["", "\"not run\": the system had stopped stepping (two steps in a row past its ceiling).", ""]
        if durable_fanout:
            md += durable_fanout_section(durable_fanout, fanout.get("roomwire", []), na_c, ceilings["nats"][1])
        for alt, path in fanout_plots(fanout, svg_path, delivered_svg, members):
            md += [f"![{alt}]({os.path.basename(path)})", ""]

    single = by.get("latency", {})
    if single:
        all_rows = [r for t in single.values() for r in t]
        md += ["## Single subscriber: latency", "",
               f"One publisher and {all_rows[0]['members']} member in one room, 64-byte messages, "
               f"{step_secs(all_rows)} s per rate: the latency of the path itself, without a large fan-out "
               "for the generator to read. Target: p99 below "
               f"{TARGET_SINGLE_P99_MS:g} ms. Below 1,000 samples in a step (rate × step), p99.9 is the maximum.", "",
               "| offered msgs/s | roomwire p50 / p90 / p99 / p99.9 / max ms | nats p50 / p90 / p99 / p99.9 / max ms | p99 < 1 ms (rw / nats) | delivered/s (rw / nats) | lost, out of order (rw / nats) | server CPU (rw / nats) |",
               "|---:|---:|---:|---:|---:|---:|---:|"]
        for o in sorted({r["offered_msgs_per_sec"] for r in all_rows}):
            rw = next((r for r in single.get("roomwire", []) if r["offered_msgs_per_sec"] == o), None)
            na = next((r for r in single.get("nats", []) if r["offered_msgs_per_sec"] == o), None)
            under = lambda r: "n/a" if not r else ("yes" if r["latency"]["p99_ms"] < TARGET_SINGLE_P99_MS else "no")
            md.append(f"| {o:,} | {lat(rw)} | {lat(na)} | {under(rw)} / {under(na)} | "
                      f"{fmt(in_window(rw))} / {fmt(in_window(na))} | {loss(rw)} / {loss(na)} | {cores(rw)} / {cores(na)} |")
        md.append("")

    chat = by.get("chat", {})
    if chat:
        any_half = next(r for t in chat.values() for r in t)
        md += ["## (c) Chat: many small rooms", "",
               f"2 × {any_half['rooms']:,} rooms × {any_half['members_per_room']} members, every member publishing "
               f"{any_half['rate_per_member']:g} messages/s (64 B) from its own session, each on its own schedule "
               "(the members' starts spread over the first second). The full run's 20,000 sessions exceed what "
               "one process may hold open here (20,000 files), so two server processes each hold half of the "
               "rooms, each driven by its own generator; the table sums both halves and shows each half's "
               "latency. Offered deliveries/s is what the publishers sent times the room size, over the window.", "",
               "| system | offered deliveries/s | delivered/s (sum) | drain s (slower half) | lost | out of order | half A p50 / p99 / max ms | half B p50 / p99 / max ms | server CPU (sum) | generator CPU (sum) |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for target in SYSTEMS:
            halves = sorted(chat.get(target, []), key=lambda r: r["label"])
            if not halves:
                continue
            drains = [h.get("drain_secs") for h in halves]
            worst = "gave up" if None in drains else f"{max(drains):.2f}"
            lats = [lat(h, ("p50_ms", "p99_ms", "max_ms")) for h in halves] + ["n/a", "n/a"]
            offered = sum(h.get("offered_deliveries_per_sec", 0) for h in halves)
            cpu = lambda key: sum(h["resources"].get(key) or 0 for h in halves)
            md.append(f"| {target} | {fmt(offered)} | {fmt(sum(in_window(h) for h in halves))} | {worst} | "
                      f"{sum(h['lost'] for h in halves):,} | {sum(h['out_of_order'] for h in halves):,} | "
                      f"{lats[0]} | {lats[1]} | {cpu('server_cpu_cores'):.2f} | {cpu('loadgen_cpu_cores'):.2f} |")
        md.append("")

    if mesh:
        all_rows = [r for t in mesh.values() for r in t]
        members = all_rows[0]["members"]
        md += ["## (d) Two servers over NATS: members split across them", "",
               f"One publisher, {members:,} members in one room, half on each of two servers (member *i* on "
               f"server *i* mod 2), the publisher on the first; 64-byte messages, {step_secs(all_rows)} s per "
               "step. **roomwire:** two nodes meshed over one nats-server (the backbone); the room's owner "
               "sequences every message and each message crosses NATS once per node with members. "
               "**Peer:** two nats-servers joined as a cluster (routes), each with its own WebSocket listener. "
               "Server CPU is the sum of every process the system needs: for roomwire both nodes *and* the "
               "backbone nats-server (the mesh does not run without it), for the peer both nats-servers. "
               "As under (b), a system stops stepping after two steps in a row that do not keep up (\"not run\"). "
               "roomwire's room is **durable** (the default class): every message is appended to JetStream "
               "on the backbone, and acknowledged and fanned out only once stored; the last columns run "
               "the same with the room keeping no history, to show what storing costs.", ""]
        before, after = owner.get("before"), owner.get("after")
        if before:
            where = "the publisher's node" if before["owner_is_publisher_node"] else "the other node (not the publisher's)"
            md.append(f"- **Owner of the room** (`GET /api/v1/cluster?room={before['room']}`): `{before['owner']}`, "
                      f"{where}; the publisher is on `{before['publisher_node']}`"
                      + ("" if before["owners_agree"] else " (the nodes disagreed on the owner!)") + ".")
        if before and after:
            changes = lambda s: sum(n["ring_changes"] for n in s["nodes"])
            moved = changes(after) - changes(before)
            md.append(f"- **Ring changes during the run:** {moved}" + (
                "" if moved == 0 else f" (the owner afterwards: `{after['owner']}`)") + ".")
        md += ["", "| offered deliveries/s | roomwire delivered/s | nats delivered/s | ratio | drain s (rw / nats) | roomwire p50 / p90 / p99 / p99.9 / max ms | nats p50 / p90 / p99 / p99.9 / max ms | lost, out of order (rw / nats) | roomwire CPU: nodes + backbone = sum | nats CPU: servers = sum | generator CPU (rw / nats) | no history: delivered/s | no history: p50 / p90 / p99 / p99.9 / max ms | no history: CPU |",
               "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for o in sorted({r["offered_deliveries_per_sec"] for r in all_rows}):
            rw, na = at(mesh.get("roomwire", []), o), at(mesh.get("nats", []), o)
            nh = at(mesh.get("roomwire-nohistory", []), o)
            nr = lambda r: fmt(in_window(r)) if r else "not run"
            md.append(f"| {o:,} | {nr(rw)} | {nr(na)} | {ratio(in_window(rw), in_window(na))} | "
                      f"{drain(rw)} / {drain(na)} | {lat(rw)} | {lat(na)} | {loss(rw)} / {loss(na)} | "
                      f"{breakdown(rw)} | {breakdown(na)} | {cores(rw, 'loadgen_cpu_cores')} / {cores(na, 'loadgen_cpu_cores')} | "
                      f"{nr(nh)} | {lat(nh) if nh else 'n/a'} | {breakdown(nh)} |")
        md.append("")

    if transports:
        md += ["## (e) WebTransport against WebSocket (roomwire only)", "",
               "One node; members connect over WebSocket or over WebTransport (QUIC, the generated "
               "certificate pinned by hash); the publisher stays on WebSocket. WebTransport members "
               "use the library client (`roomwire::client`), which decodes whole frames, so the "
               "generator works harder for them than for the WebSocket members it reads raw.", ""]
        idle_n = next((r["sessions"] for r in transports if r["scenario"] == "idle"), None)
        md += [f"| members over | idle bytes/session ({fmt(idle_n)}) | connects/s | fan-out offered/s | delivered/s | drain s | p50 / p99 / max ms | lost, out of order | server CPU |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, target in (("WebSocket", "roomwire"), ("WebTransport", "roomwire-wt")):
            idle_row = next((r for r in transports if r["scenario"] == "idle" and r["target"] == target), {})
            for f in sorted((r for r in transports if r["scenario"] == "fanout" and r["target"] == target),
                            key=lambda r: r["offered_deliveries_per_sec"]):
                md.append(f"| {name} | {fmt(idle_row.get('rss_per_session_bytes'))} | {fmt(idle_row.get('connects_per_sec'))} | "
                          f"{f['offered_deliveries_per_sec']:,} | {fmt(in_window(f))} | {drain(f)} | "
                          f"{lat(f, ('p50_ms', 'p99_ms', 'max_ms'))} | {loss(f)} | {cores(f)} |")
        md.append("")

    if failover:
        ttl = failover[0]["node_ttl_ms"]
        md += ["## (f) Failover: the owner killed", "",
               "Three roomwire nodes in two regions (two nats-servers joined by a gateway), the "
               "shipped mesh timings (heartbeat 500 ms, node TTL "
               f"{ttl:,} ms, lease 1,250 ms); the owner of five rooms is killed with SIGKILL while a "
               "publisher on another node publishes into each room every 10 ms. Per room: from the "
               "kill to the first acknowledgement in the room's new epoch (`tests/fencing.rs`, "
               "`failover_after_kill9_is_measured_and_loses_nothing`, release build; it also checks "
               "that no acknowledged message was lost).", "",
               "| run | min ms | median ms | max ms | per room, ms |",
               "|---:|---:|---:|---:|---|"]
        for r in sorted(failover, key=lambda r: r["run"]):
            md.append(f"| {r['run']} | {r['min_ms']:,} | {r['median_ms']:,} | {r['max_ms']:,} | "
                      f"{', '.join(f'{v:,}' for v in r['per_room_ms'])} |")
        everything = sorted(v for r in failover for v in r["per_room_ms"])
        md += ["", f"Over all {len(everything)} rooms: median {everything[len(everything) // 2]:,} ms, "
               f"max {everything[-1]:,} ms.", ""]

    if storms:
        md += ["## (g) Reconnect storm: every session of a killed node resumes elsewhere", "",
               "Two roomwire nodes over one nats-server with JetStream (durable rooms, the default "
               "class). Every member session is on node a, in 100 rooms; a publisher on node b sends "
               "into each room (messages per second below), retrying what is refused with the same "
               "id. After 3 s node a is killed with SIGKILL: every session reconnects to node b at "
               "once (a retry pause of up to 250 ms) and resumes its room from the last message it "
               "got (`Connect.resume`); the rooms node a owned restart in a new epoch on node b, and "
               "the resumes bridge it from the durable history. Publishing goes on for 10 s after "
               "the kill. *Back* is from the kill until a session's resume is answered (its replay "
               "done, live again); at the end every session must hold every acknowledged message of "
               "its room, in order, once.", "",
               "| sessions | rooms | msgs/s per room | published | refused (retried) | back p50 / p99 / max s | not back | replayed | resets | gaps | repeats | behind at end |",
               "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        secs = lambda v: "n/a" if v is None else f"{v:.2f}"
        for r in storms:
            md.append(f"| {r['sessions']:,} | {r['rooms']} | {r['rate_per_room']:g} | {r['published']:,} | "
                      f"{r['publish_refusals']:,} | {secs(r['back_p50_secs'])} / {secs(r['back_p99_secs'])} / "
                      f"{secs(r['back_max_secs'])} | {r['not_back']} | {r['replayed']:,} | {r['resets']} | "
                      f"{r['gaps']} | {r['repeats']} | {r['behind_at_end']} |")
        md.append("")

    if meshchat:
        md += ["## (h) Chat over two nodes: durable history on and off", "",
               "The chat load of (c) (rooms of 10 members, each member publishing 0.5 messages/s) on "
               "two roomwire nodes meshed over one nats-server with JetStream, members spread over both "
               "nodes: with the rooms **durable** (every message appended to the room's JetStream "
               "stream, and acknowledged and fanned out only once stored), then keeping **no "
               "history**. Sent/s is the rate JetStream took the appends at in the durable run. CPU is "
               "both nodes and the backbone.", "",
               "| history | rooms | sent msgs/s | delivered/s | drain s | p50 / p90 / p99 / p99.9 / max ms | lost, out of order | CPU: nodes + backbone = sum |",
               "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in meshchat:
            window = r.get("window_secs") or 1
            md.append(f"| {r['label'].removeprefix('meshchat-')} | {r['rooms']:,} | "
                      f"{r['sent'] / window:,.0f} | {fmt(in_window(r))} | {drain(r)} | {lat(r)} | {loss(r)} | "
                      f"{breakdown(r)} |")
        md.append("")

    if presence:
        md += ["## (i) Presence: one large room under churn", "",
               "One room keeping presence (no history), every session joined with `presence_events` "
               "(it gets the room's `PresenceDiff` frames), spread over a mesh of as many nodes as the "
               "sessions need (at most ~16,700 per node) on one nats-server, opened by generators of "
               "at most 16,000 sessions each. A steady window, then **1,000 joins + leaves per "
               "second** (sessions of a pool replaced by new users), then the time until the room's "
               "counts are exact again (`presence_stats`: sessions at once; users once the replaced "
               "users' leaves have waited out the grace, 2 s here, 15 s by default). Frames and bytes "
               "are what one member receives per second (the diffs are one per interval, 500 ms, at "
               "most). Up to `presence_list_max` users (1,000) a diff lists who joined and left; above "
               "it, counts only. CPU: the room's owner; and every node plus the backbone.", "",
               "| users | nodes | generators | connect s | steady frames/s, B/s per member | churn joins+leaves/s | churn frames/s, B/s per member | owner CPU | all nodes + backbone CPU | sessions exact after s | users exact after s |",
               "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for users in sorted(presence):
            gens = [r for r in presence[users] if not r.get("failed")]
            failed = [r for r in presence[users] if r.get("failed")]
            if failed:
                f = failed[0]
                md.append(f"| {users:,} | {f['nodes']} | {f['generators']} | did not complete: some "
                          "sessions never got their Join answered (see the notes below) | | | | | | | |")
                continue
            n = sum(r["sessions_here"] for r in gens)
            avg = lambda window, key: sum(r[window][key] * r["sessions_here"] for r in gens) / n
            owner_cpu = [r["owner_cpu_cores"] for r in gens if r.get("owner_cpu_cores") is not None]
            all_cpu = [r["resources"]["server_cpu_cores"] for r in gens if r["resources"].get("server_cpu_cores") is not None]
            worst = lambda key: max((r[key] for r in gens if r.get(key) is not None), default=None)
            secs = lambda v: "n/a" if v is None else f"{v:.2f}"
            md.append(f"| {users:,} | {gens[0]['nodes']} | {len(gens)} | {secs(worst('connect_secs'))} | "
                      f"{avg('steady', 'frames_per_member_per_sec'):.2f}, {avg('steady', 'bytes_per_member_per_sec'):,.0f} | "
                      f"{sum(r['churn_done_per_sec'] for r in gens):,.0f} | "
                      f"{avg('churn', 'frames_per_member_per_sec'):.2f}, {avg('churn', 'bytes_per_member_per_sec'):,.0f} | "
                      f"{secs(max(owner_cpu) if owner_cpu else None)} | {secs(max(all_cpu) if all_cpu else None)} | "
                      f"{secs(worst('sessions_exact_after_secs'))} | {secs(worst('users_exact_after_secs'))} |")
        md += ["", "For comparison, the caps the field publishes: Pusher, Soketi and sockudo allow 100 "
               "members in a presence channel; Ably 200 per channel (20,000 with server-side batching); "
               "Phoenix Presence is reported to time out around 35,000 connections per node; "
               "Centrifugo's presence is documented not to scale well for large channels.", ""]

    md += [open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "NOTES.md")).read()]
    text = "\n".join(md) + "\n"
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    repeated = sorted({h for h in headings if headings.count(h) > 1})
    if repeated:
        sys.exit(f"report.py: sections appear twice (is the narrative in NOTES.md repeated?): {repeated}")
    with open(md_path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    main(*sys.argv[1:5])
