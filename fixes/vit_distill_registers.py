"""Self-distilled registers (Chen et al. 2025, "PH-Reg"): add registers to a trained ViT after the fact.

The teacher is the ViT as it is, frozen. Its dense features are denoised by test-time augmentation:
`counts` views of each image, shifted by whole patches (offsets drawn from [-k, k]^2 patches,
k = round(shift_frac x grid), by farthest-point sampling among 10 x counts random candidates, view 0
unshifted) and flipped horizontally at random (never view 0); out-of-image pixels take `fill`; each
view's final patch features (after the last norm) are moved back to the patch they show and
averaged over the views that show it. An artifact tied to a position in the input lands on a
different image patch in every view, so the average dilutes it; the image content does not move.

The student starts as the same ViT plus `n_registers` new registers (N(0, 1/C)); only a small subset
of its weights is trained to match the teacher's denoised features on the unaugmented image
(loss 1 - cosine + MSE): by default their choice for DINOv2 (PH-Reg's distill_main.py) - the
registers, the position embedding, the patch embedding and the last block. AdamW (wd 0.01), the
learning rate decaying exponentially from `lr` to `end_lr`, as theirs (per step here, per epoch
there). The student is written as a checkpoint that every ViT eval loads; at test time it costs
only its extra tokens.

Where this differs from their code (0raiser0/PH-Reg): one set of offsets and flips per batch, not per
image; the fill is a pixel value (default 1.0, white, as their ImageNet-normalised constant) turned
into the model's normalisation; steps are hundreds on small images, not 100 epochs of Flickr30k.

    python -m fixes.vit_distill_registers --ckpt out/<run> [--n-registers 4] [--steps 300] [--name NAME]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .vit_denoise import feature_loss, latency_ms, patch_tokens

TRAINABLE = ("registers", "pos_embed", "patch_embed", "last_block")  # PH-Reg's unlocked weights for DINOv2


# ------------------------------------------------------------------------------ the denoised teacher
def farthest_point_offsets(grid: int, counts: int, shift_frac: float, generator: torch.Generator) -> torch.Tensor:
    """(counts, 2) integer (dy, dx) patch offsets: farthest-point sampled from 10 x counts uniform draws
    in [-k, k]^2, k = round(shift_frac * grid); the first is (0, 0)."""
    k = int(round(shift_frac * grid))
    pool = torch.randint(-k, k + 1, (10 * counts, 2), generator=generator).float()
    chosen = [int(torch.randint(len(pool), (1,), generator=generator))]
    dist = torch.full((len(pool),), float("inf"))
    for _ in range(counts - 1):
        dist = torch.minimum(dist, ((pool - pool[chosen[-1]]) ** 2).sum(-1))
        chosen.append(int(dist.argmax()))
    offsets = pool[chosen].long()
    offsets[0] = 0
    return offsets


def shift(x: torch.Tensor, dy: int, dx: int, fill) -> torch.Tensor:
    """out[..., y, x] = x[..., y + dy, x + dx], `fill` where that falls outside (their shuffle_shift)."""
    H, W = x.shape[-2:]
    out = torch.empty_like(x)
    out[...] = fill if not torch.is_tensor(fill) else fill.view(-1, 1, 1).to(x)
    ys, yd = slice(max(0, dy), min(H, H + dy)), slice(max(0, -dy), min(H, H - dy))
    xs, xd = slice(max(0, dx), min(W, W + dx)), slice(max(0, -dx), min(W, W - dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


@torch.no_grad()
def denoised_targets(feature_fn, images: torch.Tensor, grid: int, patch: int, counts: int = 10,
                     shift_frac: float = 0.15, fill=0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N, C) patch features `feature_fn(views)` (B, N, C) averaged over shifted / flipped views of
    the images, each view's patches moved back to the image patch they show."""
    generator = generator or torch.Generator().manual_seed(0)
    g = grid
    offsets = farthest_point_offsets(g, counts, shift_frac, generator)
    flips = torch.rand(counts, generator=generator) < 0.5
    flips[0] = False
    index = torch.arange(g * g, dtype=torch.float32).view(1, g, g)  # which image patch a view patch shows
    total, seen = None, torch.zeros(g * g)
    for (dy, dx), flip in zip(offsets.tolist(), flips.tolist()):
        view = shift(images, dy * patch, dx * patch, fill)
        where = shift(index, dy, dx, -1.0)
        if flip:
            view, where = view.flip(-1), where.flip(-1)
        feats = feature_fn(view).float().cpu()
        total = torch.zeros_like(feats) if total is None else total
        where = where.flatten().long()
        keep = where >= 0
        total[:, where[keep]] += feats[:, keep]
        seen[where[keep]] += 1
    return total / seen.clamp_min(1)[None, :, None]


