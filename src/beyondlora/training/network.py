"""The adapter network of a run: ``--algo``, ranks, alphas and a target preset → a beyondlora config.

Presets are kohya / LyCORIS' (:data:`~beyondlora.integrations.kohya_args.PRESETS`, or a preset TOML file):
one table and one module selection for ``beyondlora train`` and the sd-scripts network.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..algorithms.config_base import AdapterConfig, algo_names, build_config, name_matches
from ..integrations.kohya_args import NetworkArgs, load_preset, select_modules
from ..ops.geometry import layer_kind
from .settings import TrainConfig, TrainConfigError

#: the layers whose input channels an input-side algorithm ((IA)³) scales: the MLPs' second linear
FEEDFORWARD_PATTERN = r".*(ff\.net\.2|mlp\.fc2)"
#: the ``beyondlora train`` options that set an adapter config field (notes on other fields always show)
TRAIN_OPTIONS = {"r": ("rank", "conv_rank")}


def _is_kxk_conv(module: nn.Module) -> bool:
    return layer_kind(module) == "conv" and any(k != 1 for k in module.kernel_size)


def adapter_config(config: TrainConfig, part: str, model: nn.Module) -> AdapterConfig | None:
    """The adapter config for ``model``, the run's ``part`` ("unet" or "text_encoder"): the layers the preset
    selects (``None`` when it selects none), k×k convolutions at ``--conv-rank`` / ``--conv-alpha``; each
    algorithm's config takes the options that mean something to it
    (:func:`~beyondlora.algorithms.config_base.build_config`)."""
    alpha = config.alpha if config.alpha is not None else float(config.rank)
    conv_rank = config.conv_rank if config.conv_rank is not None else config.rank
    conv_alpha = config.conv_alpha if config.conv_alpha is not None else config.conv_rank or alpha
    args = NetworkArgs(dim=config.rank, alpha=alpha, conv_dim=conv_rank, conv_alpha=conv_alpha)
    selections = select_modules(model, part == "text_encoder", args, load_preset(config.preset))
    if not selections:
        return None
    overridden = sorted(s.name for s in selections if s.args != args and s.args.given - {"on_input"})
    if overridden:
        raise TrainConfigError(
            f"--preset {config.preset} gives {overridden[0]} (and {len(overridden) - 1} more) other network args; "
            "beyondlora train trains one algorithm at one setting: use the preset with the kohya network"
        )
    names = [s.name for s in selections]
    convs = [n for n in names if _is_kxk_conv(model.get_submodule(n))]
    inputs = [s.name for s in selections if s.args.on_input or name_matches(s.name, FEEDFORWARD_PATTERN)]
    fields: dict[str, Any] = {
        "target_modules": names,
        "r": config.rank,
        "alpha": alpha,
        "use_dora": config.use_dora,
        "decompose_factor": config.factor,
        "feedforward_modules": inputs,
        "block_size": max(b for b in (1, 2, 4) if config.rank % b == 0),
        "constraint": config.constraint,
        "rescaled": config.rescaled,
    }
    if convs and (conv_rank, conv_alpha) != (config.rank, alpha):
        fields["rank_pattern"] = {re.escape(n): conv_rank for n in convs}
        fields["alpha_pattern"] = {re.escape(n): float(conv_alpha) for n in convs}
    return build_config(algo_names()[config.algo], **fields)
