"""Sharding a model over the processes with torch's FSDP2 (`torch.distributed.fsdp.fully_shard`), `--sharding fsdp`.

Data parallelism (run/processes.py) keeps a whole copy of the model, its gradients and AdamW's two moments on every
process. FSDP2 cuts each of them into world_size pieces: every parameter becomes a DTensor of which each process
holds a 1/world_size slice (dimension 0), and the gradients and the optimizer state follow the parameters. A
decoder layer's full weights exist only while that layer runs: FSDP2 all-gathers them just before its forward (and
again before its backward) and frees them after; the gradients are reduce-scattered, each process keeping the sum
over the processes of its own slice. So each process holds about 1/world_size of the parameter and optimizer memory
(plus one layer's full weights at a time), and the processes still compute exactly the gradient of one process
with the whole batch.

What changes for the stages, all of it here or asked of here:
- Sharding units: every decoder layer, then the whole model (the embeddings, the final norm and the language-model
  head, which may share the embeddings' weight, stay together in the last unit).
- Gradients are summed, not averaged, over the processes (divide factor 1): the losses are already normalised by
  counts over the whole batch of all processes, as without sharding (`Processes.sum_gradients`).
- Every process runs every forward pass in step, since each one all-gathers from all: evaluations run on every
  process (rank 0 still alone writes), and work that data parallelism splits unevenly runs whole everywhere.
- Forward passes go through the model's own forward (FSDP2 unshards on it), so the log-probabilities take the
  model's full logits (`logprobs.head_parts` is None for a sharded model) instead of the chunked head. A method that
  runs the body by itself (the reward model's `score_answers`) is registered with FSDP2 as a forward method.
- Checkpoints hold the gathered (unsharded) trainable weights and optimizer state keyed by parameter name, so a run
  resumes with the same or another number of processes, sharded or not; final/ is written from the gathered
  weights as without sharding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advantage.errors import UsageError


def is_sharded(model: nn.Module) -> bool:
    """True if `model` (or the model a PEFT wrapper holds) was sharded by `shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: the longest nn.ModuleList inside it (`model.layers` of Llama and
    Qwen2, `transformer.h` of GPT-2), found by structure so that PEFT wrappers and other architectures work."""
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not lists:
        raise UsageError("field 'sharding': found no list of layers to shard in this model")
    return list(max(lists, key=len))


def shard(model: nn.Module, world_size: int, forward_methods: tuple[str, ...] = ()) -> nn.Module:
    """`model` sharded in place with FSDP2 over the process group (each decoder layer, then the whole model), its
    gradients summed over the processes. With one process nothing is sharded and `model` comes back as it is.

    `forward_methods`: methods of the model that run its body without its `forward` (the reward model's
    `score_answers`); FSDP2 gathers the whole-model unit's weights around them as around `forward`.
    """
    if world_size == 1:
        return model
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    for layer in decoder_layers(model):
        fully_shard(layer)
    # The root too gives its full weights back after each forward (FSDP2 keeps them by default, awaiting the
    # backward): after a forward without gradients (the DPO reference, an evaluation) the model's parameters must be
    # the sharded ones again, which the optimizer holds and the checkpoints gather.
    fully_shard(model, reshard_after_forward=True)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum over the processes, as `Processes.sum_gradients`
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum
    return model


def gathered_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> full (unsharded) CPU tensor of every trainable parameter, on rank 0 ({} on the others).

    A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def gathered_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, full and on the CPU, on rank 0 ({} on the others); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state, full, on the CPU and keyed by parameter name, on rank 0 ({} on the others); a
    collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put full trainable weights (as `gathered_trainable_state` or an unsharded checkpoint holds them) into a sharded
    or unsharded model; each process keeps its slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    # A tied weight (the head sharing the embeddings) has one parameter name but may be saved under both.
    aliases = {name for name, value in model.state_dict(keep_vars=True).items() if value.requires_grad}
    missing, unexpected = trainable - set(tensors), set(tensors) - aliases
    if missing or unexpected:
        raise UsageError(f"checkpoint does not match the model (missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}); was the model or LoRA setting changed?")
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) \
        -> dict[str, Any]:
    """An optimizer state saved by index (`optimizer.state_dict()` of an unsharded run) keyed by parameter name
    instead, as `gathered_optimizer_state` writes it: the optimizer's parameters are the model's trainable ones, in
    the order of `named_parameters`, sharded or not."""
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    by_index = [index for group in saved["param_groups"] for index in group["params"]]
    if len(by_index) != len(names):
        raise UsageError(f"checkpoint's optimizer has {len(by_index)} parameters, the model {len(names)} trainable")
    name_of = dict(zip(by_index, names))
    return {"state": {name_of[index]: value for index, value in saved["state"].items()},
            "param_groups": [{**group, "params": [name_of[index] for index in group["params"]]}
                             for group in saved["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a full optimizer state keyed by parameter name into the optimizer of a sharded or unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, plain: nn.Module | None = None) \
        -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
    """(weights, optimizer state, keyed by name?) of a model and its optimizer, for a checkpoint.

    Sharded: the gathered trainable weights and the optimizer state keyed by parameter name, on rank 0 ({} on the
    others; a collective). Not sharded: `plain`'s state_dict (default the model's: a stage may pass a module that
    holds only the trainable parameters) and the optimizer's own, keyed by index. `restore_checkpoint_state` reads
    either into a sharded or unsharded model."""
    if is_sharded(model):
        return gathered_trainable_state(model), gathered_optimizer_state(model, optimizer), True
    return (plain or model).state_dict(), optimizer.state_dict(), False


def restore_checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                             optimizer_state: dict[str, Any], by_name: bool, plain: nn.Module | None = None) -> None:
    """Load what `checkpoint_state` gave (whole tensors; the optimizer state keyed by name if `by_name`, else by
    index) into a sharded or unsharded model and its optimizer: a run resumes on any number of processes."""
    if is_sharded(model) or by_name:
        load_trainable_state(model, weights)
        saved = optimizer_state if by_name else optimizer_state_by_name(model, optimizer, optimizer_state)
        load_optimizer_state(model, optimizer, saved)
    else:
        (plain or model).load_state_dict(weights)
        optimizer.load_state_dict(optimizer_state)


def local_mib(tensors) -> float:
    """MiB that this process holds of `tensors` (its own slice of a sharded one)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total / 2**20


def memory_figures(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, float]:
    """What this process holds: its share of the parameters and of the optimizer state (MiB), and on a GPU the peak
    memory allocated so far (`torch.cuda.max_memory_allocated`)."""
    figures = {"memory/parameters_mib": local_mib(model.parameters()),
               "memory/optimizer_state_mib": local_mib(value for state in optimizer.state.values()
                                                       for value in state.values()
                                                       if isinstance(value, torch.Tensor) and value.dim() > 0)}
    if device.type == "cuda":
        figures["memory/peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures
