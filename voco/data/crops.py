"""Cutting base and target crops out of preprocessed volumes, labelling and augmenting them.

All randomness of one training sample comes from a generator seeded by ``(seed, step, index)``,
where ``index`` is the sample's place in the global batch. So the same step draws the same crops
whether the batch runs in one process or is split over DDP ranks, and a resumed run draws
exactly what an uninterrupted one would, with no generator state to save.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import base_grid, overlap_labels, sample_targets
from ..presets import Preset


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class CropBatch:
    crops: torch.Tensor          # (B, K + T, 1, e, e, e): bases first, then targets
    labels: torch.Tensor         # (B, T, K) overlap of each target with each base
    patch_starts: np.ndarray     # (B, 3) where each patch starts in its volume's index grid
    target_boxes: np.ndarray     # (B, T, 6) target boxes in patch voxels
    generators: list             # per-sample generators, for draws that come later (dropout)


def extract_crops(patches: torch.Tensor, starts: torch.Tensor, edge: int) -> torch.Tensor:
    """Gather cubes of ``edge`` voxels: ``patches (B, C, X, Y, Z)``, ``starts (B, N, 3)`` ->
    ``(B, N, C, edge, edge, edge)``, in one indexing operation."""
    steps = torch.arange(edge, device=patches.device)
    x, y, z = (starts[..., a, None] + steps for a in range(3))          # (B, N, e) each
    b = torch.arange(patches.shape[0], device=patches.device)[:, None, None, None, None]
    out = patches.movedim(1, -1)[b, x[..., :, None, None], y[..., None, :, None], z[..., None, None, :]]
    return out.movedim(-1, 2)                                            # (B, N, C, e, e, e)


def base_tiles(patches: torch.Tensor, grid, edge: int) -> torch.Tensor:
    """The base grid of each patch as a view, no copy and no index arithmetic:
    ``(B, C, nx*e, ny*e, nz*e) -> (B, nx, ny, nz, C, e, e, e)``; flattening ``nx, ny, nz`` gives
    ``base_grid`` order."""
    nx, ny, nz = grid
    tiles = patches.unflatten(2, (nx, edge)).unflatten(4, (ny, edge)).unflatten(6, (nz, edge))
    return tiles.permute(0, 2, 4, 6, 1, 3, 5, 7)


# Per-crop augmentation as each official pipeline configures it. "voco" (MONAI, v1/v2): flips on
# each axis and rot90 in the x-y plane with p = 0.2, an intensity shift of up to 0.1 with the
# preset's probability (v1 0.1, v2 0.5). "nnssl" (batchgenerators defaults in its VocoTransform):
# flips with p = 0.5, rot90 with p = 0.3, noise, blur, brightness, contrast, low resolution and gamma
# (plain and inverted), in that order.
SPATIAL_PROBS = {"voco": (0.2, 0.2), "nnssl": (0.5, 0.3)}   # (flip per axis, rot90)


def draw_augmentation(generator: torch.Generator, count: int, edge: int, style: str,
                      shift_prob: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-crop augmentation parameters for ``count`` crops of ``edge`` voxels: ``flip`` (count, 3)
    booleans, ``rot90`` quarter turns 0..3 (MONAI's RandRotate90(max_k=3) and batchgenerators'
    Rot90Transform turn 1, 2 or 3 times when they turn), ``shift``; for ``nnssl`` also noise, blur
    sigma (0 where a crop is not chosen), brightness, contrast, zoom and gamma factors (1 where
    not chosen)."""
    def chance(p):
        return torch.rand(count, generator=generator) < p

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(count, generator=generator)

    def below_or_above_one(lo, hi):  # batchgenerators: half the draws below 1, half above
        return torch.where(chance(0.5), uniform(lo, 1.0), uniform(1.0, hi))

    def factor(p, draw):
        return torch.where(chance(p), draw, torch.ones(count))

    flip_p, rot_p = SPATIAL_PROBS[style]
    turns = 1 + torch.randint(3, (count,), generator=generator)
    params = {"flip": torch.rand(count, 3, generator=generator) < flip_p, "rot90": turns * chance(rot_p),
              "shift": uniform(-0.1, 0.1) * chance(shift_prob)}
    if style == "nnssl":
        noisy = chance(0.1)
        params.update(noisy=noisy,
                      noise=uniform(0, 0.1)[noisy].view(-1, 1, 1, 1, 1)
                      * torch.randn((int(noisy.sum()), 1, edge, edge, edge), generator=generator),
                      # GaussianBlurTransform and SimulateLowResolutionTransform: per sample, then
                      # per channel with p = 0.5 (one channel here)
                      blur=torch.where(chance(0.2 * 0.5), uniform(0.5, 1.0), torch.zeros(count)),  # sigma
                      brightness=factor(0.15, uniform(0.75, 1.25)),
                      contrast=factor(0.15, below_or_above_one(0.75, 1.25)),
                      low_resolution=factor(0.1 * 0.5, uniform(0.5, 1.0)),
                      inverted_gamma=factor(0.1, below_or_above_one(0.7, 1.5)),
                      gamma=factor(0.3, below_or_above_one(0.7, 1.5)))
    return params


