"""Markdown table and PNG plots for the continual benchmark."""

from pathlib import Path
from typing import Dict, List

from ..data.corruptions import CORRUPTIONS
from .continual import MethodRun

__all__ = ["markdown_table", "save_plots"]

_SHORT = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul",
          "defocus_blur": "defoc", "glass_blur": "glass", "motion_blur": "motn",
          "zoom_blur": "zoom", "snow": "snow", "frost": "frost", "fog": "fog",
          "brightness": "brit", "contrast": "contr", "elastic_transform": "elast",
          "pixelate": "pixel", "jpeg_compression": "jpeg"}


def markdown_table(runs: List[MethodRun], meta: Dict) -> str:
    """Per-corruption error (%), mean error, cache MB (measured max/mean, paper mean), step s."""
    head = ["method"] + [_SHORT[c] for c in CORRUPTIONS] + [
        "mean err", "cache MB max", "cache MB mean", "paper MB", "mean keep", "overall keep",
        "step s", "peak MB"]
    lines = ["%s, batch %s, severity %s, %s images per corruption, %s, seed %s" % (
        meta.get("arch"), meta.get("batch_size"), meta.get("severity"),
        meta.get("images_per_corruption"), meta.get("device"), meta.get("seed")), "",
        "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for run in runs:
        s = run.summary()
        cells = [run.method] + ["%.1f" % run.errors.get(c, float("nan")) for c in CORRUPTIONS]
        cells += ["**%.1f**" % s["mean_error"], "%.1f" % s["cache_mb_max"],
                  "%.1f" % s["cache_mb_mean"], "%.1f" % s["paper_mb_mean"],
                  _ratio(s["mean_keep"]), _ratio(s["overall_keep"]),
                  "%.3f" % s["step_seconds_mean"], "%.0f" % s["peak_mb"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(value) -> str:
    return "-" if value is None else "%.3f" % value


def save_plots(runs: List[MethodRun], out_dir: Path) -> List[Path]:
    """Error against measured cache (the paper's Figure 1) and error along the stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        s = run.summary()
        ax.scatter(max(s["cache_mb_mean"], 0.01), s["mean_error"], s=40)
        ax.annotate(run.method, (max(s["cache_mb_mean"], 0.01), s["mean_error"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("measured activation cache, MB (mean per step, log)")
    ax.set_ylabel("mean error over 15 corruptions, %")
    ax.set_title("Continual CIFAR-10-C: error against cache")
    ax.grid(True, alpha=0.3)
    first = out_dir / "error_vs_cache.png"
    fig.tight_layout()
    fig.savefig(first, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for run in runs:
        window = max(1, len(run.batch_errors) // 75)
        smooth = [sum(run.batch_errors[max(0, i - window + 1):i + 1]) / min(window, i + 1)
                  for i in range(len(run.batch_errors))]
        ax.plot(smooth, label=run.method, linewidth=1)
    ax.set_xlabel("batch along the stream (corruptions in the fixed order)")
    ax.set_ylabel("batch error, % (moving mean)")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(True, alpha=0.3)
    second = out_dir / "error_along_stream.png"
    fig.tight_layout()
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]
