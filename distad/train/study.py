"""`distad study compress`: the same training job and seed for several compressors.

For each spec it runs `distad train` in-process (every rank loops over the
specs together), then rank 0 writes a table (final accuracy, bytes per step,
compression ratio, time per step by phase) as markdown, CSV and JSON, and two
plots: loss against step, and loss against bytes sent. With --grad-error-every the table
also has each spec's mean error and cosine against the exact average gradient, and a third
plot shows the cosine against the compression ratio.

    mpiexec -n 4 distad study compress --specs none,fp16,qsgd:16,topk:0.01+ef,powersgd:2+ef \\
        --epochs 20 --out runs/study
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..comm import Communicator, failfast
from .config import add_arguments, from_args
from .job import run

DEFAULT_SPECS = "none,fp16,int8,qsgd:16,terngrad,topk:0.01+ef,randk:0.01+ef,powersgd:2+ef"


def main(argv: list[str] | None = None) -> int:
    failfast.install()
    argv = list(argv or [])
    if argv and argv[0] == "compress":
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="distad study compress", description=__doc__.splitlines()[0])
    p.add_argument("--specs", default=DEFAULT_SPECS,
                   help=f"comma-separated compressor specs (default {DEFAULT_SPECS})")
    add_arguments(p)
    args = p.parse_args(argv)
    base = from_args(args)
    out = Path(base.out or "runs/study-compress")
    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    comm = Communicator()
    results = []
    for spec in specs:
        cfg = replace(base, compress=spec, out=str(out / _safe(spec)), log_every=1,
                      checkpoint_dir="", resume=False)
        if comm.rank == 0:
            print(f"== {spec}", flush=True)
        summary = run(cfg, comm)
        results.append(summary)
    if comm.rank == 0:
        rows = table_rows(results)
        write_outputs(out, rows, results)
        print(markdown(rows))
        print(f"\nwrote {out}/study.md, study.csv, study.json, loss_vs_step.png, "
              "loss_vs_bytes.png" + (", fidelity_vs_ratio.png" if _measured(rows) else ""))
    return 0


def _safe(spec: str) -> str:
    return spec.replace(":", "_").replace("+", "-").replace("@", "-at-")


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per spec; accuracy delta and byte ratio relative to the first 'none' run."""
    ref = next((r for r in results if r["compress"] == "none"), results[0])
    rows = []
    for r in results:
        bytes_ = r["bytes_per_step"]
        rows.append({
            "spec": r["compress"], "test_acc": r["test_acc"],
            "delta_acc_pp": 100 * (r["test_acc"] - ref["test_acc"]),
            "bytes_per_step": bytes_,
            "ratio": (ref["bytes_per_step"] / bytes_) if bytes_ else float("nan"),
            "step_ms": 1e3 * r["mean_step_s"],
            "compute_ms": 1e3 * (r["mean_step_s"] - r["wait_s_per_step"]),
            "compress_ms": 1e3 * r["compress_s_per_step"],
            "communicate_ms": 1e3 * r["communicate_s_per_step"],
            "decompress_ms": 1e3 * r["decompress_s_per_step"],
            "wait_ms": 1e3 * r["wait_s_per_step"],
            **({"grad_error": r["grad_error"], "grad_cosine": r["grad_cosine"]}
               if "grad_error" in r else {})})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    fidelity = _measured(rows)
    head = ("| spec | test acc | Δ acc (pp) | bytes/step/rank | ratio | ms/step | compute | "
            "compress | communicate | decompress | wait |" +
            (" grad error | grad cosine |" if fidelity else ""))
    lines = [head, "|" + "---|" * (13 if fidelity else 11)]
    for r in rows:
        lines.append(
            f"| {r['spec']} | {r['test_acc']:.4f} | {r['delta_acc_pp']:+.2f} | "
            f"{r['bytes_per_step']:,.0f} | {r['ratio']:.1f}x | {r['step_ms']:.2f} | "
            f"{r['compute_ms']:.2f} | {r['compress_ms']:.2f} | {r['communicate_ms']:.2f} | "
            f"{r['decompress_ms']:.2f} | {r['wait_ms']:.2f} |" +
            (f" {r['grad_error']:.3g} | {r['grad_cosine']:.4f} |" if fidelity else ""))
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text(markdown(rows) + "\n")
    with open(out / "study.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "study.json").write_text(json.dumps({"rows": rows, "runs": results}, indent=1))
    _plots(out, results, rows)


def _measured(rows: list[dict[str, Any]]) -> bool:
    """Whether the runs measured the gradient error (--grad-error-every)."""
    return all("grad_error" in r for r in rows)


def _plots(out: Path, results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_s, ax_s = plt.subplots(figsize=(7, 4.5))
    fig_b, ax_b = plt.subplots(figsize=(7, 4.5))
    for r in results:
        path = Path(r["config"]["out"]) / "metrics.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        recs = [x for x in recs if "loss" in x]
        steps = [x["step"] for x in recs]
        loss = _smooth([x["loss"] for x in recs])
        sent, total = [], 0.0
        for x in recs:
            total += x["bytes_sent"]
            sent.append(total / 2**20)
        ax_s.plot(steps, loss, label=r["compress"], lw=1.2)
        ax_b.plot([max(s, 1e-6) for s in sent], loss, label=r["compress"], lw=1.2)
    ax_s.set(xlabel="step", ylabel="training loss (smoothed)", yscale="log",
             title="Loss against step")
    ax_b.set(xlabel="MiB sent per rank (cumulative)", ylabel="training loss (smoothed)",
             xscale="log", yscale="log", title="Loss against bytes sent")
    for fig, ax, name in ((fig_s, ax_s, "loss_vs_step.png"), (fig_b, ax_b, "loss_vs_bytes.png")):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    if _measured(rows):
        _fidelity_plot(out, rows, plt)


def _fidelity_plot(out: Path, rows: list[dict[str, Any]], plt: Any) -> None:
    """What each spec keeps of the gradient against what it saves in bytes (with
    --grad-error-every): the mean cosine to the exact average against the compression ratio,
    the point's colour its change in test accuracy."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dots = ax.scatter([r["ratio"] for r in rows], [r["grad_cosine"] for r in rows],
                      c=[r["delta_acc_pp"] for r in rows], cmap="RdYlGn", vmin=-5, vmax=5,
                      s=60, edgecolors="k", linewidths=0.5)
    for r in rows:
        ax.annotate(r["spec"], (r["ratio"], r["grad_cosine"]), fontsize=8,
                    xytext=(5, 3), textcoords="offset points")
    fig.colorbar(dots, ax=ax, label="test accuracy change (pp)")
    ratios = [r["ratio"] for r in rows if r["ratio"] > 0]
    ax.set(xscale="log", xlim=(min(ratios) / 1.5, max(ratios) * 4), ylim=(-0.05, 1.08),
           xlabel="compression ratio (bytes, none / spec)",
           ylabel="mean cosine to the exact average gradient",
           title="What each compressor keeps of the gradient")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fidelity_vs_ratio.png", dpi=120)
    plt.close(fig)


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out
