"""The steps of one run, in order: discover (the source against a store's catalog), scan, plan
(shards that fit the memory bound per task), compute (one task per shard), assemble (the version's
tables, report and manifest), publish (manifest, then LATEST). `Change` says what a new version
is made of. May import pipeline.io, pipeline.linalg and the shared modules (config, errors,
failpoints, peft_format, progress, runners); never pipeline.operations or above, never Ray."""
