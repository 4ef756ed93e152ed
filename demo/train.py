"""Trains the demo VLM on the scene world, from scratch or from a trained one.

    python -m vlmedge.demo.train --out /tmp/scratch                   # from scratch
    python -m vlmedge.demo.train --size tiny --steps 3 --out /tmp/t   # smoke

The shipped model (demo/model) is the model trained from scratch before
grounding was added (`git show 03c9f97:demo/model/...`: 7 question kinds,
0.996 on 500 questions) taught the box kind by three fine-tuning runs:

    python -m vlmedge.demo.train --init-from OLD --out FT1 --vision-steps 800 \
        --vision-lr 1e-3 --steps 1500 --lr 7e-4                          # ~10 min
    python -m vlmedge.demo.train --init-from FT1 --out FT2 --vision-steps 0 \
        --steps 1000 --lr 3e-4 --aux-weight 0.2 --route-weight 0.1          # ~7 min
    python -m vlmedge.demo.train --init-from FT2 --out demo/model --vision-steps 0 \
        --steps 600 --lr 2e-4 --aux-weight 0.2 --route-weight 0.1 \
        --kind-weight yesno=2.5 --kind-weight caption=2.0                   # ~4 min

(the last two: "polish" runs, LM loss at a low rate with the training-only
heads re-initialised, so held at low weights). Measured on `vlm-eval --n 500`
(seed 0) after each: FT1 0.976 (box 0.968, yes/no and captions 0.935), FT2
0.986, shipped 0.992 (box 0.968; the other kinds as before: yes/no and
captions 0.984); on 2,000 questions (seed 1) the shipped model scores 0.994
(box 0.996) and the old one's seven kinds 0.994 too. From scratch with all
eight kinds (3,000 joint steps) box reached 1.00 but shape, count and yes/no
fell to 0.84, 0.70 and 0.71 (overall 0.896; with the box losses weighted
down, 0.866): the box probes and routes crowded the others out of a
from-scratch budget this machine can afford.

Each training sequence is one freshly drawn scene followed by a few
question/answer turns in the chat template's format:

    <s><user> <image>x17 what color is the circle? <end><assistant> red <end><user> ...

(17 image tokens: CLIP's class token, kept as a scene summary, then one
token per cell of the scene's 4x4 grid.) Loss is on the answer tokens and
their closing <end> only. Several turns per image give several answers of
supervision per vision forward; the first turn is exactly the
single-question format that evaluation and the runtime use. Scenes come
from the training seed range, disjoint from evaluation's.

Training runs in two stages, with auxiliary losses on training-only heads
(none of them is part of the shipped model):

1. Vision warm-up (--vision-steps, ~0.12 s a step): the vision tower and
   projector alone, on a per-token loss. A linear probe on each of the 16
   cell tokens predicts the colour, shape and size in its grid cell (scored
   against the word embeddings of "red", "circle", "small", ... so a cell's
   feature lands next to the words that name it) and its row and column;
   one on the summary (class) token predicts the scene's counts (all, small
   and large shapes). Without per-cell labels the decoder sat on a "blind"
   plateau (answering from language priors) for the whole budget; without
   the warm-up, shape perception lagged the decoder for 1,000+ steps.
2. Joint training (--steps, ~0.33 s a step) of everything on the answers,
   the per-token loss, and routing probes on the decoder's hidden states,
   which predict the token the model must look at: at the word naming the
   object (layer 2), at the <assistant> token that starts the answer (layer
   3), at each "a" that opens an object in a caption, "no cell" for a
   yes/no question answered "no", and the summary token for a count
   question. Without them the decoder answered colour and position
   questions at chance after 1,000 steps.

Grounding ("find the red circle." -> "[0.03, 0.76, 0.24, 0.97]", LLaVA-1.5's
box format) adds a box probe on each occupied cell (x1, y1, x2, y2 as the
answer's 101 coordinate words, in both stages) and routes the "[" and each
"," of a box answer, which predict the next coordinate, to the object's cell.

What each piece bought, on 500 held-out questions (`vlm-eval`, seed 0):
the first shipped model (600 warm-up steps, no count features, no "no
cell" or caption routing) scored 0.922 (shape 0.875, count 0.761, yes/no
0.859). A 2,000-step warm-up with a decaying learning rate took shape to
1.00 (at a constant 2e-3 the warm-up diverged after ~1,300 steps); "no
cell" and caption routing took yes/no to 0.99 and captions to 1.00.
Counting by size was the last weak kind. With the counts stored on the
13-15 EMPTY cell tokens, either they leaked into size answers (free
directions: blank cells scored "small" higher than small shapes did; count
1.00, size 0.83) or the decoder did not learn to read them (blank cells
held on "<pad>" for the size words: size 0.99, count 0.80). On ONE summary
token, held on "<pad>" for every word family (--summary-pad all), both
hold: 0.996 overall, count and size 1.00. With the summary token free on
the size words (--summary-pad colorshape, measured on a GPU run to step
1,600) counting stalled as it had on blank cells.

From scratch: about 18 minutes on a 2-core CPU with the defaults
(--threads 2), depending on what else runs on the machine.
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


def encode_turns(tokenizer, turns: list["Turn"]) -> tuple[list[int], list[int], list[int], list]:
    """Token ids, labels (-100 where no loss) and the question kind index of
    each label (-1 elsewhere) for an image + `turns`, matching the
    processor's expansion of <image> into NUM_IMAGE_TOKENS image tokens."""
    v = build.vocab()
    ids = [v["<s>"], v["<user>"]] + [v[build.IMAGE_TOKEN]] * build.NUM_IMAGE_TOKENS
    labels = [-100] * len(ids)
    kinds = [-1] * len(ids)
    routes = []  # (token index, target cell, probe) where the model must look at one cell
    for i, q in enumerate(turns):
        prefix = ([] if i == 0 else [v["<user>"]])
        prefix += tokenizer(q.question, add_special_tokens=False)["input_ids"]
        prefix += [v["<end>"], v["<assistant>"]]
        if q.cell >= 0:
            # Two routing probes: at the last word naming the object ("circle" in
            # "what color is the circle?"), and at the <assistant> token that
            # predicts the answer (see the module docstring).
            qstart = len(ids) + (0 if i == 0 else 1)
            qids = prefix[qstart - len(ids):-2]
            named = [j for j, t in enumerate(qids) if t in q.word_ids]
            if named:
                routes.append((qstart + named[-1], q.cell, 0))
            routes.append((len(ids) + len(prefix) - 1, q.cell, 1))
        answer = tokenizer(q.answer, add_special_tokens=False)["input_ids"] + [v["<end>"]]
        # Captions: each "a" that opens an object's name ("a | green circle, a |
        # blue ...") predicts that object's colour next; the answer probe there
        # learns which cell comes next (3-object captions repeated or skipped
        # the middle object without it).
        starts = [j for j, t in enumerate(answer) if t == v["a"]]
        for j, cell in zip(starts, q.caption_cells):
            routes.append((len(ids) + len(prefix) + j, cell, 1))
        if q.kind == "box" and q.cell >= 0:
            # Box answers: the "[" and each "," predict the next coordinate of
            # the named object's box, read off its cell's token.
            for j, t in enumerate(answer):
                if t in (v["["], v[","]):
                    routes.append((len(ids) + len(prefix) + j, q.cell, 1))
        ids += prefix + answer
        labels += [-100] * len(prefix) + answer
        kinds += [-1] * len(prefix) + [scenes.QUESTION_KINDS.index(q.kind)] * len(answer)
    return ids, labels, kinds, routes


