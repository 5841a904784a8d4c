"""Build hooks for the cogbert distribution; the metadata is all in pyproject.toml.

Two things cannot be static there:

* the package list: every package under ``cogbert_edge/`` and ``cogbert_cloud/`` (found, so a new
  sub-package is never left out) plus ``cogbert_bench``, which lives in ``benchmarks/``;
* the native backend, the CPython extension ``cogbert_edge._native._cogbert_native``. It is built
  by ``native/Makefile`` (``make -C native python``), the one place that knows the compiler flags
  (per-file SIMD flags for the AVX2/VNNI/NEON kernels), into its own build directory under
  setuptools' ``build_temp``, so a developer's ``native/build`` is never touched. Having an
  extension makes the wheel a platform wheel (``cp3XX-cp3XX-<platform>``) that needs no compiler
  at install time.

Building from source (an sdist, a checkout, ``pip install -e .``) therefore needs ``make``, a C
compiler and the Python headers; without them the build stops with a message saying so, rather
than producing a wheel without the native backend.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, PlatformError

ROOT = Path(__file__).resolve().parent
NATIVE = "native"
EXT_NAME = "cogbert_edge._native._cogbert_native"
# Examples that `make -C native` (all, test) compiles too: shipped in the sdist with native/.
NATIVE_EXTRA = ["examples/c_embed/main.c"]


def _rel(paths: list[Path]) -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in paths)


def _native_tree() -> list[str]:
    """The native runtime's source files (Makefile, C sources and headers, templates, docs)."""
    out = []
    for p in (ROOT / NATIVE).rglob("*"):
        rel = p.relative_to(ROOT / NATIVE)
        if rel.parts[0] == "build" or not p.is_file():
            continue
        if p.suffix in {".c", ".h", ".in", ".md"} or p.name == "Makefile":
            out.append(p)
    return _rel(out) + [f for f in NATIVE_EXTRA if (ROOT / f).is_file()]


class MakeBuildExt(build_ext):
    """Builds the native extension with ``make -C native python`` instead of compiling itself."""

    def get_source_files(self) -> list[str]:
        # The sdist's contents for extensions: all of native/ that make needs, so that building a
        # wheel from the sdist works (and `make -C native` from an unpacked sdist too).
        return sorted(set(super().get_source_files()) | set(_native_tree()))

    def build_extension(self, ext: Extension) -> None:
        if ext.name != EXT_NAME:
            super().build_extension(ext)
            return
        if os.name == "nt":
            raise PlatformError(
                "cogbert: the native backend builds with make and a POSIX C compiler; building "
                "on Windows is not supported")
        make = os.environ.get("MAKE", "make")
        cc = os.environ.get("CC", "cc")
        missing = [tool for tool in (make, shlex.split(cc)[0] if cc.strip() else "cc")
                   if shutil.which(tool) is None]
        if missing:
            raise CompileError(
                f"cogbert: building the native backend (the C extension {EXT_NAME}) needs make and "
                f"a C compiler, and {' and '.join(repr(m) for m in missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not on PATH. Install them (Debian/Ubuntu: "
                f"apt-get install build-essential python3-dev; macOS: xcode-select --install), "
                f"set CC to your compiler, or install a prebuilt cogbert wheel")
        include = sysconfig.get_paths()["include"]
        if not os.path.isfile(os.path.join(include, "Python.h")):
            raise CompileError(
                f"cogbert: building the native backend needs the Python development headers, and "
                f"{include}/Python.h does not exist (Debian/Ubuntu: apt-get install python3-dev)")

        build_dir = (Path(self.build_temp) / "native").resolve()
        if " " in str(build_dir):  # make cannot take paths with spaces
            import tempfile
            build_dir = Path(tempfile.mkdtemp(prefix="cogbert-native-"))
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        built = build_dir / f"_cogbert_native{suffix}"
        cmd = [make, "-C", str(ROOT / NATIVE), f"-j{min(os.cpu_count() or 1, 8)}", "python",
               f"PYTHON={sys.executable}", f"BUILD={build_dir}",
               # Warnings are errors in development (make -C native), not for whoever builds
               # a release from source with a newer compiler.
               "WERROR="]
        if self.force:
            cmd.insert(1, "-B")
        print("cogbert: building the native backend:", shlex.join(cmd), flush=True)
        try:
            subprocess.run(cmd, check=True)
        except OSError as e:
            raise CompileError(f"cogbert: could not run {make}: {e}") from None
        except subprocess.CalledProcessError as e:
            raise CompileError(
                f"cogbert: building the native backend failed: `{shlex.join(cmd)}` exited with "
                f"status {e.returncode} (the compiler's messages are above)") from None
        if not built.is_file():
            raise CompileError(
                f"cogbert: `{shlex.join(cmd)}` succeeded but did not produce {built}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        # An editable install then copies the extension next to the sources, into a directory
        # a fresh clone does not have (it holds only build outputs, so git ignores it).
        (ROOT / "cogbert_edge" / "_native").mkdir(exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, dest)


setup(
    packages=[*find_packages(str(ROOT), include=["cogbert_edge", "cogbert_edge.*",
                                                 "cogbert_cloud", "cogbert_cloud.*"]),
              "cogbert_bench"],
    ext_modules=[Extension(
        EXT_NAME,
        sources=_rel([ROOT / NATIVE / "python" / "cogbert_native_module.c",
                      *(ROOT / NATIVE / "src").glob("*.c")]),
        depends=_rel([ROOT / NATIVE / "Makefile", *(ROOT / NATIVE / "include").glob("*.h"),
                      *(ROOT / NATIVE / "src").glob("*.h")]),
    )],
    cmdclass={"build_ext": MakeBuildExt},
)
