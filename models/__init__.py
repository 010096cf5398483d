"""Networks, label protocols, losses, metrics and inference shared by sites and coordinator.

A leaf package: it depends on torch, MONAI, numpy and nibabel only, never on client/ or server/.
Heavy imports happen inside the submodules that need them.
"""
