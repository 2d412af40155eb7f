"""Data files: read a JSONL, JSON, CSV or Parquet file or a `datasets` save_to_disk folder into raw rows.

Parsed here rather than by pyarrow where that names a bad row better: JSON lines by their line number (and
pyarrow's reader would turn text such as "2021-03-03" into a timestamp), CSV checked line by line before the
reader (which only says "an error occurred"), every cell read as text. A row is named in errors by
`where(file, index, lines)`: `file:line` where lines are known, else `file, example N`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qtrain.errors import DataError

_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}



def load_rows(path: str, key: str):
    """A `datasets.Dataset` of raw rows, plus row→line numbers for JSONL files (for error messages)."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{key}: {path!r} does not exist; give a JSONL/JSON/CSV/Parquet file or a "
                        "datasets save_to_disk folder")
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # not a saved dataset
            raise DataError(f"{key}: {path!r} is a folder but not a datasets save_to_disk folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{key}: {path!r} holds splits {list(ds)}; save one split, or a 'train' split")
            ds = ds["train"]
        return ds, None
    builder = _SUFFIXES.get(p.suffix.lower())
    if builder is None:
        raise DataError(f"{key}: {path!r} has an unsupported extension; use .jsonl, .json, .csv or .parquet")
    if p.stat().st_size == 0:
        raise DataError(f"{key}: {path!r} is empty; it needs at least one example")
    if builder == "json":
        # Parsed here, not by pyarrow's JSON reader: it names the bad line, and pyarrow would silently turn
        # text such as "2021-03-03" into a timestamp.
        rows, lines = _read_json(p)
        ds = _from_rows(rows, lines, p)
    else:
        lines = None
        try:
            extra = _csv_as_text(p) if builder == "csv" else {}
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True, **extra)
        except Exception as e:
            if isinstance(e, UnicodeDecodeError) or isinstance(e.__cause__, UnicodeDecodeError):  # datasets wraps it
                raise _not_utf8(p) from None
            raise DataError(f"{key}: {path!r} could not be read as {builder} ({type(e).__name__}: {e})") from None
    if len(ds) == 0:
        raise DataError(f"{key}: {path!r} is empty; it needs at least one example")
    return ds, lines


def _csv_as_text(p: Path) -> dict[str, Any]:
    """CSV cells are text: numbers and dates are not guessed, empty cells stay empty strings. The file is read
    once here first, so that what the CSV reader would only call "an error occurred" is named by its line."""
    import csv

    import datasets

    with open(p, newline="", encoding="utf-8-sig") as f:  # a byte-order mark (Excel's "CSV UTF-8") is not a name
        reader = csv.reader(f)
        header = next(reader, [])
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise DataError(f"{p}:1: the header names {twice} more than once; give each column its own name")
        rows = 0
        for row in reader:
            if row and len(row) != len(header):
                raise DataError(f"{p}:{reader.line_num}: {len(row)} fields where the header has {len(header)}; "
                                "quote cells that hold commas, or fix that line")
            rows += bool(row)
    if not rows:
        raise DataError(f"{p}: has a header and no examples; it needs at least one row under the header")
    return {"features": datasets.Features({c: datasets.Value("string") for c in header}), "keep_default_na": False}


def _not_utf8(p: Path) -> DataError:
    """The error for a file that is not UTF-8 text, naming the line of its first undecodable byte."""
    data = p.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return DataError(f"{p}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8")
    return DataError(f"{p}: not UTF-8 text; save the file as UTF-8")


def where(source: str, index: int, lines: list[int] | None) -> str:
    """Row `index` of a data file as an error names it: `file:line` where lines are known (JSONL), else its
    1-based number among the examples (a JSON array, CSV, Parquet, a saved dataset)."""
    return f"{source}:{lines[index]}" if lines else f"{source}, example {index + 1}"


def _from_rows(rows: list[dict[str, Any]], lines: list[int] | None, p: Path):
    import datasets

    keys = list(dict.fromkeys(k for row in rows for k in row))  # every row's fields, not only the first row's
    try:
        return datasets.Dataset.from_list([{k: row.get(k) for k in keys} for row in rows])
    except Exception:  # pyarrow could not unify a column's types: find the first row that differs
        first: dict[str, type] = {}
        for i, row in enumerate(rows):
            for k, v in row.items():
                if v is None:
                    continue
                if first.setdefault(k, type(v)) is not type(v):
                    raise DataError(f"{where(str(p), i, lines)}: field {k!r} is {type(v).__name__} where earlier "
                                    f"rows have {first[k].__name__}; make the column one type") from None
        raise DataError(f"{p}: the rows could not be combined into a table; check that each field has one type") \
            from None


def _read_json(p: Path) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Parse a JSON array or JSONL file; rows and their line numbers (a malformed row is named by its line).
    Lines end at "\n" (or "\r\n") only: U+2028 and its kind are text inside a JSON string, not line ends."""
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad, PowerShell) is not content
    except UnicodeDecodeError:
        raise _not_utf8(p) from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{p}: a JSON array of objects is expected (one object per example)")
        return rows, None
    rows, lines = [], []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if not rows and isinstance(_json_or_none(text), dict):  # one object over several lines
                raise DataError(f"{p}: holds one JSON object; give one example per object, as a JSON array of "
                                "objects ([{...}, {...}]) or one object per line (JSONL)") from None
            raise DataError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that line") \
                from None
        if not isinstance(row, dict):
            raise DataError(f"{p}:{n}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
        lines.append(n)
    if not rows:
        raise DataError(f"{p}: no examples in the file; it needs at least one JSON object per line")
    return rows, lines


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
