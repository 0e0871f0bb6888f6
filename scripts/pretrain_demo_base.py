"""Pre-train the built-in demo's base model (red/green/blue circles and squares) and write its weights.

    .venv/bin/python scripts/pretrain_demo_base.py [--steps 1500] [--out src/beyondlora/demos/assets]

Writes ``demo_base.safetensors`` (UNet and text encoder, float16) and ``preview.png`` (one sample per
prompt).  Deterministic given the seed; about 0.5 s a step on one shared CPU thread.  The committed
weights were made in two runs (about 28 minutes in all):

    pretrain_demo_base.py --steps 1500 --batch 16 --lr 1e-3 --out /tmp/a
    pretrain_demo_base.py --steps 1200 --batch 16 --lr 5e-4 --seed 1 --init /tmp/a/demo_base.safetensors
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from beyondlora.demos.shapes import (
    BASE_COLOURS,
    BASE_SHAPES,
    WEIGHTS,
    PixelCodec,
    base_examples,
    build_demo_models,
)
from beyondlora.training.report import save_grid
from beyondlora.training.sampling import encode_prompts, sample_latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=WEIGHTS.parent)
    parser.add_argument("--init", type=Path, default=None, help="continue from these weights (a demo_base file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the examples and the noise")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    unet, text_encoder, tokenizer, scheduler = build_demo_models()
    if args.init is not None:
        from safetensors.torch import load_file

        state = load_file(str(args.init))
        unet.load_state_dict({k[5:]: v.float() for k, v in state.items() if k.startswith("unet.")})
    codec = PixelCodec()
    images, prompts = base_examples(4096, seed=args.seed)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) * 2 - 1
    latents = codec.encode(pixels)
    vocabulary = sorted(set(prompts)) + [""]
    embeds = encode_prompts(text_encoder, tokenizer, vocabulary)
    index = torch.tensor([vocabulary.index(p) for p in prompts])
    alphas = scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    unet.train()
    start = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.randint(len(latents), (args.batch,))
        x0 = latents[batch]
        cond_index = torch.where(torch.rand(args.batch) < 0.1, len(vocabulary) - 1, index[batch])
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (args.batch,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=embeds[cond_index]).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {time.perf_counter() - start:.0f}s", flush=True)
    unet.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    state = {f"unet.{k}": v.half() for k, v in unet.state_dict().items()}
    state.update({f"te.{k}": v.half() for k, v in text_encoder.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(args.out / "demo_base.safetensors"))
    shown = [f"a {c} {s}" for c in BASE_COLOURS for s in BASE_SHAPES] + ["a yellow cross"]
    rows = []
    for seed in range(4):
        cond = encode_prompts(text_encoder, tokenizer, shown)
        out = sample_latents(unet, dict(scheduler.config), cond, embeds[-1:], (4, 16, 16), [seed] * len(shown))
        rows.append(codec.decode(out))
    save_grid(rows, args.out / "preview.png", labels=shown)
    print(f"done in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
