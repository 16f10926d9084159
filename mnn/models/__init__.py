"""Ready-made models, and a registry that finds each by name: ``mlp``, ``cnn``, ``gpt``, ``char-rnn``.

A saved file names its model in ``config["kind"]``; :func:`model_from_config`
looks the name up in :data:`MODELS` and rebuilds the model from the rest of
the config. A new model is a file here and one line in the registry.
"""

from __future__ import annotations

from mnn.models.char_rnn import CharRNN
from mnn.models.cnn import CNN
from mnn.models.gpt import GPT, GPTConfig
from mnn.models.mlp import MLP

# name -> (builds the model from the saved config's keyword arguments, the arguments it takes)
MODELS = {
    "mlp": (lambda **kw: MLP(**kw), ("in_features", "hidden", "num_classes", "activation", "dropout", "seed")),
    "cnn": (lambda **kw: CNN(**kw), ("in_channels", "image_size", "channels", "hidden", "num_classes", "dropout",
                                     "seed")),
    "gpt": (lambda **kw: GPT(GPTConfig(**kw)), tuple(GPTConfig.__dataclass_fields__)),
    "char-rnn": (lambda **kw: CharRNN(**kw), ("vocab_size", "n_embd", "hidden_size", "num_layers", "cell", "dropout",
                                             "seed")),
}


def model_kind(config: dict) -> str | None:
    """The registry name of a saved config (files from before ``kind`` was written hold a GPT's ``n_layer``)."""
    return config.get("kind", "gpt" if "n_layer" in config else None)


def model_from_config(config: dict):
    """Rebuild a model (untrained) from the ``config`` saved beside its weights."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a JSON object, got {type(config).__name__}")
    kind = model_kind(config)
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r} in config; known: {sorted(MODELS)}")
    build, arguments = MODELS[kind]
    return build(**{key: config[key] for key in arguments if key in config})


__all__ = ["CNN", "GPT", "MLP", "CharRNN", "MODELS", "GPTConfig", "model_from_config", "model_kind"]
