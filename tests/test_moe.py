"""Mixture-of-Experts models: router logits recorded from mlx-lm's own blocks, the
load-balancing loss against an independent NumPy one (transformers' formula over TRL's
concatenated, padded forward), gradients with and without it, packed rows, adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from _numerics import NUMERICS
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, load

from mlx_pref import moe
from mlx_pref.config import config_from_dict
from mlx_pref.data import collate
from mlx_pref.errors import ModelError
from mlx_pref.logps import packed_logps, padded_logps
from mlx_pref.models import embedded_root, enable_grad_checkpoint
from mlx_pref.progress import read_metrics
from mlx_pref.train import Trainer
from mlx_pref.train.step import batch_context, forward, loss_and_grad

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPERTS, TOP_K = 4, 2
ARCHITECTURES = {
    "mixtral": {"num_local_experts": EXPERTS},
    "qwen2_moe": {
        "num_experts": EXPERTS,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
    },
    "olmoe": {"num_experts": EXPERTS},
    "qwen3_moe": {
        "num_experts": EXPERTS,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],
        "head_dim": 16,
        "norm_topk_prob": True,
    },
}
ROUTER_AND_EXPERTS = ["q_proj", "v_proj", "gate", "switch_mlp.up_proj"]


def moe_config(model_type: str, vocab_size: int) -> dict:
    return {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": TOP_K,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        **ARCHITECTURES[model_type],
    }


def build(model_type: str, vocab_size: int = 64, seed: int = 0) -> nn.Module:
    config = moe_config(model_type, vocab_size)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    return model_class(args_class.from_dict(config))


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory) -> Path:
    """A random 2-block Mixtral (4 experts, top 2) with the embedded tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-mixtral")
    for name in TOKENIZER_FILES:
        shutil.copy(embedded_root("tiny-chat") / name, directory / name)
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    config = moe_config("mixtral", len(vocab) + 3)
    model = build("mixtral", config["vocab_size"])
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def moe_run(tmp_path, tiny_mixtral, prefs, monkeypatch):
    monkeypatch.setenv("MLX_PREF_CACHE", str(tmp_path / "cache"))

    def make(**overrides):
        raw = {
            "model": str(tiny_mixtral),
            "data": str(prefs[0]),
            "eval_data": str(prefs[1]),
            "output": str(tmp_path / "run"),
            "batch_size": 2,
            "max_steps": 3,
            "learning_rate": 1e-2,
            "eval_every": 3,
            "eval_batches": 1,
            "log_every": 1,
            "save_every": 3,
            "lora": {"r": 4, "alpha": 8, "target_modules": ROUTER_AND_EXPERTS},
            "max_length": 96,
        }
        raw.update(overrides)
        return config_from_dict(raw)

    return make


def numpy_load_balancing_loss(layers: list[np.ndarray], mask: np.ndarray, k: int) -> float:
    """transformers' ``load_balancing_loss_func`` (its one-hot form), in float64."""
    e = layers[0].shape[-1]
    logits = np.concatenate([x.reshape(-1, e) for x in layers]).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :k]
    one_hot = np.eye(e)[top]  # (N, k, E)
    m = np.tile(mask.reshape(-1).astype(np.float64), len(layers))
    tokens_per_expert = (one_hot * m[:, None, None]).sum(0) / m.sum()
    router_prob = (probs * m[:, None]).sum(0) / m.sum()
    return float(e * (tokens_per_expert * router_prob[None]).sum())


def trl_aux_loss(model: nn.Module, batch) -> float:
    """The aux loss of TRL's concatenated forward: every row (prompt + completion, a pair's
    prompt in both of its rows) right-padded and run whole, padding masked out."""
    with moe.recording() as logits:
        mx.eval(model(mx.array(batch.tokens)))
    mask = np.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]
    return numpy_load_balancing_loss([np.asarray(x) for x in logits], mask, TOP_K)


