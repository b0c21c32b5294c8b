"""Markdown table and PNG plots for the stream benchmarks (continual and the other protocols)."""

from pathlib import Path
from typing import Dict, List

from ..data.corruptions import CORRUPTIONS
from .continual import MethodRun, margins

__all__ = ["markdown_table", "save_plots"]

_SHORT = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul",
          "defocus_blur": "defoc", "glass_blur": "glass", "motion_blur": "motn",
          "zoom_blur": "zoom", "snow": "snow", "frost": "frost", "fog": "fog",
          "brightness": "brit", "contrast": "contr", "elastic_transform": "elast",
          "pixelate": "pixel", "jpeg_compression": "jpeg"}


_LEGEND = ("error in % of the images of each domain, predicted before each batch's update; "
           "cache: bytes autograd holds for backward when backward starts (MiB, 2^20 bytes), "
           "largest and mean over steps")
_OPTIONAL = {
    "paper MiB": ("paper_mb_mean", "%.1f", "paper MiB: the published code's convention (kept "
                  "values x 4 bytes of layer inputs), only for methods that prune"),
    "mean keep": ("mean_keep", "%.3f", "mean keep: the mean keep ratio of the trained layers "
                  "(sparse methods)"),
    "overall keep": ("overall_keep", "%.3f", "overall keep: kept / prunable values of the "
                     "trained layers (sparse methods)"),
}


def _columns(runs: List[MethodRun], meta: Dict):
    """What the table's error columns are: the windows of a short stream, the loops of ``long``
    or the domains of ``gradual`` (groups), the domains of ``mixed``."""
    first = runs[0] if runs else MethodRun("-")
    if meta.get("protocol") == "mixed":
        order = [d for d in meta.get("domains") or [] if d in first.domains]
        return "domains", order or list(first.domains)
    if first.groups:
        return "groups", list(first.groups)
    return "errors", list(first.errors) or list(meta.get("domains") or CORRUPTIONS)


def markdown_table(runs: List[MethodRun], meta: Dict) -> str:
    """Error (%) per window (or loop, or domain), mean error, the worst window against the frozen
    source model when it ran, cache MiB (measured max/mean), step s, and the sparse methods'
    columns when any method has them; a legend says what each column means."""
    kind, columns = _columns(runs, meta)
    summaries = [run.summary() for run in runs]
    margin = margins(runs)
    optional = [name for name, (key, _, _) in _OPTIONAL.items()
                if any(s[key] for s in summaries)]
    head = ["method"] + [_SHORT.get(c, c) for c in columns] + ["mean err"] + (
        ["worst vs source", "windows below source"] if margin else []) + [
        "cache MiB max", "cache MiB mean"] + optional + ["step s", "peak MiB"]
    lines = [_caption(meta), "",
             "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for run, s in zip(runs, summaries):
        values = getattr(run, kind)
        cells = [run.method] + ["%.1f" % values.get(c, float("nan")) for c in columns]
        cells += ["**%.1f**" % s["mean_error"]]
        if margin:
            own = margin.get(run.method)
            cells += ["%+.1f" % min(own.values()), "%d / %d" % (
                sum(v < 0 for v in own.values()), len(own))] if own else ["-", "-"]
        cells += ["%.1f" % s["cache_mb_max"], "%.1f" % s["cache_mb_mean"]]
        cells += [_cell(s[_OPTIONAL[name][0]], _OPTIONAL[name][1]) for name in optional]
        cells += ["%.3f" % s["step_seconds_mean"], "%.0f" % s["peak_mb"]]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [_LEGEND] + (_MARGIN_NOTE if margin else []) + [
        _OPTIONAL[name][2] for name in optional] + [
        "peak MiB: the largest step peak of the method, above what the process held when the "
        "step began (CPU: the kernel's resident high-water mark, reset per step after the heaps' "
        "free pages were handed back; CUDA: the allocator's max_memory_allocated)",
        "\"-\": not applicable"]
    return "\n".join(lines + [""] + ["- " + n for n in notes])


_MARGIN_NOTE = ["worst vs source: the smallest, over the stream's windows, of the frozen source "
                "model's error minus the method's (negative: worse than not adapting there); "
                "windows below source: how many windows are negative"]


def _caption(meta: Dict) -> str:
    severity = meta.get("severity")
    protocol = meta.get("protocol", "continual")
    extra = {"long": ", %s loops" % meta.get("loops"), "correlated": ", Dirichlet alpha %s"
             % meta.get("alpha")}.get(protocol, "")
    if meta.get("alpha") is not None and protocol != "correlated":
        extra += ", class order Dirichlet alpha %s" % meta.get("alpha")
    return ("%s protocol%s: %s at %s px, batch %s, %s, %s images per domain, %s, seed %s%s" % (
        protocol, extra, meta.get("model") or meta.get("arch"), meta.get("input_size", 32),
        meta.get("batch_size"), "severity %s" % severity if severity else "one severity per file",
        meta.get("images_per_corruption"), meta.get("device"), meta.get("seed"),
        "" if meta.get("shuffle", True) else ", folder order"))


def _cell(value, fmt: str) -> str:
    return "-" if value in (None, 0) else fmt % value


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
    ax.set_xlabel("measured activation cache, MiB (mean per step, log)")
    ax.set_ylabel("mean error over the domains, %")
    ax.set_title("Continual adaptation: error against cache")
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
    ax.set_xlabel("batch along the stream (domains in order)")
    ax.set_ylabel("batch error, % (moving mean)")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(True, alpha=0.3)
    second = out_dir / "error_along_stream.png"
    fig.tight_layout()
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]
