"""The version of the contract between the coordinator's app and the sites' installed neurofed.

Flower runs the coordinator's app bundle at every site, so the ServerApp and the ClientApp always run the
same code; what can differ is the neurofed a hospital installed: its site daemon writes the node config
the ClientApp reads, checks the bundles it runs and keeps the site's files (ledger, activity, models).
`CONTRACT_VERSION` names what the two agree on. Both sides check it:

- the site, in its installed code, before any code of a bundle runs (client/approved_apps.py reads the
  bundle's copy of this file): a bundle of another contract version is refused, naming both versions;
- the coordinator, in site discovery: every site reports the version of its installed neurofed (node
  config ``contract-version``, written by `neurofed-site start`), and a site of another version takes no
  part in the run, with a reason naming both versions.

Bump it when a message, a setting or node-config key a site reads, or the meaning of a site's files
changes so that one side would misread the other (deploy/README.md, "Upgrading").
"""

from __future__ import annotations

import re

CONTRACT_VERSION = 1
CONTRACT_VERSION_KEY = "contract-version"
"""Its key in the site daemon's node config, in a site's query reply and in every message's config."""
VERSION_FILE = "contract/version.py"
"""This file's path in the project, and so in every app bundle built from it."""
_DEFINITION = re.compile(r"^CONTRACT_VERSION = (\d+)$", re.MULTILINE)


def bundled_contract_version(version_file_text: str) -> int | None:
    """The `CONTRACT_VERSION` a copy of this file declares (None if it declares none)."""
    found = _DEFINITION.search(version_file_text)
    return int(found.group(1)) if found else None


def contract_mismatch(coordinator: int | None, site: int | None, which_site: str) -> str | None:
    """Why a site and the coordinator's app cannot work together, naming both versions; None if they can.

    ``which_site``: how the message names the site, e.g. ``"site hospital-a"`` or ``"this site"``.
    """
    if coordinator == site:
        return None
    unknown = "none (a neurofed older than contract versions)"
    return (
        f"contract version mismatch: the coordinator's app speaks contract version "
        f"{coordinator if coordinator is not None else unknown}, {which_site}'s installed neurofed "
        f"version {site if site is not None else unknown}; install the same neurofed release on both sides, "
        "re-approve it at the site and restart the site (deploy/README.md, Upgrading)"
    )
