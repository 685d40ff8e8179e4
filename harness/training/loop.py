"""The training loop every trainer plugin shares: :class:`TrainingLoop`, the base of ``Trainer``.

The base class owns everything else, once for all trainers: accelerate (devices, processes, mixed precision,
gradient accumulation), the data order, AdamW and the learning-rate schedule, gradient clipping, atomic
and resumable checkpoints, ``train_log.jsonl``, ``config.json``, validation grids and the experiment trackers
of ``--report_to`` (accelerate's: loss, learning rate, seconds per step, validation grids and the config,
under ``RUN/trackers``). Only the main process writes files, and it holds the run folder's lock for the whole run;
``--overwrite`` moves an earlier run aside and deletes it only once the new run is about to take its first step.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch

from harness.errors import HarnessError
from harness.records import files
from harness.records.environment import environment
from harness.records.rundir import Replacement, RunFolder
from harness.records.training_run import CONFIG_FILE, LOG_FILE, TRACKERS_FOLDER, VALIDATION_FOLDER, logged_step
from harness.reporting import grids
from harness.training import checkpoints, trackers
from harness.training.checkpoints import TrainingState
from harness.training.data import ImageCaptionDataset, StreamBatchSampler, find_examples
from harness.training.state import Progress, RunState, StepReport
from harness.training.trackers import TRACKER_INSTALL

if TYPE_CHECKING:
    from accelerate import Accelerator
    from PIL import Image

    from harness.training.config import TrainConfig

#: The options that name a run folder, for the line that refuses a second run in it.
RUN_FOLDER_OPTION = "--output_dir/--run_name"
# Signs of a failed CPU allocation in torch's RuntimeError (Linux and Windows wording).
CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "not enough memory")
def _cpu_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or any(sign in str(error) for sign in CPU_OUT_OF_MEMORY)



class TrainingLoop:
    """``train()`` and what it runs; the trainer plugin's own methods (``setup``, ``compute_loss``, ...) come
    from :class:`harness.training.trainer.Trainer`, which subclasses it."""

    # What the plugin's side (harness.training.trainer.Trainer) defines, declared for the type checker.
    if TYPE_CHECKING:
        name: ClassVar[str]
        weights_folder: ClassVar[str]
        config: TrainConfig
        plugin_manager: Any
        on_step: Callable[[StepReport], None]
        _notify: Callable[[str], None]
        _accelerator: Accelerator | None
        resolution: int | None
        tracker_names: list[str]
        model: torch.nn.Module

        def setup(self) -> torch.nn.Module: ...
        def prepare_data(self, dataset: torch.utils.data.Dataset[Any]) -> torch.utils.data.Dataset[Any]: ...
        def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor: ...
        def save_weights(self, folder: Path) -> None: ...
        def validation_rows(self, prompts: Sequence[str], seed: int) -> list[tuple[str, list[Image.Image]]]: ...
        def resolved_settings(self) -> dict[str, Any]: ...
        def after_optimizer_step(self) -> None: ...
        def extra_state(self) -> dict[str, torch.Tensor]: ...
        def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None: ...
        def on_step_end(self, report: StepReport) -> None: ...

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir).expanduser() / self.config.run_name

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / self.weights_folder

    @property
    def accelerator(self) -> Accelerator:
        """accelerate's Accelerator, which :meth:`train` starts."""
        if self._accelerator is None:
            raise RuntimeError("the accelerator starts in train(); it is not running yet")
        return self._accelerator

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The trained module without accelerate's wrappers: for passes that must not sync gradients."""
        return self.accelerator.unwrap_model(self.model)

    def notify(self, message: str) -> None:
        """Tell the user something once, from the main process. Before train() starts accelerate no process
        knows whether it is the main one, so every process tells it (e.g. pretrain announcing a stage)."""
        if self._accelerator is None or self._accelerator.is_main_process:
            self._notify(message)

    def train(self) -> Path:
        """Run (or resume) training to ``max_steps``; return the ``final/`` folder."""
        config = self.config
        examples = find_examples(config.dataset_name, config.data_dir, config.image_column,
                                 config.caption_column, config.max_train_samples)
        self._accelerator = self._make_accelerator()
        for line in examples.skipped:
            self.notify(f"skipped {line}")
        if config.report_to == "all" and not self.tracker_names:
            self.notify(f"--report_to all: none of {', '.join(TRACKER_INSTALL)} is installed; the run logs to "
                        f"{LOG_FILE} only.")
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32)
        with self._holding_run_folder() as replacement:
            if self.is_main:  # a final/ or checkpoint that a killed run left half replaced, settled before resuming
                files.recover_folders(self.checkpoint_dir, self.notify)
            resume_folder, resumed = self._resume_state(replacement)
            self.seed = self._shared_seed(resumed)
            run, dataset = self._build(examples)
            if resumed is not None and resume_folder is not None:  # resumed only comes from a folder
                self._restore(resumed, resume_folder, run)
            document = self._config_document(examples, resume_folder) if self.is_main else None
            # Before config.json is written: a tracker that cannot start leaves the run folder as it was.
            self._start_trackers(document, run.progress.step)
            try:
                with self._full_disk_in_one_line():
                    self._write_config(document, resume_folder, run.progress)
                    replacement.commit()  # the model loaded and the first step is next: the earlier run goes now
                    self._train_steps(run, dataset)
                    if self.is_main:
                        files.write_folder_atomic(self.checkpoint_dir / checkpoints.FINAL, self.save_weights,
                                                  notify=self.notify)
            finally:
                self._finish_trackers()
        self.accelerator.wait_for_everyone()
        return self.checkpoint_dir / checkpoints.FINAL

    @contextmanager
    def _holding_run_folder(self) -> Iterator[Replacement]:
        """The run folder, locked by the main process for the whole run (a second run into it is refused in one
        line, in every process), and the Replacement that --overwrite moves an earlier run aside with: put back
        when the new run ends before its first step, or found left there by such a run that was killed."""
        from accelerate.utils import broadcast_object_list

        folder = RunFolder(self.run_dir, RUN_FOLDER_OPTION, (self.weights_folder, VALIDATION_FOLDER, TRACKERS_FOLDER,
                                                              LOG_FILE, CONFIG_FILE), self.notify)
        problem = None
        if self.is_main:
            try:
                folder.acquire()
            except HarnessError as error:
                problem = error.message
        problem = broadcast_object_list([problem])[0]  # every process waits here until the folder is settled
        try:
            if problem is not None:
                raise HarnessError(problem)
            yield folder.replacement
        finally:
            folder.release(kept=f"The earlier run in '{self.run_dir}' was kept: the new run stopped before its "
                                "first step.")
            if self.is_main:
                folder.remove_if_empty()

    def _train_steps(self, run: RunState, dataset: torch.utils.data.Dataset[Any]) -> None:
        """The optimizer steps from where ``run`` stands to --max_steps, with logs, checkpoints and validation."""
        config = self.config
        # The batch sampler indexes a map-style dataset, which has a length (torch's Dataset does not declare it).
        sampler = StreamBatchSampler(len(cast(Sized, dataset)), config.batch_size, self.seed,
                                     run.progress.samples_seen, self.accelerator.process_index,
                                     self.accelerator.num_processes)
        batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler))
        started = time.perf_counter() - run.progress.seconds
        for step in range(run.progress.step + 1, config.max_steps + 1):
            lr = run.lr_scheduler.get_last_lr()[0]
            try:
                loss = self._optimizer_step(batches, run)
            except torch.cuda.OutOfMemoryError:
                raise HarnessError(
                    f"CUDA out of memory at step {step}: reduce --batch_size to 1 and raise "
                    "--gradient_accumulation_steps to keep the effective batch, add --gradient_checkpointing, "
                    "use --resolution 256, or close other GPU applications. "
                    f"{self._last_checkpoint_line()}") from None
            except (MemoryError, RuntimeError) as error:
                if "without overflow" in str(error):  # torch refuses a step size beyond float32's range
                    raise HarnessError(
                        f"the optimizer step overflowed float32 at step {step}: the learning rate is far too large; "
                        f"lower --learning_rate. {self._last_checkpoint_line()}") from None
                if not _cpu_out_of_memory(error):
                    raise
                raise HarnessError(
                    f"CPU out of memory at step {step}: reduce --batch_size to 1 and raise "
                    "--gradient_accumulation_steps to keep the effective batch, add --gradient_checkpointing, "
                    "use a smaller --resolution, or close other applications. "
                    f"{self._last_checkpoint_line()}") from None
            if not math.isfinite(loss):
                # Stop before anything is saved from the broken weights.
                raise HarnessError(f"the loss became {loss} at step {step}; lower --learning_rate or --max_grad_norm, "
                                   f"or train with --mixed_precision no. {self._last_checkpoint_line()}")
            run.progress.step = step
            run.progress.samples_seen += sampler.global_batch * config.gradient_accumulation_steps
            seconds = time.perf_counter() - started
            step_seconds, run.progress.seconds = seconds - run.progress.seconds, seconds
            self._report(StepReport(step, config.max_steps, loss, lr, seconds, step_seconds))
            saving = step % config.checkpointing_steps == 0
            if saving or step == config.max_steps:
                self._check_weights(run, step)
            if saving:
                self._save_checkpoint(run)
            if config.validation_prompts and (step % config.validation_every == 0 or step == config.max_steps):
                self._validate(step)

    def _check_weights(self, run: RunState, step: int) -> None:
        """Refuse to save weights the last update left NaN or inf: the loss, computed before it, cannot show that
        (a finite but huge --learning_rate does it in one step)."""
        broken = [name for name, parameter in run.trainable.items() if not torch.isfinite(parameter).all()]
        if broken:
            raise HarnessError(f"the weights became NaN or inf at step {step} ({len(broken)} of {len(run.trainable)} "
                               f"tensors, e.g. {broken[0]}); lower --learning_rate or --max_grad_norm, or train "
                               f"with --mixed_precision no. {self._last_checkpoint_line()}")

    @contextmanager
    def _full_disk_in_one_line(self) -> Iterator[None]:
        """A checkpoint, log or final/ that the disk cannot take is one line naming the last intact checkpoint (the
        folder being written is staged and removed: it never looks complete). safetensors reports a full disk as its
        own error type, not as an OSError; both are recognised."""
        try:
            yield
        except Exception as error:
            reason = files.disk_full(error)
            if reason is None:
                raise
            raise HarnessError(f"cannot write to '{self.run_dir}': {reason}; free some space or pass --output_dir on "
                               f"another disk. {self._last_checkpoint_line()}") from None

    def _last_checkpoint_line(self) -> str:
        latest = checkpoints.latest_checkpoint(self.checkpoint_dir)
        if latest is None:
            return "No checkpoint was written yet."
        return f"The last checkpoint, '{latest}', is intact: continue with --resume_from_checkpoint latest."

    def _build(self, examples) -> tuple[RunState, torch.utils.data.Dataset[Any]]:
        """Models (through setup()), data, optimizer and schedule, prepared by accelerate."""
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        set_seed(self.seed)  # the same initial weights in every process
        module = self.setup()
        if self.resolution is None:
            raise HarnessError(f"trainer '{self.name}' needs --resolution.")
        # Trainable weights stay in fp32 under mixed precision: fp16 Adam updates underflow.
        cast_training_params(module, torch.float32)
        trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
        if not trainable:
            raise HarnessError(f"trainer '{self.name}' left nothing to train (no parameter requires grad).")
        dataset = self.prepare_data(ImageCaptionDataset(examples, self.resolution))
        optimizer = torch.optim.AdamW(trainable.values(), lr=self.config.learning_rate)
        lr_scheduler = get_scheduler(
            self.config.lr_scheduler,
            optimizer,
            num_warmup_steps=self.config.lr_warmup_steps,
            num_training_steps=self.config.max_steps,
        )
        self.model, optimizer = self.accelerator.prepare(module, optimizer)
        generator = torch.Generator(self.device).manual_seed(self.seed + 1_000_003 * self.accelerator.process_index)
        return RunState(trainable, optimizer, lr_scheduler, generator, Progress()), dataset

    def _optimizer_step(self, batches, run: RunState) -> float:
        """One optimizer step over --gradient_accumulation_steps micro-batches; the mean loss of all processes."""
        losses = []
        for _ in range(self.config.gradient_accumulation_steps):
            batch = {
                key: value.to(self.device) if torch.is_tensor(value) else value for key, value in next(batches).items()
            }
            # accumulate() skips the gradient all-reduce and optimizer.step() until the last micro-batch.
            with self.accelerator.accumulate(self.model):
                with self.accelerator.autocast():
                    loss = self.compute_loss(batch, run.generator)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(run.trainable.values(), self.config.max_grad_norm)
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().float())
        self.after_optimizer_step()
        run.lr_scheduler.step()
        return self.accelerator.reduce(torch.stack(losses).mean(), "mean").item()

    def _make_accelerator(self) -> Accelerator:
        from accelerate import Accelerator
        from accelerate.utils import parse_flag_from_env

        on_cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
        requested = self.config.mixed_precision or ("no" if on_cpu else "fp16")
        accelerator = Accelerator(
            mixed_precision="no" if on_cpu else requested,
            cpu=on_cpu,
            gradient_accumulation_steps=self.config.gradient_accumulation_steps,
            log_with=self._make_trackers() or None,
        )
        if on_cpu and requested != "no" and accelerator.is_main_process:
            self._notify(f"--mixed_precision {requested} needs CUDA; training in full precision on the CPU.")
        return accelerator

    @property
    def tracker_project(self) -> str:
        """The wandb project / mlflow experiment: --tracker_project_name, else the run name; a stage nested in
        another run's folder (pretrain's RUN/vae) reports to that run's project."""
        return self.config.tracker_project_name or Path(self.config.run_name).parts[0]

    def _make_trackers(self) -> list[Any]:
        return trackers.build(self.tracker_names, self.run_dir / TRACKERS_FOLDER, self.config.run_name,
                              self.tracker_project)

    def _start_trackers(self, document: dict[str, Any] | None, step: int) -> None:
        """Start the trackers with the config (on the main process, as accelerate does). One that cannot start
        ends the run in one line, in every process, and takes back every file the trackers' start wrote."""
        from accelerate.utils import broadcast_object_list

        if not self.tracker_names:
            return
        problem = None
        if self.is_main:
            assert document is not None  # the main process builds it
            problem = trackers.start(self.accelerator, self.tracker_names, self.run_dir / TRACKERS_FOLDER,
                                     self.tracker_project, document, step, self.config.report_to)
        problem = broadcast_object_list([problem])[0]
        if problem is not None:
            raise HarnessError(problem)

    def _finish_trackers(self) -> None:
        trackers.finish(self.accelerator)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """Send numbers to the --report_to trackers at an optimizer step, e.g. a trainer's own evaluation (main
        process only, as accelerate logs; nothing without trackers)."""
        self.accelerator.log(values, step=step)

    def _resume_state(self, replacement: Replacement) -> tuple[Path | None, TrainingState | None]:
        """The checkpoint to resume from and its checked state; refuses to mix a new run into an earlier run's
        folder, and with --overwrite moves the earlier run aside until the new one reaches its first step.

        ``latest`` passes over damaged checkpoints, each named in a notice; a named folder that is damaged is
        one line, as the user asked for that very state.
        """
        found = checkpoints.resume_point(self.config.resume_from_checkpoint, self.checkpoint_dir,
                                         self.config.overwrite, self.notify)
        if found is not None:
            return found
        if self.checkpoint_dir.is_dir() and any(self.checkpoint_dir.iterdir()):
            if not self.config.overwrite:
                raise HarnessError(
                    f"'{self.checkpoint_dir}' already holds an earlier run; pass --resume_from_checkpoint latest "
                    "to continue it, --overwrite to replace it, or another --run_name."
                )
            if self.is_main:
                replacement.move_aside()  # deleted once the new run's model has loaded, put back if it never does
            self.accelerator.wait_for_everyone()
        return None, None

    def _shared_seed(self, resumed: TrainingState | None) -> int:
        if resumed is not None:
            seed = resumed.info["seed"]
            if self.config.seed not in (None, seed):
                raise HarnessError(
                    f"the checkpoint was trained with --seed {seed}; resume with that seed (or without --seed)."
                )
            return seed
        if self.config.seed is not None:
            return self.config.seed
        from accelerate.utils import broadcast_object_list

        # Every process must draw the same data order: the main process picks the seed.
        return broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]

    def _report(self, report: StepReport) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(json.dumps(report.as_dict()) + "\n")
        self.log_metrics(
            {
                "train/loss": report.loss,
                "train/learning_rate": report.lr,
                "train/seconds_per_step": report.step_seconds,
            },
            report.step,
        )
        self.on_step(report)
        self.on_step_end(report)

    def _save_checkpoint(self, run: RunState) -> None:
        from accelerate.utils import gather_object

        rng_by_rank = gather_object([checkpoints.capture_rng(run.generator)])  # every process takes part
        if self.is_main:
            state = checkpoints.snapshot(run, rng_by_rank, self.extra_state(), trainer=self.name, seed=self.seed,
                                         world_size=self.accelerator.num_processes, scaler=self.accelerator.scaler)
            checkpoints.write(state, self.checkpoint_dir / checkpoints.checkpoint_name(run.progress.step),
                              self.save_weights)
            if self.config.checkpoints_total_limit is not None:
                checkpoints.prune(self.checkpoint_dir, self.config.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()

    def _restore(self, state: TrainingState, folder: Path, run: RunState) -> None:
        checkpoints.restore(state, folder, run, self.accelerator.process_index, self.accelerator.scaler,
                            self.load_extra_state)
        if state.info["world_size"] != self.accelerator.num_processes:
            self.notify(
                f"the checkpoint was written by {state.info['world_size']} process(es), this run has "
                f"{self.accelerator.num_processes}: training continues, but not exactly as the "
                "uninterrupted run would have."
            )
        self.notify(f"resuming from '{folder}' at step {run.progress.step}.")

    def _config_document(self, examples, resume_folder: Path | None) -> dict[str, Any]:
        """What config.json holds (and the trackers get): the settings, what the run resolved, the environment."""
        processes = self.accelerator.num_processes
        return {
            "trainer": self.name,
            "config": self.config.to_dict(),
            "resolved": {
                "seed": self.seed,
                "resolution": self.resolution,
                "mixed_precision": self.accelerator.mixed_precision,
                "world_size": processes,
                "effective_batch_size": self.config.batch_size * self.config.gradient_accumulation_steps * processes,
                "data": examples.source,
                "examples": len(examples),
                "resumed_from": str(resume_folder) if resume_folder else None,
                **self.resolved_settings(),
            },
            "environment": environment(self.device, self.weight_dtype, self.plugin_manager),
        }

    def _write_config(self, document: dict[str, Any] | None, resume_folder: Path | None, progress: Progress) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(self.run_dir / CONFIG_FILE, json.dumps(document, indent=2, default=str) + "\n")
        log = self.run_dir / LOG_FILE
        if resume_folder is not None and log.is_file():
            kept = []
            for line in log.read_bytes().splitlines():
                step = logged_step(line)
                # Steps logged after the checkpoint are about to be trained again; a line torn by a kill goes too.
                if step is not None and step <= progress.step:
                    kept.append(line.decode("utf-8"))
            files.write_text_atomic(log, "".join(line + "\n" for line in kept))

    def _validate(self, step: int) -> None:
        if self.is_main:
            rows = self.validation_rows(list(self.config.validation_prompts), self.seed)
            if rows:
                folder = self.run_dir / VALIDATION_FOLDER
                folder.mkdir(parents=True, exist_ok=True)
                grid, path = grids.comparison_grid(rows), folder / f"step-{step:06d}.png"
                files.save_image_atomic(grid, path)
                trackers.log_grid(self.accelerator, grid, path, step, VALIDATION_FOLDER)
        self.accelerator.wait_for_everyone()
