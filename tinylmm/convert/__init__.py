"""Importers of other frameworks' checkpoints into tinylmm checkpoints (`tinylmm convert`)."""
