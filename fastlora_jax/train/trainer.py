"""`SFTTrainer`: TRL's shape over the pure step, data pipeline, checkpoints and logs."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastlora_jax.errors import ConfigError, TrainingError
from fastlora_jax.models.causal_lm import CausalLM
from fastlora_jax.converters.atomic import write_text_atomic
from fastlora_jax.sharding import adapter_shardings, batch_sharding, replicated, shard_params
from fastlora_jax.train import distributed
from fastlora_jax.train.args import TrainingArguments
from fastlora_jax.train.checkpoint import TrainCheckpoints
from fastlora_jax.train.data import DataStats, build_rows, load_dataset_source, tokenize_examples
from fastlora_jax.train.eval import BestTracker, EvalSet, evaluate
from fastlora_jax.train.logs import RunLogger
from fastlora_jax.train.step import StepConfig, make_optimizer, train_step
from fastlora_jax.train.vision_data import build_vision_rows
from fastlora_jax.vision.collator import VisionCollator, vision_collator
from fastlora_jax.vision.model import VisionLM


def _writable_dir(path: pathlib.Path) -> pathlib.Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{jax.process_index()}"  # one per process: no races
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {str(path)!r} is not writable ({err.strerror}); choose "
                          f"another output_dir") from None
    return path


class SFTTrainer:
    """Supervised fine-tuning of a model returned by `FastLanguageModel.get_peft_model`.

    `trainer.train()` runs the loop and returns the run's stats; the trained adapter (or, with
    load_best_model_at_end, the best evaluated one) is put back on `model` (save it with
    `model.save_pretrained(dir)`). `eval_dataset` (same forms and processing as
    `train_dataset`) is evaluated as `args.eval_strategy` says and at the end of training;
    `trainer.evaluate()` evaluates the model's current adapter. Every process holds the whole
    (small) evaluation set; its batches are split over the mesh like the training batches.
    """

    def __init__(self, model: CausalLM | VisionLM, tokenizer: Any, train_dataset: Any,
                 args: TrainingArguments | None = None,
                 formatting_func: Callable[[dict[str, Any]], str] | None = None,
                 processing_class: Any = None, eval_dataset: Any = None,
                 data_collator: VisionCollator | None = None) -> None:
        if model.lora is None:
            raise ConfigError("the model has no LoRA adapter; call "
                              "FastLanguageModel.get_peft_model(model, ...) before training")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else processing_class
        if self.tokenizer is None:
            raise ConfigError("SFTTrainer needs a tokenizer (the model folder had none)")
        self.args = args or TrainingArguments()
        self.max_seq_length = self.args.max_seq_length or model.max_seq_length
        dataset = load_dataset_source(train_dataset)
        vision = isinstance(model, VisionLM)
        # a vision model's processing class is its processor, which holds the tokenizer
        text_tokenizer = self.tokenizer.tokenizer if vision else self.tokenizer
        pad = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else 0
        if vision:
            if self.args.packing:
                raise ConfigError("a vision-language model trains on padded rows (an image's "
                                  "tokens must stay in one row); set packing=False")
            # relative image paths are read beside each data file (of our own collators)
            collators = {"train_dataset": data_collator, "eval_dataset": data_collator}
            for name, source in (("train_dataset", train_dataset),
                                 ("eval_dataset", eval_dataset)):
                if data_collator is None:
                    root = (pathlib.Path(source).parent
                            if isinstance(source, (str, pathlib.Path)) else None)
                    collators[name] = vision_collator(
                        model, self.tokenizer, image_root=root,
                        train_on_responses_only=self.args.train_on_responses_only)

        def build(part: Any, name: str = "train_dataset") -> tuple[dict[str, np.ndarray], DataStats]:
            if vision:
                host = (None if model.arch.host_inputs is None
                        else functools.partial(model.arch.host_inputs, model.config))
                return build_vision_rows(collators[name], part,
                                         max_seq_length=self.max_seq_length,
                                         pad_token_id=pad, name=name, host_inputs=host)
            examples = tokenize_examples(part, self.tokenizer,
                                         dataset_text_field=self.args.dataset_text_field,
                                         formatting_func=formatting_func,
                                         train_on_responses_only=self.args.train_on_responses_only,
                                         name=name)
            return build_rows(examples, max_seq_length=self.max_seq_length,
                              packing=self.args.packing, pad_token_id=pad, name=name)

        if eval_dataset is None and self.args.eval_strategy != "no":
            raise ConfigError(f"eval_strategy={self.args.eval_strategy!r} needs an eval_dataset "
                              f"(CLI: --eval_data FILE)")
        eval_rows = None if eval_dataset is None else build(
            load_dataset_source(eval_dataset, name="eval_dataset"), "eval_dataset")[0]

        self.mesh_config = self.args.mesh or distributed.default_mesh_config()
        self.mesh = self.mesh_config.make_mesh() if self.mesh_config is not None else None
        if self.mesh is not None and vision:
            raise ConfigError("vision-language models train on one device for now; run "
                              "without a mesh")
        if self.mesh is not None:
            self.mesh_config.check_model(model.config, self.mesh)
        # each data x fsdp batch group reads its own shard of the data (train/distributed.py)
        self.data = distributed.DataShards(dataset, build, self.mesh)
        self.data_stats = self.data.stats
        self.rows_per_group = (self.args.per_device_train_batch_size
                               * self.args.gradient_accumulation_steps)
        self.rows_per_step = self.rows_per_group * self.data.num_shards
        per_epoch = self.data.steps_per_epoch(self.rows_per_group)
        self.steps_per_epoch = max(per_epoch, 1)
        self.eval_set = None if eval_rows is None else EvalSet(
            eval_rows, batch_rows=self.args.per_device_eval_batch_size * self.data.num_shards,
            packing=self.args.packing, pad_token_id=pad)
        if self.args.max_steps > 0:
            self.total_steps = self.args.max_steps
        else:
            self.total_steps = max(1, int(math.ceil(self.args.num_train_epochs * per_epoch)))
        self.warmup_steps = self.args.warmup_steps or int(
            math.ceil(self.args.warmup_ratio * self.total_steps))
        self.optimizer = make_optimizer(
            learning_rate=self.args.learning_rate, warmup_steps=self.warmup_steps,
            total_steps=self.total_steps, lr_scheduler_type=self.args.lr_scheduler_type,
            weight_decay=self.args.weight_decay, max_grad_norm=self.args.max_grad_norm,
            adam_beta1=self.args.adam_beta1, adam_beta2=self.args.adam_beta2,
            adam_epsilon=self.args.adam_epsilon)
        self.step_config = StepConfig(
            model=model.config.text if vision else model.config, lora=model.lora_spec,
            remat=self.args.use_gradient_checkpointing, loss_chunk=self.args.loss_chunk_size,
            vision=(model.arch, model.config) if vision else None)
        # a vision model's rows carry the image arrays (and what the architecture derives from
        # them) beside the token arrays
        text_keys = ("input_ids", "targets", "positions", "segment_ids")
        self.image_keys = tuple(k for k in self.data.rows[self.data.local[0]]
                                if k not in text_keys) if vision else ()

    # -----------------------------------------------------------------------------------------
    def _place(self, frozen: Any, lora: Any, opt_state: Any) -> tuple[Any, Any, Any]:
        if self.mesh is None:
            return frozen, lora, opt_state
        lora_sh = adapter_shardings(lora, self.mesh, shard=self.mesh_config.shard_adapters)
        opt_sh = optax.tree_map_params(self.optimizer, lambda _, s: s, opt_state, lora_sh,
                                       transform_non_params=lambda _: replicated(self.mesh))
        return (shard_params(frozen, self.model.config, self.mesh),
                distributed.put_from_host(lora, lora_sh),
                distributed.put_from_host(opt_state, opt_sh))

    def _to_devices(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """An [A, B, T] batch that every process holds in full, on the devices (B split over the
        mesh's batch axes)."""
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return distributed.put_from_host(batch, {k: batch_sharding(self.mesh, v.shape, batch_axis=1)
                                                 for k, v in batch.items()})

    def _eval_due(self, done: int) -> bool:
        if self.eval_set is None:
            return False
        if done == self.total_steps:
            return True  # a run with an eval_dataset always ends with an evaluation
        if self.args.eval_strategy == "steps":
            return done % (self.args.eval_steps or self.args.logging_steps) == 0
        return self.args.eval_strategy == "epoch" and done % self.steps_per_epoch == 0

    def _evaluate(self, lora: Any, frozen: Any) -> dict[str, float]:
        with distributed.mesh_context(self.mesh):
            return evaluate(self.eval_set, lora, frozen, self.step_config, self._to_devices)

    def evaluate(self) -> dict[str, float]:
        """eval_loss, eval_perplexity (exp of it), eval_tokens, eval_runtime of the model's
        current adapter on the eval_dataset."""
        if self.eval_set is None:
            raise ConfigError("evaluate() needs an eval_dataset; pass one to SFTTrainer")
        lora = self.model.lora_params()
        frozen, lora, _ = self._place(self.model.params(), lora, self.optimizer.init(lora))
        return self._evaluate(lora, frozen)

    def _batch(self, step: int) -> tuple[dict[str, jax.Array], int, float]:
        """(the step's batch on the devices, its epoch, its number of real tokens).

        Unpacked rows go without segment ids (see train/step.py: right padding needs none).
        """
        keys = ("input_ids", "targets", "positions") + (("segment_ids",) if self.args.packing
                                                         else ()) + self.image_keys
        return self.data.batch(step, rows_per_group=self.rows_per_group,
                               accumulation=self.args.gradient_accumulation_steps,
                               seed=self.args.seed, keys=keys)

    def train(self, resume_from_checkpoint: bool | str = False) -> dict[str, Any]:
        """Run to `total_steps` (or an early stop); returns stats (steps, losses, evaluation,
        runtime, tokens/s, data stats)."""
        args = self.args
        out_dir = _writable_dir(pathlib.Path(args.output_dir))
        checkpoints = TrainCheckpoints(out_dir, max_to_keep=args.save_total_limit)
        lora = jax.tree.map(jnp.copy, self.model.lora_params())  # the step donates its inputs
        opt_state = self.optimizer.init(lora)
        frozen, lora, opt_state = self._place(self.model.params(), lora, opt_state)
        keep_best = args.load_best_model_at_end
        best_lora = jax.tree.map(jnp.copy, lora) if keep_best else None
        tracker = BestTracker(args.metric_for_best_model, args.early_stopping_threshold)
        start, nonfinite_total = 0, 0
        if not resume_from_checkpoint and checkpoints.latest_step() is not None:
            raise ConfigError(f"output_dir {str(out_dir)!r} already holds checkpoints (latest step "
                              f"{checkpoints.latest_step()}); resume with "
                              f"resume_from_checkpoint=True or choose another output_dir")
        if resume_from_checkpoint:
            latest = checkpoints.latest_step()
            if latest is None:
                raise ConfigError(f"resume_from_checkpoint: no checkpoint in "
                                  f"{str(checkpoints.directory)!r}")
            template = {"lora": lora, "opt_state": opt_state}
            if keep_best:
                template["best_lora"] = best_lora
            state, meta = checkpoints.restore(latest, template)
            lora, opt_state = state["lora"], state["opt_state"]
            best_lora = state["best_lora"] if keep_best else None
            start = int(meta["step"])
            if "best" in meta:  # written by runs that track evaluations
                tracker.restore(meta["best"])
                nonfinite_total = int(meta["nonfinite_total"])
        dropout = self.model.lora_spec.config.lora_dropout > 0
        base_key = jax.random.key(args.seed)
        main = distributed.is_main_process()  # only process 0 writes the run's files
        logger = RunLogger(out_dir, total_steps=self.total_steps, start_step=start,
                           tensorboard=args.report_to == "tensorboard",
                           show_progress=not args.disable_tqdm) if main else distributed.NullLogger()
        if main:
            self._write_run_info(out_dir)
        losses, tokens_done, window_tokens = [], 0.0, 0.0
        last_saved, done, in_a_row, last_eval, stopped_early = start, start, 0, None, False
        t0 = time.perf_counter()
        try:
            for step in range(start, self.total_steps):
                batch, epoch, step_tokens = self._batch(step)
                key = jax.random.fold_in(base_key, step) if dropout else None
                with distributed.mesh_context(self.mesh):
                    lora, opt_state, metrics = train_step(lora, opt_state, frozen, batch,
                                                          cfg=self.step_config,
                                                          optimizer=self.optimizer,
                                                          dropout_key=key)
                m = {k: float(v) for k, v in distributed.to_host(metrics).items()}
                skipped = m.pop("skipped") > 0
                in_a_row = in_a_row + 1 if skipped else 0
                nonfinite_total += skipped
                if not skipped:
                    losses.append(m["loss"])
                tokens_done += step_tokens
                window_tokens += step_tokens
                done = step + 1
                if skipped or done % args.logging_steps == 0 or done == self.total_steps:
                    record = dict(m, epoch=epoch, nonfinite_total=nonfinite_total)
                    if skipped:
                        record.update(skipped=True, nonfinite_in_a_row=in_a_row)
                    logger.log(done, record, window_tokens)
                    window_tokens = 0.0
                if in_a_row >= args.max_consecutive_nonfinite_steps:
                    raise TrainingError(
                        f"{in_a_row} optimizer steps in a row (steps {done - in_a_row + 1}-{done}) "
                        f"had a non-finite loss or gradient norm (last: loss={m['loss']}, "
                        f"grad_norm={m['grad_norm']}); each was skipped, and training stopped "
                        f"(max_consecutive_nonfinite_steps={args.max_consecutive_nonfinite_steps}"
                        f"). The last checkpoint (step {last_saved}) in "
                        f"{str(checkpoints.directory)!r} holds good weights. Lower learning_rate "
                        f"or check the data of these steps")
                if self._eval_due(done):
                    last_eval = self._evaluate(lora, frozen)
                    logger.log_eval(done, last_eval)
                    if tracker.update(last_eval, done) and keep_best:
                        best_lora = jax.tree.map(jnp.copy, lora)
                    stopped_early = (args.early_stopping_patience is not None
                                     and tracker.bad_evals >= args.early_stopping_patience
                                     and done < self.total_steps)
                if ((args.save_steps and done % args.save_steps == 0) or done == self.total_steps
                        or stopped_early):
                    state = {"lora": lora, "opt_state": opt_state}
                    if keep_best:
                        state["best_lora"] = best_lora
                    checkpoints.save(done, state, {"seed": args.seed,
                                                   "total_steps": self.total_steps,
                                                   "best": tracker.state(),
                                                   "nonfinite_total": nonfinite_total})
                    last_saved = done
                if stopped_early:
                    logger.event("early_stop", done, best_step=tracker.best_step)
                    break
        finally:
            logger.close()
            checkpoints.close()
            final = best_lora if keep_best and tracker.best_step > 0 else lora
            self.model.set_adapter(self.model.lora_spec, distributed.to_host(final))
        runtime = time.perf_counter() - t0
        stats = {"global_step": done, "start_step": start,
                 "train_loss": float(np.mean(losses)) if losses else float("nan"),
                 "final_loss": losses[-1] if losses else float("nan"),
                 "nonfinite_steps": nonfinite_total, "stopped_early": stopped_early,
                 "train_runtime": runtime,
                 "train_tokens_per_second": tokens_done / max(runtime, 1e-9),
                 "data": dataclasses.asdict(self.data_stats)}
        if last_eval is not None:
            stats.update(last_eval, best_metric=tracker.best, best_step=tracker.best_step,
                         loaded_best=keep_best and tracker.best_step > 0)
        if main:
            write_text_atomic(out_dir / "train_stats.json", json.dumps(stats, indent=2))
        return stats

    def _write_run_info(self, out_dir: pathlib.Path) -> None:
        info = {"args": dataclasses.asdict(self.args),  # recursive: the MeshConfig too
                "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "max_seq_length": self.max_seq_length, "data": dataclasses.asdict(self.data_stats),
                "eval_rows": None if self.eval_set is None else self.eval_set.num_rows,
                "model": self.model.name_or_path}
        write_text_atomic(out_dir / "run_info.json", json.dumps(info, indent=2, default=str))


def data_summary(stats: DataStats) -> str:
    return (f"{stats.examples} examples -> {stats.rows} rows, {stats.tokens} tokens "
            f"({stats.label_tokens} trained); truncated {stats.truncated}, dropped (no labels) "
            f"{stats.dropped_no_labels}")
