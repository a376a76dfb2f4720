"""The training loop: AdamW, warmup + schedule, accumulation, clipping, evaluation, checkpoints.

The loop knows the method only through its hooks (``lorakit.methods.base.Method``). Batches are
drawn in a seeded order that depends only on (seed, epoch), so a resumed run sees exactly the batches
the uninterrupted run would have seen, and with the restored RNG state gives the same losses.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

from lorakit.config import recipe_to_dict
from lorakit.data.batches import MicroBatches, iterate_batches, shared_batches
from lorakit.device import synchronize
from lorakit.evaluate import evaluate_model
from lorakit.fast import accelerate, resolve_cross_entropy
from lorakit.fast.kernels import compile_mode, decoder_layers
from lorakit.faults import kill_point
from lorakit.loss import batch_loss, count_loss_items
from lorakit.output import progress_for
from lorakit.precision import recipe_precision
from lorakit.storage import checkpoint as ckpt, trainer_state as tstate
from lorakit.storage.peft import write_peft_folder
from lorakit.train.context import TrainContext
from lorakit.train.interrupt import StopSignals, Stopped
from lorakit.train import distributed as dist_, keep
from lorakit.train.optim import build_optimizer, build_scheduler, optimizer_name
from lorakit.train.stats import StepStats, skips_nonfinite_on_device
from lorakit.train.steplog import StepLog, count_tokens
from lorakit.world import World


CUDA_GRAPH_PAD = 64  # train.compile cudagraphs: batch widths rounded up to a multiple of this


class LossHead(nn.Module):
    """The training forward as one module call, batch → summed loss (what DDP wraps: its reducer must
    see the forward, and the chunked loss calls the backbone and the head's weight directly)."""

    def __init__(self, trainer: "Trainer"):
        super().__init__()
        self.model, self.trainer = trainer.model, [trainer]  # a list: not a submodule

    def forward(self, batch: dict) -> torch.Tensor:
        t = self.trainer[0]
        return batch_loss(self.model, batch, t.task, t.device, t.cross_entropy, t.precision,
                          new_graph_step=t.cuda_graphs).summed


class Trainer:
    """Runs one recipe's training on an adapter-carrying model."""

    def __init__(self, model, tokenizer, method, data, recipe, device: torch.device, console: Console,
                 allow_compile: bool = True, world: World | None = None):
        """``allow_compile=False`` for evaluation alone (``lorakit eval``): compiling and recording CUDA graphs
        costs more than one evaluation pass saves, so ``train.compile`` is ignored then. ``world``: the
        processes of a distributed run (:mod:`lorakit.train.distributed`; default one process); under
        FSDP the model is sharded here."""
        self.model, self.tokenizer, self.method, self.data = model, tokenizer, method, data
        self.recipe, self.device, self.console = recipe, device, console
        self.world = world = world or World()
        method.world = world  # hooks learn the world through the trainer
        self.run_dir = Path(recipe.output_dir)
        self.task = recipe.model.task
        cfg = recipe.train
        self.micro = MicroBatches(data.train, data.collate, cfg.batch_size * world.size, cfg.seed,
                                  world.rank, world.size)
        steps_per_epoch = math.ceil(self.micro.per_epoch / cfg.gradient_accumulation_steps)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
        self.steps_per_epoch = steps_per_epoch
        self.step = 0
        self.best = keep.BestTracker.from_recipe(cfg)  # best evaluation, early stopping (lorakit.train.keep)
        self.ending: dict = {}  # stopped_early / best: how the run ended, for summary.json
        self.train_seconds = 0.0  # wall time inside optimizer steps (no evaluation or saving)
        self.cross_entropy = resolve_cross_entropy(cfg.cross_entropy, device)  # lorakit.fast
        if world.mode == "fsdp":  # the chunked loss reads the head's weight outside FSDP's root forward
            self.cross_entropy = "full"
        self.precision = recipe_precision(recipe, device)  # bf16 autocast or fp32 (lorakit.precision), eval too
        # auto does not compile with activation checkpointing (train.activation_memory_budget is the
        # compiled way to save activation memory; docs/benchmarks.md)
        auto_ok = not recipe.model.gradient_checkpointing
        auto_graphs = cfg.gradient_accumulation_steps == 1 and world.mode != "fsdp"  # no CUDA graphs around FSDP's collectives
        mode = compile_mode(cfg, device, auto_ok, auto_graphs=auto_graphs) if allow_compile else None
        if world.mode == "fsdp" and mode == "reduce-overhead":
            mode = "default"
        self.levers = accelerate(model, cfg, device, mode)  # lorakit.fast
        self.cuda_graphs = mode == "reduce-overhead" and decoder_layers(model) is not None
        self.padded_to = None  # batch widths rounded up to a multiple of this (CUDA graphs)
        # called with each metrics.jsonl record / each checkpoint written (lorakit.track, lorakit.plot)
        self.on_record: list[Callable[[dict], None]] = []
        self.on_checkpoint: list[Callable[[Path], None]] = []
        if self.cuda_graphs and hasattr(data.collate, "pad_to_multiple_of"):
            data.collate.pad_to_multiple_of = self.padded_to = CUDA_GRAPH_PAD  # each new shape records new graphs
        self.engine: nn.Module | None = None  # DDP(LossHead) from train(), after the prepare hook
        if world.mode == "fsdp":
            dist_.wrap_fsdp(model, decoder_layers(model))

    # ---- pieces ---------------------------------------------------------------------------------
    def loss(self, batch: dict, num_items: int | None = None) -> torch.Tensor:
        """Loss of one batch (:func:`lorakit.loss.batch_loss`, as evaluation computes it): the sum over
        loss items divided by ``num_items`` (default: its own). Under DDP through the wrapper."""
        if self.engine is not None:
            return self.engine(batch) / (num_items or count_loss_items(batch, self.task))
        out = batch_loss(self.model, batch, self.task, self.device, self.cross_entropy, self.precision,
                         new_graph_step=self.cuda_graphs)  # a new iteration: graph outputs may be overwritten
        return out.summed / (num_items or out.items)

    def evaluate(self, rows=None, **options) -> dict:
        """Held-out metrics (:func:`lorakit.evaluate.evaluate_model`) of ``rows`` (default: the held-out set);
        on several processes each rank evaluates its share of every global eval batch, sums all-reduced."""
        bs, world = self.recipe.train.eval_batch_size or self.recipe.train.batch_size, self.world
        rows = self.data.eval if rows is None else rows

        def run_eval() -> dict:
            if world.size == 1:
                batches = iterate_batches(rows, self.data.collate, bs, seed=None)
                return evaluate_model(self.model, batches, self.task, self.device, self.cross_entropy, self.precision)
            batches = shared_batches(rows, self.data.collate, bs, world.rank, world.size)
            return evaluate_model(self.model, batches, self.task, self.device, self.cross_entropy, self.precision,
                                  reduce=world.all_reduce_sum)

        return self.method.evaluate(run_eval, **options)

    def context(self) -> TrainContext:
        return TrainContext(self.model, self.tokenizer, self.data, self.recipe, self.device,
                            self.console, self.run_dir, loss_fn=self.loss, world=self.world)

    def log(self, record: dict) -> None:
        """Append ``record`` to metrics.jsonl and hand it to ``on_record`` (rank 0 alone)."""
        if not self.world.is_main:  # rank 0 alone writes and reports
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for callback in self.on_record:
            callback(record)

    def _save(self, optimizer, scheduler) -> Path:
        """A training checkpoint, whole (FSDP shards gathered on every rank), written by rank 0 alone."""
        path = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
        tensors = ckpt.adapter_state_dict(self.model)
        state = dist_.full_optimizer_state(optimizer) if self.world.mode == "fsdp" else optimizer.state_dict()
        rank_rng = self.world.gather_rng()
        if self.world.is_main:
            ckpt.save_checkpoint(path, self.model, self.method, recipe_to_dict(self.recipe), state, scheduler,
                                 self.step, tensors=tensors, world_size=self.world.size, best=self.best.state_dict(),
                                 rank_rng=rank_rng, precision=self.precision)
            ckpt.mark_latest(self.run_dir, path)
            keep.prune(self)  # train.save_total_limit: rank 0 alone removes
        self.last_checkpoint, self.saved_step = path, self.step
        if self.world.is_main:
            for callback in self.on_checkpoint:
                callback(path)
        self.world.barrier()
        return path

    def _save_final(self) -> None:
        """``final/`` (adapter, method state, recipe) and its PEFT copy, written by rank 0 alone; under
        FSDP the whole model is gathered for the copy (``FSDPModule.unshard``)."""
        tensors = ckpt.adapter_state_dict(self.model)
        with dist_.unsharded(self.model, self.world):
            if self.world.is_main:
                ckpt.save_checkpoint(self.run_dir / "final", self.model, self.method,
                                     recipe_to_dict(self.recipe), tensors=tensors, precision=self.precision)
                self._save_peft(self.run_dir / "final" / "peft")
        self.world.barrier()

    def _save_peft(self, folder: Path) -> None:
        """A PEFT-format copy of the final adapter, when the method has a PEFT equivalent."""
        try:
            write_peft_folder(folder, self.model, self.method, self.recipe)
        except Exception as err:  # the run is saved already; a failed extra copy must not lose it
            self.console.print(f"[yellow]warning:[/] no PEFT copy in {escape(str(folder))}: {escape(str(err))}")

    def speed_summary(self) -> list[str]:
        """What this run computes with, for one line at the start of training (docs/benchmarks.md)."""
        padded = [f"batch widths padded to multiples of {self.padded_to}"] if self.padded_to else []
        loss = "cross-entropy over the class logits" if self.task == "seq_cls" else self.cross_entropy  # no LM loss
        return [f"precision {self.precision}", f"loss {loss}",
                f"optimizer {optimizer_name(self.recipe.train, self.device)}", *self.levers, *padded]

    # ---- the loop -------------------------------------------------------------------------------
    def make_optimizer(self):
        """(optimizer, scheduler) over the method's parameter groups, as ``train`` uses them."""
        cfg = self.recipe.train
        optimizer = build_optimizer(self.method.param_groups(self.model, cfg), cfg, self.device)
        scheduler = build_scheduler(optimizer, cfg.lr_scheduler, self.total_steps, int(cfg.warmup_ratio * self.total_steps))
        return optimizer, scheduler

    def optimizer_step(self, batches: list[dict], optimizer, scheduler) -> StepStats:
        """One optimizer step over the micro-batches ``batches`` (the method's hooks included); advances
        ``self.step``. Returns the step's loss and gradient norm still on the device (:class:`StepStats`;
        reading them waits for the step), so no host-device sync is needed per step.

        A non-finite loss or gradient norm never reaches the weights: torch's fused AdamW (CUDA) skips
        that update on the device (``found_inf``) and :meth:`StepStats.read` raises later; other
        optimizers are checked here, before the update. Raises LorakitError in the second case."""
        cfg, world = self.recipe.train, self.world
        self.method.before_step(self.step)
        items = sum(count_loss_items(b, self.task) for b in batches)
        tokens = sum(count_tokens(b) for b in batches)
        if world.size > 1:  # the loss is token-weighted over the whole step: every rank divides by all items
            items, tokens = (int(v) for v in world.all_reduce_sum(torch.tensor([items, tokens])).tolist())
        scale = world.size if world.mode in ("ddp", "fsdp") else 1  # DDP / FSDP average gradients over ranks
        loss_sum = None
        for k, batch in enumerate(batches):
            with dist_.gradient_sync(self.engine, self.model, world, k == len(batches) - 1):
                loss = self.loss(batch, num_items=items)
                (loss * scale if scale != 1 else loss).backward()
            if self.cuda_graphs and k == 0 and len(batches) > 1:  # the first .grad may live in a CUDA
                self._own_grads(optimizer)  # graph's pool, which the next micro-batch's replay overwrites
            loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        loss_sum = world.all_reduce_sum(loss_sum)
        grad_norm = None
        if cfg.max_grad_norm is not None:
            trainable = [p for g in optimizer.param_groups for p in g["params"]]
            clip = dist_.clip_grad_norm if world.mode == "fsdp" else torch.nn.utils.clip_grad_norm_
            grad_norm = clip(trainable, cfg.max_grad_norm)
        stats = StepStats(self.step + 1, loss_sum, grad_norm)
        stats.tokens = tokens
        if skips_nonfinite_on_device(optimizer):
            optimizer.found_inf = stats.nonfinite()
        else:
            stats.read()  # raises before the update; weights and checkpoints stay good
        stats.lr = scheduler.get_last_lr()[0]  # the lr this step uses (first group), before the schedule moves on
        optimizer.step()
        self.method.after_optimizer_step(self.step, optimizer)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return stats

    @staticmethod
    def _own_grads(optimizer) -> None:
        """Give every gradient its own memory (a copy), so later micro-batches accumulate into it."""
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad = p.grad.clone()

    def _start(self, resume_from: Path | None):
        """(optimizer, scheduler), restored from ``resume_from`` when given (``self.step`` too)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            self.method.prepare(self.context())
        if self.world.mode == "ddp":  # after prepare: LoRA-drop's selection replaces modules
            dist_.sync_adapters(self.model, self.world)
            self.engine = dist_.wrap_ddp(LossHead(self))
        self.model.train()
        optimizer, scheduler = self.make_optimizer()
        self.console.print(f"[dim]speed: {', '.join(self.speed_summary())}[/dim]")
        for line in self.method.schedule_warnings(self.total_steps):
            self.console.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True, highlight=False)
        if resume_from is not None:
            state = tstate.load(resume_from)
            dist_.load_optimizer_state(optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            tstate.restore_rng(state["rng"])  # rank 0's, on every rank; the others' own streams just below
            self.step = tstate.read_step(resume_from)
            self.best.load_state_dict(tstate.read_best(resume_from), str(resume_from / "trainer.json"))
            self.console.print(f"Resuming from {escape(str(resume_from))} at step {self.step}")
        self.last_checkpoint, self.saved_step = resume_from, self.step
        saved = state["rng"].get("ranks") if resume_from is not None else None
        self.world.decorrelate_rng(self.recipe.train.seed, self.step, saved)
        return optimizer, scheduler

    def _agree_on_stop(self, stop: StopSignals) -> bool:
        """Several processes: whether to stop after this step. A stop signal seen by any rank is taken by
        all, at the same step (one all-reduce per step), so that every rank writes the same checkpoint and
        none waits for a peer; a signal recorded after the vote waits for the next step's vote (a rank
        acting on it alone would leave the others in a collective). One process: False (the loop checks
        ``stop`` itself)."""
        if self.world.size == 1:
            return False
        votes = self.world.all_reduce_sum(torch.tensor([0 if stop.requested is None else 1]))
        if not int(votes.item()):
            return False
        if stop.requested is None:
            stop.requested = signal.SIGTERM
        return True

    def train(self, resume_from: Path | None = None, stop: StopSignals | None = None) -> dict:
        """Train to ``total_steps``; returns the final eval metrics. Writes metrics.jsonl, checkpoints.

        With ``stop`` active (:mod:`lorakit.train.interrupt`), a SIGINT/SIGTERM ends the run between two
        steps with a checkpoint of the step reached: :class:`Stopped` is raised with ``step`` and
        ``checkpoint`` (the newest checkpoint, None when nothing was saved yet) set."""
        cfg, stop = self.recipe.train, stop or StopSignals()
        if self.world.size > 1:  # a signal never cuts a collective short: the ranks agree on it after each step
            stop.hold_always()
        optimizer, scheduler = self._start(resume_from)
        accum = cfg.gradient_accumulation_steps
        progress = progress_for(self.console, self.total_steps, [  # plain lines when not on a terminal
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn()])
        pending: StepStats | None = None  # the step queued last, read after the next one is queued
        try:
            with progress:
                bar = progress.add_task("train", total=self.total_steps, completed=self.step, info="")
                log = StepLog(self, progress, bar)
                deferred = skips_nonfinite_on_device(optimizer)  # else optimizer_step has read the step already
                while self.step < self.total_steps:
                    with stop.holding():  # a signal now waits for the step to end
                        batches = [self.micro[self.step * accum + i] for i in range(accum)]
                        step_start = time.perf_counter()
                        stats = self.optimizer_step(batches, optimizer, scheduler)
                        stats.started = step_start
                        kill_point(f"step:{self.step}")
                        agreed = self._agree_on_stop(stop)
                        if pending is not None:
                            log.record(pending)
                        pending = stats
                        at_eval = bool(cfg.eval_every) and self.step % cfg.eval_every == 0 and self.step < self.total_steps
                        at_save = bool(cfg.save_every) and self.step % cfg.save_every == 0 and self.step < self.total_steps
                        stopping = agreed or (self.world.size == 1 and stop.requested is not None)
                        boundary = at_eval or at_save or self.step == self.total_steps or stopping
                        if not deferred or boundary:
                            log.record(pending)  # read now: before evaluating or saving, or nothing to wait for
                            pending = None
                        if boundary:
                            synchronize(self.device)  # train_seconds counts the queued GPU work of the steps
                        self.train_seconds += time.perf_counter() - step_start
                        if agreed or self.world.size == 1:  # several processes: only what all ranks voted for
                            stop.check()
                    stop_early = False
                    if at_eval:
                        metrics = self.evaluate()
                        self.log({"step": self.step, **metrics})
                        self.console.print(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
                        save_best, stop_early = keep.judge(self, metrics)
                        at_save = at_save or save_best or stop_early
                    if at_save:
                        with stop.holding():
                            self._save(optimizer, scheduler)
                    if stop_early:
                        break
                    if self.world.size == 1:  # several processes: only where the ranks agreed (after a step)
                        stop.check()
            return self._finish(optimizer, scheduler, stop)
        except Stopped as err:
            if not err.forced and self.step > self.saved_step:  # between steps: the state is consistent
                if pending is not None:
                    log.record(pending)
                with stop.holding():
                    self._save(optimizer, scheduler)
            err.step, err.checkpoint = self.step, self.last_checkpoint
            raise

    def _finish(self, optimizer, scheduler, stop: StopSignals) -> dict:
        """The final evaluation (it counts for the best / early-stopping state the checkpoint stores), the
        last checkpoint, the best checkpoint's adapter with ``load_best_at_end``, ``final/`` (and its PEFT copy)."""
        if self.best.last_step == self.step and self.best.last_metrics:  # evaluated at this step (stopped early)
            metrics = self.best.last_metrics
        else:
            metrics = self.evaluate()
            self.log({"step": self.step, **metrics})
            if self.best.last_step != self.step:  # not counted yet (a resumed finished run has counted it)
                keep.take(self, metrics)
        with stop.holding():
            last = self._save(optimizer, scheduler) if self.step > self.saved_step or self.last_checkpoint is None \
                else self.last_checkpoint
        metrics = keep.load_best(self, metrics)  # train.load_best_at_end
        with stop.holding():
            self._save_final()
        self.console.print(f"Saved {escape(str(last))} and {escape(str(self.run_dir / 'final'))}")
        return metrics
