"""Packaging, as a Python or C user meets it.

* ``python -m build`` makes the sdist and, from the sdist, a platform wheel that carries the
  native backend (so building from the sdist works, and installing the wheel needs no compiler);
  its tags, files and metadata are checked.
* The wheel installed *without extras* in a fresh virtualenv: the edge SDK and the ``cogbert``
  command work, the native backend is the one chosen, no cloud dependency is importable, and a
  cloud command says which extra to install.
* ``make -C native install`` for C applications: header, static and shared library and a
  pkg-config file, which compiles and links ``examples/c_embed``.

The wheel and the virtualenv are built once for the module (about 10 s and 30-60 s).
"""

from __future__ import annotations

import email.parser
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

import cogbert_edge

ROOT = Path(__file__).resolve().parent.parent
VERSION = cogbert_edge.__version__
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
NATIVE_EXT = f"cogbert_edge/_native/_cogbert_native{EXT_SUFFIX}"
# Top-level import packages and the source directory each is built from.
PACKAGES = {"cogbert_edge": ROOT / "cogbert_edge", "cogbert_cloud": ROOT / "cogbert_cloud",
            "cogbert_bench": ROOT / "benchmarks"}
# What only the cloud extra brings: none of it may be importable in an edge-only install.
CLOUD_ONLY = ["fastapi", "gymnasium", "boto3", "uvicorn", "prometheus_client", "matplotlib"]
slow = pytest.mark.slow


def _run(cmd: list, *, timeout: float = 240, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        pytest.fail(f"{shlex.join(map(str, cmd))} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}"
                    f"\n--- stderr\n{p.stderr[-4000:]}", pytrace=False)
    return p


# ---- the sdist and the wheel ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """``python -m build``: the sdist, then the wheel built from the unpacked sdist."""
    if importlib.util.find_spec("build") is None:
        pytest.fail("the 'build' package is missing: pip install -e '.[dev]'", pytrace=False)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, ROOT], timeout=280)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    return dist["wheel"]


@pytest.fixture(scope="module")
def wheel_files(wheel) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as z:
        return {name: z.read(name) for name in z.namelist()}


@pytest.fixture(scope="module")
def metadata(wheel_files):
    return email.parser.Parser().parsestr(wheel_files[f"cogbert-{VERSION}.dist-info/METADATA"].decode())


@slow
def test_wheel_is_a_platform_wheel_for_this_interpreter(wheel, wheel_files):
    from packaging.tags import sys_tags

    name, version, py, abi, plat = wheel.name[:-len(".whl")].split("-")
    assert (name, version) == ("cogbert", VERSION)
    assert plat != "any" and abi != "none", f"{wheel.name} is not a platform wheel"
    if sys.implementation.name == "cpython":
        assert py == f"cp{sys.version_info.major}{sys.version_info.minor}", wheel.name
    supported = {str(t) for t in sys_tags()}
    assert f"{py}-{abi}-{plat}" in supported, f"{wheel.name} does not install on this interpreter"
    if sys.platform.startswith("linux"):
        assert plat == sysconfig.get_platform().replace("-", "_").replace(".", "_"), wheel.name
    wheel_meta = wheel_files[f"cogbert-{VERSION}.dist-info/WHEEL"].decode()
    assert "Root-Is-Purelib: false" in wheel_meta


