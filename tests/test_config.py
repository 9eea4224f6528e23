"""Configs: every validation error names its field; presets; --set overrides; serialisation."""

import dataclasses
import json

import jax
import pytest
from flax import nnx

from jaxeff import Transformer
from jaxeff.models import count_params
from jaxeff.config import PRESETS, Config, DataConfig, MeshConfig, ModelConfig, TrainConfig, get_preset


@pytest.mark.parametrize("make, field", [
    (lambda: ModelConfig(n_heads=4, n_kv_heads=3), "ModelConfig.n_kv_heads"),
    (lambda: ModelConfig(n_heads=8, n_kv_heads=16), "ModelConfig.n_kv_heads"),
    (lambda: ModelConfig(d_model=30, n_heads=2, n_kv_heads=2), "ModelConfig.head_dim"),  # 15 is odd
    (lambda: ModelConfig(head_dim=7), "ModelConfig.head_dim"),
    (lambda: ModelConfig(head_dim=-2), "ModelConfig.head_dim"),
    (lambda: ModelConfig(d_model=100, n_heads=3, n_kv_heads=3), "ModelConfig.n_heads"),
    (lambda: ModelConfig(d_model=0), "ModelConfig.d_model"),
    (lambda: ModelConfig(vocab_size=64.0), "ModelConfig.vocab_size"),
    (lambda: ModelConfig(n_layers=True), "ModelConfig.n_layers"),
    (lambda: ModelConfig(rope_style="neox"), "ModelConfig.rope_style"),
    (lambda: ModelConfig(rope_base=1.0), "ModelConfig.rope_base"),
    (lambda: ModelConfig(dtype="float64"), "ModelConfig.dtype"),
    (lambda: ModelConfig(attention_impl="flash"), "ModelConfig.attention_impl"),
    (lambda: ModelConfig(norm_eps=0.0), "ModelConfig.norm_eps"),
    (lambda: TrainConfig(lr=-1e-3), "TrainConfig.lr"),
    (lambda: TrainConfig(lr=0.0), "TrainConfig.lr"),
    (lambda: TrainConfig(steps=10, warmup_steps=10), "TrainConfig.warmup_steps"),
    (lambda: TrainConfig(steps=10, warmup_steps=-1), "TrainConfig.warmup_steps"),
    (lambda: TrainConfig(batch_size=6, grad_accum=4), "TrainConfig.grad_accum"),
    (lambda: TrainConfig(min_lr_ratio=1.5), "TrainConfig.min_lr_ratio"),
    (lambda: TrainConfig(schedule="linear"), "TrainConfig.schedule"),
    (lambda: TrainConfig(b2=1.0), "TrainConfig.b2"),
    (lambda: TrainConfig(wsd_decay_fraction=0.0), "TrainConfig.wsd_decay_fraction"),
    (lambda: TrainConfig(keep_ckpts=0), "TrainConfig.keep_ckpts"),
    (lambda: DataConfig(tokenizer="word"), "DataConfig.tokenizer"),
    (lambda: DataConfig(bpe_vocab_size=100), "DataConfig.bpe_vocab_size"),
    (lambda: DataConfig(val_fraction=1.0), "DataConfig.val_fraction"),
    (lambda: DataConfig(corpus=""), "DataConfig.corpus"),
    (lambda: MeshConfig(data=-1, fsdp=-1), "MeshConfig."),
    (lambda: MeshConfig(tensor=0), "MeshConfig.tensor"),
    (lambda: MeshConfig(fsdp=-2), "MeshConfig.fsdp"),
    (lambda: Config(model=ModelConfig(max_seq_len=128), train=TrainConfig(seq_len=256)), "train.seq_len"),
])
def test_validation_errors_name_the_field(make, field):
    with pytest.raises(ValueError) as info:
        make()
    assert field in str(info.value)


def test_mesh_two_wildcards_message():
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=2, fsdp=-1, tensor=-1)


def test_mesh_resolve():
    assert MeshConfig().resolve(8) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert MeshConfig(data=2, fsdp=4, tensor=1).resolve(8) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    assert MeshConfig(data=1, expert=-1).resolve(8) == {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
    with pytest.raises(ValueError, match="do not divide the 8 available devices"):
        MeshConfig(data=3).resolve(8)
    with pytest.raises(ValueError, match="use 4 devices but 8 are available"):
        MeshConfig(data=2, fsdp=2).resolve(8)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"'nope'.*unknown preset.*available: \['1b', 'small', 'tiny'\]"):
        get_preset("nope")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_construct_and_count_parameters(name):
    cfg = get_preset(name)
    assert isinstance(cfg, Config) and cfg.name == name
    assert Config.from_dict(cfg.to_dict()) == cfg
    # count_params agrees with the model the preset builds (shapes only, nothing allocated).
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == count_params(cfg)
    assert cfg.resolved_run_dir == f"runs/{name}"


