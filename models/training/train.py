"""`vae train`: train or fine-tune a KL-f8 AutoencoderKL on folders of images.

One readable file in the spirit of nanoGPT: arguments -> data -> model -> loop. Runs on CPU
(bf16 autocast), one GPU, or many through `accelerate launch -m models.training.train ...`.

Outputs in --out:
  checkpoint.pt   full training state (model, EMA, optimisers, schedulers, step, RNG), atomic
  model/          diffusers save_pretrained folder of the EMA weights (what users load)
  metrics.csv     one row per logged step; curves.png and recon-<step>.png at each evaluation
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from models.options import (Parser, fail, float_range, int_range, list_of, multiple_of, nonnegative_float,
                            nonnegative_int, positive_float, positive_int)
from models.training import data as data_mod
from models.training.checkpoint import (CHECKPOINT, RESUMABLE, atomic_save, load_checkpoint, recipe_conflicts, restore,
                                       rng_state, set_rng_state)
from models.training.model import build_model
from models.training.monitor import evaluate, measure_latent_factors, plot_curves, save_grid
from models.training import losses
from models.training.presets import PRESETS


PROG = "vae train"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="+", help="folders (recursive) or files of JPEG / PNG / WebP images")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics, final model)")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="architecture (default: tiny)")
    arch.add_argument("--config", help="a diffusers AutoencoderKL config.json")
    arch.add_argument("--init", help="fine-tune from these weights (diffusers folder or single file)")
    p.add_argument("--norm-groups", type=nonnegative_int, default=0,
                   help="GroupNorm groups of every block (0: the config's). With --init the weights load "
                        "unchanged: GroupNorm's parameters are per channel, whatever the group count")
    p.add_argument("--layers-per-block", type=nonnegative_int, default=0,
                   help="ResNet blocks per encoder stage (the decoder has one more; 0: the config's). "
                        "Growing an --init model: the added blocks start as identities (last convolution "
                        "zero), so training starts from the init model's exact function")
    p.add_argument("--decoder-only", action="store_true", help="freeze the encoder (as sd-vae-ft-MSE)")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint.pt")
    p.add_argument("--steps", type=positive_int, default=20000, help="optimiser steps in total")
    p.add_argument("--batch-size", type=positive_int, default=8, help="per process, per micro-step")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--crop", type=multiple_of(8, 8), default=256, help="crop side, a multiple of 8 (default 256)")
    p.add_argument("--crop-sizes", type=list_of(multiple_of(8, 8)), default=(),
                   help="comma list of crop sides (e.g. 256,384,512): each step draws one, and trains on "
                        "batch x (crop / side)^2 crops of it (at least 1), so a step's pixels stay near "
                        "batch x crop^2. Teaches GroupNorm and attention more than one image size "
                        "(default: every step --crop)")
    p.add_argument("--max-zoom", type=float_range(1.0), default=2.0, help="short side resized to [crop, crop*max_zoom]")
    p.add_argument("--colour-aug", type=float_range(0.0, 1.0), default=0.0,
                   help="share of crops recoloured: hue turned, saturation scaled (default 0: off)")
    p.add_argument("--lr", type=positive_float, default=2e-4)
    p.add_argument("--min-lr-ratio", type=float_range(0.0, 1.0), default=0.1, help="cosine decays to lr*ratio")
    p.add_argument("--warmup", type=nonnegative_int, default=500)
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.01)
    p.add_argument("--clip", type=nonnegative_float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--ema", type=float_range(0.0, 1.0, high_open=True), default=0.999,
                   help="EMA decay in [0, 1) (the EMA is what gets saved)")
    p.add_argument("--l1", type=nonnegative_float, default=1.0, help="L1 reconstruction weight")
    p.add_argument("--mse", type=nonnegative_float, default=1.0, help="MSE reconstruction weight")
    p.add_argument("--colour", type=nonnegative_float, default=0.0,
                   help="weight of the MSE of 8x8-block means: low-frequency colour (default 0: off)")
    p.add_argument("--image-colour", type=nonnegative_float, default=0.0,
                   help="weight of the MSE of each crop's mean colour: the image-wide cast (default 0: off)")
    p.add_argument("--ssim", type=nonnegative_float, default=0.0, help="weight of 1 - SSIM (default 0: off)")
    p.add_argument("--latent-colour", type=nonnegative_float, default=0.0,
                   help="weight of how badly each latent's 8x8-block colour is read linearly (default 0: off)")
    p.add_argument("--kl-weight", type=nonnegative_float, default=1e-6, help="LDM-equivalent KL weight (see losses.py)")
    p.add_argument("--disc-start", type=int_range(-1), default=-1, help="step at which the PatchGAN starts (-1: off)")
    p.add_argument("--disc-weight", type=nonnegative_float, default=0.5)
    p.add_argument("--lpips-weights", help="local LPIPS-VGG weights (safetensors); enables a perceptual loss")
    p.add_argument("--lpips-weight", type=nonnegative_float, default=0.1)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="auto: bf16 on CPU and on GPUs that support it")
    p.add_argument("--workers", type=nonnegative_int, default=2, help="DataLoader workers decoding images")
    p.add_argument("--val-images", type=nonnegative_int, default=8, help="held-out images (last in sorted order)")
    p.add_argument("--checkpoint-every", type=positive_int, default=250)
    p.add_argument("--eval-every", type=positive_int, default=1000)
    p.add_argument("--log-every", type=positive_int, default=25)
    p.add_argument("--max-minutes", type=nonnegative_float, default=0, help="stop (after a checkpoint) after this long")
    p.add_argument("--max-cpu-minutes", type=nonnegative_float, default=0,
                   help="stop (after a checkpoint) after this much CPU time of this process: an equal budget "
                        "for runs that share a busy machine (wall-clock time depends on the neighbours)")
    p.add_argument("--stop-at", type=nonnegative_int, default=0, help="stop (after a checkpoint) at this step; resume later")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch CPU threads (0: torch default)")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def given_options(argv) -> dict:
    """The options the command line names explicitly (defaults left out)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def lr_lambda(args):
    def f(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT
    if args.resume:
        if not ckpt_path.exists():
            return fail(PROG, f"--resume but no checkpoint at {ckpt_path}")
        try:
            state = load_checkpoint(ckpt_path)
        except ValueError as exc:
            return fail(PROG, f"{exc}; move it away to start over, or restore a copy")
        saved = state["args"]
        defaults = {a.dest: a.default for a in build_parser()._actions if a.default is not argparse.SUPPRESS}
        conflicts = recipe_conflicts(given_options(argv), saved, defaults)
        if conflicts:
            return fail(PROG, f"--resume continues the recipe saved in {ckpt_path}; these options differ from it: "
                              f"{'; '.join(conflicts)}. Drop them, or train into another --out")
        # The run's recipe comes from the checkpoint (defaults for options it predates); only
        # length/logging may change on resume.
        args = argparse.Namespace(**{**defaults, **saved, **{k: getattr(args, k) for k in RESUMABLE},
                                     "resume": True})
    else:
        if ckpt_path.exists():
            return fail(PROG, f"{ckpt_path} exists; pass --resume to continue it or choose another --out")
        state = None

    try:
        files = data_mod.list_images(args.data)
    except FileNotFoundError as exc:
        return fail(PROG, str(exc))
    files, unusable = data_mod.usable_images(files)

    mp = args.mixed_precision
    if mp == "auto":
        mp = "bf16" if (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()) else "fp16"
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=args.grad_accum, cpu=False)
    device, main_proc = accelerator.device, accelerator.is_main_process
    for path, reason in unusable if main_proc else []:
        data_mod.warn_skip(path, reason)
    if len(files) <= args.val_images:
        where = " ".join(map(str, args.data))
        return fail(PROG, f"{len(files)} usable images in {where} ({len(unusable)} skipped): need more than "
                          f"--val-images {args.val_images}, at least one to train on")
    torch.manual_seed(args.seed + accelerator.process_index)
    random.seed(args.seed)
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)

    val_files, train_files = files[-args.val_images:] if args.val_images else [], files[: len(files) - args.val_images]
    per_step = args.batch_size * args.grad_accum * accelerator.num_processes
    dataset = data_mod.RandomCrops(train_files, crop=args.crop, max_zoom=args.max_zoom, seed=args.seed,
                                   colour_aug=args.colour_aug, sizes=tuple(args.crop_sizes),
                                   samples_per_step=per_step)
    val_batch = data_mod.center_crops(val_files, min(args.crop, 256)) if val_files else None
    val_batch = val_batch.to(device) if val_batch is not None else None

    try:
        vae = build_model(args)
    except ValueError as exc:
        return fail(PROG, str(exc))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    for side in (args.crop, *args.crop_sizes):
        if side % factor:
            return fail(PROG, f"crop side {side} must be a multiple of the model's downsampling factor {factor}")
    if args.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    ema = EMAModel(vae.parameters(), decay=args.ema, model_cls=type(vae), model_config=vae.config)

    use_gan = args.disc_start >= 0
    disc = losses.PatchDiscriminator() if use_gan else None
    if use_gan:
        opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda(args))
    perceptual = None
    if args.lpips_weights:
        from models.training.perceptual import LPIPS

        try:
            perceptual = LPIPS.from_file(args.lpips_weights).to(device).eval().requires_grad_(False)
        except Exception as exc:  # OSError, safetensors / unpickling errors, missing keys
            return fail(PROG, f"--lpips-weights {args.lpips_weights}: {type(exc).__name__}: {exc}")

    step = 0
    if state is not None:
        try:
            restore(state, vae, opt, sched, ema, (disc, opt_d, sched_d) if use_gan else None)
        except (KeyError, RuntimeError, ValueError) as exc:
            return fail(PROG, f"{ckpt_path} does not fit this run's model: {type(exc).__name__}: {exc}")
        step = state["step"]
        set_rng_state(state["rng"])
    vae, opt, sched = accelerator.prepare(vae, opt, sched)
    if use_gan:
        disc, opt_d, sched_d = accelerator.prepare(disc, opt_d, sched_d)
    ema.to(device)
    raw_vae = accelerator.unwrap_model(vae)

    # Data: sample numbers continue from the step, so a resumed run sees the same crops.
    sampler = data_mod.StreamSampler(step * per_step, args.batch_size, accelerator.process_index,
                                     accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, persistent_workers=args.workers > 0,
                                         pin_memory=device.type == "cuda",
                                         # own generator: creating the iterator must not draw from the
                                         # global RNG, or a resumed run's sampling noise would shift
                                         generator=torch.Generator().manual_seed(args.seed))
    batches = iter(loader)

    metrics_path = out / "metrics.csv"
    fields = ["step", "time", "lr", "loss", "rec_loss", "kl", "g_loss", "d_loss", "psnr", "img_per_s", "val_psnr", "val_colour_rgb"]
    if main_proc:
        # On resume, drop rows logged after the checkpoint: those steps are about to be redone.
        kept = [r for r in csv.DictReader(open(metrics_path)) if int(r["step"]) <= step] if metrics_path.exists() else []
        with open(metrics_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(kept)
    t_start, cpu_start = time.time(), time.process_time()
    bar = tqdm(total=args.steps, initial=step, disable=not main_proc, dynamic_ncols=True, unit="step")

    def checkpoint():
        accelerator.wait_for_everyone()
        if not main_proc:
            return
        atomic_save({
            "args": vars(args), "step": step, "model": raw_vae.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict(), "ema": ema.state_dict(), "rng": rng_state(),
            **({"disc": accelerator.unwrap_model(disc).state_dict(), "opt_d": opt_d.state_dict(),
                "sched_d": sched_d.state_dict()} if use_gan else {}),
        }, ckpt_path)

    def export(final: bool):
        """Write the EMA weights as a diffusers folder (atomically: temp folder + rename)."""
        if not main_proc:
            return
        import shutil

        ema.store(raw_vae.parameters())
        ema.copy_to(raw_vae.parameters())
        if final:
            scale, shift = measure_latent_factors(raw_vae, dataset, accelerator.autocast)
            raw_vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        tmp = out / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        raw_vae.save_pretrained(tmp)
        shutil.rmtree(out / "model", ignore_errors=True)
        os.replace(tmp, out / "model")
        ema.restore(raw_vae.parameters())

    window_t, window_n = time.time(), 0
    while step < args.steps:
        vae.train()
        for _ in range(args.grad_accum):
            x = next(batches).to(device, non_blocking=True)
            x = x[: data_mod.batch_for_side(args.batch_size, args.crop, x.shape[-1])]
            with accelerator.accumulate(vae):
                with accelerator.autocast():
                    posterior = vae.encode(x).latent_dist if not args.decoder_only else raw_vae.encode(x).latent_dist
                    recon = vae.decode(posterior.sample()).sample
                rec = losses.reconstruction_loss(recon, x, l1=args.l1, mse=args.mse, colour=args.colour,
                                                  ssim=args.ssim, image_colour=args.image_colour)
                if perceptual is not None:
                    rec = rec + args.lpips_weight * perceptual(recon.float(), x).mean()
                kl = losses.kl_loss(posterior.mean, posterior.logvar, x[0].numel())
                loss = rec + args.kl_weight * kl
                if args.latent_colour:
                    loss = loss + args.latent_colour * losses.latent_colour_loss(posterior.mean, x)
                g_loss = d_loss = torch.zeros(())
                gan_on = use_gan and step >= args.disc_start
                if gan_on:
                    with accelerator.autocast():
                        g_loss = losses.generator_loss(disc(recon))
                    weight = losses.adaptive_gan_weight(rec, g_loss, raw_vae.decoder.conv_out.weight)
                    loss = loss + args.disc_weight * weight * g_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.clip:
                    accelerator.clip_grad_norm_(params, args.clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if gan_on:
                    with accelerator.autocast():
                        d_loss = losses.hinge_d_loss(disc(x), disc(recon.detach()))
                    accelerator.backward(d_loss)
                    opt_d.step()
                    sched_d.step()
                    opt_d.zero_grad(set_to_none=True)
            window_n += x.shape[0] * accelerator.num_processes
        step += 1
        ema.step(raw_vae.parameters())
        bar.update(1)

        if step % args.log_every == 0 or step == args.steps:
            with torch.no_grad():
                mse = torch.mean((recon.float().clamp(-1, 1) - x) ** 2) / 4  # [-1,1] -> [0,1] scale
                batch_psnr = float(-10 * torch.log10(mse.clamp_min(1e-10)))
            rate = window_n / (time.time() - window_t)
            window_t, window_n = time.time(), 0
            row = {"step": step, "time": round(time.time() - t_start, 1), "lr": f"{sched.get_last_lr()[0]:.3g}",
                   "loss": f"{loss.item():.5f}", "rec_loss": f"{rec.item():.5f}", "kl": f"{kl.item():.5g}",
                   "g_loss": f"{g_loss.item():.4f}", "d_loss": f"{d_loss.item():.4f}",
                   "psnr": f"{batch_psnr:.2f}", "img_per_s": f"{rate:.2f}", "val_psnr": "", "val_colour_rgb": ""}
            if val_batch is not None and (step % args.eval_every == 0 or step == args.steps) and main_proc:
                ema.store(raw_vae.parameters())
                ema.copy_to(raw_vae.parameters())
                val_psnr, val_offset, val_recon = evaluate(raw_vae, val_batch, accelerator.autocast)
                ema.restore(raw_vae.parameters())
                row["val_psnr"] = f"{val_psnr:.2f}"
                row["val_colour_rgb"] = " ".join(f"{v:+.2f}" for v in val_offset)
                save_grid(val_batch.cpu(), val_recon.cpu(), out / f"recon-{step:07d}.png")
            if main_proc:
                with open(metrics_path, "a", newline="") as f:
                    csv.DictWriter(f, fields).writerow(row)
                if row["val_psnr"]:
                    plot_curves(metrics_path, out / "curves.png")
                    export(final=False)
            bar.set_postfix(loss=row["loss"], psnr=row["psnr"], img_s=f"{rate:.1f}",
                            **({"val": row["val_psnr"]} if row["val_psnr"] else {}))

        pause = ((args.max_minutes and (time.time() - t_start) > args.max_minutes * 60)
                 or (args.max_cpu_minutes and (time.process_time() - cpu_start) > args.max_cpu_minutes * 60)
                 or step == args.stop_at)
        if step % args.checkpoint_every == 0 or step == args.steps or pause:
            checkpoint()
        if pause:
            bar.write(f"pausing at step {step} (--max-minutes / --max-cpu-minutes / --stop-at); continue with --resume")
            break
    bar.close()
    export(final=True)
    if main_proc:
        plot_curves(metrics_path, out / "curves.png")
        print(f"saved {out / 'model'} at step {step} (scaling_factor "
              f"{raw_vae.config.scaling_factor:.5f}, shift_factor {raw_vae.config.shift_factor:.5f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
