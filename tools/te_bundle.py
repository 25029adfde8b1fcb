"""Carry Transformer Engine to a bare GPU box in parts small enough for one device call.

The lent GPU box has torch (cu130), transformers, nvcc/cmake/ninja and cuDNN, but no
Transformer Engine, no megatron-core and no network, and one call carries at most 64 MiB.
This tool:

* ``prepare DEST``: downloads here, from the package registry, what the ``te`` backend
  needs there (TE's Python package, its CUDA 13 core library, the source of its PyTorch
  extension, megatron-core, and the pure-Python packages TE imports), cuts every file into
  parts of at most ``--part-mib`` MiB and groups the parts into one folder per device call
  (``DEST/call-NN/``), with ``DEST/manifest.json`` (each file's size and SHA-256, each
  part's). The wheels are carried unmodified: a smaller, stripped core library would have
  to be proven loadable on the GPU first.
* ``verify DEST [--into DIR]``: checks every part against the manifest (a missing or
  damaged part is one line naming it), reassembles each file and checks its SHA-256.
* ``plan DEST``: the device calls in order, their sizes and an estimate of their minutes,
  against the 15-minute budget.

``tools/gpu_check.sh --prepare --te`` runs ``prepare``; ``--dry-run --te`` runs ``verify``
and ``plan`` here; ``--te-install`` reassembles, verifies and installs on the box.
Nothing here downloads anything except ``prepare``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

MIB = 1 << 20
CARRY_LIMIT_MIB = 64
"""What one device call may carry (the device tool's limit)."""
DEFAULT_PART_MIB = 60
"""Parts stay below the carry limit with room for the repository itself."""
BUDGET_MINUTES = 15.0

TE_VERSION = "2.20.2"
# TE's own packages: no dependency resolution (the core's dependencies are the box's CUDA).
NO_DEPS = [f"transformer_engine=={TE_VERSION}", f"transformer_engine_cu13=={TE_VERSION}", "megatron-core==0.19.2"]
# What `transformer_engine_torch` lists as install requirements besides torch, resolved for
# Python 3.12 on manylinux x86_64 (the box has torch, numpy and transformers already).
RESOLVED = ["einops", "onnxscript", "onnx", "packaging", "pydantic", "nvdlfw-inspect",
            "nvidia-cudnn-frontend>=1.29.0", "wheel", "importlib-metadata"]
SDIST = f"transformer_engine_torch=={TE_VERSION}"
"""The PyTorch extension ships as source only: compiled on the box (nvcc, 16 cores)."""
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64"]
# Packages the box already has: never carried (torch and its CUDA libraries are GBs).
ON_THE_BOX = ("torch", "nvidia-", "numpy", "triton", "sympy", "networkx", "jinja2", "fsspec", "filelock",
              "setuptools", "markupsafe", "mpmath")


class BundleError(RuntimeError):
    """A bundle that cannot be trusted: the message names the part or file."""


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def split(files: list[pathlib.Path], dest: pathlib.Path, part_mib: float = DEFAULT_PART_MIB,
          carry_mib: float = CARRY_LIMIT_MIB) -> dict:
    """Cut ``files`` into parts of at most ``part_mib`` MiB, grouped into call folders of at
    most ``carry_mib`` MiB (``dest/call-NN``); write and return the manifest."""
    if part_mib <= 0 or part_mib > carry_mib:
        raise ValueError(f"--part-mib {part_mib} must be in (0, {carry_mib}]")
    part_bytes, carry_bytes = int(part_mib * MIB), int(carry_mib * MIB)
    dest.mkdir(parents=True, exist_ok=True)
    manifest = {"part_bytes": part_bytes, "carry_bytes": carry_bytes, "files": []}
    call, call_bytes = 1, 0
    for path in sorted(files, key=lambda p: p.name):
        entry = {"name": path.name, "size": path.stat().st_size, "sha256": sha256(path), "parts": []}
        with path.open("rb") as f:
            index = 0
            while True:
                chunk = f.read(part_bytes)
                if not chunk and index:
                    break
                if call_bytes and call_bytes + len(chunk) > carry_bytes:
                    call, call_bytes = call + 1, 0
                folder = dest / f"call-{call:02d}"
                folder.mkdir(exist_ok=True)
                name = f"{path.name}.part{index:03d}"
                (folder / name).write_bytes(chunk)
                entry["parts"].append({"call": call, "name": name, "size": len(chunk),
                                       "sha256": hashlib.sha256(chunk).hexdigest()})
                call_bytes += len(chunk)
                index += 1
                if len(chunk) < part_bytes:
                    break
        manifest["files"].append(entry)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(bundle: pathlib.Path) -> dict:
    path = bundle / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{path}: no manifest (run tools/gpu_check.sh --prepare --te)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None


def verify(bundle: pathlib.Path, into: pathlib.Path | None = None) -> list[pathlib.Path]:
    """Check every part, reassemble every file into ``into`` (a temporary folder, removed,
    when None) and check its SHA-256. Returns the reassembled paths (when ``into``)."""
    manifest = read_manifest(bundle)
    limit = manifest["part_bytes"]
    for entry in manifest["files"]:
        for part in entry["parts"]:
            path = bundle / f"call-{part['call']:02d}" / part["name"]
            if not path.is_file():
                raise BundleError(f"{path}: part missing")
            if path.stat().st_size != part["size"] or part["size"] > limit:
                raise BundleError(f"{path}: {path.stat().st_size} bytes, manifest says {part['size']} "
                                  f"(limit {limit})")
            if sha256(path) != part["sha256"]:
                raise BundleError(f"{path}: SHA-256 differs from the manifest (damaged part)")
    scratch = None
    if into is None:
        scratch = tempfile.TemporaryDirectory(prefix="te-bundle-")
        into = pathlib.Path(scratch.name)
    into.mkdir(parents=True, exist_ok=True)
    done = []
    try:
        for entry in manifest["files"]:
            target = into / entry["name"]
            with target.open("wb") as out:
                for part in entry["parts"]:
                    with (bundle / f"call-{part['call']:02d}" / part["name"]).open("rb") as f:
                        shutil.copyfileobj(f, out)
            if target.stat().st_size != entry["size"] or sha256(target) != entry["sha256"]:
                raise BundleError(f"{target}: reassembled file differs from the manifest")
            done.append(target)
    finally:
        if scratch is not None:
            scratch.cleanup()
    return done


# The estimate's assumptions, stated so the plan can be judged (none measured on the box yet).
START_MINUTES = 3.0
"""A fresh machine's start ("minutes", per the device tool): assumed 3."""
CALL_OVERHEAD_MINUTES = 0.25
"""Per call: copying the tree, running a tiny command, bringing files back."""
MIB_PER_SECOND = 10.0
"""Assumed transfer rate of carried files (not measured)."""
BUILD_MINUTES = 4.0
"""Compiling transformer_engine_torch with 16 cores: the issue's ceiling; the kit times it."""
CHECKS_MINUTES = 5.0
"""tools/gpu_check.sh --te: its checks and benchmarks."""


def plan(manifest: dict) -> list[dict]:
    """The device calls in order, each with what it carries and its estimated minutes."""
    sizes: dict[int, int] = {}
    for entry in manifest["files"]:
        for part in entry["parts"]:
            sizes[part["call"]] = sizes.get(part["call"], 0) + part["size"]
    calls = []
    for number in sorted(sizes):
        minutes = CALL_OVERHEAD_MINUTES + sizes[number] / MIB / MIB_PER_SECOND / 60
        if not calls:
            minutes += START_MINUTES
        calls.append({"call": len(calls) + 1, "carry": f".whl/te/call-{number:02d}", "mib": sizes[number] / MIB,
                      "minutes": minutes, "what": "carry parts (kept on the warm box)"})
    calls.append({"call": len(calls) + 1, "carry": "", "mib": 0.0, "minutes": CALL_OVERHEAD_MINUTES + BUILD_MINUTES,
                  "what": "tools/gpu_check.sh --te-install: reassemble, verify, install, build TE's extension"})
    calls.append({"call": len(calls) + 1, "carry": ".gpu_ref", "mib": 0.0, "minutes": CALL_OVERHEAD_MINUTES
                  + CHECKS_MINUTES, "what": "tools/gpu_check.sh --te: the checks and benchmarks"})
    return calls


def render_plan(calls: list[dict]) -> str:
    rows = [f"{'call':>4}  {'carry':<20} {'MiB':>6} {'min':>5}  what"]
    rows += [f"{c['call']:>4}  {c['carry']:<20} {c['mib']:6.1f} {c['minutes']:5.2f}  {c['what']}" for c in calls]
    total = sum(c["minutes"] for c in calls)
    verdict = "fits" if total <= BUDGET_MINUTES else "DOES NOT FIT"
    rows.append(f"total {total:.1f} min of {BUDGET_MINUTES:.0f} ({verdict}; estimate: start {START_MINUTES} min, "
                f"{MIB_PER_SECOND} MiB/s, build {BUILD_MINUTES} min assumed, none measured on the box yet); "
                "calls must follow each other within the box's idle release")
    return "\n".join(rows)


def _carried(path: pathlib.Path) -> bool:
    name = path.name.lower().replace("_", "-")
    return not any(name.startswith(prefix) for prefix in ON_THE_BOX)


def prepare(dest: pathlib.Path, part_mib: float = DEFAULT_PART_MIB) -> dict:
    """Download (package registry only) and split; the one function that downloads."""
    pip = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory(prefix="te-download-") as tmp:
        wheels = pathlib.Path(tmp)
        subprocess.run([*pip, "--no-deps", *PLATFORM, "-d", str(wheels), *NO_DEPS], check=True)
        subprocess.run([*pip, *PLATFORM, "-d", str(wheels), *RESOLVED], check=True)
        # the extension's source: pip reads its metadata with the build tools of this venv
        subprocess.run([*pip, "--no-deps", "--no-build-isolation", "--no-binary", ":all:", "-d", str(wheels), SDIST],
                       check=False)
        files = [p for p in wheels.iterdir() if _carried(p)]
        if not any(p.name.startswith("transformer_engine_torch") for p in files):
            raise BundleError(f"{SDIST}: the source package was not downloaded")
        if dest.exists():
            shutil.rmtree(dest)
        return split(files, dest, part_mib)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="te_bundle", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dest", type=pathlib.Path)
    p.add_argument("--part-mib", type=float, default=DEFAULT_PART_MIB)
    v = sub.add_parser("verify")
    v.add_argument("dest", type=pathlib.Path)
    v.add_argument("--into", type=pathlib.Path)
    sub.add_parser("plan").add_argument("dest", type=pathlib.Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            manifest = prepare(args.dest, args.part_mib)
            print(f"{args.dest}: {len(manifest['files'])} files in "
                  f"{sum(len(f['parts']) for f in manifest['files'])} parts")
            print(render_plan(plan(manifest)))
        elif args.command == "verify":
            files = verify(args.dest, args.into)
            manifest = read_manifest(args.dest)
            print(f"{args.dest}: {len(manifest['files'])} files verified and reassembled"
                  + (f" into {args.into}" if args.into else ""))
            del files
        else:
            calls = plan(read_manifest(args.dest))
            print(render_plan(calls))
            return 0 if sum(c["minutes"] for c in calls) <= BUDGET_MINUTES else 1
    except (BundleError, ValueError, OSError, subprocess.CalledProcessError) as err:
        print(f"te_bundle: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