def test_small_preset_is_about_138m_parameters():
    assert 130e6 < count_params(get_preset("small")) < 145e6
    assert 0.95e9 < count_params(get_preset("1b")) < 1.05e9


@pytest.mark.parametrize("item, match", [
    ("train.stepz=3", r"TrainConfig has no field 'stepz'"),
    ("model.depth=3", r"ModelConfig has no field 'depth'"),
    ("optim.lr=0.1", r"unknown section 'optim'"),
    ("train.lr.x=0.1", r"unknown section 'lr'"),
    ("train.steps=abc", r"cannot read 'abc' as int"),
    ("train.steps=2.5", r"cannot read '2.5' as int"),
    ("train.lr=fast", r"cannot read 'fast' as float"),
    ("model.tie_embeddings=maybe", r"cannot read 'maybe' as bool"),
    ("train.steps", r"expected key=value"),
    ("model=3", r"'model' is a section, not a field"),
    ("model.rope_style=neox", r"ModelConfig.rope_style"),
    ("train.steps=0", r"TrainConfig.steps"),
])
def test_override_errors(item, match):
    with pytest.raises(ValueError, match=match):
        get_preset("tiny").override([item])


def test_override_round_trip():
    base = get_preset("tiny")
    cfg = base.override(["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "train.lr=1e-2",
                         "model.tie_embeddings=false", "data.corpus=a.txt,b/*.md", "mesh.data=2",
                         "mesh.fsdp=-1", "train.steps=3", "train.warmup_steps=1", "name=exp",
                         "run_dir=/tmp/x", "model.rope_base=500", "train.mask_documents=0"])
    assert cfg.model.d_model == 64 and cfg.model.n_heads == 4 and cfg.model.n_kv_heads == 2
    assert cfg.train.lr == 0.01 and isinstance(cfg.train.lr, float)
    assert cfg.model.tie_embeddings is False and cfg.train.mask_documents is False
    assert cfg.model.rope_base == 500.0 and isinstance(cfg.model.rope_base, float)
    assert cfg.data.corpus == "a.txt,b/*.md"
    assert cfg.mesh == MeshConfig(data=2, fsdp=-1, tensor=1)
    assert cfg.train.steps == 3 and cfg.train.warmup_steps == 1
    assert cfg.name == "exp" and cfg.resolved_run_dir == "/tmp/x"
    # Everything not set keeps the preset's value; the preset itself is untouched.
    assert cfg.model.vocab_size == base.model.vocab_size and cfg.train.batch_size == base.train.batch_size
    assert base.model.d_model == 192 and base.train.steps == 600
    # Overrides are validated together: steps=3 alone would clash with the preset's warmup of 50.
    with pytest.raises(ValueError, match="warmup_steps"):
        base.override(["train.steps=3"])
    # Spaces around key and value are tolerated; the last assignment wins.
    assert base.override([" train.steps = 700 ", "train.steps=800"]).train.steps == 800
    assert base.override([]) == base


def test_to_dict_from_dict_and_json():
    cfg = get_preset("tiny").override(["model.tie_embeddings=false", "train.schedule=wsd"])
    d = cfg.to_dict()
    assert d["model"]["tie_embeddings"] is False and d["train"]["schedule"] == "wsd"
    assert set(d) == {"name", "model", "data", "train", "mesh", "recursion", "run_dir"}
    assert Config.from_dict(d) == cfg
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg
    # Missing sections take their defaults.
    assert Config.from_dict({"name": "x"}) == Config(name="x")
    # A bad value inside a dict is caught by the same validation.
    d["model"]["n_kv_heads"] = 5
    with pytest.raises(ValueError, match="ModelConfig.n_kv_heads"):
        Config.from_dict(d)


def test_configs_are_frozen():
    cfg = get_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = TrainConfig()


# --- RecursionConfig (recursive transformers and Mixture-of-Recursions) ---------------------------

from jaxeff.config import RecursionConfig  # noqa: E402


def test_recursion_defaults_and_capacities():
    rc = RecursionConfig()
    assert not rc.enabled and rc.resolved_capacities == (1.0,)
    rc = RecursionConfig(strategy="middle_cycle", n_recursions=3, routing="expert")
    assert rc.enabled and rc.resolved_capacities == pytest.approx((1.0, 2 / 3, 1 / 3))
    custom = RecursionConfig(strategy="cycle", n_recursions=3, routing="expert", capacities=" 1, 0.5 ,0.25")
    assert custom.resolved_capacities == (1.0, 0.5, 0.25)
    assert RecursionConfig(strategy="cycle", n_recursions=2, capacities="0.5,0.5").resolved_capacities == (0.5, 0.5)


