"""The shipped and registered data: the model zoo's presets, the recipes, and the LLM and
vision families presets belong to. Reading and checking YAML only: nothing here builds a
model (that is `tinylmm.models.assemble`, asked by `tinylmm.api`)."""
