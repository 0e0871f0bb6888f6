"""The adapter network of a run: ``--algo``, ranks, alphas and target presets → a beyondlora config."""

from __future__ import annotations

from typing import Any

from ..algorithms.config_base import AdapterConfig, algo_names, build_config
from .settings import TrainConfig

_ATTENTION = r"attn\d\.(to_q|to_k|to_v|to_out\.0)"
_MLP = r"ff\.net\.(0\.proj|2)|proj_in|proj_out"
_CONVS = r"resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(downsamplers|upsamplers)\.0\.conv"
#: the 3×3 convolutions that --conv-rank / --conv-alpha apply to
CONV_PATTERN = r"resnets\.\d+\.(conv1|conv2)|(downsamplers|upsamplers)\.0\.conv"
PRESET_PATTERNS = {
    "attn": rf".*({_ATTENTION})",
    "attn-mlp": rf".*({_ATTENTION}|{_MLP})",
    "full": rf".*({_ATTENTION}|{_MLP}|{_CONVS})",
}
TEXT_ENCODER_PATTERN = r".*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
#: the layers whose input channels an input-side algorithm ((IA)³) scales: the MLPs' second linear
FEEDFORWARD_PATTERN = r".*(ff\.net\.2|mlp\.fc2)"


def adapter_config(config: TrainConfig, part: str) -> AdapterConfig:
    """The adapter config for ``part`` ("unet" or "text_encoder"); each algorithm's config takes the
    options that mean something to it (:func:`~beyondlora.algorithms.config_base.build_config`)."""
    fields: dict[str, Any] = {
        "target_modules": PRESET_PATTERNS[config.preset] if part == "unet" else TEXT_ENCODER_PATTERN,
        "r": config.rank,
        "alpha": config.alpha,
        "use_dora": config.use_dora,
        "decompose_factor": config.factor,
        "feedforward_modules": FEEDFORWARD_PATTERN,
        "block_size": max(b for b in (1, 2, 4) if config.rank % b == 0),
    }
    if part == "unet" and config.preset == "full":
        if config.conv_rank is not None:
            fields["rank_pattern"] = {CONV_PATTERN: config.conv_rank}
        conv_alpha = config.conv_alpha if config.conv_alpha is not None else config.conv_rank
        if conv_alpha is not None:
            fields["alpha_pattern"] = {CONV_PATTERN: float(conv_alpha)}
    return build_config(algo_names()[config.algo], **fields)
