"""How a setting is defined: :func:`setting` gives a dataclass field its default, help text,
command-line flag, allowed values, cheap rule, and whether a resumed run must match it;
:class:`Settings` is what every settings class derives from those fields.

Nothing here reads a file or asks the machine: the flags are made in :mod:`probprune.flags`,
the checks that read files or ask the machine live in :mod:`probprune.preflight`.
"""
import dataclasses
import types
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, List, Optional

Problem = Optional[str]  # what is wrong, in words that follow the flag ("must be ..."); None: fine


class ConfigError(ValueError):
    """A setting that cannot work; the message names its flag and the rule."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (some library messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def setting(default=MISSING, *, help: str, flag: Optional[str] = None, cli: bool = True,
            choices=None, check: Optional[Callable[[Any], Problem]] = None, resume: bool = False,
            parse: Optional[Callable[[str], Any]] = None, cli_default=MISSING,
            from_cli: Optional[Callable[[Any], Any]] = None,
            factory: Optional[Callable[[], Any]] = None):
    """A settings field. ``flag``: its spelling on the command line (default
    ``--name-with-dashes``; ``cli=False``: none). ``check(value)``: None or the problem.
    ``resume``: a resumed run must match it. ``parse``: how the flag's text becomes a value;
    ``cli_default`` and ``from_cli``: the flag's own default and how its value becomes the
    field's. ``factory``: the default, computed when the settings are made (the machine's
    device)."""
    meta = dict(help=help, flag=flag, cli=cli, choices=choices, check=check, resume=resume,
                parse=parse, cli_default=cli_default, from_cli=from_cli, group=None)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def rule(ok: Callable[[Any], bool], text: str) -> Callable[[Any], Problem]:
    """A check from a predicate and the rule in words (``"must be at least 1"``)."""
    return lambda value: None if ok(value) else f"{text}, got {value!r}"


def at_least(low) -> Callable[[Any], Problem]:
    return rule(lambda v: v >= low, f"must be at least {low}")


POSITIVE = rule(lambda v: v > 0, "must be > 0")
FRACTION = rule(lambda v: 0.0 < v < 1.0, "must lie strictly between 0 and 1")


def name_list(text: str) -> List[str]:
    """The flag text ``a,b`` as ``["a", "b"]``."""
    from argparse import ArgumentTypeError

    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def layer_list(text: str) -> List[int]:
    from argparse import ArgumentTypeError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}")


def stage(title: str):
    """A stage's settings class: a kw_only dataclass of :func:`setting` fields, whose flags
    ``--help`` lists under ``title`` (the field keeps it, so a command that takes some of the
    stage's fields lists them there too)."""
    def make(cls):
        cls = dataclass(kw_only=True)(cls)
        cls.title = title
        for f in fields(cls):
            if f.name in cls.__dict__.get("__annotations__", {}) and "group" in f.metadata:
                f.metadata = types.MappingProxyType({**f.metadata, "group": title})
        return cls
    return make


class Settings:
    """What a settings class derives from its fields (its subclasses are dataclasses)."""

    @classmethod
    def flag(cls, name: str) -> str:
        """How the messages name a field: its flag, or its name when it has none."""
        meta = next(f.metadata for f in fields(cls) if f.name == name)
        if not meta["cli"]:
            return name
        return meta["flag"] or "--" + name.replace("_", "-")

    @classmethod
    def taken_from(cls, settings: "Settings", **overrides):
        """These settings as ``settings`` holds them (a whole run's config, say); fields it does
        not have keep their defaults."""
        values = {f.name: getattr(settings, f.name) for f in fields(cls)
                  if f.init and hasattr(settings, f.name)}
        return cls(**{**values, **overrides})

    def resume_mismatch(self, saved_settings: dict) -> List[str]:
        """One entry per setting a resumed run must match that differs from the checkpoint's."""
        return [f"{f.name} ({saved_settings.get(f.name)!r} there, {getattr(self, f.name)!r} now)"
                for f in fields(self)
                if f.metadata.get("resume") and saved_settings.get(f.name) != getattr(self, f.name)]

    @classmethod
    def resume_keys(cls) -> tuple:
        return tuple(f.name for f in fields(cls) if f.metadata.get("resume"))

    def as_dict(self) -> dict:
        """The ``settings`` of report.json and of checkpoints."""
        return dataclasses.asdict(self)
