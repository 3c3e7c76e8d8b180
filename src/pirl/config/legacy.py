"""Config keys of the earlier layout, where the method's and the bank's keys lived in ``loss``.

Configs written before (YAML files, presets, a run's ``config.json``, a checkpoint's ``config``) and overrides such
as ``loss.method=npid`` still load: :func:`translate_tree` and :func:`translate_override` move each old key to its
place (:data:`RENAMED`). No torch here.
"""

from __future__ import annotations

import re
from typing import Any

from pirl.errors import PirlError

#: old key -> new key
RENAMED = {
    "loss.method": "method.name",
    "loss.pretext": "method.pretext",
    "loss.lam": "method.lam",
    "loss.transformed_bn_stats": "method.transformed_bn_stats",
    "loss.permutations": "method.permutations",
    "loss.bank": "bank.kind",
    "loss.negatives": "bank.negatives",
    "loss.bank_momentum": "bank.momentum",
    "loss.bank_dtype": "bank.dtype",
    "loss.bank_init": "bank.init",
    "loss.exclude_positive": "bank.exclude_positive",
    "loss.share_negatives": "bank.share_negatives",
}
OLD_NAMES = {new: old for old, new in RENAMED.items()}
_INTERPOLATION = re.compile(r"\$\{\s*(loss\.\w+)\s*\}")


def _interpolations(value: Any) -> Any:
    """``${loss.lam}`` in a value -> ``${method.lam}``."""
    if isinstance(value, str) and "${" in value:
        return _INTERPOLATION.sub(lambda m: "${" + RENAMED.get(m.group(1), m.group(1)) + "}", value)
    if isinstance(value, dict):
        return {k: _interpolations(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolations(v) for v in value]
    return value


def translate_tree(tree: Any, spelled: dict[str, str] | None = None) -> Any:
    """A nested config dict in the current layout (a new dict; ``tree`` is left as it was). Anything else comes
    back unchanged. ``spelled`` collects ``{new key: old key}`` for every key moved.

    A key given both under its old and its new name with different values is refused.
    """
    if not isinstance(tree, dict):
        return tree
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    loss = out.get("loss")
    if isinstance(loss, dict):
        for old, new in RENAMED.items():
            name = old.split(".", 1)[1]
            section, key = new.split(".", 1)
            if name not in loss or not isinstance(out.setdefault(section, {}), dict):
                continue  # a section that is no mapping: the schema names the problem
            target = out[section]
            value = loss.pop(name)
            if key in target and target[key] != value:
                raise PirlError(
                    f"the config gives both {old}={value!r} and {new}={target[key]!r}; {old} is the old "
                    f"name of {new}: keep one"
                )
            target[key] = value
            if spelled is not None:
                spelled[new] = old
    return _interpolations(out)


def translate_override(item: str, spelled: dict[str, str] | None = None) -> str:
    """``loss.method=npid`` -> ``method.name=npid`` (any other ``key=value`` as it was, bar interpolations)."""
    key, sep, value = item.partition("=")
    if not sep:
        return item
    new = RENAMED.get(key)
    if new is not None and spelled is not None:
        spelled[new] = key
    return f"{new or key}={_interpolations(value)}"
