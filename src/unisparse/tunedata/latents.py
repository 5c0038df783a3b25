"""Reading prepared tuning data: verified shards, a seeded order, a position that resumes exactly.

``LatentSet`` checks the manifest and every shard's sha256 when it opens (a changed shard is refused,
naming it), reads single rows with ``safetensors.safe_open`` (no shard is loaded whole), and checks
that a model may train on it (``check_model``: same codec weights, same latent shape, same tokenizer).
``LatentOrder`` is the order: epoch ``e`` is a permutation drawn from ``(seed, e)``, and sample ``p``
of the run is ``permutation(p // n)[p % n]``, so the order is a function of the seed and the position
alone, and a run resumed at a position sees exactly what an uninterrupted run sees.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..io import IntegrityError, sha256_file
from .prepare import FORMAT, MANIFEST, VERSION


class LatentSet:
    """A prepared tuning set (``prepare.prepare_tune_data``'s directory)."""

    def __init__(self, directory, verify: bool = True):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.directory}: not prepared tuning data (no {MANIFEST}); run prepare-tune-data"
            )
        raw = path.read_bytes()
        self.manifest = json.loads(raw)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{VERSION} manifest")
        #: the data's identity in a tuning checkpoint (every shard's sha256 is in the manifest)
        self.digest = hashlib.sha256(raw).hexdigest()
        self.shards = self.manifest["shards"]
        if verify:
            for shard in self.shards:
                file = self.directory / shard["file"]
                if not file.is_file():
                    raise IntegrityError(f"{self.directory}: shard {shard['file']} is missing")
                if sha256_file(file) != shard["sha256"]:
                    raise IntegrityError(
                        f"{self.directory}: shard {shard['file']} does not match its sha256 in {MANIFEST} "
                        "(changed or corrupted since it was prepared); prepare the data again"
                    )
        self.starts = np.cumsum([0] + [int(s["count"]) for s in self.shards])
        if int(self.starts[-1]) != int(self.manifest["count"]):
            raise IntegrityError(
                f"{path}: the shards hold {int(self.starts[-1])} examples, the manifest says {self.manifest['count']}"
            )
        self._open: dict[int, tuple] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def has_posterior(self) -> bool:
        return bool(self.manifest["posterior"])

    def _handle(self, shard: int):
        if shard not in self._open:
            from safetensors import safe_open

            f = safe_open(str(self.directory / self.shards[shard]["file"]), framework="pt")
            self._open[shard] = (f, f.get_tensor("ids"), f.get_tensor("id_offsets"))
        return self._open[shard]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        return shard, index - int(self.starts[shard])

    def rows(self, indices) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """Means and standard deviations (fp32 [n, L, D]) and token ids of the examples ``indices``."""
        means, stds, ids = [], [], []
        for index in indices:
            shard, row = self._locate(int(index))
            f, all_ids, offsets = self._handle(shard)
            means.append(f.get_slice("mean")[row].float())
            stds.append(f.get_slice("std")[row].float())
            ids.append(all_ids[int(offsets[row]) : int(offsets[row + 1])].tolist())
        return torch.stack(means), torch.stack(stds), ids

    def captions(self, limit: int | None = None) -> list[str]:
        out = []
        for shard in range(len(self.shards)):
            f, _, _ = self._handle(shard)
            data, offsets = f.get_tensor("caption_bytes").numpy().tobytes(), f.get_tensor("caption_offsets").tolist()
            out += [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out

    def check_model(self, family, probe: int = 8) -> None:
        """Refuse a model the set was not prepared for: another codec (weights hash), another latent
        shape or another tokenizer (the first ``probe`` captions re-tokenised)."""
        m = self.manifest
        if m["codec"]["sha256"] != family.codec_digest():
            raise ValueError(
                f"{self.directory} was encoded by another codec (sha256 {m['codec']['sha256'][:12]}..., "
                f"{m['codec']['dtype']}) than this model's ({family.codec_digest()[:12]}..., "
                f"{str(family.dtype).replace('torch.', '')}); prepare the data with this model"
            )
        shape = list(family.noise_shape(1)[1:])
        if list(m["latent_shape"]) != shape:
            raise ValueError(f"{self.directory} holds latents of shape {m['latent_shape']}; this model takes {shape}")
        _, _, ids = self.rows(range(min(probe, len(self))))
        for caption, stored in zip(self.captions(probe), ids):
            if family.encode(caption) != stored:
                raise ValueError(f"{self.directory} was tokenised by another tokenizer (caption {caption[:60]!r})")


class LatentOrder:
    """The seeded order of a set of ``count`` examples, read from ``position`` on."""

    def __init__(self, count: int, seed: int, position: int = 0):
        self.count, self.seed, self.position = int(count), int(seed), int(position)
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return self._perm

    def take(self, n: int) -> list[int]:
        out = []
        for p in range(self.position, self.position + n):
            out.append(int(self._permutation(p // self.count)[p % self.count]))
        self.position += n
        return out

    def state(self) -> dict:
        return {"position": self.position, "count": self.count, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if state.get("count") != self.count or state.get("seed") != self.seed:
            raise ValueError(f"reading position {state} is not of this data ({self.count} examples, seed {self.seed})")
        self.position = int(state["position"])


class LatentReader:
    """What the training loop reads: a ``LatentSet`` in its ``LatentOrder`` (``digest``, ``state``
    and ``restore`` are the loop's data interface)."""

    def __init__(self, latents: LatentSet, seed: int):
        self.latents = latents
        self.order = LatentOrder(len(latents), seed)
        self.digest = latents.digest

    def batch(self, n: int):
        """The next ``n`` examples: (means, stds, token ids)."""
        return self.latents.rows(self.order.take(n))

    def state(self) -> dict:
        return self.order.state()

    def restore(self, state: dict) -> None:
        self.order.restore(state)
