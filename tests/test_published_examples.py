"""PEFT's published LoKr / LoHa usage examples, run as tests against beyondlora.

Each example is run the way the docs spell it, and its behaviour is checked against a computation that
does not go through beyondlora: the output of an untouched copy of the original model, a parameter count
taken directly from ``named_parameters``, and ``W0 + (alpha / r) * torch.kron(W1, W2)`` built by hand.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re

import diffusers
import pytest
import torch
import transformers
from torch import nn

import beyondlora as bl
from helpers.tool_cases import tiny_unet

ATOL = 1e-5
RTOL = 1e-5


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, **kwargs) -> None:
    kwargs.setdefault("atol", ATOL)
    kwargs.setdefault("rtol", RTOL)
    torch.testing.assert_close(actual, expected, **kwargs)


def _beyondlora_modules(model: nn.Module) -> list[str]:
    """Names of modules whose class is defined anywhere in the beyondlora package."""
    return [
        f"{name}: {type(module).__module__}.{type(module).__name__}"
        for name, module in model.named_modules()
        if type(module).__module__.split(".")[0] == "beyondlora"
    ]


# ------------------------------------------------------------------------------------------------
# 1. LoKrConfig + get_peft_model on a BERT sequence classifier
# ------------------------------------------------------------------------------------------------
BERT_SEED = 0
NUM_LABELS = 3
VOCAB = 100


def _bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
    )


def _fresh_bert() -> nn.Module:
    """The original base model; the same seed gives the same weights every time."""
    torch.manual_seed(BERT_SEED)
    return transformers.BertForSequenceClassification(_bert_config()).eval()


def _bert_batch(seed: int = 1, batch: int = 8, seq: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[: batch // 2, seq - 3 :] = 0
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _eval_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def _lokr_factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """W1 (a, c) and W2 (b, d) of a linear LoKr adapter, rebuilt from its raw parameters."""
    params = dict(adapter.named_parameters())
    w1 = params["lokr_w1"] if "lokr_w1" in params else params["lokr_w1_a"] @ params["lokr_w1_b"]
    w2 = params["lokr_w2"] if "lokr_w2" in params else params["lokr_w2_a"] @ params["lokr_w2_b"]
    return w1.detach(), w2.detach()


def _hand_merged_bert(peft_model: nn.Module, alpha: float, r: int) -> nn.Module:
    """A fresh original BERT with ``W0 + alpha/r * kron(W1, W2)`` written into query/value by hand and
    the trained classifier copy's weights in the classifier: the adapted model, computed independently."""
    reference = _fresh_bert()
    ref_modules = dict(reference.named_modules())
    found = 0
    with torch.no_grad():
        for name, _ in peft_model.named_parameters():
            match = re.fullmatch(r"base_model\.(.*\.(?:query|value))\.adapters\.default\.lokr_w1(?:_a)?", name)
            if match is None:
                continue
            layer_name = match.group(1)
            adapter = peft_model.get_submodule(f"base_model.{layer_name}.adapters.default")
            w1, w2 = _lokr_factors(adapter)
            delta = (alpha / r) * torch.kron(w1, w2)
            target = ref_modules[layer_name]
            assert delta.shape == target.weight.shape
            target.weight += delta
            found += 1
        assert found == 2 * 2  # query and value in each of the two layers
        trained_head = peft_model.get_submodule("base_model.classifier.modules_to_save.default")
        reference.classifier.load_state_dict(trained_head.state_dict())
    return reference.eval()


