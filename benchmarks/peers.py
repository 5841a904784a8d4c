"""Comparison peers: the same Cogbert step (same weights, same math) in ONNX Runtime and PyTorch.

Each peer exposes ``step(obs [B, obs_dim]) -> logits`` with its recurrent state kept inside,
one thread, the way a device application would embed it. They compute the raw step only (no
input checks, no sampling), so the comparison with Cogbert's public API is conservative.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cogbert_edge.inference.model import ModelConfig


def onnx_model(params: Mapping[str, np.ndarray], config: ModelConfig):
    """The step as an ONNX graph: inputs obs, h, c; outputs head, value, h_out, c_out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def gemm(name: str, x: str, out: str, bias: bool = True) -> str:
        w = const(f"{name}.weight", params[f"{name}.weight"])
        ins = [x, w] + ([const(f"{name}.bias", params[f"{name}.bias"])] if bias else [])
        nodes.append(helper.make_node("Gemm", ins, [out], transB=1))
        return out

    n = config.hidden
    nodes.append(helper.make_node("Sub", ["obs", const("mean", params["obs_norm.mean"])], ["centered"]))
    nodes.append(helper.make_node("Div", ["centered", const("std", params["obs_norm.std"])], ["z"]))
    x = "z"
    if config.obs_clip > 0:
        nodes.append(helper.make_node("Clip", ["z", const("lo", np.float32(-config.obs_clip)),
                                               const("hi", np.float32(config.obs_clip))], ["zc"]))
        x = "zc"
    for i in range(len(config.encoder)):
        gemm(f"encoder.{i}", x, f"e{i}")
        nodes.append(helper.make_node("Relu", [f"e{i}"], [f"r{i}"]))
        x = f"r{i}"
    gemm("lstm.ih", x, "ih")
    gemm("lstm.hh", "h", "hh", bias=False)
    nodes.append(helper.make_node("Add", ["ih", "hh"], ["gates"]))
    nodes.append(helper.make_node("Split", ["gates", const_i64(inits, "split", [n, n, n, n])],
                                  ["gi", "gf", "gg", "go"], axis=1))
    for g, op in (("gi", "Sigmoid"), ("gf", "Sigmoid"), ("gg", "Tanh"), ("go", "Sigmoid")):
        nodes.append(helper.make_node(op, [g], [g + "a"]))
    nodes.append(helper.make_node("Mul", ["gfa", "c"], ["fc"]))
    nodes.append(helper.make_node("Mul", ["gia", "gga"], ["ig"]))
    nodes.append(helper.make_node("Add", ["fc", "ig"], ["c_out"]))
    nodes.append(helper.make_node("Tanh", ["c_out"], ["tc"]))
    nodes.append(helper.make_node("Mul", ["goa", "tc"], ["h_out"]))
    gemm("policy", "h_out", "head")
    gemm("value", "h_out", "value")

    a = config.action.size
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "cogbert_step",
        [helper.make_tensor_value_info("obs", f32, ["B", config.obs_dim]),
         helper.make_tensor_value_info("h", f32, ["B", n]),
         helper.make_tensor_value_info("c", f32, ["B", n])],
        [helper.make_tensor_value_info("head", f32, ["B", a]),
         helper.make_tensor_value_info("value", f32, ["B", 1]),
         helper.make_tensor_value_info("h_out", f32, ["B", n]),
         helper.make_tensor_value_info("c_out", f32, ["B", n])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def const_i64(inits: list, name: str, values: list[int]) -> str:
    from onnx import numpy_helper
    inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
    return name


class OnnxPeer:
    """ONNX Runtime, one thread, I/O binding to preallocated buffers (no per-call allocation)."""

    name = "onnxruntime"

    def __init__(self, params: Mapping[str, np.ndarray], config: ModelConfig, batch: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(onnx_model(params, config).SerializeToString(), so,
                                         providers=["CPUExecutionProvider"])
        n = config.hidden
        self.buf = {k: np.zeros(shape, np.float32) for k, shape in {
            "obs": (batch, config.obs_dim), "h": (batch, n), "c": (batch, n),
            "head": (batch, config.action.size), "value": (batch, 1), "h_out": (batch, n),
            "c_out": (batch, n)}.items()}
        self.io = self.sess.io_binding()
        for k in ("obs", "h", "c"):
            self.io.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(self.buf[k]))
        for k in ("head", "value", "h_out", "c_out"):
            self.io.bind_ortvalue_output(k, ort.OrtValue.ortvalue_from_numpy(self.buf[k]))

    def step(self, obs: np.ndarray) -> np.ndarray:
        b = self.buf
        np.copyto(b["obs"], obs)
        self.sess.run_with_iobinding(self.io)
        np.copyto(b["h"], b["h_out"])
        np.copyto(b["c"], b["c_out"])
        return b["head"]


class TorchPeer:
    """PyTorch eager, one thread, ``inference_mode``, ``nn.LSTMCell`` with the same weights."""

    name = "torch"

    def __init__(self, params: Mapping[str, np.ndarray], config: ModelConfig, batch: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        t = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params.items()}
        enc, width = [], config.obs_dim
        for i, out in enumerate(config.encoder):
            lin = torch.nn.Linear(width, out)
            lin.weight.data, lin.bias.data = t[f"encoder.{i}.weight"], t[f"encoder.{i}.bias"]
            enc += [lin, torch.nn.ReLU()]
            width = out
        self.encoder = torch.nn.Sequential(*enc)
        self.cell = torch.nn.LSTMCell(width, config.hidden)
        self.cell.weight_ih.data, self.cell.bias_ih.data = t["lstm.ih.weight"], t["lstm.ih.bias"]
        self.cell.weight_hh.data = t["lstm.hh.weight"]
        self.cell.bias_hh.data = torch.zeros(4 * config.hidden)
        self.policy = torch.nn.Linear(config.hidden, config.action.size)
        self.policy.weight.data, self.policy.bias.data = t["policy.weight"], t["policy.bias"]
        self.value = torch.nn.Linear(config.hidden, 1)
        self.value.weight.data, self.value.bias.data = t["value.weight"], t["value.bias"]
        self.mean, self.std, self.clip = t["obs_norm.mean"], t["obs_norm.std"], config.obs_clip
        self.h = torch.zeros(batch, config.hidden)
        self.c = torch.zeros(batch, config.hidden)

    def step(self, obs: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            z = (torch.from_numpy(obs) - self.mean) / self.std
            if self.clip > 0:
                z = z.clamp(-self.clip, self.clip)
            self.h, self.c = self.cell(self.encoder(z), (self.h, self.c))
            head = self.policy(self.h)
            self.value(self.h)
        return head.numpy()


PEERS = {"onnxruntime": OnnxPeer, "torch": TorchPeer}


def peer_available(name: str) -> bool:
    import importlib.util
    mod = {"onnxruntime": "onnxruntime", "torch": "torch"}[name]
    return importlib.util.find_spec(mod) is not None and (
        name != "onnxruntime" or importlib.util.find_spec("onnx") is not None)