# ------------------------------------------------------------------------------ the student
def make_student(teacher, n_registers: int, seed: int = 0):
    """The teacher's ViT with `n_registers` more registers, N(0, 1/C) as PH-Reg initialises them."""
    from model.vit import ViT

    c = teacher.config
    cfg = dataclasses.replace(c, n_registers=c.n_registers + n_registers, block_size=0,
                              # a sigmoid's bias must not follow the token count (other kinds have none)
                              sigmoid_bias=c.resolved_sigmoid_bias if c.attention == "sigmoid" else None)
    student = ViT(cfg)
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    new = torch.randn(1, n_registers, c.n_embd, generator=torch.Generator().manual_seed(seed)) / math.sqrt(c.n_embd)
    state["registers"] = torch.cat((state["registers"], new.to(state["registers"])), dim=1) if c.n_registers else new
    student.load_state_dict(state)
    return student


def trainable_parameters(student, parts=TRAINABLE) -> list[torch.nn.Parameter]:
    """Unlock `parts` of the student (registers, pos_embed, patch_embed, last_block, pre_norm, norm) and
    freeze the rest; returns the unlocked parameters."""
    unknown = set(parts) - {"registers", "pos_embed", "patch_embed", "last_block", "pre_norm", "norm"}
    if unknown:
        raise ValueError(f"--train: unknown parts {sorted(unknown)}; choose from registers, pos_embed, patch_embed, "
                         "last_block, pre_norm, norm")
    last = f"layers.{student.config.n_layer - 1}."
    chosen = []
    for name, p in student.named_parameters():
        part = "last_block" if name.startswith(last) else name.split(".")[0]
        p.requires_grad_(part in parts)
        if part in parts:
            chosen.append(p)
    return chosen


