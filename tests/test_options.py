import json

import pytest

from elmo_jax import BiLMOptions, OptionsError


def _raw():
    return {
        "lstm": {"dim": 8, "projection_dim": 4, "n_layers": 2, "cell_clip": 3, "proj_clip": 3,
                 "use_skip_connections": True},
        "char_cnn": {"embedding": {"dim": 4}, "filters": [[1, 4], [2, 8]], "n_highway": 1, "n_characters": 262,
                     "max_characters_per_token": 50, "activation": "relu"},
    }


def test_fixture_options(elmo_tiny):
    options = BiLMOptions.from_path(elmo_tiny / "options.json")
    assert options.lstm.dim == 64 and options.lstm.projection_dim == 16 and options.char_cnn.n_filters == 124
    assert options.output_dim == 32 and options.n_representation_layers == 3
    assert hash(options)  # a static jit argument


def test_round_trip():
    options = BiLMOptions.from_dict(_raw())
    assert BiLMOptions.from_dict(options.to_dict()) == options


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda r: r["lstm"].pop("dim"), "lstm.dim"),
        (lambda r: r["char_cnn"].update(activation="gelu"), "char_cnn.activation"),
        (lambda r: r["char_cnn"].update(n_characters=263), "char_cnn.n_characters"),
        (lambda r: r["char_cnn"].update(filters=[[1, "a"]]), "char_cnn.filters"),
        (lambda r: r["lstm"].update(use_skip_connections="yes"), "lstm.use_skip_connections"),
        (lambda r: r["lstm"].update(n_layers=0), "lstm.n_layers"),
    ],
)
def test_errors_name_the_field(change, field):
    raw = _raw()
    change(raw)
    with pytest.raises(OptionsError, match=field.replace(".", r"\.")):
        BiLMOptions.from_dict(raw)


def test_file_errors(tmp_path):
    with pytest.raises(OptionsError, match="not found"):
        BiLMOptions.from_path(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OptionsError, match="bad.json"):
        BiLMOptions.from_path(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(OptionsError, match="JSON object"):
        BiLMOptions.from_path(tmp_path / "list.json")
