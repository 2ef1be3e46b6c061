"""`deit-pipe train`: the DeiT student under DeepSpeed ZeRO, reading shards and cached teacher targets.

Each rank walks its part of the epoch's view schedule (data.schedule): loader workers rebuild the mixed
views from the image shards and join them with the teacher store's rows by (idx, v); the student's
targets come from the replay record (labels, partner, lambda) and the stored top-k, never from a
model, except in the explicit online-teacher mode kept for comparison. Every rank runs the same
number of steps.

Checkpoints (distributed.checkpoint) go to `<output>/checkpoints/`. `--resume` continues:
- on the same world size at exactly (epoch, step): the same batches, the same drop-path draws (seeded
  per step) and the same lr, so a killed fp32 run ends with the parameters of an unbroken one;
- on another world size at the step of the new world's plan that consumed as many of the epoch's samples;
  the lr follows the epoch progress. The new plan deals the epoch's shards to ranks differently, so the
  rest of that epoch is an equivalent position, not the same batches.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
from timm.models import split_model_name_tag
from tqdm import tqdm

from deit_pipe.choices import Distillation, Precision, SoftReduction, check
from deit_pipe.data.mixing import mixed_targets
from deit_pipe.data.recipe import ViewRecipe
from deit_pipe.data.rng import torch_seed
from deit_pipe.data.schedule import EpochPlan, check_pairing, teams, views_needed
from deit_pipe.data.view_dataset import TrainViews
from deit_pipe.data.views import ViewBatch, ViewMaker
from deit_pipe.distributed import deepspeed_engine
from deit_pipe.distributed.checkpoint import Checkpoints
from deit_pipe.distributed.context import RankContext, loader_workers
from deit_pipe.distributed.deepspeed_engine import EngineSpec, param_digest
from deit_pipe.distributed.team_exchange import TeamExchange
from deit_pipe.errors import EnvironmentFault, InputError
from deit_pipe.loss.deit import DistillationLoss
from deit_pipe.loss.teacher_targets import CachedTeacher, LogitCode, OnlineTeacher, StoreEntry, served_kl
from deit_pipe.models.export import exported_model, read_weights
from deit_pipe.models.precision import teacher_on
from deit_pipe.models.registry import (
    architecture_args,
    check_architecture,
    create_student,
    create_teacher,
    is_distilled,
    is_vit,
    load_weights,
    set_distilled_training,
)
from deit_pipe.optim.schedule import LRSchedule, adamw
from deit_pipe.reporting import metrics
from deit_pipe.reporting.metrics import Evaluation
from deit_pipe.reporting.run_records import RunRecords
from deit_pipe.stages.verify_store import open_bound_store
from deit_pipe.storage.lease import launch_lease
from deit_pipe.storage.location import check_writable, exists, is_local
from deit_pipe.storage.manifest import ShardManifest, manifest_url
from deit_pipe.storage.teacher_store import TeacherStore


@dataclass(frozen=True)
class StudentSpec:
    name: str = "deit_tiny_distilled_patch16_224"
    patch_size: int | None = None
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.1

    def with_architecture_of(self, metadata: dict[str, str]) -> StudentSpec:
        """The overrides not given taken from --init weights of the same architecture (a deit-pipe export records
        them), so a fine-tune names only what changes (--img-size)."""
        if exported_model(metadata)[0] != split_model_name_tag(self.name)[0]:
            return self
        args = architecture_args(metadata)
        given = {k: args[k] for k in ("patch_size", "depth", "embed_dim", "num_heads")
                 if getattr(self, k) is None and k in args}
        return replace(self, **given)


@dataclass(frozen=True)
class TrainConfig:
    shards: str
    output: str
    store: str | None = None  # cached teacher targets; required for soft/hard unless teacher_online
    student: StudentSpec = field(default_factory=StudentSpec)
    init: str | None = None  # weights the student starts from (a fine-tune, a transfer); a resume ignores them
    new_head: bool = False  # the --init weights' classifiers are dropped even for as many classes (a transfer)
    distillation: str = "hard"  # none | soft | hard
    alpha: float = 0.5
    tau: float = 1.0
    max_target_kl: float = 0.05  # soft targets from a store must rebuild the teacher within this mean KL at tau
    soft_reduction: str = "sum_numel"
    teacher_online: str | None = None
    teacher_weights: str | None = None
    teacher_precision: str | None = None  # the online teacher's bf16 | fp32; None: the student's precision
    epochs: int = 300
    repeats: int = 3
    seed: int = 0
    img_size: int | None = None  # the view size when no store gives the recipe (default 224)
    recipe_overrides: dict = field(default_factory=dict)  # other ViewRecipe fields, same rule as img_size
    engine: EngineSpec = field(default_factory=EngineSpec)
    schedule: LRSchedule = field(default_factory=LRSchedule)
    weight_decay: float = 0.05
    workers: int | None = None  # loader processes per rank; None: the node's cores per local rank, less one
    checkpoint_every: int = 0  # steps; 0 = at epoch ends only
    keep_checkpoints: int = 2  # the newest K kept on disk; 0 = all
    resume: bool = False
    allow_view_reuse: bool = False
    exchange: bool = False  # each RA team member decodes a share of a step's samples; views travel by all_to_all
    max_steps: int = 0  # stop (with a checkpoint) after this many steps in total; 0 = run all epochs

    def __post_init__(self):
        # The closed choices as plain strings (they reach messages, results.json and the loss registry).
        object.__setattr__(self, "distillation", check(Distillation, self.distillation, "--distillation"))
        object.__setattr__(self, "soft_reduction", check(SoftReduction, self.soft_reduction, "--soft-reduction"))
        if self.teacher_precision is not None:
            object.__setattr__(self, "teacher_precision",
                               check(Precision, self.teacher_precision, "--teacher-precision"))


def check_config(cfg: TrainConfig, world_size: int,
                 init: tuple | None = None) -> tuple[ViewRecipe, TeacherStore | None]:
    """(view recipe, the teacher store or None) after refusing bad input; cheap, so a launcher runs it before
    starting any rank and each rank runs it again. `init`: `read_weights(cfg.init)` when the caller has it."""
    cfg.engine.config()  # refuses a bad --zero, --precision or --ds-config
    if cfg.init:
        init = init or read_weights(cfg.init)
        check_architecture(init[1], cfg.student.name, cfg.init, "--init weights")
    manifest = ShardManifest.load(cfg.shards, "train")
    if cfg.repeats < 1:
        raise InputError(f"--repeats must be at least 1, not {cfg.repeats}")
    if cfg.exchange and cfg.engine.micro_batch < cfg.repeats:
        # A team's step then holds fewer samples than it has members: one would make nothing.
        raise InputError(f"--exchange needs --batch-size {cfg.engine.micro_batch} of at least --repeats "
                         f"{cfg.repeats} (each rank of a team makes every copy of at least one sample a step)")
    # The epochs of a group differ by at most R views; the smallest decides.
    plan = min((epoch_plan(cfg, manifest, world_size, e) for e in range(cfg.repeats)), key=lambda p: p.steps)
    if plan.steps == 0:
        raise InputError(
            f"epoch {plan.epoch} holds {plan.num_elements} views, fewer than one optimizer step of "
            f"{world_size} ranks x --batch-size {cfg.engine.micro_batch} x --grad-accum {cfg.engine.grad_accum}: "
            f"use a smaller batch"
        )
    if not is_local(cfg.output):
        raise InputError(f"--output {cfg.output} must be a local or shared-filesystem path (DeepSpeed checkpoints)")
    check_writable(cfg.output)
    if not cfg.resume and exists(os.path.join(cfg.output, "checkpoints", "latest")):
        raise InputError(f"--output {cfg.output} holds an earlier run's checkpoints: pass --resume to continue it, "
                         f"or use another --output")
    accum = cfg.engine.grad_accum
    for flag, steps in (("--checkpoint-every", cfg.checkpoint_every), ("--max-steps", cfg.max_steps)):
        if steps % accum:
            raise InputError(f"{flag} {steps} must be a multiple of --grad-accum {accum} (whole optimizer steps)")
    if cfg.keep_checkpoints < 0:
        raise InputError(f"--keep-checkpoints must be 0 (all) or more, not {cfg.keep_checkpoints}")
    if cfg.teacher_online and cfg.distillation == "none":
        raise InputError("--teacher-online needs --distillation soft or hard")
    if cfg.tau != 1.0 and cfg.distillation == "hard":
        raise InputError("--tau only applies to soft distillation")
    if cfg.distillation == "none" or cfg.teacher_online:
        if cfg.store:
            raise InputError("--logits is for cached distillation; "
                             "drop it with --distillation none or --teacher-online")
        recipe = ViewRecipe(img_size=cfg.img_size or 224, seed=cfg.seed).with_overrides(cfg.recipe_overrides)
        check_pairing(cfg.repeats, recipe.pairing_views)
        return recipe, None
    if not cfg.store:
        raise InputError(f"--distillation {cfg.distillation} needs --logits STORE (or --teacher-online NAME)")
    _, store, recipe = open_bound_store(cfg.shards, cfg.store, "train")
    if cfg.img_size is not None and cfg.img_size != recipe.img_size:
        raise InputError(f"--img-size {cfg.img_size} conflicts with the store's recipe (img_size {recipe.img_size})")
    recipe.refuse_conflicts(cfg.recipe_overrides, "--recipe", "the store's recipe")
    check_pairing(cfg.repeats, recipe.pairing_views)
    needed = views_needed(cfg.epochs, cfg.repeats)
    if needed > store.num_views and not cfg.allow_view_reuse:
        raise InputError(f"{cfg.epochs} epochs with --repeats {cfg.repeats} need {needed} views; the store has "
                         f"{store.num_views} (run `deit-pipe teacher-logits --views {needed}` "
                         f"or pass --allow-view-reuse)")
    if cfg.distillation == "soft":
        served_kl(store.attrs["code_error"], cfg.tau, cfg.max_target_kl)
    return recipe, store


def epoch_plan(cfg: TrainConfig, manifest: ShardManifest, world_size: int, epoch: int) -> EpochPlan:
    return EpochPlan(manifest.num_samples, epoch, cfg.repeats, world_size, cfg.engine.micro_batch,
                     cfg.engine.grad_accum)


@dataclass(frozen=True)
class CheckedConfig:
    """A config that passed `check_config`, with what the check read: each rank reads its inputs once."""

    cfg: TrainConfig
    init: tuple | None  # read_weights(cfg.init)
    recipe: ViewRecipe
    store: TeacherStore | None

    @classmethod
    def of(cls, cfg: TrainConfig, world_size: int) -> CheckedConfig:
        init = read_weights(cfg.init) if cfg.init else None
        return cls(cfg, init, *check_config(cfg, world_size, init))


class StudentRun:
    """One training run's components, each with one job, built once from the config on every rank."""

    def __init__(self, checked: CheckedConfig):
        cfg = self.cfg = checked.cfg
        self.ctx = RankContext.from_env()
        self.init, self.recipe, store = checked.init, checked.recipe, checked.store
        self.device = deepspeed_engine.select_accelerator(self.ctx)
        deepspeed_engine.init_distributed(self.device)
        manifest = ShardManifest.load(cfg.shards, "train")
        self.num_classes = len(manifest.classes)
        self.init_sha256 = self.init[2] if self.init else None
        self.student = cfg.student.with_architecture_of(self.init[1] if self.init else {})
        self.workers = cfg.workers if cfg.workers is not None else loader_workers(self.ctx)
        self.data = TrainViews(cfg.shards, manifest,
                               ViewMaker.for_store(self.recipe, "train", store.attrs if store else None),
                               partial(epoch_plan, cfg, manifest, self.ctx.world_size), self.ctx.rank, cfg.seed,
                               cfg.store if store else None, store.num_views if store else None,
                               cfg.allow_view_reuse, self.workers, pin_memory=self.device.type == "cuda",
                               exchange=cfg.exchange)
        ra_teams = teams(self.ctx.world_size, cfg.repeats)
        # Teams of one rank (a world of 1, R = 1) have nothing to exchange.
        self.exchange = (TeamExchange(ra_teams, self.ctx.rank) if cfg.exchange and max(map(len, ra_teams)) > 1
                         else None)
        self.teacher = self._teacher(store)
        # What soft targets from the store cost: the mean KL to the teacher's own distribution at our tau.
        self.target_kl = (served_kl(store.attrs["code_error"], cfg.tau, cfg.max_target_kl)
                          if store and cfg.distillation == "soft" else None)
        self.criterion = DistillationLoss(cfg.distillation, cfg.alpha, cfg.tau, cfg.soft_reduction)
        self.samples_per_step = cfg.engine.micro_batch * self.ctx.world_size
        self.checkpoints = Checkpoints(cfg.output, self.ctx, self.samples_per_step, cfg.keep_checkpoints)
        self.checkpoints.check_shared()
        self.resume = self.checkpoints.resume(cfg.engine.zero, cfg.engine.precision) if cfg.resume else None
        self.engine = self._engine()
        self.dtype = deepspeed_engine.input_dtype(self.engine)
        self.lr_scheduler = cfg.schedule.scheduler(self.engine.optimizer)
        self.evaluation = self._evaluation()
        self.records = RunRecords(cfg.output, self.ctx, _jsonable(asdict(cfg)))

    def build_student(self) -> torch.nn.Module:
        s = self.student
        # A ViT student is built for the recipe's view size; convnets take any size.
        img_size = self.recipe.img_size if is_vit(s.name) else None
        return create_student(s.name, self.num_classes, img_size=img_size, patch_size=s.patch_size, depth=s.depth,
                              embed_dim=s.embed_dim, num_heads=s.num_heads, drop_path_rate=s.drop_path)

    def _teacher(self, store: TeacherStore | None) -> CachedTeacher | OnlineTeacher | None:
        cfg = self.cfg
        if cfg.distillation == "none":
            return None
        if not cfg.teacher_online:
            return CachedTeacher(LogitCode.of_store(store), cfg.tau, self.device)
        model, _ = create_teacher(cfg.teacher_online, self.num_classes, cfg.teacher_weights,
                                  img_size=self.recipe.img_size)
        return OnlineTeacher(teacher_on(model, self.device), cfg.tau, cfg.teacher_precision or cfg.engine.precision)

    def _engine(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial student on every rank and in every run of this config
        model = self.build_student()
        if self.init is not None and self.resume is None:
            loaded = load_weights(model, cfg.init, "--init weights", fresh_heads=True, new_heads=cfg.new_head,
                                  resample=True, read=self.init)
            if self.ctx.is_main:
                for line in loaded.notes(cfg.init, self.num_classes):
                    print(line, flush=True)
        self.init = None  # the weights are in the model now (or in the checkpoint a resume loads)
        if cfg.distillation != "none" or is_distilled(model):
            # Distilled training mode returns both heads; with loss "none" both learn from the labels.
            set_distilled_training(model, True)
        optimizer = adamw(model, cfg.schedule.peak(self.samples_per_step * cfg.engine.grad_accum), cfg.weight_decay)
        universal = self.resume is not None and self.resume.universal
        return deepspeed_engine.initialize(model, optimizer, cfg.engine.config(load_universal=universal))

    def _evaluation(self) -> Evaluation | None:
        cfg = self.cfg
        if not exists(manifest_url(cfg.shards, "val")):
            return None
        return Evaluation(cfg.shards, ShardManifest.load(cfg.shards, "val"), self.ctx, self.recipe.eval_transform(),
                          cfg.engine.micro_batch, self.workers, is_distilled(self.engine.module), self.device)

    def own_views(self, made: ViewBatch, stored: StoreEntry | None, epoch: int,
                  step: int) -> tuple[ViewBatch, StoreEntry | None]:
        """This rank's micro batch (and store rows) from what its loader made: as made, or with the exchange, what
        the team's members made for it."""
        if self.exchange is None:
            return made, stored
        return self.exchange.own(made, stored, self.data.plans(epoch).routes(self.ctx.rank, step), self.device)

    def train_step(self, batch: ViewBatch, stored: StoreEntry | None, epoch: int, step: int,
                   steps: int) -> torch.Tensor:
        """One step; returns the loss still on the device (reading it would wait for the GPU every step)."""
        cfg = self.cfg
        # Stochastic depth draws from torch's global generator: seed it from (seed, epoch, step, rank) so a
        # resumed run draws what the unbroken run drew.
        torch.manual_seed(torch_seed("step", cfg.seed, epoch, step, self.ctx.rank))
        self.lr_scheduler.step(cfg.schedule.position(epoch, step, steps))
        images = batch.images.to(self.device, non_blocking=True)
        targets = mixed_targets(batch.label, batch.partner_label, batch.lam, self.num_classes, self.recipe.smoothing)
        teacher = self.teacher(images, stored) if self.teacher else None
        outputs = self.engine(images.to(self.dtype))
        outputs = tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()
        loss = self.criterion(outputs, targets.to(self.device), teacher)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def end_epoch(self, epoch: int, total_steps: int, losses: list[torch.Tensor], seconds: float) -> None:
        """The epoch's row: the mean loss over every rank's steps (a resumed epoch: the steps after the resume; None
        when the resume was at its end), and the val accuracy."""
        scores = self.evaluation(self.engine, self.cfg.engine.zero) if self.evaluation else {}
        self.records.epoch({"epoch": epoch, "steps": total_steps,
                            "train_loss": metrics.mean_over_ranks(losses, self.device),
                            "images_per_s": len(losses) * self.samples_per_step / max(seconds, 1e-9), **scores})

    def close(self) -> None:
        """Stop the loaders' worker processes."""
        self.data.close()
        if self.evaluation:
            self.evaluation.close()

    def finish(self, total_steps: int, seconds: float, images: int, completed: bool) -> dict:
        """Each rank's final state; when the run completed, the exported student, the plot and results.json."""
        cfg = self.cfg
        self.records.close()
        self.records.rank_state({"rank": self.ctx.rank, "world_size": self.ctx.world_size, "total_steps": total_steps,
                                 "param_sha256": param_digest(self.engine, cfg.engine.zero)})
        result = {"completed": completed, "total_steps": total_steps, "wall_s": seconds,
                  "teacher_target_kl": self.target_kl, "images_per_s": images / max(seconds, 1e-9),
                  "init_sha256": self.init_sha256}
        if not completed:
            return result
        self.checkpoints.export(self.engine, cfg.engine.zero, self.build_student,
                                os.path.join(cfg.output, "student.safetensors"))
        return self.records.finish(result, title=cfg.student.name)


def run(cfg: TrainConfig) -> dict:
    ctx = RankContext.from_env()
    try:
        checked = CheckedConfig.of(cfg, ctx.world_size)  # bad input is refused before anything is written
        # One launch at a time trains into --output: a double-submitted job refuses here, before it writes.
        with launch_lease(cfg.output, f"the run {cfg.output}", ctx.is_main, ctx.launch):
            r = StudentRun(checked)
            try:
                return _train(r)
            finally:
                r.close()
    except EnvironmentFault as exc:
        if exc.rerun:  # a rerun without --resume is refused once a checkpoint exists; with it, none is needed
            exc.rerun = "rerun with the same arguments and --resume (it continues from the last checkpoint)"
        raise


def _train(r: StudentRun) -> dict:
    cfg = r.cfg
    if r.target_kl is not None and r.ctx.is_main:
        print(f"soft targets from {cfg.store}: the rebuilt teacher is within a mean KL of {r.target_kl:.4f} nats "
              f"of the teacher at tau={cfg.tau:g} (measured when the store was made)", flush=True)
    epoch, start_step, total_steps = r.checkpoints.load(r.engine, r.resume, cfg.engine.grad_accum, r.data.steps_in)
    if start_step == r.data.steps_in(epoch):  # the checkpoint ended an epoch
        if not r.records.has_epoch(epoch, r.device):  # it died in its evaluation: evaluate it now, no step walked
            r.end_epoch(epoch, total_steps, [], 0.0)
        epoch, start_step = epoch + 1, 0
    started, images = time.time(), 0
    stop = bool(cfg.max_steps) and total_steps >= cfg.max_steps  # a resume of a run --max-steps already stopped
    # One loader pass through the run's epochs: the workers go on across epoch ends (and evaluations).
    batches = r.data.walk(epoch, start_step, epoch if stop else cfg.epochs)
    while epoch < cfg.epochs and not stop:
        steps, epoch_started, losses = r.data.steps_in(epoch), time.time(), []
        with tqdm(total=steps, initial=start_step, desc=f"epoch {epoch}", unit="img", unit_scale=r.samples_per_step,
                  disable=not r.ctx.is_main or None) as bar:
            # zip asks range first: after the epoch's last step it stops without taking the next epoch's batch
            for step, (_, made, stored) in zip(range(start_step, steps), batches, strict=False):
                batch, stored = r.own_views(made, stored, epoch, step)
                losses.append(r.train_step(batch, stored, epoch, step, steps))
                total_steps, images = total_steps + 1, images + len(batch.idx)
                logged = r.records.step(epoch, step, total_steps, losses[-1], r.engine.optimizer.param_groups[0]["lr"])
                if logged is not None:
                    bar.set_postfix(loss=f"{logged:.3f}", refresh=False)
                bar.update(1)
                stop = bool(cfg.max_steps) and total_steps >= cfg.max_steps
                if stop or step + 1 == steps or (cfg.checkpoint_every and total_steps % cfg.checkpoint_every == 0):
                    r.records.flush()  # the step log reaches the checkpoint, so a resume neither skips nor repeats
                    r.checkpoints.save(r.engine, epoch, step + 1, total_steps)
                if stop:
                    break
        walked = start_step + len(losses)
        if walked == steps:  # the epoch's end, also when --max-steps stops the run there
            r.end_epoch(epoch, total_steps, losses, time.time() - epoch_started)
            epoch, start_step = epoch + 1, 0
        if stop:
            break
        if walked < steps:  # the pass ran out inside an epoch: a loader bug, not to loop on
            raise RuntimeError(f"the loader's pass ended at step {walked} of epoch {epoch}'s {steps}")
    return r.finish(total_steps, time.time() - started, images, completed=epoch >= cfg.epochs)


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))
