"""Render benchmark JSON into Markdown tables, a PNG, and the README's performance section.

Reads, from one folder: pytest-benchmark files ``*_cpu.json`` (each benchmark's median and its
``extra_info``) and the GPU scripts' ``gpu_*.json`` (``{"machine": ..., "rows": [...]}``).
Loss benchmarks carry ``extra_info`` keys ``loss``, ``mode`` (``fwd`` / ``fwd+bwd``), ``impl``,
``n``, ``c``, ``d``; those feed the plot (time vs C per implementation, and speed-up bars of the
fastest package backend against each baseline).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

BEGIN, END = "<!-- performance:begin -->", "<!-- performance:end -->"
#: Implementations that are this package's own code paths (the rest are baselines).
OURS = ("cpu", "cuda", "triton", "torch backend", "KNNScorer", "one pass", "ours")
GPU_KEYS = ("op", "loss", "pass", "impl", "backend", "config", "n", "c", "d", "N", "C", "D",
            "rows", "k", "status", "ms", "median_ms", "fwd_ms", "fwd_bwd_ms", "fwd_graph_ms",
            "fwd_bwd_graph_ms",
            "speedup", "fwd_bwd_floor_fraction", "fraction_of_floor", "bandwidth_fraction",
            "tflops", "peak_extra_MiB_fwd_bwd", "host_us_fwd", "host_us_fwd_bwd", "launch_us",
            "step_ms", "vs_cross_entropy")


def _cell(value, width: int = 60) -> str:
    """A Markdown table cell: floats to 4 digits; text on one line, pipes escaped, at most
    ``width`` characters (error messages are kept whole in the JSON)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = "" if value is None else " ".join(str(value).split())
    if len(text) > width:
        text = text[: width - 3] + "..."
    return text.replace("|", "\\|")


def _label(bench: dict) -> str:
    info = bench.get("extra_info", {})
    return str(info.get("impl") or info.get("backend") or bench["name"].removeprefix("test_"))


def _machine(payload: dict) -> str:
    info = payload.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw") or info.get("processor") or "CPU"
    return (f"{cpu}, {info.get('threads', '?')} threads, torch {info.get('torch', '?')}, "
            f"commit {info.get('commit', '?')}, {payload.get('datetime', '')[:10]}, "
            f"sizes: {info.get('size_mode', '?')}")


def cpu_tables(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.glob("*_cpu.json")):
        payload = json.loads(path.read_text())
        benches = payload.get("benchmarks", [])
        if not benches:
            continue
        lines += [f"#### {path.stem} ({_machine(payload)})", ""]
        groups: dict[str, list[dict]] = {}
        for bench in benches:
            groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
        lines += ["| group | implementation | median (ms) | vs fastest |", "|---|---|---|---|"]
        for group, members in groups.items():
            members.sort(key=lambda b: b["stats"]["median"])
            fastest = members[0]["stats"]["median"]
            for bench in members:
                median = bench["stats"]["median"]
                lines.append(f"| {group} | {_label(bench)} | {1e3 * median:.4g} | "
                             f"{median / fastest:.2f}x |")
        lines.append("")
    return lines


def gpu_tables(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.glob("gpu_*.json")):
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            lines.append(f"{path.name}: unreadable ({error})")
            continue
        rows = [r for r in payload.get("rows", []) if isinstance(r, dict)]
        if not rows:
            continue
        keys = [k for k in GPU_KEYS if any(k in row for row in rows)]
        keys += [k for k in rows[0] if k not in keys and "fraction" in k]
        keys = keys[:13]
        machine = payload.get("machine") or payload
        card = machine.get("gpu") or machine.get("device_name") or machine.get("card") or "GPU"
        stamp = ", ".join(str(machine[k]) for k in ("date", "commit") if machine.get(k))
        if machine.get("extension"):  # a run without the usual build says what that changed
            stamp += f"; extension {machine['extension']}"
        lines += [f"#### {path.stem} ({card}, torch {machine.get('torch', '?')}"
                  f"{', ' + stamp if stamp else ''})", ""]
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]
        for name, value in (payload.get("summary") or {}).items():
            lines.append(f"- {name}: {_cell(value)}")
        lines.append("")
    return lines


