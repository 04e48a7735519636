"""Whether two images are the same picture: one a resized, re-encoded, re-toned or slightly cropped copy.

A perceptual hash sees a 5 % crop as another picture, and two frames of a stereo pair as the same one.
So hashes only put pairs forward, together with a blurred layout descriptor that a small crop barely
moves, and every such pair is confirmed on the two images' grey thumbnails: the window of one image
(up to ``MAX_CROP`` cut from each axis) that best matches the other is found, coarse then fine, and
the pair is a copy only if the two then agree block by block, not just on average, and no block would
agree better if it alone were shifted. A mirror or another framing fails to line up at all; parallax
(a stereo pair, a second shot of a subject that moved) lines up in some places only, and the blocks
elsewhere match better a pixel or two away.

The limits come from real photographs (scikit-image's samples and their copies, as ``bench dedupe``
makes them). Over crop seeds 0–3, copies correlate ≥ 0.95 once aligned, their worst block differs
by ≤ 0.18 and shifting a block gains ≤ 0.003, while the stereo pair and its edited copies have a
worst block of 0.30–0.51 and a shift gain ≥ 0.28. Over seeds 0–15, a 5 % crop's layout correlates
≥ 0.91 with a window of its original's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

THUMB = 64  # side of the grey thumbnail (aspect dropped) each image is compared on
MAX_CROP = 0.10  # the most cut from one axis that still counts as the same picture
# Layout descriptor: an 8×8 grid of mean grey levels over the blurred thumbnail's central part, and
# over five windows of that part 5 % smaller (at its corners and centre), one of which a 5 % crop's
# whole view matches within 2.5 %. Pairs where one image's view correlates at least LAYOUT_MIN with
# any window of the other are checked.
GRID, GRID_MARGIN, LAYOUT_BLUR, LAYOUT_MIN, LAYOUT_CROP = 8, 1 / 16, 2.0, 0.85, 0.05
# Alignment: 1 px of blur makes the thumbnails of a JPEG and of a PNG of one picture agree; the coarse
# search runs on a 16×16 view of the half-size thumbnail in steps of 2 % of the side, the fine one on
# 32×32 views in steps of 0.5 %. A pair is a copy when, aligned, it correlates at least NCC_MIN, no
# block of a 4×4 grid differs by more than BLOCK_MAX (mean squared difference of the standardised
# views), and none differs less by more than PARALLAX_MAX when shifted up to SHIFT pixels on its own.
ALIGN_BLUR, COARSE_SIDE, FINE_SIDE, COARSE_STEP, FINE_STEP, FINE_ROUNDS = 1.0, 16, 32, 0.02, 0.005, 4
COARSE_MIN, NCC_MIN, BLOCK_MAX, PARALLAX_MAX, BLOCKS, SHIFT = 0.75, 0.90, 0.30, 0.10, 4, 2
FINE_HOPELESS = 0.05  # a fine search this far below NCC_MIN stops: its steps gain copies far less


def thumbnail(img: Image.Image) -> np.ndarray:
    """The (THUMB, THUMB) uint8 grey thumbnail every comparison here starts from."""
    return np.asarray(img.convert("L").resize((THUMB, THUMB), Image.BOX), dtype=np.uint8)


def _blur(sigma: float, size: int = THUMB) -> np.ndarray:
    """(size, size) matrix B such that B·X·Bᵀ is X blurred by a Gaussian of ``sigma`` pixels, its
    edges mirrored (…c b a | a b c…), so an edge is neither darkened nor brightened."""
    radius = int(4 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    source = np.arange(size)[:, None] + offsets[None, :]
    source = np.where(source < 0, -source - 1, source)
    source = np.where(source >= size, 2 * size - 1 - source, source)
    matrix = np.zeros((size, size), np.float32)
    np.add.at(matrix, (np.repeat(np.arange(size), len(offsets)), source.ravel()), np.tile(kernel, size))
    return matrix


_LAYOUT_BLUR = _blur(LAYOUT_BLUR)
_ALIGN_BLUR = _blur(ALIGN_BLUR)


def _layout_windows() -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, columns) averaging matrices (GRID, THUMB) of the whole central part, then of each window."""
    inner, small = 1 - 2 * GRID_MARGIN, (1 - 2 * GRID_MARGIN) * (1 - LAYOUT_CROP)
    per_cell = 8
    def cells(start, length):
        return _sampling([start], [length], GRID * per_cell, THUMB)[0].reshape(GRID, per_cell, THUMB).mean(axis=1)
    corners = (0.0, inner - small)
    offsets = [(y, x) for y in corners for x in corners] + [((inner - small) / 2,) * 2]
    windows = [(cells(GRID_MARGIN, inner),) * 2]
    return windows + [(cells(GRID_MARGIN + y, small), cells(GRID_MARGIN + x, small)) for y, x in offsets]