# Which word families (0 colour, 1 shape, 2 size) the summary token must
# score "<pad>" on, as empty cells do. "all" (the default) is the one that
# learned to count by size; with the size words free ("colorshape", "none")
# teacher-forced count accuracy stalled near 0.89 (GPU runs to step 1,600).
SUMMARY_PAD = {"none": (), "colorshape": (0, 1), "all": (0, 1, 2)}


# How often each question kind is drawn for a training turn, relative to the
# others. Colour and position are answered perfectly early on; shape, size,
# count and three-object captions are the last to improve (held-out accuracy
# of earlier runs), so they get more of the supervision.
KIND_WEIGHTS = {"color": 0.7, "shape": 1.3, "size": 1.2, "count": 1.2, "position": 0.6,
                "yesno": 1.0, "caption": 1.4, "box": 1.5}


def batches(args):
    """Every training batch, in order: --vision-steps single-turn batches for
    the warm-up, then --steps batches for joint training, all drawn from one
    generator seeded with --seed (it has no other user, so the stream is the
    same however it is drawn). Warm-up batches are drawn in this process; with
    --data-workers 1 the joint ones come from a worker process, drawn while
    the model trains on the previous batch. On 2 cores that saves ~10% of a
    joint step (0.37 -> 0.33 s) but costs ~30% of a warm-up step, whose
    compute is too short to hide the drawing (measured). Tensors are on the CPU."""
    import torch

    rng = np.random.default_rng(args.seed)
    tokenizer = build.make_tokenizer()
    weights = {**KIND_WEIGHTS, **dict(args.kind_weight)}
    for _ in range(args.vision_steps):
        yield make_batch(tokenizer, rng, args.batch, 1, weights=weights)

    class Joint(torch.utils.data.IterableDataset):
        def __iter__(self):  # in the worker: a copy of `rng` where the warm-up left it
            for _ in range(args.steps):
                yield make_batch(tokenizer, rng, args.batch, args.turns, bool(args.count_route),
                                 weights)

    if args.data_workers:
        yield from torch.utils.data.DataLoader(Joint(), batch_size=None, num_workers=1,
                                               prefetch_factor=4)
    else:
        yield from Joint()


