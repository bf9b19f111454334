"""Class raster -> the polygons of its 4-connected regions, traced along pixel edges in one pass.

The polygons are GDAL's (``rasterio.features.shapes(classes, mask=classes != nodata,
connectivity=4)``), vertex for vertex: one polygon per 4-connected region of equal class, none
for nodata; a vertex wherever a ring turns and nowhere else; in pixel coordinates (x = column,
y = row, y down) a shell has the region on its left and a hole on its right. They come as flat
arrays in shapely's ragged layout, with each region's pixel count and the sum of a weight
raster over it, and no Python object per polygon.

How, and why it gives GDAL's rings:

- Regions: a union-find over runs of equal class in a row and the row above (one raster pass).
- Rings: each boundary is walked once along pixel edges with the region on the left. At each
  pixel corner the walk turns left if the pixel ahead on its left is not the region's, goes
  straight if only the one ahead on its right is not, and turns right otherwise. It hugs the
  region, so pixels that meet only at a corner stay apart: 4-connectivity. Only the two
  pixels ahead are compared, by class: pixels 4-adjacent with the same class are one region.
- Pinches: a walk passes a corner twice only where two of its region's pixels meet there
  diagonally and connect around. It is split there into simple rings, as GDAL's polygons are
  valid: a hole touching its shell, or another hole, at one point. The ring with negative
  shoelace area is the shell.
- Order: walks start at unvisited westward edges with the region below, in raster order. A
  region's first pixel has its outer boundary above it, so its shell's walk comes before its
  holes', and polygons come in the raster order of their first pixel.

The regions themselves (:func:`regions`) and the classes around each one
(:func:`neighbour_votes`) are what the sieve needs (:func:`geoseg.vectorize.sieve`).
Polygons of neighbouring blocks that a region crosses are joined by :func:`union_shared_edges`,
which walks what is left of their rings by the same rules: the whole raster's polygons.

Tested against GDAL on many small random rasters (every pinch and nodata pattern they reach)
and on the synthetic land cover. numba compiles the loops once; the machine code is cached on
disk (``cache=True``) for later processes.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Directions 0 east, 1 south, 2 west, 3 north; a step in direction d moves (STEP_X, STEP_Y).
STEP_X = np.array([1, 0, -1, 0], np.int64)
STEP_Y = np.array([0, 1, 0, -1], np.int64)
# Arriving at corner (x, y) in direction d, the pixels ahead on the left and on the right are at
# row y + dr, column x + dc of the raster padded by one pixel of nodata all round.
AHEAD_LEFT = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], np.int64)
AHEAD_RIGHT = np.array([[1, 1], [1, 0], [0, 0], [0, 1]], np.int64)
WEST = 2


class PixelPolygons(NamedTuple):
    """Polygons in shapely's ragged layout (``shapely.from_ragged_array``), in pixel coordinates."""

    values: np.ndarray  # class of each polygon, int64
    ring_xy: np.ndarray  # (n, 2) int64 pixel corners (column, row); each ring closed
    ring_offsets: np.ndarray  # into ring_xy, one more than rings
    polygon_offsets: np.ndarray  # into the rings, one more than polygons; a polygon's shell first
    pixels: np.ndarray  # pixels in each polygon
    weight_sums: np.ndarray  # the weight raster summed over each polygon's pixels, int64


def polygonize(classes: np.ndarray, nodata: int, weights: np.ndarray | None = None) -> PixelPolygons:
    """Polygons of the 4-connected regions of ``classes`` (2-D, integer) that are not ``nodata``;
    ``weights``: an integer raster of the same shape summed per polygon (zeros if not given)."""
    if weights is not None and weights.shape != classes.shape:  # read unchecked by the compiled loops
        raise ValueError(f"weights of shape {weights.shape} for classes of shape {classes.shape}")
    padded, (labels, parent, region_class, pixels, sums) = _labelled(classes, nodata, weights)
    xs, ys, loop_start, loop_region = _trace_rings(padded, labels, parent, padded.dtype.type(nodata))
    values, ring_xy, ring_offsets, polygon_offsets, totals, weight_sums = _assemble(
        xs, ys, loop_start, loop_region, region_class, pixels, sums
    )
    return PixelPolygons(values, ring_xy, ring_offsets, polygon_offsets, totals, weight_sums)


