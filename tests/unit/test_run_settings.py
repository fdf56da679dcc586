"""Typed run settings: YAML and CLI values go through one schema built from the field types."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import typing

import pytest

from fastlora_jax import ConfigError, FastLanguageModel, TrainingArguments
from fastlora_jax.cli import main
from fastlora_jax.sharding import MeshConfig
from fastlora_jax.train.args import RUN_SECTIONS, ModelArguments, load_yaml, run_settings
from fastlora_jax.train.rl_config import DPOConfig, GRPOConfig
from fastlora_jax.train.schema import convert, field_types
from tests.checkpoints import TINY_LLAMA, llama_tensors, write_checkpoint


def from_yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return run_settings((load_yaml(path), f"config file {str(path)!r}"))


def cli_error(argv):
    """(exit code, stderr) of the CLI run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_yaml_numbers_in_any_spelling(tmp_path):
    # YAML 1.1 reads 2e-4 (no dot) as a string; 1e3 likewise; 1_000 as an int
    _, _, args = from_yaml(tmp_path, "learning_rate: 2e-4\nmax_steps: 1e3\nsave_steps: 1_000\n"
                                     "weight_decay: 0\nadam_epsilon: 1.0e-8\n")
    assert args.learning_rate == 2e-4 and isinstance(args.learning_rate, float)
    assert args.max_steps == 1000 and isinstance(args.max_steps, int)
    assert args.save_steps == 1000 and args.weight_decay == 0.0 and args.adam_epsilon == 1e-8


@pytest.mark.parametrize("text", ["mesh: [2, 4, 1]", "mesh: '2,4,1'", "mesh: {data: 2, fsdp: 4}",
                                  "mesh: [2, '4', 1.0]"])
def test_yaml_mesh_spellings(tmp_path, text):
    _, _, args = from_yaml(tmp_path, text + "\n")
    assert args.mesh == MeshConfig(2, 4, 1)


def test_yaml_booleans_lists_and_nulls(tmp_path):
    launch, model, args = from_yaml(
        tmp_path, "packing: yes\ndisable_tqdm: 'False'\ntarget_modules: [q_proj, v_proj]\n"
                  "save_total_limit: null\nuse_gradient_checkpointing: offload\n"
                  "resume_from_checkpoint: on\n")
    assert args.packing is True and args.disable_tqdm is False and args.save_total_limit is None
    assert model.target_modules == ("q_proj", "v_proj")
    assert args.use_gradient_checkpointing == "offload" and launch.resume_from_checkpoint is True


@pytest.mark.parametrize("text, fragments", [
    ("learning_rate: fast", ["learning_rate='fast'", "a number"]),
    ("learning_rate: .nan", ["learning_rate=nan", "finite"]),
    ("max_steps: 2.5", ["max_steps=2.5", "an integer", "fractional"]),
    ("packing: maybe", ["packing='maybe'", "true or false"]),
    ("mesh: [2, 4]", ["mesh=[2, 4]", "expected 3 sizes"]),
    ("mesh: {data: 2, pipeline: 2}", ["unknown mesh axes ['pipeline']"]),
    ("lr_scheduler_type: cosine_x", ["lr_scheduler_type='cosine_x'", "'cosine'", "'linear'"]),
    ("lerning_rate: 0.1", ["unknown setting(s) ['lerning_rate']", "'learning_rate'"]),
    ("target_modules: [q_proj, 3]", ["target_modules=['q_proj', 3]", "list of strings"]),
    ("save_total_limit: many", ["save_total_limit='many'", "an integer or null"]),
])
def test_yaml_errors_name_key_value_type_and_file(tmp_path, text, fragments):
    with pytest.raises(ConfigError) as info:
        from_yaml(tmp_path, text + "\n")
    message = str(info.value)
    assert "run.yaml" in message
    for fragment in fragments:
        assert fragment in message, message


def test_cli_mesh_and_target_modules(tmp_path):
    _, model, args = run_settings(({"mesh": "2,4,1", "target_modules": "q_proj"}, "command line"))
    assert args.mesh == MeshConfig(2, 4, 1)
    assert model.target_modules == ("q_proj",)  # one name is a list of one, not a regex
    with pytest.raises(ConfigError, match=r"command line: mesh='2,x' is not a mesh"):
        run_settings(({"mesh": "2,x"}, "command line"))


def test_one_target_module_name_targets_that_module(tmp_path):
    folder = write_checkpoint(tmp_path / "m", dict(TINY_LLAMA), llama_tensors(TINY_LLAMA))
    _, settings, _ = run_settings(({"target_modules": "q_proj"}, "command line"))
    model, _ = FastLanguageModel.from_pretrained(folder, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, target_modules=settings.target_modules)
    assert {name for _, name in model.lora_spec.targets} == {"q_proj"}


def test_command_line_overrides_yaml_and_errors_name_their_source(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 2e-4\nmax_steps: 10\n")
    _, _, args = run_settings((load_yaml(path), "config file"), ({"max_steps": "3"}, "command line"))
    assert args.max_steps == 3 and args.learning_rate == 2e-4
    with pytest.raises(ConfigError, match=r"^command line: max_steps='x'"):
        run_settings((load_yaml(path), "config file"), ({"max_steps": "x"}, "command line"))


def test_cli_prints_one_error_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mesh: [2, 4, 1, 1]\n")
    code, err = cli_error(["train", "--config", str(path), "--model", "m", "--data", "d.jsonl"])
    assert code == 2 and err.startswith("error: config file") and "mesh=[2, 4, 1, 1]" in err
    code, err = cli_error(["train", "--model", "m", "--data", "d", "--learning_rate", "2e-4x"])
    assert code == 2 and err.startswith("error: command line: learning_rate='2e-4x'")


def test_python_arguments_are_converted_and_checked():
    args = TrainingArguments(learning_rate="2e-4", mesh=[1, -1, 1], packing="true")
    assert args.learning_rate == 2e-4 and args.mesh == MeshConfig(1, -1, 1) and args.packing
    with pytest.raises(ConfigError, match="warmup_steps=-1 must be >= 0"):
        TrainingArguments(warmup_steps=-1)
    with pytest.raises(ConfigError, match="load_best_model_at_end.*eval_strategy='no'"):
        TrainingArguments(load_best_model_at_end=True)
    with pytest.raises(ConfigError, match="use_gradient_checkpointing='sometimes'"):
        TrainingArguments(use_gradient_checkpointing="sometimes")
    with pytest.raises(ConfigError, match="r='eight' is not an integer"):
        ModelArguments(r="eight")


@pytest.mark.parametrize("cls", RUN_SECTIONS + (GRPOConfig, DPOConfig))
def test_every_field_round_trips_its_default_and_its_text(cls):
    """The schema covers every declared type: a default and its command-line text convert back
    to the default."""
    for field in dataclasses.fields(cls):
        kind = field_types(cls)[field.name]
        default = field.default
        assert convert(default, kind, key=field.name, source="t") == default
        if default is None and str in typing.get_args(kind):
            continue  # a string setting keeps the text "null" (a file may be called that)
        if default is None:
            text = "null"
        elif isinstance(default, MeshConfig):
            text = f"{default.data},{default.fsdp},{default.tensor}"
        elif isinstance(default, (tuple, list)):
            text = ",".join(map(str, default))
        else:
            text = str(default)
        assert convert(text, kind, key=field.name, source="t") == default, field.name
