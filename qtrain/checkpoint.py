"""Checkpoints: everything a run needs to continue bit for bit, written so that a crash never leaves half of one.

`output.dir/checkpoints/step-N/` holds
    trainable.safetensors   the trainable parameters, by their names in the model
    optimizer.safetensors   every tensor of the optimizer state (bnb's uint8 states, quantization maps, absmax)
    optimizer.json          the rest of the optimizer state (param groups, counters), tensors replaced by references
    rng.safetensors         torch's CPU (and CUDA) generator states
    state.json              steps done, losses so far, data position, python/numpy RNG, grad-scaler state, config
    manifest.json           size and sha256 of each file above; written last

No pickle anywhere: tensors go to safetensors, everything else to JSON. A checkpoint is written into a temporary
sibling folder (same filesystem), each file fsynced, then the manifest, then the folder is renamed to `step-N`
and the parent fsynced: a folder under its final name is complete. Resuming still verifies the manifest, and
falls back to the previous checkpoint, saying why, when one is incomplete or corrupt (a lying disk, a copy cut
short). The learning-rate schedule is a pure function of the step, so the step count is the scheduler state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qtrain.errors import QTrainError
from qtrain.sharding import distribute_like, full_optimizer_state, full_tensors, sharded_optimizer_state

FORMAT = 1
MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json")
_STEP_DIR = re.compile(r"step-(\d+)")

# Keys that may differ between a checkpoint's config and the resuming config without changing the maths of the
# steps still to run: where things are written, how often, and what is reported. Everything else is refused
# (unless --allow-config-change), because the resumed run would no longer equal the uninterrupted one.
RESUME_SAFE_KEYS = ("logging", "output", "eval", "data.eval", "training.save_every", "training.keep_last",
                    "training.log_every", "training.max_bad_steps", "training.eval_every", "training.memory_budget",
                    # the same bytes either way (qtrain.offload): where a tensor waits is not the maths
                    "training.activation_offload", "model.embeddings_on_host")
# A checkpoint's optimizer state is one optimizer's layout: no other can take it, --allow-config-change or not.
UNCHANGEABLE_KEYS = ("training.optimizer",)
# The run's length sets the cosine/linear decay, so it may change only under a constant schedule.
LENGTH_KEYS = ("training.max_steps", "training.epochs")


class CheckpointError(QTrainError):
    """A checkpoint folder is missing, incomplete or corrupt, or does not belong to this run."""


@dataclass
class Progress:
    """The loop's counters: what a checkpoint stores besides tensors."""

    step: int = 0  # optimizer steps done (skipped ones included: they consumed data and a place in the schedule)
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    skipped: int = 0  # non-finite steps skipped over the whole run
    seconds: float = 0.0  # training time before this process started


# ------------------------------------------------------------------------------------------------ writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure of `obj`, its tensors moved to `tensors` under path-like names."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").clone()  # clone: bnb shares one qmap between params
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__items__": [[k, _encode(v, f"{key}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    assert obj is None or isinstance(obj, (bool, int, float, str)), f"cannot store {type(obj).__name__} at {key}"
    return obj


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__items__"]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {"python": [version, list(mt), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}, tensors


