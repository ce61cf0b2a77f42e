"""A job's input image, from what its session holds: the upload, a cut-out, a part, an edit."""

from __future__ import annotations

import numpy as np

from atelier3d import rle
from atelier3d.api.common import RLE, ImageSource, MaskSource
from atelier3d.errors import BadRequest, Conflict, NotFound
from atelier3d.imaging import crop_with_margin, decode_png
from atelier3d.serve.jobs.service import JobService
from atelier3d.serve.segment.service import SegmentService
from atelier3d.serve.sessions.session import Session
from atelier3d.stages.parse import hidden_region

OBJECT_MARGIN = 0.1  # of the mask box's longer side: context around a cut-out


class SourceResolver:
    def __init__(self, segmentation: SegmentService, jobs: JobService) -> None:
        self.segmentation = segmentation
        self.jobs = jobs

    def image(self, session: Session, source: ImageSource) -> np.ndarray:
        """The source's pixels: (H, W, 3) RGB, or (H, W, 4) RGBA for cut-outs."""
        if source.kind == "original":
            return session.image
        if source.kind == "session":  # the store hides other clients' sessions (404)
            return self.segmentation.store.get(source.session_id).image
        if source.kind == "object":
            mask = self.segmentation.source_mask(
                session, MaskSource(object_id=source.object_id), "segment the object first")
            x0, y0, x1, y1 = crop_with_margin(mask, OBJECT_MARGIN)
            alpha = mask[y0:y1, x0:x1].astype(np.uint8) * 255
            return np.dstack([session.image[y0:y1, x0:x1], alpha])
        if source.kind == "part":
            part, completed = self.part(session, source)
            if source.completed:
                if completed is None:
                    raise NotFound(f"part {source.part!r} has no completed version")
                return completed
            return part.rgba
        job = self.jobs.get_in_session(session, source.job_id)
        if job.kind.name != "edit":
            raise BadRequest(f"job {source.job_id!r} is a {job.kind.name} job, not an edit")
        if job.status != "succeeded" or job.result is None:
            raise Conflict(f"edit {source.job_id!r} is {job.status}: it has no image yet")
        return decode_png(job.result.data)

    def hidden_region(self, session: Session, source: ImageSource) -> np.ndarray | None:
        """For a part that something hides: what its completed version adds (the region to
        repaint), in the part's crop; None for every other source."""
        if source.kind != "part":
            return None
        part, completed = self.part(session, source)
        return hidden_region(part.rgba, completed)

    def part(self, session: Session, source: ImageSource):
        stored = session.parses.get(source.parse_id)
        if stored is None:
            raise NotFound(f"parse {source.parse_id!r} not found in this session")
        parts = {p.name: p for p in stored.result.parts}
        if source.part not in parts:
            raise NotFound(f"no part {source.part!r} in parse {source.parse_id!r} "
                           f"(it has: {', '.join(parts) or 'none'})")
        return parts[source.part], stored.result.completed.get(source.part)


def job_sources(sources: list[ImageSource | None]) -> list[str]:
    """The job ids among ``sources`` (earlier edits used as inputs)."""
    return [s.job_id for s in sources if s is not None and s.kind == "job"]


def session_sources(sources: list[ImageSource | None]) -> list[str]:
    """The ids of other sessions among ``sources`` (their uploads used as references)."""
    return [s.session_id for s in sources if s is not None and s.kind == "session"]


def decode_mask(mask: RLE, shape: tuple[int, int]) -> np.ndarray:
    """A request's RLE mask, which must be sized like the image it applies to."""
    if tuple(mask.size) != tuple(shape):
        raise BadRequest(f"the mask is {list(mask.size)} (h, w), the source image is "
                         f"{list(shape)}")
    return rle.decode(mask.model_dump(), shape)
