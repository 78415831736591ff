"""Model structure for quantization tools, as data: per family, the HF names of a decoder layer's parts and
where AWQ's per-channel scales can be folded (a norm -> the linears it feeds; a linear -> the linear it feeds).

A scale s on the input channels of a group of linears is exact in fp arithmetic when the op producing that
input divides its output channels by s: an RMSNorm's weight, or the rows of a preceding linear (v -> o when
v's output is o's whole input, i.e. no GQA; up -> down, since silu(gate) * up is linear in up).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class ScaleGroup:
    prev: str                    # HF suffix of the op whose output channels absorb 1/s
    linears: Tuple[str, ...]     # HF suffixes of the linears whose input channels get * s
    inp: str                     # name of their shared input in the layer forward's observations


@dataclass(frozen=True)
class QuantFamily:
    layers: str                  # prefix of decoder layers: f"{layers}.{i}."
    embed: str
    final_norm: str
    lm_head: str
    roles: Dict[str, str]        # role in the layer forward -> HF suffix
    norms: Tuple[str, ...]       # HF suffixes that are RMSNorm weights
    groups: Tuple[ScaleGroup, ...]
    no_clip: Tuple[str, ...]     # linears whose weight clipping is not searched (q/k: attention logits are
                                 # sensitive to the clipped outliers, as llm-awq found)

    @property
    def linears(self) -> Tuple[str, ...]:
        return tuple(self.roles[r] for r in ("q", "k", "v", "o", "gate", "up", "down"))


_LLAMA = QuantFamily(
    layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
    roles={"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
           "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    norms=("input_layernorm", "post_attention_layernorm"),
    groups=(
        ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "o"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "gate_up"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "down"),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)

FAMILIES: Dict[str, QuantFamily] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
}


def family_for(arch: str) -> QuantFamily:
    if arch not in FAMILIES:
        raise ValueError(f"quantization tools do not support architecture {arch!r}; "
                         f"supported: {', '.join(FAMILIES)}")
    return FAMILIES[arch]