def distill(teacher, student, images: torch.Tensor, steps: int = 300, batch_size: int = 32, lr: float = 1e-4,
            end_lr: float = 5e-6, weight_decay: float = 1e-2, counts: int = 10, shift_frac: float = 0.15, fill=0.0,
            parts=TRAINABLE, seed: int = 0, on_step=None) -> list[dict]:
    """Train the student's unlocked weights on `images` (normalised) against the denoised teacher."""
    teacher.eval()
    params = trainable_parameters(student, parts)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    start, n = student.patch_start, student.config.n_patches
    history = []
    student.train()
    for step in range(steps):
        for g in opt.param_groups:  # lr * (end_lr / lr) ** (step / steps), floored at end_lr, as theirs
            g["lr"] = max(end_lr, lr * (end_lr / lr) ** ((step + 1) / steps))
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
        x = images[idx]
        target = denoised_targets(lambda v: patch_tokens(teacher, v), x, teacher.config.grid,
                                  teacher.config.patch_size, counts, shift_frac, fill, gen)
        h = student(x, return_hidden=True).hidden[-1]
        loss = feature_loss(student.norm(h[:, start : start + n]).float(), target.to(h.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if on_step is not None:  # a progress bar's update
            on_step(1)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            history.append({"step": step, "loss": loss.item()})
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    return history


def student_dir(name: str, out: Path = Path("out")) -> Path:
    """out/<name> for a new student, or ValueError: a name that leaves out/, or a folder that exists
    (another run: this command writes only what it creates, never into an existing run)."""
    run_dir = out / name
    root = out.resolve()
    if not name or run_dir.resolve() == root or root not in run_dir.resolve().parents:
        raise ValueError(f"--name {name!r} leaves out/; give a plain name such as mymodel_phreg")
    if run_dir.exists() or run_dir.is_symlink():
        raise ValueError(f"--name {name}: {run_dir} already exists (another run); pick a new --name, this command "
                         "never writes into an existing run")
    return run_dir


def save_vit_run(student, run_dir: Path, config: dict, step: int) -> Path:
    """A ViT (the student) as a new run every ViT eval loads (trainer/checkpoint.py's write_model_run: built
    beside run_dir and renamed into place; an existing run_dir is refused, never replaced). Returns its
    checkpoint dir."""
    from trainer.checkpoint import write_model_run
    from trainer.rundir import CHECKPOINT_FMT

    run_dir = write_model_run(run_dir, student, {**config, "model": dataclasses.asdict(student.config)}, step=step)
    return run_dir / "checkpoints" / CHECKPOINT_FMT.format(step)


# ------------------------------------------------------------------------------ CLI
def main(argv=None) -> dict:
    from eval.vit_artifacts import analyse
    from eval.vit_images import add_image_args, load_for_vit_eval, pixel_fill

    from eval import fail, nonnegative_float, positive_float, positive_int, unit_float, write_json
    from eval.cli import checkpoint_info
    from eval.progress import progress
    from eval.result import CHECKPOINT_DEFINITION

    ap = argparse.ArgumentParser(prog="python -m fixes.vit_distill_registers", description=__doc__.split("\n\n")[0])
    add_image_args(ap)
    ap.add_argument("--n-registers", type=positive_int, default=4, help="registers to add (PH-Reg: 16 on DINOv2)")
    ap.add_argument("--steps", type=positive_int, default=300)
    ap.add_argument("--train-batch", type=positive_int, default=32)
    ap.add_argument("--lr", type=positive_float, default=1e-4)
    ap.add_argument("--end-lr", type=positive_float, default=5e-6)
    ap.add_argument("--counts", type=positive_int, default=10, help="test-time augmentation views of the teacher")
    ap.add_argument("--shift-frac", type=nonnegative_float, default=0.15,
                    help="largest shift, as a fraction of the patch grid")
    ap.add_argument("--fill", type=unit_float, default=1.0, help="pixel value (in [0, 1]) of out-of-image pixels")
    ap.add_argument("--train", default=",".join(TRAINABLE), help="unlocked parts, comma separated")
    ap.add_argument("--name", default=None, help="the student's run dir under out/ (default: <teacher>_phreg)")
    args = ap.parse_args(argv)
    try:
        if args.name is not None:
            student_dir(args.name)  # a name that leaves out/ or an existing run: refused before loading
        ctx = load_for_vit_eval(args)
        run_dir = student_dir(args.name or f"{Path(ctx.run.run_dir).name}_phreg")
        parts = tuple(p.strip() for p in args.train.split(",") if p.strip())
        trainable_parameters(make_student(ctx.model, 1), parts)  # a bad --train fails before any work
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))  # one line, exit code 2, as every eval
    teacher, data = ctx.model, ctx.data
    fill = pixel_fill(ctx, args.fill)
    student = make_student(teacher, args.n_registers, args.seed)
    t0 = time.perf_counter()
    with progress(args.steps, "distill", unit="step") as bar:
        history = distill(teacher, student, data.train_x, args.steps, args.train_batch, args.lr, args.end_lr,
                          counts=args.counts, shift_frac=args.shift_frac, fill=fill, parts=parts, seed=args.seed,
                          on_step=bar.update)
    seconds = time.perf_counter() - t0
    config = {"task": "vit", "data": ctx.data_config, "distilled_from": args.ckpt,
              "distillation": {"n_registers": args.n_registers, "steps": args.steps, "lr": args.lr,
                               "train": list(parts), "counts": args.counts, "shift_frac": args.shift_frac}}
    if ctx.normalisation is not None:
        config["image_normalisation"] = ctx.normalisation
    try:
        ckpt = save_vit_run(student, run_dir, config, args.steps)
    except FileExistsError as e:  # created by someone else while this one distilled
        fail(f"{e}; nothing was written, run again with another --name")

    dense = ctx.dense_data(args.n_probe_train)
    x, y = data.val_x, data.val_y
    base = analyse(teacher, x, y, batch_size=args.batch_size, dense_data=dense)
    thresholds = [layer["threshold"] for layer in base.layers]  # the teacher's yardstick for both
    new = analyse(student, x, y, threshold=thresholds, batch_size=args.batch_size, dense_data=dense)
    lat_x = x[: min(64, len(x))]
    keep = ("accuracy", "layers", "dense", "cls_attention_last_layer")
    teacher_eval, student_eval = base.to_json(), new.to_json()
    result = {
        "student": str(ckpt), "seconds": seconds, "history": history,
        "trained_parameters": sum(p.numel() for p in trainable_parameters(student, parts)),
        "teacher": {k: teacher_eval[k] for k in keep}, "student_eval": {k: student_eval[k] for k in keep},
        "latency_ms_per_image": {"teacher": latency_ms(lambda v: teacher(v), lat_x),
                                 "student": latency_ms(lambda v: student(v), lat_x)},
        "checkpoint": checkpoint_info(ctx.run),
        "definitions": {"checkpoint": CHECKPOINT_DEFINITION,
                        "layers": "vit_artifacts' per-layer statistics; the student is measured against the "
                                  "teacher's thresholds (mean + 3 std of the teacher's patch norms per layer)",
                        "latency_ms_per_image": "median CPU wall time of a forward pass per image, batch of up to 64"},
    }
    for p in student.parameters():
        p.requires_grad_(True)
    write_json(ctx.out / "vit_distill_registers.json", result)
    fr = lambda r: ", ".join(f"{100 * l['outlier_fraction']:.1f}" for l in r.layers)  # noqa: E731
    print(f"outlier % per block: teacher {fr(base)} | student ({args.n_registers} registers) {fr(new)}")
    if base.dense and new.dense:
        a, b = base.dense, new.dense
        print(f"LOST CorLoc {100 * a.lost['corloc']:.1f}% -> {100 * b.lost['corloc']:.1f}%, probe mIoU "
              f"{a.probe['miou']:.3f} -> {b.probe['miou']:.3f}")
    lat = result["latency_ms_per_image"]
    print(f"{seconds:.0f} s distilling; {lat['teacher']:.3f} -> {lat['student']:.3f} ms/image; student -> {ckpt}")
    return result


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
