"""The runtime knobs every torch-running deployment shares, from the Serve YAML's ``user_config``
(changeable without a restart)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TorchUserConfig(BaseModel):
    """Runtime knobs from the Serve YAML's ``user_config`` (changeable without a restart)."""

    # On a 2-core box a replica gets one core: pools collapse when cores are oversubscribed.
    torch_threads: int = Field(1, ge=1)

    def apply_threads(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)
