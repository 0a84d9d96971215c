"""Everything that touches storage. Only this package imports fsspec. format.py is the store
format (docs/store-format.md), lock.py the writer lock, store.py the Store. May import
pipeline.linalg and the shared modules (config, errors, failpoints, peft_format); never
pipeline.flow, pipeline.operations or above."""
