"""Memory moved to the host: offloaded checkpoints and input embeddings kept in CPU memory.

**Offloaded checkpoints** (`training.activation_offload`). Under gradient checkpointing each decoder block keeps
one tensor on the device between its forward and its backward: its input, (tokens × hidden) in the compute
dtype, L of them in all (at 128k tokens on an 8B model, 32 GiB). `ActivationOffload` moves each of them to
host memory during forward and brings it back one block ahead of need during backward:

- forward: the copy runs on a side stream into pinned host memory (`non_blocking`), after the compute stream has
  produced the tensor (`wait_stream`); `record_stream` keeps the allocator from handing the device memory to
  anyone else before the copy has read it, so the compute stream never waits. The host memory is a few
  power-of-two pieces per input (torch's pinned allocator would round one block up to a power of two).
- backward: when block i's recompute asks for its input, the copy back of block i-1's input is started on the
  side stream, so it overlaps block i's recompute and backward; block i itself waits only for its own copy
  (`wait_stream`), which was started one block earlier. The fetched tensor is `record_stream`-ed on the compute
  stream, which is where it is used and freed.
On a CPU the "host" is the same memory: the tensor is copied out to the pieces and back, the same code without
streams or pinning (the tests check the mechanism and that the gradients are bit-identical: the same bytes come
back).

Why saved-tensor hooks around `torch.utils.checkpoint` rather than a checkpoint wrapper of our own: the
non-reentrant checkpoint already saves its inputs as autograd saved tensors (`_CheckpointFrame.save_inputs`,
outside its own hooks), so an ambient `torch.autograd.graph.saved_tensors_hooks` pair sees exactly those inputs
and nothing inside the block (there the checkpoint's own hooks are innermost). Offload is then a layer around
the unchanged checkpoint call (`qtrain.modeling._checkpoint`): the recompute, RNG replay, early stop and the
recompute-tail skip stay torch's and qtrain's code, and the only tensor moved is the one the hook recognises as
the block's hidden-state input (`t is hidden`); the rotary tables and masks shared by every block stay put.
A wrapper that moved its own input would have to re-implement the frame bookkeeping the checkpoint does.

**Input embeddings on the host** (`model.embeddings_on_host`). The frozen embedding table is only ever read a
few rows at a time, yet takes vocab × hidden × 2 bytes of the card (1 GiB on Llama-3-8B). `HostEmbedding` keeps
it in host memory: the ids stay on the host (`qtrain.train.host_inputs`), the rows are gathered there into a
pinned buffer and sent to the device with an asynchronous copy. A gather is exact, so the numbers are those of
the device table. The table is frozen (no gradient needed); a tied table is also the output head, which must
multiply on the device, so tied models keep it there (`put_embeddings_on_host` refuses them).
"""

from __future__ import annotations

import contextlib
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.errors import QTrainError
from qtrain.memory import PINNED_PIECE, pinned_pieces


class _Held:
    """One block input in host memory, as byte pieces (`pieces`); `device` is its copy back while it is on the
    device."""

    __slots__ = ("pieces", "nbytes", "shape", "dtype", "home", "device", "prev", "__weakref__")

    def __init__(self, pieces: list[torch.Tensor], t: torch.Tensor, prev: "weakref.ref[_Held] | None"):
        self.pieces, self.nbytes, self.shape, self.dtype = pieces, t.nbytes, t.shape, t.dtype
        self.home = t.device  # the device the block input came from
        self.device: torch.Tensor | None = None
        self.prev = prev  # the block input saved just before this one: backward needs it next


def _spans(held_bytes: int, pieces: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, int, int]]:
    """(piece, start, length): where each piece's bytes lie in the tensor (the last piece may be longer)."""
    start = 0
    for piece in pieces:
        n = min(piece.numel(), held_bytes - start)
        yield piece, start, n
        start += n