def regions(classes: np.ndarray, nodata: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 4-connected regions of equal class: a region id per pixel (1, 2, ... in the raster
    order of their first pixel; 0 = nodata), each id's class (``nodata`` for 0) and pixel count
    (the nodata pixels' for 0)."""
    _, (labels, parent, region_class, pixels, _) = _labelled(classes, nodata)
    return _compact(labels, parent, region_class, pixels, nodata)


def _labelled(classes: np.ndarray, nodata: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
    """``classes`` padded by one pixel of ``nodata`` all round, and :func:`_label_regions` of it
    (zero weights if none are given: pages never written, nearly free)."""
    padded = np.full((classes.shape[0] + 2, classes.shape[1] + 2), nodata, dtype=classes.dtype)
    padded[1:-1, 1:-1] = classes
    weights = np.zeros(classes.shape, np.uint8) if weights is None else weights
    return padded, _label_regions(padded, padded.dtype.type(nodata), weights)


@numba.njit(cache=True, nogil=True)
def _compact(labels, parent, region_class, pixels, nodata):
    """Provisional labels to region ids 1..n by their roots, in order; each id's class and size."""
    n = parent.shape[0] - 1
    region_of = np.zeros(n + 1, np.int32)
    count = 0
    for k in range(1, n + 1):
        if _root(parent, k) == k:
            count += 1
            region_of[k] = count
    ids = np.empty(count + 1, np.int64)
    sizes = np.zeros(count + 1, np.int64)
    for k in range(1, n + 1):
        if region_of[k]:
            ids[region_of[k]] = region_class[k]
            sizes[region_of[k]] = pixels[k]
    h, w = labels.shape[0] - 2, labels.shape[1] - 2
    out = np.empty((h, w), np.int32)
    for r in range(h):
        for c in range(w):
            k = labels[r + 1, c + 1]
            if k:
                out[r, c] = region_of[_root(parent, k)]
            else:
                out[r, c] = 0
                sizes[0] += 1
    ids[0] = nodata
    return out, ids, sizes


@numba.njit(cache=True, nogil=True)
def neighbour_votes(
    regions: np.ndarray, classes: np.ndarray, voters: np.ndarray, rows: int, n_classes: int, nodata: int
):
    """For each region with ``voters[id] >= 0`` (its row of ``rows``), how many of its pixels'
    4-neighbours in other regions have each class (nodata neighbours do not vote)."""
    votes = np.zeros((rows, n_classes), np.int64)
    h, w = regions.shape
    for r in range(h):
        for c in range(w):
            row = voters[regions[r, c]]
            if row < 0:
                continue
            here = regions[r, c]
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and regions[rr, cc] != here and classes[rr, cc] != nodata:
                    votes[row, classes[rr, cc]] += 1
    return votes


@numba.njit(cache=True, nogil=True)
def _root(parent: np.ndarray, label: int) -> int:
    root = label
    while parent[root] != root:
        root = parent[root]
    while parent[label] != root:  # path compression
        parent[label], label = root, parent[label]
    return root


@numba.njit(cache=True, nogil=True)
def _label_regions(padded, nodata, weights):
    """Provisional region labels (0 = nodata) with their union-find forest, and per root label:
    its class, pixel count and weight sum."""
    h, w = padded.shape[0] - 2, padded.shape[1] - 2
    labels = np.empty((h + 2, w + 2), np.int32)
    labels[0, :] = 0
    capacity = h * w + 1  # at most one new label per pixel; untouched pages cost nothing
    parent = np.empty(capacity, np.int32)
    region_class = np.empty(capacity, np.int64)
    pixels = np.empty(capacity, np.int64)
    sums = np.empty(capacity, np.int64)
    parent[0] = 0
    n = 0
    for r in range(1, h + 1):
        labels[r, 0] = 0
        previous = nodata
        current = 0
        for c in range(1, w + 1):
            v = padded[r, c]
            if v == nodata:
                labels[r, c] = 0
                previous = v
                continue
            up = labels[r - 1, c] if padded[r - 1, c] == v else 0
            if v == previous:  # the run goes on: join the region above, if another
                if up and up != current:
                    a, b = _root(parent, up), _root(parent, current)
                    if a < b:
                        parent[b] = a
                    elif b < a:
                        parent[a] = b
            elif up:
                current = up
            else:
                n += 1
                parent[n] = n
                region_class[n] = v
                pixels[n] = 0
                sums[n] = 0
                current = n
            labels[r, c] = current
            pixels[current] += 1
            sums[current] += weights[r - 1, c - 1]
            previous = v
    # roots are the smallest label of their tree: add each label's totals into its root's
    for k in range(1, n + 1):
        root = _root(parent, k)
        if root != k:
            pixels[root] += pixels[k]
            sums[root] += sums[k]
    return labels, parent[: n + 1], region_class[: n + 1], pixels[: n + 1], sums[: n + 1]


@numba.njit(cache=True, nogil=True)
def _trace_rings(padded, labels, parent, nodata):
    """Every boundary walked once (module docstring): ring vertices (closed), ring starts and
    each ring's root region label."""
    h, w = padded.shape[0] - 2, padded.shape[1] - 2
    corners = (h + 1) * (w + 1)
    # Upper bounds, allocated but never touched beyond what is used: a corner is a vertex of
    # at most four rings, a walk passes a corner at most twice, a ring encloses a pixel.
    xs = np.empty(5 * corners, np.int64)
    ys = np.empty(5 * corners, np.int64)
    loop_start = np.empty(2 * h * w + 1, np.int64)
    loop_region = np.empty(2 * h * w, np.int64)
    walk_x = np.empty(2 * corners, np.int64)
    walk_y = np.empty(2 * corners, np.int64)
    pinch_key = np.empty(2 * corners, np.int64)  # a pinch's corner index, -1 at other turns
    stack = np.empty(2 * corners, np.int64)
    on_stack = np.empty(corners, np.int32)
    started = np.zeros((h + 1, w), np.bool_)  # westward edges with the region below, walked
    n_vertices = 0
    n_rings = 0
    for y in range(h + 1):
        for x in range(w):
            v = padded[y + 1, x + 1]  # the pixel below the edge
            if v == nodata or padded[y, x + 1] == v or started[y, x]:
                continue
            region = _root(parent, labels[y + 1, x + 1])
            cx, cy, d = x + 1, y, WEST
            n_turns = 0
            while True:
                if d == WEST:
                    started[cy, cx - 1] = True
                cx += STEP_X[d]
                cy += STEP_Y[d]
                if padded[cy + AHEAD_LEFT[d, 0], cx + AHEAD_LEFT[d, 1]] != v:
                    turn = (d + 3) & 3  # left
                elif padded[cy + AHEAD_RIGHT[d, 0], cx + AHEAD_RIGHT[d, 1]] != v:
                    turn = d
                else:
                    turn = (d + 1) & 3  # right
                if turn != d:
                    walk_x[n_turns] = cx
                    walk_y[n_turns] = cy
                    # a left turn with the region ahead on the right: two of its pixels meet here
                    pinched = turn == (d + 3) & 3 and padded[cy + AHEAD_RIGHT[d, 0], cx + AHEAD_RIGHT[d, 1]] == v
                    pinch_key[n_turns] = cy * (w + 1) + cx if pinched else -1
                    n_turns += 1
                d = turn
                if cx == x + 1 and cy == y and d == WEST:
                    break
            n_vertices, n_rings = _split_at_pinches(
                walk_x,
                walk_y,
                pinch_key,
                n_turns,
                region,
                stack,
                on_stack,
                xs,
                ys,
                loop_start,
                loop_region,
                n_vertices,
                n_rings,
            )
    loop_start[n_rings] = n_vertices
    xs, ys = xs[:n_vertices].copy(), ys[:n_vertices].copy()
    return xs, ys, loop_start[: n_rings + 1].copy(), loop_region[:n_rings].copy()


@numba.njit(cache=True, nogil=True)
def _split_at_pinches(
    turn_x, turn_y, pinch_key, n_turns, label, stack, on_stack, xs, ys, loop_start, loop_label, n_vertices, n_rings
):
    """A closed walk's turns (``[:n_turns]``) split into simple rings, appended (closed) to ``xs``,
    ``ys``, with their starts and ``label``: a corner seen again closes the ring of the corners
    pushed since, and the walk's end closes the last one. ``pinch_key``: the index of a pinch
    corner into ``on_stack`` (-1 at other turns). ``on_stack`` holds a pinch corner's stack
    position; never cleared, an entry counts only where the stack holds that very corner.
    Returns the new vertex and ring counts."""
    top = 0
    for i in range(n_turns + 1):
        j = i if i < n_turns else 0
        closes = -1
        if i == n_turns:
            closes = 0
        elif pinch_key[j] >= 0:
            q = on_stack[pinch_key[j]]
            if 0 <= q < top and pinch_key[stack[q]] == pinch_key[j]:
                closes = q
            else:
                on_stack[pinch_key[j]] = top
        if closes < 0:
            stack[top] = j
            top += 1
            continue
        loop_start[n_rings] = n_vertices
        loop_label[n_rings] = label
        n_rings += 1
        for q in range(closes, top):
            xs[n_vertices] = turn_x[stack[q]]
            ys[n_vertices] = turn_y[stack[q]]
            n_vertices += 1
        xs[n_vertices] = turn_x[stack[closes]]
        ys[n_vertices] = turn_y[stack[closes]]
        n_vertices += 1
        top = closes + 1
    return n_vertices, n_rings


@numba.njit(cache=True, nogil=True)
def _assemble(xs, ys, loop_start, loop_region, region_class, pixels, sums):
    """Rings grouped by region, shell first, regions in the order their first ring came."""
    n_rings = loop_region.shape[0]
    polygon_of_region = np.full(region_class.shape[0], -1, np.int64)
    n_polygons = 0
    rings_of = np.zeros(n_rings + 1, np.int64)
    polygon = np.empty(n_rings, np.int64)
    shell = np.empty(n_rings, np.bool_)
    for k in range(n_rings):
        region = loop_region[k]
        if polygon_of_region[region] < 0:
            polygon_of_region[region] = n_polygons
            n_polygons += 1
        polygon[k] = polygon_of_region[region]
        rings_of[polygon[k] + 1] += 1
        twice_area = 0
        for i in range(loop_start[k], loop_start[k + 1] - 1):
            twice_area += xs[i] * ys[i + 1] - xs[i + 1] * ys[i]
        shell[k] = twice_area < 0
    # one shell per polygon, or the slots below would be written out of bounds: the tracer's
    # rings always have one, pieces handed to the union with their rings reversed would not
    shells_of = np.zeros(n_polygons, np.int64)
    for k in range(n_rings):
        shells_of[polygon[k]] += shell[k]
    for p in range(n_polygons):
        if shells_of[p] != 1:
            raise ValueError("pieces whose rings do not keep their region on the left: not a raster's polygons")
    polygon_offsets = np.cumsum(rings_of[: n_polygons + 1])
    # slot of each ring: the shell at its polygon's first, holes after it in the order they came
    next_hole = polygon_offsets[:-1] + 1
    slot = np.empty(n_rings, np.int64)
    for k in range(n_rings):
        p = polygon[k]
        if shell[k]:
            slot[k] = polygon_offsets[p]
        else:
            slot[k] = next_hole[p]
            next_hole[p] += 1
    sizes = np.empty(n_rings, np.int64)
    for k in range(n_rings):
        sizes[slot[k]] = loop_start[k + 1] - loop_start[k]
    ring_offsets = np.zeros(n_rings + 1, np.int64)
    ring_offsets[1:] = np.cumsum(sizes)
    ring_xy = np.empty((xs.shape[0], 2), np.int64)
    for k in range(n_rings):
        at = ring_offsets[slot[k]]
        for i in range(loop_start[k], loop_start[k + 1]):
            ring_xy[at, 0] = xs[i]
            ring_xy[at, 1] = ys[i]
            at += 1
    values = np.empty(n_polygons, np.int64)
    totals = np.empty(n_polygons, np.int64)
    weight_sums = np.empty(n_polygons, np.int64)
    for region in range(region_class.shape[0]):
        p = polygon_of_region[region]
        if p >= 0:
            values[p], totals[p], weight_sums[p] = region_class[region], pixels[region], sums[region]
    return values, ring_xy, ring_offsets, polygon_offsets, totals, weight_sums


def union_shared_edges(pieces: PixelPolygons) -> PixelPolygons:
    """The union of same-class ``pieces`` that share an edge.

    ``pieces`` are polygons of neighbouring blocks in one pixel grid, as :func:`polygonize` gives
    them (shells with the region on the left), each with a vertex at every pixel corner where it
    runs along a block edge: two pieces then share an edge as unit segments run both ways. Those
    cancel, and what is left is walked as :func:`polygonize` walks a raster: turning left at a
    pinch, split there into simple rings, a vertex only where a ring turns. So the union is the
    polygons of the whole raster, and pixel counts and weight sums add up.
    """
    values, xy, ring_offsets, polygon_offsets, pixels, sums = pieces
    if len(values) == 0:
        return pieces
    xy = np.asarray(xy, np.int64)
    if xy.min() < 0 or xy.max() >= 1 << COORD_BITS or values.min() < 0 or values.max() >= 1 << CLASS_BITS:
        raise ValueError(f"pieces beyond {1 << COORD_BITS} px or class {1 << CLASS_BITS}: not packed in a key")
    ring_piece = np.repeat(np.arange(len(values)), np.diff(polygon_offsets))
    starts = np.ones(len(xy), bool)
    starts[ring_offsets[1:] - 1] = False  # a ring's closing vertex starts no segment
    first = np.flatnonzero(starts)
    piece = ring_piece[np.repeat(np.arange(len(ring_offsets) - 1), np.diff(ring_offsets))][first]
    x0, y0, x1, y1 = xy[first, 0], xy[first, 1], xy[first + 1, 0], xy[first + 1, 1]
    cls = values[piece].astype(np.int64)
    # Shared edges: equal unit segments of one class, which only neighbouring pieces can have
    unit = np.flatnonzero(np.abs(x1 - x0) + np.abs(y1 - y0) == 1)
    horizontal = (y0[unit] == y1[unit]).astype(np.int64)
    lower = np.minimum(x0[unit], x1[unit]), np.minimum(y0[unit], y1[unit])
    undirected = (((cls[unit] << 1 | horizontal) << COORD_BITS | lower[0]) << COORD_BITS) | lower[1]
    order = np.argsort(undirected, kind="stable")
    same = np.flatnonzero(undirected[order][1:] == undirected[order][:-1])
    a, b = unit[order[same]], unit[order[same + 1]]
    opposite = (x0[a] == x1[b]) & (y0[a] == y1[b])  # run both ways: one edge of two pieces
    a, b = a[opposite], b[opposite]
    kept = np.ones(len(first), bool)
    kept[a] = kept[b] = False
    joined = coo_matrix((np.ones(len(a)), (piece[a], piece[b])), shape=(len(values), len(values)))
    n_polygons, polygon_of = connected_components(joined, directed=False)
    polygon_of = polygon_of.astype(np.int64)  # the type _assemble is compiled for
    # What is left, walked: each segment's successor starts where it ends (two at a pinch)
    k = np.flatnonzero(kept)
    x0, y0, x1, y1, cls = x0[k], y0[k], x1[k], y1[k], cls[k]
    start_key = (cls << COORD_BITS | x0) << COORD_BITS | y0
    end_key = (cls << COORD_BITS | x1) << COORD_BITS | y1
    by_start = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[by_start]
    lo, hi = np.searchsorted(sorted_keys, end_key, "left"), np.searchsorted(sorted_keys, end_key, "right")
    pinched = hi - lo > 1
    corners, corner_of = np.unique(end_key[pinched], return_inverse=True)
    end_pinch = np.full(len(k), -1, np.int64)
    end_pinch[pinched] = corner_of
    label = polygon_of[piece[k]]
    xs, ys, loop_start, loop_polygon = _walk_segments(x0, y0, x1, y1, label, end_pinch, len(corners), by_start, lo, hi)
    region_class = np.zeros(n_polygons, np.int64)
    region_class[polygon_of] = values
    totals = np.bincount(polygon_of, weights=pixels, minlength=n_polygons).astype(np.int64)
    weight_sums = np.bincount(polygon_of, weights=sums, minlength=n_polygons).astype(np.int64)
    return PixelPolygons(*_assemble(xs, ys, loop_start, loop_polygon, region_class, totals, weight_sums))


COORD_BITS = 26  # pixel corners up to 67 million along each axis
CLASS_BITS = 63 - 2 * COORD_BITS - 1


@numba.njit(cache=True, nogil=True)
def _walk_segments(x0, y0, x1, y1, label, end_pinch, n_pinches, by_start, lo, hi):
    """Closed walks over the segments (each followed by one starting where it ends, the left turn
    where two do: ``end_pinch`` numbers those corners), split at pinches into simple rings of the
    corners where they turn: ring vertices (closed), ring starts, and each ring's ``label`` (a
    walk hugs one region: the label of its segments)."""
    n = x0.shape[0]
    direction = np.empty(n, np.int64)
    for s in range(n):
        dx, dy = x1[s] - x0[s], y1[s] - y0[s]
        direction[s] = 0 if dx > 0 else (2 if dx < 0 else (1 if dy > 0 else 3))
    visited = np.zeros(n, np.bool_)
    walk = np.empty(n, np.int64)
    turn_x = np.empty(n, np.int64)
    turn_y = np.empty(n, np.int64)
    pinch_key = np.empty(n, np.int64)
    stack = np.empty(n, np.int64)
    on_stack = np.empty(max(n_pinches, 1), np.int32)
    xs = np.empty(2 * n, np.int64)
    ys = np.empty(2 * n, np.int64)
    loop_start = np.empty(n + 1, np.int64)
    loop_label = np.empty(n, np.int64)
    n_vertices = 0
    n_rings = 0
    for first in by_start:
        if visited[first]:
            continue
        length, s = 0, first
        while True:
            visited[s] = True
            walk[length] = s
            if hi[s] == lo[s]:
                raise ValueError("a boundary that does not close: the pieces are not a raster's")
            nxt = by_start[lo[s]]
            if end_pinch[s] >= 0 and direction[nxt] != (direction[s] + 3) & 3:
                nxt = by_start[lo[s] + 1]
            length += 1
            s = nxt
            if s == first:
                break
            if length == n:  # a walk that never returns: inconsistent pieces (numba checks no bounds)
                raise ValueError("a boundary that does not close: the pieces are not a raster's")
        n_turns = 0
        for i in range(length):
            before = walk[i - 1 if i else length - 1]
            s = walk[i]
            if direction[s] != direction[before]:
                turn_x[n_turns], turn_y[n_turns] = x0[s], y0[s]
                pinch_key[n_turns] = end_pinch[before]
                n_turns += 1
        n_vertices, n_rings = _split_at_pinches(
            turn_x,
            turn_y,
            pinch_key,
            n_turns,
            label[first],
            stack,
            on_stack,
            xs,
            ys,
            loop_start,
            loop_label,
            n_vertices,
            n_rings,
        )
    loop_start[n_rings] = n_vertices
    return xs[:n_vertices].copy(), ys[:n_vertices].copy(), loop_start[: n_rings + 1].copy(), loop_label[:n_rings].copy()
