"""The figures of bench/scale.py: which number each is, the Markdown table with issue 21's goals,
the warnings, and one PNG per figure against the number of sockets (matplotlib)."""
from __future__ import annotations

from pathlib import Path

from harness import REFERENCES, TITLES, fmt

# key: (label, unit, better, goal against the better reference, where it is in a run's phases)
FIGURES: dict[str, tuple[str, str, str | None, float | None, tuple[str, str]]] = {
    "rss_per_socket_kb": ("memory per idle socket", "KB", "lower", 0.7,
                          ("connect", "rssPerSocketKb")),
    "connect_s": ("connect time", "s", "lower", 1.0, ("connect", "connectS")),
    "connect_cpu_ms": ("server CPU per connect", "ms", "lower", None,
                       ("connect", "cpuMsPerConnect")),
    "drop_cpu_s": ("server CPU, every client dropping at once", "s", "lower", 1.0,
                   ("drop", "cpuS")),
    "drop_cpu_ms": ("server CPU per dropped socket", "ms", "lower", None,
                    ("drop", "cpuMsPerSocket")),
    "sigterm_exit_s": ("SIGTERM to exit, all connected", "s", "lower", None, ("sigterm", "exitS")),
    "churn_p99_ms": ("event latency p99 under churn", "ms", "lower", 1.5, ("churn", "p99Ms")),
    "churn_p50_ms": ("event latency p50 under churn", "ms", "lower", None, ("churn", "p50Ms")),
    "churn_max_ms": ("event latency max under churn", "ms", "lower", None, ("churn", "maxMs")),
    "churn_p99_publish_ms": ("  p99 from the server's emit (its loop's lag left out)", "ms",
                             "lower", None, ("churn", "p99FromPublishMs")),
    "churn_per_s": ("churn achieved, reconnects/s", "/s", "higher", None, ("churn", "churnPerS")),
    "churn_target_per_s": ("churn asked for (10% of the others a second)", "/s", None, None,
                           ("churn", "churnTargetPerS")),
    "churn_server_cpu_pct": ("server CPU during churn", "%", None, None,
                             ("churn", "serverCpuPct")),
    "churn_load_cpu_pct": ("load CPU during churn", "%", None, None, ("churn", "loadCpuPct")),
    "connect_load_cpu_pct": ("load CPU while connecting", "%", None, None,
                             ("connect", "loadCpuPct")),
    "idle_rss_mb": ("server memory at start", "MB", "lower", None, ("connect", "rssBeforeKb")),
}
KEYS = tuple(FIGURES)
# per-socket costs that must stay flat: largest size / smallest size, issue 21's bound
FLAT = (("rss_per_socket_kb", 1.2), ("connect_cpu_ms", 1.2), ("drop_cpu_ms", 1.2))
NOT_PLOTTED = ("churn_target_per_s", "idle_rss_mb", "churn_p99_publish_ms")


def figure(key: str, run: dict) -> float | None:
    phase, name = FIGURES[key][4]
    value = run.get(phase, {}).get(name)
    if key == "idle_rss_mb" and value is not None:
        value /= 1024
    return value


def _better_reference(values: list[float | None], better: str | None) -> float | None:
    present = [v for v in values if isinstance(v, (int, float)) and v > 0]
    if not present:
        return None
    return max(present) if better == "higher" else min(present)


