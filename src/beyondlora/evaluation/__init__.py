"""Evaluating fine-tuned models as the LyCORIS paper does: prompt types, metrics, encoders, cached
generation, reports and the ``beyondlora evaluate`` command (:mod:`.command`)."""
