"""Harness options: one dataclass per harness, registered with it; both CLIs read them from here.

A harness declares its options as a dataclass of :func:`option` fields (a default and a help
line each) and registers it with the harness (``@register_harness("mine", options=MineOptions)``
or a class attribute ``Options``). ``ophsd train`` and ``ophsd.eval`` add one flag per field
(:func:`add_harness_arguments`) and build the chosen harness's options from the parsed flags
(:func:`options_from_args`); :meth:`HarnessOptions.harness_kwargs` turns them into the
harness's constructor arguments. A newly registered harness thus gets its flags in both CLIs
without editing either::

    @dataclass
    class EchoOptions(HarnessOptions):
        times: int = option(1, "echo: repetitions", min=1)

    @register_harness("echo", options=EchoOptions)
    class Echo(Harness):
        def __init__(self, task, times=1, **kw): ...

    ophsd train --harness echo --times 3 ...      python -m ophsd.eval --harness echo --times 3 ...

The flag is ``--<field-name>`` unless ``flag=`` says otherwise; ``train={...}`` / ``eval={...}``
override ``flag``, ``default``, ``help`` or ``min`` for one CLI, and ``clis=`` limits the CLIs
that show the flag (a field a CLI does not show keeps its default there). Several harnesses may
declare the same flag (it is added once; the first registered declaration gives its default).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

CLIS = ("train", "eval")
_OVERRIDABLE = ("flag", "default", "help", "min")


def option(default: Any, help: str, *, flag: str | None = None, type: Callable | None = None,
           choices: list | None = None, min: float | None = None, file: bool = False,
           exclusive: bool = False, clis: tuple[str, ...] = CLIS, train: dict | None = None,
           eval: dict | None = None):
    """A harness option field.

    ``default``/``help``: the field's default and its one-line help (shown by both CLIs).
    ``flag``: the CLI flag (default ``--<name>``). ``type``: argparse conversion (default: the
    default's type; ``str`` for None). ``choices``: allowed values. ``min``: the CLI rejects
    smaller values ("--flag must be >= min"). ``file``: a path the trainer checks exists before
    loading a model. ``exclusive``: giving the flag with a harness that does not declare it is
    an error. ``clis``: which CLIs show the flag. ``train``/``eval``: per-CLI overrides of
    ``flag``/``default``/``help``/``min``.
    """
    for cli, over in (("train", train), ("eval", eval)):
        bad = set(over or ()) - set(_OVERRIDABLE)
        if bad:
            raise TypeError(f"option(): {cli}= may override {_OVERRIDABLE}, not {sorted(bad)}")
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "min": min, "file": file,
            "exclusive": exclusive, "clis": tuple(clis), "train": dict(train or {}), "eval": dict(eval or {})}
    return field(default=default, metadata={"ophsd": meta})


@dataclass
class HarnessContext:
    """What a CLI gives the options to build a harness with.

    ``read_data(path) -> (examples, description)``: how this CLI reads a labelled file named by
    an option (default: the task's whole file). ``progress``: progress bars. ``max_new_tokens``:
    the answer budget the CLI was given, if any (``ophsd.eval --max-new-tokens``). ``log``: one
    line of progress output.
    """

    task: Any
    read_data: Callable[[str], tuple[list, str]] | None = None
    progress: bool = True
    max_new_tokens: int | None = None
    log: Callable[[str], None] = lambda line: None

    def read(self, path: str) -> tuple[list, str]:
        if self.read_data is not None:
            return self.read_data(path)
        return list(self.task.dataset(path, split="all")), str(path)


@dataclass
class HarnessOptions:
    """Options of a harness that has none; subclass it with :func:`option` fields."""

    def harness_kwargs(self, ctx: HarnessContext) -> dict:
        """The harness constructor's keyword arguments: by default every field by its name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class _Flag:
    name: str  # field name
    flag: str
    dest: str
    default: Any
    help: str
    type: Callable | None
    choices: list | None
    min: float | None
    file: bool
    exclusive: bool


def cli_flags(options_cls: type[HarnessOptions], cli: str) -> list[_Flag]:
    """The flags ``cli`` shows for one options class, in field order."""
    if cli not in CLIS:
        raise ValueError(f"cli must be one of {CLIS}, got {cli!r}")
    out = []
    for f in dataclasses.fields(options_cls):
        meta = f.metadata.get("ophsd")
        if meta is None:
            raise TypeError(f"{options_cls.__name__}.{f.name} is not an option(...) field")
        if cli not in meta["clis"]:
            continue
        m = {"default": f.default, **{k: meta[k] for k in ("flag", "help", "min")}, **meta[cli]}
        flag = m["flag"] or "--" + f.name.replace("_", "-")
        typ = meta["type"] or (type(m["default"]) if m["default"] is not None else str)
        out.append(_Flag(f.name, flag, flag.lstrip("-").replace("-", "_"), m["default"], m["help"], typ,
                         meta["choices"], m["min"], meta["file"], meta["exclusive"]))
    return out


def _registry() -> dict:
    from ophsd.harness.base import HARNESSES

    return HARNESSES


def options_class(name: str) -> type[HarnessOptions]:
    """The options dataclass registered with harness ``name`` (the empty one if unknown)."""
    cls = _registry().get(name)
    return getattr(cls, "Options", HarnessOptions) if cls is not None else HarnessOptions


def _all_flags(cli: str) -> dict[str, tuple[_Flag, list[str]]]:
    """flag -> (its first declaration, the harnesses declaring it), over the registry."""
    out: dict[str, tuple[_Flag, list[str]]] = {}
    for hname, cls in _registry().items():
        for fl in cli_flags(getattr(cls, "Options", HarnessOptions), cli):
            out.setdefault(fl.flag, (fl, []))[1].append(hname)
    return out


def add_harness_arguments(parser, cli: str) -> None:
    """One flag per option of every registered harness (``parser``: a parser or argument group)."""
    for fl, owners in _all_flags(cli).values():
        kw: dict[str, Any] = {"dest": fl.dest, "default": fl.default, "help": fl.help}
        if fl.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = fl.type
            if fl.choices is not None:
                kw["choices"] = fl.choices
        parser.add_argument(fl.flag, **kw)


def check_minimums(args: argparse.Namespace, cli: str) -> str | None:
    """The first harness flag (of any registered harness) below its ``min``, as a usage error."""
    for fl, _ in _all_flags(cli).values():
        v = getattr(args, fl.dest, None)
        if fl.min is not None and v is not None and v < fl.min:
            return f"{fl.flag} must be >= {fl.min}, got {v}"
    return None


def check_exclusive(name: str | None, args: argparse.Namespace, cli: str) -> str | None:
    """An ``exclusive`` flag given (not at its default) for a harness that does not declare it
    (``name`` None: no harness), as a usage error; else None."""
    own = {fl.flag for fl in cli_flags(options_class(name), cli)} if name else set()
    for fl, owners in _all_flags(cli).values():
        if fl.exclusive and fl.flag not in own and getattr(args, fl.dest, fl.default) != fl.default:
            which = " | ".join(owners)
            if cli == "train":
                return f"{fl.flag} needs --harness {which}"
            if name is None:
                return f"{fl.flag} needs a harness that takes it ({which})"
            return f"{fl.flag} only applies to the {which} harness, not {name!r}"
    return None


def file_flags(name: str, cli: str) -> list[_Flag]:
    """The ``file=True`` flags of harness ``name`` in ``cli``."""
    return [fl for fl in cli_flags(options_class(name), cli) if fl.file]


def options_from_args(name: str, args: argparse.Namespace, cli: str) -> HarnessOptions:
    """Harness ``name``'s options from parsed flags (fields ``cli`` does not show keep their default)."""
    cls = options_class(name)
    return cls(**{fl.name: getattr(args, fl.dest) for fl in cli_flags(cls, cli) if hasattr(args, fl.dest)})
