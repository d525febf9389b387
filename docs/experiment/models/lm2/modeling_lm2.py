"""LM2 (Large Memory Models, arXiv 2502.06049) for Hugging Face transformers, written by lm2's exporter.

Standalone: imports only torch and transformers (and configuration_lm2.py beside it), so an exported folder
loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` where lm2 is not installed.

Semantics (lm2's docs/memory.md). The token stream is cut into segments of S = config.segment_length tokens.
Inside a segment, self-attention is causal and RoPE positions restart at 0. Every block with memory holds a bank
M of N slots x d_m, split into H_m heads; M starts as the learned `init_bank` for every new sequence.
- read, every token:  r = softmax(q K(M_s)^T / sqrt(d_h)) V(M_s); h = x + attn + (sigmoid(r W_g + b) * r) W_o
- write, when a segment completes: slots attend to the segment's tokens (u), then
  M_{s+1} = sigmoid([u, M] W_in + b_in) * tanh(u) + sigmoid([u, M] W_f + b_f) * M   (config.memory_write_rule
  "paper"), or with g_f = sigmoid([u, M] W_f + b_f): M_{s+1} = g_f * M + (1 - g_f) * tanh(u)   ("convex")
- config.memory_read_norm: the read sees M RMS-normalised per memory head (no gain).
Inputs of any length are processed segment by segment. The cache (LM2Cache) holds, per block, the current
segment's keys and values and the memory, so prompt processing and token-by-token decoding give the logits of
one forward over the whole sequence; the memory is written when a segment completes, as in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lm2 import LM2Config


class LM2RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [len(positions), head_dim], half-split layout (Llama's rotate_half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LM2Cache:
    """Decoding state between forward calls: tokens seen; per block the keys and values (after RoPE) of the
    current segment's tokens, the write-side projections of those tokens, and the memory M_s (None for a block
    without memory, or before the first token). Completing a segment writes the memory and empties the rest."""

    def __init__(self, num_layers: int):
        self.seen = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.write_keys: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.write_values: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.memory: list[torch.Tensor | None] = [None] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def end_segment(self) -> None:
        num_layers = len(self.keys)
        self.keys, self.values = [None] * num_layers, [None] * num_layers
        self.write_keys = [[] for _ in range(num_layers)]
        self.write_values = [[] for _ in range(num_layers)]


class LM2Attention(nn.Module):
    """Grouped-query causal self-attention over the current segment (cached keys first)."""

    def __init__(self, config: LM2Config):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, xn, cos, sin, past_keys, past_values):
        """xn [B, T, d], new tokens of one segment -> (out [B, T, d], keys, values of the segment so far)."""
        b, t, _ = xn.shape
        q = self.q_proj(xn).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(xn).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(xn).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_keys is not None:
            k, v = torch.cat((past_keys, k), dim=2), torch.cat((past_values, v), dim=2)
        groups = self.num_heads // self.num_kv_heads
        k_all, v_all = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if past_keys is None:
            out = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True)
        else:  # new token i sits at position past + i of the segment
            past = past_keys.shape[2]
            mask = torch.ones(t, past + t, dtype=torch.bool, device=xn.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), k, v


class LM2MLP(nn.Module):
    def __init__(self, config: LM2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., H, i] @ weight [H, i, j] -> [..., H, j]: each memory head with its own matrix."""
    return torch.einsum("...hi,hij->...hj", x, weight)


def _attend(q, k, v):
    """Unmasked attention on head-last tensors [B, T, H, dh]."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class LM2MemoryBank(nn.Module):
    """The gated memory of one block. Memory-side weights are head-local: head h only touches its d_h columns."""

    def __init__(self, config: LM2Config):
        super().__init__()
        d, d_m, heads = config.hidden_size, config.memory_dim, config.memory_heads
        self.slots, self.heads, self.head_dim = config.memory_slots, heads, d_m // heads
        dh = self.head_dim
        self.convex = config.memory_write_rule == "convex"
        self.read_norm_eps = config.rms_norm_eps if config.memory_read_norm else None
        self.init_bank = nn.Parameter(torch.zeros(self.slots, d_m))
        self.read_q = nn.Linear(d, d_m, bias=False)
        self.read_k = nn.Parameter(torch.zeros(heads, dh, dh))
        self.read_v = nn.Parameter(torch.zeros(heads, dh, dh))
        self.out_gate = nn.Parameter(torch.zeros(heads, dh, dh))
        self.out_gate_bias = nn.Parameter(torch.zeros(heads, dh))
        self.out_proj = nn.Linear(d_m, d, bias=False)
        self.write_q = nn.Parameter(torch.zeros(heads, dh, dh))
        self.write_k = nn.Linear(d, d_m, bias=False)
        self.write_v = nn.Linear(d, d_m, bias=False)
        self.in_gate = nn.Parameter(torch.zeros(heads, 2 * dh, dh))
        self.in_gate_bias = nn.Parameter(torch.zeros(heads, dh))
        self.forget_gate = nn.Parameter(torch.zeros(heads, 2 * dh, dh))
        self.forget_gate_bias = nn.Parameter(torch.zeros(heads, dh))

    def _heads(self, x):
        return x.view(*x.shape[:-1], self.heads, self.head_dim)

    def initial_state(self, batch: int) -> torch.Tensor:
        """M_0, [B, N, H, dh]."""
        return self.init_bank.view(1, self.slots, self.heads, self.head_dim).expand(batch, -1, -1, -1)

    def read_memory(self, mem):
        """mem [B, N, H, dh] as the read sees it: RMS-normalised per head (fp32) with memory_read_norm."""
        if self.read_norm_eps is None:
            return mem
        m32 = mem.float()
        return (m32 * torch.rsqrt(m32.pow(2).mean(-1, keepdim=True) + self.read_norm_eps)).type_as(mem)

    def read(self, xn, mem):
        """Gated read of tokens xn [B, T, d] from mem [B, N, H, dh] -> [B, T, d]."""
        mem = self.read_memory(mem)
        r = _attend(self._heads(self.read_q(xn)), _per_head(mem, self.read_k), _per_head(mem, self.read_v))
        gate = torch.sigmoid(_per_head(r, self.out_gate) + self.out_gate_bias)
        return self.out_proj((gate * r).flatten(-2))

    def write_projections(self, xn):
        """Keys and values the slots will attend to when the segment completes, [B, T, H, dh] each."""
        return self._heads(self.write_k(xn)), self._heads(self.write_v(xn))

    def write(self, keys, values, mem):
        """M_{s+1} from the segment's keys/values [B, S, H, dh] and M_s [B, N, H, dh]."""
        u = _attend(_per_head(mem, self.write_q), keys, values)
        both = torch.cat((u, mem), dim=-1)
        g_forget = torch.sigmoid(_per_head(both, self.forget_gate) + self.forget_gate_bias)
        if self.convex:
            return g_forget * mem + (1 - g_forget) * torch.tanh(u)
        g_in = torch.sigmoid(_per_head(both, self.in_gate) + self.in_gate_bias)
        return g_in * torch.tanh(u) + g_forget * mem


class LM2DecoderLayer(nn.Module):
    def __init__(self, config: LM2Config, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = LM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LM2Attention(config)
        self.memory = LM2MemoryBank(config) if config.has_memory(index) else None
        self.post_attention_layernorm = LM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LM2MLP(config)

    def forward(self, x, cos, sin, cache: LM2Cache):
        """New tokens x [B, T, d] of the current segment; updates this block's entries of the cache."""
        i = self.index
        xn = self.input_layernorm(x)
        attn, cache.keys[i], cache.values[i] = self.self_attn(xn, cos, sin, cache.keys[i], cache.values[i])
        h = x + attn
        if self.memory is not None:
            if cache.memory[i] is None:
                cache.memory[i] = self.memory.initial_state(x.shape[0])
            h = h + self.memory.read(xn, cache.memory[i])
            keys, values = self.memory.write_projections(xn)
            cache.write_keys[i].append(keys)
            cache.write_values[i].append(values)
        return h + self.mlp(self.post_attention_layernorm(h))

    def write_memory(self, cache: LM2Cache) -> None:
        """The end of a segment: M_{s+1} from this segment's tokens."""
        i = self.index
        if self.memory is not None:
            keys, values = torch.cat(cache.write_keys[i], dim=1), torch.cat(cache.write_values[i], dim=1)
            cache.memory[i] = self.memory.write(keys, values, cache.memory[i])


class LM2PreTrainedModel(PreTrainedModel):
    config_class = LM2Config
    base_model_prefix = "model"
    _no_split_modules = ["LM2DecoderLayer"]
    _is_stateful = True  # generate() must not build a DynamicCache: the model makes its own LM2Cache

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, LM2RMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, LM2MemoryBank):
            for weight in (
                module.read_k,
                module.read_v,
                module.out_gate,
                module.write_q,
                module.in_gate,
                module.forget_gate,
            ):
                weight.data.normal_(mean=0.0, std=std)
            module.out_gate_bias.data.zero_()
            module.in_gate_bias.data.zero_()
            module.forget_gate_bias.data.fill_(1.0)
            bank = torch.zeros_like(module.init_bank.data)
            bank[torch.arange(module.slots), torch.arange(module.slots) % bank.shape[1]] = 1.0
            module.init_bank.data.copy_(bank)


class LM2Model(LM2PreTrainedModel):
    def __init__(self, config: LM2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor, cache: LM2Cache) -> torch.Tensor:
        """input_ids [B, T] continuing the stream in `cache` -> normalised hidden states [B, T, d]. The input is
        cut at segment boundaries; each piece runs through all blocks, and a completed segment writes memory."""
        length, S = input_ids.shape[1], self.config.segment_length
        outputs, start = [], 0
        while start < length:
            offset = cache.seen % S
            n = min(length - start, S - offset)
            h = self.embed_tokens(input_ids[:, start : start + n])
            positions = torch.arange(offset, offset + n, device=h.device)
            cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
            for layer in self.layers:
                h = layer(h, cos, sin, cache)
            cache.seen += n
            if offset + n == S:
                for layer in self.layers:
                    layer.write_memory(cache)
                cache.end_segment()
            outputs.append(h)
            start += n
        return self.norm(torch.cat(outputs, dim=1))


class LM2ForCausalLM(LM2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: LM2Config):
        super().__init__(config)
        self.model = LM2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: LM2Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T]: the next T tokens after those in past_key_values (a new sequence without it).
        attention_mask may only be all ones: padding would shift the segment boundaries of a row.
        logits_to_keep: logits of the last that many positions only (0: all), as in transformers' Llama; generate()
        asks for 1, so a long prompt never builds its [T, vocab] logits (67 GB at 128K tokens and 128K words)."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "LM2 does not support padded batches (memory segments are counted from each "
                "sequence's first token): run sequences of different lengths separately"
            )
        if labels is not None and logits_to_keep:
            raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")
        cache = past_key_values if past_key_values is not None else LM2Cache(self.config.num_hidden_layers)
        logits = self.lm_head(self.model(input_ids, cache)[:, -logits_to_keep:])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        keep_cache = use_cache if use_cache is not None else getattr(self.config, "use_cache", True)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if keep_cache else None)

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, use_cache=True, **kwargs
    ):
        """Only the tokens the cache has not seen."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.seen :]
        inputs = {
            "input_ids": input_ids,
            "past_key_values": past_key_values,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
        }
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
