"""report.md and the plot of ``python -m torchprune compress``: quality and speed against sparsity.

The rows come from the command (one per sparsity); this module only formats them. Every number is
printed as measured; a column that was not measured (no recovery asked for, a shape not timed) shows
"-".
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from ..analysis.machine import describe
from ..analysis.report import markdown_table, pyplot, save_figure

__all__ = ["write_report", "plot", "spread"]


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _sci(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def _quality_rows(rows: Sequence[dict]) -> List[list]:
    table = []
    for row in rows:
        one, rec = row["oneshot"], row.get("recovered") or {}
        table.append([f"{row['sparsity']:.0%}", f"{row['achieved_sparsity']:.3f}", _fmt(one["cosine"]),
                      _fmt(rec.get("cosine")), _fmt(one.get("nn_agreement"), 3), _fmt(rec.get("nn_agreement"), 3),
                      _fmt(one.get("token_cosine")), _fmt(rec.get("token_cosine")),
                      "-" if row.get("recover_s") is None else f"{row['recover_s'] / 60:.1f}"])
    return table


def spread(speedups: Sequence[float]) -> str:
    """`` (rounds 2.09-2.19x)`` for several rounds' speedups; empty for one round or none."""
    if len(speedups) < 2:
        return ""
    return f" (rounds {min(speedups):.2f}-{max(speedups):.2f}x)"


def _speed_rows(rows: Sequence[dict], shapes: Sequence[str]) -> List[list]:
    table = []
    for row in rows:
        for shape in shapes:
            timing = row["latency"].get(shape)
            if timing is None:
                continue
            table.append([f"{row['sparsity']:.0%}", shape, f"{timing['dense_ms']:.2f}", f"{timing['sparse_ms']:.2f}",
                          f"{timing['speedup']:.2f}x{spread(timing.get('speedups', []))}",
                          f"{timing['swapped']}/{timing['layers']}",
                          f"{timing['max_abs_diff']:.1e}"])
    return table


def write_report(path: str, info: dict, settings: Dict[str, object], rows: Sequence[dict], shapes: Sequence[str],
                 plot_path: Optional[str]) -> str:
    """Writes report.md at ``path``: settings, the quality table, the speed table, the plot, reload notes."""
    lines = [f"# Compressing {settings['model']}", "",
             f"Machine: {describe(info)}; fp32.", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", "## Quality against the dense model, on held-out inputs", "",
              "cosine: mean cosine of the dense and pruned embeddings (mean-pooled last hidden states for text); "
              "NN: nearest-neighbour agreement; token cosine: last hidden states, token by token.", "",
              markdown_table(["sparsity", "achieved", "one-shot cosine", "recovered cosine", "one-shot NN",
                              "recovered NN", "one-shot token cosine", "recovered token cosine", "recovery min"],
                             _quality_rows(rows), align="rrrrrrrrr")]
    starts = [row for row in rows if row.get("start")]
    if starts:
        lines += ["", "Pruned gradually: recovery started from a lighter one-shot pruning and raised the sparsity "
                      "itself; the one-shot column is the one-shot pruning at the full sparsity, for comparison. "
                      "Where recovery started: "
                  + "; ".join(f"{row['sparsity']:.0%} from {row['start']['sparsity']:.1%} (cosine "
                              f"{row['start']['cosine']:.4f})" for row in starts) + "."]
    lines += ["", "## Speed: dense against sparsified, interleaved medians", "",
              "dense and sparse ms: medians over the rounds; speedup: the median round's, with the lowest and "
              "highest round's (each round times the two models interleaved); "
              "swapped: layers tp.sparsify stored sparse (it keeps a layer dense where its timing says dense is "
              "faster); max diff: largest |sparse - masked| output difference.", "",
              markdown_table(["sparsity", "batch x tokens", "dense ms", "sparse ms", "speedup", "swapped",
                              "max diff"], _speed_rows(rows, shapes), align="rlrrrrr")]
    lines += [f"\n{row['sparsity']:.0%} was timed in the command's process: the fresh process failed "
              f"({row['fresh_process_error']})." for row in rows if row.get("fresh_process_error")]
    if plot_path:
        lines += ["", f"![quality and speed against sparsity]({os.path.basename(plot_path)})"]
    lines += ["", "## Reloading", ""]
    for row in rows:
        saved = row["saved"]
        lines.append(f"- {row['sparsity']:.0%}: `{os.path.relpath(saved['tp'], os.path.dirname(path))}` "
                     f"(tp.load into a fresh dense copy: max output difference {row['reload_max_diff']:.1e})"
                     + (f"; `{os.path.relpath(saved['huggingface'], os.path.dirname(path))}` (from_pretrained, "
                        f"pruned weights stored as zeros: max output difference "
                        f"{_sci(row.get('reload_huggingface_max_diff'))})" if "huggingface" in saved else ""))
    lines += ["", "```python", "import torchprune as tp",
              'model = tp.load("sXX/model.pt", dense_model)   # into a fresh copy of the dense model',
              "fast = tp.sparsify(model, example_inputs=(input_ids, attention_mask))", "```", ""]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))
    return path


def plot(path: str, rows: Sequence[dict], shapes: Sequence[str], title: str) -> Optional[str]:
    """Quality (one-shot and recovered cosine) and speedup against sparsity; None without matplotlib."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [100 * row["sparsity"] for row in rows]
    left.plot(xs, [row["oneshot"]["cosine"] for row in rows], "o-", label="one-shot")
    if any(row.get("recovered") for row in rows):
        points = [(100 * r["sparsity"], r["recovered"]["cosine"]) for r in rows if r.get("recovered")]
        left.plot(*zip(*points), "s-", label="recovered")
    left.set_ylabel("embedding cosine to dense")
    for shape in shapes:
        points = [(100 * r["sparsity"], r["latency"][shape]["speedup"]) for r in rows if shape in r["latency"]]
        if points:
            right.plot(*zip(*points), "o-", label=shape)
    right.axhline(1.0, color="gray", linestyle="--")
    right.set_ylabel("speedup over dense")
    for ax in (left, right):
        ax.set_xlabel("sparsity (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, path)
