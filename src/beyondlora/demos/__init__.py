"""The built-in demos and the tiny models they, the tests and the benchmarks run on, all offline:
:mod:`.cnn` (``beyondlora demo``: LoKr adapts a small CNN to a new domain, then save, reload, merge),
:mod:`.shapes` (``beyondlora train``'s default job: a tiny pre-trained text-to-image model of coloured shapes,
its data and scoring; weights under ``assets/``) and :mod:`.tiny_pipelines` (tiny SD 1.x / SDXL pipelines with
seeded random weights, built from configs).
"""
