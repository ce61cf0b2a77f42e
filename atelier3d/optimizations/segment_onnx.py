"""Export of SAM's prompt encoder + mask decoder to ONNX, cached on disk.

segment-anything 1.0 (PyPI) has two export bugs fixed upstream later:
``mask_postprocessing`` slices with ``int(tensor)``, which the tracer freezes to the export dummy's
size (wrong full-resolution masks for every other aspect ratio), and the prepadded size is computed
in float32 where ``SamPredictor`` uses Python floats. ``FixedSamOnnxModel`` repairs both, selects
the mask tokens the same way ``MaskDecoder.forward(multimask_output=...)`` does, and thresholds in
the graph so only booleans cross the ORT boundary at full resolution.

The file name is keyed by the checkpoint's hash and every export option, so a changed checkpoint
or option never reuses a stale graph; writes are atomic so several replicas can start at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from atelier3d.models.segment.sam import SamCheckpoint

logger = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the graph's inputs/outputs or the fix change
OPSET = 17
INPUT_NAMES = [
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
]
OUTPUT_NAMES = ["masks", "iou_predictions", "low_res_masks"]


def _fixed_model_class():
    import torch
    from segment_anything.utils.onnx import SamOnnxModel
    from torch.nn import functional as F

    class FixedSamOnnxModel(SamOnnxModel):
        def __init__(self, model, multimask: bool) -> None:
            super().__init__(model, return_single_mask=False)
            # Same token choice as MaskDecoder.forward: 1..3 for multimask, 0 for a single mask.
            self.mask_slice = slice(1, None) if multimask else slice(0, 1)

        @staticmethod
        def resize_longest_image_size(input_image_size, longest_side):
            # float64, like ResizeLongestSide.get_preprocess_shape's Python floats.
            size = input_image_size.to(torch.float64)
            scale = longest_side / torch.max(size)
            return torch.floor(scale * size + 0.5).to(torch.int64)

        def mask_postprocessing(self, masks, orig_im_size):
            masks = F.interpolate(
                masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
            )
            prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)
            masks = masks[..., : prepadded[0], : prepadded[1]]
            size = orig_im_size.to(torch.int64)
            return F.interpolate(
                masks, size=(size[0], size[1]), mode="bilinear", align_corners=False
            )

        @torch.no_grad()
        def forward(
            self,
            image_embeddings,
            point_coords,
            point_labels,
            mask_input,
            has_mask_input,
            orig_im_size,
        ):
            sparse = self._embed_points(point_coords, point_labels)
            dense = self._embed_masks(mask_input, has_mask_input)
            low_res, scores = self.model.mask_decoder.predict_masks(
                image_embeddings=image_embeddings,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
            )
            low_res = low_res[:, self.mask_slice]
            scores = scores[:, self.mask_slice]
            masks = self.mask_postprocessing(low_res, orig_im_size) > self.model.mask_threshold
            return masks, scores, low_res

    return FixedSamOnnxModel


def export_options_key(checkpoint: SamCheckpoint, multimask: bool, quantize_int8: bool) -> str:
    options = {
        "sha256": checkpoint.sha256,
        "multimask": multimask,
        "int8": quantize_int8,
        "opset": OPSET,
        "export_version": EXPORT_VERSION,
    }
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def export_decoder(model, path: Path, multimask: bool) -> Path:
    """Exports the fixed decoder graph of a torch ``Sam`` to ``path`` (legacy exporter)."""
    import torch

    onnx_model = _fixed_model_class()(model, multimask=multimask).eval()
    embed_dim = model.prompt_encoder.embed_dim
    embed_size = model.prompt_encoder.image_embedding_size
    mask_input_size = [4 * x for x in embed_size]
    dummy = {
        "image_embeddings": torch.randn(1, embed_dim, *embed_size, dtype=torch.float32),
        "point_coords": torch.randint(0, 1024, (1, 5, 2), dtype=torch.float32),
        "point_labels": torch.randint(0, 4, (1, 5), dtype=torch.float32),
        "mask_input": torch.randn(1, 1, *mask_input_size, dtype=torch.float32),
        "has_mask_input": torch.tensor([1], dtype=torch.float32),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.onnx")
    # The legacy TorchScript exporter handles SamOnnxModel's data-dependent slicing once the fix
    # above is in; dynamo (the torch 2.14 default) would need the point count as a Dim instead.
    torch.onnx.export(
        onnx_model,
        tuple(dummy.values()),
        str(tmp),
        export_params=True,
        verbose=False,
        opset_version=OPSET,
        do_constant_folding=True,
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
        dynamo=False,
    )
    os.replace(tmp, path)
    return path


def quantize_int8(src: Path, dest: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dest.with_suffix(f".tmp{os.getpid()}.onnx")
    quantize_dynamic(str(src), str(tmp), per_channel=False, reduce_range=False,
                     weight_type=QuantType.QUInt8)
    os.replace(tmp, dest)
    return dest


def cached_decoder_onnx(
    checkpoint: SamCheckpoint, cache_dir: Path, multimask: bool, int8: bool = False
) -> Path:
    """Returns the cached ``.onnx`` for these options, exporting it on first use."""
    key = export_options_key(checkpoint, multimask, int8)
    path = cache_dir / "onnx" / f"sam_decoder_{checkpoint.model_type}_{key}.onnx"
    if path.exists():
        return path
    logger.info("exporting SAM decoder to %s (multimask=%s int8=%s)", path, multimask, int8)
    fp32 = cache_dir / "onnx" / f"sam_decoder_{checkpoint.model_type}_{key}.fp32.onnx"
    export_decoder(checkpoint.build(), fp32 if int8 else path, multimask)
    if int8:
        quantize_int8(fp32, path)
        fp32.unlink(missing_ok=True)
    return path