def _set_rng_state(saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, mt, gauss = saved["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def write_checkpoint(root: Path, progress: Progress, params: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                     data_position: dict[str, int], extra: dict[str, Any]) -> Path:
    """Write `root/step-N` atomically (temporary sibling, fsync, manifest, rename); returns its path.
    `params` and `optimizer_state` (`optimizer.state_dict()`) are whole tensors, as one process holds them."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{progress.step}.tmp-", dir=root))
    try:
        # copies: parameters in an optimizer segment share one buffer (qtrain.optimizers._Segment)
        save_file({n: p.detach().to("cpu", copy=True).contiguous() for n, p in params.items()},
                  str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
        opt_tensors: dict[str, torch.Tensor] = {}
        structure = _encode(optimizer_state, "optimizer", opt_tensors)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(structure))
        rng, rng_tensors = _rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"format": FORMAT, "step": progress.step, "tokens": progress.tokens,
                 "losses": [x if math.isfinite(x) else None for x in progress.losses],  # JSON has no NaN
                 "skipped": progress.skipped, "seconds": progress.seconds, "data": data_position, "rng": rng,
                 **extra}
        (tmp / "state.json").write_text(json.dumps(state))
        for name in FILES:
            _fsync(tmp / name)
        manifest = {"format": FORMAT, "step": progress.step,
                    "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in FILES}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        shutil.rmtree(final, ignore_errors=True)  # a step saved before (see Checkpointer.save)
        os.replace(tmp, final)
        _fsync(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def prune(root: Path, keep_last: int | None) -> None:
    """Remove all but the `keep_last` newest step folders, and temporary folders left by a killed save."""
    if root.is_dir():
        for stale in root.glob(".step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if keep_last is None:
        return
    for path in step_dirs(root)[keep_last:]:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ reading


def step_dirs(root: Path) -> list[Path]:
    """`step-N` folders under `root`, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _inside(folder: Path, name: str, what: str) -> Path:
    """`folder/name`, refusing a name or a link that would leave the folder (`../x`, `/etc/x`, `a/b`)."""
    bad = not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0")
    if bad or (folder / name).is_symlink():
        raise CheckpointError(f"{folder}: {what} names a file {name!r} outside its folder; refusing to read it")
    return folder / name


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of `folder` after checking every file's size and sha256; CheckpointError says what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{folder}: no readable {MANIFEST} (the save did not finish)") from None
    missing = set(FILES) - set(files)
    if missing:
        raise CheckpointError(f"{folder}: the manifest lacks {sorted(missing)}")
    for name, meta in files.items():
        path = _inside(folder, name, MANIFEST)
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        if not isinstance(meta, dict) or path.stat().st_size != meta.get("bytes") or _sha256(path) != meta.get(
                "sha256"):
            raise CheckpointError(f"{folder}: {name} does not match its checksum in {MANIFEST} (corrupt)")
    return manifest


@dataclass
class Checkpoint:
    """A verified checkpoint folder and its state.json."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @classmethod
    def open(cls, folder: Path) -> "Checkpoint":
        verify(folder)
        state = json.loads((folder / "state.json").read_text())
        if state.get("format") != FORMAT:
            raise CheckpointError(f"{folder}: checkpoint format {state.get('format')!r}; this qtrain reads {FORMAT}")
        return cls(folder, state)


def latest_valid(root: Path, say: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest checkpoint under `root` that verifies; each one skipped is reported through `say`."""
    for folder in step_dirs(root):
        try:
            return Checkpoint.open(folder)
        except CheckpointError as e:
            say(f"qtrain: skipping checkpoint {folder.name}: {e}; trying the previous one")
    return None


def find_checkpoint(path: Path, say: Callable[[str], None] = print) -> Checkpoint | None:
    """A checkpoint from `--resume PATH`: a `step-N` folder, a `checkpoints/` folder or a run folder."""
    if (path / MANIFEST).exists() or _STEP_DIR.fullmatch(path.name):
        return Checkpoint.open(path)
    root = path if path.name == "checkpoints" else path / "checkpoints"
    return latest_valid(root, say)


# ------------------------------------------------------------------------------------------------ resuming


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        return _flatten(dict(enumerate(d)), prefix)
    return {prefix[:-1]: d}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every key that differs and matters to the maths."""
    a, b = _flatten(saved), _flatten(current)
    constant = a.get("training.lr_scheduler") == b.get("training.lr_scheduler") == "constant"
    changed = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or any(key == s or key.startswith(s + ".") for s in RESUME_SAFE_KEYS):
            continue
        if constant and key in LENGTH_KEYS:
            continue
        changed.append((key, a.get(key), b.get(key)))
    return changed


def check_resumable(ckpt: Checkpoint, config: dict[str, Any], fingerprint: str, allow_change: bool,
                    say: Callable[[str], None] = print) -> None:
    """Refuse to resume under a config that changes the training maths, naming each differing key."""
    if ckpt.state.get("config_hash") == fingerprint:
        return
    changed = config_changes(ckpt.state.get("config", {}), config)
    if not changed:
        return
    for key, old, new in changed:
        if key in UNCHANGEABLE_KEYS:
            raise CheckpointError(f"--resume: {ckpt.path} holds the state of {key}: {old!r}, which {new!r} cannot "
                                  f"take, even under --allow-config-change; resume with {key}: {old!r}, or start a "
                                  "new run in another output.dir")
    listed = "; ".join(f"{k}: {old!r} → {new!r}" for k, old, new in changed)
    if allow_change:
        say(f"qtrain: resuming under a changed config ({listed}); the result will differ from an uninterrupted run")
        return
    raise CheckpointError(f"--resume: {ckpt.path} was written under a different config ({listed}); resuming "
                          "would not give the run you started. Resume with the original values, start a new run "
                          "in another output.dir, or pass --allow-config-change to resume anyway")


# what a run has written before its first checkpoint: a folder holding only these (and no step-N folder, valid or
# not) has nothing to resume and nothing to lose, and `--resume` starts the run there again
BEFORE_FIRST_SAVE = {"config.yaml", "metrics.jsonl", "tensorboard", "checkpoints"}


def resume_point(out: Path, resume: str, say: Callable[[str], None] = print) -> Checkpoint | None:
    """The verified checkpoint `--resume` means. "latest": the newest valid one in `out`; a fresh `out`, or one
    whose run stopped before its first checkpoint, just starts the run (so a job script can always pass
    --resume). `check_resumable` then compares configs."""
    if resume == "latest":
        ckpt = latest_valid(out / "checkpoints", say)
        if ckpt is None:
            held = {f.name for f in out.iterdir()} if out.is_dir() else set()
            if held <= {"config.yaml"}:  # as prepare_output_dir: no run there
                say(f"qtrain: --resume: no checkpoint in {out} yet; starting the run")
                return None
            if held <= BEFORE_FIRST_SAVE and not step_dirs(out / "checkpoints"):
                say(f"qtrain: --resume: the run in {out} stopped before its first checkpoint; starting it again "
                    "(its metrics.jsonl is replaced)")
                return None
            # not "pass --overwrite": beside --resume it is refused; it replaces --resume
            raise CheckpointError(f"--resume: {out} holds no valid checkpoint to resume from; to start the run "
                                  "again there, run without --resume and with --overwrite (it replaces that "
                                  "run's files), or choose a new output.dir")
    else:
        path = Path(resume).expanduser()
        if not path.exists():
            raise CheckpointError(f"--resume: {path} does not exist; give a checkpoints/step-N folder or a run folder")
        ckpt = find_checkpoint(path, say)
        if ckpt is None:
            raise CheckpointError(f"--resume: no valid checkpoint in {path}")
    return ckpt


def check_trainable_matches(ckpt: Checkpoint, params: dict[str, nn.Parameter]) -> None:
    """Refuse a checkpoint whose trainable tensors are not this run's, by name and shape (another rank, other
    target modules, another base), before the run folder is touched; `Checkpointer.restore` would fail later."""
    from safetensors import safe_open

    with safe_open(str(ckpt.path / "trainable.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    missing, extra = sorted(set(params) - set(shapes)), sorted(set(shapes) - set(params))
    if missing or extra:
        raise CheckpointError(f"--resume: {ckpt.path}: its trainable parameters do not match this run's (missing "
                              f"{missing[:3]}, unexpected {extra[:3]}); resume with the config that wrote it")
    other = [(n, shapes[n], tuple(p.shape)) for n, p in params.items() if shapes[n] != tuple(p.shape)]
    if other:
        listed = "; ".join(f"{n}: {a} there, {b} here" for n, a, b in other[:3])
        raise CheckpointError(f"--resume: {ckpt.path}: {len(other)} trainable tensors have other shapes than "
                              f"this run's ({listed}); resume with the config (peft rank, model) that wrote it")


def check_same_length(ckpt: Checkpoint, total_steps: int, lr_scheduler: str, allow_change: bool,
                      say: Callable[[str], None] = print) -> None:
    """A run's length sets its decay schedule: refuse a changed length (e.g. an epochs-based run whose data grew)
    unless the schedule is constant."""
    saved = int(ckpt.state["total_steps"])
    if saved == total_steps or lr_scheduler == "constant":
        return
    message = (f"--resume: this run is now {total_steps} optimizer steps long, {ckpt.path} was written by a run of "
               f"{saved} (did data.train change?); its {lr_scheduler} schedule would change")
    if not allow_change:
        raise CheckpointError(message + ". Restore the data, or pass --allow-config-change to resume anyway")
    say(f"qtrain: {message}")


@dataclass
class Checkpointer:
    """What the training loop needs to save and restore checkpoints of one run."""

    root: Path  # output.dir/checkpoints
    params: dict[str, nn.Parameter]
    config: dict[str, Any]
    fingerprint: str
    save_every: int | None
    keep_last: int | None
    resume_from: Checkpoint | None = None
    writer: bool = True  # only the main process writes
    say: Callable[[str], None] = print
    last_saved: Path | None = None

    def __post_init__(self) -> None:
        if self.resume_from is not None and self.last_saved is None:
            self.last_saved = self.resume_from.path

    def due(self, step: int) -> bool:
        return self.save_every is not None and step % self.save_every == 0

    def save(self, progress: Progress, optimizer, batches, total_steps: int, scaler=None) -> Path | None:
        # a sharded run's tensors are gathered whole first, by every process (collectives), then written by one
        params = full_tensors(self.params)
        optimizer_state = full_optimizer_state(optimizer.state_dict())
        bad = [n for n, p in params.items() if not torch.isfinite(p).all()]
        if bad:  # never replace good checkpoints with broken weights
            self.say(f"qtrain: not saving step {progress.step}: non-finite values in {bad[:3]}")
            return None
        if not self.writer:
            return None
        # Checkpoints at or after this step are from a future abandoned by resuming an older one: drop them
        # first, so pruning keeps the newest of *this* history (older ones, the resume point included, stay).
        for path in step_dirs(self.root):
            if int(path.name.split("-")[1]) >= progress.step:
                shutil.rmtree(path, ignore_errors=True)
        extra = {"total_steps": total_steps, "config_hash": self.fingerprint, "config": self.config,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        self.last_saved = write_checkpoint(self.root, progress, params, optimizer_state, batches.state(), extra)
        prune(self.root, self.keep_last)
        return self.last_saved

    def restore(self, optimizer, batches, scaler=None) -> Progress:
        """Load weights, optimizer, data position and RNG from `resume_from`; the loop's counters to go on from."""
        ckpt = self.resume_from
        if ckpt is None:
            return Progress()
        check_trainable_matches(ckpt, self.params)
        saved = load_file(str(ckpt.path / "trainable.safetensors"))
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(distribute_like(saved[name], p))
        structure = json.loads((ckpt.path / "optimizer.json").read_text())
        state = _decode(structure, load_file(str(ckpt.path / "optimizer.safetensors")))
        optimizer.load_state_dict(sharded_optimizer_state(state, optimizer))
        if scaler is not None and ckpt.state.get("scaler"):
            scaler.load_state_dict(ckpt.state["scaler"])
        batches.restore(ckpt.state["data"])
        _set_rng_state(ckpt.state["rng"], load_file(str(ckpt.path / "rng.safetensors")))
        s = ckpt.state
        losses = [math.nan if x is None else x for x in s["losses"]]  # a skipped step's, as the loop keeps it
        return Progress(step=s["step"], losses=losses, tokens=s["tokens"], skipped=s["skipped"],
                        seconds=s["seconds"])


# ------------------------------------------------------------------------------------------------ stopping


@contextmanager
def stop_on_signals(say: Callable[[str], None] = print) -> Iterator[Callable[[], bool]]:
    """SIGINT/SIGTERM ask the loop to stop after its current step (it then checkpoints); a second one aborts.

    Yields a function telling whether a stop was requested. Outside the main thread (where Python cannot
    install handlers) nothing is installed and the function always answers False.
    """
    requested: list[int] = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        say(f"qtrain: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
            "(send it again to abort without one)")

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
