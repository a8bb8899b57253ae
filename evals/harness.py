"""lm-evaluation-harness model type ``attnedit``: any lm-eval task, with a recipe applied.

lm-eval (0.4.x) finds models in its own registry only, so this module must be
imported before lm-eval resolves ``--model attnedit``. Two ways:

    attnedit-lm-eval run --model attnedit \\
        --model_args pretrained=smollm2-135m-instruct,recipe=act-paper --tasks hellaswag

(`attnedit-lm-eval` is lm-eval's own command line with this module imported), or from Python::

    import attnedit.evals.harness, lm_eval
    lm_eval.simple_evaluate(model="attnedit", model_args="pretrained=...,recipe=...", tasks=[...])

Without ``recipe=`` the model runs unpatched (the baseline). The model is
loaded with `attnedit.load`, so aliases, local folders, .gguf files and
exported models all work; other HFLM arguments (batch_size, max_length, ...)
pass through.
"""

from __future__ import annotations

import logging

try:
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - depends on the optional extra
    raise ImportError("the lm-eval integration needs lm-evaluation-harness: pip install 'attnedit[lm-eval]'") from e

from attnedit.interventions import registry
from attnedit.loading import load
from attnedit.patch import Patch
from attnedit.recipes import load_recipe

log = logging.getLogger("attnedit")


def per_input(recipe) -> list[str]:
    """The recipe's methods that detect something in each input at prefill (`Method.per_input`).

    lm-eval pads batches on the right without an attention mask, so padding would enter the
    detection: recipes with such a method run one row at a time.
    """
    return [t for t in dict.fromkeys(s.type for s in recipe.interventions) if registry.get(t).per_input]


class AttneditLM(HFLM):
    """HFLM over a model loaded by `attnedit.load`, patched with a recipe for the whole evaluation.

    Args:
        pretrained: alias, hub id, local folder or .gguf file (default: smollm2-135m-instruct).
        recipe: recipe YAML path or built-in recipe name; None: unpatched.
        backend: kernel backend for the patch (auto, reference, triton).
        dtype, device, cache_dir: as for `attnedit.load`.
        **kwargs: passed to lm-eval's HFLM (batch_size, max_length, ...).
    """

    def __init__(
        self,
        pretrained: str = "smollm2-135m-instruct",
        recipe: str | None = None,
        backend: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        cache_dir: str | None = None,
        **kwargs,
    ):
        rec = load_recipe(recipe) if recipe else None
        model, tokenizer = load(pretrained, dtype=dtype, device=device, cache_dir=cache_dir)
        if rec is not None and per_input(rec) and str(kwargs.get("batch_size", 1)) != "1":
            log.warning(
                "recipe %s detects something in each input (%s): lm-eval's right padding would enter the "
                "detection, so batch_size is set to 1",
                recipe,
                ", ".join(per_input(rec)),
            )
            kwargs["batch_size"] = 1
        super().__init__(pretrained=model, tokenizer=getattr(tokenizer, "tokenizer", tokenizer), **kwargs)
        self.attnedit_recipe = rec
        self.attnedit_patch = Patch(model, rec, backend=backend).apply() if rec is not None else None

    def get_model_info(self) -> dict:
        info = super().get_model_info() if hasattr(super(), "get_model_info") else {}
        if self.attnedit_recipe is not None:
            info.update(
                attnedit_recipe=self.attnedit_recipe.to_dict(), attnedit_recipe_hash=self.attnedit_recipe.hash()
            )
        return info


if "attnedit" not in model_registry:  # `python -m attnedit.evals.harness` imports this module twice
    register_model("attnedit")(AttneditLM)


def main() -> None:
    """`attnedit-lm-eval`: lm-eval's command line, with the ``attnedit`` model type registered."""
    from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415

    cli_evaluate()


if __name__ == "__main__":
    main()
