"""Fuzzed run YAML files (`fastlora-jax train --config run.yaml`; see tests/fuzz/common.py)."""

from __future__ import annotations

import shutil

import yaml
from hypothesis import given
from hypothesis import strategies as st

from fastlora_jax.train.args import RUN_SECTIONS, load_yaml, run_settings
from fastlora_jax.train.schema import field_types
from tests.fuzz.common import CASES, FUZZ, Counter, cli_error, entries, fresh_dir, outcome

# every setting but the process-group ones (a coordinator address would start jax.distributed)
KEYS = sorted(name for cls in RUN_SECTIONS for name in field_types(cls)
              if name not in ("coordinator_address", "num_processes", "process_id"))
NUMBERISH = st.sampled_from(["2e-4", "1_000", "0x10", "1e999", "-1", "nan", ".inf", "3.5",
                             "1,2,3", "2,x", "q_proj", "yes", "off", "null", "", " ", "[1, 2]"])
scalars = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | NUMBERISH | st.text(max_size=10))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(["data", "fsdp", "tensor", "x"]) | st.text(
                          max_size=5), inner, max_size=3), max_leaves=6)
RAW = st.sampled_from(["learning_rate: 2e-4\nlearning_rate: 3", "mesh: !!python/tuple [1, 2, 3]",
                       "a: &x [*x]", "!!python/object/apply:os.system ['true']", "- 1\n- 2",
                       "key: [unclosed", "\t tab: 1", "max_steps: 1\n...\n---\nmax_steps: 2",
                       "? [a, b]\n: 1", "x: !!binary AAAA"])


@st.composite
def documents(draw):
    kind = draw(st.sampled_from(["settings", "settings", "settings", "raw", "text"]))
    if kind == "raw":
        return draw(RAW)
    if kind == "text":
        return draw(st.text(max_size=80))
    doc = draw(st.dictionaries(st.sampled_from(KEYS + ["lerning_rate", "epochs"]), values,
                               max_size=5))
    return yaml.safe_dump(doc)


def test_run_yaml(tmp_path):
    count = Counter()

    @FUZZ
    @given(documents())
    def case(text):
        folder = fresh_dir(tmp_path)
        path = folder / "run.yaml"
        path.write_text(text)
        error = outcome(lambda: run_settings((load_yaml(path), "config file")))
        count.add(error)
        # valid settings still fail in the CLI: no model was named, or not this one
        cli_error(["train", "--config", str(path), "--output_dir", str(folder / "out")])
        assert entries(folder) == ["run.yaml"]
        shutil.rmtree(folder)

    case()
    assert count.seen == CASES and count.failed >= CASES // 2, vars(count)
