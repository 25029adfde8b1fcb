"""Progress reporting: a console line, ``metrics.jsonl``, TensorBoard (if installed) and
Weights & Biases (``logging.wandb``), the last two with the same scalars (:func:`scalars`).

Each iteration appears once in ``metrics.jsonl``: a resumed run first drops the records
of iterations after its checkpoint (logged by the run that was killed, and about to be
logged again), and TensorBoard purges its events from the same step on."""

from __future__ import annotations

import json
import math
import pathlib
import time

from rnope_megatron.train.wandb_run import WandbRun

# The record's values drawn as curves (TensorBoard and W&B): train/<key>.
SCALAR_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device")


def scalars(record: dict) -> dict:
    """The curves of one record: ``train/<key>`` for :data:`SCALAR_KEYS` (a None grad norm
    left out) and ``eval/<task>/<length>`` for each eval gate accuracy."""
    values = {f"train/{key}": record[key] for key in SCALAR_KEYS if record[key] is not None}
    for task, accuracies in (record.get("eval") or {}).items():
        for length, accuracy in accuracies.items():
            values[f"eval/{task}/{length}"] = accuracy
    return values


def _keep_records_up_to(path: pathlib.Path, iteration: int) -> None:
    """Rewrite ``path`` (atomically) without the records of iterations after
    ``iteration``, and without a torn last line a kill may have left."""
    if not path.exists():
        return
    kept, dropped = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            if record["iteration"] <= iteration:
                kept.append(line)
                continue
        except (ValueError, KeyError, TypeError):
            pass
        dropped = True
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    """Writes one record per logged iteration (rank 0 only does I/O)."""

    def __init__(self, run_dir, total_iters: int, start_iteration: int, flops_per_token: float,
                 world_size: int, peak_tflops: float | None, tensorboard: bool, active: bool,
                 wandb=None, config: dict | None = None):
        """``wandb``: the recipe's ``logging.wandb`` section (None: off), ``config`` the
        recipe as a mapping (the W&B run's config)."""
        self.active = active
        self.total = total_iters
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.start = time.time()
        self.start_iteration = start_iteration
        self.window_start = time.time()
        self.window_tokens = 0
        self.window_flops = 0.0
        self.window_documents = 0
        self.writer = None
        self.tensorboard_state = "off"
        self.wandb = None
        if not active:
            return
        run_dir = pathlib.Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        _keep_records_up_to(path, start_iteration)
        self.jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_iteration + 1)
            except ImportError:
                self.tensorboard_state = "not installed"
        if wandb is not None:
            self.wandb = WandbRun(wandb, run_dir, config or {}, start_iteration)

    @property
    def tensorboard_dir(self):
        return self.writer.log_dir if self.writer else None

    def describe_tensorboard(self) -> str:
        return self.writer.log_dir if self.writer else self.tensorboard_state

    def describe_wandb(self) -> str | None:
        return self.wandb.describe() if self.wandb else None

    def exclude_time(self, seconds: float) -> None:
        """Leave ``seconds`` (a checkpoint save) out of the current window's tokens/s."""
        self.window_start += seconds

    def add_tokens(self, tokens: int, flops: float | None = None, documents: int | None = None) -> None:
        """Count one step's tokens, its model FLOPs (default: tokens x the per-token
        FLOPs of an unmasked sequence) and, with document masking, its documents."""
        self.window_tokens += tokens
        self.window_flops += tokens * self.flops_per_token if flops is None else flops
        if documents is not None:
            self.window_documents += documents

    def log(self, iteration: int, loss: float, lr: float, grad_norm: float, skipped: bool,
            evaluation: dict | None = None, state_digest: str | None = None) -> dict:
        """One record; ``evaluation`` (``{task: {length: accuracy}}`` from an eval gate)
        goes into it as ``"eval"`` and to TensorBoard as ``eval/<task>/<length>``."""
        now = time.time()
        elapsed_window = max(now - self.window_start, 1e-9)
        tokens_per_s = self.window_tokens / elapsed_window
        tflops = self.window_flops / elapsed_window / 1e12 / self.world_size
        done = iteration - self.start_iteration
        eta = (now - self.start) / max(done, 1) * (self.total - iteration)
        record = {
            "iteration": iteration, "loss": loss, "lr": lr, "tokens": self.window_tokens,
            "grad_norm": None if math.isnan(grad_norm) else grad_norm,
            "tokens_per_s": round(tokens_per_s, 1), "tflops_per_device": round(tflops, 4),
            "elapsed_s": round(now - self.start, 2), "eta_s": round(eta, 1), "skipped": skipped,
        }
        if evaluation:
            record["eval"] = evaluation
        if state_digest:  # train.state_digest: parameters and optimizer state after this step
            record["state_digest"] = state_digest
        if self.peak_tflops:
            record["mfu"] = round(tflops / self.peak_tflops, 4)
        if self.window_documents:  # document masking: how packed the window's samples were
            record["mean_document_length"] = round(self.window_tokens / self.window_documents, 1)
        self.window_start, self.window_tokens, self.window_flops, self.window_documents = now, 0, 0.0, 0
        if self.active:
            mfu = f"  mfu {record['mfu']:.1%}" if "mfu" in record else ""
            documents = (f"  doc {record['mean_document_length']:,.0f} tok"
                         if "mean_document_length" in record else "")
            print(
                f"iter {iteration:6d}/{self.total}  loss {loss:.4f}  lr {lr:.3e}  grad_norm {grad_norm:.3f}  "
                f"{tokens_per_s:,.0f} tok/s  {tflops:.3f} TFLOP/s/dev{mfu}{documents}  "
                f"elapsed {_fmt_time(now - self.start)}  eta {_fmt_time(eta)}" + ("  [skipped]" if skipped else ""),
                flush=True,
            )
            for task, accuracies in (evaluation or {}).items():
                print(f"eval   {iteration:6d}  {task}  " + "  ".join(f"{n}: {a:.2f}" for n, a in accuracies.items()),
                      flush=True)
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
            values = scalars(record)
            if self.writer:
                for tag, value in values.items():
                    self.writer.add_scalar(tag, value, iteration)
            if self.wandb:
                self.wandb.log(values, iteration)
        return record

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            if self.writer:
                self.writer.close()
            if self.wandb:
                self.wandb.close()
