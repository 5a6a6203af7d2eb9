"""mole worker: one model holder (merged or dynamic multi-LoRA) behind a batching FastAPI server."""
