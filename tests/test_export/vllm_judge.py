"""vLLM as a judge of a compressed-tensors checkpoint, on CPU: its own config parsing, per-layer scheme selection
and weight creation. Run with an interpreter that has vLLM (tests/test_export/test_vllm.py does).

Usage:  VLLM_PYTHON tests/test_export/vllm_judge.py CKPT_DIR [--capability 9.0|8.0|none]

Prints ONE JSON line on stdout (all logging goes to stderr):
  {"vllm_version", "ok", "schemes": {hf_layer: SchemeClass | null}, "error",
   "capability", "patched": [str], "packed_modules_mapping", "fused_schemes": {vllm_fused_layer: SchemeClass | null},
   "layer_errors": {layer: msg}, "tensor_problems": {layer: msg}, "kernels": {SchemeClass: [KernelClass]}}
null = vLLM would run the layer unquantized (ignored / not targeted). For every quantized layer the scheme's own
`create_weights` makes the parameters vLLM would load the checkpoint into; each checkpoint tensor of the layer must
be one of them with the same shape and value dtype, and every parameter must come from the checkpoint.
"kernels" = {SchemeClass: [GEMM kernel classes vLLM's own chooser picked]}; "patched" lists what was patched.

Needs no GPU. What is patched (all listed in "patched"; nothing with --capability none), and why:
1. current_platform.get_device_capability (whole run) returns the --capability, so that scheme selection
   (_check_scheme_supported, the fp8 W8A8-vs-W8A16 choice) behaves as on that GPU.
2. Only while `create_weights` runs, current_platform's class is swapped for a subclass of itself with
   `_enum = PlatformEnum.CUDA` and a class-level get_device_capability (the classmethods
   has_device_capability etc. call `cls.get_device_capability`). The schemes call vLLM's kernel chooser
   (init_int8_linear_kernel, choose_mp_linear_kernel, init_fp8_linear_kernel, init_wfp8_a16_linear_kernel),
   which takes its candidates from a per-PlatformEnum list and checks them with is_cuda() and the
   capability; on an UnspecifiedPlatform that list is empty ("Failed to find a kernel"). With the patch
   it picks a real CUDA kernel class by its own is_supported/can_implement. The kernel object is only
   constructed (it records its config; the FP8 ones also build their QuantFP8 activation op object):
   process_weights_after_loading and apply_weights are never called, nothing runs on a device.
3. Same window: VLLM_DISABLED_KERNELS (vLLM's own switch) names CutlassFP8ScaledMMLinearKernel, whose
   is_supported() asks the compiled CUDA extension (torch.ops._C.cutlass_scaled_mm_supports_fp8) and
   raises without it; vLLM's chooser then takes the next candidate of its list.
Why 2 and 3 cannot change the verdict: the parameters are made by the scheme's own create_weights, and in
the four schemes judged here they do not depend on the kernel chosen (W8A8Fp8 and W8A16Fp8 create them
before asking for a kernel; W8A8Int8 and WNA16 only pass the kernel class on, WNA16 after the parameter
shapes and dtypes are fixed by num_bits/group_size/params_dtype).
Not a patch but setup: vLLM's parameters read the tensor-parallel rank/size when they are built, so a
one-process distributed world (gloo, tp=1, pp=1) is initialised as a vLLM worker does.
"""
import argparse
import contextlib
import glob
import json
import os
import socket
import sys
import traceback
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LINEAR_SUFFIXES = (".weight_packed", ".weight_scale", ".weight")
DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def tensor_shapes(folder):
    from safetensors import safe_open
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(f, "np") as h:
            for k in h.keys():
                out[k] = h.get_slice(k).get_shape()
    return out


def module_names(shapes):
    """name -> kind ('linear' | 'embedding' | 'lm_head'); 1-D '.weight' (norms) are skipped."""
    mods = {}
    for k, shape in shapes.items():
        for suf in LINEAR_SUFFIXES:
            if k.endswith(suf):
                name = k[: -len(suf)]
                if suf == ".weight" and len(shape) != 2 and name + ".weight_scale" not in shapes:
                    break  # layernorm etc.
                last = name.rsplit(".", 1)[-1]
                kind = "embedding" if last in ("embed_tokens", "wte", "word_embeddings") else (
                    "lm_head" if last == "lm_head" else "linear")
                mods[name] = kind
                break
    return dict(sorted(mods.items()))


def packed_mapping_for(arch):
    """vLLM's own packed_modules_mapping for the architecture (what vLLM sets on the quant config)."""
    try:
        from vllm.model_executor.models import ModelRegistry
        cls = ModelRegistry._try_load_model_cls(arch)
        m = getattr(cls, "packed_modules_mapping", None)
        if m:
            return dict(m), f"{cls.__name__}.packed_modules_mapping"
    except Exception as e:  # noqa: BLE001
        print(f"[judge] could not load vLLM model class for {arch}: {e!r}", file=sys.stderr)
    return dict(DEFAULT_PACKED), "default (Llama-style)"


