"""GRPO/DPO building blocks: chunked log-probs vs full logits, advantages, configs, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastlora_jax.errors import ConfigError, DataError
from fastlora_jax.train.dpo_data import tokenize_pair
from fastlora_jax.train.logprobs import token_logprobs, token_logprobs_reference
from fastlora_jax.train.rewards import advantages, score
from fastlora_jax.train.rl_config import DPOConfig, GRPOConfig


@pytest.mark.parametrize("softcap,temperature,chunk", [(None, 1.0, 5), (30.0, 0.7, 16)])
def test_chunked_logprobs_and_grads_equal_full_logits(softcap, temperature, chunk):
    kh, kw, kt, kg = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(kh, (3, 7, 16))
    w = jax.random.normal(kw, (50, 16)) * 0.5
    targets = jax.random.randint(kt, (3, 7), 0, 50)
    g = jax.random.normal(kg, (2, 3, 7))

    def full(h, w):
        logits = jnp.einsum("bth,vh->btv", h, w)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        return token_logprobs_reference(logits, targets, temperature)

    def chunked(h, w):
        return token_logprobs(h, w, targets, chunk=chunk, softcap=softcap, temperature=temperature)

    for got, want in zip(chunked(h, w), full(h, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    project = lambda f: lambda h, w: sum(jnp.sum(o * gi) for o, gi in zip(f(h, w), g))  # noqa
    got = jax.grad(project(chunked), argnums=(0, 1))(h, w)
    want = jax.grad(project(full), argnums=(0, 1))(h, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_group_advantages_follow_trl():
    # two groups of 3; the second function skips sample 1 (None -> NaN, summed as 0 with the
    # other function); sample 5 is scored by nobody: left out of its group's stats, advantage 0
    per_func = np.array([[1.0, 0.5], [0.0, np.nan], [1.0, 0.0],
                         [2.0, 1.0], [0.0, 0.0], [np.nan, np.nan]])
    adv, total, std = advantages(per_func, np.array([1.0, 2.0]), 3, "group")
    np.testing.assert_allclose(total[:5], [2.0, 0.0, 1.0, 4.0, 0.0])
    assert np.isnan(total[5])
    g1 = np.array([2.0, 0.0, 1.0])
    np.testing.assert_allclose(adv[:3], (g1 - 1.0) / (np.std(g1, ddof=1) + 1e-4), rtol=1e-6)
    g2 = np.array([4.0, 0.0])
    np.testing.assert_allclose(adv[3:5], (g2 - 2.0) / (np.std(g2, ddof=1) + 1e-4), rtol=1e-6)
    assert adv[5] == 0.0
    adv_none, _, _ = advantages(per_func, np.array([1.0, 2.0]), 3, "none")
    np.testing.assert_allclose(adv_none[:3], g1 - 1.0)
    adv_batch, _, std_b = advantages(per_func, np.array([1.0, 2.0]), 3, "batch")
    np.testing.assert_allclose(std_b[0], np.std(total[:5], ddof=1))


def _args(**kw):
    return dict(prompts=["p"] * 4, completions=["a", "b", "c", "d"],
                completion_ids=[[1]] * 4, columns={"answer": ["1", "2", "3", "4"]}, **kw)


def test_reward_function_errors_name_the_function_and_sample():
    def broken(completions, **_):
        raise KeyError("boom")

    def short(completions, **_):
        return [1.0]

    def nothing(completions, **_):
        return [None] * len(completions)

    def text(completions, **_):
        return ["yes"] * len(completions)

    def fine(completions, answer, **_):
        return [float(a) for a in answer]

    a = _args()
    with pytest.raises(DataError, match=r"'broken' raised KeyError.*first completion 'a'"):
        score([broken], a["prompts"], a["completions"], a["completion_ids"], a["columns"])
    with pytest.raises(DataError, match=r"'short' returned 1 rewards for 4 completions"):
        score([fine, short], a["prompts"], a["completions"], a["completion_ids"], a["columns"])
    with pytest.raises(DataError, match=r"'nothing' returned None for all 4"):
        score([nothing], a["prompts"], a["completions"], a["completion_ids"], a["columns"])
    with pytest.raises(DataError, match=r"'text' returned 'yes' for completion 0"):
        score([text], a["prompts"], a["completions"], a["completion_ids"], a["columns"])
    out = score([fine], a["prompts"], a["completions"], a["completion_ids"], a["columns"])
    np.testing.assert_array_equal(out[:, 0], [1, 2, 3, 4])


def test_grpo_config_checks_and_batch_arithmetic():
    with pytest.raises(ConfigError, match="at least 2 generations"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match="not divisible by num_generations=3"):
        GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=1,
                   num_generations=3)
    with pytest.raises(ConfigError, match="loss_type='ppo'"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ConfigError, match="cannot both be set"):
        GRPOConfig(generation_batch_size=16, steps_per_generation=2)
    with pytest.raises(ConfigError, match="multiple of gradient_accumulation_steps"):
        GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=4,
                   steps_per_generation=2)
    c = GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2,
                   num_generations=4, num_iterations=2, epsilon=0.3, scale_rewards=False)
    assert (c.steps_per_generation, c.generation_batch_size, c.prompts_per_generation) == (2, 16, 4)
    assert c.epsilon_high == 0.3 and c.scale_rewards == "none"
    with pytest.raises(ConfigError, match="loss_type \\['kto'\\]"):
        DPOConfig(loss_type="kto")
    assert DPOConfig(loss_type="ipo").loss_type == ["ipo"]


class _Tok:
    """A character tokenizer with a one-line chat template (enough for the data rules)."""

    eos_token, eos_token_id, pad_token_id = "$", 36, 36

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 37 for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role'][0]}>{m['content']}|" for m in messages)
        return text + ("<a>" if add_generation_prompt else "")


def test_preference_rows_plain_conversational_implicit_and_missing():
    tok = _Tok()
    p, c, r = tokenize_pair(tok, {"prompt": "ab", "chosen": "cd", "rejected": "e"}, 0)
    assert (p, c, r) == (tok("ab")["input_ids"], tok("cd$")["input_ids"], tok("e$")["input_ids"])
    user = [{"role": "user", "content": "hi"}]
    conv = {"chosen": user + [{"role": "assistant", "content": "yo"}],
            "rejected": user + [{"role": "assistant", "content": "no"}]}
    p, c, r = tokenize_pair(tok, conv, 1)
    assert p == tok("<u>hi|<a>")["input_ids"] and c == tok("yo|")["input_ids"]
    with pytest.raises(DataError, match=r"preference row 7 has no rejected"):
        tokenize_pair(tok, {"prompt": "x", "chosen": "y", "rejected": None}, 7)
    with pytest.raises(DataError, match=r"preference row 2 has no chosen / rejected"):
        tokenize_pair(tok, {"prompt": "x"}, 2)


def test_demo_rewards_and_problems():
    from fastlora_jax.demo_grpo import MAX_TOKENS, concise_reward, correct, make_problems

    problems = make_problems(20, seed=0)
    assert len({p["prompt"][0]["content"] for p in problems}) == 20
    a, b = map(int, problems[0]["prompt"][0]["content"].split(" = ")[0].split(" + "))
    assert problems[0]["answer"] == str(a + b)
    chat = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    assert correct([chat("The answer is 12."), chat("12 + 1 = 13"), chat("no")],
                   ["12", "12", "12"]) == [1.0, 0.0, 0.0]
    concise = concise_reward(eos_token_id=2)
    assert concise([[5, 2], [5] * (MAX_TOKENS - 1) + [2], [5] * MAX_TOKENS]) == [0.5, 0.0, 0.0]
