"""Turn benchmark records into a terminal table, results.json, results.csv and PNG plots."""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import os.path as osp
import tempfile
from typing import Any, Callable, Dict, List, Optional

# flat columns of results.csv (and the order of the JSON record's headline fields)
CSV_FIELDS = (
    "config", "config_kind", "config_quant_short", "config_adjacency", "dataset", "model", "device",
    "peak_step_bytes", "peak_step_mib", "peak_ratio_fp32", "peak_method",
    "activation_bytes", "activation_mib", "bytes_per_node", "memory_ratio_fp32", "activation_source",
    "track_saved_bytes", "alloc_delta_bytes", "alloc_delta_method",
    "epoch_time_median_s", "time_ratio_fp32", "time_reference", "time_ratio_ref_min", "time_ratio_ref_median",
    "epoch_cpu_median_s", "cpu_ratio_ref_min", "cpu_ratio_ref_median", "load_avg_rounds",
    "metric", "val_mean", "val_std", "test_mean", "test_std", "epochs_to_fp32_best_ratio", "reached_fp32_best",
    "grad_rel_error",
    "epochs", "seeds", "status", "detail",
)


def _fmt(v: Optional[float], spec: str, missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, spec)


def format_table(records: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """A fixed-width summary table with a header saying what each column measured."""
    metric = meta.get("metric", "acc")
    scale = 100.0 if metric == "acc" else 1.0
    mfmt = ".2f" if metric == "acc" else ".4f"
    ref = next((r.get("time_reference") for r in records if r.get("time_reference")), None)
    x_ref = f"x {ref}" if ref else "x fp32"
    head = ["config", "peak MiB", "x fp32", "act MiB", "B/node", "x fp32", "step ms", f"{x_ref} min/med",
            f"CPU {x_ref} min/med", f"val {metric}", f"test {metric}", "to fp32 best", "grad err"]
    rows = []
    unfit = []
    for r in records:
        if r.get("status"):  # stopped by --memory-limit-gib
            unfit.append(f"{r['config']}: {r.get('detail', r['status'])}")
            continue
        rows.append([
            r["config"] + ("" if not r.get("config_quant_short") else f" ({r['config_quant_short']})"),
            _fmt(r["peak_step_mib"], ".1f"),
            _fmt(r.get("peak_ratio_fp32"), ".3f"),
            _fmt(r["activation_mib"], ".2f"),
            _fmt(r["bytes_per_node"], ".1f"),
            _fmt(r.get("memory_ratio_fp32"), ".3f"),
            _fmt(r["epoch_time_median_s"] * 1e3, ".1f"),
            _ratio_pair(r, "time") if ref else _fmt(r.get("time_ratio_fp32"), ".2f"),
            _ratio_pair(r, "cpu"),
            f"{_fmt(r['val_mean'] * scale, mfmt)} ± {_fmt(r['val_std'] * scale, mfmt)}",
            f"{_fmt(r['test_mean'] * scale, mfmt)} ± {_fmt(r['test_std'] * scale, mfmt)}",
            _convergence(r),
            _fmt(r["grad_rel_error"], ".2e"),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    ds = meta.get("dataset", {})
    first = next((r for r in records if not r.get("status")), {})
    out = [
        f"{ds.get('name', '?')}: {ds.get('num_nodes', '?')} nodes, {ds.get('num_edges', '?')} directed edges, "
        f"{ds.get('num_features', '?')} features | model {meta.get('model')} {meta.get('layers')}x{meta.get('hidden')}"
        f" | {meta.get('epochs')} epochs x seeds {meta.get('seeds')} | device {meta.get('device')}",
        line(head),
        line(["-" * w for w in widths]),
    ]
    out += [line(row) for row in rows]
    out += unfit
    loads = next((r.get("load_avg_rounds") for r in records if r.get("load_avg_rounds")), None)
    if ref:
        out.append(f"step = median training step (forward, loss, backward, optimizer; the first epoch of each seed is "
                   f"a warm-up), wall time; the configurations trained in interleaved rounds and the ratios are "
                   f"to {ref}'s step of the same round (min / median over the rounds), of wall time and of process "
                   f"CPU time" + (f"; load average {loads[0]:.1f}-{loads[1]:.1f} during the rounds" if loads else ""))
    rss = [f"{r['config']} {r['peak_rss_bytes'] / 2 ** 30:.2f} GiB" for r in records if r.get("peak_rss_bytes")]
    if rss:
        out.append("process peak RSS while each config ran (data, graph caches and libraries included): "
                   + ", ".join(rss))
    out.append(
        f"peak = highest memory of one forward+loss+backward above the memory in use at its start "
        f"({first.get('peak_method', '?')}); act = bytes held for backward after forward (excl. data/model/output; "
        f"source: {first.get('activation_source', '?')}); fp32-sparse = plain PyG given a torch.sparse CSR adj_t; "
        f"{metric} = best-validation epoch, mean ± std over seeds (x100 for acc); "
        f"to fp32 best = epochs to reach fp32's best validation {metric} of the same seed, as a ratio to fp32's "
        f"epochs (median over seeds), and in how many seeds it was reached; "
        f"grad err = relative L2 error of one draw of the first step's weight gradients vs fp32 (same weights, "
        f"dropout off): zero-mean noise, since the compressed gradient is unbiased, which averages out over "
        f"training steps (the mean of K draws has 1/sqrt(K) of it: bench/grad_error_draws.py); a random "
        f"projection (rp8: exact, iexact) adds most of it, hence values above 1."

    )
    return "\n".join(out)


def _convergence(r: Dict[str, Any]) -> str:
    reached = r.get("reached_fp32_best")
    if not reached:
        return "-"
    ratio = r.get("epochs_to_fp32_best_ratio")
    return f"{'-' if ratio is None else format(ratio, '.2f') + 'x'} ({reached[0]}/{reached[1]})"


def _ratio_pair(r: Dict[str, Any], tag: str) -> str:
    lo, med = r.get(f"{tag}_ratio_ref_min"), r.get(f"{tag}_ratio_ref_median")
    return "-" if lo is None else f"{lo:.2f}/{med:.2f}"


def _csv_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return " ".join(str(a) for a in v)
    return "" if v is None else v


def _replace_atomically(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in its folder, then rename it over ``path``: whoever reads
    it, and a run killed while writing, sees the previous file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{osp.basename(path)}.", suffix=".tmp", dir=osp.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_results(out_dir: str, records: List[Dict[str, Any]], meta: Dict[str, Any], plots: bool = True) -> List[str]:
    """Write results.json, results.csv and the plots into ``out_dir``; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    full = []
    for r in records:
        rec = {k: r.get(k) for k in CSV_FIELDS if k in r}
        rec.update({k: v for k, v in r.items() if k not in rec})
        rec["dataset"] = meta["dataset"]["name"]
        for k in ("model", "device", "versions", "command", "metric", "epochs", "hidden", "layers", "lr"):
            rec[k] = meta.get(k)
        full.append(rec)
    paths = []
    jpath = osp.join(out_dir, "results.json")
    _replace_atomically(jpath, lambda f: json.dump({"meta": meta, "records": full}, f, indent=1, default=str))
    paths.append(jpath)

    def write_csv(f):
        w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        w.writeheader()
        for r in full:
            row = {k: _csv_value(r.get(k)) for k in CSV_FIELDS}
            row["dataset"] = meta["dataset"]["name"]
            w.writerow(row)

    cpath = osp.join(out_dir, "results.csv")
    _replace_atomically(cpath, write_csv)
    paths.append(cpath)
    if plots:
        paths += write_plots(out_dir, records, meta)
    return paths


def write_plots(out_dir: str, records: List[Dict[str, Any]], meta: Dict[str, Any]) -> List[str]:
    from .._optional import require

    require("matplotlib", "bench's plots (--out)").use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = [r for r in records if not r.get("status")]  # rows stopped by --memory-limit-gib have no figures
    metric = meta.get("metric", "acc")
    title = f"{meta['dataset']['name']} / {meta['model']} / {meta['device']}"
    paths = []

    # accuracy vs activation memory
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in records:
        ax.errorbar(r["activation_mib"], r["test_mean"], yerr=r["test_std"], fmt="o", capsize=4, label=r["config"])
        ax.annotate(r["config"], (r["activation_mib"], r["test_mean"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    if all(r["activation_mib"] > 0 for r in records):
        ax.set_xscale("log")
    ax.set_xlabel("activation memory (MiB, log scale)")
    ax.set_ylabel(f"test {metric} (at best validation)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    p = osp.join(out_dir, "accuracy_vs_memory.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    # per-layer memory breakdown (stacked bars, one per configuration)
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    modules: List[str] = []
    for r in records:
        for k in r.get("per_module") or {}:
            if k not in modules:
                modules.append(k)
    x = list(range(len(records)))
    if modules:
        bottom = [0.0] * len(records)
        cmap = plt.get_cmap("tab20")
        for i, m in enumerate(modules):
            vals = [(r.get("per_module") or {}).get(m, 0) / 2 ** 20 for r in records]
            ax.bar(x, vals, bottom=bottom, label=m or "(root)", color=cmap(i % 20))
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.legend(fontsize=6, ncol=2, loc="upper right")
    else:
        ax.bar(x, [r["activation_mib"] for r in records], color="grey")
        ax.text(0.5, 0.95, "per-module accounting unavailable (blockquant.track_saved missing)",
                transform=ax.transAxes, ha="center", va="top", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([r["config"] for r in records], rotation=20, fontsize=8)
    ax.set_ylabel("activation memory (MiB)")
    ax.set_title(f"per-module activation memory - {title}", fontsize=9)
    fig.tight_layout()
    p = osp.join(out_dir, "memory_per_module.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    # training curves
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in records:
        a1.plot(r["curve_loss_mean"], label=r["config"])
        a2.plot(r["curve_val_mean"], label=r["config"])
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss (mean over seeds)")
    a2.set_xlabel("epoch")
    a2.set_ylabel(f"validation {metric} (mean over seeds)")
    a2.legend(fontsize=8)
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    p = osp.join(out_dir, "training_curves.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths
