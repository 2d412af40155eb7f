"""Safetensors shards written while the tensors stream in, with the index transformers reads.

`safetensors.torch.save_file` needs every tensor of a file in memory and then copies them all into one bytes
buffer, so writing a 2 GiB shard costs 4 GiB. `ShardWriter.add` instead appends each tensor's bytes to the open
shard's body file as it arrives and records its header entry (dtype, shape, offsets); when the body reaches
the size limit, the header is written and the body appended behind it. Memory holds one tensor at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch


class ShardWriter:
    """Tensors cast to `dtype`, in shards of about `max_bytes`, named model-0000i-of-0000n by `finish`."""

    DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}

    def __init__(self, folder: Path, dtype: torch.dtype, max_bytes: int):
        self.folder, self.dtype, self.max_bytes = folder, dtype, max_bytes
        self.entries: dict[str, dict[str, Any]] = {}  # the open shard's header
        self.body = None
        self.offset = 0
        self.files: list[list[str]] = []
        self.keys: set[str] = set()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.added_keys: set[str] = set()
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        assert key not in self.keys, f"duplicate tensor {key}"
        t = (tensor.to(self.dtype) if tensor.is_floating_point() else tensor).contiguous().cpu()
        if self.body is None:
            self.body = open(self.folder / f"body-{len(self.files)}.bin", "wb")
        raw = t.reshape(-1).view(torch.uint8).numpy()  # the tensor's bytes, no copy
        self.body.write(memoryview(raw))
        self.entries[key] = {"dtype": self.DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + raw.nbytes]}
        self.offset += raw.nbytes
        self.total += raw.nbytes
        self.keys.add(key)
        self.shapes[key] = tuple(t.shape)
        if self.offset >= self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        import struct

        if self.body is None:
            return
        self.body.close()
        body = self.folder / f"body-{len(self.files)}.bin"
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format allows space padding; keeps the data 8-byte aligned
        with open(self.folder / f"part-{len(self.files)}.safetensors", "wb") as out, open(body, "rb") as src:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(src, out, 16 * 2**20)
        body.unlink()
        self.files.append(list(self.entries))
        self.entries, self.body, self.offset = {}, None, 0

    def finish(self) -> int:
        self._flush()
        n = len(self.files)
        weight_map = {}
        for i, keys in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"part-{i}.safetensors").rename(self.folder / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return n
