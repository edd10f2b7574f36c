"""One training run as a library: the `Trainer` (engine, data, the step loop, checkpoints,
metrics and the checkpoint hooks it is handed, e.g. evaluation/hook.py), the stop flag and
the run-level collectives (locking the run directory, opening the trackers).
`python -m launch.train` (launch/train.py) builds one and runs it.

Exit codes (`Trainer.run` and launch/train.py): 0 finished; 2 bad input (config, dataset, run
directory in use or not writable, checkpoints none of which can be resumed: see
`Trainer._verified`), before any step; 3 stopped after `train.max_bad_steps` non-finite steps in
a row; 75 (EX_TEMPFAIL) saved a checkpoint on SIGTERM or SIGUSR1 and asks to be requeued; 130
saved a checkpoint on Ctrl-C (SIGINT; a second one aborts at once); 1 anything else (a
checkpoint that could not be written says so in one line).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from training import checkpoint as ckpt
from training.config import Config, ConfigError, to_yaml
from training.distributed import World, mean_over_ranks, sequence_parallel_group
from training.engine import build_engine, build_model, repair_universal_load
from training.metrics import (
    Interval,
    MetricsLogger,
    memory_gb,
    peak_tflops,
    training_flops_per_token,
)
from training.profiling import StepProfiler
from training.rundir import RunDirError, RunLock, probe_writable

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_REQUEUE = 0, 1, 2, 3, 75
EXIT_INTERRUPTED = 128 + signal.SIGINT

log = logging.getLogger("rotalibi")

# Called at every checkpoint with (trainer, step); what it returns joins that step's metrics.
CheckpointHook = Callable[["Trainer", int], dict]


@dataclass(frozen=True)
class StepResult:
    loss: float  # this rank's mean over the micro-batches
    applied: bool  # False when ZeRO skipped the update (non-finite gradient norm)
    data_wait: float  # seconds spent waiting for batches
    lr: float  # the learning rate the update used
    documents: float  # distinct documents per micro-batch, mean over the step's


class StopFlag:
    """Set by SIGTERM, SIGUSR1 or a first Ctrl-C (SIGINT); training acts on it at the next step
    boundary. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signal == signal.SIGINT:
                os.write(2, b"second Ctrl-C: aborting without saving\n")
                os._exit(EXIT_INTERRUPTED)
            os.write(2, b"Ctrl-C: saving a checkpoint after this step (Ctrl-C again aborts)\n")
        self.signal = signum

    @property
    def raised(self) -> bool:
        return self.signal is not None


