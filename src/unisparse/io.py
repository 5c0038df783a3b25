"""Artifact files: written atomically, with the user's permissions, carrying content hashes.

A file or model directory appears under its final name complete or not at all. Model directories
carry a ``SHA256SUMS`` manifest (``sha256sum -c`` format) written at save and verified at load, so a
flipped byte is an error naming the file, not a silently different model; ``directory_digest`` (the
hash of that manifest) identifies a model directory's content in the records of derived artifacts
(calibration sidecars, tuning checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "SHA256SUMS"
#: files in a model directory that are not its content: the manifest, and the marker Snakemake writes
#: into every directory output
NOT_CONTENT = (MANIFEST, ".snakemake_timestamp")
#: set to 1 to load a model directory that has no ``SHA256SUMS`` (a hand-made one); its content is then unverified
ALLOW_UNVERIFIED_ENV = "UNISPARSE_ALLOW_UNVERIFIED"
#: a temporary directory of another host is discarded once this old (its writer's pid cannot be checked)
STALE_AFTER_S = 24 * 3600
#: config entries that say where or with what a model was loaded, not what it is
#: (``_use_default_values``: diffusers lists those keys in set order, which changes between processes)
VOLATILE_CONFIG_KEYS = (
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "_commit_hash",
    "_use_default_values",
)


class IntegrityError(ValueError):
    """An artifact whose content does not match its recorded hash, or a model whose files do not
    match its config (missing, unexpected or mis-shaped tensors)."""


class NonFiniteError(ValueError):
    """A model or a run holding non-finite values (a diverged training, a NaN weight): refused
    rather than saved or used, since every later stage would silently work on it."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path) -> None:
    """Give a finished temporary artifact the modes a plain ``open``/``mkdir`` would have given it
    (mkdtemp and some writers use 0700/0600, which hides artifacts from the rest of a group)."""
    mask = _umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def _tmp_prefix(final: Path) -> str:
    """``.<name>.tmp-<host>-<pid>-``: a leftover names its writer, so the next write can tell a dead
    writer's debris from a live concurrent writer's work (``discard_leftovers``)."""
    return f".{final.name}.tmp-{_host()}-{os.getpid()}-"


