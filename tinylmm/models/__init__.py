"""The model: vision tower -> connector -> LLM (lmm.py), put together in one place
(assemble.py: `assemble`, `build_model`, `load`) and saved in one format (checkpoint.py).
Connectors and vision backends are registries (connectors/, vision/).

Nothing is imported here, so that asking one registry (config validation asks the
connectors) does not load every model class: import from the modules."""
