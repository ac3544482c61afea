"""Figures and markdown tables of the paper reproduction, from ``paper_results.json``.

python -m benchmarks.paper_report benchmarks/figures   # re-render without re-running
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

METHOD_ORDER = (
    "ec", "non-linear", "sensitivity", "wanda", "magnitude", "gradient", "random",
    "fully-connected",
)  # fmt: skip
STYLE = {
    "ec": ("tab:red", "-", "o"),
    "non-linear": ("tab:purple", "--", "s"),
    "sensitivity": ("tab:orange", ":", "^"),
    "wanda": ("tab:olive", ":", "v"),
    "magnitude": ("tab:blue", "-", "D"),
    "gradient": ("tab:green", "-", "x"),
    "random": ("tab:gray", "-", "+"),
    "fully-connected": ("tab:brown", "-.", "*"),
}
STAGES = (("loss", "after pruning"), ("loss_ft", "after fine-tuning"))


def dataset_label(task: str, noise: float) -> str:
    return "digits" if task == "digits" else f"diffusion-sorption, ε = {noise:g}"


def _groups(rows: list[dict]) -> dict:
    """(task, noise, arch) -> method -> ratio -> {seed: row}."""
    groups = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for row in rows:
        key = (row["task"], row["noise"], row["arch"])
        groups[key][row["method"]][row["ratio"]][row["seed"]] = row
    return groups


def _stats(by_seed: dict, field: str) -> tuple[float, float, float, float]:
    values = np.array([row[field] for row in by_seed.values()])
    return values.mean(), values.std(), values.min(), values.max()


def _slug(task: str, noise: float, arch: str) -> str:
    return f"paper_{task}{'' if task == 'digits' else f'_eps{noise:g}'}_{arch}.png"


def plot_group(key, methods: dict, path: Path) -> None:
    """Loss vs ratio, left after pruning, right after fine-tuning: mean over seeds, band
    from the lowest to the highest seed; the unpruned model as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task, noise, arch = key
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0), sharey=True)
    for ax, (field, title) in zip(axes, STAGES):
        for method in METHOD_ORDER:
            if method not in methods:
                continue
            ratios = sorted(methods[method])
            stats = np.array([_stats(methods[method][r], field) for r in ratios])
            color, line, marker = STYLE[method]
            ax.plot(ratios, stats[:, 0], line, color=color, marker=marker, ms=4, label=method)
            ax.fill_between(ratios, stats[:, 2], stats[:, 3], color=color, alpha=0.12, lw=0)
        reference = _stats(methods["unpruned"][0.0], field)[0]
        ax.axhline(reference, color="black", lw=1, label="unpruned")  # fine-tuned on the right
        ax.set_yscale("log")
        ax.set_xlabel("pruning ratio (share of weights removed)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    loss = "cross-entropy" if task == "digits" else "MSE (clean targets)"
    axes[0].set_ylabel(f"test {loss}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle(f"{dataset_label(task, noise)}, MLP hidden {arch}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _cell(mean: float, std: float) -> str:
    return f"{mean:.3g} ± {std:.2g}"


def loss_table(methods: dict, field: str, ratios: list[float]) -> list[str]:
    """Methods as rows, ratios as columns: mean ± std over seeds; best mean in bold."""
    lines = [
        "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
        "|---" * (len(ratios) + 1) + "|",
    ]
    means = {
        m: [_stats(methods[m][r], field)[0] for r in ratios] for m in METHOD_ORDER if m in methods
    }
    best = [min(means[m][k] for m in means) for k in range(len(ratios))]
    for method, values in means.items():
        cells = []
        for k, r in enumerate(ratios):
            text = _cell(*_stats(methods[method][r], field)[:2])
            cells.append(f"**{text}**" if values[k] == best[k] else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    unpruned = _cell(*_stats(methods["unpruned"][0.0], field)[:2])
    given = ", given the same fine-tuning" if field == "loss_ft" else ""
    lines.append(f"\nUnpruned model{given}: {unpruned}.")
    return lines


def accuracy_table(methods: dict, ratios: list[float]) -> list[str]:
    lines = [
        "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
        "|---" * (len(ratios) + 1) + "|",
    ]
    for method in METHOD_ORDER:
        if method in methods:
            cells = [f"{100 * _stats(methods[method][r], 'accuracy')[0]:.1f}" for r in ratios]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append(f"\nUnpruned: {100 * _stats(methods['unpruned'][0.0], 'accuracy')[0]:.1f} %.")
    return lines


def ec_versus(methods: dict, field: str, ratios: list[float]) -> dict[str, tuple[int, int, float]]:
    """Per rival: (pairs where ec's loss is lower, pairs, geometric mean of ec / rival).

    Pairs are (ratio, seed): the same trained network pruned two ways (the fully-connected
    baseline shares the seed and the weight budget)."""
    result = {}
    for rival in METHOD_ORDER:
        if rival == "ec" or rival not in methods:
            continue
        wins, logs = 0, []
        for r in ratios:
            for seed, row in methods["ec"][r].items():
                other = methods[rival][r][seed][field]
                wins += row[field] < other
                logs.append(np.log(row[field] / other))
        result[rival] = (wins, len(logs), float(np.exp(np.mean(logs))))
    return result


def summary_table(groups: dict) -> list[str]:
    rivals = [m for m in METHOD_ORDER if m != "ec"]
    lines = [
        "| dataset | hidden | stage | " + " | ".join(rivals) + " |",
        "|---" * (len(rivals) + 3) + "|",
    ]
    for key in sorted(groups):
        methods = groups[key]
        ratios = sorted(methods["ec"])
        for field, stage in STAGES:
            versus = ec_versus(methods, field, ratios)
            cells = [
                f"{versus[m][0]}/{versus[m][1]} ({versus[m][2]:.2f}×)" if m in versus else "–"
                for m in rivals
            ]
            label = dataset_label(key[0], key[1])
            lines.append(f"| {label} | {key[2]} | {stage} | " + " | ".join(cells) + " |")
    return lines


def timing_lines(timings: list[dict]) -> list[str]:
    """Total seconds per step over all jobs (worker time, summed over the workers)."""
    totals = defaultdict(float)
    for timing in timings:
        for key, value in timing.items():
            if key != "job":
                totals[key] += value
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in totals.items() if k != "seconds")
    return [f"Worker time summed over {len(timings)} jobs: {totals['seconds']:.0f} s ({steps})."]


def write_report(results: dict, out: Path) -> None:
    groups = _groups(results["rows"])
    meta = results["meta"]
    lines = [
        f"Generated by `{meta['command'].strip()}` on {meta['machine']}, from "
        f"{meta.get('jobs', len(results['timings']))} (task, architecture, seed) jobs.",
        "",
        *timing_lines(results["timings"]),
        "",
        "### EC against each rival",
        "",
        "Cell: (ratio, seed) pairs where `ec` has the lower test loss / all pairs, and the "
        "geometric mean over the pairs of `ec`'s loss divided by the rival's (below 1: `ec` "
        "is better).",
        "",
        *summary_table(groups),
    ]
    for key in sorted(groups):
        methods = groups[key]
        ratios = sorted(methods["ec"])
        figure = _slug(*key)
        plot_group(key, methods, out / figure)
        title = f"{dataset_label(key[0], key[1])}, hidden {key[2]}"
        lines += ["", f"### {title}", "", f"![{title}](benchmarks/figures/{figure})", ""]
        for field, stage in STAGES:
            heading = f"Test loss {stage} (mean ± std over seeds):"
            lines += [heading, "", *loss_table(methods, field, ratios), ""]
        if key[0] == "digits":
            heading = "Test accuracy after pruning, % (mean over seeds):"
            lines += [heading, "", *accuracy_table(methods, ratios), ""]
    (out / "paper_tables.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/figures")
    write_report(json.loads((folder / "paper_results.json").read_text()), folder)
