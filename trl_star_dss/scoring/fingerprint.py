"""What a guard is, for its cache id (issue 33): a cheap fingerprint of a checkpoint's files, of a hub snapshot or of
a Python rule's code, so scores cached by a guard are never reused once the guard has changed under the same name
(a checkpoint retrained into the same folder, a new hub revision, an edited `module:function` rule)."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os

from ..errors import STARDSSError


# Weight files are hashed by their size and their first and last MiB only: a guard's weights are several GB (Llama
# Guard 3 8B: 16 GB), which a full hash would read on every start-up, even a fully cached one. A retrained checkpoint
# changes its tensors, whose bytes fill the whole file (safetensors: header first, data after), so both ends move.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")
EDGE_BYTES = 1 << 20
# Any other file (config.json, tokenizer files, chat template, *.index.json) is hashed whole unless it is this large.
WHOLE_FILE_LIMIT = 64 << 20


def _file_digest(path: str, size: int, edges_only: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if edges_only and size > 2 * EDGE_BYTES:
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
        else:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: str) -> str:
    """A digest of a local checkpoint: every file's name and size, the whole content of its small files and the first
    and last MiB of its weight files. Modification times are left out: a copy changes them, not the guard. Only the
    folder's own files count, the ones `from_pretrained` reads (not subfolders such as training checkpoints)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        edges_only = name.endswith(WEIGHT_SUFFIXES) or size > WHOLE_FILE_LIMIT
        digest.update(f"{name}\0{size}\0{_file_digest(path, size, edges_only)}\n".encode())
    return digest.hexdigest()[:16]


def hub_revision(repo_id: str) -> str | None:
    """The commit of the locally cached snapshot of a hub guard (the one `from_pretrained` loads offline), or None
    when it is not downloaded yet: the guard then loads (and downloads) only to score, and the id it gets after that
    names the commit (`completes_id`)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        path = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repository id: loading will say so
        return None
    if not isinstance(path, str):
        return None
    # .../models--org--name/snapshots/<commit>/config.json
    return os.path.basename(os.path.dirname(path))


def code_fingerprint(target) -> str:
    """A digest of a Python rule's code: its source (`inspect.getsource`) where Python can find it, else its code
    object's bytecode and constants (a function built at run time). A class is read as its whole source."""
    try:
        text = inspect.getsource(target).encode()
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        if code is None:
            return "unknown"  # a builtin or C function: nothing to read
        text = code.co_code + repr(code.co_consts).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def python_rule(spec: str):
    """The object a `module:function` spec names (a function, a `Guardrail` or a `Guardrail` class)."""
    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise STARDSSError(
            f"Guardrail {spec!r} is neither an existing path nor an importable `module:function` ({error}). "
            "Give a hub id or local model path, or `package.module:function` for a Python rule."
        ) from error


def is_python_rule(spec: str) -> bool:
    return not os.path.exists(spec) and ":" in spec


def spec_fingerprint(spec: str) -> dict:
    """What a guard spec is now: `{"code": ...}` for a Python rule, `{"files": ...}` for a local checkpoint,
    `{"revision": ...}` for a hub id (None while it is not downloaded)."""
    if is_python_rule(spec):
        target = python_rule(spec)
        # A rule names a function or a class; an object (a guard instance) is what its class's code makes it.
        named = target if inspect.isfunction(target) or inspect.isclass(target) else type(target)
        return {"code": code_fingerprint(named)}
    if os.path.isdir(spec):
        return {"files": folder_fingerprint(spec)}
    if os.path.isfile(spec):
        size = os.path.getsize(spec)
        return {"files": _file_digest(spec, size, edges_only=True)[:16]}
    return {"revision": hub_revision(spec)}


def completes_id(earlier: str, now: str) -> bool:
    """Whether `now` is `earlier` with the hub revisions it could not know yet filled in: the id a hub guard gets once
    it is downloaded, for scores that guard made in the same run."""
    import json

    try:
        before, after = json.loads(earlier), json.loads(now)
    except (TypeError, ValueError):
        return False
    if not isinstance(before, dict) or not isinstance(after, dict):
        return False
    if {k: v for k, v in before.items() if k != "fingerprint"} != {
        k: v for k, v in after.items() if k != "fingerprint"
    }:
        return False
    old, new = before.get("fingerprint") or [], after.get("fingerprint") or []
    return len(old) == len(new) and all(a == b or a == {"revision": None} for a, b in zip(old, new))
