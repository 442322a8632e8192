"""What a restart needs to run a job again: its inputs, under --data-dir/inputs/<job id>/.

`request.json` holds the request's fields as they came (the seed pinned to the one the job runs
with, so a re-run makes the same video) and names a file for each uploaded file part, by field
name; the parts' bytes sit next to it. Written before the job is stored, removed when it ends.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MANIFEST = "request.json"


class JobInputs:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, job_id: str, fields: dict, files: dict[str, bytes]) -> None:
        """All or nothing: written into a hidden folder renamed into place. File parts get
        names of our own (a field name is the client's text, never a path)."""
        staging = self.root / f".{job_id}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            names = {}
            for index, (field, data) in enumerate(files.items()):
                names[field] = f"part-{index}"
                _write(staging / names[field], data)
            _write(staging / MANIFEST, json.dumps({"fields": fields, "files": names}).encode())
            os.replace(staging, self.root / job_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def load(self, job_id: str) -> tuple[dict, dict[str, bytes]] | None:
        """(fields, {field name: bytes}), or None when the job has no stored inputs."""
        folder = self.root / job_id
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            files = {field: (folder / name).read_bytes()
                     for field, name in manifest["files"].items()}
        except (OSError, ValueError, KeyError):
            return None
        return manifest["fields"], files

    def has(self, job_id: str) -> bool:
        return (self.root / job_id / MANIFEST).is_file()

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def job_ids(self) -> list[str]:
        """Jobs with stored inputs (and leftovers of a save cut short, as `.<id>.partial`)."""
        return [path.name for path in self.root.iterdir()]


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
