"""The site's secret: the only source of the randomness behind its DP releases.

DP-SGD's guarantee needs noise the observer cannot predict. The coordinator knows every value of the run
config and of its messages (seed, round, site id), so no such value may seed the noise, the Poisson
sampling of subjects, the patches or dropout: whoever could replay those draws would subtract the noise
and read the sum of clipped gradients in the clear. Each site therefore makes a 256-bit secret
(`secrets.token_bytes`) when its state is first set up and derives every draw of a DP round from
``HMAC-SHA256(secret, run id, round, purpose)``. The same secret gives the same draws (a resumed or
retried round repeats its draws exactly, so it is never released twice with different noise); another
site state gives other draws.

Where it lives: ``<state-dir>/site-secret.key`` (mode 0600). A deployed site makes it with its privacy
ledger, once (`neurofed-site budget --init`, client/privacy_budget.py); a simulated site's state is in the
run directory (``RUN_DIR/sites/<site>/``), so each run has fresh secrets and a resumed run reuses them.
Back it up with the privacy ledger and its marker (deploy/README.md): a restored ledger with a lost
secret is still sound (new draws), but a run resumed with a new secret re-draws its remaining rounds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.atomic_files import atomic_write_bytes
from models.errors import NeurofedError

if TYPE_CHECKING:
    import torch

SECRET_FILE = "site-secret.key"
SECRET_BYTES = 32
PURPOSES = ("patches", "sampling-and-noise", "dropout")
"""Each DP round draws three independent streams; a purpose names each."""


def secret_path(state_dir: Path) -> Path:
    """Where the secret of the site whose state is in ``state_dir`` lives."""
    return Path(state_dir) / SECRET_FILE


class SiteSecret:
    """A site's secret key and the seeds derived from it."""

    def __init__(self, key: bytes) -> None:
        if len(key) != SECRET_BYTES:
            raise NeurofedError(f"a site secret has {SECRET_BYTES} bytes, this one {len(key)}")
        self._key = key

    @classmethod
    def load_or_create(cls, state_dir: Path) -> SiteSecret:
        """The secret in ``state_dir``; made (and written, mode 0600) when the state has none yet."""
        path = secret_path(state_dir)
        if not path.is_file():
            atomic_write_bytes(path, secrets.token_bytes(SECRET_BYTES), mode=0o600)
        key = path.read_bytes()
        if len(key) != SECRET_BYTES:
            raise NeurofedError(
                f"{path} holds {len(key)} bytes, not a {SECRET_BYTES}-byte site secret: it is damaged; "
                "restore it from the site's backup (beside the privacy ledger)"
            )
        return cls(key)

    def seed(self, run_id: str, server_round: int, purpose: str) -> int:
        """A 63-bit seed for one purpose of one round of one run, unpredictable without the secret."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose {purpose!r}; one of {PURPOSES}")
        message = f"neurofed-dp|{run_id}|{server_round}|{purpose}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def derived_key(self, purpose: str) -> bytes:
        """A 256-bit key for one lifetime purpose of the site (``"split"``: its train/test split)."""
        return hmac.new(self._key, f"neurofed-site|{purpose}".encode(), hashlib.sha256).digest()

    def torch_generator(self, run_id: str, server_round: int, purpose: str) -> torch.Generator:
        import torch  # only a training round needs it: `neurofed-site budget --init` answers at once

        return torch.Generator().manual_seed(self.seed(run_id, server_round, purpose))

    def numpy_rng(self, run_id: str, server_round: int, purpose: str) -> np.random.Generator:
        return np.random.default_rng(self.seed(run_id, server_round, purpose))

    def __repr__(self) -> str:  # never print the key
        return "SiteSecret(<hidden>)"
