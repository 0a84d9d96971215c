"""One verb per module. Stages call pipeline.io and pipeline.linalg; they never import Ray."""
