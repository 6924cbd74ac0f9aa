"""Contrastive image-gene pretraining: ``python -m stcorpus.training.pretrain --config tiny-cpu --set optim.lr=1e-4``.

Data-parallel with ``torchrun --nproc_per_node N -m stcorpus.training.pretrain ...`` (gloo on CPU, NCCL on
CUDA). The loop in :func:`train` reads top to bottom, nanoGPT style: set-up, then per step
lr from the schedule -> forward/backward over the accumulation micro-batches -> clip, step ->
log -> evaluate -> checkpoint. ``--resume latest`` continues exactly: same parameters,
optimiser, RNG and data position, hence the same next batch.

Batches from the corpus loader under ``on_bad_sample: warn/skip`` may be short or empty: a short
batch trains as it is (the losses gather unequal batch sizes across ranks and weight each
rank's share), and a micro-batch that is empty on any rank is passed over by every rank (the
ranks exchange their batch sizes each micro-step), so steps stay in lockstep.

Run folder (``run.out_dir``)::

    config.yaml            the resolved config
    log.jsonl              one JSON record per log step / evaluation / event
    checkpoints/step-*.pt  the last ``run.keep_last`` checkpoints
    keys-rank<r>.jsonl     the sample keys of every batch per rank (``run.log_keys``)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from stcorpus.errors import StcorpusError
from stcorpus.loaders import batch as B
from stcorpus.training.checkpoint import (
    CHECKPOINT_FORMAT,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from stcorpus.training.config import TrainConfig, load_config
from stcorpus.training.data import Batch, BatchSource, RunData, build_run_data, check_batch, resolve_config, to_device
from stcorpus.training.distributed import DistInfo, cleanup_distributed, init_distributed
from stcorpus.training.errors import CheckpointError, ConfigError, DataSourceUnavailableError
from stcorpus.training.evaluate import Evaluation, evaluate
from stcorpus.training.losses import ContrastiveObjective, batch_sizes
from stcorpus.training.model import ImageGeneModel, base_identity, build_run_model, restore_state, trainable_state
from stcorpus.training.runlog import RunLog
from stcorpus.training.schedule import lr_at
from stcorpus.training.stamp import MaskedExpressionObjective, MaskedGeneModel, evaluate_gene

logger = logging.getLogger("stcorpus.training")


@dataclass(frozen=True)
class TrainResult:
    """What a call to :func:`train` ended with."""

    step: int
    run_dir: Path
    checkpoint: Path | None
    #: Metrics of the last evaluation ({} if none ran).
    metrics: dict[str, float] = field(default_factory=dict)
    #: The last training log record.
    last_log: dict[str, Any] = field(default_factory=dict)


def train(cfg: TrainConfig, *, resume: str | Path | None = None, stop_at: int | None = None) -> TrainResult:
    """Train the model ``cfg`` describes; the process-group comes from ``torchrun``'s environment.

    ``resume``: a checkpoint path, ``"latest"`` (the newest in ``run.out_dir``, which must exist)
    or ``"auto"`` (the newest if any, else a fresh start). ``stop_at``: stop after this step with
    a checkpoint, as a pre-empted job would (the schedule still runs to ``optim.max_steps``).
    """
    env = init_distributed(cfg.run.device)
    owns_group = env.distributed
    try:
        result = _train(cfg, env, resume=resume, stop_at=stop_at)
    except BaseException:
        if owns_group:
            cleanup_distributed(synchronize=False)
        raise
    if owns_group:
        cleanup_distributed(synchronize=True)
    return result


def _train(cfg: TrainConfig, env: DistInfo, *, resume: str | Path | None, stop_at: int | None) -> TrainResult:
    # ---- set-up ------------------------------------------------------------------------------
    run_dir = Path(cfg.run.out_dir)
    ckpt_dir = run_dir / "checkpoints"
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(mode=True)
    precision = _precision(cfg, env.device)
    autocast = functools.partial(
        torch.autocast,
        device_type=env.device.type,
        dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
        enabled=precision != "fp32",
    )

    data = build_run_data(cfg, rank=env.rank, world_size=env.world_size, device=env.device)
    cfg = resolve_config(cfg, data)
    checkpoint = _read_resume(resume, ckpt_dir, cfg=cfg, world_size=env.world_size)

    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_run_model(cfg, image_size=data.image_size).to(env.device)
    objective: torch.nn.Module = (
        MaskedExpressionObjective() if cfg.run.stage == "gene" else ContrastiveObjective(cfg.loss)
    )
    optimizer = _optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    torch.manual_seed(cfg.run.seed + 1 + env.rank)  # dropout etc. differ across ranks
    step = 0
    metrics: dict[str, float] = {}
    if checkpoint is not None:
        restore_state(model, checkpoint, where=str(resume))
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        data.train.load_state_dict(checkpoint["data"][env.rank])
        set_rng_state(checkpoint["rng"][env.rank])
        step = int(checkpoint["step"])
        metrics = {k: float(v) for k, v in checkpoint["metrics"].items()}
    net: torch.nn.Module = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)

    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir / "log.jsonl" if env.is_main else None)
    if env.is_main:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        log.write({"kind": "event", "step": step, "message": _start_message(cfg, env, resume=checkpoint is not None)})
    key_log = (run_dir / f"keys-rank{env.rank}.jsonl").open("a") if cfg.run.log_keys else None

    needs = _needed_keys(cfg)
    accum = cfg.optim.accum_steps
    last_step = cfg.optim.max_steps if stop_at is None else min(stop_at, cfg.optim.max_steps)
    data_iter = iter(data.train)
    checked = False
    sums: dict[str, Tensor] = {}
    interval = _Interval()
    last_log: dict[str, Any] = {}
    last_ckpt: Path | None = None

    try:
        # ---- loop ----------------------------------------------------------------------------------
        while step < last_step:
            lr = lr_at(
                step,
                lr=cfg.optim.lr,
                min_lr=cfg.optim.min_lr,
                warmup_steps=cfg.optim.warmup_steps,
                max_steps=cfg.optim.max_steps,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr

            for micro in range(accum):
                started = time.perf_counter()
                # Every rank's batch size; a micro-batch empty on any rank is replaced on every rank.
                batch, sizes, data_iter = _next_usable_batch(data_iter, data.train, env=env, interval=interval)
                interval.data_wait += time.perf_counter() - started
                if not checked:
                    check_batch(batch, needs=needs)
                    checked = True
                if key_log is not None:
                    key_log.write(json.dumps({"step": step, "micro": micro, "keys": batch[B.KEY]}) + "\n")
                batch = to_device(batch, env.device)
                # Gradients are all-reduced on the last micro-batch only.
                sync = micro == accum - 1 or not env.distributed
                with contextlib.nullcontext() if sync else net.no_sync():  # type: ignore[operator]
                    with autocast():
                        outputs = net(batch)
                        terms = objective(outputs, batch.get(B.POS), sizes=sizes)
                    scaler.scale(terms["loss"] / accum).backward()
                for name, value in terms.items():
                    sums[name] = sums.get(name, torch.zeros((), device=env.device)) + value.detach().float() / accum
                interval.samples += sum(sizes)

            grad_norm = torch.zeros(())
            if cfg.optim.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if isinstance(model, ImageGeneModel):
                model.clamp_logit_scale(cfg.loss.max_logit_scale)
            step += 1
            interval.steps += 1

            if step % cfg.run.log_every == 0 or step == last_step:
                last_log = _log_record(
                    step=step,
                    lr=lr,
                    sums=sums,
                    interval=interval,
                    env=env,
                    model=model,
                    objective=objective,
                    grad_norm=grad_norm,
                    source=data.train,
                )
                if key_log is not None:
                    key_log.flush()
                log.write(last_log)
                sums = {}
                interval = _Interval()

            if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.optim.max_steps:
                evaluation = _evaluate(model, data, cfg, env=env, autocast=autocast)
                if evaluation is not None:
                    metrics = evaluation.metrics
                    log.write(
                        {
                            "kind": "eval",
                            "step": step,
                            **metrics,
                            "probe_train_slides": evaluation.probe_train_slides,
                            "probe_test_slides": evaluation.pool_slides,
                        }
                    )
                interval.restart()

            if (cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0) or step == last_step:
                last_ckpt = _save(
                    step,
                    model=model,
                    optimizer=optimizer,
                    scaler=scaler,
                    cfg=cfg,
                    env=env,
                    data=data,
                    metrics=metrics,
                    ckpt_dir=ckpt_dir,
                )
                interval.restart()
    finally:
        if key_log is not None:
            key_log.close()
        log.close()
    return TrainResult(step=step, run_dir=run_dir, checkpoint=last_ckpt, metrics=metrics, last_log=last_log)


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------


@dataclass
class _Interval:
    """Counters between two log lines (eval and checkpoint time excluded)."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    #: Samples trained on, over all ranks.
    samples: int = 0
    steps: int = 0
    #: Micro-batches left out because they were empty on some rank.
    skipped_batches: int = 0

    def restart(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.samples = 0
        self.steps = 0
        self.skipped_batches = 0


#: Consecutive micro-batches empty on some rank before a run gives up on its data.
MAX_EMPTY_BATCHES = 100


def _next_batch(iterator: Iterator[Batch], source: BatchSource, *, rank: int) -> tuple[Batch, Iterator[Batch]]:
    """The next batch, starting the source's next epoch when the current one ends."""
    try:
        return next(iterator), iterator
    except StopIteration:
        iterator = iter(source)  # the source reshuffles for the next epoch
    try:
        return next(iterator), iterator
    except StopIteration:
        raise DataSourceUnavailableError(
            f"the training source yielded no batch in a whole epoch (rank {rank}); "
            "check that the split is not empty and has at least one batch per rank"
        ) from None


def _next_usable_batch(
    iterator: Iterator[Batch], source: BatchSource, *, env: DistInfo, interval: _Interval
) -> tuple[Batch, list[int], Iterator[Batch]]:
    """The next batch with samples on every rank, every rank's batch size, and the iterator.

    Under ``on_bad_sample: warn/skip`` the loader keeps batch boundaries and may yield short or
    empty batches. Short ones train as they are (the losses gather unequal sizes). A batch
    that is empty on any rank is passed over on every rank (the decision is collective, so the
    ranks stay in lockstep and DDP's all-reduce always has every rank), and counted.
    """
    for _ in range(MAX_EMPTY_BATCHES):
        batch, iterator = _next_batch(iterator, source, rank=env.rank)
        n = len(batch[B.KEY])
        # A host tensor through a gloo group (the default one on CPU, cpu_group with NCCL): no GPU sync.
        sizes = batch_sizes(n, device=torch.device("cpu"), group=env.cpu_group) if env.distributed else [n]
        if min(sizes) > 0:
            return batch, sizes, iterator
        interval.skipped_batches += 1
        logger.warning("rank %d: passing over a micro-batch that is empty on some rank (sizes %s)", env.rank, sizes)
    raise DataSourceUnavailableError(
        f"{MAX_EMPTY_BATCHES} micro-batches in a row were empty on some rank: the loader reads no sample; "
        "check the corpus (or run with data.loader.on_bad_sample=error to see why)"
    )


def _precision(cfg: TrainConfig, device: torch.device) -> str:
    precision = cfg.run.precision
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("run.precision=fp16 needs CUDA; use fp32 (or bf16) on CPU")
    return precision


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not biases, norms, the temperature), as in nanoGPT."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)


