"""The command line of a settings class, derived from its fields: one flag per field, grouped by
stage in ``--help``, the flag's text turned into the field's type; and the ``--config FILE``
(YAML or JSON) that gives the flags' defaults."""
import argparse
import json
import math
from dataclasses import MISSING, fields
from typing import Any, Dict, Optional, Union, get_args, get_origin

from .config import EvalConfig, PruneConfig
from .settings import ConfigError, Problem, one_line


class _AppendOverFile(argparse._AppendAction):
    """``append`` for a list a ``--config`` file set: the first flag on the line starts a new
    list (the line overrides the file), the next ones add to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


REQUIRED = "required (a first run needs only these; every other flag has a default)"


def _required(f, defaults: Dict[str, Any]) -> bool:
    """A flag the command cannot run without: no default of its own or from a --config file."""
    return (f.default is MISSING and f.default_factory is MISSING
            and f.metadata.get("cli_default", MISSING) is MISSING and f.name not in defaults)


def add_arguments(cls, parser: argparse.ArgumentParser,
                  defaults: Optional[Dict[str, Any]] = None) -> None:
    """The flags of every field of ``cls``, each stage's in its own group; ``defaults`` (a
    ``--config`` file's settings, by field name) take the place of the fields' own defaults, and
    the flags on the line override them."""
    defaults = defaults or {}
    parser.add_argument("--config", metavar="FILE",
                        help="settings from a YAML or JSON file (flag names as keys, or a run's "
                             "report.json / probprune.json); flags on the line override it")
    groups: Dict[Optional[str], Any] = {None: parser}
    # The flags without a default come first, in a group of their own: all a first run needs.
    ordered = sorted(fields(cls), key=lambda f: not _required(f, defaults))
    if any(_required(f, defaults) for f in ordered if f.metadata.get("cli")):
        groups[REQUIRED] = parser.add_argument_group(REQUIRED)
    for f in ordered:
        meta = f.metadata
        if not meta.get("cli"):
            continue
        title = REQUIRED if _required(f, defaults) else meta["group"]
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        flag = cls.flag(f.name)
        default = meta["cli_default"]
        if default is MISSING:
            default = f.default_factory() if f.default_factory is not MISSING else f.default
        if f.name in defaults:
            default = defaults[f.name]
        hidden = default is MISSING or default is None or default is False or default == []
        shown = "" if hidden else f" (default: {default})"
        kw: Dict[str, Any] = dict(dest=f.name, help=meta["help"] + shown)
        if scalar_type(f.type) is bool:  # --flag / --no-flag (unset: the field's rule decides)
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        elif get_origin(f.type) is list and meta["parse"] is None:  # --flag A --flag B
            kw.update(action=_AppendOverFile if f.name in defaults else "append",
                      type=get_args(f.type)[0], required=default is MISSING,
                      metavar=flag.lstrip("-").upper())
            if f.name in defaults:
                kw["default"] = list(default)
        else:
            kw.update(type=meta["parse"] or scalar_type(f.type), choices=meta["choices"])
            if meta["choices"] is None:
                kw["metavar"] = METAVARS.get(scalar_type(f.type)) or flag.lstrip("-").upper()
            if default is MISSING:
                kw["required"] = True
            else:
                kw["default"] = default
        groups[title].add_argument(flag, **kw)


def add_prune_arguments(parser: argparse.ArgumentParser, defaults=None) -> None:
    add_arguments(PruneConfig, parser, defaults)


def add_eval_arguments(parser: argparse.ArgumentParser, defaults=None) -> None:
    add_arguments(EvalConfig, parser, defaults)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The settings of parsed flags; ``overrides`` set fields directly (those without a flag)."""
    values = {}
    for f in fields(cls):
        if f.metadata.get("cli") and hasattr(args, f.name):
            convert = f.metadata["from_cli"]
            value = getattr(args, f.name)
            values[f.name] = convert(value) if convert else value
    values.update(overrides)
    return cls(**values)


def read_config_file(path: str, cls) -> Dict[str, Any]:
    """The settings of a YAML or JSON file, by field name of ``cls``: keys are flag names (with
    dashes or underscores, with or without the leading --) or field names; a file with a
    ``settings`` entry (a run's report.json or probprune.json) gives those, so a run's record
    re-runs it. Fields without a flag (progress) are passed over; any other key is an error."""
    import yaml  # a dependency of transformers

    try:
        with open(path, encoding="utf-8") as f:
            data = (json.load(f) if path.endswith(".json") else yaml.safe_load(f))
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r} ({one_line(e)})") from e
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"--config: {path!r} is not valid JSON / YAML ({one_line(e)})") from e
    if isinstance(data, dict) and isinstance(data.get("settings"), dict):
        data = data["settings"]
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} holds no mapping of settings")
    by_key = {}
    for f in fields(cls):
        by_key[f.name] = f
        if f.metadata["cli"]:
            by_key[cls.flag(f.name).lstrip("-").replace("-", "_")] = f
    out, unknown = {}, []
    for key, value in data.items():
        f = by_key.get(str(key).lstrip("-").replace("-", "_"))
        if f is None:
            unknown.append(str(key))
        elif f.metadata["cli"]:
            out[f.name] = value
    if unknown:
        raise ConfigError(f"--config: {path!r} has settings this command does not take: "
                          f"{', '.join(sorted(unknown))}")
    return out


# ---------------------------------------------------------------------------------------------
# field types: what the flag's text converts to, and the type check of a value set in Python or
# in a --config file (argparse has converted the flags' own)

def scalar_type(tp):
    """The type the flag's text converts to: int, float or str (``Optional[...]`` unwrapped)."""
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if get_origin(tp) is Union else tp


def _is(value, tp) -> bool:
    origin = get_origin(tp)
    if origin is Union:
        return any(_is(value, a) for a in get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(_is(v, get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if tp is float else tp)


METAVARS = {int: "N", float: "X"}
TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
LIST_WORDS = {int: "integers", str: "strings"}


def type_problem(value, tp) -> Problem:
    if not _is(value, tp):
        if get_origin(tp) is list:
            return f"must be a list of {LIST_WORDS[get_args(tp)[0]]}, got {value!r}"
        words = TYPE_WORDS[scalar_type(tp)]
        unset = " or unset (None)" if get_origin(tp) is Union else ""
        return f"must be {words}{unset}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    return None
