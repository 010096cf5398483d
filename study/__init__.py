"""What runs on a researcher's machine with many sites' data: synthesis (head phantom, scanner
profiles), the simulated federation, local-only and pooled baselines, the cross-site study evaluation,
the membership-inference audit, and the `neurofed` command line that composes everything.

The top of the house: it may import client/, server/, contract/, models/, privacy/ and common/;
nothing but bench/ and tests/ imports it.
"""
