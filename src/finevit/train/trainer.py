"""The one training loop for every stage: a task (train/task.py states the contract) supplies the
model, the inputs of a micro-batch, the loss, its evaluation and what a phase changes in the model;
everything else lives here.

A step: every rank reads `micro_batches_per_step` packed micro-batches from its data-parallel
shard (TP/PP peers read the same ones), the LR is set for the samples the step completes,
megatron's schedule runs forward and backward over the pipeline, DDP reduces the gradients, and
the optimizer steps unless the loss or the gradients are not finite. Decisions that all ranks must
agree on (skip the step, switch phase, stop for a requeue) come from values every rank computes
identically or from a collective.
"""

import dataclasses
import logging
import math
import os
import signal
from typing import Optional

import torch
import yaml

from finevit.checkpointing import dist as ckpt
from finevit.checkpointing.files import resolve as resolve_checkpoint
from finevit.config import Config, to_yaml
from finevit.data.loader import BadSampleBudget
from finevit.parallel.dist import collective_device, init_distributed
from finevit.parallel.groups import data_parallel_rank_and_size, init_model_parallel, solo_collection
from finevit.parallel.schedule import forward_backward
from finevit.parallel.shards import canonical_parameters, load_full_state
from finevit.train.metrics import MetricsLogger, Timers, peak_tflops, throughput
from finevit.train.optim import build_optimizer, wrap_ddp
from finevit.train.preflight import check_inputs
from finevit.train.run_lock import RunLock, RunLockError
from finevit.train.schedules import LRScheduler, phase_at, phase_summary, resolve_phases
from finevit.train.state import TrainState, collect_common, gather_objects, next_batches, restore_common
from finevit.train.step import group_settings, optimizer_step, saved_group_settings, set_frozen, set_group_settings
from finevit.train.task import task_notes

log = logging.getLogger("finevit.train")
REQUEUE_FILE = "REQUEUE"  # launch/*.slurm creates it on the pre-timeout signal


class TrainingError(RuntimeError):
    """The run cannot go on; one sentence (a checkpoint was written first when possible)."""


