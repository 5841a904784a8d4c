"""The ``cogbert`` command's shared machinery and its edge commands: ``cogbert bundle
init|quantize|inspect`` and ``cogbert device csr``.

The cloud package (:mod:`cogbert_cloud.cli`) adds its commands to the same parser; the edge
commands need only the edge SDK's dependencies. :func:`run_command` gives every command the same
contract for a person at a terminal: a mistake (a bad flag, a missing file, an invalid bundle
or setting) is one line on stderr and a documented exit code, never a traceback:

    0  done                               3  needs an optional part that is not installed
    1  ran, but its check failed          130 interrupted (Ctrl-C)
    2  bad usage or input (flags, files, settings, bundles, PKI, ...)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from cogbert_edge.errors import BundleError, CogbertError
from cogbert_edge.inference.bundle import Bundle, load_bundle
from cogbert_edge.inference.model import ActionSpace, ModelConfig, init_params
from cogbert_edge.inference.quant import plan, quantize_params

__all__ = ["CliParser", "EXIT_FAILED", "EXIT_MISSING", "EXIT_OK", "EXIT_USAGE", "register", "run_command",
           "version"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISSING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Top-level modules of the optional extras, and the extra that brings each.
_EXTRA_OF = {"fastapi": "cloud", "uvicorn": "cloud", "boto3": "cloud", "botocore": "cloud",
             "gymnasium": "cloud", "prometheus_client": "cloud", "matplotlib": "cloud", "pydantic": "cloud",
             "starlette": "cloud", "mlx": "mlx", "onnx": "bench", "onnxruntime": "bench", "torch": "bench",
             "stable_baselines3": "bench", "sb3_contrib": "bench"}


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``PROG: error: ...; see PROG --help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    """The installed distribution's version (the package's own in a source checkout)."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version
        return dist_version("cogbert")
    except PackageNotFoundError:
        from cogbert_edge import __version__
        return __version__