def _loss_points(folder: Path) -> list[dict]:
    points = []
    for path in sorted(folder.glob("*_cpu.json")):
        for bench in json.loads(path.read_text()).get("benchmarks", []):
            info = bench.get("extra_info", {})
            info = {**info, "pass": info.get("pass", info.get("mode"))}
            if {"loss", "pass", "impl", "c"} <= set(info):
                points.append({**info, "median": bench["stats"]["median"]})
    return points


def plot(folder: Path, path: Path) -> bool:
    """Time vs C (log-log) per implementation, and speed-up bars; False if no loss data."""
    points = [p for p in _loss_points(folder) if p["pass"] in ("fwd+bwd", "fwd_bwd")]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({p["loss"] for p in points})
    fig, axes = plt.subplots(2, len(losses), figsize=(6.5 * len(losses), 9), squeeze=False,
                             constrained_layout=True)
    for column, loss in enumerate(losses):
        mine = [p for p in points if p["loss"] == loss]
        axis = axes[0, column]
        for impl in sorted({p["impl"] for p in mine}):
            # One point per C: the smallest D, then the largest N, among the sizes with that C.
            by_class: dict[int, dict] = {}
            for point in (p for p in mine if p["impl"] == impl):
                best = by_class.get(point["c"])
                rank = (-point.get("d", 0), point["n"])
                if best is None or rank > (-best.get("d", 0), best["n"]):
                    by_class[point["c"]] = point
            series = [by_class[c] for c in sorted(by_class)]
            axis.plot([p["c"] for p in series], [1e3 * p["median"] for p in series], "o-",
                      label=impl)
        axis.set(xscale="log", yscale="log", xlabel="classes C (per C: smallest D, largest N)",
                 ylabel="fwd+bwd median (ms)",
                 title=f"{loss}: time vs C (CPU)")
        axis.legend(fontsize=8)
        axis = axes[1, column]
        sizes = sorted({(p["n"], p["c"], p.get("d", 0)) for p in mine}, key=lambda s: (s[1], s[0]))
        baselines = sorted({p["impl"] for p in mine if not any(o in p["impl"] for o in OURS)})
        width = 0.8 / max(1, len(baselines))
        for index, baseline in enumerate(baselines):
            ratios = []
            for size in sizes:
                here = [p for p in mine if (p["n"], p["c"], p.get("d", 0)) == size]
                ours = [p["median"] for p in here if any(o in p["impl"] for o in OURS)]
                base = [p["median"] for p in here if p["impl"] == baseline]
                ratios.append(base[0] / min(ours) if ours and base else 0.0)
            axis.bar([i + index * width for i in range(len(sizes))], ratios, width,
                     label=baseline)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks([i + width * (len(baselines) - 1) / 2 for i in range(len(sizes))],
                        [f"N={n}\nC={c}\nD={d}" for n, c, d in sizes], fontsize=7)
        axis.set(yscale="log", ylabel="speed-up of fastest package backend",
                 title=f"{loss}: speed-up against each baseline (>1 = we are faster)")
        axis.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(folder: Path, readme: Path | None = None) -> list[Path]:
    """Write ``performance.md`` (+ ``performance.png``) into ``folder``; update the README."""
    folder = Path(folder)
    lines = ["### CPU", ""] + (cpu_tables(folder) or ["(no CPU results)", ""])
    lines += ["### GPU", ""] + (gpu_tables(folder) or ["(no GPU results)", ""])
    written = []
    png = folder / "performance.png"
    if plot(folder, png):
        lines = [f"![performance]({png.relative_to(folder.parent.parent) if readme else png})",
                 ""] + lines
        written.append(png)
    text = "\n".join(lines)
    markdown = folder / "performance.md"
    markdown.write_text(text + "\n")
    written.append(markdown)
    if readme is not None and readme.exists():
        content = readme.read_text()
        section = f"{BEGIN}\n{text}\n{END}"
        if BEGIN in content and END in content:
            content = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section,
                             content, flags=re.S)
        else:
            content = content.rstrip() + "\n\n## Performance (generated)\n\n" + section + "\n"
        readme.write_text(content)
        written.append(readme)
    return written
