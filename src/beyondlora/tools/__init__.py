"""Adapter tools, each behind a ``beyondlora`` subcommand (see README.md in this folder).

- :mod:`.extract` — tuned − base as a LoCon (SVD) or LoKr (nearest Kronecker product) file;
- :mod:`.merge` — adapters baked into a model, written in the model's format;
- :mod:`.resize` — LoRA / LoCon / DyLoRA ranks cut by SVD;
- :mod:`.convert` / :mod:`.convert_files` — single file ⇄ PEFT folder ⇄ diffusers' LoRA layout;
- :mod:`.inspect` — what an adapter file holds;

on top of :mod:`.model_files` (models read header-first, tensor by tensor), :mod:`.adapter_files` (adapter files
read against a real or inferred model) and :mod:`beyondlora.ops.decompositions` (the SVD / Tucker / Kronecker math).
"""
