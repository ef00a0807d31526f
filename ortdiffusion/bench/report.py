"""A bench `Report` for people: the markdown table `bench` prints, its noise notes, and the plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .records import NOISY_SPREAD, Record, Report

STAGES = ("tokenize", "text_encoder", "image_encoder", "unet_step", "scheduler", "decoder", "postprocess", "png_encode")


def markdown(report: Report) -> str:
    rows = ["| model | engine | providers | precision | scheduler | batch | size | steps | end to end p50 s | p90 s | "
            "UNet step p50 ms | UNet GFLOP/s (of matmul) | outside networks | images/s | cold start s | peak host MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    gpu = any(r.peak_device_mb is not None for r in report.records)
    if gpu:
        rows[0] += " peak GPU MB |"
        rows[1] += "---|"
    for r in report.records:
        unet = r.stages_s["unet_step"].p50 * 1e3 if "unet_step" in r.stages_s else float("nan")
        providers = ",".join(sorted(set(r.providers.values())))
        cold = f"{r.cold_start_s:.2f}" if r.cold_start_s is not None else "–"
        rate = f"{r.unet_gflops_per_s:.0f}" if r.unet_gflops_per_s else "–"
        if r.unet_fraction_of_matmul_rate:
            rate += f" ({r.unet_fraction_of_matmul_rate:.0%})"
        outside = f"{r.outside_networks_fraction:.1%}" if r.outside_networks_fraction is not None else "–"
        device = f" {r.peak_device_mb:.0f} |" if r.peak_device_mb is not None else (" – |" if gpu else "")
        rows.append(f"| {r.model} | {r.engine} | {providers} | {r.precision} | {r.scheduler or '–'} | {r.batch} | "
                    f"{r.width}x{r.height} | {r.steps} | {r.end_to_end_s.p50:.3f} | {r.end_to_end_s.p90:.3f} | "
                    f"{unet:.1f} | {rate} | {outside} | {r.images_per_s:.3f} | {cold} | {r.peak_host_mb:.0f} |" + device)
    rows.append(f"\nfp32 matrix-product rate of this machine (numpy, 4096²): {report.env.get('fp32_matmul_gflops', 0):.0f} GFLOP/s")
    rows += [f"\n{r.task}: {r.engine} {r.width}x{r.height} batch {r.batch}: the image encoder took "
             f"{r.image_encoder_fraction:.1%} of end to end" for r in report.records if r.image_encoder_fraction is not None]
    rows += noise_lines(report)
    for s in report.skipped:
        rows.append(f"\n{s.engine} on {s.model} skipped: {s.reason}")
    return "\n".join(rows)


def noise_lines(report: Report) -> list[str]:
    """The spread of each record, the machine's load, and each comparison marked when it is within noise."""
    rows = []
    for r in report.records:
        s = r.spread_s
        if s and s.relative > NOISY_SPREAD:
            rows.append(f"\nnoisy: {r.engine} {r.width}x{r.height} batch {r.batch} ranged "
                        f"{s.min:.3f}–{s.max:.3f} s ({s.relative:.0%} of its median)")
    load = report.env.get("machine_load") or {}
    start, end = load.get("start"), load.get("end")
    if start and end:
        busy = " (busier than its cores: other work shared them)" if max(start["per_core"], end["per_core"]) > 1 else ""
        rows.append(f"\nmachine load (1 min) {start['load_1min']:.2f} at the start, {end['load_1min']:.2f} at the end, "
                    f"{report.env.get('cores')} cores{busy}")
    for c in report.comparisons:
        ratio = f"{c.ratio:.2f}×" if c.ratio else "–"
        verdict = ("WITHIN NOISE: the spread exceeds the difference; repeat on a quiet machine" if c.within_noise
                   else "outside the spread")
        rows.append(f"\n{c.engine} / {c.against} ({c.width}x{c.height} batch {c.batch}): {ratio}, "
                    f"difference {c.difference_s:.3f} s, spread {c.spread_s:.3f} s — {verdict}")
    return rows


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report.records
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    labels, seen = [], set()
    for i, r in enumerate(records):
        labels.append(f"{r.engine}\n{r.width}x{r.height} b{r.batch}")
        bottom = 0.0
        for j, stage in enumerate(STAGES):
            s = r.stages_s.get(stage)
            if not s:
                continue
            value = s.mean * (r.steps if stage == "unet_step" else 1)
            axes[0].bar(i, value, bottom=bottom, color=f"C{j}", label=None if stage in seen else stage)
            seen.add(stage)
            bottom += value
    axes[0].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[0].set_ylabel("seconds per generation (mean)")
    axes[0].set_title("per-stage breakdown")
    axes[0].legend(fontsize=7)
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.engine, r.model, r.width, r.height)].append(r)
    for (engine, model, w, h), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.batch)
        batches = [r.batch for r in rs]
        axes[1].plot(batches, [r.end_to_end_s.p50 for r in rs], marker="o", label=f"{engine} {model} {w}x{h}")
        axes[2].plot(batches, [r.images_per_s for r in rs], marker="o", label=f"{engine} {model} {w}x{h}")
    axes[1].set_xlabel("batch")
    axes[1].set_ylabel("end-to-end latency p50 (s)")
    axes[2].set_xlabel("batch")
    axes[2].set_ylabel("images per second")
    for ax in axes[1:]:
        ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
