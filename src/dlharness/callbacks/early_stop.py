"""Early stopping that a resume can extend."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from typing_extensions import override


class EarlyStop(EarlyStopping):
    """Lightning's `EarlyStopping` whose patience is the config's also after a resume (Lightning
    restores the checkpoint's), so that a stopped run resumed with more patience goes on."""

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience
        # A fit resumed after an early stop has not stopped (yet).
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        self.stopping_reason_message = None