def table(figures: dict, sizes: list[int], servers: list[str]) -> tuple[str, list[dict]]:
    """The medians per figure and size, ratios Droid / each reference, the goals judged against
    the better reference; then the flatness of Droid's per-socket costs."""
    refs = [r for r in REFERENCES if r in servers]
    shown = (["droid"] if "droid" in servers else []) + refs
    head = ["figure", "sockets"] + [TITLES[s] for s in shown] + \
        ([f"Droid / {TITLES[r]}" for r in refs] if "droid" in servers else []) + ["goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    for key, (label, unit, better, goal, _) in FIGURES.items():
        for n in sizes:
            values = {s: figures[s][str(n)].get(key) for s in shown}
            if all(v is None for v in values.values()):
                continue
            d = values.get("droid")
            ratios = {r: (d / values[r] if isinstance(d, (int, float)) and values[r] else None)
                      for r in refs} if "droid" in servers else {}
            verdict = ""
            best = _better_reference([values[r] for r in refs], better)
            if goal is not None and isinstance(d, (int, float)) and best:
                ratio = d / best
                met = ratio >= goal if better == "higher" else ratio <= goal
                verdict = (f"{'>=' if better == 'higher' else '<='} {goal:.1f}x the better: "
                           f"{ratio:.2f}x {'met' if met else 'NOT met'}")
            note = {"higher": ", higher is better"}.get(better or "", "")
            cells = [f"{label} ({unit}{note})", f"{n:,}", *(fmt(values[s]) for s in shown),
                     *(f"{x:.2f}x" if x is not None else "-" for x in ratios.values()), verdict]
            lines.append("| " + " | ".join(cells) + " |")
            rows.append({"key": key, "label": label, "unit": unit, "sockets": n, **values,
                         "ratios": ratios, "goal": goal, "verdict": verdict})
    if len(sizes) >= 2:
        lo, hi = min(sizes), max(sizes)
        for key, bound in FLAT:
            label, unit = FIGURES[key][0], FIGURES[key][1]
            growth = {}
            for s in shown:
                a, b = figures[s][str(lo)].get(key), figures[s][str(hi)].get(key)
                growth[s] = b / a if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
                    and a > 0 else None
            d = growth.get("droid")
            verdict = "" if d is None else \
                f"Droid <= {bound:.1f}x: {'met' if d <= bound else 'NOT met'}"
            cells = [f"{label}: at {hi:,} / at {lo:,}", "", *(
                f"{growth[s]:.2f}x" if growth[s] is not None else "-" for s in shown),
                *([""] * (len(refs) if "droid" in servers else 0)), verdict]
            lines.append("| " + " | ".join(cells) + " |")
            rows.append({"key": f"{key}_growth", "label": f"{label}: {hi} / {lo}", **growth,
                         "goal": bound, "verdict": verdict})
    return "\n".join(lines), rows


def warnings(raw: dict, noise_pct: float) -> list[str]:
    out = []
    for kind, by_size in raw.items():
        for n, runs in by_size.items():
            for i, run in enumerate(runs, 1):
                where = f"{kind} {int(n):,} sockets (run {i})"
                noisy = []
                for phase in ("connect", "churn", "drop"):
                    r = run.get(phase, {})
                    other, server = r.get("otherOnServerCpuPct", 0), r.get("serverCpuPct", 0)
                    # others displaced the server only if its core was full
                    if other > noise_pct and other + server >= 95:
                        noisy.append(f"{phase} ({other:.0f}%)")
                    if r.get("loadCpuPct", 0) > 90:
                        out.append(f"{where}: the load used {r['loadCpuPct']:.0f}% of its core "
                                   f"during {phase}: it may be the limit")
                if noisy:
                    out.append(f"{where}: other processes shared the server's full core during "
                               + ", ".join(noisy) + ": those figures are noisy")
                c = run.get("churn", {})
                if c.get("lost"):
                    out.append(f"{where}: {c['lost']} events did not reach the steady sockets")
                if c.get("churnFailed"):
                    out.append(f"{where}: {c['churnFailed']} churn reconnects failed")
                s = run.get("sigterm", {})
                if s.get("timedOut"):
                    out.append(f"{where}: still running {s['timeoutS']} s after SIGTERM (killed)")
                elif s and s.get("exitCode") not in (0, None):
                    out.append(f"{where}: exit code {s['exitCode']} after SIGTERM")
    return out


def plots(figures: dict, sizes: list[int], servers: list[str], folder: Path,
          caption: str) -> list[str]:
    """One PNG per figure: the figure against the number of sockets, a line per server."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is missing (pip install -e '.[bench]'): no plots")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    styles = {"droid": ("tab:blue", "o"), "reference": ("tab:orange", "s"),
              "native": ("tab:green", "^")}
    for key, (label, unit, better, goal, _) in FIGURES.items():
        if key in NOT_PLOTTED:
            continue
        series = {s: [figures[s][str(n)].get(key) for n in sizes] for s in servers}
        if all(v is None for vs in series.values() for v in vs):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for s, values in series.items():
            points = [(n, v) for n, v in zip(sizes, values) if v is not None]
            if points:
                color, marker = styles[s]
                ax.plot([x for x, _ in points], [y for _, y in points], marker=marker,
                        color=color, label=TITLES[s])
        if key == "churn_per_s":
            target = [figures[servers[0]][str(n)].get("churn_target_per_s") for n in sizes]
            points = [(n, v) for n, v in zip(sizes, target) if v is not None]
            ax.plot([x for x, _ in points], [y for _, y in points], linestyle=":",
                    color="grey", label="asked for (10%/s)")
        ax.set_xlabel("sockets connected")
        ax.set_ylabel(unit)
        values = [v for vs in series.values() for v in vs if isinstance(v, (int, float)) and v > 0]
        # servers that differ a hundredfold: a linear axis would flatten the lower ones to zero
        log_scale = len(values) > 1 and max(values) / min(values) > 50
        ax.set_title(label + (" (higher is better)" if better == "higher" else "")
                     + (", log scale" if log_scale else ""))
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{n:,}" for n in sizes])
        if log_scale:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.text(0.01, 0.005, caption[:150], fontsize=5, color="grey")
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        path = folder / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        made.append(str(path))
    return made


__all__ = ["FIGURES", "KEYS", "figure", "table", "warnings", "plots"]

