"""Exploration campaigns: a matrix of checker explorations run on local processes or Ray.

- campaign.py: the YAML campaign file, its validation and the cells of its matrix;
- partition.py: bounded-exhaustive exploration split across workers by state hash;
- walks.py: random exploration split by seed;
- engines.py: LocalEngine (processes of this machine, the default) and RayEngine;
- runner.py: cells one after another, each finished cell written at once;
- report.py: per-cell JSON, a Markdown summary with plots;
- resume.py: the report directory, from which an interrupted campaign resumes.

docs/campaigns.md is the user's guide.
"""