def test_load_balancing_loss_is_transformers_formula():
    rng = np.random.default_rng(0)
    for e, k, n_layers, n in ((4, 2, 3, 18), (8, 2, 2, 15), (16, 4, 4, 12), (8, 1, 2, 4)):
        layers = [rng.normal(size=(n, e)).astype(np.float32) for _ in range(n_layers)]
        mask = rng.random(n) < 0.7
        ours = moe.load_balancing_loss([mx.array(x) for x in layers], e, k, mx.array(mask))
        assert float(ours) == pytest.approx(numpy_load_balancing_loss(layers, mask, k), abs=1e-5)
        # A weight of 2 counts a token twice: the same as running its row twice.
        twice = np.where(np.arange(n) < 3, 2.0, 1.0)
        doubled = [np.concatenate([x[:3], x]) for x in layers]
        ours = moe.load_balancing_loss([mx.array(x) for x in layers], e, k, mx.array(twice))
        assert float(ours) == pytest.approx(
            numpy_load_balancing_loss(doubled, np.ones(n + 3), k), abs=1e-5
        )
    balanced = np.zeros((8, 4), dtype=np.float32)  # equal logits: every expert equally likely
    assert float(moe.load_balancing_loss([mx.array(balanced)], 4, 2)) == pytest.approx(2.0)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_routers_record_and_packed_rows_match_padded(model_type):
    model = build(model_type)
    router = moe.install(model)
    sparse = 1 if model_type == "qwen3_moe" else 2  # its first layer is dense (mlp_only_layers)
    assert (router.blocks, router.num_experts, router.top_k) == (sparse, EXPERTS, TOP_K)
    rng = np.random.default_rng(1)
    from mlx_pref.data import PairExample

    examples = [
        PairExample(*(tuple(int(t) for t in rng.integers(3, 60, n)) for n in (5 + i, 3 + i, 4)))
        for i in range(3)
    ]
    batch = collate(examples)
    with moe.recording() as logits:
        packed = packed_logps(model, batch)
    assert packed is not None and len(logits) == sparse
    padded = padded_logps(model, batch)
    np.testing.assert_allclose(np.asarray(packed.sums), np.asarray(padded.sums), atol=1e-5)
    # The packed row runs each prompt once and weighs its tokens twice: TRL's value.
    aux = router.loss(logits, packed.routed)
    assert float(aux) == pytest.approx(trl_aux_loss(model, batch), abs=1e-5)
    with moe.recording() as outside:  # nothing recorded when nobody asks
        pass
    model(mx.array(batch.tokens))
    assert outside == []


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_training_logs_aux_loss_equal_to_trl_computation(moe_run, loss, tmp_path, prefs):
    overrides = {"loss": loss}
    if loss == "kto":  # unpaired rows: every row its own prompt
        rows = [json.loads(line) for line in prefs[0].read_text().splitlines()]
        unpaired = tmp_path / "unpaired.jsonl"
        unpaired.write_text(
            "".join(
                json.dumps({"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"})
                + "\n"
                for r in rows
                for key in ("chosen", "rejected")
            )
        )
        overrides.update(data=str(unpaired), eval_data=None, batch_size=4)
    trainer = Trainer(moe_run(**overrides), verbose=False)
    assert trainer.objective.router is not None
    expected = []
    step = trainer.train_step

    def computed_first(batches):  # with the weights the step itself starts from
        expected.append(trl_aux_loss(trainer.model, batches[0]))
        return step(batches)

    trainer.train_step = computed_first
    trainer.train()
    records = read_metrics(trainer.run_dir)
    logged = [r["aux_loss"] for r in records if "loss" in r]
    assert logged == pytest.approx(expected, abs=1e-5) and len(expected) == 3
    assert len(set(logged)) == 3  # the router's adapter moves: a new value each step
    assert all(1.9 < v < 2.5 for v in logged)  # top-2 of 4 balanced is 2
    if loss == "sigmoid":  # TRL adds it to the evaluation loss too
        assert [r["step"] for r in records if "eval/aux_loss" in r] == [0, 3]


def test_zero_coefficient_gives_the_plain_preference_gradients(moe_run):
    trainer = Trainer(moe_run(router_aux_loss_coef=0.0), verbose=False)
    obj = trainer.objective
    assert obj.router is None  # nothing installed: the model runs as mlx-lm wrote it
    for _, m in trainer.model.named_modules():  # move off zero: every adapter matters
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    (batch,) = trainer.step_batches(0)
    ctx = batch_context(obj, batch, "train", trainer.train_set)
    (off_loss, off_metrics), off = loss_and_grad(obj)(batch, ctx)
    assert "aux_loss" not in off_metrics
    b = batch.num_examples

    def dpo(_):  # the sigmoid DPO loss written out, from the policy's summed log-probs
        logps = padded_logps(trainer.model, batch).sums
        margin = (logps[:b] - ctx.ref[:b]) - (logps[b:] - ctx.ref[b:])
        return -nn.log_sigmoid(cfg_beta * margin).mean()

    cfg_beta = obj.beta
    plain_loss, plain = nn.value_and_grad(trainer.model, dpo)(None)
    tol = NUMERICS.tolerance(1e-6)  # the step against the loss written out: same math
    assert float(off_loss) == pytest.approx(float(plain_loss), abs=tol)
    off, plain = dict(tree_flatten(off)), dict(tree_flatten(plain))
    assert off.keys() == plain.keys()
    for key in off:
        np.testing.assert_allclose(np.asarray(off[key]), np.asarray(plain[key]), atol=tol)

    coef = 0.5
    obj.config = config_from_dict({**obj.config.to_dict(), "router_aux_loss_coef": coef})
    obj.router = moe.install(trainer.model)
    (on_loss, on_metrics), on = loss_and_grad(obj)(batch, ctx)
    on = dict(tree_flatten(on))
    assert float(on_loss) == pytest.approx(float(off_loss) + coef * float(on_metrics["aux_loss"]))

    def aux_only(batch, ctx):
        return forward(obj, batch, ctx, train=True)[1]["aux_loss"]

    aux = dict(tree_flatten(nn.value_and_grad(trainer.model, aux_only)(batch, ctx)[1]))
    router_keys = [k for k in on if "block_sparse_moe.gate" in k]
    assert router_keys and all(float(mx.abs(aux[k]).max()) > 0 for k in router_keys)
    for key in on:
        np.testing.assert_allclose(
            np.asarray(on[key]), np.asarray(off[key] + coef * aux[key]), atol=tol, err_msg=key
        )