@pytest.mark.parametrize("make, match", [
    (lambda: RecursionConfig(strategy="cycle", n_recursions=3, capacities="1,0.5,0.75"), "capacities.*descending"),
    (lambda: RecursionConfig(strategy="cycle", n_recursions=3, capacities="1,0.5,0"), r"capacities.*\(0, 1\]"),
    (lambda: RecursionConfig(strategy="cycle", n_recursions=3, capacities="1.5,1,0.5"), r"capacities.*\(0, 1\]"),
    (lambda: RecursionConfig(strategy="cycle", n_recursions=3, capacities="1,-0.5,-1"), r"capacities.*\(0, 1\]"),
    (lambda: RecursionConfig(strategy="cycle", n_recursions=3, capacities="1,0.5"), "capacities.*one value per"),
    (lambda: RecursionConfig(strategy="cycle", n_recursions=2, capacities="1,0.5,0.25"), "capacities.*one value"),
    (lambda: RecursionConfig(strategy="cycle", n_recursions=2, capacities="1,half"), "capacities.*numbers"),
    (lambda: RecursionConfig(strategy="sequence", n_recursions=2, routing="expert"), "RecursionConfig.routing"),
    (lambda: RecursionConfig(strategy="middle_sequence", n_recursions=2, routing="token"),
     "RecursionConfig.routing"),
    (lambda: RecursionConfig(strategy="cycle", n_recursions=1, routing="token"), "RecursionConfig.n_recursions"),
    (lambda: RecursionConfig(strategy="none", n_recursions=2), "RecursionConfig.strategy"),
    (lambda: RecursionConfig(lora_rank=4), "RecursionConfig.strategy"),
    (lambda: RecursionConfig(routing="expert"), "RecursionConfig.strategy"),
    (lambda: RecursionConfig(strategy="cycle", n_recursions=2, kv_strategy="cross"), "RecursionConfig.kv_strategy"),
    (lambda: RecursionConfig(strategy="loop"), "RecursionConfig.strategy"),
    (lambda: RecursionConfig(strategy="cycle", routing="moe"), "RecursionConfig.routing"),
    (lambda: RecursionConfig(strategy="cycle", router_func="relu"), "RecursionConfig.router_func"),
    (lambda: RecursionConfig(strategy="cycle", balance="aux"), "RecursionConfig.balance"),
    (lambda: RecursionConfig(strategy="cycle", n_recursions=0), "RecursionConfig.n_recursions"),
    (lambda: RecursionConfig(strategy="cycle", lora_rank=-1), "RecursionConfig.lora_rank"),
    (lambda: RecursionConfig(strategy="cycle", router_alpha=0.0), "RecursionConfig.router_alpha"),
    (lambda: RecursionConfig(strategy="cycle", aux_loss_coef=-1e-3), "RecursionConfig.aux_loss_coef"),
    (lambda: RecursionConfig(strategy="cycle", bias_update_rate=-1.0), "RecursionConfig.bias_update_rate"),
])
def test_recursion_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("n_layers, strategy, n_r, ok", [
    (6, "middle_cycle", 3, False),  # middle depth 4
    (5, "middle_cycle", 3, True),
    (8, "middle_sequence", 3, True),
    (8, "middle_sequence", 4, False),
    (6, "cycle", 3, True),
    (6, "cycle", 4, False),
    (4, "sequence", 4, True),
    (2, "middle_cycle", 1, False),  # nothing left to share
    (3, "cycle", 6, False),
])
def test_recursion_depth_checked_by_config(n_layers, strategy, n_r, ok):
    make = lambda: Config(model=ModelConfig(n_layers=n_layers),  # noqa: E731
                          recursion=RecursionConfig(strategy=strategy, n_recursions=n_r))
    if ok:
        assert make().recursion.n_recursions == n_r
    else:
        with pytest.raises(ValueError, match="RecursionConfig.n_recursions") as err:
            make()
        assert (f"n_layers - 2 = {n_layers - 2}" if strategy.startswith("middle_") else f"n_layers = {n_layers}") \
            in str(err.value)