@slow
def test_wheel_carries_the_native_backend(wheel_files):
    assert NATIVE_EXT in wheel_files, sorted(n for n in wheel_files if "_native" in n)
    magic = wheel_files[NATIVE_EXT][:4]
    assert magic in (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe"), magic  # ELF, Mach-O
    # The extension is loaded by path (native_backend._candidates): no package is needed there.
    assert not any(n.startswith("cogbert_edge/_native/") and n != NATIVE_EXT for n in wheel_files)
    record = wheel_files[f"cogbert-{VERSION}.dist-info/RECORD"].decode()
    assert f"{NATIVE_EXT}," in record


@slow
def test_wheel_files(wheel_files):
    license_text = wheel_files[f"cogbert-{VERSION}.dist-info/licenses/LICENSE"].decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a stub
    assert "cogbert_edge/py.typed" in wheel_files
    assert "cogbert_cloud/py.typed" in wheel_files
    plugins = [n for n in wheel_files if re.fullmatch(r"cogbert_cloud/fleet/mosquitto_plugin/[^/]+\.c", n)]
    assert plugins, "the Mosquitto ACL plugin's C source is not in the wheel"
    tops = {n.split("/")[0] for n in wheel_files}
    assert tops == {*PACKAGES, f"cogbert-{VERSION}.dist-info"}, tops
    assert not [n for n in wheel_files if "__pycache__" in n or n.endswith((".pyc", ".o", ".a"))]


@slow
def test_wheel_has_every_package_and_module(wheel_files):
    """Each package directory (an __init__.py) and each module of the source tree is in the
    wheel, so a new sub-package that the package list misses fails here."""
    missing = []
    for top, src in PACKAGES.items():
        for init in src.rglob("__init__.py"):
            pkg_dir = init.parent.relative_to(src)
            if "__pycache__" in pkg_dir.parts:
                continue
            for module in init.parent.glob("*.py"):
                name = "/".join([top, *pkg_dir.parts, module.name])
                if name not in wheel_files:
                    missing.append(name)
    assert not missing, f"not in the wheel: {missing}"


@slow
def test_wheel_metadata(metadata):
    assert metadata["Name"] == "cogbert" and metadata["Version"] == VERSION
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in (metadata.get_all("License-File") or [])
    classifiers = metadata.get_all("Classifier") or []
    for c in ["Development Status :: 3 - Alpha", "Programming Language :: C",
              "Operating System :: POSIX :: Linux", "Operating System :: MacOS",
              "Topic :: Scientific/Engineering :: Artificial Intelligence", "Typing :: Typed",
              *(f"Programming Language :: Python :: 3.{m}" for m in (10, 11, 12, 13))]:
        assert c in classifiers, c
    assert any(c.startswith("Intended Audience :: ") for c in classifiers)
    # PEP 639: the license expression replaces license classifiers.
    assert not [c for c in classifiers if c.startswith("License ::")]
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL") or [])
    assert urls == {"Homepage": "https://github.com/cogbert/cogbert",
                    "Documentation": "https://github.com/cogbert/cogbert/tree/main/docs",
                    "Source": "https://github.com/cogbert/cogbert",
                    "Issues": "https://github.com/cogbert/cogbert/issues"}
    # The edge SDK's own dependencies stay short: nothing of the cloud extra without it.
    base = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert not [r for r in base for m in CLOUD_ONLY
                if re.match(m.replace("_", "[-_]") + r"\b", r, re.I)], base


@slow
def test_sdist_has_the_native_sources(dist):
    with tarfile.open(dist["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    need = {"setup.py", "pyproject.toml", "LICENSE", "README.md", "native/Makefile",
            "native/cogbert.pc.in", "native/python/cogbert_native_module.c",
            "examples/c_embed/main.c", "cogbert_edge/py.typed", "cogbert_cloud/py.typed"}
    for d in ("native/src", "native/include"):
        need |= {p.relative_to(ROOT).as_posix() for p in (ROOT / d).iterdir()
                 if p.suffix in (".c", ".h")}
    assert not need - names, f"not in the sdist: {sorted(need - names)}"
    assert not [n for n in names
                if n.startswith("native/build/") or n.endswith((".o", ".a", ".so", ".dylib"))]


# ---- the wheel, installed without extras in a fresh virtualenv ----------------------------------

class EdgeVenv:
    def __init__(self, root: Path, work: Path):
        self.root, self.work = root, work
        self.bin = root / ("Scripts" if os.name == "nt" else "bin")
        self.python = self.bin / "python"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
                                 "COGBERT_NATIVE_LIB", "COGBERT_BACKEND", "COGBERT_NATIVE_KERNEL"}}
        self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONNOUSERSITE="1",
                        VIRTUAL_ENV=str(root))

    def run(self, *cmd, check: bool = True) -> subprocess.CompletedProcess:
        # From a directory outside the checkout, so that only the installed package is importable.
        return _run(list(cmd), check=check, cwd=self.work, env=self.env, timeout=120)

    def py(self, code: str) -> str:
        return self.run(self.python, "-c", code).stdout

    def cogbert(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(self.bin / "cogbert", *args, check=check)


@pytest.fixture(scope="module")
def edge_venv(wheel, tmp_path_factory) -> EdgeVenv:
    base = tmp_path_factory.mktemp("edge-venv")
    started = time.perf_counter()
    _run([sys.executable, "-m", "venv", base / "venv"], timeout=120)
    (base / "work").mkdir()
    v = EdgeVenv(base / "venv", base / "work")
    v.run(v.python, "-m", "pip", "install", "-q", "--no-input", wheel)
    print(f"\nedge-only virtualenv with {wheel.name}: {time.perf_counter() - started:.1f} s")
    return v


@slow
def test_edge_install_has_no_cloud_dependencies(edge_venv):
    found = json.loads(edge_venv.py(
        "import importlib.util, json; "
        f"print(json.dumps([m for m in {CLOUD_ONLY!r} if importlib.util.find_spec(m)]))"))
    assert found == [], f"cloud-only packages importable in an edge-only install: {found}"


@slow
def test_edge_install_runs_the_native_backend(edge_venv):
    b = edge_venv.work / "model.safetensors"
    edge_venv.cogbert("bundle", "init", b)
    out = edge_venv.py(f"""
import json, numpy as np, cogbert_edge
from cogbert_edge import Policy
from cogbert_edge.inference.backends.native_backend import native_module
p = Policy.load({str(b)!r})
n = Policy.load({str(b)!r}, backend="numpy")
x = np.linspace(-1, 1, p.bundle.config.obs_dim, dtype=np.float32)[None, :]
h1, v1, _ = p.step(x, p.initial_state(1))
h2, v2, _ = n.step(x, n.initial_state(1))
d = p.act(x[0], p.initial_state())
print(json.dumps(dict(backend=p.backend, pkg=cogbert_edge.__file__, ext=native_module().__file__,
                      close=bool(np.allclose(h1, h2, atol=1e-4) and np.allclose(v1, v2, atol=1e-4)),
                      action=int(d.action))))
""")
    r = json.loads(out.strip().splitlines()[-1])
    assert r["backend"] == "native", r
    site = edge_venv.root.resolve()
    assert Path(r["pkg"]).resolve().is_relative_to(site), r  # the installed package, not the checkout
    assert Path(r["ext"]).resolve().is_relative_to(site) and r["ext"].endswith(EXT_SUFFIX), r
    assert r["close"], "native and numpy backends disagree"


@slow
def test_edge_install_bundle_commands(edge_venv):
    w = edge_venv.work
    edge_venv.cogbert("bundle", "init", w / "fp32.safetensors", "--obs-dim", "16", "--hidden", "32",
                      "--encoder", "32", "--actions", "4", "--model-id", "pkg-test")
    edge_venv.cogbert("bundle", "quantize", w / "fp32.safetensors", w / "int8.safetensors", "--bits", "8")
    info = json.loads(edge_venv.cogbert("bundle", "inspect", w / "int8.safetensors", "--json").stdout)
    assert info["parent"] == "pkg-test" and info["quantization"]["label"] == "int8", info
    assert info["config"]["obs_dim"] == 16 and info["config"]["hidden"] == 32, info
    q = str(w / "int8.safetensors")
    backend = edge_venv.py(f"from cogbert_edge import Policy; print(Policy.load({q!r}).backend)")
    assert backend.strip() == "native"


@slow
def test_edge_install_version(edge_venv):
    p = edge_venv.cogbert("--version")
    assert VERSION in p.stdout, (p.stdout, p.stderr)


@slow
def test_edge_install_cloud_command_names_the_extra(edge_venv):
    p = edge_venv.cogbert("cloud", "train", "--env", "CartPole-v1", "--out", edge_venv.work / "x",
                          check=False)
    assert p.returncode != 0, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{p.stderr}"
    assert "cogbert[cloud]" in lines[0] and "pip install" in lines[0], lines[0]


# ---- make -C native install, for C applications --------------------------------------------------

def _parse_pc(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A .pc file's variables and fields, with ${var} expanded (what pkg-config does)."""
    variables: dict[str, str] = {}
    fields: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.match(r"([A-Za-z0-9_.]+)\s*([:=])\s*(.*)$", line)
        assert m, f"{path}: cannot parse {raw!r}"
        key, sep, value = m.groups()
        value = re.sub(r"\$\{(\w+)\}", lambda v: variables[v.group(1)], value)
        (variables if sep == "=" else fields)[key] = value
    return variables, fields


def _header_version() -> str:
    h = (ROOT / "native" / "include" / "cogbert.h").read_text()
    return ".".join(re.search(rf"#define COGBERT_VERSION_{k} (\d+)", h).group(1)
                    for k in ("MAJOR", "MINOR", "PATCH"))


@slow
def test_make_install_and_pkg_config(tmp_path, bundle_files):
    make = os.environ.get("MAKE", "make")
    cc = os.environ.get("CC", "cc")
    shlib = "libcogbert.dylib" if sys.platform == "darwin" else "libcogbert.so"
    build = tmp_path / "build"  # not native/build: a developer's build is left alone
    prefix = tmp_path / "prefix"
    _run([make, "-s", "-j2", "-C", ROOT / "native", "install", f"PREFIX={prefix}", f"BUILD={build}"])
    for f in ("include/cogbert.h", "lib/libcogbert.a", f"lib/{shlib}", "lib/pkgconfig/cogbert.pc"):
        assert (prefix / f).is_file(), f

    # DESTDIR stages the same tree; the .pc still names the final prefix.
    stage = tmp_path / "stage"
    _run([make, "-s", "-C", ROOT / "native", "install", "PREFIX=/opt/cogbert", f"DESTDIR={stage}",
          f"BUILD={build}"])
    staged = stage / "opt" / "cogbert"
    for f in ("include/cogbert.h", "lib/libcogbert.a", f"lib/{shlib}", "lib/pkgconfig/cogbert.pc"):
        assert (staged / f).is_file(), f
    assert _parse_pc(staged / "lib/pkgconfig/cogbert.pc")[0]["prefix"] == "/opt/cogbert"

    pc = prefix / "lib" / "pkgconfig" / "cogbert.pc"
    variables, fields = _parse_pc(pc)
    libdir, includedir = variables["libdir"], variables["includedir"]
    assert Path(libdir) == prefix / "lib" and Path(includedir) == prefix / "include", variables
    assert fields["Name"] == "cogbert" and fields["Description"]
    assert fields["Version"] == VERSION == _header_version()
    assert fields["Libs"].split() == [f"-L{libdir}", "-lcogbert"]
    assert fields["Libs.private"].split() == ["-lm"]
    assert fields["Cflags"].split() == [f"-I{includedir}"]
    parsed = fields["Cflags"].split() + fields["Libs"].split() + fields["Libs.private"].split()
    if shutil.which("pkg-config"):
        env = {**os.environ, "PKG_CONFIG_PATH": str(pc.parent)}
        flags = shlex.split(_run(["pkg-config", "--cflags", "--libs", "--static", "cogbert"], env=env).stdout)
        assert sorted(flags) == sorted(parsed), (flags, parsed)
        assert _run(["pkg-config", "--modversion", "cogbert"], env=env).stdout.strip() == VERSION
    else:  # the same flags, from the file itself
        print("pkg-config is not installed: using the .pc file's own fields")
        flags = parsed
    cflags = [f for f in flags if f.startswith("-I")]
    libs = [f for f in flags if not f.startswith("-I")]

    main_c = ROOT / "examples" / "c_embed" / "main.c"
    # As pkg-config links it (the shared library, found at run time through the library path).
    shared_exe = tmp_path / "c_embed_shared"
    _run([cc, "-std=c99", *cflags, main_c, "-o", shared_exe, *libs])
    # Against the archive, with only the .pc's private libraries: needs no library path at all.
    static_exe = tmp_path / "c_embed_static"
    _run([cc, "-std=c99", *cflags, main_c, "-o", static_exe,
          *[str(prefix / "lib" / "libcogbert.a") if f == "-lcogbert" else f for f in libs]])
    lib_env = {**os.environ, "LD_LIBRARY_PATH": libdir, "DYLD_LIBRARY_PATH": libdir}
    if sys.platform.startswith("linux") and shutil.which("ldd"):
        ldd = _run(["ldd", shared_exe], env=lib_env).stdout
        assert str(Path(libdir) / shlib) in ldd, ldd
    plain_env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH")}
    for kind, path in bundle_files.items():
        for exe, env in ((shared_exe, lib_env), (static_exe, plain_env)):
            out = _run([exe, path, "20"], env=env, timeout=60).stdout
            assert f"({kind} weights" in out and "60 decisions" in out, out


@slow
def test_build_without_a_compiler_fails_clearly(dist, tmp_path):
    """No C compiler: the build stops and says why, instead of making a wheel without the backend."""
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    p = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path / "out", dist["sdist"]],
             check=False, env=env)
    assert p.returncode != 0
    assert "needs make and a C compiler" in p.stdout + p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    assert not out.exists() or not list(out.glob("*.whl"))