def _needed_keys(cfg: TrainConfig) -> list[str]:
    needs = [B.KEY, B.SLIDE_ID] + ([B.PATCH] if cfg.run.stage == "align" else [])
    needs += [B.EXPR, B.EXPR_MASK] if cfg.model.gene.name == "mlp" else [B.TOKENS, B.TOKENS_MASK]
    if cfg.model.gene.niche:
        needs.append(B.NICHE)
    if cfg.loss.uses_region():
        needs.append(B.REGION)
    if cfg.loss.pos > 0:
        needs.append(B.POS)
    return needs


def _start_message(cfg: TrainConfig, env: DistInfo, *, resume: bool) -> str:
    verb = "resuming" if resume else "starting"
    image = cfg.model.image
    niche = ", niche" if cfg.model.gene.niche else ""
    what = (
        f"gene stage (masked expression, ratio {cfg.loss.mask_ratio})"
        if cfg.run.stage == "gene"
        else f"image {image.name} ({image.finetune}, {image.image_size} px, mean {image.mean}), loss {cfg.loss.kind}"
    )
    return (
        f"{verb} run in {cfg.run.out_dir}: world size {env.world_size} on {env.device.type}, "
        f"global batch {cfg.data.batch_size * env.world_size} x {cfg.optim.accum_steps} accumulation, "
        f"{what}, gene {cfg.model.gene.name} ({cfg.model.gene.n_genes} genes{niche})"
    )