def run_command(prog: str, func: Callable[[], int | None]) -> int:
    """Run a command's handler; turn what a user can cause into one line and an exit code."""
    try:
        return int(func() or 0)
    except CogbertError as e:
        return _fail(prog, str(e), EXIT_USAGE)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        extra = _EXTRA_OF.get(top)
        if extra is None:
            raise
        return _fail(prog, f"this command needs the '{extra}' extra (module {top!r} is not installed): "
                           f"pip install 'cogbert[{extra}]'", EXIT_MISSING)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(prog, f"{where}{e.strerror or e}", EXIT_USAGE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _fail(prog: str, message: str, code: int) -> int:
    first = " ".join(message.split())    # one line, whatever the message holds
    print(f"{prog}: error: {first}", file=sys.stderr)
    return code


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the edge commands; returns the ``device`` group so the cloud can add to it."""
    device = sub.add_parser("device", help="device-side tools")
    dsub = device.add_subparsers(dest="device_cmd", required=True)
    csr = dsub.add_parser("csr", help="make this device's private key and a signing request for the CA")
    csr.add_argument("out", type=Path, help="directory for key.pem (0600) and csr.pem")
    csr.add_argument("device_id")
    csr.set_defaults(func=_csr)

    bundle = sub.add_parser("bundle", help="create, quantize and inspect model bundles")
    bsub = bundle.add_subparsers(dest="bundle_cmd", required=True)

    init = bsub.add_parser("init", help="write a randomly initialised fp32 model bundle")
    init.add_argument("out", type=Path)
    init.add_argument("--obs-dim", type=int, default=64)
    init.add_argument("--hidden", type=int, default=256)
    init.add_argument("--encoder", default="256", help="comma-separated encoder widths ('' for none)")
    init.add_argument("--actions", type=int, default=8, help="number of discrete actions")
    init.add_argument("--continuous", type=int, default=None, metavar="DIM",
                      help="a continuous action space of DIM dimensions instead of --actions")
    init.add_argument("--obs-clip", type=float, default=10.0)
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--policy-gain", type=float, default=0.01,
                      help="initial scale of the policy head (0.01: near-uniform, as PPO starts)")
    init.add_argument("--model-id", default=None)
    init.set_defaults(func=_init)

    quant = bsub.add_parser("quantize", help="quantize an fp32 bundle to int8 or int4")
    quant.add_argument("input", type=Path)
    quant.add_argument("out", type=Path)
    quant.add_argument("--bits", type=int, choices=(8, 4), required=True)
    quant.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64)
    quant.set_defaults(func=_quantize)

    insp = bsub.add_parser("inspect", help="validate a bundle and describe it")
    insp.add_argument("file", type=Path)
    insp.add_argument("--json", action="store_true", help="print one JSON object")
    insp.set_defaults(func=_inspect)
    return dsub


def _csr(args: argparse.Namespace) -> int:
    from cogbert_edge.link.identity import make_key_and_csr
    key, csr = make_key_and_csr(args.device_id, args.out)
    print(f"wrote {key} (keep it on the device) and {csr} (send it to the fleet CA)")
    return 0


def _init(args: argparse.Namespace) -> int:
    action = (ActionSpace.of_continuous(args.continuous) if args.continuous
              else ActionSpace.of_discrete(args.actions))
    encoder = tuple(int(w) for w in args.encoder.split(",") if w.strip())
    config = ModelConfig(obs_dim=args.obs_dim, action=action, encoder=encoder,
                         hidden=args.hidden, obs_clip=args.obs_clip)
    params = init_params(config, args.seed, policy_gain=args.policy_gain)
    bundle = Bundle.create(config, params, model_id=args.model_id)
    size = bundle.save(args.out)
    print(f"wrote {args.out} ({size} bytes, model {bundle.model_id}, fp32)")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    src = load_bundle(args.input)
    if src.quant:
        raise BundleError(f"{args.input} is already quantized ({src.quant_label}); quantize from the fp32 bundle")
    layers = plan(src.config, args.bits, args.group_size)
    out = Bundle.create(src.config, quantize_params(dict(src.tensors), layers), quant=layers,
                        parent=src.model_id, extra=dict(src.extra))
    size = out.save(args.out)
    print(f"wrote {args.out} ({size} bytes, model {out.model_id}, {out.quant_label}, parent {src.model_id})")
    return 0


def describe(path: Path) -> dict:
    """What ``bundle inspect --json`` prints."""
    data = Path(path).read_bytes()
    b = load_bundle(data)
    return {
        "file": str(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "model_id": b.model_id,
        "parent": b.parent,
        "created_at": b.created_at,
        "format_version": 1,
        "config": {**b.config.to_dict(), "obs_clip": b.config.obs_clip},
        "quantization": {"label": b.quant_label,
                         "layers": {k: q.to_dict() for k, q in sorted(b.quant.items())}},
        "macs_per_step": b.config.macs_per_step(),
        "tensors": [{"name": n, "dtype": "F32" if t.dtype.kind == "f" else "U32",
                     "shape": list(t.shape), "bytes": int(t.nbytes)}
                    for n, t in sorted(b.tensors.items())],
        "extra": dict(b.extra),
    }


def _inspect(args: argparse.Namespace) -> int:
    info = describe(args.file)
    if args.json:
        json.dump(info, sys.stdout)
        print()
        return 0
    c = info["config"]
    print(f"{info['file']}: Cogbert bundle v1, {info['bytes']} bytes, sha256 {info['sha256'][:16]}…")
    print(f"  model {info['model_id']}  parent {info['parent'] or '-'}  created {info['created_at']}")
    print(f"  obs {c['obs_dim']} -> encoder {c['encoder']} -> LSTM {c['hidden']} -> "
          f"{c['action']['kind']} {c['action']['size']}  (clip {c['obs_clip']})")
    print(f"  quantization {info['quantization']['label']}, {info['macs_per_step']} MACs per step")
    for t in info["tensors"]:
        print(f"    {t['name']:<20} {t['dtype']}  {str(t['shape']):<14} {t['bytes']:>9} B")
    return 0