def test_lokr_config_example_bert_sequence_classifier(tmp_path):
    batch = _bert_batch()

    model = _fresh_bert()
    original = copy.deepcopy(model).eval()
    original_logits = _logits(original, batch)
    base_param_count = sum(p.numel() for p in original.parameters())
    classifier_count = sum(p.numel() for p in original.classifier.parameters())

    # --- the published example ----------------------------------------------------------------
    config = bl.LoKrConfig(
        r=4,
        alpha=4,
        target_modules=["query", "value"],
        module_dropout=0.1,
        modules_to_save=["classifier"],
    )
    model = bl.get_peft_model(model, config)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        model.print_trainable_parameters()
    printed = buffer.getvalue().strip()

    # --- which parameters train ----------------------------------------------------------------
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    lokr_names = [n for n in trainable if re.search(r"\.adapters\.default\.lokr_\w+$", n)]
    head_names = [n for n in trainable if ".classifier.modules_to_save.default." in n]
    assert sorted(lokr_names + head_names) == sorted(trainable), (
        f"unexpected trainable parameters: {sorted(set(trainable) - set(lokr_names) - set(head_names))}"
    )
    assert {n.split(".adapters.")[0] for n in lokr_names} == {
        f"base_model.bert.encoder.layer.{i}.attention.self.{kind}" for i in range(2) for kind in ("query", "value")
    }
    assert sum(trainable[n].numel() for n in head_names) == classifier_count
    # every frozen parameter is one of the original model's (incl. the original classifier)
    assert sum(p.numel() for p in frozen.values()) == base_param_count
    assert not any(".adapters." in n for n in frozen)

    expected_trainable = sum(p.numel() for p in trainable.values())
    expected_total = base_param_count + expected_trainable
    assert model.get_nb_trainable_parameters() == (expected_trainable, expected_total)
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", printed)
    assert match is not None, printed
    assert int(match.group(1).replace(",", "")) == expected_trainable
    assert int(match.group(2).replace(",", "")) == expected_total
    assert float(match.group(3)) == pytest.approx(100 * expected_trainable / expected_total, abs=1e-4)
    # a LoKr of rank 4 on 32x32 layers is much smaller than the layers themselves
    assert expected_trainable - classifier_count < 4 * 32 * 32

    # --- at init the adapted model computes the original function --------------------------------
    _assert_close(_logits(model, batch), original_logits)
    # attribute access falls through to the base model
    assert model.config.num_labels == NUM_LABELS

    # --- a few training steps ------------------------------------------------------------------
    loss_before = _eval_loss(model, batch)
    torch.manual_seed(123)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in frozen.values()), "a frozen base parameter received a gradient"
    loss_after = _eval_loss(model, batch)
    assert loss_after < loss_before - 1e-3, (loss_before, loss_after)

    trained_logits = _logits(model, batch)
    assert not torch.allclose(trained_logits, original_logits, atol=1e-3)
    # the base weights themselves did not move
    for name, param in original.named_parameters():
        wrapped = name.replace(".query.", ".query.base_layer.").replace(".value.", ".value.base_layer.")
        wrapped = wrapped.replace("classifier.", "classifier.original_module.")
        _assert_close(model.base_model.get_parameter(wrapped), param, atol=0, rtol=0)

    # the trained adapted model equals the hand-built W0 + alpha/r * kron(W1, W2) model
    _assert_close(trained_logits, _logits(_hand_merged_bert(model, alpha=4, r=4), batch))

    # disable_adapter gives the original function back, and only inside the block
    with model.disable_adapter():
        _assert_close(_logits(model, batch), original_logits)
    _assert_close(_logits(model, batch), trained_logits)

    # merge_adapter / unmerge_adapter keep the function and restore the weights
    query = model.base_model.bert.encoder.layer[0].attention.self.query
    w0 = query.base_layer.weight.detach().clone()
    model.merge_adapter()
    assert not torch.allclose(query.base_layer.weight, w0)
    _assert_close(_logits(model, batch), trained_logits)
    model.unmerge_adapter()
    _assert_close(query.base_layer.weight, w0)
    _assert_close(_logits(model, batch), trained_logits)

    # --- save / load onto a fresh copy of the original base model ----------------------------------
    model.save_pretrained(tmp_path)
    fresh = _fresh_bert()
    _assert_close(_logits(fresh, batch), original_logits, atol=0, rtol=0)
    loaded = bl.PeftModel.from_pretrained(fresh, tmp_path)
    _assert_close(_logits(loaded, batch), trained_logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default

    # --- merge_and_unload ------------------------------------------------------------------------
    merged = model.merge_and_unload()
    assert _beyondlora_modules(merged) == []
    assert isinstance(merged, transformers.BertForSequenceClassification)
    assert type(merged.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert type(merged.classifier) is nn.Linear
    _assert_close(_logits(merged, batch), trained_logits)
    merged_state = merged.state_dict()
    assert set(merged_state) == set(original.state_dict())


# ------------------------------------------------------------------------------------------------
# 2. LoKrModel / LoHaModel on a diffusers UNet and a CLIP text encoder
# ------------------------------------------------------------------------------------------------
UNET_TARGETS = ["proj_in", "proj_out", "to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"]
TE_VOCAB = 100


def _fresh_text_encoder() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=TE_VOCAB,
        max_position_embeddings=16,
    )
    return transformers.CLIPTextModel(config).eval()


def _diffusion_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, TE_VOCAB, (2, 16), generator=gen)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    timestep = torch.tensor([10, 500])
    return input_ids, sample, timestep


