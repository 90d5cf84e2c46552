"""Every public name has a docstring: `grpo_ar.__all__`, `grpo_ar.adapters.__all__`, and the
public methods and properties of the public classes (`help(Trainer.train)` says something)."""

import inspect
import pydoc

import pytest

import grpo_ar
import grpo_ar.adapters


def public_names():
    for mod in (grpo_ar, grpo_ar.adapters):
        for name in mod.__all__:
            yield f"{mod.__name__}.{name}", getattr(mod, name)


def undocumented(obj) -> list[str]:
    """`obj` and, for a class, its public methods and properties without a docstring (an
    override inherits its base's, as `help` shows it)."""
    missing = [] if (inspect.getdoc(obj) or "").strip() else ["(itself)"]
    if inspect.isclass(obj):
        for key in dir(obj):
            if key.startswith("_"):
                continue
            raw = inspect.getattr_static(obj, key)
            if isinstance(raw, property):
                fn, doc = raw.fget, inspect.getdoc(raw)
            elif inspect.isfunction(raw) or isinstance(raw, (staticmethod, classmethod)):
                fn, doc = getattr(obj, key), inspect.getdoc(getattr(obj, key))
            else:
                continue  # data: fields and constants
            home = getattr(fn, "__module__", None) or ""
            if home != obj.__module__ and not home.startswith("grpo_ar"):
                continue  # inherited from torch / lightning: theirs to document
            if not (doc or "").strip():
                missing.append(key)
    return missing


@pytest.mark.parametrize(
    "name,obj", list(public_names()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_public_name_has_docstrings(name, obj):
    assert not undocumented(obj), f"{name}: no docstring on {undocumented(obj)}"


def test_the_checker_can_fail():
    class Bare:
        def method(self):
            pass

    assert undocumented(Bare) == ["(itself)", "method"]


def test_help_of_trainer_train_shows_its_docstring():
    text = pydoc.render_doc(grpo_ar.Trainer.train, renderer=pydoc.plaintext)
    assert "Run the remaining steps" in text
