"""The training loop of the offline stages (sft, reward, dpo): the data is fixed, so every optimizer step is the same
five moves, whatever the loss.

    for each optimizer step:
        1. the learning rate of the step (a pure function of it, `schedule.learning_rate_at`);
        2. the batch's gradient, accumulated over its micro-batches by the stage (`accumulate`) and summed over the
           processes;
        3. one optimizer step, skipped and counted if the loss is not finite (`session.StepWindow`);
        4. a metrics line when due (averaged over the steps since the last one), with the held-out figures when an
           evaluation is due;
        5. a checkpoint when due.

The online stages (grpo, rlhf) sample their data as they go and have loops of their own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.optim import Optimizer

from advantage.lm.config import LMConfig, mixed_precision
from advantage.lm.data_order import DataOrder
from advantage.lm.preferences import PairwiseTally
from advantage.lm.schedule import set_learning_rate
from advantage.lm.session import LMSession, StepWindow
from advantage.lm.sharding import memory_figures


@dataclass
class BatchGradient:
    """What a stage's `accumulate` reports of one batch (this process's share), its gradient now in `.grad`.

    Attributes:
        loss: this share's part of the batch's loss.
        real_tokens: tokens the model ran on (padding excluded).
        completion_tokens: the loss's normaliser over the whole batch (sft), logged as charts/completion_tokens;
            None for stages that have none.
        tally: the pairwise diagnostics of this share (reward, dpo), logged as rewards/...; None for sft.
    """

    loss: float
    real_tokens: int
    completion_tokens: int | None = None
    tally: PairwiseTally | None = None


def train_offline(session: LMSession, model: nn.Module, optimizer: Optimizer, order: DataOrder, steps: int,
                  config: LMConfig, loss_name: str, accumulate: Callable[[Sequence[int]], BatchGradient],
                  held_out: Callable[[], dict[str, float]] | None,
                  checkpoint_extra: Callable[[int], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Train from `session.start_step` to `steps` (the loop of the module docstring).

    Args:
        accumulate: the gradient of the batch of the given example indices (this process's share), added to
            `.grad` under the config's precision.
        held_out: the held-out figures (evaluated on rank 0 at step 0, every eval_every steps and at the end), or
            None when there is nothing to evaluate (or on the other processes).
        checkpoint_extra: the stage's own checkpoint entries after a step (the data order, DPO's reference).
    Returns:
        (the last step, the last metrics line).
    """
    processes = session.processes
    max_norm = config.max_grad_norm or math.inf
    step = session.start_step
    last: dict[str, Any] = {}
    window, tally, pairwise = StepWindow(), PairwiseTally(), False
    if step == 0 and held_out is not None:  # the starting point, for comparison
        last = session.metrics.log(0, session.elapsed(), held_out())
    while step < steps:
        began = time.perf_counter()
        # 1. The learning rate of the step.
        learning_rate = set_learning_rate(optimizer, config, step, steps)

        # 2. The batch's gradient: the micro-batches' shares added up in .grad, then summed over the processes.
        with mixed_precision(config):
            batch = accumulate(order.batch(step))
        loss, real_tokens = processes.sum(batch.loss, batch.real_tokens)
        batch_tally = batch.tally.summed(processes) if batch.tally is not None else None
        processes.sum_gradients(model)  # the gradient of the whole batch, on every process

        # 3. One optimizer step (skipped, and counted, if the loss is not finite).
        if window.optimizer_step(session, optimizer, loss, max_norm) and batch_tally is not None:
            tally.update(batch_tally)
        pairwise = batch_tally is not None
        step += 1
        window.end_step(real_tokens, time.perf_counter() - began, batch.completion_tokens or 0)

        # 4. Log (averaged over the steps since the last line), with the held-out figures when they are due.
        evaluation_due = held_out is not None and session.evaluation_due(step)
        if step % config.log_every == 0 or step == steps or evaluation_due:
            logged = {**window.figures(loss_name), **(tally.means("rewards/") if pairwise else {}),
                      "charts/learning_rate": learning_rate}
            if batch.completion_tokens is not None:
                logged["charts/completion_tokens"] = window.completion_tokens / window.steps
            logged.update({"charts/epoch": order.epochs_done(step), "charts/skipped_updates": session.skipped_updates,
                           **memory_figures(model, optimizer, processes.device)})
            if evaluation_due:
                logged.update(held_out())
            last = session.metrics.log(step, session.elapsed(), logged)
            shown = {"acc": logged["rewards/accuracy"]} if pairwise else {"tok/s": logged["charts/tokens_per_s"]}
            session.show(step, {"loss": logged[loss_name], **shown})
            window, tally = StepWindow(), PairwiseTally()

        # 5. Checkpoint.
        if session.checkpoint_due(step):
            session.save(step, checkpoint_extra(step))
    return step, last
