"""Metrics of a training run: metrics.jsonl, TensorBoard event files, and a loss-curve PNG.

Only rank 0 writes. On a resume, records past the resumed step (left by the interrupted attempt)
are dropped first, so the files always describe one consistent run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from raylm.storage import atomic_write_bytes, atomic_write_text


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
    return out


class MetricsLogger:
    def __init__(self, log_dir: str | os.PathLike, *, resume_step: int = 0, tensorboard: bool = True):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        kept = [r for r in read_jsonl(self.jsonl) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept
        self._f = open(self.jsonl, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError:  # tensorboard not installed: jsonl and the PNG still work
                self._tb = None

    def log(self, step: int, **values) -> None:
        rec = {"step": step, **{k: (float(v) if v is not None else None) for k, v in values.items()}}
        self.records.append(rec)
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if v is not None:
                    self._tb.add_scalar(k, float(v), step)

    def plot(self, title: str = "raylm training") -> Path | None:
        path = self.dir / "loss_curve.png"
        if plot_curves(self.records, path, title=title):
            return path
        return None

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def plot_curves(records: list[dict], path: str | os.PathLike, *, title: str) -> bool:
    """Train and validation loss (left axis) and learning rate (right axis), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    lr = [(r["step"], r["lr"]) for r in records if r.get("lr") is not None]
    if not train and not val:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), color="tab:gray", linewidth=0.8, alpha=0.7, label="learning rate")
        ax2.set_ylabel("learning rate")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    save_figure(fig, path)
    return True


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as PNG atomically, and free it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
