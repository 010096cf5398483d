"""The settings of one federated run, as one typed, validated value.

Flower hands the ServerApp a flat mapping of run settings (``[tool.flwr.app.config]`` in
pyproject.toml, overridden by ``flwr run --run-config`` or by ``neurofed simulate``). `RunConfig` is
that mapping parsed and checked once; it is written into the run directory as ``config.json`` so every
result can be reproduced, and the part a site needs (all but `SERVER_ONLY_SETTINGS`) travels to the
sites in each message's ConfigRecord, where the site parses it with the same class
(contract/site_task.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from contract.run_choices import (  # re-exported: the settings' choices
    AGGREGATION_WEIGHTS,
    GRAD_SAMPLE_MODES,
    ROBUST_STRATEGIES,
    SERVER_DP_MODES,
    SERVER_LEARNING_RATE_DEFAULTS,
    STRATEGIES,
    min_training_sites,
)
from models.errors import NeurofedError
from models.postprocessing import LARGEST_BRAIN, POSTPROCESSING_MODES
from models.trainable import TRAINABLE_LAYERS

if TYPE_CHECKING:
    from models.networks import NetworkConfig

AUTO_CLIPPING_NORM = 0.0
"""``dp-max-grad-norm`` 0: the coordinator sets the clipping norm from the starting model's gradient norms
measured on public data (models/starting_model.py) before round 1, and records the value it chose."""


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a federated run.

    Attributes:
        num_rounds: federated rounds (each: local training at every training site, aggregation).
        strategy: one of `STRATEGIES`.
        proximal_mu: weight of FedProx's proximal term ``mu/2 * ||w - w_global||^2`` (fedprox only).
        server_learning_rate: server optimizer step size eta (fedavgm, fedadam, fedyogi); 0: the strategy's
            own (fedavgm 1, fedadam and fedyogi 0.01: `SERVER_LEARNING_RATE_DEFAULTS`).
        server_momentum: FedAvgM's server momentum beta: the server steps along ``v = beta * v + mean
            update`` (fedavgm only; 0 is FedAvg with a server step size).
        local_steps: optimizer steps each training site runs per round.
        protocol: label protocol name (``tissue`` or ``aseg``).
        network_preset: network preset of models/networks.py (``tiny`` or ``default``).
        architecture: network architecture (``unet``, ``dynunet``, ``segresnet``).
        patch_size: edge of the cubic training patch, in voxels.
        batch_size: patches per optimizer step.
        learning_rate: the sites' optimizer learning rate.
        seed: seed of model initialisation, test splits and every site's training in every round.
        test_fraction: share of each simulated training site's persons held out for testing (a deployed
            site sets its own, client/site_policy.py).
        simulated_min_test_subjects: persons a simulated site's test split needs before the site reports
            any test metric (a deployed site sets its own ``min-test-subjects``, default 5).
        num_sites: number of site nodes the server waits for, unseen sites included.
        unseen_sites: how many of the sites never train (role ``holdout``); in simulation the last ones.
        eval_every: sites evaluate the global model every this many rounds (and after the last one).
        data_root: folder with one sub-folder per site (simulation: site i is the i-th sub-folder in
            name order). Empty in a deployment, where each site reads ``data-dir`` from its node config;
            empty in a simulation (``flwr run .``): sites are synthesized into ``<run-dir>/data``.
        simulated_subjects_per_site: subjects synthesized per training site when a simulation has no data
            yet; the default gives 16 persons to train on at the default test fraction (hospitals hold
            hundreds; DP noise per step falls with the persons a site samples from).
        simulated_unseen_subjects: subjects synthesized per unseen site (all of them are test subjects).
        run_dir: where the run directory (config, checkpoints, metrics) is written.
        contrast: the structural image the network reads (BIDS suffix).
        spacing_mm: isotropic voxel size the sites resample to, in mm.
        field_of_view_mm: extent of the sites' preprocessing grid in mm, ``"X,Y,Z"`` (RAS order); empty
            for the preprocessing plan's default (a whole adult head).
        dp: subject-level DP-SGD at every training site (privacy/dp_sgd.py); on by default, so a run
            without it says so explicitly (and its report says so in its first lines). Each site checks
            every round against its own privacy ledger and lifetime budget and refuses rounds that would
            exceed it.
        dp_target_epsilon: ε the whole run may spend per site at ``dp_delta``; each site derives its noise
            multiplier for the planned rounds x local steps. Used when ``dp_noise_multiplier`` is 0.
        dp_noise_multiplier: Gaussian noise std / clipping norm; > 0 replaces ``dp_target_epsilon``.
        dp_max_grad_norm: L2 clipping norm of each person's gradient; `AUTO_CLIPPING_NORM` (0, the default):
            the median per-patch gradient norm of the starting model's trainable layers on public data,
            measured when it was pretrained (1.0 without a starting model); the value used is in config.json.
        dp_augmentation_multiplicity: augmented patches of the same person in one DP step, averaged into
            that person's one gradient before clipping (the privacy unit and ε are unchanged; the gradient's
            variance falls, the step costs this many times more). Needs ``dp_grad_sample_mode`` vmap when > 1.
        trainable_layers: the parameters sites train (models/trainable.py ``TRAINABLE_LAYERS``); the others
            keep the starting model's values. Fewer trained parameters means less DP noise in total.
        ema_decay: a site releases the exponential moving average of its weights over the round's steps with
            this decay (0: the last weights); under DP the average has less noise than any single iterate.
        dp_delta: δ of each site's (ε, δ) guarantee for the run.
        dp_grad_sample_mode: how per-sample gradients are computed (one of `GRAD_SAMPLE_MODES`).
        server_dp: site-level DP at the coordinator, one of `SERVER_DP_MODES`.
        server_dp_noise_multiplier: ``z``, noise std / sensitivity of each released round: the uniform mean
            of k clipped site updates gets noise of std ``z x clipping norm / k`` (server_dp only).
        server_dp_clipping_norm: norm each site's update is clipped to (``fixed``; the initial norm for
            ``adaptive``).
        update_norm_limit: a site update whose norm (distance from the global model) is above this many
            times the median norm of the other sites' updates is rejected; 0 disables the norm rule (an
            update with NaN or Inf is always rejected).
        update_norm_cap: absolute bound on a site update's L2 norm (model-parameter units), checked on
            every update whatever the other sites sent: a larger (or non-finite) update is rejected. An
            honest Adam round moves each parameter by about ``learning-rate`` per step at most; raise it
            for large networks trained for many local steps.
        aggregation_weights: one of `AGGREGATION_WEIGHTS`.
        byzantine_sites: ``f``, the number of malicious training sites krum, multikrum and bulyan are
            built to withstand (krum and multikrum need at least 2f + 3 training sites, bulyan 4f + 3).
        trimmed_fraction: share of the values fedtrimmedavg cuts at each end of every coordinate, in [0, 0.5).
        multikrum_selected: updates multikrum averages; 0 for n - f of the n accepted updates.
        round_timeout_s: seconds the server waits for replies in one round.
        initial_model: the weights round 1 starts from: ``builtin`` (the project's starting model, pretrained on
            public anatomy only, models/starting_model.py), ``none`` (random weights from ``seed``) or the path
            of a model file on the coordinator; it must be the run's network, protocol and preprocessing
            geometry. The local-only and pooled baselines of a study start from the same weights.
        min_sites: training sites whose updates a round needs; a site that fails or does not answer
            within ``round_timeout_s`` (crashed, revoked, disconnected) is dropped from that round, logged
            with the reason, as long as at least this many replied. Default 1: dropouts are tolerated while
            one training site remains; 0: every training site (any dropout stops the run). With
            server_dp, also the fewest accepted updates a round is released with (at least 1).
        postprocessing: how predicted label maps are cleaned up (models/postprocessing.py
            ``POSTPROCESSING_MODES``) in the sites' evaluation, the study's report and the run's model files,
            which record it so ``neurofed-site segment`` applies it too. Default ``largest-brain``: on held-out
            anatomy it lowers HD95 and does not lower Dice (BENCHMARKS.md, "Post-processing").
    """

    num_rounds: int = 5
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.0
    server_momentum: float = 0.5
    local_steps: int = 10
    protocol: str = "tissue"
    network_preset: str = "default"
    architecture: str = "unet"
    patch_size: int = 48
    batch_size: int = 4
    learning_rate: float = 2e-3
    seed: int = 0
    test_fraction: float = 0.25
    simulated_min_test_subjects: int = 2
    num_sites: int = 4
    unseen_sites: int = 1
    eval_every: int = 1
    data_root: str = ""
    simulated_subjects_per_site: int = 22
    simulated_unseen_subjects: int = 8
    run_dir: str = "runs/flwr"
    contrast: str = "T1w"
    spacing_mm: float = 2.0
    field_of_view_mm: str = ""
    dp: bool = True
    dp_target_epsilon: float = 8.0
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = AUTO_CLIPPING_NORM
    dp_delta: float = 1e-5
    dp_grad_sample_mode: str = "vmap"
    server_dp: str = "off"
    server_dp_noise_multiplier: float = 1.0
    server_dp_clipping_norm: float = 1.0
    update_norm_limit: float = 10.0
    update_norm_cap: float = 1000.0
    aggregation_weights: str = "capped"
    byzantine_sites: int = 1
    trimmed_fraction: float = 0.2
    multikrum_selected: int = 0
    round_timeout_s: float = 3600.0
    min_sites: int = 1
    initial_model: str = "builtin"
    dp_augmentation_multiplicity: int = 1
    trainable_layers: str = "all"
    ema_decay: float = 0.0
    postprocessing: str = LARGEST_BRAIN

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> NeurofedError:
            return NeurofedError(f"run setting {flower_key(name)!r}: {what}")

        if self.strategy not in STRATEGIES:
            raise bad(
                "strategy", f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        for name in (
            "num_rounds",
            "local_steps",
            "patch_size",
            "batch_size",
            "num_sites",
            "eval_every",
            "simulated_subjects_per_site",
            "simulated_unseen_subjects",
        ):
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.unseen_sites < self.num_sites:
            raise bad(
                "unseen_sites",
                f"{self.unseen_sites} unseen of {self.num_sites} sites leaves no site to train; "
                "use fewer unseen sites or more sites",
            )
        if self.simulated_min_test_subjects < 1:
            raise bad("simulated_min_test_subjects", f"must be >= 1, got {self.simulated_min_test_subjects}")
        if not 0.0 < self.test_fraction < 1.0:
            raise bad("test_fraction", f"must be between 0 and 1 (exclusive), got {self.test_fraction}")
        for name in ("learning_rate", "spacing_mm", "round_timeout_s"):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        if self.server_learning_rate < 0:
            raise bad(
                "server_learning_rate",
                f"must be >= 0 (0: the strategy's default), got {self.server_learning_rate}",
            )
        if not 0.0 <= self.server_momentum < 1.0:
            raise bad("server_momentum", f"must be in [0, 1), got {self.server_momentum}")
        if self.proximal_mu < 0:
            raise bad("proximal_mu", f"must be >= 0, got {self.proximal_mu}")
        if self.field_of_view_mm:
            self.field_of_view()
        if self.dp_noise_multiplier < 0:
            raise bad(
                "dp_noise_multiplier",
                f"must be >= 0 (0: derive it from dp-target-epsilon), got {self.dp_noise_multiplier}",
            )
        if self.dp and self.dp_noise_multiplier == 0 and not self.dp_target_epsilon > 0:
            raise bad(
                "dp_target_epsilon",
                f"must be positive when dp-noise-multiplier is 0, got {self.dp_target_epsilon}",
            )
        if not self.dp_max_grad_norm >= 0:
            raise bad("dp_max_grad_norm", f"must be >= 0 (0: set from the starting model), got {self.dp_max_grad_norm}")
        if self.dp_augmentation_multiplicity < 1:
            raise bad("dp_augmentation_multiplicity", f"must be >= 1, got {self.dp_augmentation_multiplicity}")
        if self.dp_augmentation_multiplicity > 1 and self.dp_grad_sample_mode != "vmap":
            raise bad("dp_augmentation_multiplicity", "above 1 needs dp-grad-sample-mode 'vmap'")
        if self.trainable_layers not in TRAINABLE_LAYERS:
            raise bad(
                "trainable_layers", f"choose one of {', '.join(TRAINABLE_LAYERS)}, got {self.trainable_layers!r}"
            )
        if self.postprocessing not in POSTPROCESSING_MODES:
            raise bad(
                "postprocessing", f"choose one of {', '.join(POSTPROCESSING_MODES)}, got {self.postprocessing!r}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise bad("ema_decay", f"must be in [0, 1) (0: off), got {self.ema_decay}")
        if not 0.0 < self.dp_delta < 1.0:
            raise bad("dp_delta", f"must be in (0, 1), e.g. 1e-5, got {self.dp_delta}")
        if self.dp_grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise bad(
                "dp_grad_sample_mode",
                f"choose one of {', '.join(GRAD_SAMPLE_MODES)}, got {self.dp_grad_sample_mode!r}",
            )
        if self.server_dp not in SERVER_DP_MODES:
            raise bad("server_dp", f"choose one of {', '.join(SERVER_DP_MODES)}, got {self.server_dp!r}")
        if self.server_dp != "off" and self.strategy == "fedbn":
            raise bad("server_dp", "site-level DP noises the whole model; it cannot be combined with fedbn")
        if not self.server_dp_noise_multiplier >= 0:
            raise bad("server_dp_noise_multiplier", f"must be >= 0, got {self.server_dp_noise_multiplier}")
        if not self.server_dp_clipping_norm > 0:
            raise bad("server_dp_clipping_norm", f"must be positive, got {self.server_dp_clipping_norm}")
        if self.min_sites < 0:
            raise bad("min_sites", f"must be >= 0 (0: every training site), got {self.min_sites}")
        if not self.initial_model.strip():
            raise bad("initial_model", "give 'builtin', 'none' or the path of a model file")
        if not self.update_norm_limit >= 0:
            raise bad("update_norm_limit", f"must be >= 0 (0: off), got {self.update_norm_limit}")
        self._check_robustness(bad)

    def _check_robustness(self, bad: Any) -> None:
        if not 0 < self.update_norm_cap < float("inf"):
            raise bad("update_norm_cap", f"must be positive and finite, got {self.update_norm_cap}")
        if self.aggregation_weights not in AGGREGATION_WEIGHTS:
            raise bad(
                "aggregation_weights",
                f"choose one of {', '.join(AGGREGATION_WEIGHTS)}, got {self.aggregation_weights!r}",
            )
        if self.byzantine_sites < 0:
            raise bad("byzantine_sites", f"must be >= 0, got {self.byzantine_sites}")
        if not 0.0 <= self.trimmed_fraction < 0.5:
            raise bad("trimmed_fraction", f"must be in [0, 0.5), got {self.trimmed_fraction}")
        if self.multikrum_selected < 0:
            raise bad("multikrum_selected", f"must be >= 0 (0: n - f), got {self.multikrum_selected}")
        if self.server_dp != "off" and self.strategy in ROBUST_STRATEGIES:
            raise bad(
                "server_dp",
                f"site-level DP averages the clipped updates itself; {self.strategy} cannot aggregate after "
                "it: use fedavg, fedprox, fedavgm, fedadam or fedyogi",
            )
        needed = min_training_sites(self.strategy, self.byzantine_sites)
        if self.num_training_sites < needed:
            raise bad(
                "strategy",
                f"{self.strategy} with byzantine-sites = {self.byzantine_sites} needs at least {needed} training "
                f"sites, the run has {self.num_training_sites}; add sites or lower byzantine-sites",
            )

    @property
    def num_training_sites(self) -> int:
        return self.num_sites - self.unseen_sites

    def field_of_view(self) -> tuple[float, float, float] | None:
        """``field_of_view_mm`` parsed to three positive mm values, or None for the plan default."""
        if not self.field_of_view_mm:
            return None
        try:
            fov = tuple(float(v) for v in self.field_of_view_mm.replace("x", ",").split(","))
        except ValueError:
            fov = ()
        if len(fov) != 3 or min(fov) <= 0:
            raise NeurofedError(
                f"run setting 'field-of-view-mm': expected three positive sizes in mm like '192,224,192', "
                f"got {self.field_of_view_mm!r}"
            )
        return fov  # type: ignore[return-value]

    def evaluates_after(self, server_round: int) -> bool:
        """Whether sites evaluate the global model after ``server_round`` (1-based)."""
        return server_round % self.eval_every == 0 or server_round == self.num_rounds

    def server_step_size(self) -> float:
        """The server optimizer's step size: ``server-learning-rate``, or where that is 0 the strategy's
        default (`SERVER_LEARNING_RATE_DEFAULTS`; 1.0 for a strategy without a server optimizer)."""
        return self.server_learning_rate or SERVER_LEARNING_RATE_DEFAULTS.get(self.strategy, 1.0)

    def network_config(self) -> NetworkConfig:
        """The network the run trains: the preset, one input channel, one output per protocol class."""
        from models.label_protocols import get_protocol
        from models.networks import NetworkConfig

        return NetworkConfig.preset(
            self.network_preset,
            in_channels=1,
            out_channels=get_protocol(self.protocol).num_classes,
            architecture=self.architecture,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (field names as keys), as written to ``config.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise NeurofedError(f"run config: unknown settings {unknown}; known: {sorted(names)}")
        return cls(**dict(d))

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flat Flower run-config form (``num-server-rounds``, ``local-steps``, ...)."""
        return {flower_key(k): v for k, v in self.to_dict().items()}

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's flat run config; missing keys take the defaults, unknown keys are an error.

        Values are coerced to each field's type, because Flower's TOML and ``--run-config`` parsing
        may give ``4`` where ``4.0`` is meant.
        """
        by_key = {flower_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise NeurofedError(
                f"run config: unknown settings {unknown} (check [tool.flwr.app.config] in pyproject.toml "
                f"and --run-config); known: {sorted(by_key)}"
            )
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            f = by_key[key]
            values[f.name] = _coerce(key, value, type(getattr(cls, f.name)))
        return cls(**values)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


SERVER_ONLY_SETTINGS = frozenset(
    {
        "proximal-mu",
        "server-learning-rate",
        "server-momentum",
        "round-timeout-s",
        "server-dp",
        "server-dp-noise-multiplier",
        "server-dp-clipping-norm",
        "update-norm-limit",
        "simulated-subjects-per-site",
        "simulated-unseen-subjects",
        "initial-model",
        "update-norm-cap",
        "aggregation-weights",
        "byzantine-sites",
        "trimmed-fraction",
        "multikrum-selected",
    }
)
"""Run settings (flat Flower keys) sites do not get: strategies add what a site needs (FedProx adds
``proximal-mu``)."""


def setting_choices() -> dict[str, tuple[str, ...]]:
    """The settings (by field name) that take one of a few named values, and those values."""
    return {
        "strategy": STRATEGIES,
        "server_dp": SERVER_DP_MODES,
        "dp_grad_sample_mode": GRAD_SAMPLE_MODES,
        "trainable_layers": TRAINABLE_LAYERS,
        "postprocessing": POSTPROCESSING_MODES,
        "aggregation_weights": AGGREGATION_WEIGHTS,
    }


def site_settings() -> frozenset[str]:
    """The flat keys of the run settings every site message carries."""
    return frozenset(flower_key(f.name) for f in fields(RunConfig)) - SERVER_ONLY_SETTINGS


def flower_key(field_name: str) -> str:
    """The Flower run-config key of a `RunConfig` field (``num_rounds`` -> ``num-server-rounds``)."""
    return "num-server-rounds" if field_name == "num_rounds" else field_name.replace("_", "-")


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise NeurofedError(f"run setting {key!r}: expected {kind.__name__}, got {value!r}")
