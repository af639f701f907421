"""The report a person reads: ``report.md``, ``report.png`` (the entry-count distribution per
language before and after, log-log, with the caps; language shares; what was dropped), the counts
behind them (``counts.npz``: ``{lang}_raw``, ``{lang}_live`` (after deduplication), ``{lang}_after``
(expected after curation), per entry) and ``curation.json`` (the summary).
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

from mae.common.files import atomic_open, atomic_write_bytes, atomic_write_text

TOP = 15


def _figure(summary: dict, live: dict, after: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    langs = summary["languages"]
    fig = Figure(figsize=(5 * (len(langs) + 2), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(langs) + 2)
    for ax, lang in zip(axes, langs):
        for counts, label, style in ((live[lang], "before", "-"), (after[lang], "after (expected)", "--")):
            c = np.sort(counts[counts > 0])[::-1]
            if len(c):
                ax.loglog(np.arange(1, len(c) + 1), c, style, label=label)
        t = summary["caps"][lang]
        if np.isfinite(t):
            ax.axhline(t, color="k", lw=0.8, ls=":", label=f"t_{lang} = {t:,.0f}")
        ax.set(title=f"{lang}: captions per metadata entry", xlabel="entry rank", ylabel="matching captions")
        ax.legend(fontsize=8)
    ax = axes[-2]
    x = np.arange(len(langs))
    before = np.array([summary["captions_before"][l] for l in langs], dtype=float)
    kept = np.array([summary["captions_expected_after"][l] for l in langs], dtype=float)
    ax.bar(x - 0.2, before / max(before.sum(), 1), 0.4, label="before")
    ax.bar(x + 0.2, kept / max(kept.sum(), 1), 0.4, label="after (expected)")
    ax.set(xticks=x, xticklabels=langs, title="language shares (captions)", ylim=(0, 1))
    ax.legend(fontsize=8)
    ax = axes[-1]
    reasons = {k: v for k, v in summary["dropped"].items() if v}
    ax.barh(list(reasons) or ["nothing"], list(reasons.values()) or [0])
    ax.set(title="samples dropped (probability 0)", xlabel="samples")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _markdown(summary: dict, entries: dict, live: dict, after: dict) -> str:
    langs, s = summary["languages"], summary["stats"]
    lines = [f"# Curation of `{summary['source']}`", "",
             f"{summary['samples']:,} samples read; expected kept per epoch: {summary['samples_expected_after']:,.0f} "
             f"({summary['samples_expected_after'] / max(summary['samples'], 1):.1%})"
             + (f"; {summary['written']:,} written to new shards" if summary["written"] is not None else "") + ".", "",
             "![entry counts, shares, drops](report.png)", "", "## Caps", "",
             "| language | entries | t | tail share (matches on entries below t) |", "| --- | --- | --- | --- |"]
    from clip.data.curation.balance import tail_share

    for lang in langs:
        lines.append(f"| {lang} | {summary['entries'][lang]:,} | {summary['caps'][lang]:,.1f} | "
                     f"{tail_share(live[lang], summary['caps'][lang]):.3f} |")
    lines += ["", f"`t_{summary['reference']}` is given or searched for the target size; the other caps follow the "
              "tail-share rule (the same share of matches on tail entries as the reference), unless given or "
              "searched for a target share.", "", "## Language shares (captions)", "",
              "| language | before | share | after (expected) | share |", "| --- | --- | --- | --- | --- |"]
    tb, ta = sum(summary["captions_before"].values()) or 1, sum(summary["captions_expected_after"].values()) or 1
    for lang in langs:
        b, a = summary["captions_before"][lang], summary["captions_expected_after"][lang]
        lines.append(f"| {lang} | {b:,} | {b / tb:.3f} | {a:,.0f} | {a / ta:.3f} |")
    lines += ["", "## Language identification (captions)", "", "| outcome | captions |", "| --- | --- |"]
    lines += [f"| {k[4:].replace('_', ' ')} | {v:,} |" for k, v in s.items() if k.startswith("lid_")]
    lines += ["", "## Dropped samples", "", "| reason | samples |", "| --- | --- |"]
    lines += [f"| {k.replace('_', ' ')} | {v:,} |" for k, v in summary["dropped"].items()]
    lines += [f"| (undecodable images, not hashed) | {s.get('undecodable', 0):,} |"]
    for lang in langs:
        top = np.argsort(-live[lang], kind="stable")[:TOP]
        lines += ["", f"## Top head entries, {lang}", "", "| entry | captions | keep probability | after (expected) |",
                  "| --- | --- | --- | --- |"]
        t = summary["caps"][lang]
        lines += [f"| {entries[lang][e]} | {int(live[lang][e]):,} | {min(1.0, t / max(live[lang][e], 1)):.4f} | "
                  f"{after[lang][e]:,.1f} |" for e in top if live[lang][e] > 0]
    return "\n".join(lines) + "\n"


def write_report(folder: str, summary: dict, entries: dict, raw: dict, live: dict, after: dict) -> None:
    """``report.md``, ``report.png``, ``counts.npz`` and ``curation.json`` into ``folder``."""
    atomic_write_bytes(os.path.join(folder, "report.png"), _figure(summary, live, after))
    atomic_write_text(os.path.join(folder, "report.md"), _markdown(summary, entries, live, after))
    with atomic_open(os.path.join(folder, "counts.npz"), "wb") as f:
        np.savez(f, **{f"{l}_{k}": v[l] for l in summary["languages"] for k, v in
                       (("raw", raw), ("live", live), ("after", after))})
    atomic_write_text(os.path.join(folder, "curation.json"), json.dumps(summary, indent=1, ensure_ascii=False,
                                                                        default=float) + "\n")
