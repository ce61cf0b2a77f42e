"""Clients of the atelier3d HTTP API (``/v1``)."""

from atelier3d.clients.client import ApiError, AsyncClient, Client, ProgressBar, mask_to_array

__all__ = ["ApiError", "AsyncClient", "Client", "ProgressBar", "mask_to_array"]
