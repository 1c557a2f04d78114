"""Train the embedded model's vision pair (image encoder + projector) on synthetic shapes.

Runs on a CPU in about ten minutes, in three stages, so the frozen 135M-parameter language
model is only in the loop where it has to be:

1. *Soft tokens, through the frozen SmolLM2.* One embedding per colour and one per shape,
   initialised from the words' own token embeddings, are trained so that with
   ``[colour][shape]`` in place of the image placeholders the model answers the three
   questions of ``swarmllm.blocks.shapes.QUESTIONS`` (loss on the answer tokens only; noise is
   added to the soft tokens so that nearby inputs give the same answer).
2. *Encoder + projector, on pictures.* The CNN encoder and the projector are trained together
   to map each training picture to its two soft tokens; pictures are drawn by code and the
   held-out split (drawn from its own random stream) is only used for reporting.
3. *Projector, through the frozen SmolLM2.* The projector alone is fine-tuned on the training
   pictures' features with the answer loss, so the language model answers from what the
   projector really outputs rather than from the soft tokens it approximates.

Writes ``swarmllm/assets/smollm2_vision.safetensors`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

# Idle OpenMP threads must sleep, not spin: on a shared machine spinning made steps 20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from transformers import AutoModelForCausalLM

from swarmllm.blocks.shapes import (
    ASSET_PATH,
    COLOURS,
    QUESTIONS,
    SHAPES,
    TOKENS_PER_IMAGE,
    AssetInfo,
    ShapesEncoder,
    ShapesProjector,
    answer,
    pixels,
    prompt_ids,
    save_asset,
    scenes,
)
from swarmllm.blocks.sources import resolve_model

PLACEHOLDER = "<|endoftext|>"
TEMPLATE = "<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET_PATH)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soft-steps", type=int, default=160)
    parser.add_argument("--image-steps", type=int, default=1500)
    parser.add_argument("--tune-steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=16, help="prompts per language-model step")
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--soft-tokens", type=Path, help="save stage 1's result here, or reuse it if present"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    started = time.monotonic()

    source = resolve_model()
    tokenizer = source.load_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    model.requires_grad_(False).eval()
    prompts = Prompts(model, tokenizer)
    if args.soft_tokens is not None and args.soft_tokens.is_file():
        colour_tokens, shape_tokens = torch.load(args.soft_tokens)
        print(f"stage 1: reusing the soft tokens in {args.soft_tokens}")
    else:
        colour_tokens, shape_tokens = train_soft_tokens(prompts, args)
        if args.soft_tokens is not None:
            torch.save((colour_tokens, shape_tokens), args.soft_tokens)
    print(f"stage 1 done at {time.monotonic() - started:.0f} s", flush=True)

    train = Pictures("train", args.train_images, args.seed)
    encoder = ShapesEncoder()
    projector = ShapesProjector(source.config.hidden_size)
    held_out = Pictures("heldout", 480, args.seed)
    train_encoder(encoder, projector, colour_tokens, shape_tokens, train, held_out, args)
    print(f"stage 2 done at {time.monotonic() - started:.0f} s", flush=True)
    tune_projector(prompts, encoder, projector, train, args)
    print(f"stage 3 done at {time.monotonic() - started:.0f} s", flush=True)

    info = AssetInfo(
        hidden_size=source.config.hidden_size,
        placeholder_token=PLACEHOLDER,
        prompt_template=TEMPLATE,
        model_name=source.name,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_asset(args.out, encoder.eval(), projector.eval(), info)
    size_kb = args.out.stat().st_size / 1024
    print(f"wrote {args.out} ({size_kb:.0f} KiB) in {time.monotonic() - started:.0f} s total")


class Prompts:
    """Training prompts for the frozen LM: ``loss`` puts image tokens at the placeholders."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.embeddings = model.get_input_embeddings().weight
        self.placeholder = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        self._examples: dict[tuple[str, str, str], tuple[list[int], list[int], int]] = {}

    def word(self, text: str) -> torch.Tensor:
        return self.embeddings[self.tokenizer(" " + text)["input_ids"]].mean(0)

    def example(self, question: str, shape: str, colour: str) -> tuple[list[int], list[int], int]:
        """Prompt + answer ids, labels on the answer only, first placeholder position."""
        key = (question, shape, colour)
        if key not in self._examples:
            ids = prompt_ids(self.tokenizer, TEMPLATE, question, self.placeholder, TOKENS_PER_IMAGE)
            reply = self.tokenizer(answer(question, shape, colour))["input_ids"]
            reply.append(self.tokenizer.eos_token_id)
            self._examples[key] = (
                ids + reply,
                [-100] * len(ids) + reply,
                ids.index(self.placeholder),
            )
        return self._examples[key]

    def loss(self, keys: list[tuple[str, str, str]], image_tokens: torch.Tensor) -> torch.Tensor:
        """Mean answer loss with ``image_tokens`` [batch, TOKENS_PER_IMAGE, hidden] spliced in."""
        examples = [self.example(*key) for key in keys]
        length = max(len(ids) for ids, _, _ in examples)
        pad = self.tokenizer.eos_token_id
        ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _, _ in examples])
        labels = torch.tensor([lab + [-100] * (length - len(lab)) for _, lab, _ in examples])
        inputs = self.embeddings[ids].clone()
        for row, (_, _, first) in enumerate(examples):
            inputs[row, first : first + TOKENS_PER_IMAGE] = image_tokens[row]
        return self.model(inputs_embeds=inputs, labels=labels).loss


