"""Pretraining and fine-tuning a biLM with bilm-tf's semantics (data, loss, trainer, evaluation, export, CLI).

Nothing in the embedding path imports the trainer: its names load on first use (PEP 562), so the ``elmo-jax``
parser, which registers the train commands, does not import optax and the trainer (~70 ms of every embed).
"""

__all__ = ["TrainConfig", "TrainError", "Trainer", "load_config"]


def __getattr__(name: str):
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
