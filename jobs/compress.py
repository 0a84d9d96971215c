"""Scheduled compress job: `python -m jobs.compress --config jobs/configs/<file>.yaml [--set key=value]`.
What it runs is pipeline.jobspec's; see the README's runbook."""

import sys

from pipeline.jobspec import main

if __name__ == "__main__":
    sys.exit(main("compress"))
