"""The benchmark job's parts: process-tree memory sampling, the floors (bare read, bare math),
the vlora comparison, the figures (ratios, targets, the printed table), and the
orchestrating run (`python -m jobs.benchmark`)."""
