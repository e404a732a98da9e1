"""Data-free importance of each linear layer's input channels (no text, no dataset).

A layer y = W x pays for a weight error dW with the output error E||dW x||^2 =
sum_o dW_o^T E[x x^T] dW_o; keeping the diagonal, column i of W weighs E[x_i^2]. Massive
activations make this very uneven (on SmolLM2-135M 68 % of layer 28's down_proj input energy
sits in one channel), and plain k-means on the weights cannot see it. Estimates:

- "random-tokens": E[x_i^2] at every linear layer's input over a forward pass of random
  token ids (`RANDOM_BATCH` sequences of `RANDOM_SEQLEN` ids drawn uniformly from the
  vocabulary by a `torch.Generator` seeded with `RANDOM_SEED`). No text is read: the
  statistics come from the model's own weights, driven by noise. Massive activations show
  up on such inputs too (the channel carrying layer 28's is the same as on WikiText-2).
- "norm": the square of the RMSNorm/LayerNorm weight in front of a layer (q/k/v and
  gate/up in Llama-style blocks), 1 elsewhere; weights only, no forward pass.

`weights_from_stats` turns statistics into column weights for `quantize.quantize_pq`:
normalised to mean 1, raised to `power` (1 = the diagonal output error), floored.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ESTIMATES = ("random-tokens", "norm")
RANDOM_SEED = 0
RANDOM_BATCH = 16
RANDOM_SEQLEN = 64
FLOOR = 1e-3  # smallest column weight, relative to the mean
POWER = 1.0  # column weight = (E[x_i^2] / mean)^POWER


@torch.no_grad()
def random_token_stats(model: nn.Module, names: list[str], batch: int = RANDOM_BATCH,
                       seqlen: int = RANDOM_SEQLEN, seed: int = RANDOM_SEED) -> dict[str, Tensor]:
    """Mean squared input per channel [in] of each named linear module over a forward pass
    of uniformly random token ids (deterministic: a generator seeded with `seed`)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))
    device = model.get_input_embeddings().weight.device
    sums: dict[str, Tensor] = {}
    hooks = []
    for name in names:
        def hook(mod, inp, name=name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).cpu()
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        model(ids.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / ids.numel()).float() for n in names}


NORM_FEEDS = {"input_layernorm": ("q_proj", "k_proj", "v_proj"),
              "post_attention_layernorm": ("gate_proj", "up_proj")}