def _read_resume(
    resume: str | Path | None, ckpt_dir: Path, *, cfg: TrainConfig, world_size: int
) -> dict[str, Any] | None:
    """The checkpoint to resume from (or None), checked against this run."""
    if resume is None:
        return None
    if str(resume) in ("latest", "auto"):
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            if str(resume) == "auto":
                return None
            raise CheckpointError(f"--resume latest: no checkpoint in {ckpt_dir}; start without --resume (or use auto)")
    else:
        path = Path(resume)
    state = load_checkpoint(path)
    if int(state["world_size"]) != world_size:
        raise CheckpointError(
            f"{path} was written by {state['world_size']} processes but this run has {world_size}; "
            "an exact resume needs the same number (the data position is per rank)"
        )
    saved = json.loads(state["config"])
    now = cfg.to_dict()
    if saved["model"] != now["model"] or saved["loss"] != now["loss"]:
        raise CheckpointError(
            f"{path} holds a different model or loss than this config; resume with the checkpoint's config.yaml "
            f"(saved model {saved['model']}, loss {saved['loss']})"
        )
    changed = sorted(
        f"{section}.{key}" for section in now for key in now[section] if saved[section].get(key) != now[section][key]
    )
    if changed:
        logger.warning("resuming %s with changed settings: %s", path, ", ".join(changed))
    return state