class Trainer:
    def __init__(self, cfg: Config, task):
        self.cfg, self.task = cfg, task
        self.run_dir = cfg.logging.run_dir
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        self.state = TrainState()
        self.timers = Timers()
        self._signalled = False
        self._saved_step = 0  # the step of the last checkpoint saved or resumed from
        # Collectives of the default backend need tensors where it lives (NCCL: the GPU).
        self._device = collective_device()
        self._lock: Optional[RunLock] = None
        self._save_hooks: dict = {}  # tests: {"_fail_after_model_save": callable}

    # ------------------------------------------------------------------ setup

    def setup(self, evaluating: bool = False) -> "Trainer":
        """Build everything and resume. `evaluating` (`finevit eval`): the run directory is only
        read (its config.yaml stays the training run's), and a checkpoint must exist."""
        cfg = self.cfg
        # Every input first (one sentence each), before any process group or model exists.
        check_inputs(cfg, self.task)
        init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
        self._lock = None if evaluating else self._own_run_dir()
        try:
            return self._build(evaluating)
        except BaseException:
            self.close()
            raise

    def _own_run_dir(self) -> Optional[RunLock]:
        """Rank 0 takes the run directory's lock; every rank stops if another job holds it."""
        lock, box = None, [None]
        if torch.distributed.get_rank() == 0:
            try:
                lock = RunLock(self.run_dir, self.cfg.checkpoint.owner_stale_s).acquire()
            except RunLockError as e:
                box = [str(e)]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0]:
            raise TrainingError(box[0])
        return lock

    def _build(self, evaluating: bool) -> "Trainer":
        cfg = self.cfg
        self.pg = init_model_parallel(cfg.parallel, cfg.precision.seed)
        self.chunks = self._build_model()
        if torch.cuda.is_available():
            self.chunks = [c.cuda() for c in self.chunks]
        self.ddp = wrap_ddp(self.chunks, cfg.parallel, self.pg)
        self.optimizer = build_optimizer(self.ddp, cfg.optimizer, cfg.parallel, self.pg,
                                         self.chunks[0].config.params_dtype, self._lr_mults(cfg.optimizer.lr_mult))
        self.scheduler = LRScheduler(self.optimizer, cfg.optimizer, cfg.schedule)
        self.phases = resolve_phases(cfg.schedule, cfg.data, self.task.towers)
        self.dp_rank, self.dp_size = data_parallel_rank_and_size(self.pg)
        self.loader = self.task.build_loader(self.dp_rank, self.dp_size)
        last_stage = self.pg.pp.rank() == self.pg.pp.size() - 1
        self.reporting = last_stage and self.pg.tp.rank() == 0 and self.dp_rank == 0
        self.metrics = MetricsLogger(self.run_dir, self.reporting, cfg.logging.tensorboard)
        if torch.distributed.get_rank() == 0 and not evaluating:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
            log.info(self.task.batch_note(self.dp_size))
            for note in task_notes(cfg):
                log.warning(note)
        self._resume(evaluating)
        self._saved_step = self.state.step  # nothing of this launch to save yet
        self._enter_phase(phase_at(self.phases, self.state.consumed_samples)[0], announce=True)
        self._old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGUSR1, signal.SIGTERM)}
        return self

    def _build_model(self) -> list:
        """This rank's chunks, initialised as the TP=1, PP=1 model would be: the same seed gives
        the same weights on every layout (megatron's own init depends on the TP/PP rank)."""
        seed = self.cfg.precision.seed
        canonical = None
        if self.pg.tp.size() > 1 or self.pg.pp.size() > 1:
            torch.manual_seed(seed)
            single = dataclasses.replace(self.cfg.parallel, tensor=1, pipeline=1, virtual_pipeline=None,
                                         sequence_parallel=False)
            full = self.task.build(solo_collection(), single)
            canonical = {n: p.detach() for c in full for n, p in canonical_parameters(c)}
        torch.manual_seed(seed)
        chunks = self.task.build(self.pg)
        if canonical is not None:
            load_full_state(chunks, canonical, self.pg.tp.rank(), self.pg.tp.size())
        return chunks

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True

    def _resume(self, evaluating: bool = False) -> None:
        """The run's own latest checkpoint, else checkpoint.load (a requeued job must not restart
        from the run's starting point), else the task's initial weights. `finevit eval` takes
        checkpoint.load first: it names what to evaluate."""
        own, given = ckpt.find_latest(self.ckpt_dir), self.cfg.checkpoint.load
        if given:
            given = resolve_checkpoint(given)  # a checkpoints or run directory: its latest
        use_given = bool(given) and (evaluating or own is None)
        path = given if use_given else own
        if path is None:
            if evaluating:
                raise TrainingError(f"there is no checkpoint in {self.ckpt_dir} to evaluate: train "
                                    "first, or name one with checkpoint.load=PATH")
            if self.task.init_weights(self.chunks, self.state):
                self.optimizer.reload_model_params()  # fp32 main copies follow the imported weights
            return
        if use_given and self.cfg.checkpoint.load_weights_only:
            common = ckpt.load_checkpoint(path, self.ddp, self.optimizer, self.pg, load_optimizer=False)
            # A new run (schedule, data and optimizer from the start) on the loaded weights, which
            # keep their trained text positions.
            self.state = TrainState(task=common["train"].get("task", {}))
            log.info("started from the weights of %s", path)
            return
        # Match the checkpoint's param groups under the settings it was saved with, then put
        # this run's settings (a changed LR or multiplier is allowed) back.
        current = group_settings(self.optimizer)
        saved = yaml.safe_load(ckpt.read_common(path).get("config", "{}")).get("optimizer", {})
        if "lr" in saved:
            mults = self._lr_mults(saved.get("lr_mult", {}))
            set_group_settings(self.optimizer, saved_group_settings(self.optimizer, saved, mults))
        common = ckpt.load_checkpoint(path, self.ddp, self.optimizer, self.pg)
        set_group_settings(self.optimizer, current)
        self.state = restore_common(common, self.scheduler, self.loader, self.pg)
        log.info("resumed from %s at step %d (%d samples, phase %d)", path, self.state.step,
                 self.state.consumed_samples, self.state.phase)

    def _lr_mults(self, configured: dict) -> dict:
        """Every tower's LR multiplier (1.0 where the config names none)."""
        return {t: configured.get(t, 1.0) for t in self.task.towers}

    def _enter_phase(self, index: int, announce: bool = False) -> None:
        phase = self.phases[index]
        if index != self.state.phase or announce:
            log.info("phase %d '%s' from %d samples: %s", index, phase.name, self.state.consumed_samples,
                     phase_summary(phase))
        self.loader.set_pixel_budget(phase.min_pixels, phase.max_pixels)
        self.loader.set_max_text_len(phase.max_text_len)
        self.task.enter_phase(phase, self.chunks, self.optimizer, self.state)
        self.state.phase = index

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainState:
        """Train to schedule.train_samples, or until a requeue is requested (checkpoint first)."""
        cfg, state = self.cfg, self.state
        pending: list[dict] = []
        first_step = state.step
        if cfg.eval.corpora and cfg.eval.at_start:
            self.evaluate()
        while state.consumed_samples < cfg.schedule.train_samples:
            index, _ = phase_at(self.phases, state.consumed_samples)
            if index != state.phase:
                self._enter_phase(index)
            pending.append(self.train_step())
            if state.step % cfg.logging.log_interval == 0:
                self._report(pending)
                pending = []
            if self._stop_requested() or state.step - first_step == cfg.schedule.stop_after_steps:
                self.save()
                log.info("stopping at step %d with a checkpoint; the next launch resumes here", state.step)
                return state
            if state.step % cfg.checkpoint.save_interval == 0:
                self.save()
            if cfg.eval.corpora and cfg.eval.interval and state.step % cfg.eval.interval == 0:
                self.evaluate()
        if pending:
            self._report(pending)
        self.save()
        if cfg.eval.corpora:
            self.evaluate()
        return state

    def train_step(self) -> dict:
        cfg, state, timers = self.cfg, self.state, self.timers
        timers.start("data")
        batches = self._read_batches()
        timers.stop("data")
        # Every count of a step is global: summed over the data-parallel replicas (TP/PP peers
        # hold the same batches, so the DP group is enough).
        counts = torch.tensor([sum(column) for column in zip(*(self.task.counts(b) for b in batches))],
                              dtype=torch.float64, device=self._device)
        torch.distributed.all_reduce(counts, group=self.pg.dp)
        images = int(counts[0])
        self.task.start_step(batches)
        lr = self.scheduler.apply(state.consumed_samples, images)
        set_frozen(self.optimizer, set(self.phases[state.phase].freeze))
        for chunk in self.ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

        timers.start("forward_backward")
        logs = forward_backward(self.ddp, [self.task.inputs(b) for b in batches], self.task.forward,
                                self.pg, seq_length=self.task.seq_length)
        timers.stop("forward_backward")
        means = self._pipeline_means(logs, ("loss", *self.task.step_metrics))
        loss = means.pop("loss")
        timers.start("optimizer")
        result = None
        if math.isfinite(loss):  # identical on all ranks: the value came from the same all-reduce
            result = optimizer_step(self.optimizer, cfg.optimizer.clip_grad, list(self.task.towers))
        timers.stop("optimizer")
        applied = result is not None and result.applied
        state.step += 1
        state.consumed_samples += images
        state.bad_in_a_row = 0 if applied else state.bad_in_a_row + 1
        if not applied:
            state.skipped_steps += 1
            log.warning("step %d skipped: loss %s, grad norm %s", state.step, loss,
                        None if result is None else result.grad_norm)
            if state.bad_in_a_row >= cfg.schedule.max_bad_steps_in_a_row:
                self.save()
                raise TrainingError(
                    f"{state.bad_in_a_row} steps in a row had a non-finite loss or gradient norm "
                    f"(last at step {state.step}); stopped with a checkpoint in {self.ckpt_dir}: lower "
                    "optimizer.lr, check the data, or resume from an earlier checkpoint")
        return {"loss": loss, "lr": lr, "images": images, "tokens": int(counts[1]),
                "slots": int(counts[2]), "flops": float(counts[3]),
                "grad_norm": result.grad_norm if result else float("nan"),
                "tower_norms": result.tower_norms if result else {},
                **{self.task.step_metrics[k]: v for k, v in means.items()}}

    def _read_batches(self) -> list:
        """The step's micro-batches. When any rank's loader ran out of its bad-sample budget, every
        rank stops (the others would wait in this step's collectives): a checkpoint first if this
        launch trained since the last one, then TrainingError with the reasons."""
        error = None
        try:
            batches = next_batches(self.loader, self.cfg.schedule.micro_batches_per_step, self.pg.tp)
        except BadSampleBudget as e:
            error, batches = str(e), None
        flag = torch.tensor([float(error is not None)], device=self._device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return batches
        errors = [e for e in gather_objects(error) if e]
        saved = ""
        if self.state.step != self._saved_step:
            self.save()
            saved = f"; stopped with a checkpoint of step {self.state.step} in {self.ckpt_dir}"
        more = f" (and on {len(errors) - 1} more ranks)" if len(errors) > 1 else ""
        raise TrainingError(f"data: {errors[0]}{more}{saved}")

    def _pipeline_means(self, logs: list[dict], keys: tuple) -> dict[str, float]:
        """Means of logged values over the micro-batches, from the last stage to every rank."""
        values = torch.zeros(len(keys), dtype=torch.float64)
        if logs:
            values += torch.tensor([sum(float(d[k]) for d in logs) / len(logs) for k in keys], dtype=torch.float64)
        values = values.to(self._device)
        torch.distributed.all_reduce(values, group=self.pg.pp)  # only the last stage is non-zero
        return dict(zip(keys, values.tolist()))

    def _stop_requested(self) -> bool:
        stop = self._signalled or os.path.exists(os.path.join(self.run_dir, REQUEUE_FILE))
        lost = self._lock is not None and self._lock.lost is not None
        flags = torch.tensor([float(stop), float(lost)], device=self._device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[1].item():  # another job took the run directory over: write nothing more
            raise TrainingError(f"this job no longer owns {self.run_dir} and stops without a checkpoint: "
                                f"{self._lock.lost if lost else 'rank 0 lost its lock'}")
        return bool(flags[0].item())

    # ------------------------------------------------------------------ reporting, saving

    def _report(self, steps: list[dict]) -> None:
        times = self.timers.pop()
        gpus = self.dp_size * self.pg.tp.size() * self.pg.pp.size()
        metrics = {"loss": steps[-1]["loss"], "lr": steps[-1]["lr"], "grad_norm": steps[-1]["grad_norm"],
                   **{f"grad_norm_{t}": n for t, n in steps[-1]["tower_norms"].items()},
                   **throughput(steps, sum(times.values()), gpus, peak_tflops()),
                   **{name: sum(s[name] for s in steps) / len(steps) for name in self.task.step_metrics.values()},
                   **{f"{name}_per_s": sum(s[name] for s in steps) / sum(times.values()) for name in self.task.step_rates},
                   "samples": self.state.consumed_samples, "phase": self.state.phase,
                   "skipped_steps": self.state.skipped_steps,
                   **{f"time_{k}_s": v / len(steps) for k, v in times.items()}}
        if self.reporting:
            metrics.update(self.task.extra_metrics(self.chunks))
        self.metrics.log(self.state.step, metrics)

    def save(self) -> None:
        extra = {"phase": phase_summary(self.phases[self.state.phase]), "config": to_yaml(self.cfg)}
        common = collect_common(self.state, self.scheduler, self.loader, self.dp_rank, extra,
                                reads=self.pg.tp.rank() == 0)
        ckpt.save_checkpoint(self.ckpt_dir, self.state.step, self.ddp, self.optimizer, common, self.pg,
                             optimizer_format=self.cfg.checkpoint.optimizer_format,
                             keep_last=self.cfg.checkpoint.keep_last,
                             rank_state={"rng": ckpt.rng_state()},
                             may_commit=self._lock.owned if self._lock is not None else None, **self._save_hooks)
        self._saved_step = self.state.step

    def evaluate(self) -> Optional[dict]:
        result = self.task.evaluate(self.ddp, self.pg, self.phases[self.state.phase], step=self.state.step)
        if result is not None:
            self.metrics.log(self.state.step, result, prefix="eval")
        return result

    def close(self) -> None:
        for part in ("loader", "metrics"):
            if hasattr(self, part):
                getattr(self, part).close()
        for sig, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, handler)
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None
