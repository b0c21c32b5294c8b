"""The model the daemon serves: the config's model section, built and checked by surgeon_core.

``load_model`` is what ``surgeond run`` and ``surgeond config --check`` both call, so a mistake in
the model section (an unknown architecture, weights that do not fit, labels that disagree, a model
that cannot take the input size) is the same ConfigError, exit 2, in both places.
"""

from surgeon_core.errors import SurgeonError

from .config import ConfigError, ModelConfig

__all__ = ["model_spec", "load_model"]


def model_spec(config: ModelConfig):
    from surgeon_core.models.spec import ModelSpec

    pre = config.preprocess
    return ModelSpec(
        arch=config.arch, num_classes=config.num_classes, weights=config.weights,
        labels=config.labels, kwargs=dict(config.kwargs), python_path=tuple(config.python_path),
        crop=config.crop(), resize=pre.resize, mode=pre.mode(),
        mean=tuple(pre.mean) if pre.mean is not None else None,
        std=tuple(pre.std) if pre.std is not None else None, interpolation=pre.interpolation)


def load_model(config: ModelConfig):
    """The BuiltModel for ``config`` (CPU, eval mode), or ConfigError naming the fix."""
    from surgeon_core.models.spec import build_model

    try:
        return build_model(model_spec(config))
    except SurgeonError as exc:
        raise ConfigError("model: %s" % exc) from None
