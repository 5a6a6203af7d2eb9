"""The mole coordinator: router LoRA, mapping-driven dispatch to workers, the public HTTP API."""
