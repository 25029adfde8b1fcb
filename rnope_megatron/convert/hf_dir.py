"""Hugging Face model directories: reading weights by name, writing safetensors shards.

Both need the ``hf`` extra (``safetensors``); :func:`require_hf_extra` turns its absence
into one line that says what to install.
"""

from __future__ import annotations

import errno
import json
import pathlib
import sys
import time

import torch

from rnope_megatron.common.errors import MissingDependency


def require_hf_extra() -> None:
    """Fail in one line when the ``hf`` extra (safetensors) is missing."""
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise MissingDependency("rnope-convert needs the safetensors package of the 'hf' extra: "
                                "pip install 'rnope-megatron[hf]'") from None


def read_config(hf_dir: pathlib.Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


class HFWeights:
    """Tensors of a Hugging Face directory (one ``model.safetensors`` or an index of
    shards), read by name: only the requested tensors are loaded."""

    def __init__(self, hf_dir: pathlib.Path):
        from safetensors import safe_open

        self.dir = hf_dir
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{index} is not a safetensors index ({err})") from None
        else:
            weight_map = None
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles, self.file_of = {}, {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
            self._handles[name] = handle
            self.file_of.update({key: name for key in keys})

    def names(self) -> list[str]:
        return list(self.file_of)

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape, from the safetensors headers (no tensor is loaded)."""
        return {name: list(self._handles[file].get_slice(name).get_shape()) for name, file in self.file_of.items()}

    def dtype(self, name: str) -> str | None:
        """A tensor's stored dtype as safetensors names it (``BF16``, ``F32``), or None."""
        if name not in self.file_of:
            return None
        return self._handles[self.file_of[name]].get_slice(name).get_dtype()

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [name for name in names if name not in self.file_of]
        if missing:
            raise ValueError(f"{self.dir}: Hugging Face checkpoint lacks {missing[0]} (truncated or another model?)")
        out = {}
        for name in names:
            try:
                out[name] = self._handles[self.file_of[name]].get_tensor(name)
            except Exception as err:
                raise ValueError(f"{self.dir / self.file_of[name]}: tensor {name} is unreadable ({err})") from None
        return out


class ShardedWriter:
    """Writes tensors into ``model-0000N.safetensors`` shards of about ``shard_bytes``,
    then the index (or a single ``model.safetensors``). ``final_dir``: where ``out_dir``
    will be moved (errors name the file there)."""

    def __init__(self, out_dir: pathlib.Path, shard_bytes: int, final_dir: pathlib.Path | None = None):
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.final_dir = final_dir or out_dir
        self.shard: dict = {}
        self.shard_size = self.total = 0
        self.files: list[str] = []
        self.weight_map: dict = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.shard[name] = tensor
        size = tensor.numel() * tensor.element_size()
        self.shard_size += size
        self.total += size

    def flush_if_full(self) -> None:
        if self.shard_size >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.shard:
            name = f"model-{len(self.files) + 1:05d}.safetensors"
            try:
                save_file(self.shard, str(self.out_dir / name), metadata={"format": "pt"})
            except OSError:
                raise
            except Exception as err:  # safetensors raises its own SafetensorError for OS failures
                if "os error 28" in str(err) or "No space left" in str(err):
                    raise OSError(errno.ENOSPC, "No space left on device", str(self.final_dir / name)) from None
                raise OSError(f"{self.final_dir / name}: cannot write ({err})") from None
            self.files.append(name)
            self.weight_map.update({k: name for k in self.shard})
            self.shard, self.shard_size = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            (self.out_dir / self.files[0]).rename(self.out_dir / "model.safetensors")
        else:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class Progress:
    """A stderr line every few seconds: tensors done, MiB, elapsed, ETA."""

    def __init__(self, total_tensors: int):
        self.total, self.done, self.bytes, self.start, self.last = total_tensors, 0, 0, time.time(), 0.0

    def add(self, tensor: torch.Tensor) -> None:
        self.done += 1
        self.bytes += tensor.numel() * tensor.element_size()
        now = time.time()
        if now - self.last > 2 or self.done == self.total:
            self.last = now
            elapsed = now - self.start
            eta = elapsed / self.done * (self.total - self.done)
            print(f"  {self.done}/{self.total} tensors, {self.bytes / 2**20:,.0f} MiB, "
                  f"{elapsed:.0f}s elapsed, eta {eta:.0f}s", file=sys.stderr, flush=True)
