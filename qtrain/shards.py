"""Safetensors shards read and written one tensor at a time, with the index transformers reads.

`safetensors.torch.save_file` needs every tensor of a file in memory and then copies them all into one bytes
buffer, so writing a 2 GiB shard costs 4 GiB. `ShardWriter.add` instead appends each tensor's bytes to the open
shard's body file as it arrives and records its header entry (dtype, shape, offsets); when the body reaches
the size limit, the header is written and the body appended behind it. Memory holds one tensor at a time.

`ShardReader` is the reading side, for the loader: `safe_open` maps the whole file and hands out views of it,
so every page a load has read stays in the process's RSS until the file is closed and no tensor views it
(measured on a 1.1B load: the open shard's full size). `ShardReader.get_tensor` reads one tensor into its own
buffer with plain reads; the file's pages go to the kernel's page cache, not to the process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from qtrain.errors import QTrainError


# safetensors' dtype names, for reading and (inverted) for writing
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class ShardReader:
    """A safetensors file with `safe_open`'s `keys()` and `get_tensor(key)`, each tensor read into new memory."""

    def __init__(self, path: Path):
        import struct

        self.path = Path(path)
        self.file = open(self.path, "rb", buffering=0)
        try:
            (n,) = struct.unpack("<Q", self.file.read(8))
            if n > self.path.stat().st_size:
                raise ValueError(f"header length {n} is past the end of the file")
            self.entries: dict[str, dict[str, Any]] = json.loads(self.file.read(n))
            if not isinstance(self.entries, dict):
                raise ValueError("the header is not a JSON object")
        except (struct.error, ValueError) as e:
            self.file.close()
            raise QTrainError(f"{self.path}: not a readable safetensors file ({e}); re-save the checkpoint with "
                              "transformers' save_pretrained") from None
        self.entries.pop("__metadata__", None)
        self.start = 8 + n

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def keys(self):
        return self.entries.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        if entry["dtype"] not in DTYPES:
            raise QTrainError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']}, which qtrain cannot read")
        begin, end = entry["data_offsets"]
        out = torch.empty(end - begin, dtype=torch.uint8)
        view, filled = memoryview(out.numpy()), 0
        self.file.seek(self.start + begin)
        while filled < len(view):  # one read() returns at most ~2 GiB on Linux
            got = self.file.readinto(view[filled:])
            if not got:
                raise QTrainError(f"{self.path}: tensor {key!r} ends past the end of the file (truncated "
                                  "download?); fetch or save the checkpoint again")
            filled += got
        return out.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


class ShardWriter:
    """Tensors cast to `dtype`, in shards of about `max_bytes`, named model-0000i-of-0000n by `finish`."""

    DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

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
        self.entries[key] = {"dtype": self.DTYPE_NAMES[t.dtype], "shape": list(t.shape),
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
