"""`use-train`: pre-train a USE model with FEP + SUP (or CLM) on behavior sequences (SPEC §3).

Single process:  use-train [flags]            (no flags: a small model on the synthetic default)
Multi-GPU/node:  torchrun --nproc-per-node N -m use.train [flags]

The output directory holds config.json, vocab.json, model.safetensors (the model directory read by
use-embed / use-eval), train_args.json, log.jsonl (one JSON line per logged step), summary.json and
checkpoint/ (weights, optimizer, scheduler, data-sampler and RNG state: `--resume` continues
exactly). Every file is written atomically; checkpoints are swapped in with a rename, so a crash
at any moment leaves the last good checkpoint loadable.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME, save_model_dir, save_weights
from .config import BACKENDS, SUP_EMBEDDINGS, USEConfig
from .io import atomic_write, atomic_write_text
from .losses import OBJECTIVES, SUP_VARIANTS, clm_loss, fep_loss, objective_parts, sup_loss
from .model import USEModel

CKPT_DIR = "checkpoint"


class TrainingError(RuntimeError):
    """A failure the user can act on (bad data, diverged loss, mismatched checkpoint)."""


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="use-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Pre-train a USE user model (RetNet) with FEP/SUP/CLM objectives. With no flags, trains "
                    "a small model on the embedded synthetic data set in a few minutes on a CPU.")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="training corpus: .txt (one user per line, events separated by "
                   "spaces) or .csv (columns sequence,user_id). Default: the synthetic data set, generated on first use")
    g.add_argument("--char-level", action="store_true", help="treat every character as one event (text, DNA)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="fraction of users held out for validation")
    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="fep_sup", help=f"one of {', '.join(OBJECTIVES)}")
    g.add_argument("--fep-window", type=int, default=5, help="FEP window W: predict the event types among the next W events")
    g.add_argument("--fep-context", type=int, default=0, help="FEP: do not score the first CONTEXT positions of a segment")
    g.add_argument("--fep-every", type=int, default=1, help="FEP: score every k-th position")
    g.add_argument("--sup-variant", default="orig", help=f"SimCLR variant: {', '.join(SUP_VARIANTS)}")
    g.add_argument("--sup-embedding", default="token", help=f"segment embedding for SUP: {', '.join(SUP_EMBEDDINGS)}")
    g.add_argument("--temperature", type=float, default=0.07, help="SimCLR temperature")
    g.add_argument("--min-len", type=int, default=128, help="minimum segment length (events)")
    g.add_argument("--max-len", type=int, default=384, help="maximum segment length (events)")
    g.add_argument("--gap", type=int, default=64, help="SUP: minimum number of events between the two segments of a user")
    g = p.add_argument_group("model")
    g.add_argument("--hidden-size", type=int, default=64, help="hidden size h (the paper: 768)")
    g.add_argument("--num-layers", type=int, default=2, help="number of RetNet blocks (the paper: 12)")
    g.add_argument("--num-heads", type=int, default=4, help="retention heads; h / heads must be divisible by 8")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the retention branch")
    g.add_argument("--backend", default="auto", help=f"retention backend: {', '.join(BACKENDS)} (auto: triton on CUDA, torch on CPU)")
    g.add_argument("--chunk-size", type=int, default=64, help="retention chunk size")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="users per micro-batch (per process)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps per optimizer step")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps of linear warmup (then linear decay to 0)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (matrices and embeddings only)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this value (0: off)")
    g.add_argument("--max-steps", type=int, default=150, help="optimizer steps (ignored when --epochs is given)")
    g.add_argument("--epochs", type=float, default=None, help="train for this many epochs; an epoch = every training "
                   "user sampled once on average")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="bf16 autocast (CUDA) or fp32; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="where to write the model, logs and checkpoints (default: runs/default)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint exactly where it stopped")
    g.add_argument("--overwrite", action="store_true", help="allow training into a non-empty output dir without --resume")
    g.add_argument("--eval-interval", type=int, default=50, help="validate every N steps (0: only at the end)")
    g.add_argument("--eval-batches", type=int, default=4, help="validation micro-batches (fixed, held-out users)")
    g.add_argument("--save-interval", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--log-interval", type=int, default=10, help="write a log line every N steps")
    g.add_argument("--seed", type=int, default=0, help="random seed (data sampling, init, dropout)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available; the local rank's GPU under torchrun)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def validate_args(a: argparse.Namespace) -> None:
    objective_parts(a.objective)
    if a.sup_variant not in SUP_VARIANTS:
        raise TrainingError(f"--sup-variant {a.sup_variant!r} is unknown; expected one of {', '.join(SUP_VARIANTS)}")
    if a.sup_embedding not in SUP_EMBEDDINGS:
        raise TrainingError(f"--sup-embedding {a.sup_embedding!r} is unknown; expected one of {', '.join(SUP_EMBEDDINGS)}")
    if a.backend not in BACKENDS:
        raise TrainingError(f"--backend {a.backend!r} is unknown; expected one of {', '.join(BACKENDS)}")
    checks = [("--min-len", a.min_len >= 2, "at least 2"), ("--max-len", a.max_len >= a.min_len, f">= --min-len ({a.min_len})"),
              ("--batch-size", a.batch_size >= 1, "at least 1"), ("--grad-accum", a.grad_accum >= 1, "at least 1"),
              ("--lr", a.lr > 0, "> 0"), ("--warmup-ratio", 0 <= a.warmup_ratio < 1, "in [0, 1)"),
              ("--gap", a.gap >= 0, ">= 0"), ("--max-steps", a.max_steps >= 1, "at least 1"),
              ("--val-fraction", 0 <= a.val_fraction < 1, "in [0, 1)"),
              ("--temperature", a.temperature > 0, "> 0"), ("--fep-every", a.fep_every >= 1, "at least 1"),
              ("--fep-context", a.fep_context >= 0, ">= 0")]
    if "fep" in objective_parts(a.objective):
        checks.append(("--fep-window", a.fep_window >= 1, "at least 1 for an FEP objective"))
    if "sup" in objective_parts(a.objective):
        checks.append(("--batch-size", a.batch_size >= 2, "at least 2 for a SUP objective (in-batch negatives)"))
    for flag, ok, want in checks:
        if not ok:
            raise TrainingError(f"{flag} must be {want}, got {getattr(a, flag[2:].replace('-', '_'))}")


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: Optional[str]) -> tuple:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
        use_cuda = torch.cuda.is_available() and (device_flag is None or device_flag.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{d.local_rank}") if use_cuda else torch.device("cpu")
        return d, device
    dev = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    return Dist(), torch.device(dev)


# ----------------------------------------------------------------------------- schedule & optimizer
def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return f


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Decay matrices and embeddings only; biases and LayerNorm gains (1-D) are left alone.
        (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


# ----------------------------------------------------------------------------- one step
def _cat_views(views, pad_id: int):
    """Stacks the views of a batch into one padded batch so the model runs once. Returns padded tensors."""
    T = max(v.input_ids.shape[1] for v in views)

    def pad(x, value):
        return F.pad(x, (0, T - x.shape[1]), value=value) if x.dim() == 2 else F.pad(x, (0, 0, 0, T - x.shape[1]), value=value)

    ids = torch.cat([pad(v.input_ids, pad_id) for v in views])
    mask = torch.cat([pad(v.attention_mask, False) for v in views])
    labels = fmask = None
    if views[0].fep_labels is not None:
        labels = torch.cat([pad(v.fep_labels, 0) for v in views])
        fmask = torch.cat([pad(v.fep_mask, False) for v in views])
    return ids, mask, labels, fmask


class Objective(torch.nn.Module):
    """The model plus its training losses in one forward, so DDP sees every parameter used in a
    forward pass (the SUP head runs after the backbone: outside it, DDP would count it twice)."""

    def __init__(self, core: USEModel, a: argparse.Namespace):
        super().__init__()
        self.core, self.a, self.parts = core, a, objective_parts(a.objective)

    def forward(self, ids, mask, labels, fmask, num_a: int) -> Dict[str, torch.Tensor]:
        a, parts, core = self.a, self.parts, self.core
        heads = tuple(h for h, want in (("lm", "clm" in parts), ("fep", "fep" in parts)) if want)
        out = core(ids, mask, heads=heads)
        losses = {}
        if "clm" in parts:
            losses["clm"] = clm_loss(out.lm_logits, ids, mask)
        if "fep" in parts:
            losses["fep"] = fep_loss(out.fep_logits, labels, fmask, mask, context=a.fep_context, every=a.fep_every)
        if "sup" in parts:
            z = core.sup_projection(core.segment_embedding(out, mask, a.sup_embedding))  # [2B, 128]
            losses["sup"] = sup_loss(z[:num_a], z[num_a:], variant=a.sup_variant, temperature=a.temperature)
        return losses


def compute_losses(objective, batch, pad_id: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """Runs the objective (or its DDP / compiled wrapper) once over all views of the batch stacked."""
    ids, mask, labels, fmask = (None if t is None else t.to(device, non_blocking=True)
                                for t in _cat_views(batch.views, pad_id))
    return objective(ids, mask, labels, fmask, batch.views[0].input_ids.shape[0])


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    import random

    import numpy as np
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import random

    import numpy as np
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out_dir: Path, core: USEModel, vocab, opt, sched, sampler, step: int, tokens: int) -> None:
    """Writes the checkpoint into a fresh folder, then swaps it in with renames.

    At every instant either checkpoint/ or checkpoint.old/ is complete: load_checkpoint reads
    whichever is.
    """
    final, old = out_dir / CKPT_DIR, out_dir / (CKPT_DIR + ".old")
    tmp = out_dir / f".{CKPT_DIR}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    core.config.save(tmp / CONFIG_NAME)
    vocab.save(tmp / VOCAB_NAME)
    save_weights(core, tmp / WEIGHTS_NAME)
    state = {"step": step, "tokens": tokens, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "sampler": sampler.state_dict(), "rng": _rng_state()}
    atomic_write(tmp / "trainer_state.pt", lambda p: torch.save(state, p))
    atomic_write_text(tmp / "COMPLETE", f"{step}\n")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def find_checkpoint(out_dir: Path) -> Optional[Path]:
    for d in (out_dir / CKPT_DIR, out_dir / (CKPT_DIR + ".old")):
        if (d / "COMPLETE").is_file():
            return d
    return None


# ----------------------------------------------------------------------------- main loop
def _resolve_data(a: argparse.Namespace, is_main: bool) -> Path:
    if a.data is not None:
        return Path(a.data)
    from .defaults import DEFAULT_DATA_DIR, ensure_default_dataset
    if is_main:
        ensure_default_dataset(DEFAULT_DATA_DIR)
    if dist.is_initialized():
        dist.barrier()
    return DEFAULT_DATA_DIR / "train.txt"


def _log(msg: str, d: Dist) -> None:
    if d.main:
        print(f"[use-train] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def validate(model: Objective, batches, device, amp) -> Dict[str, float]:
    """Mean loss parts over fixed held-out batches (the same batches at every evaluation)."""
    model.eval()
    sums: Dict[str, float] = {}
    for batch in batches:
        with amp():
            parts = compute_losses(model, batch, model.core.config.pad_id, device)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    model.train()
    return {f"val_{k}": v / len(batches) for k, v in sums.items()}


def train(argv: Optional[List[str]] = None) -> dict:
    """Runs training; returns the closing summary. Raises TrainingError for user-actionable failures."""
    from .data import BatchSampler, Vocab, load_corpus

    a = build_parser().parse_args(argv)
    try:
        validate_args(a)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    d, device = setup_distributed(a.device)
    out_dir = Path(a.output_dir) if a.output_dir else Path("runs/default")
    ckpt = find_checkpoint(out_dir) if a.resume else None
    if a.resume and ckpt is None:
        raise TrainingError(f"--resume: no complete checkpoint in {out_dir}/{CKPT_DIR}")
    if not a.resume and not a.overwrite:
        old = find_checkpoint(out_dir)
        if (out_dir / WEIGHTS_NAME).exists() or old is not None:
            what = (f"a checkpoint at step {(old / 'COMPLETE').read_text().strip()}" if old is not None
                    else "a trained model")
            raise TrainingError(f"{out_dir} already holds {what}; pass --resume to continue it or "
                                f"--overwrite to replace it (or choose another --output-dir)")

    torch.manual_seed(a.seed + d.rank)
    data_path = _resolve_data(a, d.main)
    try:
        corpus = load_corpus(data_path, char_level=a.char_level, vocab=Vocab.load(ckpt / VOCAB_NAME) if ckpt else None)
        fresh = load_corpus(data_path, char_level=a.char_level).vocab if ckpt is not None else None
    except ValueError as e:
        raise TrainingError(str(e)) from None
    vocab = corpus.vocab
    if ckpt is not None:
        saved = Vocab.load(ckpt / VOCAB_NAME)
        if fresh.fingerprint() != saved.fingerprint():
            raise TrainingError(f"the vocabulary of {data_path} ({len(fresh)} tokens) does not match the checkpoint's "
                                f"{ckpt / VOCAB_NAME} ({len(saved)} tokens): resume with the data it was trained on")
    train_users, val_users = corpus.split(a.val_fraction, seed=a.seed)
    mk = dict(min_len=a.min_len, max_len=a.max_len, objective=a.objective, gap=a.gap,
              fep_window=a.fep_window if "fep" in objective_parts(a.objective) else 0)
    try:
        sampler = BatchSampler(corpus, users=train_users, batch_size=a.batch_size, seed=a.seed,
                               rank=d.rank, world_size=d.world, **mk)
    except ValueError as e:
        raise TrainingError(f"{data_path}: {e}") from None
    val_sampler = None
    if d.main and len(val_users) >= (2 if "sup" in objective_parts(a.objective) else 1):
        try:   # held-out users may be few: validate on as many as there are, or not at all
            val_sampler = BatchSampler(corpus, users=val_users, batch_size=min(a.batch_size, len(val_users)),
                                       seed=a.seed + 10_000, **mk)
        except ValueError as e:
            _log(f"no validation: {e}", d)

    cfg = USEConfig(vocab_size=len(vocab), num_events=vocab.num_events, hidden_size=a.hidden_size,
                    num_layers=a.num_layers, num_heads=a.num_heads, dropout=a.dropout, pad_id=vocab.pad_id,
                    sup_embedding=a.sup_embedding, backend=a.backend, chunk_size=a.chunk_size)
    if ckpt is not None:
        saved_cfg = USEConfig.load(ckpt / CONFIG_NAME)
        if saved_cfg.architecture_hash() != cfg.architecture_hash():
            raise TrainingError(f"the model flags do not match the checkpoint's {ckpt / CONFIG_NAME}; resume with the same flags")
    torch.manual_seed(a.seed)                         # identical init on every rank
    core = USEModel(cfg).to(device)
    if d.rank:
        torch.manual_seed(a.seed + 7919 * d.rank)     # but each rank its own dropout stream
    opt = make_optimizer(core, a.lr, a.weight_decay)
    if a.epochs is not None:
        steps_per_epoch = math.ceil(len(train_users) / (a.batch_size * a.grad_accum * d.world))
        total_steps = max(1, int(round(a.epochs * steps_per_epoch)))
    else:
        total_steps = a.max_steps
    warmup = int(a.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup))
    step, tokens_done = 0, 0
    if ckpt is not None:
        from safetensors.torch import load_file
        core.load_state_dict(load_file(str(ckpt / WEIGHTS_NAME)))
        st = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        # Rank 0 alone writes checkpoints: every rank resumes its own shard at the saved step.
        sampler.load_state_dict({**st["sampler"], "rank": d.rank})
        step, tokens_done = st["step"], st["tokens"]
        _set_rng_state(st["rng"])
        if d.rank:                                     # ranks > 0: their own dropout stream again
            torch.manual_seed(a.seed + 7919 * d.rank + step)
        if d.main:                                     # drop log lines of steps after the checkpoint
            _truncate_log(out_dir / "log.jsonl", step)
        _log(f"resumed from {ckpt} at step {step}", d)
    objective = Objective(core, a)
    model = objective
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    if a.compile:
        model = torch.compile(model)
    val_batches = [val_sampler.next_batch() for _ in range(a.eval_batches)] if val_sampler is not None else []
    if not val_batches:
        val_sampler = None
    use_bf16 = a.precision == "bf16" or (a.precision == "auto" and device.type == "cuda")
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not a.resume:
            # A fresh run replaces the old one whole: never leave its weights beside the new config,
            # nor its checkpoint for a later --resume to pick up.
            for name in (WEIGHTS_NAME, "summary.json", "log.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
            for name in (CKPT_DIR, CKPT_DIR + ".old"):
                shutil.rmtree(out_dir / name, ignore_errors=True)
        atomic_write_text(out_dir / "train_args.json", json.dumps(vars(a), indent=2, sort_keys=True) + "\n")
        cfg.save(out_dir / CONFIG_NAME)
        vocab.save(out_dir / VOCAB_NAME)
    _log(f"data {data_path}: {corpus.num_users} users ({len(train_users)} train, {len(val_users)} val), "
         f"{len(vocab)} tokens, E={vocab.num_events} | model {core.num_parameters() / 1e6:.2f}M params, "
         f"backend {a.backend}, device {device}, {'bf16' if use_bf16 else 'fp32'}, world {d.world} | "
         f"{total_steps} steps", d)

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=a.no_progress or not d.main, desc="use-train",
               dynamic_ncols=True, file=sys.stderr)
    model.train()
    last: Dict[str, float] = {}
    t_start, tok_window, t_window = time.perf_counter(), 0, time.perf_counter()
    tokens_run = 0
    while step < total_steps:
        opt.zero_grad(set_to_none=True)
        parts_acc: Dict[str, float] = {}
        for micro in range(a.grad_accum):
            batch = sampler.next_batch()
            sync = (micro == a.grad_accum - 1) or d.world == 1
            ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else nullcontext()
            with ctx:
                with amp():
                    parts = compute_losses(model, batch, cfg.pad_id, device)
                    loss = sum(parts.values()) / a.grad_accum
                if not torch.isfinite(loss):
                    bar.close()
                    good = find_checkpoint(out_dir)
                    where = f"the last good checkpoint is {good} (step {(good / 'COMPLETE').read_text().strip()})" if good else "no checkpoint was written yet"
                    raise TrainingError(f"loss became {float(loss.detach())} at step {step + 1} "
                                        f"({', '.join(f'{k}={float(v.detach()):.4g}' for k, v in parts.items())}); stopped; {where}. "
                                        f"Try a lower --lr or --precision fp32")
                loss.backward()
            for k, v in parts.items():
                parts_acc[k] = parts_acc.get(k, 0.0) + float(v.detach()) / a.grad_accum
            tokens_run += batch.num_tokens
            tok_window += batch.num_tokens
        gnorm = torch.nn.utils.clip_grad_norm_(core.parameters(), a.grad_clip if a.grad_clip > 0 else float("inf"))
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        last = {k: round(v, 6) for k, v in parts_acc.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()})
        now = time.perf_counter()
        rec = None
        if step % a.log_interval == 0 or step == total_steps:
            tps = tok_window * d.world / max(now - t_window, 1e-9)
            rec = {"step": step, **last, "loss": round(sum(last.values()), 6), "lr": sched.get_last_lr()[0],
                   "grad_norm": round(float(gnorm), 6), "tokens_per_s": round(tps, 1)}
            tok_window, t_window = 0, now
        if val_sampler is not None and ((a.eval_interval and step % a.eval_interval == 0) or step == total_steps):
            vals = validate(objective, val_batches, device, amp)
            rec = {**(rec or {"step": step, **last}), **{k: round(v, 6) for k, v in vals.items()}}
            last.update(vals)
        if rec is not None and d.main:
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if d.main and a.save_interval and step % a.save_interval == 0 and step < total_steps:
            save_checkpoint(out_dir, core, vocab, opt, sched, sampler, step, tokens_done + tokens_run * d.world)
    bar.close()
    elapsed = time.perf_counter() - t_start
    tokens_done += tokens_run * d.world
    summary = {"steps": step, "tokens": tokens_done, "seconds": round(elapsed, 2),
               "tokens_per_s": round(tokens_run * d.world / max(elapsed, 1e-9), 1),
               "final_losses": last, "output_dir": str(out_dir), "world_size": d.world}
    if d.main:
        save_checkpoint(out_dir, core, vocab, opt, sched, sampler, step, tokens_done)
        save_model_dir(core, vocab, out_dir)
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        first = _first_log(out_dir)
        print("\n== use-train summary ==")
        print(f"steps {step}  tokens {tokens_done:,}  time {elapsed:.1f}s  tokens/s {summary['tokens_per_s']:,.0f}")
        for k, v in last.items():
            start = f" (first logged {first[k]:.4f})" if first and k in first else ""
            print(f"  {k:>10}: {v:.4f}{start}")
        print(f"model written to {out_dir}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return summary


def _truncate_log(path: Path, step: int) -> None:
    """Keeps the log lines of steps <= `step` (a resume redoes the later ones)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def _first_log(out_dir: Path) -> Optional[dict]:
    try:
        with open(out_dir / "log.jsonl") as f:
            return json.loads(f.readline())
    except (OSError, ValueError):
        return None


def main(argv: Optional[List[str]] = None) -> int:
    try:
        train(argv)
    except (TrainingError, FileNotFoundError, ValueError) as e:
        print(f"use-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
