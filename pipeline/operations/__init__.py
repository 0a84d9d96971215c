"""What a user asks for, one module each: compress, grow (project / rebase / --full), export,
verify, info, report, evaluate, history (versions, rollback, prune), snapshot (a Subspace as a
store version). Each composes the flow's steps; may import pipeline.flow, pipeline.io,
pipeline.linalg and the shared modules, never the CLI, the Python API or jobs."""
