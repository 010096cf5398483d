"""Differential privacy for sites and coordinator (Opacus DP-SGD, privacy ledger, accountants).

A leaf package: torch and opacus only.
"""
