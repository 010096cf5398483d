"""The coordinator: Flower ServerApp and its run loop, update screening, strategies, the run directory,
reports, the SuperLink with its enrolled sites and audit log, and `neurofed coordinator` / `neurofed run`.

Uses contract/, models/, privacy/ and common/; never client/ or study/ (it never sees a site's data).
"""