def test_grad_checkpoint_keeps_the_router_gradients(moe_run):
    grads = []
    for checkpoint in (False, True):
        trainer = Trainer(
            moe_run(grad_checkpoint=checkpoint, router_aux_loss_coef=0.5), verbose=False
        )
        for _, m in trainer.model.named_modules():
            if hasattr(m, "lora_b"):
                m.lora_b = mx.ones(m.lora_b.shape) * 0.05
        (batch,) = trainer.step_batches(0)
        ctx = batch_context(trainer.objective, batch, "train", trainer.train_set)
        (_, metrics), g = loss_and_grad(trainer.objective)(batch, ctx)
        grads.append((float(metrics["aux_loss"]), dict(tree_flatten(g))))
    (aux, plain), (aux_ckpt, checkpointed) = grads
    tol = NUMERICS.tolerance(1e-6)  # recomputed blocks: the same math, other kernels
    assert aux == pytest.approx(aux_ckpt, abs=tol)
    for key in plain:
        np.testing.assert_allclose(
            np.asarray(plain[key]), np.asarray(checkpointed[key]), atol=tol, err_msg=key
        )


def test_adapters_on_router_and_experts_keep_mlx_lm_names(moe_run, tiny_mixtral):
    cfg = moe_run(max_steps=2)
    trainer = Trainer(cfg, verbose=False)
    trainer.train()
    keys = json.loads((Path(cfg.output) / "adapter_config.json").read_text())["lora_parameters"]
    assert keys["keys"] == [
        "block_sparse_moe.gate",
        "block_sparse_moe.switch_mlp.up_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    gate = trainer.model.layers[0].block_sparse_moe.gate
    assert type(gate).__name__ == "LoRALinear" and getattr(gate, "records_router_logits", False)
    tokens = mx.array(collate(trainer.eval_set.examples[:2]).tokens)
    theirs, _ = load(str(tiny_mixtral), adapter_path=cfg.output)
    assert float(mx.abs(trainer.model(tokens) - theirs(tokens)).max()) == 0.0


def test_target_modules_name_moe_layers(tiny_mixtral):
    from mlx_pref.adapters import adapter_config, layer_keys
    from mlx_pref.config import LoraConfig

    model = build("qwen2_moe")
    assert layer_keys(model, ["gate"]) == ["mlp.gate"]  # the router, not shared_expert_gate
    assert layer_keys(model, ["switch_mlp.gate_proj"]) == ["mlp.switch_mlp.gate_proj"]
    assert "mlp.shared_expert.gate_proj" in layer_keys(model, ["gate_proj"])
    with pytest.raises(ModelError, match="available: .*gate.*up_proj"):
        layer_keys(model, ["router"])
    with pytest.raises(ModelError, match="no DoRA for mixture-of-experts layers"):
        adapter_config(model, LoraConfig(target_modules=["switch_mlp.up_proj"], dora=True))


def test_grad_checkpoint_records_each_router_once():
    model = build("olmoe")
    moe.install(model)
    enable_grad_checkpoint(model)
    tokens = mx.array([[5, 6, 7, 8]])
    with moe.recording() as logits:
        model(tokens)
    assert len(logits) == 2 and logits[0].shape == (4, EXPERTS)  # OLMoE flattens (B*L, E)


def test_full_fine_tuning_trains_the_router_too(moe_run):
    trainer = Trainer(moe_run(fine_tune="full", learning_rate=1e-4), verbose=False)
    assert trainer.objective.router is not None
    before = np.asarray(trainer.model.layers[0].block_sparse_moe.gate.weight)
    batches = trainer.step_batches(0)
    expected = trl_aux_loss(trainer.model, batches[0])  # from the weights the step starts at
    result = trainer.train_step(batches)
    assert float(result.metrics["aux_loss"]) == pytest.approx(expected, abs=1e-5)
    after = np.asarray(trainer.model.layers[0].block_sparse_moe.gate.weight)
    assert not np.array_equal(before, after)


def test_an_architecture_without_a_table_entry_trains_without_the_aux_loss(moe_run, monkeypatch):
    monkeypatch.delitem(moe.SPARSE_BLOCKS, "mixtral")
    notes = []
    trainer = Trainer(moe_run(), verbose=False)
    assert trainer.objective.router is None
    from mlx_pref.train.step import make_objective

    make_objective(
        trainer.config, trainer.model, trainer.objective.loss, trainer.reference,
        trainer.train_set, notes.append,
    )  # fmt: skip
    assert notes == [
        "note: mlx-pref does not know where mixtral routes its tokens: training without the "
        "router's load-balancing loss (architectures with one: qwen2_moe, qwen3_moe, olmoe)"
    ]
    assert "aux_loss" not in trainer.train_step(trainer.step_batches(0)).metrics
