"""The tune's memory: one JSONL file in the output folder, appended line by line, read back on restart.

The first line describes the run (model identity, sampler, steps, guidance, seeds); every later line is
one measurement (``kind`` "eval": one policy on one chunk of seeds; "timing": interleaved wall-clock
rounds). Measurements do not depend on the target, so a second tune with another target in the same
folder reuses them. A tune killed mid-write leaves at most a torn last line, which is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from stepcache.errors import ConfigError

RECORDS_NAME = "tune_records.jsonl"


class RecordStore:
    """Records by key, kept in memory and appended to ``path`` as they arrive."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        lines = self._read()
        if lines:
            if lines[0].get("kind") != "header":
                raise ConfigError(f"{self.path} is not a stepcache tune record file; choose another --out folder.")
            self._check_header(lines[0], header)
            for rec in lines[1:]:
                self.records[rec["key"]] = rec
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"kind": "header", "key": "header", **header}, sort_keys=True) + "\n")
        self.resumed = len(self.records)

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        out = []
        for n, line in enumerate(lines, 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines):  # torn by a kill mid-write: cut it off, that measurement is redone
                    self.path.write_text("".join(ln + "\n" for ln in lines[:-1]))
                    break
                raise ConfigError(f"{self.path} line {n} is not valid JSON; delete the file to start over.") from None
        return out

    def _check_header(self, old: dict, new: dict) -> None:
        for name, value in new.items():
            if json.dumps(old.get(name), sort_keys=True) != json.dumps(value, sort_keys=True):
                raise ConfigError(f"{self.path} holds a tune with another {name} ({old.get(name)!r}, now "
                                  f"{value!r}); choose another --out folder or delete the file.")

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def add(self, record: dict) -> dict:
        self.records[record["key"]] = record
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
        return record

    def __len__(self) -> int:
        return len(self.records)