def test_recursion_overrides():
    cfg = get_preset("tiny").override(["model.n_layers=5", "recursion.strategy=middle_cycle",
                                       "recursion.n_recursions=3", "recursion.routing=expert",
                                       "recursion.capacities=1,0.5,0.25", "recursion.aux_router=true",
                                       "recursion.router_alpha=0.5", "recursion.lora_rank=2",
                                       "recursion.kv_strategy=share"])
    rc = cfg.recursion
    assert rc == RecursionConfig(strategy="middle_cycle", n_recursions=3, routing="expert", capacities="1,0.5,0.25",
                                 aux_router=True, router_alpha=0.5, lora_rank=2, kv_strategy="share")
    assert isinstance(rc.n_recursions, int) and isinstance(rc.router_alpha, float) and rc.aux_router is True
    assert rc.resolved_capacities == (1.0, 0.5, 0.25)
    # Round trip through a dict and JSON keeps the recursion section.
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg
    # The whole config is validated together: the tiny preset's 4 layers leave a middle depth of 2.
    with pytest.raises(ValueError, match="RecursionConfig.n_recursions"):
        get_preset("tiny").override(["recursion.strategy=middle_cycle", "recursion.n_recursions=3"])
    with pytest.raises(ValueError, match="RecursionConfig.capacities"):
        cfg.override(["recursion.capacities=1,0.75"])
    with pytest.raises(ValueError, match="cannot read 'three' as int"):
        cfg.override(["recursion.n_recursions=three"])
    with pytest.raises(ValueError, match="RecursionConfig has no field 'depth'"):
        cfg.override(["recursion.depth=3"])


# --- issue 11: non-finite floats, the LoRA rank bound, config.json contents ------------------------

import math  # noqa: E402
import typing  # noqa: E402

from jaxeff.config import SECTIONS  # noqa: E402

_section_class = SECTIONS.__getitem__

_FLOAT_FIELDS = [(section, f.name) for section in ("model", "data", "train", "recursion")
                 for f in dataclasses.fields(_section_class(section))
                 if typing.get_type_hints(_section_class(section))[f.name] is float]


@pytest.mark.parametrize("section, name", _FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_field_rejects_non_finite_values(section, name, value):
    """Before the fix lr=inf/nan, clip_norm=nan, router_alpha=nan and others were accepted."""
    base = get_preset("tiny")
    if section == "recursion":
        base = base.override(["recursion.strategy=cycle"])
    with pytest.raises(ValueError, match=rf"{_section_class(section).__name__}\.{name}: must be a finite number"):
        base.override([f"{section}.{name}={value}"])


def test_float_fields_exist_in_every_section():
    assert {s for s, _ in _FLOAT_FIELDS} == {"model", "data", "train", "recursion"}
    assert ("train", "lr") in _FLOAT_FIELDS and ("recursion", "router_alpha") in _FLOAT_FIELDS


def test_lora_rank_is_bounded_by_the_matrices():
    """Before the fix lora_rank=100000 on d_model 192 built a 1358M-parameter model."""
    base = get_preset("tiny").override(["recursion.strategy=cycle", "recursion.n_recursions=2"])
    # tiny: d_model 192, 2 kv heads x head_dim 32 = 64, d_ff 512: the smallest matrix side is 64
    assert base.override(["recursion.lora_rank=64"]).recursion.lora_rank == 64
    with pytest.raises(ValueError, match=r"RecursionConfig\.lora_rank: must be <= 64, .*got 100000"):
        base.override(["recursion.lora_rank=100000"])
    with pytest.raises(ValueError, match=r"RecursionConfig\.lora_rank: must be <= 64"):
        base.override(["recursion.lora_rank=65"])


@pytest.mark.parametrize("d, match", [
    ({"model": {"depth": 3}}, r"ModelConfig has no field 'depth'"),
    ({"optim": {}}, r"unknown section 'optim'"),
    ({"train": 3}, r"section 'train' must be an object"),
    ({"train": {"lr": "fast"}}, r"TrainConfig\.lr: must be a number, got 'fast'"),
    ({"model": {"tie_embeddings": "yes"}}, r"ModelConfig\.tie_embeddings: must be true or false"),
    ({"model": {"head_dim": "8"}}, r"ModelConfig\.head_dim: must be an integer"),
    ({"data": {"corpus": 3}}, r"DataConfig\.corpus"),
])
def test_from_dict_errors_are_value_errors_naming_the_field(d, match):
    """Before the fix an unknown field raised TypeError (a traceback from the CLI)."""
    with pytest.raises(ValueError, match=match):
        Config.from_dict(d)


def test_non_finite_check_does_not_reject_finite_values():
    cfg = get_preset("tiny").override(["train.lr=1e-2", "model.rope_base=500000", "train.clip_norm=0"])
    assert math.isfinite(cfg.train.lr) and cfg.train.clip_norm == 0.0