def _run_pipeline(text_encoder: nn.Module, unet: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Text encoder then UNet, called as a diffusers pipeline calls them."""
    input_ids, sample, timestep = _diffusion_inputs()
    text_encoder.eval()
    unet.eval()
    with torch.no_grad():
        hidden = text_encoder(input_ids)[0]
        noise = unet(sample, timestep, encoder_hidden_states=hidden).sample
        as_tuple = unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]
    _assert_close(as_tuple, noise, atol=0, rtol=0)
    return hidden, noise


def _configs(kind: str, init_weights: bool) -> tuple[bl.AdapterConfig, bl.AdapterConfig, type]:
    if kind == "lokr":
        config_unet = bl.LoKrConfig(
            r=4,
            alpha=4,
            target_modules=UNET_TARGETS,
            rank_dropout=0.0,
            module_dropout=0.0,
            init_weights=init_weights,
            use_effective_conv2d=True,
        )
        config_te = bl.LoKrConfig(
            r=4,
            lora_alpha=4,
            target_modules=TE_TARGETS,
            rank_dropout=0.0,
            module_dropout=0.0,
            init_weights=init_weights,
        )
        return config_unet, config_te, bl.LoKrModel
    config_unet = bl.LoHaConfig(
        r=4,
        alpha=4,
        target_modules=UNET_TARGETS,
        rank_dropout=0.0,
        module_dropout=0.0,
        init_weights=init_weights,
        use_effective_conv2d=True,
    )
    config_te = bl.LoHaConfig(
        r=4,
        lora_alpha=4,
        target_modules=TE_TARGETS,
        rank_dropout=0.0,
        module_dropout=0.0,
        init_weights=init_weights,
    )
    return config_unet, config_te, bl.LoHaModel


def _hand_delta(adapter: nn.Module, kind: str, scale: float) -> torch.Tensor:
    """ΔW of a linear adapter from its raw parameters, by the published formulas."""
    if kind == "lokr":
        w1, w2 = _lokr_factors(adapter)
        return scale * torch.kron(w1, w2)
    p = {n: t.detach() for n, t in adapter.named_parameters()}
    return scale * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])


def _hand_adapted_text_encoder(wrapped: nn.Module, original: nn.Module, kind: str, scale: float) -> nn.Module:
    """A copy of the original text encoder with ``W0 + ΔW`` written into every adapted Linear by hand."""
    reference = copy.deepcopy(original).eval()
    count = 0
    with torch.no_grad():
        for name in _adapted_names(wrapped):
            layer_name = name.removeprefix("base_model.")
            adapter = wrapped.get_submodule(f"{name}.adapters.default")
            target = reference.get_submodule(layer_name)
            delta = _hand_delta(adapter, kind, scale)
            assert delta.shape == target.weight.shape, (layer_name, delta.shape)
            target.weight += delta
            count += 1
    assert count == 2 * len(TE_TARGETS)
    return reference


def _adapted_names(model: nn.Module) -> set[str]:
    return {n.split(".adapters.")[0] for n, _ in model.named_parameters() if ".adapters.default." in n}


def _expected_targets(model: nn.Module, targets: list[str]) -> set[str]:
    return {
        f"base_model.{name}"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in targets)
    }


@pytest.fixture(scope="module")
def originals():
    unet, text_encoder = tiny_unet(), _fresh_text_encoder()
    hidden, noise = _run_pipeline(text_encoder, unet)
    return {"unet": unet, "text_encoder": text_encoder, "hidden": hidden, "noise": noise}


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_tuner_model_example_unet_and_text_encoder(kind, originals):
    config_unet, config_te, tuner = _configs(kind, init_weights=True)
    alpha = config_te.alpha
    assert alpha == 4.0  # lora_alpha is PEFT's spelling of alpha

    unet = copy.deepcopy(originals["unet"])
    text_encoder = copy.deepcopy(originals["text_encoder"])
    expected_unet_targets = _expected_targets(unet, UNET_TARGETS)
    expected_te_targets = _expected_targets(text_encoder, TE_TARGETS)

    unet = tuner(unet, config_unet, "default")
    text_encoder = tuner(text_encoder, config_te, "default")

    # every targeted layer got an adapter, and nothing else did
    assert _adapted_names(unet) == expected_unet_targets
    assert _adapted_names(text_encoder) == expected_te_targets
    assert any("proj_in" in n for n in expected_unet_targets)

    # the base model's attributes are reachable through the wrapper
    assert unet.config.sample_size == 8
    assert unet.config.cross_attention_dim == 32
    assert unet.dtype == torch.float32
    assert unet.device == torch.device("cpu")
    assert text_encoder.config.hidden_size == 32
    assert text_encoder.dtype == torch.float32

    # identity at init: same outputs as the untouched originals
    hidden, noise = _run_pipeline(text_encoder, unet)
    _assert_close(hidden, originals["hidden"])
    _assert_close(noise, originals["noise"])


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_tuner_model_example_random_init_merge(kind, originals):
    config_unet, config_te, tuner = _configs(kind, init_weights=False)
    torch.manual_seed(1)
    unet = tuner(copy.deepcopy(originals["unet"]), config_unet, "default")
    text_encoder = tuner(copy.deepcopy(originals["text_encoder"]), config_te, "default")

    # random factors: the adapters change the function
    hidden, noise = _run_pipeline(text_encoder, unet)
    assert not torch.allclose(hidden, originals["hidden"], atol=1e-4)
    assert not torch.allclose(noise, originals["noise"], atol=1e-4)

    # ... and the text encoder computes exactly W0 + ΔW built by hand from the factors
    hand_te = _hand_adapted_text_encoder(text_encoder, originals["text_encoder"], kind, config_te.alpha / config_te.r)
    input_ids, _, _ = _diffusion_inputs()
    with torch.no_grad():
        _assert_close(hidden, hand_te(input_ids)[0], atol=1e-4, rtol=1e-4)

    # disabling gives the original function back
    with unet.disable_adapter(), text_encoder.disable_adapter():
        hidden_off, noise_off = _run_pipeline(text_encoder, unet)
    _assert_close(hidden_off, originals["hidden"])
    _assert_close(noise_off, originals["noise"])

    # merged == unmerged
    unet.merge_adapter()
    text_encoder.merge_adapter()
    hidden_m, noise_m = _run_pipeline(text_encoder, unet)
    _assert_close(hidden_m, hidden, atol=1e-4, rtol=1e-4)
    _assert_close(noise_m, noise, atol=1e-4, rtol=1e-4)

    # unmerging restores the base weights exactly enough to give the same outputs again
    unet.unmerge_adapter()
    text_encoder.unmerge_adapter()
    hidden_u, noise_u = _run_pipeline(text_encoder, unet)
    _assert_close(hidden_u, hidden)
    _assert_close(noise_u, noise)
    for name, param in originals["unet"].named_parameters():
        parent, _, leaf = name.rpartition(".")
        module = unet.base_model.get_submodule(parent)
        if type(module).__module__.startswith("beyondlora"):
            module = module.base_layer
        _assert_close(getattr(module, leaf), param)

    # merge_and_unload: plain diffusers / transformers models computing the adapted function
    plain_unet = unet.merge_and_unload()
    plain_te = text_encoder.merge_and_unload()
    assert _beyondlora_modules(plain_unet) == []
    assert _beyondlora_modules(plain_te) == []
    assert isinstance(plain_unet, diffusers.UNet2DConditionModel)
    assert isinstance(plain_te, transformers.CLIPTextModel)
    assert set(plain_unet.state_dict()) == set(originals["unet"].state_dict())
    hidden_p, noise_p = _run_pipeline(plain_te, plain_unet)
    _assert_close(hidden_p, hidden, atol=1e-4, rtol=1e-4)
    _assert_close(noise_p, noise, atol=1e-4, rtol=1e-4)