def make_batch(tokenizer, rng: np.random.Generator, batch: int, turns: int,
               count_route: bool = True, weights: dict[str, float] = KIND_WEIGHTS):
    import torch

    seqs, pix, cells = [], [], []
    for _ in range(batch):
        scene = scenes.make_scene(int(rng.integers(len(scenes.TRAIN_SEEDS))))
        cells.append(cell_targets(scene))
        qs = scenes.questions(scene, rng)
        w = np.array([weights[q.kind] for q in qs])
        order = rng.choice(len(qs), size=int(rng.integers(1, turns + 1)), replace=False,
                           p=w / w.sum())
        seqs.append(encode_turns(tokenizer, [Turn.of(scene, qs[i], count_route) for i in order]))
        pix.append(pixel_values(scene.image))
    T = max(len(s[0]) for s in seqs)
    pad = build.vocab()["<pad>"]
    ids = torch.full((batch, T), pad, dtype=torch.long)
    labels = torch.full((batch, T), -100, dtype=torch.long)
    mask = torch.zeros((batch, T), dtype=torch.long)
    kinds = torch.full((batch, T), -1, dtype=torch.long)
    routes = torch.tensor([(b, pos, cell, probe) for b, s in enumerate(seqs)
                           for pos, cell, probe in s[3]], dtype=torch.long).reshape(-1, 4)
    for b, (i, l, k, _) in enumerate(seqs):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(l)] = torch.tensor(l)
        kinds[b, : len(k)] = torch.tensor(k)
        mask[b, : len(i)] = 1
    return (ids, mask, labels, torch.from_numpy(np.stack(pix)), torch.from_numpy(np.stack(cells)),
            kinds, routes)


# The routing probes' extra class: "no cell holds the object the question
# names" (a yes/no question answered "no").
NO_CELL = scenes.GRID * scenes.GRID
# ... and "the summary token" (CLIP's class token, where the counts are): the
# target of a count question.
SUMMARY = NO_CELL + 1


