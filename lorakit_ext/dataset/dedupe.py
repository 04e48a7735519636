"""Near-duplicate images: candidate pairs → confirmed copies → clusters → keep one.

Candidates are pairs within a Hamming threshold of a perceptual hash, and pairs whose coarse layouts
agree (which catches small crops a hash misses); each is confirmed by aligning the two images
(:mod:`lorakit_ext.dataset.similar`). The kept image of a cluster follows :mod:`lorakit_ext.dataset.keep`;
the rest goes to the trash (:mod:`lorakit_ext.dataset.trash`) with its captions, so every decision
here can be undone.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps

from lorakit_ext.dataset import similar
from lorakit_ext.dataset.files import list_images, sidecars
from lorakit_ext.dataset.images import is_lossless
from lorakit_ext.dataset.keep import ImageInfo, choose_keep, has_camera_exif, tone_and_clipping
from lorakit_ext.dataset.trash import RemovalBatch, move_to_removed
from lorakit_ext.errors import UserError
from lorakit_ext.project import Project
from lorakit_ext.project_lock import holding_lock

HASH_SIZE = 8
METHODS = ("phash", "dhash", "whash")
DEFAULT_METHOD = "phash"
# Largest Hamming distance (of 64 bits) still called a near-duplicate, measured with
# `python -m lorakit_ext bench dedupe --calibrate [--seed 1]`: 200 procedural scenes per seed, half
# flat-colour "anime" art, half grainy "photos"; 1000 copies made by 50–75 % resize, JPEG q60–85, ±10 %
# brightness and their combinations; 400 copies with a 5 % crop (±JPEG); 600 same-background /
# different-subject pairs; 1 990 000 pairs of unrelated scenes. Seed 0 | seed 1:
#   phash: copies ≤ 8 | 8, crops ≤ 18 | 20, closest distinct pair 8 | 10. 6 catches 999 | 998 of 1000
#          copies and about half the crops, merges nothing, and stays one step (pHash distances are
#          even) below the closest distinct pair; 8 catches every copy but merged one unrelated pair.
#   dhash: copies ≤ 8 | 9, closest distinct pair 6 | 6. 4 misses 5 % of copies and merges nothing.
#   whash: flat colours make its median split flip on ties: copies up to 28 | 28 bits apart, a distinct
#          pair at 4 | 2. 2 misses 12 | 17 % of copies and merged 0 | 1 of 600 same-background pairs;
#          no threshold is both safe and useful, so it is offered, not recommended.
# A missed copy only leaves a duplicate in the dataset; a merged pair would take a real image out of
# training (undoably), so the defaults keep a margin below the closest distinct pair. Since every pair
# is now also confirmed by alignment, the threshold only decides which pairs get that check.
DEFAULT_THRESHOLDS = {"phash": 6, "dhash": 4, "whash": 2}
# Below this many images (or candidate pairs) a process pool costs more to start than it saves.
POOL_MIN_IMAGES = 256
POOL_MIN_PAIRS = 512
_HASHERS = {
    "phash": (imagehash.phash, lambda hs: {}, lambda hs: hs * 4),
    "dhash": (imagehash.dhash, lambda hs: {}, lambda hs: hs + 1),
    # wHash picks its working scale from the input size by default, so a half-size copy would be
    # hashed at a different scale than its original; a fixed scale makes the two comparable.
    "whash": (imagehash.whash, lambda hs: {"image_scale": hs * 8}, lambda hs: hs * 8),
}


@dataclass
class HashResult:
    infos: list[ImageInfo]
    hashes: np.ndarray  # (len(infos), words) uint64; row i is the hash of infos[i]
    errors: list[tuple[Path, str]]
    thumbs: np.ndarray  # (len(infos), THUMB, THUMB) uint8 grey thumbnails, for similar.align


# imagehash imports these only when a hash needs them; checked up front, or a missing package
# would show up as every image failing to hash.
_NEEDS = {"phash": ("scipy", "scipy"), "whash": ("pywt", "PyWavelets")}


def _check_options(method: str, hash_size: int) -> None:
    if method not in METHODS:
        raise UserError(f"unknown hash method {method!r}; choose one of {', '.join(METHODS)}")
    module, package = _NEEDS.get(method, (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise UserError(f"{method} needs the {package} package, which is not installed: pip install {package}, or use another --method")
    if hash_size < 2 or (method == "whash" and hash_size & (hash_size - 1)):
        raise UserError(f"hash size {hash_size} does not work with {method}; use 8 (or 16)")


def _hash_file(job: tuple[str, str, int]):
    path, method, hash_size = job
    hasher, kwargs, side = _HASHERS[method]
    try:
        stat = os.stat(path)
        with Image.open(path) as img:
            width, height = img.size
            lossless, camera = is_lossless(img), has_camera_exif(img)
            # JPEG decodes at 1/2, 1/4 or 1/8 scale about 4× faster than in full; twice the working
            # size of the hasher and of the thumbnail leaves the final resizes to filter properly.
            img.draft("L", (2 * max(side(hash_size), similar.THUMB),) * 2)
            grey = ImageOps.exif_transpose(img).convert("L")
        bits = hasher(grey, hash_size, **kwargs(hash_size)).hash
        tone, clipped = tone_and_clipping(grey)
    # Decoders raise many types for damaged files (OSError, SyntaxError, ValueError, struct.error…);
    # any of them means "this file cannot be hashed", which is reported, not fatal.
    except Exception as exc:  # noqa: BLE001
        return path, None, f"{type(exc).__name__}: {exc}"
    meta = (width, height, stat.st_size, stat.st_mtime_ns, lossless, tone, clipped, camera)
    return path, meta, (np.packbits(bits.ravel()).tobytes(), similar.thumbnail(grey))


def pool_map(fn, jobs: list, workers: int) -> list:
    """``[fn(job) for job in jobs]``, spread over ``workers`` processes when that is more than one."""
    if workers <= 1:
        return [fn(job) for job in jobs]
    # Fork starts workers in milliseconds and never re-imports the host's main module (A1111's
    # launch.py would run again under spawn); the workers only touch Pillow and numpy.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(fn, jobs, chunksize=chunk))


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def hash_images(paths, method: str = DEFAULT_METHOD, hash_size: int = HASH_SIZE, workers: int | None = None) -> HashResult:
    """Hashes every image; files that cannot be decoded land in ``errors`` with the reason.

    ``workers=None`` uses a process pool of one worker per CPU for large sets and the calling
    process for small ones; ``workers=1`` never starts a pool.
    """
    _check_options(method, hash_size)
    jobs = [(str(p), method, hash_size) for p in paths]
    if workers is None:
        workers = default_workers() if len(jobs) >= POOL_MIN_IMAGES else 1
    results = pool_map(_hash_file, jobs, workers)
    words = -(-hash_size * hash_size // 64)
    infos, rows, thumbs, errors = [], [], [], []
    for path, meta, payload in results:
        if meta is None:
            errors.append((Path(path), payload))
        else:
            infos.append(ImageInfo(Path(path), *meta))
            rows.append(payload[0].ljust(words * 8, b"\0"))
            thumbs.append(payload[1])
    packed = np.frombuffer(b"".join(rows), dtype=np.uint64).reshape(len(rows), words)
    thumbs = np.stack(thumbs) if thumbs else np.zeros((0, similar.THUMB, similar.THUMB), np.uint8)
    return HashResult(infos, packed, errors, thumbs)


_M1, _M2, _M4, _H01 = (np.uint64(v) for v in (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101))
_S1, _S2, _S4, _S56 = (np.uint64(v) for v in (1, 2, 4, 56))


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per row of a uint64 array, summed over the last axis; ``x`` is left unchanged.

    numpy 1.26 has no native popcount; this SWAR bit trick, done in place on one temporary, runs
    about 6× faster than a byte lookup table.
    """
    y = x >> _S1
    y &= _M1
    x = x - y
    y = x >> _S2
    y &= _M2
    x &= _M2
    x += y
    x += x >> _S4
    x &= _M4
    x *= _H01
    x >>= _S56
    return x.sum(axis=-1, dtype=np.int64)


