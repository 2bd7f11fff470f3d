"""Builds the optional compiled fast path (Cython). Everything else is in
pyproject.toml. If Cython or a C compiler is missing, or the build fails,
keyroute installs without it and runs on the pure-Python path (it says so
at startup, in /-/healthz and as keyroute_native 0)."""

import ast
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _listed(name: str) -> Any:
    """A constant of proxy/native.py (read, not imported: the one list of
    what is compiled, for the build and for the runtime's choice)."""
    tree = ast.parse(Path(__file__).with_name("proxy").joinpath("native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"proxy/native.py has no {name}")


EXTENSIONS = [
    # The twins, from their .pyx.
    *(Extension(m, [m.replace(".", "/") + ".pyx"]) for m in _listed("TWINS")),
    # The data plane's own modules, compiled from their .py source with the
    # types their .pxd files declare; without the build they run as Python.
    *(Extension(m, [m.replace(".", "/") + ".py"]) for m in _listed("COMPILED")),
]
# Types come from the .pxd files only: the annotations in the .py files are
# for mypy, and Cython would enforce some of them differently.
DIRECTIVES = {"annotation_typing": False}


class OptionalBuildExt(build_ext):
    """A failed compile is a warning, not a failed install. Modules compile
    in parallel, with -O2 and no debug info: Python's own -O3 -g makes the
    build several times slower for no measurable gain here."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any compiler or toolchain failure
            print(
                f"keyroute: the compiled fast path was not built ({exc}); the pure-Python path will be used",
                file=sys.stderr,
            )

    def build_extension(self, ext: Extension) -> None:
        if self.compiler.compiler_type == "unix":
            ext.extra_compile_args = [*ext.extra_compile_args, "-O2", "-g0"]
        try:
            super().build_extension(ext)
        except Exception as exc:
            # An older build of it must not stay behind and run (or be
            # packaged) instead: in place, or in build/lib for a wheel.
            stale = self.get_ext_fullpath(ext.name)
            if os.path.exists(stale):
                os.remove(stale)
            print(f"keyroute: {ext.name} was not built ({exc}); the pure-Python path will be used", file=sys.stderr)


def extensions() -> list[Extension]:
    if os.environ.get("KEYROUTE_NO_EXTENSIONS"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("keyroute: Cython is not installed; the pure-Python path will be used", file=sys.stderr)
        return []
    try:
        return list(
            cythonize(
                EXTENSIONS, language_level=3, quiet=True, compiler_directives=DIRECTIVES, nthreads=os.cpu_count() or 1
            )
        )
    except Exception as exc:  # a Cython that rejects the source
        print(f"keyroute: Cython failed ({exc}); the pure-Python path will be used", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