def _writer_alive(host: str, pid: str) -> bool | None:
    """Whether the process that made a temporary is still running (None: another host, unknown)."""
    if host != _host():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def discard_leftovers(final: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers left beside ``final`` (a SIGKILL skips the cleanup
    of ``atomic_path``): those of a dead process on this host, those of another host older than
    ``STALE_AFTER_S``, and those of the earlier unnamed format. A live writer's is kept. Returns what
    was removed."""
    final = Path(final)
    removed = []
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        tail = tmp.name[len(f".{final.name}.tmp-") :]
        parts = tail.rsplit("-", 2)
        alive = _writer_alive(parts[0], parts[1]) if len(parts) == 3 and parts[1].isdigit() else False
        if alive is None:
            try:
                alive = time.time() - tmp.lstat().st_mtime < STALE_AFTER_S
            except FileNotFoundError:
                continue
        if not alive:
            log.info("discarding %s, left by an interrupted write", tmp)
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(
                missing_ok=True
            )
            removed.append(tmp)
    return removed


@contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False):
    """Yield a temporary sibling path; on success rename it to ``final`` (replacing what was there).

    The temporary lives in the same directory so the rename is atomic on one filesystem; on error it
    is removed and ``final`` is left untouched. Temporaries of killed earlier writers are discarded first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    discard_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        _apply_umask(target)
        if is_dir:
            _replace_dir(target, final, trash=final.parent / f".{final.name}.old-{tmp.name}")
        else:
            os.replace(target, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(target: Path, final: Path, trash: Path, attempts: int = 100) -> None:
    """Rename directory ``target`` to ``final``, moving an existing ``final`` aside first. Another
    writer may put its own ``final`` in place between the two renames: then move that aside too and
    retry, so concurrent writers end with one complete directory (the last one's) and no error.
    What was moved aside is deleted only once ``target`` is in place, so an interrupt between the two
    renames leaves the previous directory complete under its ``trash`` name (see ``aside_copies``)."""
    moved = []
    for i in range(attempts):
        try:
            os.rename(target, final)  # fails while a non-empty ``final`` exists
            break
        except OSError:
            if not final.exists():
                raise
        aside = trash.with_name(f"{trash.name}-{i}")
        try:
            os.rename(final, aside)
            moved.append(aside)
        except FileNotFoundError:
            continue  # another writer moved it: retry
    else:
        raise OSError(f"could not replace {final}: other writers kept replacing it")
    for aside in moved:
        shutil.rmtree(aside, ignore_errors=True)


def aside_copies(final: str | os.PathLike) -> list[Path]:
    """Earlier versions of directory ``final`` that an interrupted ``atomic_path`` left moved aside,
    newest first: the fallback when ``final`` itself is missing."""
    final = Path(final)
    copies = [p for p in final.parent.glob(f".{final.name}.old-*") if p.is_dir()]
    return sorted(copies, key=lambda p: p.stat().st_mtime, reverse=True)


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
    """A JSON file's content; invalid JSON is an ``IntegrityError`` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path}: not valid JSON ({e})") from None


def sha256_file(path, on_block=None) -> str:
    """sha256 of a file, streamed in 16 MiB blocks; ``on_block(n)`` is told each block's size (a
    progress bar's ``update``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
            if on_block is not None:
                on_block(len(block))
    return h.hexdigest()


def file_digests(path, on_block=None) -> dict:
    """``{"sha256", "git_sha1"}`` of a file in one streamed pass: sha256 is what an LFS file is known
    by, the git blob id (``sha1(b"blob <size>\\0" + content)``) what a plain git file is known by on
    the Hub; ``on_block(n)`` as in ``sha256_file``."""
    size = os.path.getsize(path)
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha256.update(block)
            sha1.update(block)
            if on_block is not None:
                on_block(len(block))
    return {"sha256": sha256.hexdigest(), "git_sha1": sha1.hexdigest()}


def write_manifest(directory) -> None:
    """``SHA256SUMS`` of every file in ``directory`` (recursively), sorted by path."""
    directory = Path(directory)
    lines = [
        f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n"
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.relative_to(directory).as_posix() not in NOT_CONTENT
    ]
    (directory / MANIFEST).write_text("".join(lines))


def verify_manifest(directory) -> bool:
    """Check every file against ``SHA256SUMS``: each listed file present with its sha256, and no file
    that is not listed (an unverified file would pass on as verified). False when there is no manifest."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    recorded = manifest_entries(directory)
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - set(NOT_CONTENT)
    bad = [f"{name} (missing)" for name in sorted(set(recorded) - present)]
    bad += [f"{name} (not in {MANIFEST})" for name in sorted(present - set(recorded))]
    bad += [
        f"{name} (content differs from its recorded sha256)"
        for name in sorted(set(recorded) & present)
        if sha256_file(directory / name) != recorded[name]
    ]
    if bad:
        raise IntegrityError(f"{directory} is corrupted: " + "; ".join(bad))
    return True


def manifest_entries(directory) -> dict[str, str]:
    """``{relative path: sha256}`` of a directory's ``SHA256SUMS`` (empty without one)."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        return {}
    recorded = {}
    for line in manifest.read_text().splitlines():
        digest, _, name = line.partition("  ")
        recorded[name] = digest
    return recorded


def verify_model_dir(directory, required: bool = True) -> bool:
    """``verify_manifest``, and a directory without ``SHA256SUMS`` refused when ``required`` unless
    the user opted out with ``UNISPARSE_ALLOW_UNVERIFIED=1`` (then a warning): without a manifest a
    flipped byte would load as a different model."""
    if verify_manifest(directory):
        return True
    if required and os.environ.get(ALLOW_UNVERIFIED_ENV) != "1":
        raise IntegrityError(
            f"{directory} has no {MANIFEST}, so its content cannot be verified; models the pipeline "
            f"writes carry one (write one with `sha256sum`-style lines, or set {ALLOW_UNVERIFIED_ENV}=1 "
            "to load it unverified)"
        )
    log.warning("%s has no %s: its content cannot be verified", directory, MANIFEST)
    return False


def directory_digest(directory) -> str | None:
    """sha256 of a model directory's manifest: one hash for its whole content (None without one)."""
    manifest = Path(directory) / MANIFEST
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None


def _configs(model) -> dict:
    """The model's config as a dict without volatile entries; a module that has none (a family's
    container of several models) gives its children's, by name."""

    def clean(config) -> dict:
        data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return {k: v for k, v in data.items() if k not in VOLATILE_CONFIG_KEYS}

    if hasattr(model, "config"):
        return clean(model.config)
    return {name: clean(child.config) for name, child in model.named_children() if hasattr(child, "config")}


def state_digest(model) -> str:
    """sha256 of a model's config and every tensor (name, dtype, shape, bytes) as it is in memory:
    identifies the input of a run whose model never touched a file (library use)."""
    return state_digest_of(model, sorted(model.state_dict().items()))


def state_digest_of(model, tensors) -> str:
    """``state_digest`` of ``model``'s config with ``tensors`` (``(name, tensor)`` in name order,
    possibly read one at a time from files: a sharded run's input identity, equal to the digest of
    the same model loaded whole)."""
    return tensors_digest(tensors, hashlib.sha256(json.dumps(_configs(model), sort_keys=True, default=str).encode()))


def tensors_digest(tensors, h=None) -> str:
    """sha256 over ``(name, tensor)`` pairs in the given order: name, dtype, shape and bytes of each
    (continuing ``h`` where given)."""
    import torch

    h = h or hashlib.sha256()
    for name, tensor in tensors:
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_finite_state(model, what: str = "model") -> None:
    """Every floating tensor of ``model`` finite, else ``NonFiniteError`` naming the first few: a
    model with NaN or inf weights is never written."""
    import torch

    bad = [
        n
        for n, t in model.state_dict().items()
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise NonFiniteError(
            f"{what}: {len(bad)} tensor(s) hold non-finite values ({_listing(bad, 4)}); nothing was saved"
        )


def save_model(model, out_dir, extra_files=()) -> None:
    """``save_pretrained`` (safetensors) plus ``SHA256SUMS`` into a temporary directory, then rename.
    ``extra_files`` (e.g. tokenizer files) are copied in and recorded in the manifest too. A model
    with non-finite weights is refused (``check_finite_state``)."""
    check_finite_state(model, f"model for {out_dir}")
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for path in extra_files:
            shutil.copyfile(path, Path(tmp) / Path(path).name)
        write_manifest(tmp)


#: safetensors dtype names by kind (the header's spelling)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def safetensors_header(path, prefix: str = "") -> dict[str, tuple[tuple, str]]:
    """{prefix + tensor name: (shape, dtype name)} of a safetensors file, from its header alone (no
    tensor is read); a damaged header (bad shape, dtype or offsets) is an ``IntegrityError`` naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                t = f.get_slice(k)
                out[prefix + k] = (tuple(t.get_shape()), t.get_dtype())
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise IntegrityError(f"{path}: not a readable safetensors file ({e})") from None


def dtype_mismatches(stored: dict[str, str], expected: dict, where: str = "") -> list[str]:
    """Tensors stored in a dtype of the wrong kind ({name: safetensors dtype name} against {name:
    torch dtype}): a floating parameter stored as integers (a header edited at the same byte length)
    would load as garbage of the right shape. Casting between floating dtypes is fine."""
    wrong = []
    for k in sorted(set(stored) & set(expected)):
        want_float = expected[k].is_floating_point
        if (stored[k] in FLOAT_DTYPES) != want_float:
            wrong.append(f"{where}{k} is {stored[k]} (expected {'a floating dtype' if want_float else expected[k]})")
    return [f"{len(wrong)} tensor(s) of the wrong dtype: {_listing(wrong)}"] if wrong else []


def check_stored_dtypes(directory, expected: dict) -> None:
    """``dtype_mismatches`` over every ``.safetensors`` file in ``directory`` (``expected``: {name:
    torch dtype}, e.g. a model's state dict's dtypes), naming file and tensor."""
    problems = []
    for path in sorted(Path(directory).glob("*.safetensors")):
        stored = {k: dtype for k, (_, dtype) in safetensors_header(path).items()}
        problems += dtype_mismatches(stored, expected, where=f"{path.name}:")
    if problems:
        raise IntegrityError(f"{directory}: " + "; ".join(problems))


def check_weights_match(model_dir, model) -> None:
    """Every tensor in the files lands in exactly one parameter of the right shape and dtype kind,
    and every parameter is filled; otherwise an error listing the keys. Reads headers only."""
    stored, dtypes = {}, {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for key, (shape, dtype) in safetensors_header(path).items():
            if key in stored:
                raise IntegrityError(f"{model_dir}: tensor {key} is stored twice")
            stored[key], dtypes[key] = shape, (dtype, path.name)
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    problems = weight_mismatches(stored, expected)
    for name in sorted({f for _, f in dtypes.values()}):
        problems += dtype_mismatches(
            {k: d for k, (d, f) in dtypes.items() if f == name},
            {k: v.dtype for k, v in state.items()},
            where=f"{name}:",
        )
    if problems:
        raise IntegrityError(f"{model_dir}: weights do not match config.json: " + "; ".join(problems))


def weight_mismatches(stored: dict, expected: dict) -> list[str]:
    """Missing, unexpected and mis-shaped tensors between ``stored`` and ``expected`` ({name: shape}),
    each a message listing the keys (empty when every stored tensor fills exactly one parameter)."""
    problems = []
    for what, keys in (
        ("missing", sorted(set(expected) - set(stored))),
        ("unexpected", sorted(set(stored) - set(expected))),
    ):
        if keys:
            problems.append(f"{len(keys)} {what} tensor(s): {_listing(keys)}")
    shapes = [
        f"{k} {list(stored[k])} (config wants {list(expected[k])})"
        for k in sorted(set(stored) & set(expected))
        if stored[k] != expected[k]
    ]
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped tensor(s): {_listing(shapes)}")
    return problems


def _listing(items, limit: int = 8) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
