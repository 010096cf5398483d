"""The site: data discovery and validation, preprocessing and its cache, synthesis, site daemon CLI.

Uses models/ and privacy/, never server/.
"""
