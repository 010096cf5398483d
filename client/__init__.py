"""The site: data discovery and validation, preprocessing and its cache, the ClientApp's handlers, the
private round, the site's state and daemon, segmentation of its own scans, and `neurofed-site`.

Uses contract/, models/, privacy/ and common/; never server/ or study/.
"""