def norm_stats_from(get, shapes: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
    """Squared weight of the norm feeding each linear (Llama-style names: input_layernorm ->
    self_attn.{q,k,v}_proj, post_attention_layernorm -> mlp.{gate,up}_proj), ones for layers
    with no norm in front. `get(tensor_name)` returns a tensor or None; `shapes`: name ->
    (out, in) of each linear."""
    out = {}
    for name, (_, in_f) in shapes.items():
        parts = name.split(".")
        out[name] = torch.ones(in_f)
        if len(parts) < 3:
            continue
        block, leaf = ".".join(parts[:-2]), parts[-1]
        for norm, leaves in NORM_FEEDS.items():
            if leaf in leaves:
                w = get(f"{block}.{norm}.weight")
                if w is not None and tuple(w.shape) == (in_f,):
                    out[name] = w.detach().float().cpu() ** 2
    return out


def norm_stats(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """`norm_stats_from` on a built model."""
    params = dict(model.named_parameters())
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    return norm_stats_from(params.get, shapes)


def weights_from_stats(stats: Tensor, power: float = 1.0, floor: float = FLOOR) -> Tensor:
    """Column weights from E[x_i^2]: mean 1, to the power `power`, at least `floor`."""
    s = stats.double().clamp_min(0)
    s = s / s.mean().clamp_min(1e-300)
    s = s.pow(power)
    s = s / s.mean()
    return s.clamp_min(floor).float()


def _check(method: str) -> None:
    if method not in ESTIMATES:
        raise ValueError(f"unknown importance estimate {method!r}; choose one of {ESTIMATES}")


def estimate(model: nn.Module, method: str, names: list[str] | None = None, power: float = POWER,
             floor: float = FLOOR) -> dict[str, Tensor]:
    """Column weights [in] for every named linear module (default: all nn.Linear)."""
    _check(method)
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    stats = random_token_stats(model, names) if method == "random-tokens" else norm_stats(model, names)
    return {n: weights_from_stats(stats[n], power, floor) for n in names}


def estimate_streaming(load_whole, method: str, reader, shapes: dict[str, tuple[int, int]],
                       dtype: torch.dtype = torch.float32, power: float = POWER,
                       floor: float = FLOOR, config=None) -> dict[str, Tensor]:
    """`estimate` for the streaming pipeline, equal to it on the same model: "norm" reads
    the norm tensors through `reader`; "random-tokens" runs the forward pass block by block
    (`random_token_stats_layerwise`; if the model's layout defeats that, `load_whole()`
    gives the whole model for the pass)."""
    _check(method)
    if method == "norm":
        names = {n for _, g in reader.groups for n in g}
        stats = norm_stats_from(lambda n: reader.read(n).to(dtype) if n in names else None, shapes)
    else:
        try:
            stats = random_token_stats_layerwise(config if config is not None else reader.load_config(),
                                                 reader, list(shapes), dtype)
        except (ValueError, KeyError, AttributeError, TypeError, RuntimeError):
            model = load_whole()  # a layout the block-by-block pass does not handle
            stats = random_token_stats(model, list(shapes))
            del model
    return {n: weights_from_stats(stats[n], power, floor) for n in shapes}


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of repeated blocks (the ModuleList holding most parameters)."""
    best = max(((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)),
               key=lambda nm: sum(p.numel() for p in nm[1].parameters()), default=None)
    if best is None:
        raise ValueError("the model has no list of blocks")
    return best


def _load_params(module: nn.Module, prefix: str, read) -> None:
    for pname, _ in list(module.named_parameters(recurse=True)):
        owner_name, _, leaf = pname.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(read(f"{prefix}{pname}"), requires_grad=False)


def _drop(block: nn.Module) -> None:
    block.to("meta")  # returns None: a forward hook's return value would replace the output


@torch.no_grad()
def random_token_stats_layerwise(config, reader, names: list[str],
                                 dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """`random_token_stats` without holding the model: it is built on the meta device, the
    parts outside its blocks (embeddings, final norm, head) are read in, and each block's
    weights are read from `reader` just before it runs and dropped after, so memory is
    about one block (the streaming pipeline's bound). Same computation, same statistics.
    `config`: the model's `PretrainedConfig` (the streaming plan's, parsed once)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        raise ValueError("transformers does not know this architecture")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    have = {n for _, g in reader.groups for n in g}

    def read(name: str) -> Tensor:
        if name not in have:
            raise KeyError(f"tensor {name!r} is not in the source")
        return reader.read(name).to(dtype)

    bname, blocks = _blocks(model)
    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    loaded: dict[str, nn.Parameter] = {}
    for mname, mod in model.named_modules():  # everything outside the blocks, now
        if mname == bname or mname.startswith(bname + "."):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            full = f"{mname}.{pname}" if mname else pname
            if full not in have and getattr(config, "tie_word_embeddings", False) and mod is model.get_output_embeddings():
                full = f"{emb_name}.weight"  # a tied head is the embedding matrix
            if full not in loaded:
                loaded[full] = nn.Parameter(read(full), requires_grad=False)
            mod._parameters[pname] = loaded[full]
        meta_buffers = [b for b, t in mod.named_buffers(recurse=False) if t.is_meta]
        if meta_buffers:  # computed at construction (rotary frequencies): construct it again
            fresh = type(mod)(config=config)
            for b in meta_buffers:
                mod._buffers[b] = getattr(fresh, b).to(mod._buffers[b].dtype)
    for i, block in enumerate(blocks):
        if any(t.is_meta for t in block.buffers()):
            raise ValueError("a block has buffers computed at construction")
        prefix = f"{bname}.{i}."
        block.register_forward_pre_hook(lambda m, a, prefix=prefix: _load_params(m, prefix, read))
        block.register_forward_hook(lambda m, a, o: _drop(m))
    return random_token_stats(model, names)

