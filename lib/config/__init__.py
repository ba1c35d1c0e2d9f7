"""Config tooling: experiment graphs (`fdl.Config`) from preset files and flags, their values,
printouts, saved copies and reviews. Nothing here builds an experiment's arrays.

    presets.py    preset files (`experiments/dit.py:xl2`), fiddlers, `build`
    overrides.py  `--fdl_set` / `--fdl_tags_set`: paths, literal values checked against types
    values.py     constructor defaults, effective values, provenance, flat printouts
    saved.py      a run's config.json / config.txt / effective.json, written and read back
    references.py what a config file may refer to (loading one runs no code)
    review.py     drawings (svg, html), leaf-by-leaf diffs, export as a Python preset

Imports point one way: values <- overrides <- presets; values, overrides, references <- saved;
values <- references, review. None imports `experiments` (a preset's module is imported by
name when the preset is loaded).
"""

import os

# The repository: preset files and provenance paths are relative to it.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
