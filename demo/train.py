"""Trains the demo VLM from scratch on the scene world.

    python -m vlmedge.demo.train --out demo/model            # the shipped model
    python -m vlmedge.demo.train --size tiny --steps 3 --out /tmp/t   # smoke

Each training sequence is one freshly drawn scene followed by a few
question/answer turns in the chat template's format:

    <s><user> <image>x64 what color is the circle? <end><assistant> red <end><user> ...

Loss is on the answer tokens and their closing <end> only. Several turns per
image give several answers of supervision per vision forward; the first turn
is exactly the single-question format that evaluation and the runtime use.
Scenes come from the training seed range, disjoint from evaluation's.

Runs on a 2-core CPU in about 15 minutes with the defaults.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import build, scenes

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def pixel_values(image) -> np.ndarray:
    """(3, 128, 128) float32, as CLIPImageProcessor gives for a 128x128 scene
    (resizing to the same size is a no-op in Pillow, so only rescale+normalize)."""
    x = np.asarray(image, np.float32) / 255.0
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def encode_turns(tokenizer, turns: list[scenes.Question]) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) for an image + `turns`,
    matching the processor's expansion of <image> into 64 image tokens."""
    v = build.vocab()
    ids = [v["<s>"], v["<user>"]] + [v[build.IMAGE_TOKEN]] * build.NUM_IMAGE_TOKENS
    labels = [-100] * len(ids)
    for i, q in enumerate(turns):
        prefix = ([] if i == 0 else [v["<user>"]])
        prefix += tokenizer(q.question, add_special_tokens=False)["input_ids"]
        prefix += [v["<end>"], v["<assistant>"]]
        answer = tokenizer(q.answer, add_special_tokens=False)["input_ids"] + [v["<end>"]]
        ids += prefix + answer
        labels += [-100] * len(prefix) + answer
    return ids, labels


def make_batch(tokenizer, rng: np.random.Generator, batch: int, turns: int):
    import torch

    seqs, pix = [], []
    for _ in range(batch):
        scene = scenes.make_scene(int(rng.integers(len(scenes.TRAIN_SEEDS))))
        qs = scenes.questions(scene, rng)
        order = rng.permutation(len(qs))[: int(rng.integers(1, turns + 1))]
        seqs.append(encode_turns(tokenizer, [qs[i] for i in order]))
        pix.append(pixel_values(scene.image))
    T = max(len(s[0]) for s in seqs)
    pad = build.vocab()["<pad>"]
    ids = torch.full((batch, T), pad, dtype=torch.long)
    labels = torch.full((batch, T), -100, dtype=torch.long)
    mask = torch.zeros((batch, T), dtype=torch.long)
    for b, (i, l) in enumerate(seqs):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(l)] = torch.tensor(l)
        mask[b, : len(i)] = 1
    return ids, mask, labels, torch.from_numpy(np.stack(pix))


def train(args) -> Path:
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration(build.make_config(args.size))
    tokenizer = build.make_tokenizer()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, {args.steps} steps of batch {args.batch}",
          flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, min(200, args.steps // 10))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 5%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    start = time.time()
    ema = None
    for step in range(args.steps):
        ids, mask, labels, pix = make_batch(tokenizer, rng, args.batch, args.turns)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - start
            eta = el / (step + 1) * (args.steps - step - 1)
            print(f"step {step:5d}/{args.steps}  loss {ema:.4f}  lr {lr_at(step):.2e}  "
                  f"{el:6.0f}s elapsed, eta {eta:4.0f}s", flush=True)
    model.eval()
    out = Path(args.out)
    build.save_model_dir(model, out)
    print(f"saved to {out} after {time.time() - start:.0f}s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "model"),
                   help="model directory to write (default: the packaged demo/model)")
    p.add_argument("--size", choices=sorted(build.SIZES), default="demo")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--turns", type=int, default=3, help="max question turns per image")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.turns < 1:
        print("error: --steps, --batch and --turns must be >= 1", file=sys.stderr)
        return 2
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
