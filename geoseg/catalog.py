"""Inputs to scenes: paths, folders, URL prefixes, glob patterns and STAC items, then their headers.

Every input is a location (:mod:`geoseg.storage`): a local path or a URL. An asset's href in a
STAC item is resolved against the item's own location, so an item collection in a bucket names
its COGs relatively.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from geoseg import band_assets, storage
from geoseg.runstate import RunError
from geoseg.scenes import BandSelection, SceneError, SceneInfo, open_scene

log = logging.getLogger(__name__)

SCENE_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class ItemOrigin:
    """The STAC item a scene's location came from, and its acquisition time."""

    item_id: str
    source: str  # the document that holds the item, or the STAC API that found it
    acquired: str | None = None

    def __str__(self) -> str:
        return f"item {self.item_id!r} of {self.source}"


class NotItemsError(RunError):
    """A STAC document that holds no items: a Catalog or a Collection."""

    def __init__(self, loc: str, kind: str) -> None:
        super().__init__(f"{loc}: a STAC {kind}, not an Item or ItemCollection")
        self.kind = f"a STAC {kind}"


def stac_items(loc: str) -> list[dict[str, Any]]:
    """The items of a STAC Item or ItemCollection document."""
    try:
        doc = json.loads(storage.read_text(loc))
    except ValueError as exc:
        raise RunError(f"{loc}: not a STAC document ({exc})") from None
    if isinstance(doc, dict) and doc.get("type") in ("Catalog", "Collection"):
        raise NotItemsError(loc, doc["type"])
    if not isinstance(doc, dict) or doc.get("type") not in ("Feature", "FeatureCollection"):
        raise RunError(f"{loc}: not a STAC Item or ItemCollection")
    return doc.get("features", [doc] if doc.get("type") == "Feature" else [])


def stac_assets(
    loc: str, asset: str, origins: dict[str, ItemOrigin] | None = None, bad: dict[str, str] | None = None
) -> list[str]:
    """The ``asset`` of every item of a STAC Item or ItemCollection, as locations; an item with
    one asset per band instead (``eo:bands``/``raster:bands``) as a reference to its band assets.
    Each one's item and acquisition time (``properties.datetime``) go into ``origins``. An item
    with neither is named in ``bad`` (by its reference) with the reason, or raises without it."""
    hrefs = []
    for item in stac_items(loc):
        assets = item.get("assets", {})
        if asset in assets:
            href = storage.resolve_href(loc, assets[asset]["href"])
        elif any(band_assets.band_names(a) or band_assets.raster_band(a) for a in assets.values()):
            href = band_assets.item_ref(loc, item)  # one asset per band: stacked when opened
        else:
            reason = f"item {item.get('id')!r} has no asset {asset!r} (has: {', '.join(assets)})"
            if bad is None:
                raise RunError(f"{loc}: {reason}")
            bad[band_assets.item_ref(loc, item)] = reason
            log.error("skipping scene %s: %s", band_assets.item_ref(loc, item), reason)
            continue
        hrefs.append(href)
        if origins is not None:
            acquired = item.get("properties", {}).get("datetime")
            _note_origin(origins, href, ItemOrigin(str(item.get("id", "(no id)")), loc, acquired))
    return hrefs


def _note_origin(origins: dict[str, ItemOrigin], loc: str, origin: ItemOrigin) -> None:
    """A scene named by two items keeps the first, unless only the second is dated."""
    known = origins.get(loc)
    if known is None or (known.acquired is None and origin.acquired):
        origins[loc] = origin


def _is_pattern(loc: str) -> bool:
    """Whether ``loc`` is a glob pattern (in an http(s) URL a "?" starts the query, as in a signed
    URL). An object key with "*", "?" or "[" in it is read as a pattern too, as a file's name is
    by a shell: "?" still matches it, "[" must be written "[[]"."""
    wildcards = "*[" if storage.scheme(loc) in storage.READ_ONLY else "*?["
    return any(ch in loc for ch in wildcards)


def expand_inputs(
    inputs: list[str],
    stac_asset: str = "image",
    empty: dict[str, str] | None = None,
    origins: dict[str, ItemOrigin] | None = None,
) -> list[str]:
    """Paths and URLs, folders and URL prefixes (their .tif/.tiff files; a prefix's at any depth),
    glob patterns and STAC Item(Collection) files, whose items go into ``origins``.

    A folder, prefix or pattern that gives no file, and a STAC document or item that cannot be
    used, is named in ``empty`` (if given; else a bad STAC document raises) with the reason.
    """

    def one(item: str, document: bool = False) -> list[str]:
        try:
            found, reason = (_stac_document if document else _expand)(item, stac_asset, empty, origins)
        except (RunError, storage.StorageError) as exc:  # one bad input; the others go on
            if empty is None:
                raise
            if isinstance(exc, storage.StorageError) and not exc.lasting:
                # the store did not answer: going on without the input would give another grid
                # and fingerprint, and the rerun after the outage would be refused
                raise RunError(str(exc)) from None
            if document and isinstance(exc, NotItemsError):  # a catalog or collection beside the items
                log.info("%s: %s, not scenes", item, exc.kind)
                return []
            found, reason = [], str(exc).removeprefix(f"{item}: ")
        if not found and empty is not None and reason:
            log.error("skipping input %s: %s", item, reason)
            empty[item] = reason
        if _is_pattern(item):  # STAC documents a pattern matches give their scenes
            return [scene for loc in found for scene in (one(loc, document=True) if _is_stac(loc) else [loc])]
        return found

    # a scene reached twice (two documents, a folder and a document, two signings) is segmented
    # once, named as it was first
    scenes: dict[str, str] = {}
    for item in inputs:
        for scene in one(str(item)):
            scenes.setdefault(_same_scene_key(scene), scene)
    if origins is not None:  # an item's scene under the name it was first reached by
        for loc, origin in list(origins.items()):
            if (first := scenes.get(_same_scene_key(loc), loc)) != loc:
                _note_origin(origins, first, origin)
    return list(scenes.values())


