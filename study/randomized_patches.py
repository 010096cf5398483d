"""An endless stream of training patches from domain-randomized subjects, generated on the fly.

Each DataLoader worker draws an anatomy (a phantom with probability ``phantom_share``, else a public label
map), generates one randomized subject from it (study/domain_randomization.py, ~1-2 s on one core at 2 mm),
adds it to a pool of the last ``pool_size`` subjects, and yields ``patches_per_subject`` patches, each from a
random subject of the pool (position, foreground sampling and flips/intensity augmentation as in site training,
models/training.py `PatchDataset`). Mixing a pool keeps consecutive batches from sharing one subject, and
reusing each subject for several patches keeps a 2-core machine's trainer fed (bench/bench_pretraining.py
measures both rates).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from models.errors import NeurofedError
from models.label_protocols import LabelProtocol
from models.training import PatchDataset, TrainingConfig
from study.domain_randomization import GeneratorSettings, randomized_subject
from study.public_anatomy import Anatomy

log = logging.getLogger(__name__)

SUBJECT_STREAM = 8
"""First spawn-key element of the generated subjects' streams, ``(8, worker, subject)``."""


@dataclass(frozen=True)
class StreamSettings:
    """How the stream mixes generated subjects into patches.

    Attributes:
        patches_per_subject: patches drawn (on average) from each generated subject.
        pool_size: subjects a patch is drawn from at random (the newest ones).
        phantom_share: probability that a subject's anatomy is a phantom rather than a label map (1 when
            there are no label maps).
    """

    patches_per_subject: int = 12
    pool_size: int = 6
    phantom_share: float = 0.2


class RandomizedPatches(IterableDataset):
    """Endless ``(image (C, *patch) float32, label (1, *patch) int64)`` items; see the module docstring."""

    def __init__(
        self,
        phantoms: Sequence[Anatomy],
        label_maps: Sequence[Anatomy],
        generator: GeneratorSettings,
        stream: StreamSettings,
        training: TrainingConfig,
        plan,
        protocol: LabelProtocol,
        seed: int,
    ) -> None:
        if not phantoms and not label_maps:
            raise NeurofedError("pretraining needs anatomy: at least one phantom or one label map")
        self.phantoms = list(phantoms)
        self.label_maps = list(label_maps)
        self.generator = generator
        self.stream = stream
        self.training = training
        self.plan = plan
        self.protocol = protocol
        self.seed = int(seed)

    def _anatomy(self, rng: np.random.Generator) -> Anatomy:
        if not self.label_maps or (self.phantoms and rng.random() < self.stream.phantom_share):
            return self.phantoms[int(rng.integers(len(self.phantoms)))]
        return self.label_maps[int(rng.integers(len(self.label_maps)))]

    def subjects(self, worker: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless randomized subjects of worker ``worker`` (its own random stream)."""
        loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        index = 0
        while True:
            rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(SUBJECT_STREAM, worker, index)))
            index += 1
            anatomy = self._anatomy(rng)
            if anatomy.name not in loaded:
                loaded[anatomy.name] = anatomy.load()
            labels, affine = loaded[anatomy.name]
            try:
                subject = randomized_subject(labels, affine, self.generator, self.plan, self.protocol, rng)
            except NeurofedError as exc:
                # A draw the preprocessing cannot use (e.g. a crop that left no brain): draw again.
                log.debug("randomized subject %d of %s skipped: %s", index, anatomy.name, exc)
                continue
            yield subject

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        pick = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(SUBJECT_STREAM + 1, worker)))
        pool: deque[list] = deque(maxlen=self.stream.pool_size)
        length = self.stream.patches_per_subject * self.stream.pool_size
        for subject in self.subjects(worker):
            patches = PatchDataset.from_config([subject], self.training, length=length, seed=int(pick.integers(2**63)))
            pool.append([patches, 0])
            for _ in range(self.stream.patches_per_subject):
                entry = pool[int(pick.integers(len(pool)))]
                item = entry[0][entry[1] % length]
                entry[1] += 1
                yield item