def make_vllm_config(folder, cfg_json, res):
    """Some scheme constructors read get_current_vllm_config() (e.g. CompressedTensorsW8A8Fp8 reads
    model_config.dtype). Build a real VllmConfig from the folder (device 'cpu'); if that fails, a
    VllmConfig whose model_config is a stub carrying only the checkpoint's dtype."""
    import torch
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig
    try:
        mc = ModelConfig(model=folder, skip_tokenizer_init=True)
        res["vllm_config"] = "real ModelConfig"
        return VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"))
    except Exception as e:  # noqa: BLE001
        import types
        dt = cfg_json.get("dtype") or cfg_json.get("torch_dtype") or "bfloat16"
        vc = VllmConfig(device_config=DeviceConfig(device="cpu"))
        object.__setattr__(vc, "model_config", types.SimpleNamespace(dtype=getattr(torch, dt)))
        res["vllm_config"] = f"stub model_config(dtype={dt}) because ModelConfig failed: {type(e).__name__}: {e}"[:400]
        return vc


@contextlib.contextmanager
def single_process_distributed():
    """A one-process vLLM distributed world (gloo on CPU, tp=1, pp=1); needs the current vLLM config set."""
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    try:
        initialize_model_parallel(1, 1)
        yield
    finally:
        destroy_model_parallel()
        destroy_distributed_environment()


# is_supported() of these asks the compiled CUDA extension (vllm._C), which a CPU machine does not have
_NEEDS_CUDA_EXTENSION = ["CutlassFP8ScaledMMLinearKernel"]


@contextlib.contextmanager
def cuda_platform(platform, capability, patched):
    """Patches 2 and 3 of the module docstring, undone on exit; what was done is appended to `patched`."""
    from vllm.platforms import PlatformEnum
    from vllm.platforms.interface import DeviceCapability

    cap = DeviceCapability(*capability)
    original = type(platform)
    platform.__class__ = type(f"CudaLike{original.__name__}", (original,), {
        "_enum": PlatformEnum.CUDA, "get_device_capability": classmethod(lambda cls, device_id=0: cap)})
    disabled = [k for k in os.environ.get("VLLM_DISABLED_KERNELS", "").split(",") if k] + _NEEDS_CUDA_EXTENSION
    patched.append(f"during create_weights: current_platform is a {original.__name__} subclass with "
                   f"_enum=CUDA and class-level get_device_capability={cap.major}.{cap.minor} "
                   "(so vLLM's kernel choosers use their CUDA kernel lists)")
    patched.append(f"during create_weights: VLLM_DISABLED_KERNELS={','.join(disabled)} "
                   "(is_supported() needs the compiled CUDA extension vllm._C)")
    try:
        with mock.patch.dict(os.environ, {"VLLM_DISABLED_KERNELS": ",".join(disabled)}):
            yield
    finally:
        platform.__class__ = original


def kernels_of(scheme):
    """Names of the linear-kernel objects the scheme holds (what vLLM's chooser picked)."""
    return [type(v).__name__ for v in vars(scheme).values()
            if type(v).__module__.startswith("vllm.model_executor.kernels.")]


_VALUE_DTYPES = {"I8": "torch.int8", "F8_E4M3": "torch.float8_e4m3fn", "I32": "torch.int32", "I64": "torch.int64"}


def check_tensors(cfg, folder, mods):
    """Create each quantized layer's parameters with vLLM's scheme and compare them with the checkpoint's tensors.
    Returns (problems {layer: msg}, kernels {SchemeClass: [kernel classes]})."""
    import torch
    from safetensors import safe_open

    tensors = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                tensors[k] = (sl.get_dtype(), list(sl.get_shape()), f)
    problems, kernels = {}, {}
    for name, kind in mods.items():
        if kind != "linear":
            continue
        try:
            scheme = cfg.get_scheme(layer=torch.nn.Linear(1, 1, device="meta"), layer_name=name)
        except Exception:  # noqa: BLE001, S112 - the scheme check reports this layer already
            continue
        if scheme is None:
            continue
        own = {k[len(name) + 1:]: v for k, v in tensors.items()
               if k.startswith(name + ".") and "." not in k[len(name) + 1:] and not k.endswith(".bias")}
        if "weight" in own:
            out_f, in_f = own["weight"][1]
        elif "weight_shape" in own:
            with safe_open(own["weight_shape"][2], "pt") as h:
                out_f, in_f = (int(v) for v in h.get_tensor(f"{name}.weight_shape").tolist())
        else:
            problems[name] = f"no weight or weight_shape among {sorted(own)}"
            continue
        layer = torch.nn.Module()
        try:
            scheme.create_weights(layer=layer, output_size=out_f, input_size=in_f, output_partition_sizes=[out_f],
                                  input_size_per_partition=in_f, params_dtype=torch.bfloat16,
                                  weight_loader=lambda *a, **k: None)
        except Exception as e:  # noqa: BLE001
            problems[name] = f"create_weights failed: {type(e).__name__}: {e}"[:400]
            continue
        kernels.setdefault(type(scheme).__name__, set()).update(kernels_of(scheme))
        params = {n: p for n, p in layer.named_parameters(recurse=False)}
        missing = sorted(set(params) - set(own))
        extra = sorted(set(own) - set(params))
        if missing or extra:
            problems[name] = f"vLLM creates {sorted(params)}, the checkpoint has {sorted(own)}"
            continue
        for n, (dtype, shape, _) in own.items():
            p = params[n]
            if list(p.shape) != shape and p.numel() != 1:
                problems[name] = f"{n}: checkpoint {shape}, vLLM parameter {list(p.shape)}"
            elif dtype in _VALUE_DTYPES and str(p.dtype) != _VALUE_DTYPES[dtype]:
                problems[name] = f"{n}: checkpoint {dtype}, vLLM parameter {p.dtype}"
    return problems, {k: sorted(v) for k, v in kernels.items()}