def layout_descriptors(thumbs: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(n, windows, GRID²) unit vectors with zero mean: the coarse layout of each thumbnail's central
    part (window 0) and of the windows a small crop would show."""
    windows = _layout_windows()
    out = np.empty((len(thumbs), len(windows), GRID * GRID), np.float32)
    for start in range(0, len(thumbs), chunk):
        blurred = _LAYOUT_BLUR @ thumbs[start : start + chunk].astype(np.float32) @ _LAYOUT_BLUR.T
        for k, (rows, columns) in enumerate(windows):
            grid = (rows @ blurred @ columns.T).reshape(len(blurred), -1)
            grid -= grid.mean(axis=1, keepdims=True)
            grid /= np.linalg.norm(grid, axis=1, keepdims=True) + 1e-6
            out[start : start + chunk, k] = grid
    return out


def layout_pairs(descriptors: np.ndarray, minimum: float = LAYOUT_MIN, block: int = 256) -> np.ndarray:
    """All ``(i, j)``, ``i < j``, where the whole view of one correlates at least ``minimum`` with a
    window of the other, as an (m, 2) array."""
    n, k, _ = descriptors.shape
    whole = descriptors[:, 0]
    found = []
    for start in range(0, n, block):
        rows = descriptors[start : start + block]
        corr = (rows.reshape(-1, rows.shape[-1]) @ whole.T).reshape(len(rows), k, n).max(axis=1)
        r, c = np.nonzero(corr >= minimum)
        r += start
        other = r != c
        found.append(np.stack([np.minimum(r, c)[other], np.maximum(r, c)[other]], axis=1))
    return np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)


def _sampling(starts, lengths, side: int, pixels: int) -> np.ndarray:
    """(k, side, pixels) bilinear weights: row k samples [start, start + length) of a unit axis."""
    starts = np.asarray(starts, np.float64)[:, None]
    lengths = np.asarray(lengths, np.float64)[:, None]
    pos = np.clip((starts + lengths * (np.arange(side) + 0.5) / side) * pixels - 0.5, 0, pixels - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, pixels - 1)
    frac = (pos - low).astype(np.float32)
    weights = np.zeros((len(starts), side, pixels), np.float32)
    k, row = np.indices(low.shape)
    weights[k, row, low] = 1 - frac
    weights[k, row, high] += frac  # where clamping made high == low, frac is 0
    return weights


def _coarse_windows() -> np.ndarray:
    lengths = np.round(np.arange(1 - MAX_CROP, 1 + 1e-9, COARSE_STEP), 6)
    return np.array([(start, length) for length in lengths for start in np.arange(0, 1 - length + 1e-9, COARSE_STEP)])


_WINDOWS = _coarse_windows()  # (k, 2): (start, length) of every coarse window along one axis
_COARSE = _sampling(_WINDOWS[:, 0], _WINDOWS[:, 1], COARSE_SIDE, THUMB // 2)  # (k, side, pixels)
_COARSE_ROWS = _COARSE.reshape(-1, THUMB // 2)
_COARSE_COLUMNS = _COARSE.transpose(1, 0, 2).reshape(COARSE_SIDE, -1)
_COARSE_SUMS = _COARSE.sum(axis=1)  # (k, pixels): what each window's view adds up from each pixel
_COARSE_GRAMS = np.matmul(_COARSE.transpose(0, 2, 1), _COARSE)  # (k, pixels, pixels)
_WHOLE_COARSE = _sampling([0], [1], COARSE_SIDE, THUMB // 2)[0]
_WHOLE_FINE = _sampling([0], [1], FINE_SIDE, THUMB)[0]


def _standardise(views: np.ndarray) -> np.ndarray:
    views = views - views.mean(axis=(-1, -2), keepdims=True)
    return views / (np.sqrt((views * views).mean(axis=(-1, -2), keepdims=True)) + 1e-3)


@dataclass(frozen=True)
class Match:
    """How two images line up at the best window found (infinite differences: not worth measuring)."""

    ncc: float  # correlation of the standardised views
    worst_block: float  # mean squared difference of the worst block
    parallax: float  # the most a block's difference drops when that block alone is shifted

    @property
    def is_copy(self) -> bool:
        return self.ncc >= NCC_MIN and self.worst_block <= BLOCK_MAX and self.parallax <= PARALLAX_MAX


class _Prepared:
    def __init__(self, thumb: np.ndarray):
        self.fine = _ALIGN_BLUR @ thumb.astype(np.float32) @ _ALIGN_BLUR.T
        self.coarse = self.fine.reshape(THUMB // 2, 2, THUMB // 2, 2).mean(axis=(1, 3))
        self.coarse_view = _standardise(_WHOLE_COARSE @ self.coarse @ _WHOLE_COARSE.T)
        self.fine_view = _standardise(_WHOLE_FINE @ self.fine @ _WHOLE_FINE.T)


def _coarse_search(big: _Prepared, small: _Prepared, aspect: float) -> tuple[float, tuple]:
    """Best correlation of ``small`` with a window of ``big`` whose width/height ratio follows ``aspect``
    (the ratio of the two images' shapes), and that window.

    Every window pair's view V = Cy·A·Cxᵀ is never formed: its correlation with the standardised
    target Z needs only ΣV·Z = ⟨Cy·A, Z·Cx⟩, ΣV = uyᵀ·A·ux and ΣV² = ⟨Aᵀ·CyᵀCy·A, CxᵀCx⟩, a few
    small products for all k² window pairs at once instead of k² views of side² pixels.
    """
    k, side, pixels = len(_WINDOWS), COARSE_SIDE, THUMB // 2
    a, z = big.coarse, small.coarse_view
    rows = (_COARSE_ROWS @ a).reshape(k, side * pixels)
    targets = (z @ _COARSE_COLUMNS).reshape(side, k, pixels).transpose(1, 0, 2).reshape(k, side * pixels)
    sums = (_COARSE_SUMS @ a) @ _COARSE_SUMS.T
    weighted = np.matmul(a.T, (_COARSE_GRAMS.reshape(-1, pixels) @ a).reshape(k, pixels, pixels))
    squares = weighted.reshape(k, -1) @ _COARSE_GRAMS.reshape(k, -1).T
    count = side * side
    spread = np.sqrt(np.maximum(squares / count - (sums / count) ** 2, 0)) + 1e-3
    ncc = (rows @ targets.T) / count / spread
    heights, widths = np.meshgrid(_WINDOWS[:, 1], _WINDOWS[:, 1], indexing="ij")
    ncc[np.abs(widths - heights * aspect) > COARSE_STEP * 1.01] = -1.0
    row, col = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    (top, height), (left, width) = _WINDOWS[row], _WINDOWS[col]
    return float(ncc[row, col]), (top, height, left, width)


def _fine_axis(start: float, length: float) -> np.ndarray:
    steps = np.array([-FINE_STEP, 0.0, FINE_STEP])
    lengths = np.clip(length + steps, 1 - MAX_CROP, 1.0)
    return np.array([(min(max(start + s, 0.0), 1.0 - n), n) for n in lengths for s in steps])


def _block_errors(views: np.ndarray, target: np.ndarray) -> np.ndarray:
    cell = FINE_SIDE // BLOCKS
    squared = (views - target) ** 2
    return squared.reshape(*views.shape[:-2], BLOCKS, cell, BLOCKS, cell).mean(axis=(-3, -1))


def _fine_search(big: _Prepared, small: _Prepared, window: tuple) -> tuple[float, tuple]:
    """Hill-climbs the window in steps of FINE_STEP: best correlation and window."""
    for _ in range(FINE_ROUNDS):
        top, height, left, width = window
        ys, xs = _fine_axis(top, height), _fine_axis(left, width)
        sample_y = _sampling(ys[:, 0], ys[:, 1], FINE_SIDE, THUMB)
        sample_x = _sampling(xs[:, 0], xs[:, 1], FINE_SIDE, THUMB).transpose(0, 2, 1)
        views = _standardise(np.matmul(np.matmul(sample_y, big.fine)[:, None], sample_x[None]))
        ncc = (views * small.fine_view).mean(axis=(2, 3))
        i, j = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
        best = (*ys[i], *xs[j])
        if best == tuple(window) or ncc[i, j] < NCC_MIN - FINE_HOPELESS:
            break
        window = best
    return float(ncc[i, j]), best


def _blocks_and_parallax(big: _Prepared, small: _Prepared, window: tuple) -> tuple[float, float]:
    """The worst block's difference at ``window``, and the most any block gains from its own shift."""
    top, height, left, width = window
    shifts = np.arange(-SHIFT, SHIFT + 1) / FINE_SIDE
    sample_y = _sampling(top + shifts * height, [height] * len(shifts), FINE_SIDE, THUMB)
    sample_x = _sampling(left + shifts * width, [width] * len(shifts), FINE_SIDE, THUMB).transpose(0, 2, 1)
    views = _standardise(np.matmul(np.matmul(sample_y, big.fine)[:, None], sample_x[None]))
    errors = _block_errors(views, small.fine_view)  # (shift y, shift x, block row, block column)
    aligned = errors[SHIFT, SHIFT]
    return float(aligned.max()), float((aligned - errors.min(axis=(0, 1))).max())


def align(thumb_a: np.ndarray, thumb_b: np.ndarray, size_a: tuple[int, int], size_b: tuple[int, int]) -> Match:
    """How well the two thumbnails line up, trying ``b`` as a window of ``a`` and ``a`` as one of ``b``."""
    a, b = _Prepared(thumb_a), _Prepared(thumb_b)
    ratio = (size_b[0] / size_b[1]) / (size_a[0] / size_a[1])
    tries = [(*_coarse_search(a, b, ratio), a, b), (*_coarse_search(b, a, 1 / ratio), b, a)]
    coarse_ncc, window, big, small = max(tries, key=lambda t: t[0])
    if coarse_ncc < COARSE_MIN:
        return Match(coarse_ncc, float("inf"), float("inf"))
    ncc, window = _fine_search(big, small, window)
    if ncc < NCC_MIN:
        return Match(ncc, float("inf"), float("inf"))
    return Match(ncc, *_blocks_and_parallax(big, small, window))


def align_pairs(job: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> list[Match]:
    """:func:`align` for many pairs: thumbnails ``(m, THUMB, THUMB)`` of each side and ``(m, 2)`` sizes."""
    thumbs_a, thumbs_b, sizes_a, sizes_b = job
    return [align(ta, tb, tuple(sa), tuple(sb)) for ta, tb, sa, sb in zip(thumbs_a, thumbs_b, sizes_a, sizes_b)]
