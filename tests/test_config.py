import pytest

from gradlab.config import ConfigError, RunConfig, expand_grid, make_config, parse_init


def test_defaults_and_width_resolution():
    assert make_config().widths == (128, 128)
    assert make_config(depth=5, width=64).widths == (64,) * 4
    assert make_config(depth=3, widths=[128, 256]).layer_sizes == (784, 128, 256, 10)
    assert make_config(depth=1).widths == ()


def test_run_id_stable_and_sensitive():
    a = make_config(depth=3, widths=[128, 256])
    b = make_config(depth=3, widths=(128, 256))
    assert a.run_id() == b.run_id() and len(a.run_id()) == 12
    assert a.run_id() != make_config(depth=3, widths=[128, 256], seed=1).run_id()
    # canonical init spelling: normal:0.10 and normal:0.1 are the same run
    assert make_config(init="normal:0.10").run_id() == make_config(init="normal:0.1").run_id()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(depth=0), "depth"),
    (dict(depth=3, widths=[1, 2, 3]), "widths"),
    (dict(activation="foo"), "activation"),
    (dict(init="normal:abc"), "init"),
    (dict(init="normal"), "needs a parameter"),
    (dict(bias_init="xavier_uniform"), "bias_init"),
    (dict(lr=0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(batch_size=0), "batch_size"),
    (dict(epochs=0), "epochs"),
    (dict(depth=1000), "depth"),
    (dict(bogus=1), "unknown key"),
    (dict(width=64, widths=[64, 64]), "both"),
])
def test_bad_values_raise_one_line(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        make_config(**kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_parse_init():
    assert parse_init("normal:0.5") == ("normal", 0.5)
    assert parse_init("uniform:2") == ("uniform", 2.0)
    assert parse_init("orthogonal") == ("orthogonal", None)
    with pytest.raises(ConfigError):
        parse_init("uniform:-1")


def test_expand_grid_cross_product_and_dedup():
    runs = expand_grid({"depth": [3, 5], "activation": ["sigmoid", "relu"], "seed": [0, 1],
                        "epochs": 1})
    assert len(runs) == 8
    assert {(r.depth, r.activation, r.seed) for r in runs} == {
        (d, a, s) for d in (3, 5) for a in ("sigmoid", "relu") for s in (0, 1)}
    assert len(expand_grid({"seed": [0, 0]})) == 1
    assert expand_grid({"depth": 3, "widths": [128, 256]})[0].widths == (128, 256)
    assert len(expand_grid({"depth": 3, "widths": [[128, 256], [64, 64]]})) == 2
    with pytest.raises(ConfigError):
        expand_grid({"depth": []})


def test_frozen():
    with pytest.raises(AttributeError):
        RunConfig().depth = 5  # type: ignore[misc]