def _log_record(
    *,
    step: int,
    lr: float,
    sums: dict[str, Tensor],
    interval: _Interval,
    env: DistInfo,
    model: torch.nn.Module,
    objective: torch.nn.Module,
    grad_norm: Tensor,
    source: BatchSource,
) -> dict[str, Any]:
    """Loss terms averaged over the interval and the ranks, throughput and data-wait fraction."""
    names = sorted(sums)
    values = torch.stack([sums[n] for n in names]) / max(interval.steps, 1)
    timing = torch.tensor([interval.data_wait], device=values.device)
    skipped = data_skipped(source)
    counts = torch.tensor([skipped.get("samples", 0), skipped.get("empty_batches", 0)], device=values.device)
    if env.distributed:
        dist.all_reduce(values)
        values /= env.world_size
        dist.all_reduce(timing, op=dist.ReduceOp.MAX)
        dist.all_reduce(counts)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = max(time.perf_counter() - interval.start, 1e-9)
    record: dict[str, Any] = {"kind": "train", "step": step}
    for name, value in zip(names, values.tolist(), strict=True):
        record[name if name in ("loss", "pos_acc") else f"loss/{name}"] = value
    rows, cols = getattr(objective, "last_logits_shape", (0, 0))
    if isinstance(model, ImageGeneModel):
        scale = float(model.logit_scale.detach().exp())
        record.update(logit_scale=scale, temperature=1.0 / scale)
    record.update(
        lr=lr,
        grad_norm=float(grad_norm),
        logits_rows=rows,
        logits_cols=cols,
        samples_per_s=interval.samples / elapsed,
        data_wait_frac=min(1.0, float(timing[0]) / elapsed),
        interval_s=elapsed,
        interval_steps=interval.steps,
        interval_samples=interval.samples,
        skipped_batches=interval.skipped_batches,
        time=time.time(),
    )
    if isinstance(model, ImageGeneModel) and model.logit_bias is not None:
        record["logit_bias"] = float(model.logit_bias.detach())
    if skipped:
        record["bad_samples"], record["empty_batches"] = (int(v) for v in counts.tolist())
    return record


