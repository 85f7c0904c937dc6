"""Atomic writes: a reader, or a run that was interrupted and resumes, never sees half a file or half a dataset
(scoring caches, reference log-probs, reports)."""

from __future__ import annotations

import os
import shutil


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` (UTF-8) beside `path`, then swap it in: a reader or an interrupted run never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_dataset_atomic(dataset, path: str) -> None:
    """Save next to `path`, then swap it in: a reader never sees half a dataset."""
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    dataset.save_to_disk(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
