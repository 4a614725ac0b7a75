import pytest

from models.config import ConfigError
from models.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = get_preset(name)
    assert cfg.name == name
    assert cfg.num_moe_layers >= 1


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_heads=6, num_kv_heads=4), "num_heads"),
        (dict(experts_per_token=9), "experts_per_token"),
        (dict(head_dim=15), "head_dim"),
        (dict(d_model=0), "d_model"),
        (dict(num_expert_groups=3), "num_expert_groups"),
        (dict(first_dense_layers=2), "first_dense_layers"),
        (dict(num_shared_experts=1, shared_d_ff=0), "shared_d_ff"),
        (dict(dtype="int8"), "dtype"),
        (dict(mla_cache="compressed"), "mla_cache"),
        (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
        (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
        (dict(partial_rotary_factor=0.1875), "partial_rotary_factor"),  # 3 rotary dims: odd
    ],
)
def test_inconsistent_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        get_preset("tiny-mixtral").replace(**changes)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="tiny-mixtral"):
        get_preset("no-such-model")


def test_partial_rope_dims_and_where_it_is_refused():
    glm = get_preset("tiny-glm4-moe")
    assert (glm.head_dim, glm.rope_dim) == (32, 16)
    assert glm.replace(partial_rotary_factor=0.28).rope_dim == 8  # int(8.96), as transformers
    assert get_preset("tiny-mixtral").rope_dim == 16  # the default rotates every dim
    with pytest.raises(ConfigError, match="partial_rotary_factor.*qk_rope_head_dim"):
        get_preset("tiny-deepseek-v3").replace(partial_rotary_factor=0.5)
