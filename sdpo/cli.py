"""The one way this project turns a dataclass into a command line.

Every entry point (``train.py``, the cache, the toy, the bench, generation, scoring, comparison)
declares its options once, as a dataclass whose fields carry their help in ``metadata`` (made
with :func:`arg`), and gets its parser from :func:`build_parser`: field name = flag name, field
default = flag default, no second list of defaults anywhere. :func:`parse` parses, builds the
dataclass, runs the entry point's own ``check`` and turns its ``ValueError`` into ONE usage error
naming the flag (exit status 2), before anything expensive starts.

Types come from the annotations: ``bool`` fields are switches (``--flag``; a ``bool | None``
field defaulting to None gets ``--flag`` / ``--no-flag`` and stays None when neither is given),
``int`` / ``float`` / ``str`` (optionally ``| None``) take one value, ``list[str]`` takes one or
more. This module imports only the standard library, so evaluation can use it without the
training stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any


def arg(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    **argparse_kwargs: Any,
) -> Any:
    """A dataclass field with its command-line help.

    ``argparse_kwargs`` go to ``add_argument`` (``choices``, ``metavar``, ``required``, ``nargs``)
    plus ``flags=[...]`` (the option strings, default ``--<field name>``), ``choices_from`` (a
    callable returning the choices, evaluated when the parser is built) and ``cli=False`` (a field
    that is not a flag)."""
    meta = {"help": help, **argparse_kwargs}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each help line; descriptions keep their line breaks."""


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of an annotation such as ``int | None`` or ``list[str]``."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
    return annotation, optional


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls`` to ``parser`` (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if meta.pop("cli", True) is False:
            continue
        typ, _ = _base_type(hints[f.name])
        flags = meta.pop("flags", None) or [f"--{f.name}"]
        choices_from = meta.pop("choices_from", None)
        if choices_from is not None:
            meta["choices"] = list(choices_from())
        # '%' is argparse's format character: a literal one in a help text (a URL) must be doubled.
        kwargs: dict[str, Any] = {
            "dest": f.name,
            **meta,
            "help": meta.get("help", "").replace("%", "%%"),
        }
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        elif "required" not in kwargs:
            kwargs["required"] = True
        if typ is bool:
            if kwargs.get("default") is None:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_true"
        elif typing.get_origin(typ) is list:
            kwargs.setdefault("nargs", "+")
            kwargs["type"] = typing.get_args(typ)[0] if typing.get_args(typ) else str
        else:
            kwargs["type"] = typ if typ in (int, float) else str
        parser.add_argument(*flags, **kwargs)


def build_parser(
    cls: type,
    *,
    prog: str | None = None,
    description: str | None = None,
    epilog: str | None = None,
    extend: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one flag per field of ``cls``; ``extend`` may add more (flags
    whose names are computed, such as one per registered scorer weight)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=_Formatter
    )
    add_dataclass_arguments(parser, cls)
    if extend is not None:
        extend(parser)
    return parser


def from_namespace(cls: type, namespace: argparse.Namespace):
    """The dataclass of the fields of ``cls`` found in ``namespace`` (extra attributes ignored)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})


def parse(
    cls: type,
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    epilog: str | None = None,
    extend: Callable[[argparse.ArgumentParser], None] | None = None,
    finish: Callable[[Any, argparse.Namespace], Any] | None = None,
    check: Callable[[Any], Any] | None = None,
):
    """Parse ``argv`` into ``cls``. ``finish(cfg, namespace)`` may fill fields from extra flags;
    ``check(cfg)`` validates (and may return a resolved config); a ``ValueError`` from them or
    from the dataclass's own ``__post_init__`` is reported as one usage error (exit status 2)."""
    parser = build_parser(cls, prog=prog, description=description, epilog=epilog, extend=extend)
    namespace = parser.parse_args(argv)
    try:
        cfg = from_namespace(cls, namespace)  # a dataclass may validate in __post_init__
        if finish is not None:
            cfg = finish(cfg, namespace) or cfg
        if check is not None:
            cfg = check(cfg) or cfg
    except ValueError as err:
        parser.error(str(err))
    return cfg
