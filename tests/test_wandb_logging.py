"""Weights & Biases beside TensorBoard (``logging.wandb``), in wandb's offline mode: the
installed ``rnope-train`` writes a W&B run whose history holds the scalars TensorBoard gets
(read back with TensorBoard's own reader) at the same steps, whose config is the recipe,
and whose project, name and group are the recipe's. Bad fields and a missing wandb package
fail in one line naming the field or the extra, before training starts."""

import json
import os
import pathlib
import struct
import subprocess

import pytest

from rnope_megatron.recipe import RecipeError, load_recipe
from rnope_megatron.train.metrics import scalars
from tests.trainer import FAST, RECIPE, ROOT, assert_one_line_error, console_script, metrics


def _wandb_records(path: pathlib.Path):
    """The protobuf records of an offline run's ``.wandb`` file, parsed with wandb's own
    message classes. The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic,
    version), then 32 KiB blocks of chunks (crc32 4 bytes, length 2, type 1: full, first,
    middle, last); a block's tail shorter than a chunk header is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of the file
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _tensorboard_scalars(run_dir: pathlib.Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            steps.setdefault(event.step, {})[tag] = event.value
    return steps


def test_an_offline_wandb_run_holds_tensorboards_scalars_and_the_recipe(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    overrides = [*FAST, "train.iters=2", "scheduler.warmup_iters=1", "logging.tensorboard=true",
                 f"data.cache_dir={data_cache}", f"logging.run_dir={run_dir}", "logging.wandb.mode=offline",
                 "logging.wandb.project=rnope-test", "logging.wandb.name=tiny-wandb"]
    # every wandb file (settings, cache, the run) under tmp: nothing in the user's home
    env = {**os.environ, **{f"WANDB_{k}": str(tmp_path / "wandb-home") for k in ("CONFIG_DIR", "CACHE_DIR", "DATA_DIR")},
           "WANDB_DIR": str(tmp_path / "wandb-dir")}
    out = subprocess.run([console_script("rnope-train"), RECIPE, *overrides], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "done at iteration 2" in out.stdout and "; wandb offline run " in out.stdout

    (wandb_file,) = (tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb")
    history, run = {}, None
    for record in _wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "run":
            run = record.run
    assert run is not None

    # the scalars TensorBoard got, at the same steps, with the same values (TensorBoard
    # stores float32: relative 1e-6)
    board = _tensorboard_scalars(run_dir)
    assert sorted(history) == sorted(board) == [1, 2]
    for step, values in board.items():
        assert set(history[step]) == set(values), step
        for tag, value in values.items():
            assert history[step][tag] == pytest.approx(value, rel=1e-6), (step, tag)
    # ... which are metrics.jsonl's records, exactly
    for record in metrics(run_dir):
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device"):
            assert history[record["iteration"]][f"train/{key}"] == record[key]

    # the recipe (after overrides) as the run's config, section by section
    config = {_key(i): json.loads(i.value_json) for i in run.config.update}
    expected = load_recipe(RECIPE, overrides).to_dict()
    assert {k: config[k] for k in expected} == json.loads(json.dumps(expected))
    assert config["logging"]["wandb"] == {"project": "rnope-test", "name": "tiny-wandb", "mode": "offline"}
    assert (run.project, run.display_name, run.run_group, run.job_type) == ("rnope-test", "tiny-wandb",
                                                                           "tiny-wandb", "train")


@pytest.mark.parametrize("override, message", [
    ("logging.wandb.project=''", "logging.wandb.project must not be empty"),
    ("logging.wandb.project=team/runs", "logging.wandb.project='team/runs' must not contain /"),
    ("logging.wandb.name=' '", "logging.wandb.name must not be empty"),
    ("logging.wandb.mode=online-ish", "logging.wandb.mode: 'online-ish' is not one of"),
    ("logging.wandb.entity=me", "unknown key logging.wandb.entity"),
    ("logging.wandb.project=7", "logging.wandb.project: expected str"),
])
def test_bad_wandb_fields_are_named(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPE, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_wandb_off_by_default_and_null_switches_it_off():
    assert load_recipe(RECIPE).logging.wandb is None
    assert load_recipe(RECIPE, ["logging.wandb.mode=offline", "logging.wandb=null"]).logging.wandb is None
    on = load_recipe(RECIPE, ["logging.wandb.mode=offline"]).logging.wandb
    assert (on.project, on.name, on.mode) == ("rnope-megatron", None, "offline")


@pytest.mark.parametrize("check", [False, True])
def test_a_missing_wandb_package_names_the_extra_before_training(check, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # not installed\n")
    args = ["--check"] if check else []
    out = subprocess.run([console_script("rnope-train"), *args, RECIPE, "logging.wandb.mode=offline",
                          f"logging.run_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(blocker)}, timeout=600)
    assert_one_line_error(out, "rnope-train", "logging.wandb", "pip install 'rnope-megatron[wandb]'")
    assert not (tmp_path / "run").exists()  # nothing started


def test_eval_gate_accuracies_are_curves_beside_the_training_scalars():
    """What both TensorBoard and W&B get from a record with an eval gate's accuracies (the
    offline run above has no gate); a None grad norm (a skipped step) is left out."""
    record = {"iteration": 4, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 10.0,
              "tflops_per_device": 0.1, "eval": {"passkey": {"1024": 1.0, "2048": 0.5}}}
    assert scalars(record) == {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 10.0,
                               "train/tflops_per_device": 0.1, "eval/passkey/1024": 1.0, "eval/passkey/2048": 0.5}
