"""The machinery that hosts adapters on a base module: :mod:`.layers` (:class:`~.layers.AdapterLayer`, one base
module with its named adapters, the bypass and combined paths, merging), :mod:`.targeting` (which modules of a
model get an adapter), :mod:`.inject` (building adapters, then attaching them, so a failure changes nothing; and
:func:`~.inject.replace_submodule`, the one place a module of a model is swapped by its dotted name),
:mod:`.modules_to_save` (fully trained copies of whole modules) and :mod:`.cost_model` (what the bypass's
rank-sized work costs on each device).
"""
