"""Checkpoint files: exact optimizer-state round trips (incl. bnb's uint8 states), the manifest, falling back
from a corrupt or half-written checkpoint, pruning, and kill -9 during saves, of a helper and of a real run."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from qtrain import checkpoint as ck
from qtrain.checkpoint import Checkpoint, CheckpointError, Progress, latest_valid, prune, step_dirs, write_checkpoint
from qtrain.optimizers import make_optimizer_class
from conftest import write_config


class Position:
    def state(self):
        return {"epoch": 1, "position": 2}


def stepped_optimizer(name, numel=8192):
    """An optimizer two steps into training a (numel,) parameter (≥ 4096 elements: bnb keeps 8-bit state)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(numel // 64, 64))
    opt = make_optimizer_class(name)([p], lr=1e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    return p, opt


def flat(sd, prefix=""):
    """Every leaf of a state dict by path, with tensors compared exactly (dtype included)."""
    if isinstance(sd, dict):
        return {k: v for key, val in sd.items() for k, v in flat(val, f"{prefix}/{key}").items()}
    if isinstance(sd, (list, tuple)):
        return {f"{prefix}/type": type(sd).__name__,
                **{k: v for i, val in enumerate(sd) for k, v in flat(val, f"{prefix}/{i}").items()}}
    if isinstance(sd, torch.Tensor):
        return {prefix: (sd.dtype, tuple(sd.shape), sd.flatten().tolist())}
    return {prefix: sd}


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_optimizer_state_round_trips_exactly(tmp_path, name):
    p, opt = stepped_optimizer(name)
    path = write_checkpoint(tmp_path, Progress(step=2), {"w": p}, opt.state_dict(), Position().state(), {})
    q = torch.nn.Parameter(torch.zeros_like(p))
    fresh = make_optimizer_class(name)([q], lr=1.0)
    saver = ck.Checkpointer(tmp_path, {"w": q}, {}, "", None, None, resume_from=Checkpoint.open(path))

    class Sink:
        def restore(self, state):
            self.state = state

    sink = Sink()
    saver.restore(fresh, sink)
    assert flat(fresh.state_dict()) == flat(opt.state_dict())
    assert sink.state == {"epoch": 1, "position": 2} and torch.equal(q, p)
    if "8bit" in name:  # the quantized states and their maps survived as such
        dtypes = {v.dtype for v in load_file(str(path / "optimizer.safetensors")).values()}
        assert torch.uint8 in dtypes
    # And they keep training identically.
    for params, o in ((p, opt), (q, fresh)):
        torch.manual_seed(1)
        params.grad = torch.randn_like(params)
        o.step()
    assert torch.equal(p, q)


def test_checkpoint_layout_is_safetensors_json_and_a_manifest(tmp_path):
    p, opt = stepped_optimizer("adamw")
    path = write_checkpoint(tmp_path, Progress(step=7, losses=[1.5, 0.25]), {"w": p}, opt.state_dict(), {"epoch": 0,
                                                                                            "position": 3}, {})
    assert path == tmp_path / "step-7"
    assert sorted(os.listdir(path)) == sorted([*ck.FILES, ck.MANIFEST])
    assert [p.name for p in tmp_path.iterdir()] == ["step-7"]  # no temporary folder left behind
    manifest = ck.verify(path)
    assert manifest["step"] == 7 and set(manifest["files"]) == set(ck.FILES)
    state = json.loads((path / "state.json").read_text())
    assert state["losses"] == [1.5, 0.25] and state["data"] == {"epoch": 0, "position": 3}
    for name in ck.FILES:  # nothing is a pickle: JSON or safetensors (an 8-byte header length, then JSON)
        raw = (path / name).read_bytes()
        assert raw[:1] == b"{" or raw[8:9] == b"{", name


def make_run(root, steps):
    p, opt = stepped_optimizer("adamw", numel=256)
    for s in steps:
        write_checkpoint(root, Progress(step=s), {"w": p}, opt.state_dict(), {"epoch": 0, "position": s}, {})


def test_corrupt_and_unfinished_checkpoints_are_skipped_for_the_previous_one(tmp_path):
    make_run(tmp_path, [2, 3, 4])
    blob = tmp_path / "step-4" / "trainable.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    (tmp_path / "step-3" / ck.MANIFEST).unlink()
    said = []
    ckpt = latest_valid(tmp_path, said.append)
    assert ckpt.step == 2 and ckpt.state["data"]["position"] == 2
    assert "step-4" in said[0] and "does not match its checksum" in said[0]
    assert "step-3" in said[1] and "did not finish" in said[1]
    (tmp_path / "step-2" / "rng.safetensors").unlink()
    assert latest_valid(tmp_path, said.append) is None and "rng.safetensors is missing" in said[-1]


def test_a_manifest_cannot_point_outside_its_folder(tmp_path):
    make_run(tmp_path, [1])
    secret = tmp_path / "secret"
    secret.write_text("x")
    manifest = json.loads((tmp_path / "step-1" / ck.MANIFEST).read_text())
    manifest["files"]["../secret"] = {"bytes": 1, "sha256": "0"}
    (tmp_path / "step-1" / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"'\.\./secret' outside its folder"):
        Checkpoint.open(tmp_path / "step-1")


def test_keep_last_prunes_old_checkpoints_and_leftovers(tmp_path):
    make_run(tmp_path, [1, 2, 3, 10])
    (tmp_path / ".step-11.tmp-abc").mkdir()  # what a kill during a save leaves
    prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10", "step-3"]  # by step number, not by name


KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from qtrain import checkpoint as ck
    root = ck.Path(sys.argv[1])
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn_like(p); opt.step()
    ck.write_checkpoint(root, ck.Progress(step=1), {"w": p}, opt.state_dict(), {"epoch": 0, "position": 1}, {})
    calls = []
    real = ck._fsync
    def dying_fsync(path):  # a kill -9 after the N-th fsync of the second save
        calls.append(path)
        if len(calls) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        real(path)
    ck._fsync = dying_fsync
    ck.write_checkpoint(root, ck.Progress(step=2), {"w": p}, opt.state_dict(), {"epoch": 0, "position": 2}, {})
""")


@pytest.mark.parametrize("at", [1, 7])  # after the first file; after the manifest, just before the rename
def test_kill_9_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path, at):
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(tmp_path), str(at)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert [p.name for p in step_dirs(tmp_path)] == ["step-1"]  # never a half checkpoint under its final name
    assert any(p.name.startswith(".step-2.tmp-") for p in tmp_path.iterdir())
    assert latest_valid(tmp_path).step == 1
    prune(tmp_path, keep_last=3)
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]


def test_kill_9_of_a_real_run_during_saves_always_leaves_a_loadable_checkpoint(tiny_model_dir, dates_file,
                                                                            tmp_path):
    config = write_config(tmp_path, tiny_model_dir, dates_file, training={
        "max_steps": 100_000, "lr_scheduler": "constant", "save_every": 1, "keep_last": 2})
    root = tmp_path / "run" / "checkpoints"
    rng = random.Random(0)
    newest, killed_mid_save = 0, 0
    for attempt in range(2):
        args = [sys.executable, "-m", "qtrain", "run", str(config)] + (["--resume"] if attempt else [])
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and not any(int(p.name[5:]) > newest + 1 for p in step_dirs(root)):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))  # saves happen every step: most kills land in or near one
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_mid_save += any(p.name.startswith(".step-") for p in root.iterdir())
        ckpt = latest_valid(root)
        assert ckpt is not None and ckpt.step > newest
        for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
            load_file(str(ckpt.path / name))
        newest = ckpt.step
    # The run goes on from the last one and finishes; the metrics show every step once, in order.
    from qtrain.cli import main

    assert main(["run", str(config), "--resume", f"--set=training.max_steps={newest + 1}"]) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, newest + 2))
    print(f"kills that left a temporary folder (landed during a save): {killed_mid_save} of 2")