def _gamma(crops: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """batchgenerators' gamma with ``retain_stats``: each crop rescaled to [0, 1], raised to its
    gamma, scaled back, then given its former mean and standard deviation (of ``-crops`` if
    ``invert``)."""
    dims = tuple(range(2, crops.dim()))
    x = -crops if invert else crops
    mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True, unbiased=False)
    lo = x.amin(dim=dims, keepdim=True)
    span = x.amax(dim=dims, keepdim=True) - lo + 1e-7
    x = ((x - lo) / span).pow(gamma.view(-1, *[1] * (crops.dim() - 1))) * span + lo
    x = (x - x.mean(dim=dims, keepdim=True)) / (x.std(dim=dims, keepdim=True, unbiased=False) + 1e-8) * std + mean
    return -x if invert else x


BLUR_RADIUS = 4  # scipy's gaussian_filter keeps 4 sigma, int(4 * sigma + 0.5) voxels: 4 for sigma <= 1


def _blur(crops: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """scipy's gaussian_filter (batchgenerators' blur) with each crop's sigma: separable kernels
    cut at ``int(4 sigma + 0.5)`` voxels, edges mirrored with the edge voxel repeated (scipy's
    "reflect"); one grouped convolution per axis for all crops."""
    offsets = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=crops.dtype, device=crops.device)
    sigma = sigma.to(crops.device, crops.dtype)[:, None]
    radius = (4 * sigma + 0.5).floor()
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2) * (offsets.abs() <= radius)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)                      # (n, 9)
    n, c = crops.shape[:2]
    x = crops.reshape(n * c, *crops.shape[2:])                              # (m, X, Y, Z)
    weights = kernel.repeat_interleave(c, dim=0)[:, None]                   # (m, 1, 9)
    for axis in (1, 2, 3):
        x = x.movedim(axis, -1)
        x = torch.cat([x[..., :BLUR_RADIUS].flip(-1), x, x[..., -BLUR_RADIUS:].flip(-1)], dim=-1)
        m, a, b, length = x.shape
        rows = x.reshape(m, a * b, length).transpose(0, 1)                  # (a * b, m, length)
        x = F.conv1d(rows, weights, groups=m).transpose(0, 1).reshape(m, a, b, -1).movedim(-1, axis)
    return x.reshape(crops.shape)


