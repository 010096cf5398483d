"""Networks, label protocols, losses, metrics and inference shared by sites and coordinator.

A leaf package: it depends on torch, MONAI, numpy and nibabel (and the standard-library helpers of
common/), never on another project package. Heavy imports happen inside the submodules that need them.
"""