def data_skipped(source: BatchSource) -> dict[str, int]:
    """What the source's bad-sample policy left out so far on this rank ({} for sources that skip nothing)."""
    skipped = getattr(source, "skipped", None)
    return dict(skipped()) if callable(skipped) else {}


def _evaluate(
    model: torch.nn.Module, data: RunData, cfg: TrainConfig, *, env: DistInfo, autocast: Callable[[], Any]
) -> Evaluation | None:
    """Retrieval + probe on rank 0 (None elsewhere: the other ranks wait at a barrier).

    STAMP's gene stage evaluates the masked reconstruction of the validation pool instead.
    """
    evaluation = None
    if env.is_main:
        # Evaluation must not move the training's random stream (a DataLoader draws a seed from it).
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            if isinstance(model, MaskedGeneModel):
                metrics = evaluate_gene(
                    model, data.val_batches(), cfg.eval, device=env.device, autocast=autocast, seed=cfg.run.seed
                )
                evaluation = Evaluation(metrics=metrics, pool_slides=[], probe_train_slides=[])
            else:
                evaluation = evaluate(model, data, cfg.eval, device=env.device, autocast=autocast, seed=cfg.run.seed)
    if env.distributed:
        dist.barrier()
    return evaluation


def _save(
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    env: DistInfo,
    data: RunData,
    metrics: dict[str, float],
    ckpt_dir: Path,
) -> Path | None:
    """Gather every rank's RNG and data state; rank 0 writes the checkpoint."""
    local = {"rng": rng_state(), "data": data.train.state_dict()}
    if env.distributed:
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    path = None
    if env.is_main:
        import stcorpus

        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            # What trained; a frozen / LoRA tower's base weights are named in "base" instead.
            "model": trainable_state(model),
            "base": base_identity(model),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "config": cfg.to_json(),
            "world_size": env.world_size,
            "rng": [g["rng"] for g in gathered],
            "data": [g["data"] for g in gathered],
            "metrics": dict(metrics),
            "versions": {"torch": str(torch.__version__), "stcorpus": str(stcorpus.__version__)},
        }
        path = save_checkpoint(state, ckpt_dir, step=step, keep_last=cfg.run.keep_last)
    if env.distributed:
        dist.barrier()
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m stcorpus.training.pretrain``."""
    parser = argparse.ArgumentParser(
        prog="python -m stcorpus.training.pretrain",
        description="Contrastive image-gene pretraining (single process or under torchrun).",
    )
    parser.add_argument("--config", default=None, help="a YAML config file or a built-in config name (tiny-cpu, ...)")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set optim.lr=1e-4 model.image.name=small-vit",
    )
    parser.add_argument("--resume", default=None, help="a checkpoint path, 'latest', or 'auto' (latest if any)")
    parser.add_argument("--stop-at", type=int, default=None, help="stop with a checkpoint after this step")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = load_config(args.config, overrides=args.overrides)
        if args.print_config:
            sys.stdout.write(cfg.to_yaml())
            return 0
        train(cfg, resume=args.resume, stop_at=args.stop_at)
    except StcorpusError as exc:
        logger.error("%s", exc)
        return 2
    return 0


def _exit_after_distributed(code: int) -> None:
    """Leave a torchrun rank without interpreter finalization.

    The process group is already destroyed and every output written (checkpoints and logs are
    fsynced or flushed), but gloo's C++ threads can still race interpreter finalization and abort
    the process ("terminate called without an active exception"; pytorch/pytorch#179291), turning
    a finished run into a failed one about once in 20 runs here. Flushing and ``os._exit`` skips
    that teardown.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_after_distributed(exit_code)
    sys.exit(exit_code)
