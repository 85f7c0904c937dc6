"""Loading a dataset named on the command line: a local file, a `save_to_disk` directory, or a dataset id."""

from __future__ import annotations

import os

FILE_BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}


def load_dataset_arg(path: str, split: str = "train", flag: str = "--dataset"):
    """A local JSON/JSONL/CSV/Parquet file, a `save_to_disk` directory (a dataset or a dataset dict), a local
    dataset directory or a hub id. Every failure is a `ValueError` that names `flag` (the option as the user typed it)
    and the value."""
    import datasets

    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if os.path.isfile(path):
        if extension not in FILE_BUILDERS:
            raise ValueError(
                f"{flag} {path!r}: files ending in .{extension} are not read. Use .jsonl, .json, .csv or .parquet, "
                "a directory saved with `save_to_disk`, or a hub id."
            )
        return datasets.load_dataset(FILE_BUILDERS[extension], data_files=path, split=split)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
        return datasets.load_from_disk(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json")):
        return datasets.load_from_disk(path)[split]
    if not os.path.exists(path) and (extension in FILE_BUILDERS or path.startswith((os.sep, ".", "~"))):
        raise ValueError(f"{flag} {path!r} does not exist. Check the path (it is read relative to {os.getcwd()!r}).")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as error:  # the library's many failure types (offline hub, no data files, bad split)
        kind = "a directory that holds no dataset" if os.path.isdir(path) else "not a local file or directory"
        raise ValueError(
            f"{flag} {path!r} is {kind}, and loading it as a dataset id failed ({type(error).__name__}: {error}). "
            "Give a .jsonl/.json/.csv/.parquet file, a directory saved with `save_to_disk` (for scores: the "
            "`star-dss score --output` directory), or a dataset id the hub can serve."
        ) from error