def train_soft_tokens(prompts: Prompts, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: one soft token per colour and per shape, trained through the frozen LM."""
    colour_tokens = torch.nn.Parameter(torch.stack([prompts.word(c) for c in COLOURS]))
    shape_tokens = torch.nn.Parameter(torch.stack([prompts.word(s) for s in SHAPES]))
    cases = [(q, s, c) for s in SHAPES for c in COLOURS for q in QUESTIONS]
    optimizer = torch.optim.Adam([colour_tokens, shape_tokens], lr=1e-2)
    running = None
    for step in range(args.soft_steps):
        keys = random.sample(cases, min(args.batch, len(cases)))
        soft = torch.stack(
            [
                torch.stack([colour_tokens[list(COLOURS).index(c)], shape_tokens[SHAPES.index(s)]])
                for _, s, c in keys
            ]
        )
        # noise of 15% of each token's norm, so that nearby inputs give the same answer
        noise = torch.randn_like(soft) * soft.detach().norm(dim=-1, keepdim=True)
        loss = prompts.loss(keys, soft + 0.15 * noise / soft.shape[-1] ** 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % 10 == 0:
            print(
                f"soft tokens step {step}: loss {loss.item():.4f} (avg {running:.4f})", flush=True
            )
    return colour_tokens.detach(), shape_tokens.detach()


class Pictures:
    """Drawn scenes of one split as encoder inputs, with their labels."""

    def __init__(self, split: str, count: int, seed: int):
        self.scenes = scenes(split, count, seed=seed)
        self.images = torch.stack([pixels(s.draw()) for s in self.scenes])
        self.colours = torch.tensor([list(COLOURS).index(s.colour) for s in self.scenes])
        self.shapes = torch.tensor([SHAPES.index(s.shape) for s in self.scenes])


def train_encoder(
    encoder: ShapesEncoder,
    projector: ShapesProjector,
    colour_tokens: torch.Tensor,
    shape_tokens: torch.Tensor,
    train: Pictures,
    held_out: Pictures,
    args,
) -> None:
    """Stage 2: the encoder and the projector map each picture to its two soft tokens."""
    scale = torch.cat([colour_tokens, shape_tokens]).norm(dim=-1).mean()
    parameters = [*encoder.parameters(), *projector.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=args.image_steps)
    for step in range(args.image_steps):
        pick = torch.randint(0, len(train.images), (64,))
        colours, shapes = train.colours[pick], train.shapes[pick]
        target = torch.stack([colour_tokens[colours], shape_tokens[shapes]], dim=1)
        predicted = projector(encoder(train.images[pick]))
        loss = ((predicted - target) ** 2).sum(-1).mean() / scale**2
        # and each projected token must be nearer its own soft token than the others
        for token, table, labels in ((0, colour_tokens, colours), (1, shape_tokens, shapes)):
            distances = torch.cdist(predicted[:, token], table) ** 2 / scale**2
            loss = loss + torch.nn.functional.cross_entropy(-distances, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.image_steps - 1:
            colour_acc, shape_acc = nearest_accuracy(
                encoder, projector, colour_tokens, shape_tokens, held_out
            )
            print(
                f"encoder step {step}: loss {loss.item():.4f}; held-out nearest-token accuracy "
                f"colour {colour_acc:.3f} shape {shape_acc:.3f}",
                flush=True,
            )


def tune_projector(
    prompts: Prompts, encoder: ShapesEncoder, projector: ShapesProjector, train: Pictures, args
) -> None:
    """Stage 3: the projector alone, through the frozen LM, on the training pictures' features
    (the encoder stays as stage 2 left it)."""
    with torch.no_grad():
        features = encoder.eval()(train.images)
    optimizer = torch.optim.Adam(projector.parameters(), lr=2e-4)
    running = None
    for step in range(args.tune_steps):
        pick = random.sample(range(len(train.scenes)), args.batch)
        keys = [
            (random.choice(QUESTIONS), train.scenes[i].shape, train.scenes[i].colour) for i in pick
        ]
        loss = prompts.loss(keys, projector(features[pick]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % 10 == 0 or step == args.tune_steps - 1:
            print(f"projector step {step}: loss {loss.item():.4f} (avg {running:.4f})", flush=True)


@torch.no_grad()
def nearest_accuracy(encoder, projector, colour_tokens, shape_tokens, pictures: Pictures):
    """How often each projected token is closest to the right soft token."""
    projected = projector(encoder(pictures.images))
    colours, shapes = pictures.colours, pictures.shapes
    colour_pred = torch.cdist(projected[:, 0], colour_tokens).argmin(-1)
    shape_pred = torch.cdist(projected[:, 1], shape_tokens).argmin(-1)
    return (colour_pred == colours).float().mean().item(), (
        shape_pred == shapes
    ).float().mean().item()


if __name__ == "__main__":
    main()
