"""The ``moesaic`` command. One module per subcommand, each with ``add_parser(sub)`` and ``run(args)``.

Bad input exits 2 with a single line ``error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn, TypeAlias

from moesaic.core.errors import MoesaicError

#: What every command module's ``add_parser(sub)`` receives (``argparse``'s private action class is the
#: only name the standard library gives it; a string, since it is not subscriptable at run time).
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moesaic", description="Mixture-of-Experts Transformers toolkit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "add_parser"):
            p = mod.add_parser(sub)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Dotted-path plugins (`kind: myrouter_file:MyRouter`) next to the user's config are found from the
    # working directory, as under `python -m moesaic`; appended, so it never shadows an installed package.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (MoesaicError, KeyError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `moesaic list | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