def find_pairs(hashes: np.ndarray, threshold: int, block: int = 64) -> np.ndarray:
    """All ``(i, j, distance)`` with ``i < j`` and Hamming distance ≤ ``threshold``, as an (m, 3) array.

    Each block of rows is XORed against every later row at once; memory stays at
    ``block × n × words`` words whatever the number of images.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    if hashes.ndim == 1:
        hashes = hashes[:, None]
    found = []
    for start in range(0, len(hashes), block):
        rows = hashes[start : start + block]
        dist = popcount(rows[:, None, :] ^ hashes[None, start:, :])
        r, c = np.nonzero(dist <= threshold)
        later = c > r
        r, c = r[later], c[later]
        found.append(np.stack([r + start, c + start, dist[r, c]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 3), np.int64)


def cluster(n: int, pairs) -> list[list[int]]:
    """Connected groups of two or more among ``n`` items joined by ``pairs`` (union-find)."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, *_ in pairs:
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


@dataclass
class Member:
    name: str
    width: int
    height: int
    size: int
    mtime_ns: int
    distance: int  # to the kept image; may exceed the threshold when linked through another member


@dataclass
class Cluster:
    id: int  # 1-based, as shown to the user and used by keep overrides
    keep: str
    members: list[Member]
    pairs: list[tuple[str, str, int]]

    @property
    def remove(self) -> list[str]:
        return [m.name for m in self.members if m.name != self.keep]


@dataclass
class DedupePlan:
    method: str
    threshold: int
    image_count: int
    clusters: list[Cluster]
    errors: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        for c, cluster_ in zip(data["clusters"], self.clusters):
            c["remove"] = cluster_.remove
        data["errors"] = [{"name": n, "reason": r} for n, r in self.errors]
        return data


