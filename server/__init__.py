"""The coordinator: Flower ServerApp, strategies, reports, and the `neurofed` CLI.

Uses models/ and privacy/. Its CLI (server/cli.py) is the composition root of researcher commands
and may also call client/ (data synthesis, local training on site data).
"""
