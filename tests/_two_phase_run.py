"""The two-phase digits run that the multi-host and the kill tests interrupt, and its reference.

A pretrain (8 px, 30 steps) → fine-tune (16 px, 10 steps) on the embedded digits, with dropout,
momentum SGD and mixup, a checkpoint every 5 steps. `Reference` is the uninterrupted run as one
process on 8 fake CPU devices: test_multihost.py compares its 2-process run with it (up to the
order of the gradient sums), test_train_resume.py its SIGTERM/SIGKILL-interrupted 1-process run
(bit for bit). One launch serves both (the session fixture `two_phase_reference` of conftest.py),
and the interrupted 1-process launches find its compiled programs in the compilation cache.
"""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path

from tests._commands import TrainCommand

DEVICES = 8  # the reference's, and the 1-process interrupted run's
CHECKPOINT_EVERY = 5
PRETRAIN_STEPS = 30

CONFIG = """
    import ml_collections

    from configs import common


    def _phase(**fields):
        c = common.get_config()
        c.dataset = "sklearn_digits"
        c.model = common.model_config(
            "testing", patches={"size": (4, 4)}, transformer={"dropout_rate": 0.1}
        )
        c.update(batch_size=16, optimizer="sgd", base_lr=0.1, warmup_steps=3, mixup_alpha=0.2)
        c.update(log_every=5, checkpoint_every=5, eval_every=10)  # CHECKPOINT_EVERY
        c.update(fields)
        return c


    def get_config(phases="pretrain,finetune"):
        config = ml_collections.ConfigDict()
        config.phases = tuple(phases.split(","))
        config.pretrain = _phase(image_size=8, total_steps=30)  # PRETRAIN_STEPS
        config.finetune = _phase(image_size=16, total_steps=10, pretrained="phase:pretrain")
        config.lock()
        return config
"""


def write_config(path: Path) -> Path:
    path.write_text(textwrap.dedent(CONFIG))
    return path


class Reference:
    """The uninterrupted 1-process run, started at once; `finished()` waits for it."""

    def __init__(self, root: Path):
        self.config_file = write_config(root / "two_phase.py")
        self.command = TrainCommand(self.config_file, root / "one", devices=DEVICES)
        self.command.start()

    @functools.cache  # noqa: B019  (one instance per session)
    def finished(self) -> TrainCommand:
        """The command, once it has ended with status 0 (AssertionError with its tail if not)."""
        assert self.command.wait() == 0, self.command.tail()
        return self.command

    def kill(self) -> None:
        self.command.kill()