# ---- the image build's context -------------------------------------------------------------------

def _dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [ln.strip().strip("/") for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _docker_ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns used here: a path is left out when it or one of its parent
    directories matches (``*`` within one path element, ``**`` across them); ``!`` re-includes."""
    def regex(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out)

    parts = rel.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        rx = regex(pat[1:] if neg else pat)
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not neg
    return ignored


def _dockerfile_copies() -> dict[str, list[str]]:
    """Each Dockerfile's COPY sources from the build context (not from another stage)."""
    out = {}
    for f in sorted((ROOT / "deploy" / "docker").glob("Dockerfile*")):
        text = re.sub(r"\\\n", " ", f.read_text())
        srcs = []
        for line in text.splitlines():
            words = line.split()
            if not words or words[0].upper() not in ("COPY", "ADD"):
                continue
            args = words[1:]
            if any(a.startswith("--from") for a in args):
                continue
            args = [a for a in args if not a.startswith("--")]
            srcs += [(a[2:] if a.startswith("./") else a).rstrip("/") or "." for a in args[:-1]]
        out[f.name] = srcs
    return out


def _context_files(src: str) -> list[str]:
    p = ROOT / src
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "-C", ROOT, "ls-files", "--", src], capture_output=True, text=True)
        if listed.returncode == 0 and listed.stdout.strip():
            return listed.stdout.split()
    if p.is_file():
        return [src]
    return [q.relative_to(ROOT).as_posix() for q in p.rglob("*")
            if q.is_file() and "__pycache__" not in q.parts]


def test_docker_context_keeps_what_the_images_copy():
    patterns = _dockerignore_patterns()
    assert patterns, ".dockerignore is missing or empty"
    for must_go in (".git", ".venv", ".tools", "native/build/obj/json.o", "build/lib", "dist/x.whl",
                    "cogbert.egg-info/PKG-INFO", "cogbert_edge/_native/_cogbert_native.so",
                    "cogbert_cloud/__pycache__/cli.cpython-311.pyc", "demo-work/a", "demo-report/index.html",
                    "keys/ca.pem", "deploy/x.key"):
        assert _docker_ignored(must_go, patterns), f"{must_go} is sent to the docker build"
    copies = _dockerfile_copies()
    assert copies.get("Dockerfile"), copies
    for dockerfile, srcs in copies.items():
        for src in srcs:
            files = _context_files(src)
            assert files, f"{dockerfile} copies {src}, which does not exist"
            excluded = [f for f in files if _docker_ignored(f, patterns)]
            assert not excluded, f"{dockerfile} copies {src}, but .dockerignore leaves out {excluded[:5]}"


def test_docker_image_copies_what_the_package_build_needs():
    """The image pip-installs the checkout: it needs every file the package build reads (without
    setup.py, setuptools would find only cogbert_bench and build a wheel without the SDK)."""
    srcs = set(_dockerfile_copies()["Dockerfile"])
    needed = {"pyproject.toml", "setup.py", "README.md", "LICENSE", "cogbert_edge", "cogbert_cloud",
              "benchmarks", "native"}
    assert not needed - srcs, f"deploy/docker/Dockerfile does not COPY {sorted(needed - srcs)}"
