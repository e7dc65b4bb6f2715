"""Other frameworks' checkpoints: importers into tinylmm checkpoints (`tinylmm convert`: tinyllava.py)
and exporters out of them (`tinylmm export`: hf_llava.py, tinyllava_export.py)."""