def run(folder, capability):
    import torch
    import vllm
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    res = {"vllm_version": vllm.__version__, "ok": False, "schemes": {}, "error": None,
           "capability": capability, "platform": type(current_platform).__name__, "patched": []}

    # Patch 1 of the module docstring: scheme selection behaves as on a GPU of that capability.
    cap = None if capability == "none" else tuple(int(x) for x in capability.split("."))
    if cap:
        current_platform.get_device_capability = lambda device_id=0: DeviceCapability(*cap)
        res["patched"].append(f"whole run: current_platform.get_device_capability() -> {capability}")

    with open(os.path.join(folder, "config.json")) as fh:
        cfg_json = json.load(fh)
    qc = cfg_json["quantization_config"]
    cfg = CompressedTensorsConfig.from_config(qc)

    arch = (cfg_json.get("architectures") or ["LlamaForCausalLM"])[0]
    packed, src = packed_mapping_for(arch)
    cfg.packed_modules_mapping = packed  # as vLLM's model loader does
    res["packed_modules_mapping"] = {"source": src, "mapping": packed}

    # dummy modules whose class names match what vLLM would pass (targets like "Linear" match by class name)
    ParallelLMHead = type("ParallelLMHead", (torch.nn.Module,), {})
    VocabParallelEmbedding = type("VocabParallelEmbedding", (torch.nn.Module,), {})

    errors = {}
    vllm_config = make_vllm_config(folder, cfg_json, res)

    def ask(name, kind):
        try:
            if kind == "linear":
                s = cfg.get_scheme(layer=torch.nn.Linear(1, 1, device="meta"), layer_name=name)
            elif kind == "lm_head":  # vLLM: get_scheme inside try/except ValueError
                try:
                    s = cfg.get_scheme(layer=ParallelLMHead(), layer_name=name)
                except ValueError:
                    s = None
            else:  # embedding: vLLM only accepts weight-only INT group/channel
                d = cfg.get_scheme_dict(VocabParallelEmbedding(), layer_name=name)
                w = d.get("weights") if d else None
                return None if w is None else "CompressedTensorsEmbeddingWNA16Int"
            return None if s is None else type(s).__name__
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"[:400]
            return "ERROR"

    mods = module_names(tensor_shapes(folder))
    with set_current_vllm_config(vllm_config):
        for name, kind in mods.items():
            res["schemes"][name] = ask(name, kind)

    # vLLM's fused layers: ask for e.g. model.layers.0.self_attn.qkv_proj when all shards exist
    fused = {}
    for name, kind in mods.items():
        if kind != "linear":
            continue
        parent, last = name.rsplit(".", 1)
        for fname, parts in packed.items():
            if last == parts[0] and all(f"{parent}.{p}" in mods for p in parts):
                with set_current_vllm_config(vllm_config):
                    fused[f"{parent}.{fname}"] = ask(f"{parent}.{fname}", "linear")
    res["fused_schemes"] = fused

    res["layer_errors"] = errors
    with set_current_vllm_config(vllm_config), single_process_distributed(), (
            cuda_platform(current_platform, cap, res["patched"]) if cap else contextlib.nullcontext()):
        res["tensor_problems"], res["kernels"] = check_tensors(cfg, folder, mods)
    res["ok"] = not errors and not res["tensor_problems"]
    if errors:
        res["error"] = f"{len(errors)} layer(s) failed; first: " + next(iter(errors.values()))
    elif res["tensor_problems"]:
        first = next(iter(res["tensor_problems"].items()))
        res["error"] = f"{len(res['tensor_problems'])} layer(s) with tensor problems; first: {first[0]}: {first[1]}"
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--capability", default="9.0",
                    help="fake GPU compute capability 'MAJOR.MINOR' (default 9.0), or 'none' = no patch "
                         "(then create_weights fails wherever the scheme needs a kernel: none for this platform)")
    a = ap.parse_args()
    real_stdout = sys.stdout
    res = {"vllm_version": None, "ok": False, "schemes": {}, "error": None}
    with contextlib.redirect_stdout(sys.stderr):  # vLLM logs to stdout by default
        try:
            res = run(a.folder, a.capability)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            try:
                import vllm
                res["vllm_version"] = vllm.__version__
            except Exception:  # noqa: BLE001
                pass
            res["error"] = f"{type(e).__name__}: {e}"
    real_stdout.write(json.dumps(res) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