class Turn:
    """A question with the grid cell of the object it names (-1: none)."""

    def __init__(self, q: scenes.Question, cell: int, words: set[str] = frozenset(),
                 caption_cells: tuple[int, ...] = ()):
        self.kind, self.question, self.answer, self.cell = q.kind, q.question, q.answer, cell
        self.caption_cells = caption_cells  # a caption's objects' cells, in caption order
        v = build.vocab()
        self.word_ids = {v[w] for w in words}  # the question's words naming the object

    @classmethod
    def of(cls, scene: scenes.Scene, q: scenes.Question, count_route: bool = True) -> "Turn":
        words = set(q.question.rstrip("?.").split())
        cell, named = -1, set()
        if q.kind in ("color", "shape", "size", "position", "yesno", "box"):
            for o in scene.objects:
                named = {o.color, o.shape} if q.kind in ("size", "position", "yesno", "box") else \
                    ({o.shape} if q.kind == "color" else {o.color})
                if named <= words:
                    return cls(q, o.row * scenes.GRID + o.col, named)
        if q.kind == "caption":
            return cls(q, cell, caption_cells=tuple(o.row * scenes.GRID + o.col
                                                    for o in scene.objects))
        if q.kind == "yesno":  # "no": the routing probes learn that no cell matches
            return cls(q, NO_CELL, words & (set(scenes.COLORS) | set(scenes.SHAPES)))
        if q.kind == "count" and count_route:  # counts live on the summary token
            return cls(q, SUMMARY, (words & set(scenes.SIZES)) or {"shapes"})
        return cls(q, cell)


IGNORE = -100  # cross_entropy's ignore_index


def cell_targets(scene: scenes.Scene) -> np.ndarray:
    """(17, 12) int64 classes per image token, in the model's order: the
    summary (CLIP class) token, then the 16 grid cells row-major (as CLIP
    orders its patches). Columns: colour (0 = empty, 1.. = COLORS), shape
    (0 = empty, 1.. = SHAPES), size (0 = empty, 1 small, 2 large), the cell's
    row and column (so each cell token also carries where it is), three
    scene-wide counts (all shapes, small ones, large ones), and the box of the
    cell's object (x1, y1, x2, y2 as k of the answer's k / BOX_STEPS). The
    summary token holds the counts and nothing else (colour/shape/size
    "empty", no row, column or box); cells hold no counts, empty ones no box."""
    n = scenes.GRID * scenes.GRID
    t = np.zeros((1 + n, 12), np.int64)
    t[0, 3:5] = IGNORE
    t[0, 8:] = IGNORE
    t[0, 5] = len(scene.objects)
    t[0, 6] = sum(o.size == "small" for o in scene.objects)
    t[0, 7] = sum(o.size == "large" for o in scene.objects)
    t[1:, 3] = np.arange(n) // scenes.GRID
    t[1:, 4] = np.arange(n) % scenes.GRID
    t[1:, 5:] = IGNORE
    colors, sizes = list(scenes.COLORS), list(scenes.SIZES)
    for o in scene.objects:
        t[1 + o.row * scenes.GRID + o.col, :3] = (colors.index(o.color) + 1,
                                                  scenes.SHAPES.index(o.shape) + 1,
                                                  sizes.index(o.size) + 1)
        t[1 + o.row * scenes.GRID + o.col, 8:] = scenes.box_steps(o.box)
    return t