class Trainer:
    """One run: the engine, the data, the step loop, checkpoints and metrics."""

    def __init__(
        self,
        cfg: Config,
        world: World,
        resume: ckpt.Checkpoint | None = None,
        hooks: list[CheckpointHook] = (),
    ):
        from data.loader import build_train_loader

        self.cfg, self.world, self.hooks = cfg, world, list(hooks)
        self.run_dir, self.checkpoint_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
        resume = self._verified(resume)
        sp_size = cfg.train.sequence_parallel
        resharding = resume is not None and (
            resume.manifest["world_size"] != world.world_size
            or resume.manifest.get("sequence_parallel", 1) != sp_size
        )
        self.sequence_parallel = sequence_parallel_group(world, sp_size)
        self.model = build_model(cfg, world.world_size, world.device)
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.model.deterministic = cfg.train.deterministic
        if cfg.train.deterministic:  # PyTorch's own ops too (cuBLAS needs a fixed workspace)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.model.sequence_parallel = self.sequence_parallel
        self.engine = build_engine(
            self.model, cfg, world.world_size, world.device, load_universal=resharding
        )
        self.loader = build_train_loader(
            cfg.data, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
            seed=cfg.run.seed, sequence_parallel=sp_size,
        )  # fmt: skip
        self.step, self.tokens, self.skipped = 0, 0, 0
        self.last_loss: float | None = None  # the mean over the ranks, at the last step
        torch.manual_seed(cfg.run.seed + 1000 * world.rank)  # a resumed run restores its own
        # A checkpoint saved on a stop signal at a checkpoint step owes its hooks (evaluation).
        self.hooks_owed = False
        if resume is not None:
            self._restore(resume)
            self.hooks_owed = resume.manifest["hooks_owed"]
        self.tokens_per_step = (cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum) * (
            world.world_size // sp_size
        )
        window = self.model.blocks[0].attn.position.window
        self.flops_per_token = training_flops_per_token(self.model, cfg.data.seq_len, window)
        self.peak_tflops = peak_tflops(cfg.train.peak_tflops, world.device)

    def _verified(self, newest: ckpt.Checkpoint | None) -> ckpt.Checkpoint | None:
        """The newest checkpoint up to `newest` whose weights are finite and whose files are
        the ones saved (sha256; the ranks check a share each). When the run directory holds
        checkpoints and none of them verifies, RunDirError naming them, or, with
        train.restart_if_unverified, they are moved to RUN/unverified/ (never deleted) and the
        run starts from step 0. Collective."""
        rejected: dict[Path, str] = {}
        found = ckpt.find_checkpoints(self.checkpoint_dir, warn=False) if newest else []
        for checkpoint in reversed([c for c in found if c.step <= newest.step]):
            problem = None
            if not checkpoint.manifest["finite"]:
                problem = "its weights are not finite"
            else:
                problems: list = [None] * self.world.world_size
                mine = ckpt.verify(checkpoint, self.world.rank, self.world.world_size)
                torch.distributed.all_gather_object(problems, mine)
                problem = next((p for p in problems if p is not None), None)
            if problem is None:
                return checkpoint
            log.warning("skipping checkpoint %s: %s", checkpoint.path, problem)
            rejected[checkpoint.path] = problem
        self._set_aside_unverified(rejected)
        return None

    def _set_aside_unverified(self, rejected: dict[Path, str]) -> None:
        """No checkpoint verified (`rejected`: why, for those that were complete): stop with
        RunDirError naming every checkpoint of the run, unless train.restart_if_unverified,
        when rank 0 moves them to RUN/unverified/ (with metrics.jsonl, which the new start
        truncates, copied there). Nothing to do without checkpoints. Collective."""
        damaged = ckpt.unverified(self.checkpoint_dir, rejected)
        if not damaged:
            return
        named = "; ".join(f"{path.name} ({why})" for path, why in damaged.items())
        aside = self.run_dir / "unverified"
        if not self.cfg.train.restart_if_unverified:
            raise RunDirError(
                f"no checkpoint of {self.run_dir} can be resumed: {named}. They are kept as "
                f"they are: repair or remove them, or set train.restart_if_unverified=true to "
                f"move them to {aside} and train from step 0"
            )
        problem = None
        if self.world.is_main:
            try:
                moved = ckpt.move_aside(list(damaged), aside)
                metrics = self.run_dir / "metrics.jsonl"
                if metrics.is_file():
                    shutil.copy2(metrics, ckpt.free_path(aside, metrics.name))
                latest = self.checkpoint_dir / "latest"
                if latest.is_file() and latest.read_text().strip() in {p.name for p in damaged}:
                    latest.unlink()
                log.warning(
                    "no checkpoint of %s can be resumed (%s): moved %s to %s; training from "
                    "step 0 (train.restart_if_unverified)",
                    self.run_dir,
                    named,
                    ", ".join(p.name for p in moved),
                    aside,
                )
            except OSError as e:
                problem = f"cannot move the unverified checkpoints of {self.run_dir} aside: {e}"
        _share_problem(problem, RunDirError)

    def _restore(self, checkpoint: ckpt.Checkpoint) -> None:
        """Weights, optimizer and schedule, the data position and RNG of `checkpoint`. Saved by
        another number of ranks, it is loaded as DeepSpeed's universal checkpoint and the saved
        ranks' data positions are dealt to these ranks (data.loader.reshard); a rank that did
        not exist keeps its fresh RNG."""
        from data.loader import reshard

        rank, world_size = self.world.rank, self.world.world_size
        sp_size = self.cfg.train.sequence_parallel
        saved_world = checkpoint.manifest["world_size"]
        saved_sp = checkpoint.manifest.get("sequence_parallel", 1)
        if (saved_world, saved_sp) == (world_size, sp_size):
            ckpt.load(self.engine, checkpoint)
            state = ckpt.trainer_state(checkpoint, rank)
            loader_state, rng = state["loader"], state["rng"]
        else:
            ckpt.load_universal(self.engine, checkpoint)
            repair_universal_load(self.engine, self.cfg)
            # The ranks of a sequence-parallel group read the same data: one state per group.
            leaders = range(0, saved_world, saved_sp)
            wanted = {*leaders, rank} & set(range(saved_world))
            states = {r: ckpt.trainer_state(checkpoint, r) for r in wanted}
            loader_state = reshard(
                [states[r]["loader"] for r in leaders],
                rank // sp_size,
                world_size // sp_size,
                self.cfg.data.num_workers,
            )
            rng = states[rank]["rng"] if rank in states else None
            groups = (
                f", train.sequence_parallel {saved_sp} -> {sp_size}" if saved_sp != sp_size else ""
            )
            log.warning(
                "resumed %s, saved by %d rank(s), on %d%s: weights and optimizer through "
                "DeepSpeed's universal checkpoint; each rank serves %d of the saved job's data "
                "streams",
                checkpoint.path,
                saved_world,
                world_size,
                groups,
                len(loader_state["parts"]),
            )
        self.loader.load_state_dict(loader_state)
        if rng is not None:
            ckpt.restore_rng_state(rng)
        self.step, self.tokens = checkpoint.step, checkpoint.manifest["tokens"]
        self.skipped = checkpoint.manifest["skipped_steps"]
        log.info("resumed from %s (step %d)", checkpoint.path, self.step)

    def save(self, *, hooks_owed: bool = False) -> Path:
        """A collective checkpoint of the current step, then the older ones pruned. hooks_owed:
        the checkpoint hooks did not run; the run resumed from it runs them first."""
        manifest = {
            "tokens": self.tokens,
            "skipped_steps": self.skipped,
            "hooks_owed": hooks_owed,
            "world_size": self.world.world_size,
            "sequence_parallel": self.cfg.train.sequence_parallel,
            "config": to_yaml(self.cfg),
            "tokenizer_sha256": self.loader.tokenizer_sha256,
        }
        rank_state = {"loader": self.loader.state_dict(), "rng": ckpt.rng_state()}
        path = ckpt.save(
            self.engine,
            self.checkpoint_dir,
            step=self.step,
            manifest=manifest,
            rank_state=rank_state,
        )
        if self.world.is_main:
            ckpt.prune(self.checkpoint_dir, self.cfg.train.keep_checkpoints)
        return path

    def _run_hooks(self, metrics: MetricsLogger | None) -> None:
        """The checkpoint hooks of the current step; their scalars go to the metrics."""
        results = {}
        # The hooks (evaluation) run whole sequences on every rank.
        self.model.sequence_parallel = None
        try:
            for hook in self.hooks:
                results.update(hook(self, self.step))
        finally:
            self.model.sequence_parallel = self.sequence_parallel
        if metrics is not None and results:
            metrics.log({"step": self.step, **results})

    def _train_step(self, batches) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches."""
        lr, losses, waited, documents = self.engine.get_lr()[0], [], 0.0, 0
        for _ in range(self.cfg.train.grad_accum):
            start = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - start
            loss = self._loss(batch)
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.item())
            documents += batch["documents"]
        return StepResult(
            sum(losses) / len(losses),
            self.engine.was_step_applied(),
            waited,
            lr,
            documents / len(losses),
        )

    def _loss(self, batch: dict) -> torch.Tensor:
        """The micro-batch's loss on this rank. DeepSpeed averages gradients over all ranks:
        each rank of a sequence-parallel group of N gives N x (its tokens' summed cross
        entropy) / (the group's target count), so the mean over ranks is the mean over the
        data-parallel groups of each group's token mean, as one rank holding the sequence."""
        device, doc_ids = self.world.device, batch["doc_ids"]
        total, count = self.engine(
            batch["tokens"].to(device),
            None if doc_ids is None else doc_ids.to(device),
            targets=batch["targets"].to(device),
        )
        sp = self.sequence_parallel
        if sp is None:
            return total / count
        torch.distributed.all_reduce(count, group=sp.group)
        return total * sp.size / count

    def _record(self, interval: Interval, lr: float, step_start: float) -> dict:
        """The metrics.jsonl record of the current step, over the interval since the last."""
        summary = interval.summary()
        peak = self.peak_tflops[0]
        achieved = summary["tokens_per_s"] / self.world.world_size * self.flops_per_token
        return {
            "step": self.step,
            "tokens": self.tokens,
            **summary,
            "lr": lr,
            "grad_norm": float(self.engine.get_global_grad_norm()),
            "mfu": None if peak is None else achieved / (peak * 1e12),
            "step_time": time.perf_counter() - step_start,
            "memory_gb": memory_gb(self.world.device),
            "skipped_steps": self.skipped,
        }

    def run(self, stop: StopFlag, metrics: MetricsLogger | None) -> int:
        """Train to `train.max_steps`, rank 0 logging to `metrics`; returns the exit code."""
        cfg, world = self.cfg, self.world
        if world.is_main:
            peak, source = self.peak_tflops
            log.info("MFU against %s TFLOP/s per device (%s)", peak and f"{peak:.3g}", source)
        profiler = StepProfiler(
            cfg.train.profile, self.run_dir / "profile", world.rank, world.device
        )
        batches, interval, bad_in_row = iter(self.loader), Interval(), 0
        try:
            if self.hooks_owed:
                log.info("running the hooks of step %d, deferred by a stop signal", self.step)
                self._run_hooks(metrics)
            while self.step < cfg.train.max_steps:
                step_start = time.perf_counter()
                profiler.before(self.step + 1)
                result = self._train_step(batches)
                profiler.after(self.step + 1)
                # One collective per step: the mean loss, and whether any rank skipped or
                # was signalled (by Ctrl-C), so that every rank takes the same decision.
                flags = [not result.applied, stop.raised, stop.signal == signal.SIGINT]
                loss, skipped, signalled, interrupted = mean_over_ranks(
                    [result.loss, *map(float, flags)], world.device
                )
                self.step += 1
                self.tokens += self.tokens_per_step
                self.last_loss = loss
                good = skipped == 0 and math.isfinite(loss)
                interval.add(loss, good, result.data_wait, self.tokens_per_step, result.documents)
                bad_in_row = 0 if good else bad_in_row + 1
                if not good:
                    self.skipped += 1
                    log.warning("step %d: non-finite loss or gradient, skipped", self.step)
                if bad_in_row >= cfg.train.max_bad_steps:
                    good = ckpt.last_good(self.checkpoint_dir)
                    log.error(
                        "%d non-finite steps in a row: stopping. The last good checkpoint is %s; "
                        "restart from it with a lower train.lr or a smaller train.grad_clip.",
                        bad_in_row,
                        good.path if good else "none (no checkpoint with finite weights)",
                    )
                    return EXIT_DIVERGED
                last = self.step == cfg.train.max_steps
                if metrics is not None:
                    metrics.advance(1, loss, result.lr)
                    if self.step % cfg.train.log_every == 0 or last:
                        metrics.log(self._record(interval, result.lr, step_start))
                        interval = Interval()
                checkpoint_step = self.step % cfg.train.checkpoint_every == 0 or last
                if signalled:  # no time for the hooks: the resumed run owes them
                    path = self.save(hooks_owed=checkpoint_step and bool(self.hooks))
                    if interrupted:
                        log.warning("Ctrl-C: saved %s; run again to resume", path)
                        return EXIT_INTERRUPTED
                    log.warning(
                        "stop signal: saved %s; exit %d asks for a requeue", path, EXIT_REQUEUE
                    )
                    return EXIT_REQUEUE
                if checkpoint_step:
                    self.save()
                    self._run_hooks(metrics)
            return EXIT_OK
        finally:
            profiler.close()
            self.loader.close()


def _share_problem(problem: str | None, error: type[Exception]) -> None:
    """Collective: raise `error` on every rank if rank 0 had a problem."""
    shared = [problem]
    torch.distributed.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise error(shared[0])


def lock_run_dir(run_dir: Path, world: World) -> RunLock | None:
    """Collective: rank 0 locks the run directory and checks that checkpoints/ is writable;
    RunDirError on every rank if it could not. Rank 0's lock, None on the others."""
    lock = problem = None
    if world.is_main:
        try:
            lock = RunLock.acquire(run_dir)
            probe_writable(run_dir / "checkpoints")
        except RunDirError as e:
            if lock is not None:
                lock.release()
            problem = str(e)
    _share_problem(problem, RunDirError)
    return lock


def open_metrics(cfg: Config, start_step: int, world: World) -> MetricsLogger | None:
    """Collective: rank 0's MetricsLogger; ConfigError on every rank if a tracker could not
    start (W&B not logged in, an MLflow URI that does not answer)."""
    metrics = problem = None
    if world.is_main:
        try:
            metrics = MetricsLogger(
                cfg.run_dir,
                yaml.safe_load(to_yaml(cfg)),
                loggers=cfg.train.loggers,
                project=cfg.train.tracker_project,
                start_step=start_step,
                max_steps=cfg.train.max_steps,
            )
        except Exception as e:  # the trackers' own errors, whatever their types
            problem = f"train.loggers: {type(e).__name__}: {str(e).splitlines()[0]}"
    _share_problem(problem, ConfigError)
    return metrics
