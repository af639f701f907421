"""Rank-0 reporting of a run: ``metrics.jsonl``, TensorBoard (scalars, the config as text and
hyperparameters, images), optionally Weights & Biases (``run.wandb``; offline unless
``WANDB_MODE`` says otherwise), PNG curves, and the start-of-run echo (config, parameter counts)."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Optional

from launch.runtime.dist import Dist
from mae.common.files import atomic_write_bytes, atomic_write_text


class Monitor:
    """Writes on rank 0 only; on other ranks every method does nothing.

    Args:
        out_dir: the run folder (``metrics.jsonl`` and ``tb/`` go there).
        dist: this process's place; only rank 0 writes.
        resume: keep an existing ``metrics.jsonl`` and append to it (else it is replaced).
    """

    def __init__(self, out_dir: Path, dist: Dist, resume: bool = False, wandb: bool = False):
        self.active = dist.is_main
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.tb, self._tb_failed = None, False
        self.wandb = None
        if self.active and not resume and self.path.exists():
            self.path.unlink()  # a fresh run (the trainer refuses a folder that holds one)
        if self.active and wandb:
            self.wandb = _start_wandb(self.out_dir, resume)

    def start(self, cfg, model) -> None:
        """Echo the resolved config and the parameter counts (stdout), and record the config in
        TensorBoard (text + hyperparameters) and W&B."""
        if not self.active:
            return
        from launch.runtime.config import dump_config, to_dict

        text = dump_config(cfg)
        counts = parameter_counts(model)
        print(f"config ({self.out_dir / 'config.yaml'}):\n{text.rstrip()}")
        print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
        flat = _flatten(to_dict(cfg))
        tb = self._writer()
        if tb is not None:
            tb.add_text("config", "```\n" + text + "```", 0)
            hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}
            tb.add_hparams(hp, {f"params/{k}": float(v) for k, v in counts.items()}, run_name=".")
        if self.wandb is not None:
            self.wandb.config.update({**flat, **{f"params/{k}": v for k, v in counts.items()}}, allow_val_change=True)

    def image(self, tag: str, png: Path, step: int) -> None:
        """A PNG written for the run (e.g. MAE reconstructions) into TensorBoard and W&B too."""
        if not self.active:
            return
        tb = self._writer()
        if tb is not None or self.wandb is not None:
            import numpy as np
            from PIL import Image

            with Image.open(png) as im:
                arr = np.asarray(im.convert("RGB"))
            if tb is not None:
                tb.add_image(tag, arr, step, dataformats="HWC")
            if self.wandb is not None:
                self.wandb.log({tag: self.wandb.Image(arr)}, step=step)

    def _writer(self, purge_step: Optional[int] = None):
        if self.tb is None and self.active and not self._tb_failed:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge_step)
            except Exception as e:  # tensorboard is a dependency, but a broken install must not stop training
                print(f"warning: TensorBoard disabled ({e})", file=sys.stderr)
                self._tb_failed = True
        return self.tb

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append a row; one ``write`` of a whole line with O_APPEND, then fsync, so a crash leaves
        whole rows (and :meth:`history` skips a torn one should a file system tear it anyway)."""
        if not self.active:
            return
        line = (json.dumps({"step": step, **metrics}) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        tb = self._writer()
        if tb is not None:
            for k, v in metrics.items():
                tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def history(self) -> list[dict]:
        """The rows of ``metrics.jsonl``; lines that are not a whole JSON row (a torn write) are skipped."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def truncate(self, step: int) -> None:
        """On resume from ``step``: keep the rows up to it (atomically rewritten, torn lines dropped)
        and have TensorBoard purge its events after it."""
        if not self.active:
            return
        rows = [r for r in self.history() if r["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._writer(purge_step=step + 1)

    def plot(self, name: str, keys: list[str], title: str, ylabel: str,
             chance: Optional[float] = None, labels: Optional[dict[str, str]] = None,
             chance_label: str = "chance", scale: float = 1.0) -> Optional[Path]:
        """Curves of ``keys`` against the optimizer step into ``<out_dir>/<name>`` (PNG).

        ``chance`` draws a reference level (``chance_label``) as a dashed line; ``labels`` renames keys in the legend,
        which sits below the axes so that it never covers a curve; ``scale`` multiplies every logged
        value (100: fractions drawn as percent; ``chance`` is given on the drawn scale).
        """
        if not self.active:
            return None
        from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

        rows = self.history()
        fig = Figure(figsize=(6.4, 4.8))
        ax = fig.subplots()
        for k in keys:
            pts = [(r["step"], r[k] * scale) for r in rows if k in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=(labels or {}).get(k, k))
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"{chance_label} ({chance:.3g})")
        ax.set(xlabel="optimizer step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0]
        if handles:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=min(3, len(handles)), fontsize="small",
                      frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        path = self.out_dir / name
        atomic_write_bytes(path, buf.getvalue())
        return path

    def finish(self, headline: str, skip_totals: dict[str, float], files: str) -> None:
        """The run's last console lines (what was done, the last held-out values, the data counts,
        the outputs), then close the writers."""
        last = {k: v for r in self.history() for k, v in r.items() if k.startswith("val/")}
        self.close()
        if not self.active:
            return
        print(headline)
        if last:
            print("held-out: " + ", ".join(f"{k[4:]}={v:.4f}" for k, v in sorted(last.items())))
        print(summary_line(skip_totals))
        print(f"outputs: {self.out_dir}/  ({files}, metrics.jsonl, tb/, checkpoints/)")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def summary_line(totals: dict[str, float]) -> str:
    """The run's data counts for the console: skipped samples, broken shards, partial batches."""
    names = {"skipped_samples": "samples skipped (missing, undecodable or without a caption)",
             "broken_shards": "broken shards", "samples_in_partial_batches": "samples in partial batches (not trained on)",
             "dropped_captions": "captions dropped (empty or invalid)"}
    return "data: " + ", ".join(f"{int(totals.get(k, 0))} {v}" for k, v in names.items() if k in totals or k != "dropped_captions")


def parameter_counts(model) -> dict[str, int]:
    """Parameters per top-level child (``visual``, ``text``, ``encoder``, ...), then ``total`` and
    ``trainable`` (as of now: a freeze window may hold some back at first)."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts = {k: v for k, v in counts.items() if v}
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _start_wandb(out_dir: Path, resume: bool):
    """W&B for this run folder: offline by default (``WANDB_MODE=online`` to sync live, or ``wandb
    sync`` later), one run id kept in the folder so a resumed job continues the same W&B run."""
    from launch.runtime.config import ConfigError

    try:
        import wandb
    except ImportError:
        raise ConfigError("run.wandb=true needs Weights & Biases: pip install wandb") from None
    id_file = out_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if resume and id_file.exists() else wandb.util.generate_id()
    atomic_write_text(id_file, run_id + "\n")
    wandb.init(project=os.environ.get("WANDB_PROJECT", "enko-clip"), name=out_dir.name, id=run_id,
               dir=str(out_dir), resume="allow", mode=os.environ.get("WANDB_MODE", "offline"))
    return wandb