class ActivationOffload:
    """Saved-tensor hooks that move each checkpointed block's input to host memory (module docstring).

    One instance per model, shared by its blocks. `stats` counts what happened, for tests and logs: inputs
    offloaded, copies back started one block ahead (`prefetched`) or only when needed (`late`: the first block
    backward reaches, and any input whose predecessor was gone), and the host bytes held at most.

    Host memory: torch's pinned allocator rounds each block up to a power of two, so one 768 MiB input would
    take 1 GiB. Each input is held instead in power-of-two pieces (`qtrain.memory.pinned_pieces`: 512 + 256 MiB)
    that waste less than `piece` bytes, copied out and back with one copy per piece. On a CPU the pieces are
    plain memory of their exact length (the same code, tested there)."""

    def __init__(self, piece: int = PINNED_PIECE) -> None:
        self.piece = piece
        self._stream: torch.cuda.Stream | None = None
        self._last: weakref.ref[_Held] | None = None
        self._host_bytes = 0
        self.stats = {"offloaded": 0, "prefetched": 0, "late": 0, "host_bytes_peak": 0}

    @contextmanager
    def around(self, hidden: torch.Tensor) -> Iterator[None]:
        """Offload `hidden` if the code inside saves it for backward (the checkpoint call of one block)."""
        def pack(t: torch.Tensor):
            return self._offload(t) if t is hidden else t

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    def _side(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _offload(self, t: torch.Tensor) -> _Held:
        cuda = t.device.type == "cuda"
        flat = t.detach().contiguous().view(-1).view(torch.uint8)  # the input's bytes (a view: it is contiguous)
        sizes = pinned_pieces(flat.numel(), self.piece)
        if sizes and not cuda:
            sizes[-1] = flat.numel() - sum(sizes[:-1])  # plain memory: the last piece of its exact length
        side = self._side(t.device) if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream(t.device))  # the input is complete before it is read
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            pieces = [torch.empty(size, dtype=torch.uint8, pin_memory=cuda) for size in sizes]
            for piece, start, n in _spans(flat.numel(), pieces):
                piece[:n].copy_(flat[start:start + n], non_blocking=cuda)
        if cuda:
            flat.record_stream(side)  # its memory is not reused until the side stream has read it
        held = _Held(pieces, t, self._last)
        self._last = weakref.ref(held)
        host = sum(p.numel() for p in pieces)
        weakref.finalize(held, self._freed, host)
        self._host_bytes += host
        self.stats["offloaded"] += 1
        self.stats["host_bytes_peak"] = max(self.stats["host_bytes_peak"], self._host_bytes)
        return held

    def _freed(self, nbytes: int) -> None:
        self._host_bytes -= nbytes

    def _fetch(self, held: _Held, device: torch.device) -> None:
        """Start the copy back of `held` (on CUDA on the side stream, behind its own copy out)."""
        cuda = device.type == "cuda"
        with torch.cuda.stream(self._side(device)) if cuda else contextlib.nullcontext():
            out = torch.empty(held.nbytes, dtype=torch.uint8, device=device)
            for piece, start, n in _spans(held.nbytes, held.pieces):
                out[start:start + n].copy_(piece[:n], non_blocking=cuda)
        held.device = out.view(held.dtype).view(held.shape)

    def _unpack(self, held):
        if not isinstance(held, _Held):
            return held
        device = held.home
        if held.device is None:
            self._fetch(held, device)
            self.stats["late"] += 1
        t, held.device = held.device, None  # ours no more: freed once the block's backward is done with it
        if device.type == "cuda":
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(self._side(device))  # its copy back (started a block ago) is complete
            t.record_stream(compute)  # allocated on the side stream, used and freed on this one
        prev = held.prev() if held.prev is not None else None
        if prev is not None and prev.device is None:
            self._fetch(prev, device)  # overlaps this block's recompute and backward
            self.stats["prefetched"] += 1
        return t


# ------------------------------------------------------------------------------------------------ embeddings


class HostEmbedding(nn.Module):
    """A frozen `nn.Embedding` whose table stays in host memory; looked-up rows go to `device` (module docstring).

    The table keeps its parameter name (`weight`), so state dicts and adapter files do not change, and device
    moves of the model (`.to()`, `.cuda()`) leave it on the host: that is the point of the module."""

    def __init__(self, embedding: nn.Embedding, device: torch.device):
        super().__init__()
        # ordinary host memory: only the CPU reads the table (the gather); the rows it gathers go to a pinned
        # buffer for the copy. Pinned, the table would take a power of two of page-locked memory (torch's pinned
        # allocator rounds up: 2 GiB for Llama-3-8B's 0.98 GiB table) for nothing.
        self.weight = nn.Parameter(embedding.weight.detach().to("cpu"), requires_grad=False)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.device = device

    def _apply(self, fn, recurse: bool = True):
        return self  # the table stays where it is whatever device or dtype the model is moved to

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to("cpu")
        if self.device.type != "cuda":
            return F.embedding(ids, self.weight, self.padding_idx).to(self.device)
        rows = torch.empty((*ids.shape, self.embedding_dim), dtype=self.weight.dtype, pin_memory=True)
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows.view(-1, self.embedding_dim))  # (B·T, H)
        return rows.to(self.device, non_blocking=True)  # the pinned-memory allocator tracks the copy's use

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on the host"


def put_embeddings_on_host(model: nn.Module, device: torch.device) -> HostEmbedding:
    """Replace `model`'s input embeddings by a `HostEmbedding` on the host (its device copy is freed)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        raise QTrainError("model.embeddings_on_host: true, but this model ties its input embeddings to the output "
                          "head, which multiplies on the device; set model.embeddings_on_host: auto or false")
    if type(emb) is not nn.Embedding or emb.weight.requires_grad:
        raise QTrainError(f"model.embeddings_on_host: true needs the model's own frozen nn.Embedding, found "
                          f"{type(emb).__name__} (a method that replaces or trains the input embeddings, e.g. "
                          "prompt_tuning or unfreeze); set model.embeddings_on_host: false")
    host = HostEmbedding(emb, device)
    model.set_input_embeddings(host)
    return host