def init_from(model, directory: Path) -> None:
    """Start from a trained demo model's weights (fine-tuning): every tensor
    of the same name and shape is copied; the word embedding (tied to the LM
    head) row by row for the words both vocabularies hold, so a model trained
    before a vocabulary grew keeps what it knew. New words keep their init."""
    import json

    import torch
    from transformers import LlavaForConditionalGeneration

    # from_pretrained maps the checkpoint's key names to this version's modules
    old = LlavaForConditionalGeneration.from_pretrained(directory).state_dict()
    old_vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    new_vocab = build.vocab()
    state = model.state_dict()
    emb_name = next(n for n in state if n.endswith("embed_tokens.weight"))
    copied = 0
    with torch.no_grad():
        for name, t in old.items():
            if name == emb_name:
                for word, i in new_vocab.items():
                    if word in old_vocab:
                        state[name][i] = t[old_vocab[word]]
                copied += 1
            elif name in state and state[name].shape == t.shape:
                state[name].copy_(t)
                copied += 1
    model.load_state_dict(state)
    print(f"initialised from {directory}: {copied} of {len(state)} tensors, "
          f"{len(set(new_vocab) & set(old_vocab))} of {len(new_vocab)} word embeddings",
          flush=True)


def warm_up_vision(model, aux_params, cell_loss, stream, args) -> None:
    """Stage 1: the vision tower and projector alone, on the per-cell loss.

    Perception first: in joint training the decoder's answers stayed at chance
    on shape questions for 1,000+ steps while the features were still being
    learned; a short vision-only stage (no decoder, ~4x cheaper per step)
    hands the decoder features that already separate colour, shape and size."""
    import torch

    params = (list(model.model.vision_tower.parameters())
              + list(model.model.multi_modal_projector.parameters()))
    extra = [aux_params[0].weight, aux_params[0].bias, aux_params[1], aux_params[2]]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.05},
                             {"params": extra, "weight_decay": 0.0}], lr=args.vision_lr)
    start = time.time()
    acc = {}
    n = args.vision_steps
    for step in range(n):
        _, _, _, pix, cells, _, _ = (t.to(args.device) for t in next(stream))
        # Short warm-up, then cosine decay to 10%: at a constant 2e-3 the
        # loss blew up after ~1,300 steps (measured), clipping alone is not enough.
        t = step / max(1, n - 1)
        for g in opt.param_groups:
            g["lr"] = args.vision_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))
        # (B, 17, D): the class token kept, as the "full" select strategy does.
        f = model.model.multi_modal_projector(
            model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-1])
        loss, logits, occupied = cell_loss(f, cells)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + extra, args.clip)
        opt.step()
        with torch.no_grad():
            for i, name in ((0, "color"), (1, "shape"), (2, "size"), (6, "small"), (7, "large"),
                            (8, "x1"), (11, "y2")):
                sel = occupied if i < 3 else cells[..., i] != IGNORE
                # Box coordinates: within one step (1.28 px) counts as a hit.
                diff = (logits[i].argmax(-1)[sel] - cells[..., i][sel]).abs()
                hit = (diff <= (1 if i >= 8 else 0)).float().mean()
                acc[name] = 0.9 * acc.get(name, 0.0) + 0.1 * hit.item()
        if step % args.log_every == 0 or step == args.vision_steps - 1:
            print(f"vision {step:5d}/{args.vision_steps}  loss {loss.item():.4f}  "
                  f"{time.time() - start:5.0f}s  cell acc " +
                  " ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)


def train(args) -> Path:
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration(build.make_config(args.size))
    if args.init_from:
        init_from(model, Path(args.init_from))
    model = model.to(args.device)
    # Auxiliary per-cell probe on the projector's output (B, 17, D) (see module doc).
    feats = {}
    model.model.multi_modal_projector.register_forward_hook(
        lambda mod, inp, out: feats.__setitem__("image", out))
    # Colour, shape and size are scored against the (tied) word embeddings of
    # "red", "circle", "small", ... so a cell's image feature lands next to the
    # words that name it: the decoder's question -> image-token attention is
    # then a match of like with like. Row and column get a plain linear head.
    v = build.vocab()
    word_ids = [torch.tensor([v["<pad>"]] + [v[w] for w in words], device=args.device) for words in
                (list(scenes.COLORS), list(scenes.SHAPES), list(scenes.SIZES))]
    # Row, column and the three counts (4 classes each: zero..three).
    # Then the box of a cell's object: x1, y1, x2, y2 (BOX_STEPS + 1 classes each).
    heads = ([scenes.GRID, scenes.GRID] + [len(scenes.NUMBER_WORDS)] * 3
             + [scenes.BOX_STEPS + 1] * 4)
    aux = torch.nn.Linear(model.config.text_config.hidden_size, sum(heads)).to(args.device)
    aux_scale = torch.nn.Parameter(torch.tensor(10.0, device=args.device))
    # Probe 0 reads the naming word's layer-2 state, probe 1 the <assistant> token's layer-3 state.
    route = torch.nn.ModuleList(torch.nn.Linear(model.config.text_config.hidden_size,
                                                SUMMARY + 1) for _ in range(2)).to(args.device)
    emb = model.get_input_embeddings().weight

    def cell_loss(f, cells):
        """Auxiliary loss on image features f (B, 17, D); cells (B, 17, 12)."""
        logits = [aux_scale * f @ emb[ids].T for ids in word_ids]  # (B, 17, 1 + words)
        # Row, column, counts: (B, 17, 4) each. The counts are learned on the
        # summary token alone, so counting happens in the vision tower (which
        # sees all cells at once, with dense supervision) and the decoder reads
        # a count off one token. Counting by attention in the decoder stalled
        # at ~85% teacher-forced; counts stored on the 13-15 EMPTY cells either
        # leaked into size answers (free directions: blank cells scored "small"
        # higher than small shapes did, size 0.83) or were not read (held off
        # the size words: count 0.80). One token holds them now.
        logits += list(aux(f).split(heads, dim=-1))
        # Shape and size are learned only where an object is: over all 16 cells the
        # "empty" class dominates and shape accuracy sat at chance (measured).
        occupied = cells[..., 1] > 0
        summary = torch.zeros_like(occupied)
        summary[:, 0] = True
        blank = ~occupied & ~summary
        weight = [1.0] * 5 + [args.count_weight] * 3 + [args.box_weight] * 4
        ce = torch.nn.functional.cross_entropy
        loss = sum(weight[i] * (ce(lg[occupied], cells[..., i][occupied]) if i in (1, 2) or i >= 8
                                else ce(lg[~summary], cells[..., i][~summary]) if i < 5
                                else ce(lg[summary], cells[..., i][summary]))
                   for i, lg in enumerate(logits) if weight[i] > 0)
        # Empty cells must still score "<pad>" on the shape and size words, at a
        # lower weight (else their features drift into those directions and
        # size questions read them); the summary token on those of the word
        # families chosen by --summary-pad.
        for i in (1, 2):
            loss = loss + 0.25 * ce(logits[i][blank], cells[..., i][blank])
        for i in SUMMARY_PAD[args.summary_pad]:
            loss = loss + 0.25 * ce(logits[i][summary], cells[..., i][summary])
        return loss, logits, occupied

    # After every parameter is initialised: a DataLoader draws its worker's
    # base seed from torch's generator, which would change the heads' init.
    stream = batches(args)
    if args.vision_steps:
        warm_up_vision(model, [aux, aux_scale, emb], cell_loss, stream, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, {args.steps} steps of batch {args.batch}",
          flush=True)
    params = (list(model.named_parameters()) + list(aux.named_parameters())
              + [("aux_scale", aux_scale)]
              + list(route.named_parameters()))
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
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
    acc: dict[int, float] = {}
    pacc = [0.0, 0.0]  # running accuracy of the word and answer probes
    for step in range(args.steps):
        ids, mask, labels, pix, cells, kinds, routes = (t.to(args.device) for t in next(stream))
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels,
                    output_hidden_states=args.route_weight > 0)
        lm_loss = out.loss
        with torch.no_grad():  # teacher-forced token accuracy per question kind
            hit = (out.logits[:, :-1].argmax(-1) == labels[:, 1:])
            for k in range(len(scenes.QUESTION_KINDS)):
                sel = kinds[:, 1:] == k
                if sel.any():
                    acc[k] = 0.9 * acc.get(k, 0.0) + 0.1 * hit[sel].float().mean().item()
        aux_loss = cell_loss(feats["image"], cells)[0]
        loss = lm_loss + args.aux_weight * aux_loss
        if args.route_weight > 0 and len(routes):
            layers = out.hidden_states  # (B, T, D) each; [0] is the embeddings
            rl = {}
            for probe, layer in ((0, 2), (1, 3)):
                sel = routes[routes[:, 3] == probe]
                if len(sel):
                    h = layers[min(layer, len(layers) - 1)][sel[:, 0], sel[:, 1]]
                    rl[probe] = (route[probe](h), sel[:, 2])
            route_loss = sum(torch.nn.functional.cross_entropy(lg, t) for lg, t in rl.values())
            loss = loss + args.route_weight * route_loss
            with torch.no_grad():
                for probe, (lg, t) in rl.items():
                    pacc[probe] = 0.9 * pacc[probe] + 0.1 * (lg.argmax(-1) == t).float().mean().item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
        opt.step()
        ema = lm_loss.item() if ema is None else 0.95 * ema + 0.05 * lm_loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - start
            eta = el / (step + 1) * (args.steps - step - 1)
            print(f"step {step:5d}/{args.steps}  loss {ema:.4f}  lr {lr_at(step):.2e}  "
                  f"{el:6.0f}s elapsed, eta {eta:4.0f}s  |g| {gnorm:.2f}  route word {pacc[0]:.2f} answer {pacc[1]:.2f}  token acc " +
                  " ".join(f"{scenes.QUESTION_KINDS[k]}={v:.2f}" for k, v in sorted(acc.items())),
                  flush=True)
    model.eval()
    model.to("cpu")
    out = Path(args.out)
    build.save_model_dir(model, out)
    print(f"saved to {out} after {time.time() - start:.0f}s", flush=True)
    return out