def _same_scene_key(scene: str) -> str:
    try:
        return storage.unsigned(storage.absolute(scene))
    except storage.StorageError:  # a scheme no store takes: opening it says so
        return scene


def _is_stac(loc: str) -> bool:
    return storage.without_query(loc).lower().endswith(".json")


def _stac_document(
    loc: str, stac_asset: str, bad: dict[str, str] | None, origins: dict[str, ItemOrigin] | None
) -> tuple[list[str], str]:
    """A STAC document's scenes, and the reason where it gives none ("" where its items were
    reported one by one in ``bad``)."""
    reported = len(bad or {})
    found = stac_assets(loc, stac_asset, origins, bad)
    return found, "" if len(bad or {}) > reported else "no STAC item in it"


def _expand(
    item: str, stac_asset: str, bad: dict[str, str] | None, origins: dict[str, ItemOrigin] | None
) -> tuple[list[str], str]:
    """One input's scenes, and the reason where it gives none ("" where its items were reported
    one by one in ``bad``)."""
    remote = storage.is_url(item)
    name = storage.without_query(item).lower()  # a signed URL's signature is not in the name
    if band_assets.is_item_ref(item):
        return [item], ""
    if _is_stac(item) and not _is_pattern(item) and (remote or storage.exists(item)):
        return _stac_document(item, stac_asset, bad, origins)
    if _is_pattern(item):
        return storage.glob(item), "pattern that matches no file"
    if remote and (item.endswith("/") or not name.endswith(SCENE_SUFFIXES)):
        found = [loc for loc in storage.list_files(item.rstrip("/") + "/") if loc.lower().endswith(SCENE_SUFFIXES)]
        return found, "prefix with no .tif/.tiff object"
    if not remote and storage.is_dir(item):
        found = sorted(str(p) for p in Path(item).iterdir() if p.suffix.lower() in SCENE_SUFFIXES)
        return found, "folder with no .tif/.tiff file"
    return [item], ""


def search_inputs(
    url: str,
    collections: list[str],
    bbox: list[float] | None,
    when: str | None,
    asset: str,
    max_items: int,
    origins: dict[str, ItemOrigin] | None = None,
) -> list[str]:
    """The scenes a STAC API search finds (pystac-client): each item's ``asset`` where it has
    one, else a reference to its band assets (by the item's own URL); their items go into
    ``origins``."""
    from pystac_client import Client

    asked = ", ".join(
        f"{k} {v}" for k, v in (("collections", ",".join(collections)), ("bbox", bbox), ("datetime", when)) if v
    )
    try:
        search = Client.open(url).search(collections=collections or None, bbox=bbox, datetime=when, max_items=max_items)
        items = list(search.items())
    except Exception as exc:
        raise RunError(
            f"{storage.redact(url)}: STAC API search failed ({type(exc).__name__}: {storage.redact(str(exc))})"
        ) from None
    if not items:
        raise RunError(f"{storage.redact(url)}: the STAC API search ({asked or 'everything'}) found no item")
    found = []
    for item in items:
        if asset in item.assets:
            found.append(item.assets[asset].get_absolute_href())
        elif item.get_self_href():
            found.append(f"{item.get_self_href()}{band_assets.ITEM_MARK}{item.id}")
        else:
            raise RunError(f"{storage.redact(url)}: item {item.id!r} has no {asset!r} asset and no self link")
        if origins is not None:
            _note_origin(origins, found[-1], ItemOrigin(item.id, storage.redact(url), item.properties.get("datetime")))
    log.info("%s: %d items (%s)", storage.redact(url), len(found), asked)
    return found


def order_scenes(scenes: list[SceneInfo], rule: str) -> list[SceneInfo]:
    """The order in which scenes fill a pixel: newest acquisition first (undated last) for
    ``latest``, input order otherwise."""
    if rule != "latest":
        return list(scenes)
    dated = sorted((s for s in scenes if s.acquired), key=lambda s: s.acquired, reverse=True)
    return dated + [s for s in scenes if not s.acquired]


def catalog(
    locations: list[str],
    n_bands: int,
    selection: BandSelection | None = None,
    origins: dict[str, ItemOrigin] | None = None,
) -> tuple[list[SceneInfo], dict[str, str]]:
    """Open every header, finding the model's bands by ``selection`` if given; bad scenes are
    reported (location -> reason, with the STAC item it came from in ``origins``), not fatal.
    A scene's item's acquisition time is the scene's."""
    good, bad = [], {}
    origins = origins or {}

    def opened(loc: str) -> SceneInfo | SceneError:
        try:
            return open_scene(loc, expected_bands=n_bands, selection=selection)
        except SceneError as exc:
            return exc

    # on a store each header costs a few requests: hundreds of scenes are opened concurrently
    remote = any(storage.is_url(loc) or band_assets.is_item_ref(loc) for loc in locations)
    for loc, info in zip(locations, storage.concurrently(opened, locations, remote), strict=True):
        origin = origins.get(loc)
        if isinstance(info, SceneError):
            named = origin and not band_assets.is_item_ref(loc)  # a reference names its item already
            bad[str(loc)] = f"{info.reason} (the asset of {origin})" if named else info.reason
            log.error("skipping scene %s: %s", loc, bad[str(loc)])
            continue
        good.append(replace(info, acquired=origin.acquired or info.acquired) if origin else info)
    return good, bad