def confirmed_pairs(result: HashResult, threshold: int, workers: int | None = None) -> np.ndarray:
    """``(i, j)`` pairs, ``i < j``, that a hash within ``threshold`` or the layout descriptors put
    forward and alignment confirms as one picture, as an (m, 2) array."""
    near = find_pairs(result.hashes, threshold)[:, :2]
    layout = similar.layout_pairs(similar.layout_descriptors(result.thumbs))
    candidates = np.unique(np.concatenate([near, layout]).astype(np.int64), axis=0)
    if workers is None:
        workers = default_workers() if len(candidates) >= POOL_MIN_PAIRS else 1
    sizes = np.array([(i.width, i.height) for i in result.infos], np.int64).reshape(-1, 2)
    step = max(1, min(256, -(-len(candidates) // (workers * 4))))
    jobs = []
    for start in range(0, len(candidates), step):
        a, b = candidates[start : start + step].T
        jobs.append((result.thumbs[a], result.thumbs[b], sizes[a], sizes[b]))
    copies = [m.is_copy for batch in pool_map(similar.align_pairs, jobs, workers) for m in batch]
    return candidates[np.array(copies, dtype=bool)]


def build_plan(result: HashResult, method: str, threshold: int, workers: int | None = None) -> DedupePlan:
    """The clusters and keep choices for already-hashed images; ``workers`` as for :func:`hash_images`."""
    pairs = confirmed_pairs(result, threshold, workers)
    infos = result.infos
    groups = cluster(len(infos), pairs)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    links: list[list] = [[] for _ in groups]
    distances = popcount(result.hashes[pairs[:, 0]] ^ result.hashes[pairs[:, 1]])
    for (i, j), d in zip(pairs.tolist(), distances.tolist()):
        links[group_of[i]].append((infos[i].path.name, infos[j].path.name, d))
    clusters = []
    for number, (group, group_links) in enumerate(zip(groups, links), start=1):
        keep = choose_keep(group, infos)
        to_keep = popcount(result.hashes[group] ^ result.hashes[keep]).tolist()
        members = [
            Member(infos[i].path.name, infos[i].width, infos[i].height, infos[i].size, infos[i].mtime_ns, d)
            for i, d in zip(group, to_keep)
        ]
        clusters.append(Cluster(number, infos[keep].path.name, members, group_links))
    errors = [(p.name, reason) for p, reason in result.errors]
    return DedupePlan(method, threshold, len(infos) + len(errors), clusters, errors)


def plan_dedupe(project: Project, method: str = DEFAULT_METHOD, threshold: int | None = None, workers: int | None = None) -> DedupePlan:
    _check_options(method, HASH_SIZE)
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[method]
    if not 0 <= threshold < HASH_SIZE * HASH_SIZE:
        raise UserError(f"threshold {threshold} is outside 0–{HASH_SIZE * HASH_SIZE - 1} bits")
    paths = [project.inside(p) for p in list_images(project.dataset)]
    return build_plan(hash_images(paths, method, HASH_SIZE, workers), method, threshold, workers)


def resolve_keep(plan: DedupePlan, overrides: dict[int, str]) -> dict[int, str]:
    """Cluster id → the file to keep: the plan's choice unless the user named another member."""
    keep = {c.id: c.keep for c in plan.clusters}
    for cluster_id, name in overrides.items():
        if cluster_id not in keep:
            raise UserError(f"there is no cluster {cluster_id}; the plan has clusters 1–{len(keep)}")
        members = next(c for c in plan.clusters if c.id == cluster_id).members
        if name not in {m.name for m in members}:
            raise UserError(f"{name!r} is not in cluster {cluster_id} ({', '.join(m.name for m in members)})")
        keep[cluster_id] = name
    return keep


@holding_lock("dedupe apply")
def apply_plan(project: Project, plan: DedupePlan, keep_overrides: dict[int, str] | None = None) -> RemovalBatch:
    """Moves every image the plan does not keep, with its caption files, into one trash batch."""
    keep = resolve_keep(plan, keep_overrides or {})
    for member in (m for c in plan.clusters for m in c.members):
        path = project.dataset_file(member.name)
        stat = path.stat() if path.is_file() else None
        if stat is None or (stat.st_size, stat.st_mtime_ns) != (member.size, member.mtime_ns):
            raise UserError(f"dataset changed since the plan ({member.name}); run dedupe again")
    moves, record = [], []
    for c in plan.clusters:
        removed = [m.name for m in c.members if m.name != keep[c.id]]
        for name in removed:
            image = project.dataset_file(name)
            moves += [image, *sidecars(image)]
        record.append({
            "id": c.id,
            "keep": keep[c.id],
            "removed": removed,
            "planned_keep": c.keep,
            "distance_to_planned_keep": {m.name: m.distance for m in c.members},
        })
    extra = {"kind": "dedupe", "method": plan.method, "threshold": plan.threshold, "clusters": record}
    return move_to_removed(project, moves, f"near-duplicate ({plan.method}, distance ≤ {plan.threshold})", extra)