def _kind_weight(text: str) -> tuple[str, float]:
    kind, _, w = text.partition("=")
    if kind not in scenes.QUESTION_KINDS:
        raise argparse.ArgumentTypeError(f"unknown question kind {kind!r}: expected one of "
                                         f"{', '.join(scenes.QUESTION_KINDS)}")
    try:
        weight = float(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND=WEIGHT, a number") from None
    if not weight >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight must be >= 0")
    return kind, weight


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "model"),
                   help="model directory to write (default: the packaged demo/model)")
    p.add_argument("--size", choices=sorted(build.SIZES), default="demo")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--turns", type=int, default=3,
                   help="max question turns per image (1..turns, uniformly)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--vision-steps", type=int, default=2000,
                   help="stage 1: vision-only steps on the per-cell loss (0 skips)")
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the per-cell auxiliary probe loss (0 disables)")
    p.add_argument("--count-weight", type=float, default=1.0,
                   help="weight of the scene-count probe on the summary (class) token (0 disables)")
    p.add_argument("--summary-pad", choices=sorted(SUMMARY_PAD), default="all",
                   help="word families the summary token is held off, as empty cells are")
    p.add_argument("--box-weight", type=float, default=1.0,
                   help="weight of the per-cell box probe (x1, y1, x2, y2 of the cell's object)")
    p.add_argument("--count-route", type=int, choices=(0, 1), default=1,
                   help="routing probes send count questions to the summary token")
    p.add_argument("--kind-weight", type=_kind_weight, action="append", default=[],
                   metavar="KIND=W", help="how often a question kind is drawn, relative to "
                   "the others (repeatable; default KIND_WEIGHTS)")
    p.add_argument("--init-from", default=None,
                   help="a demo model directory to start from (fine-tuning; words both "
                        "vocabularies hold keep their embeddings)")
    p.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    p.add_argument("--data-workers", type=int, choices=(0, 1), default=1,
                   help="draw batches in a worker process, overlapping the training step")
    p.add_argument("--route-weight", type=float, default=0.5,
                   help="weight of the routing probe loss (0 disables)")
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
