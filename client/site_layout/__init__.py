"""Find the subjects in a site's data folder: a BIDS dataset or a flat images/labels folder.

Discovery only looks at names and folders; it opens no image (that is validation's job) and never
modifies anything. Files it finds but cannot attach to exactly one subject become ``Problem``s.

BIDS (https://bids-specification.readthedocs.io)::

    DATA/participants.tsv                                        optional
    DATA/sub-01/[ses-pre/]anat/sub-01_[ses-pre_][acq-x_][run-1_]T1w.nii.gz   T1w, T2w, FLAIR, PDw
    DATA/sub-01/[ses-pre/]anat/sub-01_[...]_mask.nii.gz          optional mask
    DATA/derivatives/<name>/sub-01/[ses-pre/]anat/sub-01_[...]_dseg.nii.gz   label map
    DATA/derivatives/<name>/sub-01/[ses-pre/]anat/sub-01_desc-brain_mask.nii.gz  optional mask

A ``*_dseg`` beside the image in anat/ is a candidate label too. Labels and masks attach to the
subject and session of their folder, and only to images whose shared entities (acq-, run-, ...) agree.

Flat::

    DATA/images/case01.nii.gz        (or case01_T1w.nii.gz, case01_FLAIR.nii.gz, ...)
    DATA/labels/case01.nii.gz        (or case01_dseg / _seg / _label / _labels.nii.gz)
    DATA/masks/case01.nii.gz         optional (or case01_mask / _brainmask / _desc-brain_mask.nii.gz)
"""

from client.site_layout.bids import NATIVE_SPACES, BidsName, parse_bids_name
from client.site_layout.common import SiteLayout, natural_key, nifti_stem
from client.site_layout.discover import discover_site
from client.site_layout.flat import FLAT_LABEL_SUFFIXES, FLAT_MASK_SUFFIXES

__all__ = [
    "FLAT_LABEL_SUFFIXES",
    "FLAT_MASK_SUFFIXES",
    "NATIVE_SPACES",
    "BidsName",
    "SiteLayout",
    "discover_site",
    "natural_key",
    "nifti_stem",
    "parse_bids_name",
]