def _low_resolution(crops: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """batchgenerators' SimulateLowResolutionTransform: each crop shrunk to ``round(zoom * edge)``
    by nearest neighbour and enlarged back (cubic there; trilinear here, torch has no 3-D cubic)."""
    out = torch.empty_like(crops)
    for i, factor in enumerate(zoom.tolist()):
        small = [max(1, round(n * factor)) for n in crops.shape[2:]]
        low = F.interpolate(crops[i:i + 1], size=small, mode="nearest-exact")
        out[i] = F.interpolate(low, size=crops.shape[2:], mode="trilinear", align_corners=False)[0]
    return out


def _contrast(crops: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """batchgenerators' contrast with ``preserve_range``: scaled about the mean, clipped to the
    crop's former range."""
    dims = tuple(range(2, crops.dim()))
    mean = crops.mean(dim=dims, keepdim=True)
    out = (crops - mean) * factor.view(-1, *[1] * (crops.dim() - 1)) + mean
    return out.clamp(crops.amin(dim=dims, keepdim=True), crops.amax(dim=dims, keepdim=True))


def augment(crops: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply drawn parameters to ``crops (N, C, e, e, e)``, all crops at once (masks, not loops)."""
    def per_crop(v):
        return v.to(crops.device, crops.dtype).view(-1, 1, 1, 1, 1)

    crops = crops.clone()  # one copy; everything below works in place on it

    def transform_chosen(mask, transform):  # only the chosen crops are touched
        chosen = mask.nonzero()[:, 0].to(crops.device)
        if len(chosen):
            crops.index_copy_(0, chosen, transform(crops.index_select(0, chosen), chosen.cpu()))

    for axis in range(3):
        transform_chosen(params["flip"][:, axis], lambda x, _: x.flip(2 + axis))
    for turns in (1, 2, 3):
        transform_chosen(params["rot90"] == turns, lambda x, _: x.rot90(turns, (2, 3)))
    crops.add_(per_crop(params["shift"]))
    if "gamma" in params:
        crops = crops.index_add(0, params["noisy"].nonzero()[:, 0].to(crops.device), params["noise"].to(crops.device, crops.dtype))
        transform_chosen(params["blur"] > 0, lambda x, chosen: _blur(x, params["blur"][chosen]))
        crops.mul_(per_crop(params["brightness"]))
        for name, transform in (("contrast", _contrast), ("low_resolution", _low_resolution),
                                ("inverted_gamma", lambda x, g: _gamma(x, g, True)),
                                ("gamma", lambda x, g: _gamma(x, g, False))):
            values = params[name]
            transform_chosen(values != 1, lambda x, chosen: transform(x, values[chosen].to(x.device, x.dtype)))
    return crops


@dataclass
class SampleDraw:
    """The random draws of one training sample, in the order its generator makes them."""

    start: np.ndarray            # (3,) where the patch starts in the volume's index grid
    targets: np.ndarray          # (T, 6) target boxes in patch voxels
    params: dict                 # per-crop augmentation parameters (``draw_augmentation``)
    generator: torch.Generator   # for the draws that come later (dropout)


def draw_sample(volume_shape, preset: Preset, seed: int, step: int, index: int) -> SampleDraw:
    """Everything random about sample ``index`` of ``step`` in a volume of ``volume_shape``
    (X, Y, Z): needs the volume's shape only, so a reader can fetch just the patch afterwards."""
    g = sample_generator(seed, step, index)
    room = np.array(volume_shape) - np.array(preset.patch_shape) + 1
    start = (torch.rand(3, generator=g, dtype=torch.float64).numpy() * room).astype(np.int64)
    targets = sample_targets(g, preset.num_targets, np.array(preset.patch_shape), preset.crop_edge)
    params = draw_augmentation(g, preset.num_bases + preset.num_targets, preset.input_edge, preset.augment,
                               preset.shift_prob)
    return SampleDraw(start, targets, params, g)


def cut_patch(image: torch.Tensor, start, patch_shape) -> torch.Tensor:
    return image[:, start[0]:start[0] + patch_shape[0], start[1]:start[1] + patch_shape[1],
                 start[2]:start[2] + patch_shape[2]]


def sample_batch(volumes, preset: Preset, seed: int, step: int, indices, device="cpu") -> CropBatch:
    """Crops for one step. ``volumes[i]`` is the preprocessed image (1, X, Y, Z) of sample
    ``indices[i]``; each is at least ``preset.patch_shape`` (preprocessing pads). Cutting,
    resizing and augmenting run on ``device``."""
    draws = [draw_sample(image.shape[1:], preset, seed, step, index) for image, index in zip(volumes, indices)]
    patches = [cut_patch(image, draw.start, preset.patch_shape) for image, draw in zip(volumes, draws)]
    return crops_from_patches(patches, draws, preset, device)


def crops_from_patches(patches, draws: list[SampleDraw], preset: Preset, device="cpu") -> CropBatch:
    """The device half of ``sample_batch``: base and target crops cut out of each sample's patch
    ``(C, X, Y, Z)`` (a list, or a batch tensor), resized and augmented on ``device``."""
    bases = base_grid(preset.grid, preset.crop_edge)
    targets = np.stack([draw.targets for draw in draws])
    params = [draw.params for draw in draws]
    k, edge = preset.num_bases, preset.crop_edge
    b, n = len(patches), k + preset.num_targets
    crops = torch.empty((b, n, patches[0].shape[0], edge, edge, edge), dtype=patches[0].dtype, device=device)
    target_starts = torch.from_numpy(targets[..., :3]).to(device)
    for i, patch in enumerate(patches):  # per volume, so that each crop is copied once, into place
        patch = patch.to(device, non_blocking=True)[None]
        crops[i, :k].view(*preset.grid, *crops.shape[2:]).copy_(base_tiles(patch, preset.grid, edge)[0])
        crops[i, k:] = extract_crops(patch, target_starts[i:i + 1], edge)[0]
    crops = crops.flatten(0, 1)
    if preset.input_edge != preset.crop_edge:
        crops = F.interpolate(crops, size=(preset.input_edge,) * 3, mode="trilinear", align_corners=False)
    crops = augment(crops, {k: torch.cat([p[k] for p in params]) for k in params[0]}).view(b, n, *crops.shape[1:])
    labels = torch.from_numpy(overlap_labels(targets, bases, preset.label_dims)).float().to(device)
    return CropBatch(crops, labels, np.stack([draw.start for draw in draws]), targets,
                     [draw.generator for draw in draws])
