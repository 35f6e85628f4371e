"""Prompt templates: CoOp's single hand-crafted template per dataset and template ensembles.

A template is a format string with one ``{}`` for the class name (underscores replaced by spaces).
"""

from __future__ import annotations

from vladapt.errors import ConfigError

# CoOp's zero-shot CLIP templates (trainers/zsclip.py of the CoOp code base), keyed by vladapt's
# dataset names; datasets not listed use DEFAULT_TEMPLATE.
DATASET_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
DEFAULT_TEMPLATE = "a photo of a {}."


def _open_clip_ensemble(attr: str) -> list[str]:
    from open_clip import zero_shot_metadata

    # open_clip stores its templates as lambdas; calling them with "{}" yields format strings.
    return [fn("{}") for fn in getattr(zero_shot_metadata, attr)]


ENSEMBLES = {
    "openai_imagenet": lambda: _open_clip_ensemble("OPENAI_IMAGENET_TEMPLATES"),
    "simple_imagenet": lambda: _open_clip_ensemble("SIMPLE_IMAGENET_TEMPLATES"),
}


def dataset_template(dataset: str | None) -> str:
    """CoOp's single template for ``dataset`` (the default template for unknown or custom data)."""
    return DATASET_TEMPLATES.get((dataset or "").lower(), DEFAULT_TEMPLATE)


def resolve_templates(spec: str | list[str] | None, dataset: str | None = None) -> list[str]:
    """Templates from a spec: ``None``/``"dataset"`` (CoOp's per-dataset template), an ensemble name
    (``openai_imagenet``: CLIP's 80, ``simple_imagenet``: 7), a single template or a list of them."""
    if spec is None or spec == "dataset":
        return [dataset_template(dataset)]
    if isinstance(spec, str):
        if spec in ENSEMBLES:
            return ENSEMBLES[spec]()
        spec = [spec]
    templates = list(spec)
    for t in templates:
        if t.count("{}") != 1:
            raise ConfigError(
                f"template {t!r} must contain exactly one '{{}}' for the class name; or use one of "
                f"'dataset', {sorted(ENSEMBLES)}"
            )
    if not templates:
        raise ConfigError("no templates given")
    return templates


def format_prompts(template: str, classnames: list[str]) -> list[str]:
    return [template.format(c.replace("_", " ")) for c in classnames]
